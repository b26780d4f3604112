"""The static DDL in schema/ matches the SQLAlchemy metadata it is generated from."""

from __future__ import annotations

from pathlib import Path

from replicator.store.tables import render_sql

SCHEMA_SQL = Path(__file__).resolve().parents[1] / "schema" / "replicator.sql"


def test_schema_sql_is_generated_from_the_metadata() -> None:
    assert SCHEMA_SQL.read_text() == render_sql(), (
        "schema/replicator.sql is stale: python -m replicator.store.tables > schema/replicator.sql"
    )
