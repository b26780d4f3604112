"""The replica store: the replicator's own tables, mirrors, checkpoints and dead letters."""

from __future__ import annotations

__all__: list[str] = []
