"""Unified entities: merge the two mirrors field by field, log conflicts, fill the outbox.

Called by the appliers inside their replica transaction, once a mapped mirror
row has changed: the mirror's row before and after the change tell which
fields *this* source changed (so a stale value a source merely still holds is
never mistaken for an edit). The changed fields go through the transforms
into the unified domain (the ERP's representation), echoes of our own
write-backs are set aside (``conflict.echo``), the rest is resolved
(``conflict.rules``) against the unified row, and every value the other
system must receive becomes an outbox row, all in the same transaction as
the mirror and the checkpoint. See ``docs/two-way-sync.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from replicator.config import Settings
from replicator.conflict import (
    Change,
    Conflict,
    EntityRule,
    FieldRule,
    FieldState,
    PendingWrite,
    Resolution,
    UnifiedState,
    Version,
    delete_effect,
    resolve,
    split_echoes,
    values_equal,
    version_from_json,
    version_to_json,
)
from replicator.mapping.config import EntitySettings, FieldMap
from replicator.mapping.transforms import Transform, TransformError
from replicator.mapping.validation import Rule, compile_rule, validate
from replicator.sinks.runner import new_key
from replicator.sinks.worker import OUTBOX_CHANNEL
from replicator.sources.salesforce.schema import snake
from replicator.store.mirror import MirrorTable, mirror_name, quote_ident

logger = logging.getLogger(__name__)

UNIFIED_SCHEMA = "unified"
# One outbox row: entity, target, target_key, operation, fields, cause (JSON).
OutboxEntry = tuple[str, str, str, str, str, str]
_DELETED = "__deleted__"
_ECHO_HORIZON = dt.timedelta(hours=6)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    raise TypeError(type(value).__name__)


@dataclass(slots=True)
class _Entity:
    settings: EntitySettings
    rule: EntityRule
    transforms: Mapping[str, Transform | None]
    erp_mirror: str  # mirror table name in schema erp
    erp_key: tuple[str, ...]
    validators: tuple[Rule, ...] = ()
    json_fields: frozenset[str] | None = None  # None: not read from the catalog yet
    erp_types: dict[str, str] = dataclasses.field(default_factory=dict)  # by field

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def table(self) -> str:
        return f"{UNIFIED_SCHEMA}.{quote_ident(self.settings.name)}"

    def column(self, source: str, field: FieldMap) -> str:
        return field.erp if source == "erp" else snake(field.salesforce)


# find_row's answer for a record whose link names a record linked elsewhere
DUPLICATE: dict[str, Any] = {"unified_id": None}


def key_column(source: str) -> str:
    """The unified table's column holding a record's key in ``source``."""
    return "erp_key" if source == "erp" else "sf_id"


def other(source: str) -> str:
    return "salesforce" if source == "erp" else "erp"


def first_id(source: str, key: str) -> str:
    """The unified_id of a record first seen in ``source``."""
    return f"{'erp' if source == 'erp' else 'sf'}:{key}"


class SyncEngine:
    """Resolution and outbox for every mapped entity, on the applier's connection."""

    def __init__(self, settings: Settings, *, client_name: str = "replicator") -> None:
        self.settings = settings
        self.client_name = client_name
        self.entities: dict[str, _Entity] = {}
        self.by_erp_mirror: dict[str, _Entity] = {}
        self.by_sf_object: dict[str, _Entity] = {}
        self.linked: set[str] = set()
        self._refs: dict[tuple[str, str, str], str] = {}
        self._ranks: dict[str, int] = {}
        self._outbox_ids: dict[PendingWrite, int] = {}
        sync = getattr(settings, "sync", None)
        self.tie_window = dt.timedelta(
            seconds=float(getattr(sync, "tie_window_seconds", 1))
        )
        self.precedence = tuple(getattr(sync, "precedence", ("erp", "salesforce")))

    async def prepare(
        self, conn: asyncpg.Connection, erp_keys: Mapping[str, tuple[str, ...]]
    ) -> None:
        """Create the unified tables; ``erp_keys`` gives each mapped ERP table's key."""
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {UNIFIED_SCHEMA}")
        for entity in self.settings.entities:
            schema, _, table = entity.erp.rpartition(".")
            transforms = {f.name: entity.transform(f.name) for f in entity.fields}
            state = _Entity(
                entity,
                self._rule(entity, frozenset()),
                transforms,
                mirror_name(schema or "public", table),
                erp_keys.get(entity.erp, ()),
                tuple(compile_rule(v.field, v.rule) for v in entity.validate_),
            )
            self.entities[entity.name] = state
            self.by_erp_mirror[state.erp_mirror] = state
            self.by_sf_object[entity.salesforce] = state
            columns = ", ".join(f"{quote_ident(f.name)} text" for f in entity.fields)
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {state.table} (unified_id text PRIMARY KEY, "
                f"sf_id varchar(18) UNIQUE, erp_key text UNIQUE, {columns}, "
                "versions jsonb NOT NULL DEFAULT '{}', deleted_at timestamptz, "
                "deleted_by text, updated_at timestamptz NOT NULL DEFAULT now())"
            )

    def _rule(self, entity: EntitySettings, json_fields: frozenset[str]) -> EntityRule:
        fields = {
            f.name: FieldRule(
                f.name,
                owner=entity.owner_of(f),
                enforce=f.enforce,
                json=f.name in json_fields,
            )
            for f in entity.fields
        }
        return EntityRule(
            entity.name,
            fields,
            entity.owner,
            entity.delete_policy,
            sources=tuple(sorted(entity.sources)),
            precedence=self.precedence,
            tie_window=self.tie_window,
        )

    async def ensure_types(self, conn: asyncpg.Connection, entity: _Entity) -> None:
        """Learn which fields are JSON (ERP json/jsonb columns): they compare semantically."""
        if entity.json_fields is not None:
            return
        erp = self.settings.erp
        stream = erp.stream if erp is not None else "erp"
        columns = await conn.fetchval(
            "SELECT columns::text FROM replicator.mirror_tables "
            "WHERE stream = $1 AND source_table = $2",
            stream,
            entity.settings.erp,
        )
        if columns is None:
            return  # not mirrored yet: ask again next time
        types = {name: kind for name, kind in orjson.loads(columns)}
        json_fields = frozenset(
            f.name
            for f in entity.settings.fields
            if str(types.get(f.erp, "")).lower() in ("json", "jsonb")
        )
        entity.json_fields = json_fields
        entity.erp_types = {
            f.name: str(types.get(f.erp, "")).lower() for f in entity.settings.fields
        }
        entity.rule = self._rule(entity.settings, json_fields)

    # -- what the appliers call ---------------------------------------------------

    def watches(self, source: str, name: str) -> bool:
        return name in (self.by_erp_mirror if source == "erp" else self.by_sf_object)

    def order_key(self, source: str, name: str) -> int:
        """Where a table's changes go in a batch: mapped ones last, parents first.

        Both appliers resolve entities in this one order (and rows by
        unified_id), so their transactions lock unified rows in the same
        order and cannot deadlock each other.
        """
        entity = (self.by_erp_mirror if source == "erp" else self.by_sf_object).get(
            name
        )
        if entity is None:
            return -1
        if not self._ranks:
            self._ranks = _parents_first(self.entities)
        return self._ranks.get(entity.name, 0)

    async def snapshot(
        self,
        conn: asyncpg.Connection,
        table: MirrorTable,
        keys: Iterable[tuple[Any, ...]],
    ) -> dict[str, dict[str, Any]]:
        """The mirror rows of ``keys`` as column -> value, keyed by the key text."""
        wanted = ["|".join(str(k) for k in key) for key in keys]
        if not wanted:
            return {}
        return await mirror_rows(conn, table.qualified, table.key, wanted)

    async def is_linked(self, conn: asyncpg.Connection, entity: _Entity) -> bool:
        """Whether the entity's existing records were linked (the initial pass ran)."""
        if entity.name in self.linked:
            return True
        if await conn.fetchval(
            "SELECT 1 FROM replicator.sync_entities WHERE entity = $1", entity.name
        ):
            self.linked.add(entity.name)
            return True
        return False

    async def on_rows(
        self,
        conn: asyncpg.Connection,
        source: str,
        name: str,
        before: Mapping[str, dict[str, Any]],
        after: Mapping[str, dict[str, Any]],
        times: Mapping[str, dt.datetime],
        position: str,
        *,
        own_inserts: Iterable[str] = (),
        ours: Iterable[str] | None = None,
    ) -> None:
        """Resolve every key whose mapped fields changed between ``before`` and ``after``.

        ``own_inserts`` are keys of records our sink created: until the sink
        stores their link they are not new records of that source. ``ours``,
        when known, are the keys whose change came from our own writes (by
        replication origin or ``changeOrigin``): only those can be echoes, so
        a user who sets the value we are about to write is not mistaken for
        our echo.

        Until the initial pass has linked the entity's existing records
        (``replicator.linking``), changes only reach the mirror: that pass
        reads the mirrors as they are then.
        """
        entity = (self.by_erp_mirror if source == "erp" else self.by_sf_object)[name]
        if not await self.is_linked(conn, entity):
            return
        await self.ensure_types(conn, entity)
        # Both appliers lock the rows they resolve in one order: no deadlock
        # between a batch of the ERP and one of Salesforce.
        await conn.execute(
            f"SELECT unified_id FROM {entity.table} "
            f"WHERE {key_column(source)} = ANY($1::text[]) ORDER BY unified_id "
            "FOR UPDATE",
            sorted(set(before) | set(after)),
        )
        own = set(own_inserts)
        from_us = None if ours is None else set(ours)
        for key in sorted(set(before) | set(after)):
            await self._one(
                conn,
                entity,
                source,
                key,
                before.get(key),
                after.get(key),
                times.get(key) or dt.datetime.now(dt.UTC),
                position,
                own=key in own,
                echo_possible=from_us is None or key in from_us,
                from_us=from_us is not None and key in from_us,
            )

    # -- one key ------------------------------------------------------------------

    async def _one(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        source: str,
        key: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
        commit_time: dt.datetime,
        position: str,
        *,
        own: bool = False,
        echo_possible: bool = True,
        from_us: bool = False,
    ) -> None:
        if source not in entity.settings.sources:
            return  # a one-way entity: this side's changes stay in its mirror
        deleted = after is None or (
            source == "salesforce" and bool(after.get("is_deleted"))
        )
        if not deleted and not self._touched(entity, source, before, after or {}):
            return
        version = Version(commit_time, source, position)
        row = await self.find_row(conn, entity, source, key, after)
        if row is DUPLICATE:
            return
        if row is None:
            if deleted or after is None or own:
                # a record we never linked is gone: nothing to tell; or our
                # own create came back before its link was stored
                return
            if await self.held(conn, entity, source, key):
                return  # waits for an operator's choice (replicator matches)
            fields = await self.values(conn, entity, source, key, None, after, position)
            if fields is None:
                return  # quarantined whole: nothing is created from it
            from replicator import linking

            if await linking.match_live(
                self, conn, entity, source, key, fields, version
            ):
                return
            row = await self.new_row(conn, entity, source, key)
            changed: dict[str, Any] = fields
        elif deleted or after is None:
            changed = {}
        else:
            found = await self.values(
                conn, entity, source, key, before, after, position
            )
            changed = found or {}
            if before is None and from_us:
                # the record our create made: a field we left empty was set
                # by nobody
                changed = {k: v for k, v in changed.items() if v is not None}
        echoes: list[PendingWrite] = []
        stale: dict[str, Any] = {}
        if changed and echo_possible:
            pending = await self._pending(conn, entity, source, row)
            incoming = changed
            json_fields = set(entity.json_fields or ())
            changed, echoes = split_echoes(incoming, pending, json_fields=json_fields)
            if echoes:
                await self._mark_echoed(conn, echoes)
            if from_us and changed:
                # A write of ours repeated after a crash comes back once more,
                # its first echo already settled: a value the row holds tells
                # nothing new, and an older one is a write that landed late.
                changed = {
                    k: v
                    for k, v in changed.items()
                    if not values_equal(v, row.get(k), json=k in json_fields)
                }
                settled = await self._pending(conn, entity, source, row, echoed=True)
                changed, repeats = split_echoes(
                    changed, settled, json_fields=json_fields
                )
                echoes += repeats
            for name in sorted({echo.field for echo in echoes}):
                current = values_equal(
                    incoming.get(name), row.get(name), json=name in json_fields
                )
                if not current and not any(
                    w.field == name and w not in echoes for w in pending
                ):
                    # Our write landed after a newer decision (a change from
                    # the other side won meanwhile) and no later write will
                    # follow it: the system now holds a superseded value.
                    stale[name] = row.get(name)
        if stale and source in entity.settings.targets and not row.get("deleted_at"):
            logger.info(
                "our write landed after a newer decision; the unified value goes back",
                extra={
                    "entity": entity.name,
                    "key": key,
                    "fields": sorted(stale),
                    "target": source,
                    "position": position,
                },
            )
            await self.put_outbox(conn, entity, source, row, stale, version)
        if not changed and not deleted:
            return
        change = Change(source, "delete" if deleted else "upsert", changed, version)
        resolution = await self.absorb(conn, entity, row, change)
        await self._correct_losers(conn, entity, source, row, resolution, version)
        await self._enqueue(
            conn,
            entity,
            source,
            row,
            resolution.accepted,
            resolution.enforce,
            # the rule decides: under propagate, a delete by a system that
            # does not own existence only marks the record
            deleted and delete_effect(version, entity.rule) == "propagate",
            change,
        )

    async def _correct_losers(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        source: str,
        row: Mapping[str, Any],
        resolution: Resolution,
        version: Version,
    ) -> None:
        """Give the unified value back to a system whose own change lost (LWW).

        The newer value usually is on its way there already (a write still
        queued); when it is not (it reached the unified row before this older
        change arrived, or equalled it), the system would keep the value that
        lost.
        """
        lost = {
            c.field
            for c in resolution.conflicts
            if c.rule == "lww" and c.discarded_version == version
        }
        if not lost or source not in entity.settings.targets or row.get("deleted_at"):
            return
        pending = await self._pending(conn, entity, source, row)
        json_fields = entity.json_fields or frozenset()
        fix = {
            name: row.get(name)
            for name in sorted(lost)
            if not any(
                w.field == name
                and values_equal(w.value, row.get(name), json=name in json_fields)
                for w in pending
            )
        }
        if fix:
            logger.info(
                "a change lost to a value its system lacks; the unified value goes back",
                extra={
                    "entity": entity.name,
                    "unified_id": row["unified_id"],
                    "fields": sorted(fix),
                    "target": source,
                    "position": version.position,
                },
            )
            await self.put_outbox(conn, entity, source, row, fix, version)

    def _touched(
        self,
        entity: _Entity,
        source: str,
        before: dict[str, Any] | None,
        after: dict[str, Any],
    ) -> bool:
        if before is None:
            return True
        return any(
            _text(before.get(c)) != _text(after.get(c))
            for c in (entity.column(source, f) for f in entity.settings.fields)
        )

    async def values(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        source: str,
        key: str,
        before: dict[str, Any] | None,
        after: dict[str, Any],
        position: str | None,
        *,
        quarantine: bool = True,
    ) -> dict[str, Any] | None:
        """The unified values of the mapped fields ``after`` changed (all without ``before``).

        A value a transform cannot map, or that fails a validation rule, is
        parked in the dead-letter table with the reason and left out; the
        other fields go on. A record seen whole (no ``before``) that misses
        a required field is quarantined whole: None.
        """
        out: dict[str, Any] = {}
        problems: list[tuple[str, Any, str]] = []
        for field in entity.settings.fields:
            column = entity.column(source, field)
            value = after.get(column)
            if before is not None and _text(before.get(column)) == _text(value):
                continue
            if field.reference is not None:
                value = await self.reference_id(conn, field.reference, source, value)
            else:
                transform = entity.transforms.get(field.name)
                try:
                    if transform is not None and value is not None:
                        if source == "salesforce":
                            value = transform.to_unified(value)
                        elif "salesforce" in entity.settings.targets:
                            # a value Salesforce cannot take stops here, not
                            # at the write
                            transform.from_unified(_text(value))
                except TransformError as exc:
                    problems.append((field.name, value, f"transform: {exc}"))
                    continue
            out[field.name] = _unified_text(value, entity.erp_types.get(field.name, ""))
        complete = before is None
        missing_required = False
        for violation in validate(out, entity.validators, complete=complete):
            problems.append(
                (
                    violation.field,
                    violation.value,
                    f"rule {violation.rule!r}: {violation.message}",
                )
            )
            out.pop(violation.field, None)
            missing_required |= complete and violation.rule.startswith("required")
        if quarantine:
            for name, value, reason in problems:
                await self._quarantine(
                    conn, entity, source, key, position, name, value, reason
                )
        return None if missing_required else out

    async def _quarantine(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        source: str,
        key: str,
        position: str | None,
        field: str,
        value: Any,
        reason: str,
    ) -> None:
        text = f"{entity.name} field {field!r} from {source} {key}: {reason}"
        logger.warning(
            "change quarantined, the rest goes on: %s",
            text,
            extra={"entity": entity.name, "key": key, "field": field, "source": source},
        )
        await conn.execute(
            "INSERT INTO replicator.dead_letters (stream, entity, source_key, position, "
            "reason, payload) VALUES ($1, $2, $3, $4, $5, $6::text::jsonb)",
            f"sync:{source}",
            entity.name,
            key,
            position,
            text,
            orjson.dumps(
                {"field": field, "value": value, "reason": reason, "source": source},
                default=_json_default,
            ).decode(),
        )

    async def reference_id(
        self, conn: asyncpg.Connection, entity_name: str, source: str, value: Any
    ) -> str | None:
        """The unified_id of the ``entity_name`` record whose ``source`` key is ``value``.

        A record not linked yet gets the id it will have when first seen there.
        """
        if value is None or value == "":
            return None
        key = _text(value) or ""
        cache_key = (entity_name, source, key)
        found = self._refs.get(cache_key)
        if found is not None:
            return found
        found = await conn.fetchval(
            f"SELECT coalesce((SELECT unified_id FROM {UNIFIED_SCHEMA}."
            f"{quote_ident(entity_name)} WHERE {key_column(source)} = $1), "
            "(SELECT unified_id FROM replicator.created_links WHERE entity = $2 "
            "AND target = $3 AND key = $1))",
            key,
            entity_name,
            source,
        )
        if found is None:
            return first_id(source, key)
        self._refs[cache_key] = found
        return str(found)

    async def held(
        self, conn: asyncpg.Connection, entity: _Entity, source: str, key: str
    ) -> bool:
        """Whether the record waits in an open duplicate review."""
        return bool(
            await conn.fetchval(
                "SELECT 1 FROM unified.match_review WHERE entity = $1 "
                "AND status = 'open' AND $2 = ANY(held)",
                entity.name,
                f"{source}:{key}",
            )
        )

    async def find_row(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        source: str,
        key: str,
        after: dict[str, Any] | None,
    ) -> dict[str, Any] | None:
        """The unified row linked to the record, by key or by the link it carries."""
        row = await conn.fetchrow(
            f"SELECT * FROM {entity.table} WHERE {key_column(source)} = $1 FOR UPDATE",
            key,
        )
        if row is not None:
            return dict(row)
        created = await conn.fetchval(
            "SELECT unified_id FROM replicator.created_links WHERE entity = $1 "
            "AND target = $2 AND key = $3",
            entity.name,
            source,
            key,
        )
        if created is not None:  # our sink created it; its link is not folded yet
            row = await conn.fetchrow(
                f"SELECT * FROM {entity.table} WHERE unified_id = $1 FOR UPDATE",
                created,
            )
            if row is not None and row[key_column(source)] in (None, key):
                if row[key_column(source)] is None:
                    await self.set_key(conn, entity, dict(row), source, key)
                return {**dict(row), key_column(source): key}
        if after is None:
            return None
        # the record names its partner: the external id (Salesforce) or the
        # Salesforce Id column (ERP), written by us at its creation
        if source == "salesforce":
            link = after.get(snake(entity.settings.external_id))
        elif entity.settings.erp_sf_id_column:
            link = after.get(entity.settings.erp_sf_id_column)
        else:
            link = None
        if not link:
            return None
        column = key_column(other(source))
        row = await conn.fetchrow(
            f"SELECT * FROM {entity.table} WHERE {column} = $1 FOR UPDATE",
            str(link),
        )
        if row is None:
            return None
        linked = row[key_column(source)]
        if linked == key:
            return dict(row)  # linked meanwhile (the sink stored our create)
        if linked is not None:
            await self._quarantine(
                conn, entity, source, key, None, "link",
                link,
                f"it names {other(source)} record {link}, which is linked to "
                f"{source} record {linked}; merge the duplicates, then retry",
            )  # fmt: skip
            return DUPLICATE
        await self.set_key(conn, entity, dict(row), source, key)
        return {**dict(row), key_column(source): key}

    async def set_key(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        row: Mapping[str, Any],
        source: str,
        key: str,
    ) -> None:
        """Link ``row`` to the ``source`` record ``key``.

        Pending creates for it become updates when the sink resolves them
        (it reads the key here); the outbox rows are not touched, so this
        never waits for a worker holding them.
        """
        await conn.execute(
            f"UPDATE {entity.table} SET {key_column(source)} = $1 WHERE unified_id = $2",
            key,
            row["unified_id"],
        )

    async def new_row(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        source: str,
        key: str,
        other_key: str | None = None,
    ) -> dict[str, Any]:
        """Insert a unified row for a record first seen in ``source`` (and its partner)."""
        unified_id = first_id(source, key)
        keys = {key_column(source): key, key_column(other(source)): other_key}
        inserted = await conn.fetchval(
            f"INSERT INTO {entity.table} (unified_id, sf_id, erp_key) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING RETURNING unified_id",
            unified_id,
            keys["sf_id"],
            keys["erp_key"],
        )
        if inserted is None:  # linked meanwhile by another session: use that row
            row = await conn.fetchrow(
                f"SELECT * FROM {entity.table} WHERE {key_column(source)} = $1 "
                "FOR UPDATE",
                key,
            )
            if row is not None:
                return dict(row)
        return {"unified_id": unified_id, **keys, "versions": "{}", "_new": True}

    async def _pending(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        source: str,
        row: Mapping[str, Any],
        *,
        echoed: bool = False,
    ) -> list[PendingWrite]:
        """Our recent writes to ``source`` for this row whose echo has not come
        back (``echoed``: those whose echo has)."""
        rows = await conn.fetch(
            "SELECT o.id, o.cause, o.created_at, array(SELECT e.field FROM "
            "replicator.outbox_echoes e WHERE e.outbox_id = o.id) AS echoed "
            "FROM replicator.outbox o WHERE o.entity = $1 AND o.target = $2 "
            "AND o.cause->>'unified_id' = $3 AND o.status <> 'failed' "
            "AND o.created_at > now() - $4::interval ORDER BY o.id",
            entity.name,
            source,
            row["unified_id"],
            _ECHO_HORIZON,
        )
        pending = []
        if not echoed:
            self._outbox_ids = {}
        for r in rows:
            cause = orjson.loads(r["cause"])
            came_back = set(r["echoed"])
            for field, value in cause.get("unified", {}).items():
                if (field in came_back) == echoed:
                    write = PendingWrite(
                        source, row["unified_id"], field, value, r["created_at"]
                    )
                    pending.append(write)
                    self._outbox_ids[write] = r["id"]
        return pending

    async def _mark_echoed(
        self, conn: asyncpg.Connection, echoes: list[PendingWrite]
    ) -> None:
        for echo in echoes:
            outbox_id = self._outbox_ids.get(echo)
            if outbox_id is not None:
                await conn.execute(
                    "INSERT INTO replicator.outbox_echoes (outbox_id, field) "
                    "VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    outbox_id,
                    echo.field,
                )

    def fold(self, entity: _Entity, row: dict[str, Any], change: Change) -> Resolution:
        """Resolve ``change`` against ``row`` in memory; ``row`` takes the outcome.

        A change from a system that is no source of the entity (a one-way
        entity) decides nothing.
        """
        if change.source not in entity.settings.sources:
            return Resolution(_state_of(row), {}, (), {})
        resolution = resolve(_state_of(row), change, entity.rule)
        for name in entity.rule.fields:
            held = resolution.state.fields.get(name)
            row[name] = None if held is None else _text(held.value)
        row["versions"] = _versions_json(resolution.state)
        row["deleted_at"] = (
            resolution.state.deleted.commit_time if resolution.state.deleted else None
        )
        row["deleted_by"] = (
            resolution.state.deleted.source if resolution.state.deleted else None
        )
        return resolution

    async def absorb(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        row: dict[str, Any],
        change: Change,
    ) -> Resolution:
        """Resolve ``change`` against ``row``, store the outcome and log its conflicts."""
        resolution = self.fold(entity, row, change)
        if change.source in entity.settings.sources:
            await self._store(conn, entity, row, resolution.state)
            await self.log_conflicts(
                conn, entity, [(row["unified_id"], c) for c in resolution.conflicts]
            )
        return resolution

    async def log_conflicts(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        conflicts: Sequence[tuple[str, Conflict]],
    ) -> None:
        """Add the conflict log rows of ``conflicts`` (unified_id, decision)."""
        if not conflicts:
            return
        await conn.executemany(
            "INSERT INTO replicator.conflicts (entity, entity_key, field, kept_value, "
            "kept_source, kept_time, discarded_value, discarded_source, "
            "discarded_time, rule) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            [
                (
                    entity.name,
                    unified_id,
                    c.field,
                    _text(c.kept_value),
                    c.kept_version.source if c.kept_version else None,
                    c.kept_version.commit_time if c.kept_version else None,
                    _text(c.discarded_value),
                    c.discarded_version.source,
                    c.discarded_version.commit_time,
                    c.rule,
                )
                for unified_id, c in conflicts
            ],
        )

    async def insert_rows(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        rows: Sequence[Mapping[str, Any]],
    ) -> None:
        """Insert whole unified rows (keys, values, versions) in one pipelined call."""
        if not rows:
            return
        names = [f.name for f in entity.settings.fields]
        columns = ", ".join(
            ["unified_id", "sf_id", "erp_key", *map(quote_ident, names), "versions"]
        )
        marks = ", ".join(f"${i + 1}" for i in range(len(names) + 4))
        await conn.executemany(
            f"INSERT INTO {entity.table} ({columns}) VALUES ({marks})",
            [
                (
                    r["unified_id"],
                    r.get("sf_id"),
                    r.get("erp_key"),
                    *(r.get(n) for n in names),
                    r.get("versions") or "{}",
                )
                for r in rows
            ],
        )

    async def _store(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        row: Mapping[str, Any],
        state: UnifiedState,
    ) -> None:
        names = [f.name for f in entity.settings.fields]
        sets = ", ".join(f"{quote_ident(n)} = ${i + 2}" for i, n in enumerate(names))
        values = [
            _text(state.fields[n].value) if n in state.fields else None for n in names
        ]
        await conn.execute(
            f"UPDATE {entity.table} SET {sets}, versions = ${len(names) + 2}, "
            f"deleted_at = ${len(names) + 3}, deleted_by = ${len(names) + 4}, "
            "updated_at = now() WHERE unified_id = $1",
            row["unified_id"],
            *values,
            _versions_json(state),
            state.deleted.commit_time if state.deleted else None,
            state.deleted.source if state.deleted else None,
        )

    async def _enqueue(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        source: str,
        row: Mapping[str, Any],
        accepted: Mapping[str, Any],
        enforce: Mapping[str, Any],
        delete: bool,
        change: Change,
    ) -> None:
        writes: dict[str, dict[str, Any]] = {}
        for system in entity.settings.targets:
            if system != source and accepted:
                writes[system] = dict(accepted)
        if enforce:
            writes.setdefault(source, {}).update(enforce)
        for target, unified in writes.items():
            await self.put_outbox(conn, entity, target, row, unified, change.version)
        if delete:
            target = other(source)
            key = row[key_column(target)]
            if key and target in entity.settings.targets:
                entry = self._entry(
                    entity, target, key, "delete", {}, row, change.version, {}
                )
                await self.queue(conn, [entry])

    async def write_differences(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        row: Mapping[str, Any],
        currents: Mapping[str, Mapping[str, Any] | None],
        version: Version,
    ) -> None:
        """Queue to each target the unified values it does not hold yet."""
        await self.queue(conn, self.differences(entity, row, currents, version))

    def differences(
        self,
        entity: _Entity,
        row: Mapping[str, Any],
        currents: Mapping[str, Mapping[str, Any] | None],
        version: Version,
    ) -> list[OutboxEntry]:
        """The writes that give each target the unified values it lacks.

        ``currents`` gives, per system, the unified-domain values of its
        record (None: it has no record: a create). Used when records are
        linked, where the two sides may differ in any field.
        """
        if row.get("deleted_at"):
            return []
        out = []
        for target in sorted(entity.settings.targets):
            if target not in currents:
                continue
            current = currents[target]
            unified = {}
            for mapped in entity.settings.fields:
                value = row.get(mapped.name)
                if current is None:
                    if value is not None:
                        unified[mapped.name] = value
                elif not values_equal(
                    current.get(mapped.name),
                    value,
                    json=mapped.name in (entity.json_fields or ()),
                ):
                    unified[mapped.name] = value
            entry = self.upsert_entry(entity, target, row, unified, version)
            if unified and entry is not None:
                out.append(entry)
        return out

    async def put_outbox(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        target: str,
        row: Mapping[str, Any],
        unified: Mapping[str, Any],
        version: Version,
    ) -> None:
        """Queue an upsert of ``unified`` values to ``target``, in its names and domain."""
        entry = self.upsert_entry(entity, target, row, unified, version)
        if entry is not None:
            await self.queue(conn, [entry])

    def upsert_entry(
        self,
        entity: _Entity,
        target: str,
        row: Mapping[str, Any],
        unified: Mapping[str, Any],
        version: Version,
    ) -> OutboxEntry | None:
        fields = self._target_fields(entity, target, unified, row)
        if fields is None:
            return None
        key = row[key_column(target)] or new_key(row["unified_id"])
        return self._entry(entity, target, key, "upsert", fields, row, version, unified)

    def entry(
        self,
        entity: _Entity,
        target: str,
        key: str,
        fields: Mapping[str, Any],
        row: Mapping[str, Any],
        version: Version,
    ) -> OutboxEntry:
        """An upsert of target-domain ``fields`` that no echo needs to settle."""
        return self._entry(entity, target, key, "upsert", fields, row, version, {})

    def _entry(
        self,
        entity: _Entity,
        target: str,
        key: str,
        operation: str,
        fields: Mapping[str, Any],
        row: Mapping[str, Any],
        version: Version,
        unified: Mapping[str, Any],
    ) -> OutboxEntry:
        cause = {
            "unified_id": row["unified_id"],
            "source": version.source,
            "sf_id": row["sf_id"],
            "erp_key": row["erp_key"],
            "version": version_to_json(version),
            "unified": dict(unified),
        }
        return (
            entity.name,
            target,
            key,
            operation,
            orjson.dumps(fields, default=_json_default).decode(),
            orjson.dumps(cause, default=_json_default).decode(),
        )

    async def queue(
        self, conn: asyncpg.Connection, entries: Sequence[OutboxEntry]
    ) -> None:
        """Insert outbox rows; the notification, delivered at commit, wakes the worker."""
        if not entries:
            return
        await conn.executemany(
            "INSERT INTO replicator.outbox (entity, target, target_key, operation, "
            "fields, cause) VALUES ($1, $2, $3, $4, $5, $6)",
            entries,
        )
        await conn.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)

    def _target_fields(
        self,
        entity: _Entity,
        target: str,
        unified: Mapping[str, Any],
        row: Mapping[str, Any],
    ) -> dict[str, Any] | None:
        fields: dict[str, Any] = {}
        json_fields = entity.json_fields or frozenset()
        for name, value in unified.items():
            field = entity.settings.field(name)
            target_name = field.erp if target == "erp" else field.salesforce
            if field.reference is not None:
                fields[target_name] = (
                    None
                    if value is None
                    else {"$ref": field.reference, "unified_id": value}
                )
                continue
            if target == "erp":
                if name in json_fields and isinstance(value, str):
                    with contextlib.suppress(orjson.JSONDecodeError):
                        value = orjson.loads(value)
                fields[target_name] = value
                continue
            transform = entity.transforms.get(name)
            try:
                fields[target_name] = (
                    transform.from_unified(value)
                    if transform is not None and value is not None
                    else value
                )
            except TransformError as exc:
                logger.warning(
                    "value cannot be written to salesforce: %s",
                    exc,
                    extra={
                        "entity": entity.name,
                        "key": row["unified_id"],
                        "field": name,
                        "reason": str(exc),
                    },
                )
        if target == "salesforce" and not row["sf_id"]:
            if not row["erp_key"]:
                return None
            fields[entity.settings.external_id] = row["erp_key"]
        return fields or None


_INTEGER_TYPES = ("smallint", "integer", "bigint", "int2", "int4", "int8")
_DECIMAL_TYPES = ("numeric", "decimal", "real", "double precision", "float")


def _unified_text(value: Any, erp_type: str) -> str | None:
    """``value`` as unified text in the ERP column's type: 3.00 into a smallint is 3.

    Numbers are written without trailing zeros, so the same amount read from
    either system (12.50 from Salesforce, 12.5 from a float column) is one value.
    """
    text = _text(value)
    if text is None or not erp_type.startswith(_INTEGER_TYPES + _DECIMAL_TYPES):
        return text
    try:
        number = Decimal(text)
    except ArithmeticError:
        return text  # the ERP refuses it on write: the sink dead-letters it
    if not number.is_finite():
        return text
    if erp_type.startswith(_INTEGER_TYPES) and number == number.to_integral_value():
        return str(int(number))
    normal = number.normalize()
    return format(normal, "f") if normal != 0 else "0"


def _parents_first(entities: Mapping[str, _Entity]) -> dict[str, int]:
    """Each entity's rank, the entities it refers to ranked before it."""
    ranks: dict[str, int] = {}

    def visit(name: str, path: frozenset[str]) -> None:
        if name in ranks or name in path or name not in entities:
            return
        for field_map in entities[name].settings.fields:
            if field_map.reference is not None:
                visit(field_map.reference, path | {name})
        ranks[name] = len(ranks)

    for name in sorted(entities):
        visit(name, frozenset())
    return ranks


async def mirror_rows(
    conn: asyncpg.Connection,
    qualified: str,
    key_columns: Iterable[str],
    keys: list[str] | None,
) -> dict[str, dict[str, Any]]:
    """Rows of a mirror table as column -> value by key text (None: every row)."""
    key_expr = " || '|' || ".join(f"t.{quote_ident(c)}::text" for c in key_columns)
    query = f"SELECT {key_expr} AS k, to_jsonb(t)::text AS j FROM {qualified} t"
    if keys is None:
        rows = await conn.fetch(query)
    else:
        rows = await conn.fetch(query + f" WHERE {key_expr} = ANY($1::text[])", keys)
    return {r["k"]: json.loads(r["j"], parse_float=Decimal) for r in rows}


def _versions_json(state: UnifiedState) -> str:
    versions = {name: version_to_json(fs.version) for name, fs in state.fields.items()}
    if state.deleted is not None:
        versions[_DELETED] = version_to_json(state.deleted)
    return orjson.dumps(versions).decode()


def _state_of(row: Mapping[str, Any]) -> UnifiedState:
    versions = row.get("versions") or "{}"
    versions = (
        orjson.loads(versions) if isinstance(versions, (str, bytes)) else versions
    )
    fields = {
        name: FieldState(row.get(name), version_from_json(v))
        for name, v in versions.items()
        if name != _DELETED
    }
    deleted = version_from_json(versions[_DELETED]) if _DELETED in versions else None
    return UnifiedState(fields, deleted)


async def sync_engine(
    settings: Settings, conn: asyncpg.Connection
) -> SyncEngine | None:
    """The engine for the configured entities, its tables ready; None without entities."""
    if not settings.entities:
        return None
    client = settings.salesforce.client_name if settings.salesforce else "replicator"
    engine = SyncEngine(settings, client_name=client)
    await engine.prepare(conn, {})
    return engine
