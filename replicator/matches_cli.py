"""``replicator matches``: duplicate candidates waiting for an operator's choice.

A record that appeared with no link and matched several records of the other
side waits in ``unified.match_review``; nothing is created for it, nor for its
unlinked candidates, until one is chosen here. Deciding runs
``replicator.linking.decide`` on the replica: the outbox rows it writes are
sent by the running daemon's sinks.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import asyncpg
import orjson

from replicator import config as config_module
from replicator.config import Settings
from replicator.errors import ConfigError
from replicator.mapping.config import EntitySettings
from replicator.store.admin import render, replica_connection

__all__ = ["add_arguments", "create", "link", "list_reviews", "run"]

_LIST_SQL = """
SELECT id, entity, side, record_key, record::text AS record,
       candidates::text AS candidates, rule, status, chosen, decided_by,
       created_at, decided_at
FROM unified.match_review
WHERE ($1::text IS NULL OR entity = $1) AND ($2 OR status = 'open')
ORDER BY id
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", required=True, help="path of the TOML config file"
    )
    _list_options(parser, on_action=False)
    sub = parser.add_subparsers(dest="action")
    listing = sub.add_parser("list", help="reviews still open, oldest first (default)")
    _list_options(listing, on_action=True)
    link_parser = sub.add_parser("link", help="link the record to one candidate")
    link_parser.add_argument("id", type=int, help="the review's id")
    link_parser.add_argument("candidate", help="the chosen candidate's key")
    create_parser = sub.add_parser(
        "create", help="no candidate is the record: create it on the other side"
    )
    create_parser.add_argument("id", type=int, help="the review's id")


def _list_options(parser: argparse.ArgumentParser, *, on_action: bool) -> None:
    # Accepted with and without ``list``: the action's copies set nothing
    # unless given, so they never hide what came before the action.
    parser.add_argument(
        "--entity",
        help="only this entity",
        default=argparse.SUPPRESS if on_action else None,
    )
    parser.add_argument(
        "--all",
        action="store_true",
        dest="show_all",
        default=argparse.SUPPRESS if on_action else False,
        help="also reviews already decided",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        dest="as_json",
        default=argparse.SUPPRESS if on_action else False,
        help="one JSON array, every field of each review",
    )


def run(args: argparse.Namespace) -> int:
    settings = config_module.load(args.config)
    action = getattr(args, "action", None) or "list"
    if action == "list":
        return asyncio.run(
            list_reviews(
                settings, args.entity, show_all=args.show_all, as_json=args.as_json
            )
        )
    if action == "link":
        return asyncio.run(link(settings, args.id, args.candidate))
    return asyncio.run(create(settings, args.id))


async def list_reviews(
    settings: Settings,
    entity: str | None,
    *,
    show_all: bool = False,
    as_json: bool = False,
) -> int:
    """Print the open reviews (every review with ``show_all``)."""
    async with replica_connection(settings.replica.resolve()) as conn:
        rows = await conn.fetch(_LIST_SQL, entity, show_all)
    reviews = [_review(row) for row in rows]
    if as_json:
        print(orjson.dumps(reviews, option=orjson.OPT_INDENT_2).decode())
        return 0
    entities = {e.name: e for e in settings.entities}
    for review in reviews:
        print(_describe(review, entities.get(review["entity"])))
    if not reviews:
        print("(no open reviews)" if not show_all else "(no reviews)")
    return 0


def _review(row: asyncpg.Record) -> dict[str, Any]:
    review = dict(row)
    review["record"] = orjson.loads(row["record"])
    review["candidates"] = orjson.loads(row["candidates"])
    for stamp in ("created_at", "decided_at"):
        review[stamp] = render(row[stamp]) if row[stamp] is not None else None
    return review


def _describe(review: Mapping[str, Any], entity: EntitySettings | None) -> str:
    """Lines of one review: its head, the record's key fields, each candidate."""
    keys = _key_fields(entity)
    rule = review["rule"]
    if entity is not None and rule is not None and 0 <= rule < len(entity.match):
        rule_text = f"rule {rule} ({', '.join(entity.match[rule].fields)})"
    else:
        rule_text = f"rule {rule}"
    status = review["status"]
    if review["chosen"]:
        status += f" to {review['chosen']}"
    if review["decided_by"]:
        status += f" by {review['decided_by']}"
    record = review["record"]
    lines = [
        f"review {review['id']}  {review['entity']}  {review['side']} "
        f"{review['record_key']}  {status}  {rule_text}",
        f"  record     {_values(record, keys or sorted(record))}",
    ]
    for candidate in review["candidates"]:
        fields = candidate.get("fields") or {}
        order = keys + sorted(set(fields) - set(keys))
        lines.append(
            f"  candidate  {candidate['side']} {candidate['key'] or '-'}  "
            f"{_values(fields, order)}"
        )
    return "\n".join(lines)


def _key_fields(entity: EntitySettings | None) -> list[str]:
    """The fields the entity's match rules compare, in rule order."""
    if entity is None:
        return []
    keys: list[str] = []
    for rule in entity.match:
        keys += [name for name in rule.fields if name not in keys]
    return keys


def _values(fields: Mapping[str, Any], order: Sequence[str]) -> str:
    shown = [
        f"{name}={fields[name]!r}" for name in order if fields.get(name) is not None
    ]
    return ", ".join(shown) or "-"


async def link(settings: Settings, review_id: int, candidate: str) -> int:
    """Link the record of review ``review_id`` to its candidate keyed ``candidate``."""
    return await _decide(settings, review_id, candidate)


async def create(settings: Settings, review_id: int) -> int:
    """Settle review ``review_id`` by creating its record on the other side."""
    return await _decide(settings, review_id, None)


async def _decide(settings: Settings, review_id: int, choice: str | None) -> int:
    from replicator.linking import decide
    from replicator.unified import SyncEngine

    if not settings.entities:
        raise ConfigError(
            "the configuration maps no entities; add [[entities]] to decide reviews"
        )
    client = settings.salesforce.client_name if settings.salesforce else "replicator"
    engine = SyncEngine(settings, client_name=client)
    async with replica_connection(settings.replica.resolve()) as conn:
        await engine.prepare(conn, {})
        try:
            done = await decide(engine, conn, review_id, choice, _operator())
        except LookupError as exc:
            print(
                f"replicator: {exc.args[0]}; see `replicator matches`", file=sys.stderr
            )
            return 1
    print(done)
    return 0


def _operator() -> str:
    return f"operator:{os.environ.get('USER') or 'unknown'}"
