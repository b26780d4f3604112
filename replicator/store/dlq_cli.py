"""``replicator dlq list | retry | drop``: what the appliers parked, and what to do with it.

Retrying a parked Salesforce change re-reads its record over REST into the
mirror, which makes the mirror equal to the org whatever the lost event said.
A letter without a record key (an event that could not be parsed) cannot be
retried that way: resync its object instead, then drop the letter. Dropped and
retried letters keep their row, with their status, as an audit trail.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging

import asyncpg

from replicator import config as config_module
from replicator.config import Settings
from replicator.store.admin import print_table, replica_connection

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", required=True, help="path of the TOML config file"
    )
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="dead letters, newest first")
    listing.add_argument(
        "--status", default="parked", choices=("parked", "retried", "dropped", "any")
    )
    listing.add_argument("--limit", type=int, default=100)
    for action, text in (
        ("retry", "re-read the record of a letter"),
        ("drop", "mark a letter as dealt with"),
    ):
        sub_parser = sub.add_parser(action, help=text)
        which = sub_parser.add_mutually_exclusive_group(required=True)
        which.add_argument("id", nargs="?", type=int, help="the letter's id")
        which.add_argument("--all", action="store_true", help="every parked letter")


def run(args: argparse.Namespace) -> int:
    settings = config_module.load(args.config)
    if args.action == "list":
        return asyncio.run(list_letters(settings, args.status, args.limit))
    if args.action == "drop":
        return asyncio.run(drop(settings, None if args.all else args.id))
    return asyncio.run(retry(settings, None if args.all else args.id))


async def list_letters(settings: Settings, status: str, limit: int) -> int:
    async with replica_connection(settings.replica.resolve()) as conn:
        rows = await conn.fetch(
            "SELECT id, created_at, stream, entity, source_key, position, status, reason "
            "FROM replicator.dead_letters WHERE $1 = 'any' OR status = $1 "
            "ORDER BY id DESC LIMIT $2",
            status,
            limit,
        )
    print_table(
        ("id", "created", "stream", "entity", "key", "position", "status", "reason"),
        rows,
    )
    return 0


async def _parked(conn: asyncpg.Connection, letter: int | None) -> list[asyncpg.Record]:
    rows = await conn.fetch(
        "SELECT id, stream, entity, source_key FROM replicator.dead_letters "
        "WHERE status = 'parked' AND ($1::bigint IS NULL OR id = $1) ORDER BY id",
        letter,
    )
    if letter is not None and not rows:
        print(f"no parked dead letter with id {letter}; see `replicator dlq list`")
    return list(rows)


async def drop(settings: Settings, letter: int | None) -> int:
    async with replica_connection(settings.replica.resolve()) as conn:
        rows = await _parked(conn, letter)
        await conn.execute(
            "UPDATE replicator.dead_letters SET status = 'dropped' WHERE id = ANY($1::bigint[])",
            [r["id"] for r in rows],
        )
    for row in rows:
        logger.warning(
            "dead letter dropped by operator",
            extra={
                "id": row["id"],
                "stream": row["stream"],
                "entity": row["entity"],
                "key": row["source_key"],
            },
        )
    print(f"dropped {len(rows)} dead letter(s)")
    return 0 if rows or letter is None else 1


async def retry(settings: Settings, letter: int | None) -> int:
    """Re-read the record of each chosen letter; mark it retried when that worked."""
    async with replica_connection(settings.replica.resolve()) as conn:
        rows = await _parked(conn, letter)
        retriable, refused = _split(settings, rows)
        for row, why in refused:
            print(f"dead letter {row['id']} ({row['entity']}): cannot retry: {why}")
        if retriable:
            await _reread(settings, conn, retriable)
        await conn.execute(
            "UPDATE replicator.dead_letters SET status = 'retried' WHERE id = ANY($1::bigint[])",
            [r["id"] for r in retriable],
        )
    print(f"retried {len(retriable)} dead letter(s), {len(refused)} left parked")
    return 0 if not refused and (rows or letter is None) else 1


def _split(
    settings: Settings, rows: list[asyncpg.Record]
) -> tuple[list[asyncpg.Record], list[tuple[asyncpg.Record, str]]]:
    sf = settings.salesforce
    objects = set(sf.objects) if sf else set()
    ok: list[asyncpg.Record] = []
    refused: list[tuple[asyncpg.Record, str]] = []
    for row in rows:
        if sf is None or not row["stream"].startswith(sf.stream_prefix + ":"):
            refused.append(
                (row, "only Salesforce changes can be re-read; resync the table")
            )
        elif row["entity"] not in objects:
            refused.append((row, f"{row['entity']!r} is not in salesforce.objects"))
        elif not row["source_key"]:
            refused.append(
                (
                    row,
                    f"no record key; run `replicator resync {row['entity']}`, "
                    "then drop it",
                )
            )
        else:
            ok.append(row)
    return ok, refused


async def _reread(
    settings: Settings, conn: asyncpg.Connection, rows: list[asyncpg.Record]
) -> None:
    import aiohttp

    from replicator.sources.salesforce.applier import SfApplier
    from replicator.sources.salesforce.rest import RestClient
    from replicator.sources.salesforce.source import build_authenticator
    from replicator.store.mirror import MirrorStore

    cfg = settings.salesforce
    assert cfg is not None
    auth = build_authenticator(cfg)
    async with aiohttp.ClientSession() as http:
        await auth.login()
        rest = RestClient(
            auth, http, api_version=cfg.api_version, client_name=cfg.client_name
        )
        applier = SfApplier(
            MirrorStore(conn, cfg.stream_prefix, schema="sf"),
            rest,
            stream_prefix=cfg.stream_prefix,
            skew=dt.timedelta(seconds=cfg.skew_seconds),
        )
        by_object: dict[str, set[str]] = {}
        for row in rows:
            by_object.setdefault(row["entity"], set()).add(row["source_key"])
        for obj, ids in by_object.items():
            await applier.prepare(obj)
            await applier.reread(obj, ids)
            logger.warning(
                "dead letters retried by re-reading their records",
                extra={"object": obj, "records": len(ids)},
            )
