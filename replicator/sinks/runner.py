"""Run the outbox worker for the configured entities: both sinks, links stored on success.

Turns outbox rows into sink writes (``SfWrite`` by Id or by the entity's
external id; ``ErpWrite`` by the ERP key, a new numeric key for a record
created in Salesforce) and, when a write created a record, stores its new
Salesforce Id or ERP key on the unified row in the same transaction that marks
the outbox row done, so a record that comes back cannot be linked twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
import asyncpg
import orjson

from replicator.config import Settings
from replicator.sinks.erp import ErpSink, ErpWrite
from replicator.sinks.salesforce import SalesforceSink, SfWrite, WriteResult
from replicator.sinks.worker import NotReady, OutboxRow, OutboxWorker
from replicator.store import audit
from replicator.store.mirror import quote_ident

logger = logging.getLogger(__name__)


NEW_PREFIX = "new:"  # outbox target_key of a record not yet created at the target


def new_key(unified_id: str) -> str:
    """The outbox ``target_key`` of a record the target does not hold yet."""
    return NEW_PREFIX + unified_id


class OutboxResolver:
    """Map outbox rows to sink writes, and store links on success.

    Runs inside the worker's claim transaction on the replica connection:
    references to other entities (``{"$ref": entity, "unified_id": ...}``)
    become the referenced record's key at the target, or the row waits
    (``NotReady``) until that record has been written there.
    """

    def __init__(
        self,
        settings: Settings,
        erp_keys: dict[str, list[str]],
        replica: asyncpg.Connection | None = None,
    ) -> None:
        self.entities = {e.name: e for e in settings.entities}
        self.erp_keys = erp_keys  # "schema.table" -> key columns
        self.replica = replica

    async def _linked_key(self, entity: str, unified_id: str, column: str) -> Any:
        if self.replica is None:
            return None
        target = "salesforce" if column == "sf_id" else "erp"
        return await self.replica.fetchval(
            f"SELECT coalesce((SELECT {column} FROM unified.{quote_ident(entity)} "
            "WHERE unified_id = $1), (SELECT key FROM replicator.created_links "
            "WHERE entity = $2 AND target = $3 AND unified_id = $1 LIMIT 1))",
            unified_id,
            entity,
            target,
        )

    async def _target_key(self, row: OutboxRow) -> str | None:
        """The record's key at the target, None while it does not exist there."""
        if not row.target_key.startswith(NEW_PREFIX):
            return row.target_key or None
        column = "sf_id" if row.target == "salesforce" else "erp_key"
        found = await self._linked_key(
            row.entity, row.target_key[len(NEW_PREFIX) :], column
        )
        return str(found) if found else None

    async def _fields(self, row: OutboxRow) -> dict[str, Any]:
        column = "sf_id" if row.target == "salesforce" else "erp_key"
        fields = {}
        for name, value in row.fields.items():
            if isinstance(value, dict) and "$ref" in value:
                key = await self._linked_key(value["$ref"], value["unified_id"], column)
                if key is None:
                    raise NotReady(
                        f"{name} refers to {value['$ref']} {value['unified_id']}, "
                        f"not yet written to {row.target}"
                    )
                value = str(key)
            fields[name] = value
        return fields

    async def salesforce(self, row: OutboxRow) -> SfWrite:
        entity = self.entities[row.entity]
        return SfWrite(
            row.id,
            entity.salesforce,
            await self._target_key(row),
            entity.external_id,
            row.operation,
            await self._fields(row),
        )

    async def erp(self, row: OutboxRow) -> ErpWrite:
        entity = self.entities[row.entity]
        if entity.erp not in self.erp_keys and self.replica is not None:
            self.erp_keys = await _erp_keys(self.replica)  # mirrored since start
        key_columns = self.erp_keys.get(entity.erp, [])
        fields = await self._fields(row)
        key: dict[str, Any] = {}
        target_key = await self._target_key(row)
        if target_key:
            key = dict(zip(key_columns, target_key.split("|"), strict=True))
        elif key_columns and all(c in fields for c in key_columns):
            key = {c: fields[c] for c in key_columns}  # a line keyed by its parents
        sf_id = (row.cause or {}).get("sf_id")
        match = None
        if entity.erp_sf_id_column and sf_id:
            fields[entity.erp_sf_id_column] = sf_id
            match = {entity.erp_sf_id_column: sf_id}
        generated, code = None, None
        if not key and len(key_columns) == 1:
            generated = key_columns[0]
            spec = entity.erp_new_key or "next"
            if spec.startswith("code("):
                code = str(fields.get(entity.field(spec[5:-1]).erp) or "")
        return ErpWrite(
            row.id,
            entity.erp,
            key,
            row.operation,
            fields,
            new_key=generated,
            match=match,
            key_code=code,
        )

    async def on_done(
        self, conn: asyncpg.Connection, row: OutboxRow, result: WriteResult
    ) -> None:
        await audit.record(
            conn,
            "write_back",
            f"{row.entity}:{row.target_key}",
            {
                "outbox_id": row.id,
                "target": row.target,
                "key": row.target_key,
                "operation": row.operation,
                "fields": row.fields,
                "cause": row.cause,
                "answer": result.answer,
                "created": result.created,
            },
        )
        if not row.target_key.startswith(NEW_PREFIX) or not result.record_id:
            return
        if row.operation != "upsert":
            return
        unified_id = row.target_key[len(NEW_PREFIX) :]
        await conn.execute(
            "INSERT INTO replicator.created_links (entity, target, key, unified_id) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
            row.entity,
            row.target,
            result.record_id,
            unified_id,
        )
        linked = await conn.fetchrow(
            f"SELECT sf_id FROM unified.{quote_ident(row.entity)} WHERE unified_id = $1",
            unified_id,
        )
        # later rows for the same new record now name it by its key
        await conn.execute(
            "UPDATE replicator.outbox SET target_key = $1 WHERE entity = $2 AND "
            "target = $3 AND target_key = $4 AND status = 'pending'",
            result.record_id,
            row.entity,
            row.target,
            row.target_key,
        )
        entity = self.entities[row.entity]
        if (
            row.target == "erp"
            and linked is not None
            and linked["sf_id"]
            and "salesforce" in entity.targets
        ):
            # the new ERP key goes into the Salesforce record's external id
            await conn.execute(
                "INSERT INTO replicator.outbox (entity, target, target_key, operation, "
                "fields, cause) VALUES ($1, 'salesforce', $2, 'upsert', $3, $4)",
                row.entity,
                linked["sf_id"],
                orjson.dumps({entity.external_id: result.record_id}).decode(),
                orjson.dumps(
                    {"unified_id": unified_id, "link": "erp_key", "unified": {}}
                ).decode(),
            )


async def fold_links(replica: asyncpg.Connection) -> int:
    """Store created records' keys on their unified rows, one row per transaction.

    Each update holds one row lock at a time, so it can wait for an applier
    but never deadlock with one. Returns the links folded.
    """
    rows = await replica.fetch(
        "SELECT entity, target, key, unified_id FROM replicator.created_links "
        "ORDER BY at LIMIT 1000"
    )
    for r in rows:
        column = "sf_id" if r["target"] == "salesforce" else "erp_key"
        async with replica.transaction():
            await replica.execute(
                f"UPDATE unified.{quote_ident(r['entity'])} SET {column} = $1 "
                f"WHERE unified_id = $2 AND {column} IS NULL AND NOT EXISTS "
                f"(SELECT 1 FROM unified.{quote_ident(r['entity'])} WHERE {column} = $1)",
                r["key"],
                r["unified_id"],
            )
            await replica.execute(
                "DELETE FROM replicator.created_links WHERE entity = $1 AND "
                "target = $2 AND key = $3",
                r["entity"],
                r["target"],
                r["key"],
            )
    return len(rows)


async def _keep_linking(settings: Settings, engine: Any, stop: asyncio.Event) -> None:
    """Run the initial pass of each entity once both its mirrors exist."""
    from replicator.linking import link_all

    conn = await asyncpg.connect(settings.replica.resolve())
    try:
        while not stop.is_set():
            await link_all(engine, conn)
            linked = [await _linked(conn, name) for name in engine.entities]
            if all(linked):
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stop.wait()
    finally:
        await conn.close()


async def _linked(conn: asyncpg.Connection, entity: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT 1 FROM replicator.sync_entities WHERE entity = $1", entity
        )
    )


async def _erp_keys(replica: asyncpg.Connection) -> dict[str, list[str]]:
    rows = await replica.fetch(
        "SELECT source_table, key_columns FROM replicator.mirror_tables WHERE stream = 'erp'"
    )
    return {r["source_table"]: orjson.loads(r["key_columns"]) for r in rows}


async def run_outbox(settings: Settings, stop: asyncio.Event) -> None:
    """Drain the outbox until ``stop`` is set (both sinks when both are configured)."""
    from replicator.sources.salesforce.rest import RestClient
    from replicator.sources.salesforce.source import build_authenticator

    replica = await asyncpg.connect(settings.replica.resolve())
    erp_conn = None
    linker: asyncio.Task[None] | None = None
    try:
        from replicator.store.tables import create_schema
        from replicator.unified import sync_engine

        await create_schema(replica)
        engine = await sync_engine(settings, replica)
        if engine is not None:
            # Existing records are linked (or queued for creation) as soon as
            # both mirrors of an entity are loaded; its live changes wait.
            linker = asyncio.create_task(_keep_linking(settings, engine, stop))
        resolver = OutboxResolver(settings, await _erp_keys(replica), replica)
        erp_sink = None
        if settings.erp is not None:
            erp_conn = await asyncpg.connect(settings.erp.database.resolve())
            erp_sink = ErpSink(erp_conn, settings.erp.origin)
            await erp_sink.setup()
        async with aiohttp.ClientSession() as http:
            sf_sink = None
            if settings.salesforce is not None:
                auth = build_authenticator(settings.salesforce)
                await auth.login()
                rest = RestClient(
                    auth,
                    http,
                    api_version=settings.salesforce.api_version,
                    client_name=settings.salesforce.client_name,
                    attempts=1,
                )
                sf_sink = SalesforceSink(rest)
            worker = OutboxWorker(
                replica,
                salesforce=sf_sink,
                erp=erp_sink,
                resolve_sf=resolver.salesforce,
                resolve_erp=resolver.erp,
                on_done=resolver.on_done,
                after_round=lambda: fold_links(replica),
                idle_timeout=5.0,
            )
            await worker.run(stop)
    finally:
        if linker is not None:
            linker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await linker
        await replica.close()
        if erp_conn is not None:
            await erp_conn.close()
