"""Write outbox rows to the ERP under a replication origin, in foreign-key order.

The sink's session is tagged with ``pg_replication_origin_session_setup``, so
pgoutput puts an Origin message in each of its transactions and the ERP
stream recognises its own writes coming back (BUG-40). Values are cast by
PostgreSQL itself through ``json_populate_record`` against the table's row
type, so the ERP's own input functions decide, not Python.

Each write is one transaction. A batch is applied parents first for upserts
and children first for deletes (ranks read from ``pg_constraint``), so an
order and its lines enqueued together land whatever their outbox order. A
row refused by the ERP (a constraint, a bad value, a trigger's exception)
fails alone; a deadlock or a serialization failure is retried; a lost
connection raises ``SinkError`` and the worker repeats the batch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from replicator.errors import SinkError
from replicator.sinks.salesforce import WriteResult
from replicator.store.mirror import quote_ident

__all__ = ["ErpSink", "ErpWrite"]

logger = logging.getLogger(__name__)

# SQLSTATE classes of a refusal that repeating will not change: data
# exceptions, integrity violations, syntax or access (a wrong mapping), and
# exceptions raised by triggers (PL/pgSQL RAISE, class P0).
_REFUSED_CLASSES = ("22", "23", "42", "P0")
# Passing conflicts with other sessions: serialization failure, deadlock,
# lock not available, statement cancelled.
_PASSING = frozenset({"40001", "40P01", "55P03", "57014"})

_FK_PARENTS = """
SELECT DISTINCT c.conrelid::regclass::text AS child,
       c.confrelid::regclass::text AS parent
FROM pg_constraint c
WHERE c.contype = 'f' AND c.conrelid <> c.confrelid
"""


@dataclass(frozen=True, slots=True)
class ErpWrite:
    """One outbox row bound for the ERP.

    A new row with no key gets ``max(new_key) + 1``. ``match`` names columns
    whose values identify a row created by an earlier attempt of the same
    write (a link column such as the Salesforce Id): with it, a generated-key
    insert repeated after a crash updates that row instead of adding another.
    """

    outbox_id: int
    table: str  # schema.table
    key: dict[str, Any]  # primary key column -> value; empty for a new row
    operation: str  # upsert, delete
    fields: dict[str, Any]
    new_key: str | None = None  # the key column to generate for a new row
    match: dict[str, Any] | None = None
    # With ``new_key``: derive a letter code from this text (a customer's
    # name gives "ALFRE"), else the key is max + 1.
    key_code: str | None = None


def _table(name: str) -> str:
    schema, _, table = name.rpartition(".")
    return f"{quote_ident(schema or 'public')}.{quote_ident(table)}"


def _json(row: dict[str, Any]) -> str:
    return orjson.dumps(row, default=str).decode()


def _key_text(key: dict[str, Any]) -> str:
    return "|".join(str(v) for v in key.values())


def _is_refusal(exc: asyncpg.PostgresError) -> bool:
    state = str(getattr(exc, "sqlstate", "") or "")
    return state.startswith(_REFUSED_CLASSES)


class ErpSink:
    """Apply batches of writes on one ERP connection tagged with our origin."""

    def __init__(self, conn: asyncpg.Connection, origin: str) -> None:
        self.conn = conn
        self.origin = origin
        self._ranks: dict[str, int] | None = None

    async def setup(self) -> None:
        """Create the replication origin if missing and tag this session with it."""
        exists = await self.conn.fetchval(
            "SELECT 1 FROM pg_replication_origin WHERE roname = $1", self.origin
        )
        if not exists:
            await self.conn.execute(
                "SELECT pg_replication_origin_create($1)", self.origin
            )
        if not await self.conn.fetchval(
            "SELECT pg_replication_origin_session_is_setup()"
        ):
            await self.conn.execute(
                "SELECT pg_replication_origin_session_setup($1)", self.origin
            )

    async def write(self, writes: Sequence[ErpWrite]) -> list[WriteResult]:
        """Apply ``writes`` in foreign-key order; one result per write."""
        ordered = await self._fk_order(writes)
        results = []
        for w in ordered:
            try:
                async with self.conn.transaction():
                    answer = await self._one(w)
            except asyncpg.PostgresError as exc:
                results.append(self._refused(w, exc))
            except (OSError, asyncpg.InterfaceError) as exc:
                raise SinkError(f"erp connection lost writing {w.table!r}") from exc
            except SinkError as exc:
                answer = {"error": "NO_KEY", "message": str(exc)}
                results.append(WriteResult(w.outbox_id, "failed", answer))
            else:
                key, created = answer.get("key"), bool(answer.get("created"))
                results.append(WriteResult(w.outbox_id, "done", answer, key, created))
        return results

    def _refused(self, w: ErpWrite, exc: asyncpg.PostgresError) -> WriteResult:
        state = str(getattr(exc, "sqlstate", "") or "")
        outcome = "retry" if state in _PASSING or not _is_refusal(exc) else "failed"
        answer = {"error": type(exc).__name__, "sqlstate": state, "message": str(exc)}
        return WriteResult(w.outbox_id, outcome, answer)

    async def _fk_order(self, writes: Sequence[ErpWrite]) -> list[ErpWrite]:
        # Upserts parents first, then deletes children first; sorted() is
        # stable, so writes of one table keep their outbox order.
        if self._ranks is None:
            self._ranks = await self._load_ranks()
        ranks = self._ranks

        def rank(w: ErpWrite) -> tuple[int, int]:
            depth = ranks.get(_table(w.table), 0)
            return (1, -depth) if w.operation == "delete" else (0, depth)

        return sorted(writes, key=rank)

    async def _load_ranks(self) -> dict[str, int]:
        """Return each table's depth below its foreign-key parents (0: no parent)."""
        rows = await self.conn.fetch(_FK_PARENTS)
        parents: dict[str, set[str]] = {}
        for row in rows:
            parents.setdefault(row["child"], set()).add(row["parent"])
        quoted = {name: await self._quoted(name) for name in _names(parents)}
        ranks: dict[str, int] = {}

        def depth(name: str, seen: frozenset[str]) -> int:
            if name in seen:  # a cycle: no order can satisfy it
                return 0
            above = parents.get(name, set())
            return 1 + max((depth(p, seen | {name}) for p in above), default=-1)

        for name in quoted:
            ranks[quoted[name]] = depth(name, frozenset())
        return ranks

    async def _quoted(self, regclass_text: str) -> str:
        row = await self.conn.fetchrow(
            "SELECT n.nspname, c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.oid = $1::regclass",
            regclass_text,
        )
        return f"{quote_ident(row['nspname'])}.{quote_ident(row['relname'])}"

    async def _one(self, w: ErpWrite) -> dict[str, Any]:
        table = _table(w.table)
        if w.operation == "delete":
            return await self._delete(table, w)
        key = dict(w.key)
        if not key and w.match:
            key = await self._matching_key(table, w)
        if not key and w.new_key:
            column = quote_ident(w.new_key)
            await self.conn.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")
            if w.key_code is not None:
                next_key = await self._free_code(table, w.new_key, w.key_code)
            else:
                next_key = await self.conn.fetchval(
                    f"SELECT coalesce(max({column}), 0) + 1 FROM {table}"
                )
            key = {w.new_key: next_key}
        if not key:
            raise SinkError(f"no key for a new row of {w.table!r} and no new_key")
        return await self._upsert(table, key, w)

    async def _free_code(self, table: str, column: str, text: str) -> str:
        """Return an unused key of letters from ``text``, as long as the column allows.

        "Alfreds Futterkiste" gives ALFRE (Northwind's own style); when taken,
        the tail becomes a counter: ALFR1, ALFR2, ... ALF10.
        """
        width = await self.conn.fetchval(
            "SELECT CASE WHEN a.atttypmod > 4 THEN a.atttypmod - 4 END "
            "FROM pg_attribute a WHERE a.attrelid = $1::regclass AND a.attname = $2",
            table,
            column,
        )
        size = int(width or 8)
        letters = "".join(c for c in text.upper() if "A" <= c <= "Z") or "NEW"
        base = (letters + "X" * size)[:size]
        candidates = [base]
        for n in range(1, 10 ** min(size, 6)):
            tail = str(n)
            candidates.append(base[: size - len(tail)] + tail)
        quoted = quote_ident(column)
        for i in range(0, len(candidates), 500):
            chunk = candidates[i : i + 500]
            taken = {
                r[0]
                for r in await self.conn.fetch(
                    f"SELECT {quoted}::text FROM {table} "
                    f"WHERE {quoted}::text = ANY($1::text[])",
                    chunk,
                )
            }
            for code in chunk:
                if code not in taken:
                    return code
        raise SinkError(f"no free key of {size} characters for {text!r} in {table}")

    async def _delete(self, table: str, w: ErpWrite) -> dict[str, Any]:
        where = " AND ".join(f"t.{quote_ident(k)} = k.{quote_ident(k)}" for k in w.key)
        status = await self.conn.execute(
            f"DELETE FROM {table} t USING json_populate_record(NULL::{table}, "
            f"$1::json) k WHERE {where}",
            _json(w.key),
        )
        return {"key": _key_text(w.key), "deleted": int(status.split()[-1])}

    async def _matching_key(self, table: str, w: ErpWrite) -> dict[str, Any]:
        assert w.match is not None
        assert w.new_key is not None
        where = " AND ".join(
            f"t.{quote_ident(k)} = m.{quote_ident(k)}" for k in w.match
        )
        column = quote_ident(w.new_key)
        found = await self.conn.fetchval(
            f"SELECT t.{column} FROM {table} t, json_populate_record("
            f"NULL::{table}, $1::json) m WHERE {where} LIMIT 1",
            _json(w.match),
        )
        return {} if found is None else {w.new_key: found}

    async def _upsert(
        self, table: str, key: dict[str, Any], w: ErpWrite
    ) -> dict[str, Any]:
        row = {**w.fields, **(w.match or {}), **key}
        cols = list(row)
        col_list = ", ".join(quote_ident(c) for c in cols)
        keys = ", ".join(quote_ident(c) for c in key)
        changing = [c for c in cols if c not in key]
        if changing:
            # An existing row first: a partial row would fail NOT NULL checks
            # in the INSERT even though ON CONFLICT would have updated it.
            where = " AND ".join(
                f"t.{quote_ident(c)} = r.{quote_ident(c)}" for c in key
            )
            sets = ", ".join(f"{quote_ident(c)} = r.{quote_ident(c)}" for c in changing)
            updated = await self.conn.execute(
                f"UPDATE {table} t SET {sets} FROM json_populate_record(NULL::{table}, "
                f"$1::json) r WHERE {where}",
                _json(row),
            )
            if updated != "UPDATE 0":
                return {"key": _key_text(key), "created": False}
        updates = ", ".join(
            f"{quote_ident(c)} = excluded.{quote_ident(c)}"
            for c in cols
            if c not in key
        )
        conflict = (
            f"ON CONFLICT ({keys}) DO UPDATE SET {updates}"
            if updates
            else f"ON CONFLICT ({keys}) DO NOTHING"
        )
        created = await self.conn.fetchval(
            f"INSERT INTO {table} ({col_list}) SELECT {col_list} FROM "
            f"json_populate_record(NULL::{table}, $1::json) {conflict} "
            "RETURNING (xmax = 0)",
            _json(row),
        )
        return {"key": _key_text(key), "created": bool(created)}


def _names(parents: dict[str, set[str]]) -> set[str]:
    names = set(parents)
    for above in parents.values():
        names |= above
    return names
