"""Mirror tables of the ERP in schema ``erp``: creation, evolution and set-based apply.

Changes arrive as the text PostgreSQL rendered and are applied set-based: one
COPY of every net change of a table into a temporary staging table whose
columns are all text, then a DELETE, an INSERT ... ON CONFLICT for full rows,
and one UPDATE per set of unchanged-TOAST columns for partial rows. The replica
casts the text itself, so numeric, money, time and interval values keep their
exact value (BUG-08, BUG-09, BUG-10, BUG-12).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final

import asyncpg
import orjson

from replicator.sources.erp.catalog import ColumnInfo, EnumType
from replicator.sources.erp.pgoutput import UNCHANGED, Value

logger = logging.getLogger(__name__)

MIRROR_SCHEMA: Final = "erp"
_COPY_ESCAPES: Final = str.maketrans(
    {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
)

# Net effect of the changes to one key within a step.
OP_DELETE: Final = "D"
OP_UPSERT: Final = "U"  # a full row
OP_PATCH: Final = "P"  # a row with unchanged TOAST columns: UPDATE only


def quote_ident(name: str) -> str:
    """Quote an identifier that came from a source: no name can inject SQL."""
    return '"' + name.replace('"', '""') + '"'


def mirror_name(schema: str, table: str) -> str:
    """Name the mirror of ``schema.table``: the table name, prefixed outside public."""
    return table if schema == "public" else f"{schema}__{table}"


@dataclass(slots=True)
class MirrorTable:
    """The live shape of one mirror table."""

    name: str  # unquoted, inside MIRROR_SCHEMA
    source: str  # schema.table of the source root table
    columns: list[str]
    types: list[str]
    key: tuple[str, ...]
    enums: dict[str, EnumType] = field(default_factory=dict)
    version: int = 0
    schema: str = MIRROR_SCHEMA

    @property
    def qualified(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    @property
    def key_indexes(self) -> tuple[int, ...]:
        return tuple(self.columns.index(k) for k in self.key)


@dataclass(slots=True)
class TableChanges:
    """Net changes to one mirror table, by key, in the mirror's column order."""

    table: MirrorTable
    rows: dict[tuple[Value, ...], tuple[str, tuple[Value, ...]]] = field(
        default_factory=dict
    )
    # keys whose first change here was an insert: a plain COPY can add them
    fresh: set[tuple[Value, ...]] = field(default_factory=set)

    def put(self, key: tuple[Value, ...], values: tuple[Value, ...]) -> None:
        if UNCHANGED not in values:
            self.rows[key] = (OP_UPSERT, values)
            return
        previous = self.rows.get(key)
        if previous is not None and previous[0] != OP_DELETE:
            old = previous[1]
            values = tuple(
                o if v is UNCHANGED else v for v, o in zip(values, old, strict=True)
            )
            op = OP_PATCH if UNCHANGED in values else OP_UPSERT
            if previous[0] == OP_UPSERT:
                op = OP_UPSERT
            self.rows[key] = (op, values)
        else:
            self.rows[key] = (OP_PATCH, values)

    def delete(self, key: tuple[Value, ...]) -> None:
        self.rows[key] = (OP_DELETE, ())

    def insert(self, key: tuple[Value, ...], values: tuple[Value, ...]) -> None:
        """Put a row the source inserted; a key first seen here is new to the replica.

        Only for a replica that holds the source's state at the last checkpoint
        and commits these changes with the next one: then a key whose first
        change since is an insert cannot be in the mirror yet.
        """
        if key not in self.rows and UNCHANGED not in values:
            self.fresh.add(key)
        self.put(key, values)


def _copy_field(value: Value) -> str:
    if value is None or value is UNCHANGED:
        return "\\N"
    if isinstance(value, bytes):
        return "\\\\x" + value.hex()
    return value.translate(_COPY_ESCAPES)


def render_copy(changes: TableChanges) -> tuple[bytes, dict[tuple[int, ...], int]]:
    """Render the staging COPY text; return it with the partial-row groups.

    Rows are joined as they are, NULLs as ``\\N``, and the whole text is then
    checked once: when it holds exactly the separators and NULL markers put in,
    no value held a character COPY escapes. Otherwise, or for bytes values and
    patches, every value goes through ``_copy_field``.
    """
    rows = changes.rows
    width = len(changes.table.columns)
    key_idx = changes.table.key_indexes
    lines: list[str] = []
    append = lines.append
    nulls = 0
    try:
        for key, (op, values) in rows.items():
            if op is OP_UPSERT:
                if None in values:
                    nulls += values.count(None)
                    values = tuple("\\N" if v is None else v for v in values)
                append("U\t0\t" + "\t".join(values))  # type: ignore[arg-type]
            elif op is OP_DELETE:
                row: list[Value] = ["\\N"] * width
                for i, k in zip(key_idx, key, strict=True):
                    row[i] = k
                nulls += width - len(key)
                append("D\t0\t" + "\t".join(row))  # type: ignore[arg-type]
            else:
                return _render_copy_escaped(changes)
    except TypeError:  # a bytes or NULL key value
        return _render_copy_escaped(changes)
    text = "\n".join(lines) + "\n"
    if (
        text.count("\\") == nulls
        and "\r" not in text
        and text.count("\n") == len(rows)
        and text.count("\t") == (width + 1) * len(rows)
    ):
        return text.encode(), {}
    return _render_copy_escaped(changes)


def render_rows(rows: list[tuple[Value, ...]], width: int) -> bytes:
    """Render full rows as COPY text for the mirror table itself (no op columns)."""
    lines: list[str] = []
    nulls = 0
    try:
        for values in rows:
            if None in values:
                nulls += values.count(None)
                values = tuple("\\N" if v is None else v for v in values)
            lines.append("\t".join(values))  # type: ignore[arg-type]
        text = "\n".join(lines) + "\n"
        if (
            text.count("\\") == nulls
            and "\r" not in text
            and text.count("\n") == len(rows)
            and text.count("\t") == (width - 1) * len(rows)
        ):
            return text.encode()
    except TypeError:  # a bytes value
        pass
    return "".join(
        "\t".join(map(_copy_field, values)) + "\n" for values in rows
    ).encode()


def _render_copy_escaped(
    changes: TableChanges,
) -> tuple[bytes, dict[tuple[int, ...], int]]:
    lines: list[str] = []
    groups: dict[tuple[int, ...], int] = {}
    width = len(changes.table.columns)
    key_idx = changes.table.key_indexes
    for key, (op, values) in changes.rows.items():
        group = 0
        if op == OP_DELETE:
            row: list[Value] = [None] * width
            for i, k in zip(key_idx, key, strict=True):
                row[i] = k
            values = tuple(row)
        elif op == OP_PATCH:
            unchanged = tuple(i for i, v in enumerate(values) if v is UNCHANGED)
            group = groups.setdefault(unchanged, len(groups) + 1)
        lines.append(f"{op}\t{group}\t" + "\t".join(map(_copy_field, values)))
    return ("\n".join(lines) + "\n").encode(), groups


class MirrorStore:
    """Create, evolve and write the ``erp`` mirror tables on one replica connection."""

    def __init__(
        self,
        conn: asyncpg.Connection,
        stream: str,
        ddl_conn: asyncpg.Connection | None = None,
        *,
        schema: str = MIRROR_SCHEMA,
    ) -> None:
        self.conn = conn
        self.stream = stream
        self.schema = schema
        # ALTER TYPE ... ADD VALUE must commit before a transaction may use the
        # new label, so it runs on its own connection when one is given.
        self.ddl_conn = ddl_conn or conn
        self._staging: dict[str, str] = {}

    async def load_table(self, source: str) -> MirrorTable | None:
        """Return the mirror recorded for ``source`` (schema.table), if any."""
        row = await self.conn.fetchrow(
            "SELECT mirror_table, columns, key_columns FROM replicator.mirror_tables "
            "WHERE stream = $1 AND source_table = $2",
            self.stream,
            source,
        )
        if row is None:
            return None
        cols = orjson.loads(row["columns"])
        return MirrorTable(
            row["mirror_table"],
            source,
            [c[0] for c in cols],
            [c[1] for c in cols],
            tuple(orjson.loads(row["key_columns"])),
            schema=self.schema,
        )

    async def ensure_enum(self, enum: EnumType) -> None:
        """Create the enum in the replica, or add the labels it lacks (BUG-06)."""
        name = f"{MIRROR_SCHEMA}.{quote_ident(enum.name)}"
        existing = await self.conn.fetchval(
            "SELECT array(SELECT e.enumlabel FROM pg_enum e WHERE e.enumtypid = t.oid "
            "ORDER BY e.enumsortorder) FROM pg_type t JOIN pg_namespace n "
            "ON n.oid = t.typnamespace WHERE n.nspname = $1 AND t.typname = $2",
            MIRROR_SCHEMA,
            enum.name,
        )
        if existing is None:
            labels = ", ".join(_literal(label) for label in enum.labels)
            await self.conn.execute(f"CREATE TYPE {name} AS ENUM ({labels})")
            return
        previous: str | None = None
        for label in enum.labels:
            if label not in existing:
                where = (
                    f" AFTER {_literal(previous)}"
                    if previous
                    else (f" BEFORE {_literal(existing[0])}" if existing else "")
                )
                await self.ddl_conn.execute(
                    f"ALTER TYPE {name} ADD VALUE IF NOT EXISTS {_literal(label)}{where}"
                )
                logger.info(
                    "enum label added to mirror",
                    extra={"type": enum.name, "label": label},
                )
            previous = label

    async def create_table(
        self,
        name: str,
        source: str,
        columns: list[ColumnInfo],
        key: tuple[str, ...],
        *,
        table_name: str | None = None,
    ) -> MirrorTable:
        """Create a mirror table (or a shadow under ``table_name``) and record it."""
        for col in columns:
            if col.enum is not None:
                await self.ensure_enum(col.enum)
        target = f"{quote_ident(self.schema)}.{quote_ident(table_name or name)}"
        body = ", ".join(f"{quote_ident(c.name)} {c.mirror_type}" for c in columns)
        pk = ", ".join(quote_ident(k) for k in key)
        await self.conn.execute(
            f"CREATE TABLE IF NOT EXISTS {target} ({body}, PRIMARY KEY ({pk}))"
        )
        table = MirrorTable(
            name,
            source,
            [c.name for c in columns],
            [c.mirror_type for c in columns],
            key,
            schema=self.schema,
        )
        await self.record_table(table)
        return table

    async def record_table(self, table: MirrorTable) -> None:
        await self.conn.execute(
            "INSERT INTO replicator.mirror_tables AS m (stream, source_table, "
            "mirror_table, columns, key_columns) VALUES ($1, $2, $3, $4, $5) "
            "ON CONFLICT (stream, source_table) DO UPDATE SET mirror_table = "
            "excluded.mirror_table, columns = excluded.columns, key_columns = "
            "excluded.key_columns, updated_at = now()",
            self.stream,
            table.source,
            table.name,
            orjson.dumps(list(zip(table.columns, table.types, strict=True))).decode(),
            orjson.dumps(list(table.key)).decode(),
        )

    async def evolve(
        self, table: MirrorTable, columns: list[ColumnInfo]
    ) -> MirrorTable:
        """Add, drop or retype columns so the mirror matches ``columns`` (BUG-05)."""
        wanted = {c.name: c for c in columns}
        for col in columns:
            if col.enum is not None:
                await self.ensure_enum(col.enum)
        for name in [c for c in table.columns if c not in wanted]:
            await self.conn.execute(
                f"ALTER TABLE {table.qualified} DROP COLUMN IF EXISTS {quote_ident(name)}"
            )
            logger.info(
                "mirror column dropped", extra={"table": table.name, "column": name}
            )
        for col in columns:
            if col.name not in table.columns:
                default = (
                    f" DEFAULT {_literal(col.missing_value)}::{col.mirror_type}"
                    if col.missing_value is not None
                    else ""
                )
                await self.conn.execute(
                    f"ALTER TABLE {table.qualified} ADD COLUMN {quote_ident(col.name)} "
                    f"{col.mirror_type}{default}"
                )
                if default:
                    await self.conn.execute(
                        f"ALTER TABLE {table.qualified} ALTER COLUMN "
                        f"{quote_ident(col.name)} DROP DEFAULT"
                    )
                logger.info(
                    "mirror column added",
                    extra={"table": table.name, "column": col.name},
                )
            else:
                old_type = table.types[table.columns.index(col.name)]
                if old_type != col.mirror_type:
                    await self.conn.execute(
                        f"ALTER TABLE {table.qualified} ALTER COLUMN "
                        f"{quote_ident(col.name)} TYPE {col.mirror_type} USING "
                        f"{quote_ident(col.name)}::text::{col.mirror_type}"
                    )
        evolved = MirrorTable(
            table.name,
            table.source,
            [c.name for c in columns],
            [c.mirror_type for c in columns],
            table.key,
            version=table.version + 1,
            schema=self.schema,
        )
        await self.record_table(evolved)
        return evolved

    async def _staging_table(self, table: MirrorTable) -> str:
        signature = f"{table.name}:{table.version}:{len(table.columns)}"
        staging = self._staging.get(signature)
        if staging is None:
            staging = f"_stage_{len(self._staging) + 1}"
            cols = ", ".join(f"c{i} text" for i in range(len(table.columns)))
            await self.conn.execute(
                f"CREATE TEMP TABLE {staging} (op text, grp int, {cols}) "
                "ON COMMIT DELETE ROWS"
            )
            self._staging[signature] = staging
        return staging

    async def apply(self, changes: TableChanges) -> int:
        """Apply the net changes of one table; return how many keys they touched."""
        if not changes.rows:
            return 0
        table = changes.table
        touched = len(changes.rows)
        if changes.fresh:
            changes = await self._copy_fresh(changes)
            if not changes.rows:
                return touched
        staging = await self._staging_table(table)
        data, groups = render_copy(changes)
        await self.conn.copy_to_table(staging, source=_once(data), format="text")
        cast = [f"s.c{i}::{t}" for i, t in enumerate(table.types)]
        key_match = " AND ".join(
            f"t.{quote_ident(table.columns[i])} = {cast[i]}" for i in table.key_indexes
        )
        cols = ", ".join(quote_ident(c) for c in table.columns)
        pk = ", ".join(quote_ident(k) for k in table.key)
        updates = ", ".join(
            f"{quote_ident(c)} = excluded.{quote_ident(c)}"
            for c in table.columns
            if c not in table.key
        )
        conflict = f"DO UPDATE SET {updates}" if updates else "DO NOTHING"
        await self.conn.execute(
            f"DELETE FROM {table.qualified} t USING {staging} s "
            f"WHERE s.op = 'D' AND {key_match}"
        )
        await self.conn.execute(
            f"INSERT INTO {table.qualified} ({cols}) SELECT {', '.join(cast)} "
            f"FROM {staging} s WHERE s.op = 'U' ON CONFLICT ({pk}) {conflict}"
        )
        for unchanged, group in groups.items():
            sets = ", ".join(
                f"{quote_ident(c)} = {cast[i]}"
                for i, c in enumerate(table.columns)
                if i not in unchanged and c not in table.key
            )
            if sets:
                await self.conn.execute(
                    f"UPDATE {table.qualified} t SET {sets} FROM {staging} s "
                    f"WHERE s.op = 'P' AND s.grp = {group} AND {key_match}"
                )
        await self.conn.execute(f"TRUNCATE {staging}")
        return touched

    async def _copy_fresh(self, changes: TableChanges) -> TableChanges:
        """COPY rows new to the replica straight into the mirror; return the rest.

        Saves the staging round trip and the ON CONFLICT probe for most inserts.
        A savepoint keeps a wrong guess cheap: if a key was there after all,
        every change goes through the merge instead.
        """
        table, fresh = changes.table, changes.fresh
        direct: list[tuple[Value, ...]] = []
        rest: dict[tuple[Value, ...], tuple[str, tuple[Value, ...]]] = {}
        for key, row in changes.rows.items():
            if row[0] is OP_UPSERT and key in fresh:
                direct.append(row[1])
            else:
                rest[key] = row
        if not direct:
            return changes
        await self.conn.execute("SAVEPOINT replicator_fresh_rows")
        try:
            await self.conn.copy_to_table(
                table.name,
                schema_name=table.schema,
                columns=table.columns,
                source=_once(render_rows(direct, len(table.columns))),
                format="text",
            )
        except asyncpg.UniqueViolationError:
            await self.conn.execute("ROLLBACK TO SAVEPOINT replicator_fresh_rows")
            logger.warning(
                "inserted rows already in the mirror, merging them",
                extra={"table": table.name},
            )
            return TableChanges(table, changes.rows)
        await self.conn.execute("RELEASE SAVEPOINT replicator_fresh_rows")
        return TableChanges(table, rest)

    async def truncate(self, table: MirrorTable) -> None:
        # DELETE, not TRUNCATE: BI readers keep reading the old rows until commit.
        await self.conn.execute(f"DELETE FROM {table.qualified}")


async def _once(data: bytes):  # type: ignore[no-untyped-def]
    yield data


def _literal(text: str | None) -> str:
    if text is None:
        return "NULL"
    return "'" + text.replace("'", "''") + "'"
