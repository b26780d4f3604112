"""Read the ERP's catalog: column types for the mirror, enums, partitions, defaults.

The mirror keeps the source's types. Built-in types are rendered with
``format_type``; enums are recreated in the replica with the same labels;
domains become their base type; other user-defined types (composites,
extension types) are mirrored as text, which holds their output exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from replicator.errors import ErpSetupError


@dataclass(frozen=True, slots=True)
class EnumType:
    schema: str
    name: str
    labels: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    name: str
    mirror_type: str  # a type expression valid in the replica
    enum: EnumType | None = None
    missing_value: str | None = (
        None  # the value existing rows get (ADD COLUMN ... DEFAULT)
    )


@dataclass(frozen=True, slots=True)
class TableInfo:
    oid: int
    schema: str
    name: str
    root_oid: int  # itself unless a partition
    root_schema: str
    root_name: str
    columns: dict[str, ColumnInfo]
    key: tuple[str, ...]
    replica_identity: str


_COLUMNS_SQL = """
SELECT a.attname,
       a.atttypid::int AS type_oid,
       format_type(a.atttypid, a.atttypmod) AS formatted,
       t.typtype::text, t.typcategory::text, tn.nspname AS type_schema, t.typname,
       coalesce(bt.oid, 0)::int AS base_oid,
       format_type(t.typbasetype, t.typtypmod) AS base_formatted,
       coalesce(et.typtype::text, '') AS elem_typtype,
       coalesce(etn.nspname, '') AS elem_schema, coalesce(et.typname, '') AS elem_name,
       coalesce(et.oid, 0)::int AS elem_oid,
       CASE WHEN a.atthasmissing THEN a.attmissingval::text END AS missing
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
JOIN pg_namespace tn ON tn.oid = t.typnamespace
LEFT JOIN pg_type bt ON bt.oid = t.typbasetype AND t.typtype = 'd'
LEFT JOIN pg_type et ON et.oid = t.typelem AND t.typcategory = 'A'
LEFT JOIN pg_namespace etn ON etn.oid = et.typnamespace
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

_TABLE_SQL = """
SELECT c.oid::int, n.nspname, c.relname, c.relreplident::text, c.relkind::text,
       r.oid::int AS root_oid, rn.nspname AS root_schema, r.relname AS root_name
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_class r ON r.oid = coalesce(pg_partition_root(c.oid), c.oid)
JOIN pg_namespace rn ON rn.oid = r.relnamespace
WHERE c.oid = $1
"""

# The mirror's key is the key the stream identifies rows by: the replica
# identity index when the table has one (deletes carry only its columns),
# else the primary key.
_KEY_SQL = """
SELECT a.attname
FROM pg_index i
JOIN pg_class c ON c.oid = i.indrelid
JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = $1
  AND CASE WHEN c.relreplident = 'i' THEN i.indisreplident ELSE i.indisprimary END
ORDER BY k.ord
"""


class Catalog:
    """Catalog look-ups on a normal (non-replication) ERP connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn

    async def table(self, oid: int) -> TableInfo | None:
        row = await self._conn.fetchrow(_TABLE_SQL, oid)
        if row is None:
            return None
        key = tuple(r[0] for r in await self._conn.fetch(_KEY_SQL, row["root_oid"]))
        columns = {}
        for col in await self._conn.fetch(_COLUMNS_SQL, row["root_oid"]):
            columns[col["attname"]] = await self._column(col)
        return TableInfo(
            oid=row[0],
            schema=row[1],
            name=row[2],
            replica_identity=row[3],
            root_oid=row["root_oid"],
            root_schema=row["root_schema"],
            root_name=row["root_name"],
            columns=columns,
            key=key,
        )

    async def enum(self, type_oid: int) -> EnumType:
        row = await self._conn.fetchrow(
            "SELECT n.nspname, t.typname, array(SELECT enumlabel FROM pg_enum "
            "WHERE enumtypid = t.oid ORDER BY enumsortorder) AS labels "
            "FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
            "WHERE t.oid = $1",
            type_oid,
        )
        return EnumType(row[0], row[1], tuple(row[2]))

    async def enum_named(self, schema: str, name: str) -> EnumType | None:
        """Return the enum ``schema.name`` with its labels as of now, if it exists."""
        oid = await self._conn.fetchval(
            "SELECT t.oid::int FROM pg_type t JOIN pg_namespace n ON n.oid = "
            "t.typnamespace WHERE n.nspname = $1 AND t.typname = $2 AND t.typtype = 'e'",
            schema,
            name,
        )
        return None if oid is None else await self.enum(oid)

    async def _column(self, col: asyncpg.Record) -> ColumnInfo:
        name, missing = col["attname"], col["missing"]
        if missing is not None:
            # attmissingval is an array literal of one element, e.g. {retail}
            missing = await self._conn.fetchval("SELECT ($1::text::text[])[1]", missing)
        typtype, category = col["typtype"], col["typcategory"]
        if col["type_schema"] == "pg_catalog" and typtype == "b":
            if category == "A" and col["elem_typtype"] == "e":
                enum = await self.enum(col["elem_oid"])
                return ColumnInfo(name, f'erp."{enum.name}"[]', enum, missing)
            if category == "A" and col["elem_schema"] not in ("pg_catalog", ""):
                return ColumnInfo(name, "text[]", None, missing)
            return ColumnInfo(name, col["formatted"], None, missing)
        if typtype == "e":
            enum = await self.enum(col["type_oid"])
            return ColumnInfo(name, f'erp."{enum.name}"', enum, missing)
        if typtype == "d":
            base = col["base_formatted"]
            if col["base_oid"] and await self._is_builtin(col["base_oid"]):
                return ColumnInfo(name, base, None, missing)
            return ColumnInfo(name, "text", None, missing)
        return ColumnInfo(name, "text", None, missing)

    async def _is_builtin(self, type_oid: int) -> bool:
        schema = await self._conn.fetchval(
            "SELECT n.nspname FROM pg_type t JOIN pg_namespace n "
            "ON n.oid = t.typnamespace WHERE t.oid = $1",
            type_oid,
        )
        return bool(schema == "pg_catalog")

    async def publication_tables(self, publication: str) -> list[int]:
        rows = await self._conn.fetch(
            "SELECT (quote_ident(schemaname) || '.' || quote_ident(tablename))"
            "::regclass::oid::int FROM pg_publication_tables WHERE pubname = $1",
            publication,
        )
        return [r[0] for r in rows]


async def check_prerequisites(conn: asyncpg.Connection) -> None:
    """Stop start-up with one clear line when the ERP cannot do logical replication."""
    wal_level = await conn.fetchval("SHOW wal_level")
    if wal_level != "logical":
        raise ErpSetupError(
            f"the ERP server runs with wal_level={wal_level!r}; set "
            "wal_level = logical in postgresql.conf (or ALTER SYSTEM SET "
            "wal_level = logical) and restart the server"
        )
    can_replicate = await conn.fetchval(
        "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user"
    )
    if not can_replicate:
        user = await conn.fetchval("SELECT current_user")
        raise ErpSetupError(
            f"the ERP role {user!r} lacks the REPLICATION attribute; run "
            f'ALTER ROLE "{user}" REPLICATION as a superuser'
        )


async def tables_without_identity(
    conn: asyncpg.Connection, oids: list[int]
) -> list[str]:
    """Return published tables that can publish no UPDATE or DELETE key.

    REPLICA IDENTITY FULL without a primary key counts too: the stream could
    match rows, but the mirror has no key to upsert by.
    """
    rows = await conn.fetch(
        """
        SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = ANY($1::oid[]) AND c.relkind IN ('r', 'p')
          AND (c.relreplident = 'n'
               OR (c.relreplident IN ('d', 'f') AND NOT EXISTS (
                     SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))
               OR (c.relreplident = 'i' AND NOT EXISTS (
                     SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid
                     AND i.indisreplident)))
        ORDER BY 1
        """,
        oids,
    )
    return [r[0] for r in rows]


async def candidate_tables(
    conn: asyncpg.Connection, tables: Sequence[str]
) -> list[int]:
    """The tables a publication would hold: ``tables``, or every user table if empty."""
    if tables:
        rows = await conn.fetch(
            "SELECT t::regclass::oid::int FROM unnest($1::text[]) AS t", list(tables)
        )
    else:
        rows = await conn.fetch(
            "SELECT c.oid::int FROM pg_class c JOIN pg_namespace n ON "
            "n.oid = c.relnamespace WHERE c.relkind IN ('r', 'p') AND NOT "
            "c.relispartition AND n.nspname NOT IN ('pg_catalog', "
            "'information_schema') AND n.nspname NOT LIKE 'pg\\_%'"
        )
    return [r[0] for r in rows]
