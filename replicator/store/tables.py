"""SQLAlchemy Core metadata of the ``replicator`` schema, and its creation.

Mirror tables (``erp.*``, ``sf.*``) are not declared here: their columns come
from the sources' catalogs at run time (see ``store.mirror``).
"""

from __future__ import annotations

import asyncpg
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.schema import CreateIndex, CreateTable

SCHEMA = "replicator"
MIRROR_SCHEMAS = ("erp", "sf", "unified")
metadata = MetaData(schema=SCHEMA)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("stream", Text, primary_key=True),
    Column("position", Text, nullable=False),  # LSN as 16/B374D848 or a replay id
    Column("lsn", BigInteger),  # the same LSN as a number, for comparisons
    Column("system_identifier", Text),
    Column("timeline", Integer),
    Column("slot_name", Text),
    Column("details", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column(
        "updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()
    ),
)

checkpoint_history = Table(
    "checkpoint_history",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("stream", Text, nullable=False, index=True),
    Column("position", Text, nullable=False),
    Column("lsn", BigInteger),
    Column("system_identifier", Text),
    Column("timeline", Integer),
    Column("slot_name", Text),
    Column("reason", Text, nullable=False),  # apply, snapshot, restore, resync, ...
    Column("changes", BigInteger, nullable=False, server_default=text("0")),
    Column(
        "recorded_at",
        DateTime(timezone=True),
        nullable=False,
        server_default=func.now(),
    ),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("stream", Text, nullable=False),
    Column("entity", Text, nullable=False),
    Column("source_key", Text),
    Column("position", Text),
    Column("reason", Text, nullable=False),
    Column("payload", JSONB),
    Column("status", Text, nullable=False, server_default=text("'parked'")),
    Column(
        "created_at", DateTime(timezone=True), nullable=False, server_default=func.now()
    ),
)

tables_state = Table(
    "mirror_tables",
    metadata,
    Column("stream", Text, primary_key=True),
    Column("source_table", Text, primary_key=True),  # schema.table at the source
    Column("mirror_table", Text, nullable=False),
    Column("columns", JSONB, nullable=False),  # [[name, type], ...] as mirrored
    Column("key_columns", JSONB, nullable=False),
    Column("loaded_at", DateTime(timezone=True)),
    Column(
        "updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()
    ),
)


# Field conflicts of the two-way sync: both values, where each came from and
# when, and the rule that decided. Empty until the write-back sinks land.
conflicts = Table(
    "conflicts",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("entity", Text, nullable=False),
    Column("entity_key", Text, nullable=False),
    Column("field", Text, nullable=False),
    Column("kept_value", Text),
    Column("kept_source", Text),
    Column("kept_time", DateTime(timezone=True)),
    Column("discarded_value", Text),
    Column("discarded_source", Text),
    Column("discarded_time", DateTime(timezone=True)),
    Column("rule", Text, nullable=False),  # owner, lww, deleted
    Column(
        "recorded_at",
        DateTime(timezone=True),
        nullable=False,
        server_default=func.now(),
    ),
)

# Write-backs decided by resolution, drained by the sink workers.
outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("entity", Text, nullable=False),
    Column("target", Text, nullable=False),  # erp, salesforce
    Column(
        "target_key", Text, nullable=False
    ),  # ERP key text or Salesforce Id / external id
    Column("operation", Text, nullable=False),  # upsert, delete
    Column(
        "fields", JSONB, nullable=False
    ),  # target field names -> target-domain values
    Column("cause", JSONB),  # the source change and rule that caused it
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Column("answer", JSONB),
    Column("echoed", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column(
        "created_at", DateTime(timezone=True), nullable=False, server_default=func.now()
    ),
    Column("done_at", DateTime(timezone=True)),
    Index("ix_outbox_pending", "status", "target", "id"),
    Index("ix_outbox_key", "entity", "target", "target_key"),
    # the writes of one unified row, looked up for each change (echoes)
    Index("ix_outbox_unified", "entity", "target", text("(cause ->> 'unified_id')")),
)

# Echoes of outbox writes that came back, by field. Kept apart from the
# outbox rows so that recording one never waits for a sink worker holding
# the row (no foreign key either: its check would lock the row).
outbox_echoes = Table(
    "outbox_echoes",
    metadata,
    Column("outbox_id", BigInteger, primary_key=True),
    Column("field", Text, primary_key=True),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Records the sinks created, by their new key: stored in the transaction that
# marks the write done (an insert, so the sink never waits for an applier
# holding the unified row), then folded into the unified row's sf_id or
# erp_key one row at a time. Readers of links look here too until then.
created_links = Table(
    "created_links",
    metadata,
    Column("entity", Text, primary_key=True),
    Column("target", Text, primary_key=True),  # erp, salesforce
    Column("key", Text, primary_key=True),
    Column("unified_id", Text, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)

# Mapped entities whose existing records have been linked across the two
# systems (the initial pass at switch-on); resolution of live changes starts
# for an entity once its row is here.
sync_entities = Table(
    "sync_entities",
    metadata,
    Column("entity", Text, primary_key=True),
    Column("linked_at", DateTime(timezone=True), nullable=False),
    Column("details", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
)

# Duplicate candidates waiting for an operator (``replicator matches``): a
# record with no link that matched several records of the other side. In the
# unified schema so BI tools read it; ``held`` lists the records ("erp:KEY",
# "salesforce:ID") that nothing is created for while the row is open.
match_review = Table(
    "match_review",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("entity", Text, nullable=False),
    Column("side", Text, nullable=False),  # erp, salesforce: where the record is
    Column("record_key", Text, nullable=False),
    Column("record", JSONB, nullable=False),  # its unified-domain values
    Column("candidates", JSONB, nullable=False),  # [{side, key, unified_id, fields}]
    Column("rule", Integer),  # index of the match rule that found them
    Column("held", postgresql.ARRAY(Text), nullable=False),
    Column("status", Text, nullable=False, server_default=text("'open'")),
    Column("chosen", Text),  # the candidate key linked, or NULL
    Column("decided_by", Text),
    Column(
        "created_at", DateTime(timezone=True), nullable=False, server_default=func.now()
    ),
    Column("decided_at", DateTime(timezone=True)),
    Index("ix_match_review_open", "entity", "status"),
    schema="unified",
)

# What was done to the systems and by whom: write-backs with the target's
# answer, operator commands. Checkpoint moves and resyncs are in
# checkpoint_history; all are pruned after [ops] audit_retention_days.
audit = Table(
    "audit",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("kind", Text, nullable=False),  # write_back, operator
    Column("subject", Text),  # entity/key, or the command
    Column("detail", JSONB, nullable=False),
    Index("ix_audit_at", "at"),
)

# Which database the checkpoints were written in. A replica restored from a
# dump (new table oids) or from a physical backup (a new timeline) no longer
# matches the row restored with it: the ERP pipeline then knows that a slot
# ahead of the checkpoint has released changes the replica lacks.
replica_identity = Table(
    "replica_identity",
    metadata,
    Column("id", Integer, primary_key=True, server_default=text("1")),
    Column("checkpoints_oid", BigInteger, nullable=False),
    Column("system_identifier", Text, nullable=False),
    Column("timeline", Integer, nullable=False),
    Column(
        "recorded_at",
        DateTime(timezone=True),
        nullable=False,
        server_default=func.now(),
    ),
)


def ddl_statements() -> list[str]:
    """Return the DDL that creates the ``replicator`` schema, idempotently."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    out = [f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}"]
    out += [f"CREATE SCHEMA IF NOT EXISTS {name}" for name in MIRROR_SCHEMAS]
    for table in metadata.sorted_tables:
        out.append(str(CreateTable(table, if_not_exists=True).compile(dialect=dialect)))
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            out.append(
                str(CreateIndex(index, if_not_exists=True).compile(dialect=dialect))
            )
    return out


def _relations() -> list[str]:
    """Every table and index the DDL creates, schema-qualified."""
    names = []
    for table in metadata.sorted_tables:
        names.append(f"{table.schema}.{table.name}")
        names += [f"{table.schema}.{index.name}" for index in table.indexes]
    return names


async def create_schema(conn: asyncpg.Connection) -> None:
    """Create the replicator's schemas and tables if missing (serialised by a lock).

    When they all exist nothing runs: even ``CREATE INDEX IF NOT EXISTS``
    locks its table, which would wait for (and deadlock with) the sessions
    writing it while a pipeline restarts.
    """
    missing = await conn.fetchval(
        "SELECT count(*) FROM unnest($1::text[]) AS n WHERE to_regclass(n) IS NULL",
        _relations(),
    )
    if missing == 0:
        return
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('replicator.schema'))"
        )
        for statement in ddl_statements():
            await conn.execute(statement)


def render_sql() -> str:
    """The static DDL as shipped in ``schema/replicator.sql``."""
    head = (
        "-- The replicator schema of the replica store, generated from "
        "replicator/store/tables.py\n-- (python -m replicator.store.tables > "
        "schema/replicator.sql); a test keeps them equal.\n"
    )
    return head + ";\n".join(s.strip() for s in ddl_statements()) + ";\n"


if __name__ == "__main__":
    print(render_sql(), end="")
