"""Sources: each turns one system's native change stream into change events."""

from __future__ import annotations

__all__: list[str] = []
