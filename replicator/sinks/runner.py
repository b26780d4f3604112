"""Run the outbox worker for the configured entities: both sinks, links stored on success.

Turns outbox rows into sink writes (``SfWrite`` by Id or by the entity's
external id; ``ErpWrite`` by the ERP key, a new numeric key for a record
created in Salesforce) and, when a write created a record, stores its new
Salesforce Id or ERP key on the unified row in the same transaction that marks
the outbox row done, so a record that comes back cannot be linked twice.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import asyncpg
import orjson

from replicator.config import Settings
from replicator.sinks.erp import ErpSink, ErpWrite
from replicator.sinks.salesforce import SalesforceSink, SfWrite, WriteResult
from replicator.sinks.worker import OutboxRow, OutboxWorker
from replicator.store import audit
from replicator.store import audit
from replicator.store.mirror import quote_ident

logger = logging.getLogger(__name__)


class OutboxResolver:
    """Map outbox rows to sink writes, and store links on success."""

    def __init__(self, settings: Settings, erp_keys: dict[str, list[str]]) -> None:
        self.entities = {e.name: e for e in settings.entities}
        self.erp_keys = erp_keys  # "schema.table" -> key columns

    def salesforce(self, row: OutboxRow) -> SfWrite:
        entity = self.entities[row.entity]
        return SfWrite(
            row.id,
            entity.salesforce,
            row.target_key or None,
            entity.external_id,
            row.operation,
            dict(row.fields),
        )

    def erp(self, row: OutboxRow) -> ErpWrite:
        entity = self.entities[row.entity]
        key_columns = self.erp_keys.get(entity.erp, [])
        key: dict[str, Any] = {}
        if row.target_key:
            key = dict(zip(key_columns, row.target_key.split("|"), strict=True))
        fields = dict(row.fields)
        sf_id = (row.cause or {}).get("sf_id")
        match = None
        if entity.erp_sf_id_column and sf_id:
            fields[entity.erp_sf_id_column] = sf_id
            match = {entity.erp_sf_id_column: sf_id}
        new_key = key_columns[0] if not key and len(key_columns) == 1 else None
        return ErpWrite(
            row.id, entity.erp, key, row.operation, fields, new_key=new_key, match=match
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
        if row.target_key or not result.record_id or row.operation != "upsert":
            return
        unified_id = (row.cause or {}).get("unified_id")
        column = "sf_id" if row.target == "salesforce" else "erp_key"
        if unified_id:
            await conn.execute(
                f"UPDATE unified.{quote_ident(row.entity)} SET {column} = $1 "
                f"WHERE unified_id = $2 AND {column} IS NULL",
                result.record_id,
                unified_id,
            )
            await conn.execute(
                "UPDATE replicator.outbox SET target_key = $1 WHERE entity = $2 AND "
                "target = $3 AND target_key = '' AND status = 'pending' AND "
                "cause->>'unified_id' = $4",
                result.record_id,
                row.entity,
                row.target,
                unified_id,
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
    try:
        resolver = OutboxResolver(settings, await _erp_keys(replica))
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
                idle_timeout=5.0,
            )
            await worker.run(stop)
    finally:
        await replica.close()
        if erp_conn is not None:
            await erp_conn.close()
