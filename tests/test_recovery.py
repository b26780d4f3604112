"""Recovery after outages, each against the daemon as a real process, real PostgreSQL
and the emulator: a daemon outage, a replica restored from a backup, a lost ERP slot.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from replicator.config import Settings, parse
from replicator.emulator.app import EmulatorConfig
from replicator.pgserver import TempPostgres, find_bindir
from replicator.verify import verify_erp, verify_sf
from tests.fixtures.emulator import Served, ServeEmulator
from tests.fixtures.erp_daemon import Daemon, fetchval
from tests.fixtures.pg import ErpCase

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

OBJECTS = ["Account", "Contact"]

ERP_SCHEMA = """
CREATE TABLE customer (id int PRIMARY KEY, name text NOT NULL, city text);
CREATE TABLE invoice (id bigserial PRIMARY KEY, customer_id int NOT NULL,
                      amount numeric(12, 2) NOT NULL, memo text);
INSERT INTO customer SELECT g, 'customer ' || g, 'Berlin' FROM generate_series(1, 40) g;
INSERT INTO invoice (customer_id, amount, memo)
  SELECT 1 + g % 40, g % 97, 'seed ' || g FROM generate_series(1, 500) g;
"""


@pytest.fixture(autouse=True)
def _sf_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    config = EmulatorConfig()
    monkeypatch.setenv("REPLICATOR_TEST_SF_SECRET", config.client_secret)
    monkeypatch.setenv(
        "REPLICATOR_TEST_SF_PASSWORD", config.password + config.security_token
    )


def settings_for(
    case: ErpCase, served: Served | None, *, erp_dsn: str | None = None
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "replica": {"dsn": case.replica_dsn},
        "erp": {
            "database": {"dsn": erp_dsn or case.erp_dsn},
            "slot": case.slot,
            "publication": case.publication,
            "heartbeat_seconds": 0.2,
            "status_interval_seconds": 0.5,
        },
        "ops": {"listen": ""},  # tests run side by side: no fixed port
    }
    if served is not None:
        data["salesforce"] = {
            "login_url": served.url,
            "client_id": served.config.client_id,
            "client_secret_env": "REPLICATOR_TEST_SF_SECRET",
            "username": served.config.username,
            "password_env": "REPLICATOR_TEST_SF_PASSWORD",
            "objects": OBJECTS,
            "long_poll_timeout_seconds": 2,
            "skew_seconds": 5,
        }
    return data


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` (two levels of tables at most) as TOML."""
    lines: list[str] = []

    def table(prefix: str, values: dict[str, Any]) -> None:
        lines.append(f"[{prefix}]")
        nested = {k: v for k, v in values.items() if isinstance(v, dict)}
        for key, value in values.items():
            if not isinstance(value, dict):
                lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
        for key, value in nested.items():
            table(f"{prefix}.{key}", value)

    for name, values in data.items():
        table(name, values)
    path.write_text("\n".join(lines))
    return path


async def run_daemon(daemon: Daemon, timeout: float = 90) -> None:
    """One ``replicator run --until-caught-up``; it must exit 0."""
    daemon.start(until_caught_up=True)
    code = await daemon.wait(timeout)
    assert code == 0, daemon.stderr() + daemon.output()


async def assert_verified(settings: Settings, *, salesforce: bool = True) -> None:
    reports = await verify_erp(settings)
    if salesforce:
        reports += await verify_sf(settings)
    bad = [(r.table, r.missing, r.extra, r.different) for r in reports if not r.ok]
    assert reports and bad == []


async def change_erp(dsn: str, round_no: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO invoice (customer_id, amount, memo) "
            "SELECT 1 + g % 40, g, $1 FROM generate_series(1, 50) g",
            f"round {round_no}",
        )
        await conn.execute(
            "UPDATE customer SET city = $1 WHERE id % 3 = 0", f"City {round_no}"
        )
        await conn.execute("DELETE FROM invoice WHERE id % 17 = $1", round_no % 17)
    finally:
        await conn.close()


async def change_org(served: Served, round_no: int) -> None:
    import aiohttp

    token = await served.token()
    base = f"{served.url}/services/data/v60.0/sobjects"
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(
            f"{base}/Account", json={"Name": f"Round {round_no}"}
        ) as resp:
            account = (await resp.json())["id"]
        async with http.patch(f"{base}/Account/{account}", json={"Industry": "Energy"}):
            pass
        async with http.post(
            f"{base}/Contact",
            json={"LastName": f"Round {round_no}", "AccountId": account},
        ):
            pass


async def stored_position(replica_dsn: str, stream: str) -> str | None:
    conn = await asyncpg.connect(replica_dsn)
    try:
        position = await conn.fetchval(
            "SELECT position FROM replicator.checkpoints WHERE stream = $1", stream
        )
    finally:
        await conn.close()
    return None if position is None else str(position)


async def history_reasons(replica_dsn: str, stream: str = "erp") -> list[str]:
    conn = await asyncpg.connect(replica_dsn)
    try:
        rows = await conn.fetch(
            "SELECT reason FROM replicator.checkpoint_history "
            "WHERE stream = $1 ORDER BY id",
            stream,
        )
    finally:
        await conn.close()
    return [r[0] for r in rows]


def logged(daemon: Daemon, run: int, event: str) -> list[dict[str, Any]]:
    return [r for r in daemon.records(run) if r.get("event") == event]


@pytest.fixture
async def erp_seeded(erp_case: ErpCase) -> AsyncIterator[ErpCase]:
    conn = await asyncpg.connect(erp_case.erp_dsn)
    await conn.execute(ERP_SCHEMA)
    await conn.close()
    yield erp_case


async def test_daemon_down_while_both_sides_change_catches_up_on_restart(
    erp_seeded: ErpCase,
    emulator: Served,
    tmp_path: Path,
) -> None:
    """Changes made on the ERP and in the org while no daemon runs are all applied on
    restart, from the stored LSN and replay ids: no resync, nothing lost."""
    data = settings_for(erp_seeded, emulator)
    daemon = Daemon(write_toml(tmp_path / "replicator.toml", data), tmp_path)
    await run_daemon(daemon)

    for round_no in (1, 2):
        await change_erp(erp_seeded.erp_dsn, round_no)
        await change_org(emulator, round_no)
    await run_daemon(daemon)

    await assert_verified(parse(data))
    assert "resync" not in await history_reasons(erp_seeded.replica_dsn)
    assert logged(daemon, 2, "resuming from checkpoint")
    daemon.close()


def pg_tool(name: str, *args: str) -> None:
    subprocess.run(
        [str(find_bindir() / name), *args], check=True, capture_output=True, timeout=60
    )


async def test_replica_restored_from_backup_resyncs_released_erp_tables(
    erp_seeded: ErpCase,
    emulator: Served,
    tmp_path: Path,
) -> None:
    """A replica restored from a dump taken before the slot moved on: the ERP tables are
    reloaded from a new slot (the slot released what the dump lacks), Salesforce
    replays from the restored replay ids, and verify is clean afterwards."""
    data = settings_for(erp_seeded, emulator)
    daemon = Daemon(write_toml(tmp_path / "replicator.toml", data), tmp_path)
    await run_daemon(daemon)
    dump = tmp_path / "replica.dump"
    pg_tool("pg_dump", "-Fc", "-f", str(dump), erp_seeded.replica_dsn)
    await change_erp(erp_seeded.erp_dsn, 1)
    await change_org(emulator, 1)
    await run_daemon(daemon)  # the slot now confirms past the dump's checkpoint
    await change_erp(erp_seeded.erp_dsn, 2)
    await change_org(emulator, 2)

    database = erp_seeded.replica_dsn.rpartition("/")[2]
    admin = await asyncpg.connect(erp_seeded.server.admin_dsn)
    await admin.execute(f"DROP DATABASE {database} WITH (FORCE)")
    await admin.execute(f"CREATE DATABASE {database}")
    await admin.close()
    pg_tool("pg_restore", "-d", erp_seeded.replica_dsn, str(dump))
    await run_daemon(daemon)

    await assert_verified(parse(data))
    resyncs = logged(daemon, 3, "resyncing every erp table from a new slot")
    assert len(resyncs) == 1 and "restored" in resyncs[0]["reason"]
    assert (await history_reasons(erp_seeded.replica_dsn))[-1:] == ["resync"]
    assert logged(daemon, 2, "resuming from checkpoint")  # no resync without a restore
    daemon.close()


async def test_dropped_slot_is_detected_recreated_and_tables_resynced(
    erp_seeded: ErpCase,
    tmp_path: Path,
) -> None:
    data = settings_for(erp_seeded, None)
    daemon = Daemon(write_toml(tmp_path / "replicator.toml", data), tmp_path)
    await run_daemon(daemon)
    await fetchval(
        erp_seeded.erp_dsn, "SELECT pg_drop_replication_slot($1)", erp_seeded.slot
    )
    await change_erp(erp_seeded.erp_dsn, 1)

    await run_daemon(daemon)
    await change_erp(erp_seeded.erp_dsn, 2)
    await run_daemon(daemon)

    await assert_verified(parse(data), salesforce=False)
    resyncs = logged(daemon, 2, "resyncing every erp table from a new slot")
    assert len(resyncs) == 1 and "missing" in resyncs[0]["reason"]
    assert await history_reasons(erp_seeded.replica_dsn) == [
        "snapshot",
        "resync",
        "apply",
    ]
    assert (
        await fetchval(
            erp_seeded.erp_dsn,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            erp_seeded.slot,
        )
        == 1
    )
    daemon.close()


async def test_slot_invalidated_by_max_slot_wal_keep_size_is_resynced(
    erp_case: ErpCase,
    tmp_path: Path,
) -> None:
    """An ERP whose slot lost its WAL (wal_status 'lost') while the daemon was down."""
    server = TempPostgres(
        settings={"max_slot_wal_keep_size": "1MB", "wal_keep_size": "0"}
    ).start()
    try:
        erp_dsn = server.dsn("postgres")
        conn = await asyncpg.connect(erp_dsn)
        await conn.execute(
            ERP_SCHEMA + "CREATE TABLE filler (id bigserial PRIMARY KEY, b text);"
        )
        data = settings_for(erp_case, None, erp_dsn=erp_dsn)
        daemon = Daemon(write_toml(tmp_path / "replicator.toml", data), tmp_path)
        await run_daemon(daemon)
        await change_erp(erp_dsn, 1)
        for _ in range(12):  # WAL past the keep size, then a checkpoint invalidates
            await conn.execute(
                "INSERT INTO filler (b) SELECT repeat('x', 1000) "
                "FROM generate_series(1, 2000)"
            )
            await conn.execute("SELECT pg_switch_wal()")
            await conn.execute("CHECKPOINT")
            status = await conn.fetchval(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = $1",
                erp_case.slot,
            )
            if status == "lost":
                break
        await conn.close()
        assert status == "lost"

        await run_daemon(daemon)

        await assert_verified(parse(data), salesforce=False)
        resyncs = logged(daemon, 2, "resyncing every erp table from a new slot")
        assert len(resyncs) == 1 and "lost" in resyncs[0]["reason"]
        daemon.close()
    finally:
        server.stop()


CHANNEL = "sf:/data/AccountChangeEvent"


async def test_daemon_down_longer_than_the_replay_window_catches_up_by_itself(
    erp_seeded: ErpCase,
    serve_emulator: ServeEmulator,
    tmp_path: Path,
) -> None:
    """The stored replay ids fell out of the org's retention while the daemon was
    down: on restart the objects are caught up over REST and the stream goes on,
    with no manual step; the catch-up is in the checkpoint history."""
    config = EmulatorConfig.ebikes(
        long_poll_timeout_seconds=2.0, replay_retention_seconds=1.5
    )
    async with serve_emulator(config) as served:
        data = settings_for(erp_seeded, served)
        daemon = Daemon(write_toml(tmp_path / "replicator.toml", data), tmp_path)
        await run_daemon(daemon)  # initial load: no replay id stored yet
        await change_org(served, 1)
        await asyncio.sleep(2.5)  # the outage outlasts the retention window
        await run_daemon(daemon)
        after_load = await history_reasons(erp_seeded.replica_dsn, CHANNEL)
        await change_org(served, 2)
        await run_daemon(daemon)  # round 2 applied: a replay id is stored
        for extra in range(4):
            # A run that catches up over REST first skips the events it then
            # receives; another change and run store a replay id for sure.
            if await stored_position(erp_seeded.replica_dsn, CHANNEL) != "-2":
                break
            await change_org(served, 20 + extra)
            await run_daemon(daemon)
        assert await stored_position(erp_seeded.replica_dsn, CHANNEL) != "-2"
        await change_org(served, 3)
        await asyncio.sleep(2.5)  # that replay id falls out of the window
        await run_daemon(daemon)

        await assert_verified(parse(data))
        reasons = await history_reasons(erp_seeded.replica_dsn, CHANNEL)
        daemon.close()

    assert "no event since the initial load" in after_load
    assert "replay id outside retention window" in reasons[len(after_load) :]
