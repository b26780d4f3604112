"""The ERP source: PostgreSQL logical replication with the ``pgoutput`` plugin."""

from __future__ import annotations

__all__: list[str] = []
