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

import datetime as dt
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from replicator.config import Settings
from replicator.conflict import (
    Change,
    EntityRule,
    FieldRule,
    FieldState,
    PendingWrite,
    UnifiedState,
    Version,
    resolve,
    split_echoes,
    version_from_json,
    version_to_json,
)
from replicator.mapping.config import EntitySettings, FieldMap
from replicator.mapping.transforms import Transform, TransformError
from replicator.sinks.worker import OUTBOX_CHANNEL
from replicator.sources.salesforce.schema import snake
from replicator.store.mirror import MirrorTable, mirror_name, quote_ident

logger = logging.getLogger(__name__)

UNIFIED_SCHEMA = "unified"
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


@dataclass(frozen=True, slots=True)
class _Entity:
    settings: EntitySettings
    rule: EntityRule
    transforms: Mapping[str, Transform | None]
    erp_mirror: str  # mirror table name in schema erp
    erp_key: tuple[str, ...]

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def table(self) -> str:
        return f"{UNIFIED_SCHEMA}.{quote_ident(self.settings.name)}"

    def column(self, source: str, field: FieldMap) -> str:
        return field.erp if source == "erp" else snake(field.salesforce)


class SyncEngine:
    """Resolution and outbox for every mapped entity, on the applier's connection."""

    def __init__(self, settings: Settings, *, client_name: str = "replicator") -> None:
        self.settings = settings
        self.client_name = client_name
        self.entities: dict[str, _Entity] = {}
        self.by_erp_mirror: dict[str, _Entity] = {}
        self.by_sf_object: dict[str, _Entity] = {}
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
            fields = {
                f.name: FieldRule(f.name, owner=entity.owner_of(f), enforce=f.enforce)
                for f in entity.fields
            }
            rule = EntityRule(
                entity.name,
                fields,
                entity.owner,
                entity.delete_policy,
                sources=tuple(sorted(entity.sources)),
                precedence=self.precedence,
                tie_window=self.tie_window,
            )
            transforms = {f.name: entity.transform(f.name) for f in entity.fields}
            state = _Entity(
                entity,
                rule,
                transforms,
                mirror_name(schema or "public", table),
                erp_keys.get(entity.erp, ()),
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

    # -- what the appliers call ---------------------------------------------------

    def watches(self, source: str, name: str) -> bool:
        return name in (self.by_erp_mirror if source == "erp" else self.by_sf_object)

    async def snapshot(
        self,
        conn: asyncpg.Connection,
        table: MirrorTable,
        keys: Iterable[tuple[Any, ...]],
    ) -> dict[str, dict[str, Any]]:
        """The mirror rows of ``keys`` as column -> value, keyed by the key text."""
        key_cols = table.key
        wanted = ["|".join(str(k) for k in key) for key in keys]
        if not wanted:
            return {}
        key_expr = " || '|' || ".join(f"t.{quote_ident(c)}::text" for c in key_cols)
        rows = await conn.fetch(
            f"SELECT {key_expr} AS k, to_jsonb(t)::text AS j FROM {table.qualified} t "
            f"WHERE {key_expr} = ANY($1::text[])",
            wanted,
        )
        return {r["k"]: json.loads(r["j"], parse_float=Decimal) for r in rows}

    async def on_rows(
        self,
        conn: asyncpg.Connection,
        source: str,
        name: str,
        before: Mapping[str, dict[str, Any]],
        after: Mapping[str, dict[str, Any]],
        times: Mapping[str, dt.datetime],
        position: str,
    ) -> None:
        """Resolve every key whose mapped fields changed between ``before`` and ``after``."""
        entity = (self.by_erp_mirror if source == "erp" else self.by_sf_object)[name]
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
    ) -> None:
        deleted = after is None or (
            source == "salesforce" and bool(after.get("is_deleted"))
        )
        changed = (
            {} if deleted else self._changed(entity, source, key, before, after or {})
        )
        if not changed and not deleted:
            return
        row = await self._unified_row(conn, entity, source, key, after)
        if row.get("_new") and not deleted and after is not None:
            # first sight of this record: every mapped field it holds is news,
            # so a record created on the other side gets all of them
            changed = self._changed(entity, source, key, None, after)
        echoes: list[PendingWrite] = []
        if changed:
            pending = await self._pending(conn, entity, source, row)
            changed, echoes = split_echoes(changed, pending, json_fields=set())
            if echoes:
                await self._mark_echoed(conn, echoes)
        if not changed and not deleted:
            return
        version = Version(commit_time, source, position)
        change = Change(source, "delete" if deleted else "upsert", changed, version)
        resolution = resolve(_state_of(row), change, entity.rule)
        await self._store(conn, entity, row, resolution.state)
        for conflict in resolution.conflicts:
            await conn.execute(
                "INSERT INTO replicator.conflicts (entity, entity_key, field, kept_value, "
                "kept_source, kept_time, discarded_value, discarded_source, "
                "discarded_time, rule) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                entity.name,
                row["unified_id"],
                conflict.field,
                _text(conflict.kept_value),
                conflict.kept_version.source if conflict.kept_version else None,
                conflict.kept_version.commit_time if conflict.kept_version else None,
                _text(conflict.discarded_value),
                conflict.discarded_version.source,
                conflict.discarded_version.commit_time,
                conflict.rule,
            )
        await self._enqueue(
            conn,
            entity,
            source,
            row,
            resolution.accepted,
            resolution.enforce,
            deleted and entity.settings.delete_policy == "propagate",
            change,
        )

    def _changed(
        self,
        entity: _Entity,
        source: str,
        key: str,
        before: dict[str, Any] | None,
        after: dict[str, Any],
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in entity.settings.fields:
            column = entity.column(source, field)
            value = after.get(column)
            if before is not None and _text(before.get(column)) == _text(value):
                continue
            transform = entity.transforms.get(field.name)
            if source == "salesforce" and transform is not None and value is not None:
                try:
                    value = transform.to_unified(value)
                except TransformError as exc:
                    logger.warning(
                        "value cannot be mapped, field skipped",
                        extra={
                            "entity": entity.name,
                            "key": key,
                            "field": field.name,
                            "reason": str(exc),
                        },
                    )
                    continue
            out[field.name] = _text(value)
        return out

    async def _unified_row(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        source: str,
        key: str,
        after: dict[str, Any] | None,
    ) -> dict[str, Any]:
        column = "erp_key" if source == "erp" else "sf_id"
        row = await conn.fetchrow(
            f"SELECT * FROM {entity.table} WHERE {column} = $1 FOR UPDATE", key
        )
        if row is None and source == "salesforce" and after is not None:
            external = after.get(snake(entity.settings.external_id))
            if external:
                row = await conn.fetchrow(
                    f"SELECT * FROM {entity.table} WHERE erp_key = $1 FOR UPDATE",
                    str(external),
                )
                if row is not None:
                    await conn.execute(
                        f"UPDATE {entity.table} SET sf_id = $1 WHERE unified_id = $2",
                        key,
                        row["unified_id"],
                    )
                    return {**dict(row), "sf_id": key}
        if row is not None:
            return dict(row)
        unified_id = f"{'erp' if source == 'erp' else 'sf'}:{key}"
        await conn.execute(
            f"INSERT INTO {entity.table} (unified_id, {column}) VALUES ($1, $2)",
            unified_id,
            key,
        )
        return {
            "unified_id": unified_id,
            "sf_id": key if source == "salesforce" else None,
            "erp_key": key if source == "erp" else None,
            "versions": "{}",
            "_new": True,
        }

    async def _pending(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        source: str,
        row: Mapping[str, Any],
    ) -> list[PendingWrite]:
        rows = await conn.fetch(
            "SELECT id, cause, echoed, created_at FROM replicator.outbox WHERE entity = $1 "
            "AND target = $2 AND cause->>'unified_id' = $3 AND status <> 'failed' "
            "AND created_at > now() - $4::interval ORDER BY id",
            entity.name,
            source,
            row["unified_id"],
            _ECHO_HORIZON,
        )
        pending = []
        self._outbox_ids: dict[PendingWrite, int] = {}
        for r in rows:
            cause = orjson.loads(r["cause"])
            echoed = orjson.loads(r["echoed"])
            for field, value in cause.get("unified", {}).items():
                if field not in echoed:
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
                    "UPDATE replicator.outbox SET echoed = echoed || "
                    "jsonb_build_object($2::text, true) WHERE id = $1",
                    outbox_id,
                    echo.field,
                )

    async def _store(
        self,
        conn: asyncpg.Connection,
        entity: _Entity,
        row: Mapping[str, Any],
        state: UnifiedState,
    ) -> None:
        versions = {
            name: version_to_json(fs.version) for name, fs in state.fields.items()
        }
        if state.deleted is not None:
            versions[_DELETED] = version_to_json(state.deleted)
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
            orjson.dumps(versions).decode(),
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
        cause_base = {
            "unified_id": row["unified_id"],
            "source": source,
            "sf_id": row["sf_id"],
            "erp_key": row["erp_key"],
            "version": version_to_json(change.version),
        }
        if writes_needed := bool(accepted or enforce or delete):
            # delivered at commit: wakes the outbox worker
            await conn.execute("SELECT pg_notify($1, '')", OUTBOX_CHANNEL)
        if not writes_needed:
            return
        writes: dict[str, dict[str, Any]] = {}
        for system in entity.settings.targets:
            if system != source and accepted:
                writes[system] = dict(accepted)
        if enforce:
            writes.setdefault(source, {}).update(enforce)
        for target, unified in writes.items():
            fields = self._target_fields(entity, target, unified, row)
            if fields is None:
                continue
            key = row["sf_id"] if target == "salesforce" else row["erp_key"]
            await conn.execute(
                "INSERT INTO replicator.outbox (entity, target, target_key, operation, fields, "
                "cause) VALUES ($1, $2, $3, 'upsert', $4, $5)",
                entity.name,
                target,
                key or "",
                orjson.dumps(fields, default=_json_default).decode(),
                orjson.dumps(
                    {**cause_base, "unified": unified}, default=_json_default
                ).decode(),
            )
        if delete:
            target = "salesforce" if source == "erp" else "erp"
            key = row["sf_id"] if target == "salesforce" else row["erp_key"]
            if key and target in entity.settings.targets:
                await conn.execute(
                    "INSERT INTO replicator.outbox (entity, target, target_key, operation, "
                    "fields, cause) VALUES ($1, $2, $3, 'delete', '{}', $4)",
                    entity.name,
                    target,
                    key,
                    orjson.dumps(cause_base).decode(),
                )

    def _target_fields(
        self,
        entity: _Entity,
        target: str,
        unified: Mapping[str, Any],
        row: Mapping[str, Any],
    ) -> dict[str, Any] | None:
        fields: dict[str, Any] = {}
        for name, value in unified.items():
            field = entity.settings.field(name)
            if target == "erp":
                fields[field.erp] = value
                continue
            transform = entity.transforms.get(name)
            try:
                fields[field.salesforce] = (
                    transform.from_unified(value)
                    if transform is not None and value is not None
                    else value
                )
            except TransformError as exc:
                logger.warning(
                    "value cannot be written to salesforce",
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
