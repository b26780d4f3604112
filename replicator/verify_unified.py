"""``replicator verify`` of mapped entities: Salesforce, ERP and ``unified.*`` agree.

Each live unified row is compared field by field with the ERP row and the
Salesforce record it links, both read now: the ERP value must mean the unified
value, and so must the Salesforce value once through the field's transform
(``to_unified``). Values compare by meaning (numbers as decimals, JSON as data,
timestamps as instants). A reference field holds the referenced entity's
``unified_id``; the ERP must hold that row's ``erp_key`` and Salesforce its
``sf_id``. Records a source holds with no unified row are differences when the
entity's direction carries them to the other system, unless an open duplicate
review (``unified.match_review``) holds them. Each system is read whole (one
ERP query, one paged SOQL query), so run it while the sync is idle.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar

import aiohttp
import asyncpg

from replicator.config import Settings
from replicator.errors import ConfigError
from replicator.mapping.config import EntitySettings, FieldMap
from replicator.mapping.transforms import Transform, TransformError
from replicator.sources.erp.snapshot import SESSION_SETTINGS
from replicator.sources.salesforce.rest import RestClient
from replicator.sources.salesforce.source import build_authenticator
from replicator.store.mirror import quote_ident
from replicator.unified import UNIFIED_SCHEMA, _text
from replicator.verify import TableReport

__all__ = [
    "Difference",
    "EntityReport",
    "Link",
    "Snapshot",
    "agree",
    "compare_entity",
    "verify_entities",
]

logger = logging.getLogger(__name__)

REVIEW_TABLE = f"{UNIFIED_SCHEMA}.match_review"
SAMPLE = 20  # difference lines printed per entity; the rest are counted
_NO_ROW = "<no row>"
_MISSING = "<missing>"


@dataclass(frozen=True, slots=True)
class Difference:
    """One disagreement: a field's values on each side, or a record's link."""

    entity: str
    unified_id: str | None  # None: a record no unified row links
    field: str  # a mapped field, or "record" for the link itself
    erp: str
    salesforce: str
    unified: str

    def line(self) -> str:
        return (
            f"{self.entity} {self.unified_id or '-'} {self.field}: erp={self.erp} "
            f"salesforce={self.salesforce} unified={self.unified}"
        )


@dataclass
class EntityReport(TableReport):
    """A :class:`TableReport` for one entity, printed one difference a line."""

    kind: ClassVar[str] = "entity"
    entity: str = ""
    unified_rows: int = 0
    erp_rows: int = 0
    salesforce_rows: int = 0
    differences: list[Difference] = field(default_factory=list)  # the first SAMPLE
    awaiting: list[str] = field(default_factory=list)  # the first SAMPLE
    awaiting_count: int = 0

    def summary(self, width: int) -> str:
        status = "ok" if self.ok else f"DIFFERS ({self.mismatches} differences)"
        review = f", {self.awaiting_count} awaiting review" if self.awaiting else ""
        return (
            f"  {self.table:<{width}}  {self.unified_rows:>7} unified rows  "
            f"{self.erp_rows:>7} erp rows  {self.salesforce_rows:>7} salesforce rows  "
            f"{status}{review}"
        )

    def details(self) -> list[str]:
        lines = [f"      {d.line()}" for d in self.differences]
        if self.mismatches > len(self.differences):
            more = self.mismatches - len(self.differences)
            lines.append(f"      ... and {more} more differences")
        lines += [f"      awaiting review: {note}" for note in self.awaiting]
        if self.awaiting_count > len(self.awaiting):
            more = self.awaiting_count - len(self.awaiting)
            lines.append(f"      ... and {more} more awaiting review")
        return lines


@dataclass(frozen=True, slots=True)
class Link:
    """Where a unified row lives in each system."""

    sf_id: str | None
    erp_key: str | None


@dataclass
class Snapshot:
    """What verification reads of one entity, each system's records by key."""

    unified: list[dict[str, Any]]  # unified_id, sf_id, erp_key, deleted_at, fields
    erp: dict[str, dict[str, Any]]  # erp key text -> column -> value
    salesforce: dict[str, dict[str, Any]]  # Id -> field -> value
    review: set[tuple[str, str]] = field(default_factory=set)  # (system, key)
    # the open reviews of every entity, for references to held records
    reviews: dict[str, set[tuple[str, str]]] = field(default_factory=dict)


# -- comparing values ----------------------------------------------------------


def agree(value: Any, unified: str | None) -> bool:
    """Tell whether ``value`` (in the unified domain) means the unified text."""
    if value is None or unified is None:
        return value is None and unified is None
    if _text(value) == unified:
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float, Decimal)):
        return _decimal(value) == _decimal(unified)
    if isinstance(value, (dict, list)):
        return bool(_exact(value) == _json(unified))
    if isinstance(value, dt.datetime):
        return _same_instant(value, _instant(unified))
    if isinstance(value, str):
        if value[:1] in "{[" and unified[:1] in "{[":
            return bool(_json(value) == _json(unified))
        return _same_instant(_instant(value), _instant(unified))
    return False


def _decimal(value: Any) -> Decimal | None:
    try:
        number = Decimal(repr(value) if isinstance(value, float) else str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _exact(value: Any) -> Any:
    """``value`` with its floats as decimals, so JSON numbers compare exactly."""
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, dict):
        return {k: _exact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_exact(v) for v in value]
    return value


def _json(text: str) -> Any:
    try:
        return json.loads(text, parse_float=Decimal)
    except ValueError:
        return _NotJson(text)


@dataclass(frozen=True, slots=True)
class _NotJson:
    text: str


def _instant(value: Any) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        return value
    try:
        parsed = dt.datetime.fromisoformat(str(value).strip())
    except ValueError:
        return None
    return parsed


def _same_instant(a: dt.datetime | None, b: dt.datetime | None) -> bool:
    # naive times name no instant: only their text could have matched
    if a is None or b is None or a.tzinfo is None or b.tzinfo is None:
        return False
    return a == b


def _same_id(a: Any, b: str | None) -> bool:
    """Salesforce Ids: an 18-character Id equals its 15-character form."""
    if a is None or b is None:
        return a is None and b is None
    a = str(a)
    return a == b or (min(len(a), len(b)) == 15 and a[:15] == b[:15])


def _show(value: Any) -> str:
    return "null" if value is None else repr(_text(value))


# -- comparing one entity (pure) -------------------------------------------------


@dataclass
class _Findings:
    entity: str
    differences: list[Difference] = field(default_factory=list)
    awaiting: list[str] = field(default_factory=list)

    def differ(self, uid: str | None, name: str, erp: str, sf: str, uni: str) -> None:
        self.differences.append(Difference(self.entity, uid, name, erp, sf, uni))


def compare_entity(
    entity: EntitySettings,
    snapshot: Snapshot,
    references: Mapping[str, Mapping[str, Link]],
    *,
    sample: int = SAMPLE,
) -> EntityReport:
    """Compare one entity's unified rows with both systems' records.

    ``references`` maps each entity a reference field names to its rows'
    links by ``unified_id``.
    """
    transforms = {f.name: entity.transform(f.name) for f in entity.fields}
    found = _Findings(entity.name)
    for row in snapshot.unified:
        if row["deleted_at"] is None:
            _compare_row(entity, transforms, snapshot, references, row, found)
    _unlinked(entity, snapshot, found)
    report = EntityReport(
        f"{UNIFIED_SCHEMA}.{entity.name}",
        entity=entity.name,
        unified_rows=sum(row["deleted_at"] is None for row in snapshot.unified),
        erp_rows=len(snapshot.erp),
        salesforce_rows=len(snapshot.salesforce),
    )
    report.mismatches = len(found.differences)
    report.differences = found.differences[:sample]
    report.awaiting_count = len(found.awaiting)
    report.awaiting = found.awaiting[:sample]
    return report


def _compare_row(
    entity: EntitySettings,
    transforms: Mapping[str, Transform | None],
    snapshot: Snapshot,
    references: Mapping[str, Mapping[str, Link]],
    row: Mapping[str, Any],
    found: _Findings,
) -> None:
    uid, sf_id, erp_key = row["unified_id"], row["sf_id"], row["erp_key"]
    waiting = _held_reference(entity, row, snapshot.reviews)
    if waiting is not None:
        # its write waits until an operator settles the referenced record
        found.awaiting.append(f"{entity.name} {uid}: refers to {waiting}")
        return
    erp = snapshot.erp.get(erp_key) if erp_key is not None else None
    sf = snapshot.salesforce.get(sf_id) if sf_id is not None else None
    erp_problem = _link_problem("erp", entity, erp_key, erp)
    sf_problem = _link_problem("salesforce", entity, sf_id, sf)
    if erp_problem or sf_problem:
        review = snapshot.review
        held = ("erp", erp_key) in review or ("salesforce", sf_id) in review
        if held and _MISSING in (erp_problem, sf_problem):
            found.awaiting.append(f"{entity.name} {uid}: linked on one side only")
        else:
            found.differ(
                uid,
                "record",
                erp_problem or _key(erp_key),
                sf_problem or _key(sf_id),
                "linked",
            )
    _compare_links(entity, uid, erp_key, sf_id, erp, sf, found)
    for mapped in entity.fields:
        value = row[mapped.name]
        if mapped.reference is not None:
            _compare_reference(mapped, value, erp, sf, references, uid, found)
            continue
        erp_ok = erp is None or agree(erp.get(mapped.erp), value)
        sf_shown, sf_ok = _salesforce_side(transforms[mapped.name], mapped, sf, value)
        if not (erp_ok and sf_ok):
            erp_shown = "-" if erp is None else _show(erp.get(mapped.erp))
            found.differ(uid, mapped.name, erp_shown, sf_shown, _show(value))


def _held_reference(
    entity: EntitySettings,
    row: Mapping[str, Any],
    reviews: Mapping[str, set[tuple[str, str]]],
) -> str | None:
    """The held record a reference field of ``row`` points to, if any."""
    for mapped in entity.fields:
        value = row.get(mapped.name)
        if mapped.reference is None or not value:
            continue
        prefix, _, key = str(value).partition(":")
        system = {"erp": "erp", "sf": "salesforce"}.get(prefix)
        if system is not None and (system, key) in reviews.get(mapped.reference, ()):
            return f"{mapped.reference} {system} record {key!r}, awaiting review"
    return None


def _compare_links(
    entity: EntitySettings,
    uid: str,
    erp_key: str | None,
    sf_id: str | None,
    erp: Mapping[str, Any] | None,
    sf: Mapping[str, Any] | None,
    found: _Findings,
) -> None:
    """A link a record carries (external id, Salesforce Id column) names its partner.

    An empty link is no difference: records paired by match rules may carry none.
    """
    if sf is not None and erp_key is not None:
        named = sf.get(entity.external_id)
        if named not in (None, "") and _text(named) != erp_key:
            shown = _show(named)
            found.differ(uid, entity.external_id, _key(erp_key), shown, "linked")
    column = entity.erp_sf_id_column
    if column and erp is not None and sf_id is not None:
        named = erp.get(column)
        if named not in (None, "") and not _same_id(named, sf_id):
            found.differ(uid, column, _show(named), _key(sf_id), "linked")


def _link_problem(
    system: str,
    entity: EntitySettings,
    key: str | None,
    record: Mapping[str, Any] | None,
) -> str | None:
    """What is wrong with one side of a row's link, as printed; None if nothing."""
    if key is not None:
        return None if record is not None else f"<gone {key!r}>"
    return _MISSING if system in entity.targets else None


def _key(key: str | None) -> str:
    return "-" if key is None else repr(key)


def _salesforce_side(
    transform: Transform | None,
    mapped: FieldMap,
    record: Mapping[str, Any] | None,
    unified: str | None,
) -> tuple[str, bool]:
    """The Salesforce value as printed, and whether it agrees with ``unified``."""
    if record is None:
        return "-", True
    raw = record.get(mapped.salesforce)
    if transform is None or raw is None:
        return _show(raw), agree(raw, unified)
    try:
        value = transform.to_unified(raw)
    except TransformError as exc:
        return f"{_show(raw)} (unmappable: {exc})", False
    if _text(value) == _text(raw):
        return _show(raw), agree(value, unified)
    return f"{_show(raw)} (as {_show(value)})", agree(value, unified)


def _compare_reference(
    mapped: FieldMap,
    value: str | None,
    erp: Mapping[str, Any] | None,
    sf: Mapping[str, Any] | None,
    references: Mapping[str, Mapping[str, Link]],
    uid: str,
    found: _Findings,
) -> None:
    assert mapped.reference is not None
    target = references.get(mapped.reference, {}).get(value) if value else None
    erp_value = erp.get(mapped.erp) if erp is not None else None
    sf_value = sf.get(mapped.salesforce) if sf is not None else None
    if value is not None and target is None:
        erp_ok = sf_ok = False
        shown = f"{value!r} (no {mapped.reference} row)"
    else:
        expected = target or Link(None, None)
        erp_ok = erp is None or _text(erp_value) == expected.erp_key
        sf_ok = sf is None or _same_id(sf_value, expected.sf_id)
        shown = (
            "null"
            if value is None
            else f"{value!r} (erp {expected.erp_key!r}, salesforce {expected.sf_id!r})"
        )
    if not (erp_ok and sf_ok):
        found.differ(
            uid,
            mapped.name,
            "-" if erp is None else _show(erp_value),
            "-" if sf is None else _show(sf_value),
            shown,
        )


def _unlinked(entity: EntitySettings, snapshot: Snapshot, found: _Findings) -> None:
    """Records a source holds that no unified row links, deleted rows included."""
    linked = {
        "erp": {r["erp_key"] for r in snapshot.unified},
        "salesforce": {r["sf_id"] for r in snapshot.unified},
    }
    held = {"erp": snapshot.erp, "salesforce": snapshot.salesforce}
    for system in ("erp", "salesforce"):
        for key in sorted(set(held[system]) - linked[system]):
            if (system, key) in snapshot.review:
                found.awaiting.append(f"{entity.name} {system} record {key!r}")
            elif system in entity.sources:
                if system == "erp":
                    found.differ(None, "record", repr(key), _MISSING, _NO_ROW)
                else:
                    found.differ(None, "record", _MISSING, repr(key), _NO_ROW)


# -- reading the three stores ------------------------------------------------------


async def verify_entities(settings: Settings) -> list[EntityReport]:
    """Compare every mapped entity across Salesforce, the ERP and ``unified.*``."""
    if not settings.entities:
        return []
    if settings.erp is None or settings.salesforce is None:
        raise ConfigError(
            "[[entities]] need both an [erp] and a [salesforce] section to verify; "
            "add the missing one"
        )
    cfg = settings.salesforce
    auth = build_authenticator(cfg)
    erp = await asyncpg.connect(
        settings.erp.database.resolve(), server_settings=SESSION_SETTINGS
    )
    try:
        replica = await asyncpg.connect(
            settings.replica.resolve(), server_settings=SESSION_SETTINGS
        )
        try:
            unified = {
                e.name: await _unified_rows(replica, e) for e in settings.entities
            }
            async with aiohttp.ClientSession() as http:
                await auth.login()
                rest = RestClient(auth, http, api_version=cfg.api_version)
                snapshots = {
                    e.name: Snapshot(
                        unified[e.name],
                        await _erp_rows(erp, replica, settings.erp.stream, e),
                        await _salesforce_records(rest, e),
                        await _open_reviews(replica, e),
                    )
                    for e in settings.entities
                }
        finally:
            await replica.close()
    finally:
        await erp.close()
    for snapshot in snapshots.values():
        snapshot.reviews = {name: s.review for name, s in snapshots.items()}
    links = {
        name: {r["unified_id"]: Link(r["sf_id"], r["erp_key"]) for r in rows}
        for name, rows in unified.items()
    }
    reports = [compare_entity(e, snapshots[e.name], links) for e in settings.entities]
    for report in reports:
        logger.debug(
            "entity verified",
            extra={"entity": report.entity, "differences": report.mismatches},
        )
    return reports


async def _unified_rows(
    replica: asyncpg.Connection, entity: EntitySettings
) -> list[dict[str, Any]]:
    table = f"{UNIFIED_SCHEMA}.{quote_ident(entity.name)}"
    if await replica.fetchval("SELECT to_regclass($1)", table) is None:
        return []  # the sync never ran: every record is unlinked
    columns = "".join(f", {quote_ident(f.name)}" for f in entity.fields)
    rows = await replica.fetch(
        f"SELECT unified_id, sf_id, erp_key, deleted_at{columns} FROM {table} "
        "ORDER BY unified_id"
    )
    return [dict(r) for r in rows]


async def _erp_rows(
    erp: asyncpg.Connection,
    replica: asyncpg.Connection,
    stream: str,
    entity: EntitySettings,
) -> dict[str, dict[str, Any]]:
    """The ERP table's rows as the engine reads its mirror: key text -> JSON row."""
    key = await _erp_key(erp, replica, stream, entity.erp)
    key_expr = " || '|' || ".join(f"t.{quote_ident(c)}::text" for c in key)
    schema, _, name = entity.erp.partition(".")
    rows = await erp.fetch(
        f"SELECT {key_expr} AS k, to_jsonb(t)::text AS j "
        f"FROM {quote_ident(schema)}.{quote_ident(name)} t"
    )
    return {r["k"]: json.loads(r["j"], parse_float=Decimal) for r in rows}


async def _erp_key(
    erp: asyncpg.Connection, replica: asyncpg.Connection, stream: str, table: str
) -> list[str]:
    """The key the mirror uses (as the engine does), else the ERP's primary key."""
    registered = None
    if await replica.fetchval("SELECT to_regclass('replicator.mirror_tables')"):
        registered = await replica.fetchval(
            "SELECT key_columns::text FROM replicator.mirror_tables "
            "WHERE stream = $1 AND source_table = $2",
            stream,
            table,
        )
    if registered:
        return list(json.loads(registered))
    columns = await erp.fetch(
        "SELECT a.attname FROM pg_index i "
        "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(n, pos) "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n "
        "WHERE i.indrelid = $1::regclass AND i.indisprimary ORDER BY k.pos",
        table,
    )
    if not columns:
        raise ConfigError(
            f"ERP table {table!r} has no primary key, and its mirror is not "
            "registered; run the daemon once so the mirror records its key"
        )
    return [c["attname"] for c in columns]


async def _salesforce_records(
    rest: RestClient, entity: EntitySettings
) -> dict[str, dict[str, Any]]:
    names = _unique(["Id", entity.external_id, *(f.salesforce for f in entity.fields)])
    soql = f"SELECT {', '.join(names)} FROM {entity.salesforce}"
    return {record["Id"]: record async for record in rest.query(soql)}


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


async def _open_reviews(
    replica: asyncpg.Connection, entity: EntitySettings
) -> set[tuple[str, str]]:
    """The (system, key) of records an open duplicate review holds back.

    ``unified.match_review.held`` names them as ``erp:KEY`` or
    ``salesforce:ID`` (``replicator.linking``).
    """
    if await replica.fetchval("SELECT to_regclass($1)", REVIEW_TABLE) is None:
        return set()
    rows = await replica.fetch(
        f"SELECT DISTINCT unnest(held) AS record FROM {REVIEW_TABLE} "
        "WHERE entity = $1 AND status = 'open'",
        entity.name,
    )
    held = (str(r["record"]).partition(":") for r in rows)
    return {(system, key) for system, _, key in held}
