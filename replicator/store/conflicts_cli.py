"""``replicator conflicts list``: field conflicts of the two-way sync and the rule that decided.

The table stays empty until the write-back sinks land; the command already
reads it so operators and scripts can rely on it.
"""

from __future__ import annotations

import argparse
import asyncio

from replicator import config as config_module
from replicator.config import Settings
from replicator.store.admin import print_table, replica_connection


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", required=True, help="path of the TOML config file"
    )
    sub = parser.add_subparsers(dest="action", required=True)
    listing = sub.add_parser("list", help="conflicts, newest first")
    listing.add_argument("--entity", help="only this entity")
    listing.add_argument(
        "--limit",
        type=_count,
        default=100,
        help="rows to show, newest first (default 100)",
    )
    listing.add_argument(
        "--all",
        action="store_true",
        dest="show_all",
        help="also values a source replaced with its own later edit (the log keeps "
        "every replaced value; by default only decisions between the two systems)",
    )


def run(args: argparse.Namespace) -> int:
    settings = config_module.load(args.config)
    return asyncio.run(
        list_conflicts(settings, args.entity, args.limit, show_all=args.show_all)
    )


async def list_conflicts(
    settings: Settings, entity: str | None, limit: int, *, show_all: bool = False
) -> int:
    async with replica_connection(settings.replica.resolve()) as conn:
        rows = await conn.fetch(
            "SELECT id, recorded_at, entity, entity_key, field, kept_value, kept_source, "
            "kept_time, discarded_value, discarded_source, discarded_time, rule "
            "FROM replicator.conflicts WHERE ($1::text IS NULL OR entity = $1) "
            "AND ($3 OR kept_source IS DISTINCT FROM discarded_source) "
            "ORDER BY id DESC LIMIT $2",
            entity,
            limit,
            show_all,
        )
    print_table(
        (
            "id",
            "recorded",
            "entity",
            "key",
            "field",
            "kept value",
            "kept from",
            "kept time",
            "discarded value",
            "discarded from",
            "discarded time",
            "rule",
        ),
        rows,
    )
    return 0


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value
