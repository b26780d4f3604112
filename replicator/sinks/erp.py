"""Write outbox rows to the ERP under a replication origin, in foreign-key order.

The sink's session is tagged with ``pg_replication_origin_session_setup``, so
pgoutput puts an Origin message in each of its transactions and the ERP
stream recognises its own writes coming back (BUG-40). Values are cast by
PostgreSQL itself through ``json_populate_record`` against the table's row
type, so the ERP's own input functions decide, not Python.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from replicator.sinks.salesforce import WriteResult
from replicator.store.mirror import quote_ident

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ErpWrite:
    """One outbox row bound for the ERP."""

    outbox_id: int
    table: str  # schema.table
    key: dict[str, Any]  # primary key column -> value; empty for a new row
    operation: str  # upsert, delete
    fields: dict[str, Any]
    new_key: str | None = None  # "max+1": generate a numeric key for a new row


def _table(name: str) -> str:
    schema, _, table = name.rpartition(".")
    return f"{quote_ident(schema or 'public')}.{quote_ident(table)}"


class ErpSink:
    """Apply batches of writes on one ERP connection tagged with our origin."""

    def __init__(self, conn: asyncpg.Connection, origin: str) -> None:
        self.conn = conn
        self.origin = origin

    async def setup(self) -> None:
        exists = await self.conn.fetchval(
            "SELECT 1 FROM pg_replication_origin WHERE roname = $1", self.origin)
        if not exists:
            await self.conn.execute("SELECT pg_replication_origin_create($1)", self.origin)
        await self.conn.execute("SELECT pg_replication_origin_session_setup($1)", self.origin)

    async def write(self, writes: Sequence[ErpWrite]) -> list[WriteResult]:
        """Apply ``writes`` in order (parents were enqueued before children)."""
        results = []
        for w in writes:
            try:
                async with self.conn.transaction():
                    answer = await self._one(w)
                results.append(WriteResult(w.outbox_id, "done", answer,
                                           answer.get("key"), bool(answer.get("created"))))
            except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
                logger.warning("erp write refused", extra={
                    "table": w.table, "key": w.key, "outbox_id": w.outbox_id, "error": str(exc)})
                results.append(WriteResult(w.outbox_id, "failed",
                                           {"error": type(exc).__name__, "message": str(exc)}))
        return results

    async def _one(self, w: ErpWrite) -> dict[str, Any]:
        table = _table(w.table)
        if w.operation == "delete":
            where = " AND ".join(f"{quote_ident(k)} = $%d" % (i + 1) for i, k in enumerate(w.key))
            deleted = await self.conn.execute(f"DELETE FROM {table} WHERE {where}",
                                              *[str(v) for v in w.key.values()])
            return {"deleted": deleted}
        fields = dict(w.fields)
        key = dict(w.key)
        if not key and w.new_key:
            column = w.new_key
            await self.conn.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")
            key = {column: await self.conn.fetchval(
                f"SELECT coalesce(max({quote_ident(column)}), 0) + 1 FROM {table}")}
        row = {**fields, **key}
        cols = list(row)
        col_list = ", ".join(quote_ident(c) for c in cols)
        keys = ", ".join(quote_ident(c) for c in key)
        updates = ", ".join(f"{quote_ident(c)} = excluded.{quote_ident(c)}"
                            for c in cols if c not in key)
        conflict = f"ON CONFLICT ({keys}) DO UPDATE SET {updates}" if updates else (
            f"ON CONFLICT ({keys}) DO NOTHING")
        created = await self.conn.fetchval(
            f"INSERT INTO {table} ({col_list}) SELECT {col_list} FROM "
            f"json_populate_record(NULL::{table}, $1::json) {conflict} "
            "RETURNING (xmax = 0)", orjson.dumps(row, default=str).decode())
        return {"key": "|".join(str(v) for v in key.values()), "created": bool(created)}
