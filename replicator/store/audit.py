"""The audit trail: write-backs and operator commands, queryable in the replica, pruned by age."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import asyncpg
import orjson

logger = logging.getLogger(__name__)


async def record(
    conn: asyncpg.Connection, kind: str, subject: str | None, detail: dict[str, Any]
) -> None:
    """Add one audit row (inside the caller's transaction when there is one)."""
    await conn.execute(
        "INSERT INTO replicator.audit (kind, subject, detail) VALUES ($1, $2, $3)",
        kind,
        subject,
        orjson.dumps(detail, default=str).decode(),
    )


async def prune(conn: asyncpg.Connection, retention: dt.timedelta) -> dict[str, int]:
    """Delete audit rows, checkpoint history and finished outbox rows past ``retention``."""
    counts = {}
    for table, column, extra in (
        ("replicator.audit", "at", ""),
        ("replicator.checkpoint_history", "recorded_at", ""),
        ("replicator.outbox", "created_at", " AND status IN ('done', 'failed')"),
        ("replicator.outbox_echoes", "at", ""),
    ):
        status = await conn.execute(
            f"DELETE FROM {table} WHERE {column} < now() - $1::interval{extra}",
            retention,
        )
        counts[table] = int(status.split()[-1])
    if any(counts.values()):
        logger.info(
            "audit trail pruned",
            extra={"deleted": counts, "retention_days": retention.days},
        )
    return counts
