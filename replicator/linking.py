"""Link records the two systems already hold, and unlinked newcomers, as one entity.

At switch-on each mapped entity gets one pass over both mirrors (``link_all``):
records are paired by the link they carry (the Salesforce external id, the
ERP's Salesforce Id column), then by the entity's match rules; a record with
no partner is created on the other side; a record with several candidates
goes to ``unified.match_review`` and nothing is created for it until an
operator chooses (``decide``, ``replicator matches``). Live records that appear
with no link go through the same rules (``match_live``). Decisions are pure
(``mapping.matching``); this module reads the mirrors and writes the tables.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from replicator.conflict import Change, Conflict, Version
from replicator.mapping.matching import match
from replicator.sources.salesforce.schema import snake
from replicator.store.mirror import quote_ident
from replicator.unified import (
    OutboxEntry,
    SyncEngine,
    _Entity,
    first_id,
    key_column,
    mirror_rows,
    other,
)

__all__ = ["LinkReport", "decide", "link_all", "match_live"]

logger = logging.getLogger(__name__)

_KEY = "__key"  # where a candidate's own key travels inside its values
# The time of the values a link reads from the mirrors: older than any change.
# A change committed before the pass but streamed after it (a source lagging)
# is newer than what the pass read, and wins; between the two records of a
# pair, owners and then the source precedence decide (same time bucket).
BASELINE = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(slots=True)
class LinkReport:
    """What the initial pass did for one entity."""

    entity: str
    by_link: int = 0
    by_match: int = 0
    to_review: int = 0
    created_in_salesforce: int = 0
    created_in_erp: int = 0
    quarantined: int = 0


@dataclass(frozen=True, slots=True)
class _Mirror:
    qualified: str
    key: tuple[str, ...]


async def _mirror(
    engine: SyncEngine, conn: asyncpg.Connection, entity: _Entity, side: str
) -> _Mirror | None:
    settings = engine.settings
    if side == "erp":
        stream = settings.erp.stream if settings.erp is not None else "erp"
        source, schema = entity.settings.erp, "erp"
    else:
        sf = settings.salesforce
        stream = sf.stream_prefix if sf is not None else "sf"
        source, schema = entity.settings.salesforce, "sf"
    row = await conn.fetchrow(
        "SELECT mirror_table, key_columns::text AS k FROM replicator.mirror_tables "
        "WHERE stream = $1 AND source_table = $2",
        stream,
        source,
    )
    if row is None:
        return None
    qualified = f"{schema}.{quote_ident(row['mirror_table'])}"
    return _Mirror(qualified, tuple(orjson.loads(row["k"])))


def _reference_order(engine: SyncEngine) -> list[_Entity]:
    """Entities with the entities they refer to first (customers before orders)."""
    done: list[_Entity] = []
    seen: set[str] = set()

    def visit(entity: _Entity, path: frozenset[str]) -> None:
        if entity.name in seen or entity.name in path:
            return
        for field in entity.settings.fields:
            target = engine.entities.get(field.reference or "")
            if target is not None:
                visit(target, path | {entity.name})
        seen.add(entity.name)
        done.append(entity)

    for entity in engine.entities.values():
        visit(entity, frozenset())
    return done


async def link_all(engine: SyncEngine, conn: asyncpg.Connection) -> list[LinkReport]:
    """Run the initial pass for every entity not linked yet; return what each did."""
    reports = []
    for entity in _reference_order(engine):
        if await engine.is_linked(conn, entity):
            continue
        report = await initial_link(engine, conn, entity)
        if report is not None:
            reports.append(report)
    return reports


async def initial_link(
    engine: SyncEngine, conn: asyncpg.Connection, entity: _Entity
) -> LinkReport | None:
    """Link the records both mirrors hold for ``entity``; None if a mirror is missing."""
    erp_mirror = await _mirror(engine, conn, entity, "erp")
    sf_mirror = await _mirror(engine, conn, entity, "salesforce")
    if erp_mirror is None or sf_mirror is None:
        logger.warning(
            "entity not linked yet: its mirror is missing",
            extra={
                "entity": entity.name,
                "erp": bool(erp_mirror),
                "sf": bool(sf_mirror),
            },
        )
        return None
    for attempt in itertools.count(1):
        report = LinkReport(entity.name)
        try:
            async with conn.transaction():
                if not await _lock(conn, entity, erp_mirror, sf_mirror):
                    return None
                await engine.ensure_types(conn, entity)
                await _pass(engine, conn, entity, erp_mirror, sf_mirror, report)
                await conn.execute(
                    "INSERT INTO replicator.sync_entities (entity, linked_at, "
                    "details) VALUES ($1, now(), $2::text::jsonb)",
                    entity.name,
                    orjson.dumps(
                        {k: getattr(report, k) for k in LinkReport.__slots__[1:]}
                    ).decode(),
                )
            break
        except (
            asyncpg.exceptions.LockNotAvailableError,
            asyncpg.exceptions.DeadlockDetectedError,
        ):
            # the appliers go first; the pass waits for a quiet moment
            logger.info(
                "entity link waits for the appliers",
                extra={"entity": entity.name, "attempt": attempt},
            )
            await asyncio.sleep(min(2.0, 0.1 * attempt))
    engine.linked.add(entity.name)
    logger.info(
        "entity linked: %s paired by link, %s by match rules, %s to review, "
        "%s created in Salesforce, %s in the ERP",
        report.by_link,
        report.by_match,
        report.to_review,
        report.created_in_salesforce,
        report.created_in_erp,
        extra={"entity": entity.name},
    )
    return report


async def _lock(
    conn: asyncpg.Connection, entity: _Entity, erp_mirror: _Mirror, sf_mirror: _Mirror
) -> bool:
    """Lock both mirrors and the unified table; False if the entity got linked.

    Writers of either mirror then wait until the pass commits, and their
    resolution sees the entity linked: no change falls between. The locks
    are given up after a short wait (the caller tries again), so an applier
    that holds one mirror and waits for a row the other applier holds is
    never the one a deadlock aborts.
    """
    await conn.execute("SET LOCAL lock_timeout = '500ms'")
    await conn.execute(
        f"LOCK TABLE {erp_mirror.qualified}, {sf_mirror.qualified} IN SHARE MODE"
    )
    await conn.execute(f"LOCK TABLE {entity.table} IN EXCLUSIVE MODE")
    await conn.execute("SET LOCAL lock_timeout = 0")
    return not await conn.fetchval(
        "SELECT 1 FROM replicator.sync_entities WHERE entity = $1", entity.name
    )


async def _pass(
    engine: SyncEngine,
    conn: asyncpg.Connection,
    entity: _Entity,
    erp_mirror: _Mirror,
    sf_mirror: _Mirror,
    report: LinkReport,
) -> None:
    erp_rows = await mirror_rows(conn, erp_mirror.qualified, erp_mirror.key, None)
    sf_rows = {
        k: r
        for k, r in (
            await mirror_rows(conn, sf_mirror.qualified, sf_mirror.key, None)
        ).items()
        if not r.get("is_deleted")
    }
    linked_erp = {
        r[0] for r in await conn.fetch(f"SELECT erp_key FROM {entity.table}") if r[0]
    }
    linked_sf = {
        r[0] for r in await conn.fetch(f"SELECT sf_id FROM {entity.table}") if r[0]
    }
    values: dict[tuple[str, str], dict[str, Any]] = {}
    for side, rows, linked in (
        ("erp", erp_rows, linked_erp),
        ("salesforce", sf_rows, linked_sf),
    ):
        for key in sorted(rows):
            if key in linked:
                continue
            found = await engine.values(
                conn, entity, side, key, None, rows[key], "link"
            )
            if found is None:
                report.quarantined += 1
            else:
                values[(side, key)] = found
    erp_free = sorted(k for s, k in values if s == "erp")
    sf_free = sorted(k for s, k in values if s == "salesforce")
    pairs = _pairs_by_link(entity, erp_rows, sf_rows, erp_free, sf_free)
    report.by_link = len(pairs)
    paired_erp = {e for e, _ in pairs}
    paired_sf = {s for _, s in pairs}
    held: set[str] = set()
    if entity.settings.match:
        matched, reviews = _pairs_by_match(
            entity,
            [k for k in erp_free if k not in paired_erp],
            [k for k in sf_free if k not in paired_sf],
            values,
        )
        report.by_match = len(matched)
        pairs += matched
        for side, key, candidates, rule in reviews:
            await _review(
                conn, entity, side, key, values[(side, key)], candidates, rule
            )
            held.add(f"{side}:{key}")
            held.update(f"{c['side']}:{c['key']}" for c in candidates)
        report.to_review = len(reviews)
    now = BASELINE
    plan = _Plan()
    external = snake(entity.settings.external_id)
    column = entity.settings.erp_sf_id_column
    for erp_key, sf_id in pairs:
        links = {
            "salesforce": sf_rows[sf_id].get(external),
            "erp": erp_rows[erp_key].get(column) if column else None,
        }
        _join(
            engine, plan, entity, erp_key, values[("erp", erp_key)], sf_id,
            values[("salesforce", sf_id)], now, links,
        )  # fmt: skip
    paired_erp = {e for e, _ in pairs}
    paired_sf = {s for _, s in pairs}
    for side, free, paired in (
        ("erp", erp_free, paired_erp),
        ("salesforce", sf_free, paired_sf),
    ):
        for key in free:
            if key in paired or f"{side}:{key}" in held:
                continue
            created = _alone(engine, plan, entity, side, key, values[(side, key)], now)
            if created and side == "erp":
                report.created_in_salesforce += 1
            elif created:
                report.created_in_erp += 1
    await plan.flush(engine, conn, entity)


def _pairs_by_link(
    entity: _Entity,
    erp_rows: Mapping[str, Mapping[str, Any]],
    sf_rows: Mapping[str, Mapping[str, Any]],
    erp_free: Sequence[str],
    sf_free: Sequence[str],
) -> list[tuple[str, str]]:
    """Pairs named by the records themselves: external id, Salesforce Id column."""
    free_erp = set(erp_free)
    pairs: dict[str, str] = {}
    external = snake(entity.settings.external_id)
    for sf_id in sf_free:
        link = sf_rows[sf_id].get(external)
        if link is not None and str(link) in free_erp and str(link) not in pairs:
            pairs[str(link)] = sf_id
    column = entity.settings.erp_sf_id_column
    if column:
        taken = set(pairs.values())
        free_sf = set(sf_free)
        for erp_key in erp_free:
            named = erp_rows[erp_key].get(column)
            if (
                named
                and erp_key not in pairs
                and str(named) in free_sf
                and str(named) not in taken
            ):
                pairs[erp_key] = str(named)
                taken.add(str(named))
    return sorted(pairs.items())


def _pairs_by_match(
    entity: _Entity,
    erp_keys: Sequence[str],
    sf_keys: Sequence[str],
    values: Mapping[tuple[str, str], dict[str, Any]],
) -> tuple[list[tuple[str, str]], list[tuple[str, str, list[dict[str, Any]], int]]]:
    """Pairs where a record and its only candidate choose each other; the rest to review."""
    rules = entity.settings.match
    candidates = [{**values[("erp", k)], _KEY: k} for k in erp_keys]
    claims: dict[str, list[str]] = {}
    rule_of: dict[str, int] = {}
    reviews: list[tuple[str, str, list[dict[str, Any]], int]] = []
    for sf_id in sf_keys:
        result = match(values[("salesforce", sf_id)], candidates, rules)
        if result.kind == "single":
            erp_key = result.candidates[0][_KEY]
            claims.setdefault(erp_key, []).append(sf_id)
            rule_of[erp_key] = result.rule if result.rule is not None else 0
        elif result.kind == "many":
            found = [_candidate("erp", c[_KEY], c) for c in result.candidates]
            rule = result.rule if result.rule is not None else 0
            reviews.append(("salesforce", sf_id, found, rule))
    pairs = []
    for erp_key, claimants in sorted(claims.items()):
        if len(claimants) == 1:
            pairs.append((erp_key, claimants[0]))
        else:
            found = [
                _candidate("salesforce", s, values[("salesforce", s)])
                for s in claimants
            ]
            reviews.append(("erp", erp_key, found, rule_of[erp_key]))
    return pairs, reviews


def _candidate(
    side: str, key: str, fields: Mapping[str, Any], unified_id: str | None = None
) -> dict[str, Any]:
    return {
        "side": side,
        "key": key,
        "unified_id": unified_id,
        "fields": {k: v for k, v in fields.items() if k != _KEY},
    }


async def _review(
    conn: asyncpg.Connection,
    entity: _Entity,
    side: str,
    key: str,
    record: Mapping[str, Any],
    candidates: list[dict[str, Any]],
    rule: int,
) -> None:
    held = [f"{side}:{key}"] + [
        f"{c['side']}:{c['key']}" for c in candidates if c["unified_id"] is None
    ]
    await conn.execute(
        "INSERT INTO unified.match_review (entity, side, record_key, record, "
        "candidates, rule, held) VALUES ($1, $2, $3, $4::text::jsonb, "
        "$5::text::jsonb, $6, $7)",
        entity.name,
        side,
        key,
        orjson.dumps(record).decode(),
        orjson.dumps(candidates).decode(),
        rule,
        held,
    )
    logger.warning(
        "%s %s %s has %d candidates on the other side; nothing is created until "
        "one is chosen (replicator matches)",
        entity.name,
        side,
        key,
        len(candidates),
        extra={"entity": entity.name, "key": key},
    )


@dataclass(slots=True)
class _Plan:
    """Unified rows, conflict rows and writes of a pass, written in bulk."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    conflicts: list[tuple[str, Conflict]] = field(default_factory=list)
    outbox: list[OutboxEntry] = field(default_factory=list)

    async def flush(
        self, engine: SyncEngine, conn: asyncpg.Connection, entity: _Entity
    ) -> None:
        await engine.insert_rows(conn, entity, self.rows)
        await engine.log_conflicts(conn, entity, self.conflicts)
        await engine.queue(conn, self.outbox)
        self.rows, self.conflicts, self.outbox = [], [], []

    def fold(
        self, engine: SyncEngine, entity: _Entity, row: dict[str, Any], change: Change
    ) -> None:
        result = engine.fold(entity, row, change)
        self.conflicts += [(row["unified_id"], c) for c in result.conflicts]


def _join(
    engine: SyncEngine,
    plan: _Plan,
    entity: _Entity,
    erp_key: str,
    erp_values: dict[str, Any],
    sf_id: str,
    sf_values: dict[str, Any],
    at: dt.datetime,
    links: Mapping[str, Any],
) -> None:
    """One unified row for two records: the rules merge them, each side gets the rest.

    Both versions carry the same time, so owners decide owned fields and the
    source precedence the others (``[sync] precedence``).
    """
    row: dict[str, Any] = {
        "unified_id": first_id("erp", erp_key),
        "sf_id": sf_id,
        "erp_key": erp_key,
        "versions": "{}",
    }
    for side, found in (("erp", erp_values), ("salesforce", sf_values)):
        change = Change(side, "upsert", _present(found), Version(at, side, "link"))
        plan.fold(engine, entity, row, change)
    plan.rows.append(row)
    currents = {"erp": erp_values, "salesforce": sf_values}
    version = Version(at, "erp", "link")
    plan.outbox += engine.differences(entity, row, currents, version)
    plan.outbox += _link_entries(engine, entity, row, links, version)


def _link_entries(
    engine: SyncEngine,
    entity: _Entity,
    row: Mapping[str, Any],
    links: Mapping[str, Any],
    version: Version,
) -> list[OutboxEntry]:
    """Writes that store the link in the systems themselves, where it is missing.

    ``links`` holds what the records carry now: the Salesforce external id
    (``salesforce``) and the ERP's Salesforce Id column (``erp``).
    """
    out = []
    settings = entity.settings
    stored = str(links.get("salesforce") or "")
    if "salesforce" in settings.targets and stored != str(row["erp_key"]):
        fields = {settings.external_id: row["erp_key"]}
        out.append(
            engine.entry(entity, "salesforce", row["sf_id"], fields, row, version)
        )
    column = settings.erp_sf_id_column
    if column and "erp" in settings.targets and links.get("erp") != row["sf_id"]:
        fields = {column: row["sf_id"]}
        out.append(engine.entry(entity, "erp", row["erp_key"], fields, row, version))
    return out


def _alone(
    engine: SyncEngine,
    plan: _Plan,
    entity: _Entity,
    side: str,
    key: str,
    found: dict[str, Any],
    at: dt.datetime,
) -> bool:
    """A record with no partner: its unified row, and a create on the other side."""
    if side not in entity.settings.sources:
        return False  # a one-way entity: this side's records stay where they are
    row: dict[str, Any] = {
        "unified_id": first_id(side, key),
        "sf_id": key if side == "salesforce" else None,
        "erp_key": key if side == "erp" else None,
        "versions": "{}",
    }
    version = Version(at, side, "link")
    plan.fold(engine, entity, row, Change(side, "upsert", found, version))
    plan.rows.append(row)
    plan.outbox += engine.differences(entity, row, {other(side): None}, version)
    return other(side) in entity.settings.targets


async def match_live(
    engine: SyncEngine,
    conn: asyncpg.Connection,
    entity: _Entity,
    source: str,
    key: str,
    found: dict[str, Any],
    version: Version,
) -> bool:
    """Match a record that appeared with no link; True if it was linked or held."""
    rules = entity.settings.match
    if not rules:
        return False
    rows = await conn.fetch(
        f"SELECT * FROM {entity.table} WHERE {key_column(source)} IS NULL "
        "AND deleted_at IS NULL"
    )
    candidates = [dict(r) for r in rows]
    result = match(found, candidates, rules)
    if result.kind == "none":
        return False
    if result.kind == "many":
        listed = [
            _candidate(
                other(source),
                str(c[key_column(other(source))] or ""),
                {f.name: c.get(f.name) for f in entity.settings.fields},
                c["unified_id"],
            )
            for c in result.candidates
        ]
        rule = result.rule if result.rule is not None else 0
        await _review(conn, entity, source, key, found, listed, rule)
        return True
    row = dict(result.candidates[0])
    if not await _link_to_row(engine, conn, entity, row, source, key, found, version):
        return False  # its partner got linked meanwhile: a record of its own
    logger.info(
        "linked by match rule %s instead of creating a duplicate",
        result.rule,
        extra={"entity": entity.name, "key": key, "unified_id": row["unified_id"]},
    )
    return True


async def _link_to_row(
    engine: SyncEngine,
    conn: asyncpg.Connection,
    entity: _Entity,
    row: dict[str, Any],
    source: str,
    key: str,
    found: dict[str, Any],
    version: Version,
) -> bool:
    """Link record ``key`` of ``source`` to the unified ``row`` of a one-sided record.

    Returns False, linking nothing, when the row got a ``source`` record of
    its own since it was read (its create there landed meanwhile).
    """
    locked = await conn.fetchrow(
        f"SELECT * FROM {entity.table} WHERE unified_id = $1 FOR UPDATE",
        row["unified_id"],
    )
    if locked is None or locked[key_column(source)] not in (None, key):
        return False
    row.clear()
    row.update(locked)
    await engine.set_key(conn, entity, row, source, key)
    row[key_column(source)] = key
    change = Change(source, "upsert", _present(found), version)
    await engine.absorb(conn, entity, row, change)
    # A create queued for the row's missing record now lands on this record,
    # with the values of its time: count them as the record's, so the writes
    # below restore whatever they would set back.
    currents: dict[str, Mapping[str, Any] | None] = {
        source: {**found, **await _queued(conn, entity, source, row["unified_id"])}
    }
    partner = row[key_column(other(source))]
    mirror = await _mirror(engine, conn, entity, other(source))
    if partner and mirror is not None:
        rows = await mirror_rows(conn, mirror.qualified, mirror.key, [partner])
        if partner in rows:
            currents[other(source)] = await engine.values(
                conn, entity, other(source), partner, None, rows[partner], None,
                quarantine=False,
            )  # fmt: skip
    await engine.write_differences(conn, entity, row, currents, version)
    await engine.queue(conn, _link_entries(engine, entity, row, {}, version))
    return True


def _present(found: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a record holds a value in.

    Linking merges two records: a field one of them leaves empty is no
    decision to empty the other's, whatever the times or the precedence.
    """
    return {name: value for name, value in found.items() if value is not None}


async def _queued(
    conn: asyncpg.Connection, entity: _Entity, target: str, unified_id: str
) -> dict[str, Any]:
    """The unified values that writes still queued to ``target`` will set, in order."""
    rows = await conn.fetch(
        "SELECT cause->'unified' AS unified FROM replicator.outbox WHERE entity = $1 "
        "AND target = $2 AND cause->>'unified_id' = $3 AND status = 'pending' "
        "AND operation = 'upsert' ORDER BY id",
        entity.name,
        target,
        unified_id,
    )
    values: dict[str, Any] = {}
    for r in rows:
        values.update(orjson.loads(r["unified"] or "{}"))
    return values


async def decide(
    engine: SyncEngine,
    conn: asyncpg.Connection,
    review_id: int,
    choice: str | None,
    by: str,
) -> str:
    """Settle review ``review_id``: link the candidate keyed ``choice``, or create (None).

    Returns a one-line account of what was done. Candidates not chosen that
    have no unified row yet are then treated as records with no partner.

    Raises:
        LookupError: no open review with that id, or no such candidate.
    """
    async with conn.transaction():
        review = await conn.fetchrow(
            "SELECT * FROM unified.match_review WHERE id = $1 AND status = 'open' "
            "FOR UPDATE",
            review_id,
        )
        if review is None:
            raise LookupError(f"no open match review with id {review_id}")
        entity = engine.entities.get(review["entity"])
        if entity is None:
            raise LookupError(
                f"review {review_id} is for entity {review['entity']!r}, "
                "which the configuration no longer maps"
            )
        await engine.ensure_types(conn, entity)
        candidates = orjson.loads(review["candidates"])
        side, key = review["side"], review["record_key"]
        chosen = None
        if choice is not None:
            chosen = next((c for c in candidates if c["key"] == choice), None)
            if chosen is None:
                keys = ", ".join(c["key"] for c in candidates)
                raise LookupError(
                    f"{choice!r} is not a candidate of review {review_id}; "
                    f"candidates: {keys}"
                )
        await conn.execute(
            "UPDATE unified.match_review SET status = $2, chosen = $3, "
            "decided_by = $4, decided_at = now() WHERE id = $1",
            review_id,
            "linked" if chosen else "created",
            choice,
            by,
        )
        now = BASELINE
        record = await _current(engine, conn, entity, side, key)
        if record is None:
            return f"{side} record {key} is gone; nothing to link or create"
        plan = _Plan()
        if chosen is None:
            _alone(engine, plan, entity, side, key, record, now)
            done = f"{entity.name}: {side} {key} will be created in {other(side)}"
        else:
            await _link_chosen(
                engine, conn, plan, entity, side, key, record, chosen, now
            )
            done = f"{entity.name}: {side} {key} linked to {chosen['side']} {choice}"
        await plan.flush(engine, conn, entity)
        for candidate in candidates:
            if candidate is chosen or candidate["unified_id"] is not None:
                continue
            await _release(
                engine, conn, entity, candidate["side"], candidate["key"], now
            )
        return done


async def _current(
    engine: SyncEngine,
    conn: asyncpg.Connection,
    entity: _Entity,
    side: str,
    key: str,
) -> dict[str, Any] | None:
    mirror = await _mirror(engine, conn, entity, side)
    if mirror is None:
        return None
    rows = await mirror_rows(conn, mirror.qualified, mirror.key, [key])
    if key not in rows or rows[key].get("is_deleted"):
        return None
    return await engine.values(conn, entity, side, key, None, rows[key], "review")


async def _link_chosen(
    engine: SyncEngine,
    conn: asyncpg.Connection,
    plan: _Plan,
    entity: _Entity,
    side: str,
    key: str,
    record: dict[str, Any],
    chosen: Mapping[str, Any],
    at: dt.datetime,
) -> None:
    partner_side, partner = chosen["side"], chosen["key"]
    row = await conn.fetchrow(
        f"SELECT * FROM {entity.table} WHERE {key_column(partner_side)} = $1 FOR UPDATE",
        partner,
    )
    if row is not None:
        version = Version(at, side, "review")
        if not await _link_to_row(
            engine, conn, entity, dict(row), side, key, record, version
        ):
            raise LookupError(
                f"{partner_side} {partner} was linked to {side} "
                f"{row[key_column(side)]} after the review opened; create the record "
                "instead, or merge the two by hand"
            )
        return
    partner_values = await _current(engine, conn, entity, partner_side, partner)
    if partner_values is None:
        _alone(engine, plan, entity, side, key, record, at)
        return
    erp_key, sf_id = (key, partner) if side == "erp" else (partner, key)
    erp_values, sf_values = (
        (record, partner_values) if side == "erp" else (partner_values, record)
    )
    _join(engine, plan, entity, erp_key, erp_values, sf_id, sf_values, at, {})


async def _release(
    engine: SyncEngine,
    conn: asyncpg.Connection,
    entity: _Entity,
    side: str,
    key: str,
    at: dt.datetime,
) -> None:
    """A candidate left unchosen: no longer held, it is a record with no partner."""
    still = await conn.fetchval(
        "SELECT 1 FROM unified.match_review WHERE entity = $1 AND status = 'open' "
        "AND $2 = ANY(held)",
        entity.name,
        f"{side}:{key}",
    )
    if still or await conn.fetchval(
        f"SELECT 1 FROM {entity.table} WHERE {key_column(side)} = $1", key
    ):
        return
    record = await _current(engine, conn, entity, side, key)
    if record is not None:
        plan = _Plan()
        _alone(engine, plan, entity, side, key, record, at)
        await plan.flush(engine, conn, entity)
