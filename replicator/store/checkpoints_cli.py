"""``replicator checkpoints list | history | restore``: inspect and rewind stream positions.

A restore writes the chosen history row's position as the stream's checkpoint
and records a history row with reason ``restore``; the daemon resumes from it
on its next start. An ERP slot cannot go back: positions below what it has
confirmed are released, so such a restore is refused and ``replicator resync``
is named instead. A Salesforce replay id is always accepted: the stream
replays from it, or catches the object up when it is outside the window.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging

import asyncpg

from replicator import config as config_module
from replicator.config import Settings
from replicator.errors import ConfigError, ReplicatorError
from replicator.sources.erp.snapshot import SESSION_SETTINGS
from replicator.store import checkpoints
from replicator.store.admin import confirm, print_table, replica_connection
from replicator.store.checkpoints import Checkpoint

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", required=True, help="path of the TOML config file"
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="the current checkpoint of every stream")
    history = sub.add_parser("history", help="past checkpoints, newest first")
    history.add_argument("stream", nargs="?", help="only this stream")
    history.add_argument(
        "--limit", type=int, default=50, help="rows to show (default 50)"
    )
    restore = sub.add_parser("restore", help="rewind a stream to a past checkpoint")
    restore.add_argument("stream", help="the stream, as `checkpoints list` names it")
    restore.add_argument(
        "--to",
        required=True,
        metavar="TIME|ID",
        help="a history row id, or a time: the last checkpoint at or before it",
    )
    restore.add_argument(
        "--yes", "-y", action="store_true", help="do not ask for confirmation"
    )


def run(args: argparse.Namespace) -> int:
    settings = config_module.load(args.config)
    if args.action == "list":
        return asyncio.run(list_checkpoints(settings))
    if args.action == "history":
        return asyncio.run(show_history(settings, args.stream, args.limit))
    return asyncio.run(restore(settings, args.stream, args.to, assume_yes=args.yes))


async def list_checkpoints(settings: Settings) -> int:
    async with replica_connection(settings.replica.resolve()) as conn:
        rows = await conn.fetch(
            "SELECT stream, position, slot_name, updated_at, details::text "
            "FROM replicator.checkpoints ORDER BY stream"
        )
    print_table(("stream", "position", "slot", "updated", "details"), rows)
    return 0


async def show_history(settings: Settings, stream: str | None, limit: int) -> int:
    async with replica_connection(settings.replica.resolve()) as conn:
        rows = await conn.fetch(
            "SELECT id, recorded_at, stream, reason, position, changes "
            "FROM replicator.checkpoint_history WHERE $1::text IS NULL OR stream = $1 "
            "ORDER BY id DESC LIMIT $2",
            stream,
            limit,
        )
    print_table(("id", "recorded", "stream", "reason", "position", "changes"), rows)
    return 0


def parse_target(text: str) -> int | dt.datetime:
    """A history id (digits) or an ISO time (UTC unless it names its offset)."""
    if text.isdigit():
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            f"--to {text!r} is neither a history id nor an ISO time; "
            "pass e.g. --to 42 or --to 2024-06-01T12:00:00Z"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


async def _pick(
    conn: asyncpg.Connection, stream: str, target: int | dt.datetime
) -> asyncpg.Record:
    # Only rows that name a position the stream can start from: catch-up notes
    # of the Salesforce source carry no replay id.
    query = (
        "SELECT id, stream, position, lsn, system_identifier, timeline, slot_name, "
        "recorded_at FROM replicator.checkpoint_history WHERE stream = $1 "
        "AND position ~ '^(-?[0-9]+|[0-9A-F]+/[0-9A-F]+)$' "
    )
    if isinstance(target, int):
        row = await conn.fetchrow(query + "AND id = $2", stream, target)
    else:
        row = await conn.fetchrow(
            query + "AND recorded_at <= $2 ORDER BY id DESC LIMIT 1", stream, target
        )
    if row is None:
        raise ReplicatorError(
            f"no checkpoint of stream {stream!r} matches --to "
            f"{target!s}; see `replicator checkpoints history {stream}`"
        )
    return row


async def restore(settings: Settings, stream: str, to: str, *, assume_yes: bool) -> int:
    """Write the chosen history position as ``stream``'s checkpoint, after confirmation."""
    target = parse_target(to)
    async with replica_connection(settings.replica.resolve()) as conn:
        current = await checkpoints.load(conn, stream)
        row = await _pick(conn, stream, target)
        erp = settings.erp if settings.erp and settings.erp.stream == stream else None
        if erp is not None:
            refusal = await _erp_refusal(settings, row)
            if refusal:
                print(refusal)
                return 1
        print(
            f"stream {stream}: checkpoint {current.position if current else '(none)'} "
            f"-> {row['position']} (history id {row['id']}, recorded "
            f"{row['recorded_at'].isoformat()})"
        )
        if not confirm("restore this checkpoint?", assume_yes=assume_yes):
            print("nothing changed")
            return 1
        async with conn.transaction():
            await checkpoints.save(
                conn,
                Checkpoint(
                    stream,
                    row["position"],
                    row["lsn"],
                    row["system_identifier"],
                    row["timeline"],
                    row["slot_name"],
                    {
                        "restored_from": row["id"],
                        "previous": current.position if current else None,
                    },
                ),
                reason="restore",
            )
    logger.warning(
        "checkpoint restored by operator",
        extra={"stream": stream, "position": row["position"], "history_id": row["id"]},
    )
    print(
        f"restored: the daemon resumes stream {stream} from {row['position']} on its "
        "next start (restart it if it is running)"
    )
    return 0


async def _erp_refusal(settings: Settings, row: asyncpg.Record) -> str | None:
    """Why the ERP slot cannot replay from ``row``, or None when it can."""
    assert settings.erp is not None
    try:
        erp = await asyncpg.connect(
            settings.erp.database.resolve(), server_settings=SESSION_SETTINGS
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise ReplicatorError(
            f"cannot connect to the ERP to check the slot: {exc}"
        ) from exc
    try:
        slot = await erp.fetchrow(
            "SELECT confirmed_flush_lsn::text AS confirmed, "
            "confirmed_flush_lsn > $2::text::pg_lsn AS ahead FROM pg_replication_slots "
            "WHERE slot_name = $1",
            settings.erp.slot,
            row["position"],
        )
    finally:
        await erp.close()
    if slot is None or not slot["ahead"]:
        return None
    return (
        f"cannot restore ERP stream {row['stream']!r} to {row['position']}: replication "
        f"slot {settings.erp.slot!r} has confirmed {slot['confirmed']}, and PostgreSQL "
        "has released the changes before it, so they cannot be replayed. Reload "
        "instead: `replicator resync TABLE --config ...` for one table, or drop the "
        "slot with the daemon stopped to resync every table on the next start"
    )
