"""Stream checkpoints: written in the same replica transaction as the changes they cover.

A checkpoint names the source it belongs to (the ERP's system identifier,
timeline and slot), so a checkpoint taken from another server or from a
recreated slot is recognised instead of silently resumed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson


@dataclass(frozen=True, slots=True)
class Checkpoint:
    stream: str
    position: str
    lsn: int | None = None
    system_identifier: str | None = None
    timeline: int | None = None
    slot_name: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    updated_at: dt.datetime | None = None


async def load(conn: asyncpg.Connection, stream: str) -> Checkpoint | None:
    row = await conn.fetchrow(
        "SELECT stream, position, lsn, system_identifier, timeline, slot_name, "
        "details, updated_at FROM replicator.checkpoints WHERE stream = $1",
        stream,
    )
    if row is None:
        return None
    return Checkpoint(
        row["stream"],
        row["position"],
        row["lsn"],
        row["system_identifier"],
        row["timeline"],
        row["slot_name"],
        orjson.loads(row["details"]),
        row["updated_at"],
    )


async def save(
    conn: asyncpg.Connection,
    cp: Checkpoint,
    *,
    reason: str,
    changes: int = 0,
    history: bool = True,
) -> None:
    """Store ``cp``; call inside the transaction that applied what it covers."""
    await conn.execute(
        "INSERT INTO replicator.checkpoints AS c (stream, position, lsn, "
        "system_identifier, timeline, slot_name, details, updated_at) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, now()) ON CONFLICT (stream) DO UPDATE "
        "SET position = excluded.position, lsn = excluded.lsn, system_identifier = "
        "excluded.system_identifier, timeline = excluded.timeline, slot_name = "
        "excluded.slot_name, details = excluded.details, updated_at = now()",
        cp.stream,
        cp.position,
        cp.lsn,
        cp.system_identifier,
        cp.timeline,
        cp.slot_name,
        orjson.dumps(cp.details).decode(),
    )
    if history:
        await conn.execute(
            "INSERT INTO replicator.checkpoint_history (stream, position, lsn, "
            "system_identifier, timeline, slot_name, reason, changes) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            cp.stream,
            cp.position,
            cp.lsn,
            cp.system_identifier,
            cp.timeline,
            cp.slot_name,
            reason,
            changes,
        )


async def delete(conn: asyncpg.Connection, stream: str) -> None:
    await conn.execute("DELETE FROM replicator.checkpoints WHERE stream = $1", stream)
