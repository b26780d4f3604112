"""Recognise a replica restored from a backup: its identity no longer matches its own record.

A dump restored into a database gives ``replicator.checkpoints`` a new oid; a
physical backup brought up by archive recovery starts a new timeline. Either
way the row in ``replicator.replica_identity`` came back with the backup and
names the database it was written in, not this one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import asyncpg

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Identity:
    checkpoints_oid: int
    system_identifier: str
    timeline: int


async def current(conn: asyncpg.Connection) -> Identity:
    """Return the identity of the replica ``conn`` is connected to."""
    oid = await conn.fetchval("SELECT 'replicator.checkpoints'::regclass::oid::bigint")
    try:
        row = await conn.fetchrow(
            "SELECT (pg_control_system()).system_identifier::text AS system, "
            "(pg_control_checkpoint()).timeline_id AS timeline"
        )
    except asyncpg.InsufficientPrivilegeError:
        # The control functions may be revoked from the replicator's role: the
        # table oid still tells a restored dump apart.
        return Identity(int(oid), "", 0)
    return Identity(int(oid), str(row["system"]), int(row["timeline"]))


async def stored(conn: asyncpg.Connection) -> Identity | None:
    row = await conn.fetchrow(
        "SELECT checkpoints_oid, system_identifier, timeline "
        "FROM replicator.replica_identity WHERE id = 1"
    )
    if row is None:
        return None
    return Identity(int(row[0]), row[1], int(row[2]))


async def was_restored(conn: asyncpg.Connection) -> bool:
    """True when the stored identity names another database than this one."""
    before = await stored(conn)
    if before is None:
        return False
    now = await current(conn)
    if before == now:
        return False
    logger.warning(
        "replica identity changed since the checkpoints were written",
        extra={
            "stored_oid": before.checkpoints_oid,
            "oid": now.checkpoints_oid,
            "stored_timeline": before.timeline,
            "timeline": now.timeline,
        },
    )
    return True


async def record(conn: asyncpg.Connection) -> None:
    """Store the identity of this replica (after its checkpoints are trusted)."""
    now = await current(conn)
    await conn.execute(
        "INSERT INTO replicator.replica_identity (id, checkpoints_oid, system_identifier, "
        "timeline) VALUES (1, $1, $2, $3) ON CONFLICT (id) DO UPDATE SET checkpoints_oid "
        "= excluded.checkpoints_oid, system_identifier = excluded.system_identifier, "
        "timeline = excluded.timeline, recorded_at = now()",
        now.checkpoints_oid,
        now.system_identifier,
        now.timeline,
    )
