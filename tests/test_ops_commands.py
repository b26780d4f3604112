"""The operators' commands as real processes: checkpoints, resync, dlq, conflicts, check,
bi-role; and hostile source identifiers replicated end to end without harm."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from replicator.emulator.app import EmulatorConfig
from replicator.store.mirror import quote_ident
from tests.fixtures.emulator import Served, ServeEmulator
from tests.fixtures.erp_daemon import REPO, fetchval, running_pipeline
from tests.fixtures.pg import ErpCase, assert_mirrored, replicate, table_text
from tests.test_recovery import ERP_SCHEMA, settings_for, write_toml

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


@pytest.fixture(autouse=True)
def _sf_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    config = EmulatorConfig()
    monkeypatch.setenv("REPLICATOR_TEST_SF_SECRET", config.client_secret)
    monkeypatch.setenv(
        "REPLICATOR_TEST_SF_PASSWORD", config.password + config.security_token
    )


async def cli(*args: str, stdin: bytes = b"") -> tuple[int, str]:
    """Run ``python -m replicator ARGS``; return its exit code and its stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "replicator",
        "--log-format",
        "json",
        *args,
        cwd=REPO,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        out, _ = await proc.communicate(stdin)
    return int(proc.returncode or 0), out.decode()


async def seeded(case: ErpCase) -> None:
    conn = await asyncpg.connect(case.erp_dsn)
    await conn.execute(ERP_SCHEMA)
    await conn.close()


async def test_checkpoint_restore_asks_and_refuses_what_the_erp_slot_released(
    erp_case: ErpCase,
    tmp_path: Path,
) -> None:
    """Without --yes and no answer nothing changes; an ERP position below the slot is
    refused naming resync; a Salesforce replay id is written with a 'restore' row."""
    await seeded(erp_case)
    await replicate(erp_case)
    config = str(write_toml(tmp_path / "r.toml", settings_for(erp_case, None)))
    snapshot_id = await fetchval(
        erp_case.replica_dsn,
        "SELECT min(id) FROM replicator.checkpoint_history WHERE stream = 'erp'",
    )
    conn = await asyncpg.connect(erp_case.replica_dsn)
    await conn.execute(
        "INSERT INTO replicator.checkpoint_history (stream, position, lsn, "
        "reason) VALUES ('sf:/data/AccountChangeEvent', '7', 7, 'apply')"
    )
    sf_id = await conn.fetchval("SELECT max(id) FROM replicator.checkpoint_history")
    await conn.close()
    await asyncio.sleep(0.6)  # the slot confirms past the snapshot position meanwhile
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute("UPDATE customer SET city = 'Rome' WHERE id = 1")
    await erp.close()
    await replicate(erp_case)

    listed = await cli("checkpoints", "--config", config, "list")
    history = await cli("checkpoints", "--config", config, "history", "erp")
    unanswered = await cli(
        "checkpoints",
        "--config",
        config,
        "restore",
        "sf:/data/AccountChangeEvent",
        "--to",
        str(sf_id),
    )
    erp_refused = await cli(
        "checkpoints",
        "--config",
        config,
        "restore",
        "erp",
        "--to",
        str(snapshot_id),
        "--yes",
    )
    sf_restored = await cli(
        "checkpoints",
        "--config",
        config,
        "restore",
        "sf:/data/AccountChangeEvent",
        "--to",
        str(sf_id),
        "--yes",
    )

    assert listed[0] == 0 and "erp" in listed[1]
    assert history[0] == 0 and "snapshot" in history[1]
    assert unanswered[0] == 1 and "nothing changed" in unanswered[1]
    assert erp_refused[0] == 1 and "cannot be replayed" in erp_refused[1]
    assert "replicator resync" in erp_refused[1]
    assert sf_restored[0] == 0, sf_restored[1]
    assert (
        await fetchval(
            erp_case.replica_dsn,
            "SELECT position FROM replicator.checkpoints "
            "WHERE stream = 'sf:/data/AccountChangeEvent'",
        )
        == "7"
    )
    assert (
        await fetchval(
            erp_case.replica_dsn,
            "SELECT reason FROM replicator.checkpoint_history ORDER BY id DESC LIMIT 1",
        )
        == "restore"
    )


async def test_resync_reloads_one_erp_table_then_the_stream_replays_over_it(
    erp_case: ErpCase,
    tmp_path: Path,
) -> None:
    """A damaged mirror is reloaded from a fresh snapshot; changes since the checkpoint
    replay over it on the next run and converge."""
    await seeded(erp_case)
    await replicate(erp_case)
    replica = await asyncpg.connect(erp_case.replica_dsn)
    await replica.execute(
        "DELETE FROM erp.invoice WHERE id % 2 = 0; "
        "UPDATE erp.customer SET name = 'damaged'"
    )
    await replica.close()
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(
        "DELETE FROM invoice WHERE id < 20; UPDATE invoice SET memo = 'new' "
        "WHERE id < 40; TRUNCATE customer; INSERT INTO customer VALUES (1, 'a')"
    )
    await erp.close()
    config = str(write_toml(tmp_path / "r.toml", settings_for(erp_case, None)))

    invoice = await cli("resync", "invoice", "--config", config)
    customer = await cli("resync", "public.customer", "--config", config)
    await replicate(erp_case)

    assert invoice[0] == 0 and "rows loaded" in invoice[1], invoice[1]
    assert customer[0] == 0, customer[1]
    await assert_mirrored(erp_case, "invoice")
    await assert_mirrored(erp_case, "customer")
    assert (
        await fetchval(
            erp_case.replica_dsn,
            "SELECT count(*) FROM "
            "replicator.checkpoint_history WHERE reason = 'resync'",
        )
        == 2
    )


async def test_resync_while_the_stream_runs_and_the_erp_keeps_writing_converges(
    erp_case: ErpCase, tmp_path: Path
) -> None:
    """The mirror is reloaded under the running stream; writes before, during and
    after the copy all end up in it, none twice, none lost."""
    await seeded(erp_case)
    await replicate(erp_case)
    config = str(write_toml(tmp_path / "r.toml", settings_for(erp_case, None)))
    erp = await asyncpg.connect(erp_case.erp_dsn)
    stop_writing = asyncio.Event()

    async def keep_writing() -> None:
        n = 0
        while not stop_writing.is_set():
            n += 1
            async with erp.transaction():
                await erp.execute(
                    "INSERT INTO invoice (customer_id, amount, memo) VALUES (1, $1, 'live')",
                    n % 50,
                )
                await erp.execute(
                    "UPDATE invoice SET amount = amount + 1 WHERE id = $1", 1 + n % 400
                )
                await erp.execute("DELETE FROM invoice WHERE id = $1", 450 + n)
            await asyncio.sleep(0.01)

    async with running_pipeline(erp_case) as pipeline:
        await asyncio.wait_for(pipeline.ready.wait(), 30)
        writer = asyncio.create_task(keep_writing())
        await asyncio.sleep(0.5)
        code, out = await cli("resync", "invoice", "--config", config)
        await asyncio.sleep(0.5)
        stop_writing.set()
        await writer
        await erp.execute("SELECT pg_logical_emit_message(false, 'test', '')")
        await asyncio.sleep(2)

    await replicate(erp_case)
    await erp.close()
    assert code == 0, out
    assert "rows loaded" in out
    await assert_mirrored(erp_case, "invoice")
    await assert_mirrored(erp_case, "customer")


async def test_dlq_retry_rereads_records_and_drop_keeps_an_audit_row(
    erp_case: ErpCase,
    emulator: Served,
    tmp_path: Path,
) -> None:
    import aiohttp

    await seeded(erp_case)
    data = settings_for(erp_case, emulator)
    config = str(write_toml(tmp_path / "r.toml", data))
    loaded = await cli("resync", "Account", "--config", config)
    assert loaded[0] == 0, loaded[1]
    token = await emulator.token()
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http,
        http.post(
            f"{emulator.url}/services/data/v60.0/sobjects/Account",
            json={"Name": "Parked Co"},
        ) as resp,
    ):
        record = (await resp.json())["id"]
    replica = await asyncpg.connect(erp_case.replica_dsn)
    keyed = await replica.fetchval(
        "INSERT INTO replicator.dead_letters (stream, entity, source_key, reason) VALUES "
        "('sf:/data/AccountChangeEvent', 'Account', $1, 'test') RETURNING id",
        record,
    )
    keyless = await replica.fetchval(
        "INSERT INTO replicator.dead_letters (stream, entity, reason) VALUES "
        "('sf:/data/AccountChangeEvent', '?', 'malformed') RETURNING id"
    )
    await replica.close()

    listed = await cli("dlq", "--config", config, "list")
    retried = await cli("dlq", "--config", config, "retry", "--all")
    dropped = await cli("dlq", "--config", config, "drop", str(keyless))
    conflicts = await cli("conflicts", "--config", config, "list")

    assert listed[0] == 0 and "malformed" in listed[1] and record in listed[1]
    assert retried[0] == 1 and "cannot retry" in retried[1], retried[1]
    assert dropped[0] == 0
    assert conflicts == (0, conflicts[1]) and "(none)" in conflicts[1]
    assert (
        await fetchval(
            erp_case.replica_dsn, "SELECT name FROM sf.account WHERE id = $1", record
        )
        == "Parked Co"
    )
    statuses = await fetchval(
        erp_case.replica_dsn,
        "SELECT array_agg(status ORDER BY id) "
        "FROM replicator.dead_letters WHERE id = ANY($1::bigint[])",
        [keyed, keyless],
    )
    assert statuses == ["retried", "dropped"]
    audited = await fetchval(
        erp_case.replica_dsn,
        "SELECT array_agg(detail->>'action' ORDER BY id) FROM replicator.audit "
        "WHERE kind = 'operator' AND subject = 'dlq'",
    )
    assert audited == ["retry", "drop"]  # list changes nothing: not audited


async def test_check_passes_on_a_good_setup_and_names_each_fix(
    erp_case: ErpCase,
    serve_emulator: ServeEmulator,
    tmp_path: Path,
) -> None:
    await seeded(erp_case)
    config_emu = EmulatorConfig.ebikes(
        long_poll_timeout_seconds=2.0, cdc_enabled_objects=frozenset({"Account"})
    )
    async with serve_emulator(config_emu) as served:
        data = settings_for(erp_case, served)
        good = dict(data, salesforce=dict(data["salesforce"], objects=["Account"]))
        passing = await cli(
            "check", "--config", str(write_toml(tmp_path / "a.toml", good))
        )
        erp = await asyncpg.connect(erp_case.erp_dsn)
        await erp.execute("CREATE TABLE keyless (a int)")
        await erp.close()
        failing = await cli(
            "check", "--config", str(write_toml(tmp_path / "b.toml", data))
        )

    assert passing[0] == 0, passing[1]
    for item in (
        "ERP wal_level",
        "ERP replication privilege",
        "ERP slot",
        "replica schema replicator",
        "Salesforce login",
        "Salesforce CDC for Account",
        "Salesforce API limits",
    ):
        assert f"PASS  {item}" in passing[1]
    assert failing[0] == 1
    assert "FAIL  ERP tables have a key: public.keyless" in failing[1]
    assert "FAIL  Salesforce CDC for Contact" in failing[1]
    assert "Change Data Capture" in failing[1]


HOSTILE_TABLE = '"; DROP TABLE victim; --'
HOSTILE_COLUMNS = ['a"b', "semi;colon", "with space", '"; DROP TABLE victim; --']


async def test_hostile_identifiers_replicate_end_to_end_without_harm(
    erp_case: ErpCase,
    tmp_path: Path,
) -> None:
    """Table and column names with quotes, semicolons and spaces are mirrored, changed,
    resynced and verified, and nothing else in either database is touched."""
    table = quote_ident(HOSTILE_TABLE)
    columns = ", ".join(f"{quote_ident(c)} text" for c in HOSTILE_COLUMNS)
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(
        f"CREATE TABLE victim (id int PRIMARY KEY); INSERT INTO victim VALUES (1);"
        f"CREATE TABLE {table} (id int PRIMARY KEY, {columns})"
    )
    await erp.execute(
        f"INSERT INTO {table} SELECT g, 'x''; DROP TABLE victim; --', "
        f"'b', 'c', 'd' FROM generate_series(1, 20) g"
    )
    replica = await asyncpg.connect(erp_case.replica_dsn)
    await replica.execute("CREATE TABLE victim (id int)")
    await replica.close()
    await replicate(erp_case)
    await erp.execute(
        f"UPDATE {table} SET {quote_ident(HOSTILE_COLUMNS[1])} = 'semi' "
        f"WHERE id < 5; DELETE FROM {table} WHERE id > 15"
    )
    await replicate(erp_case)
    config = str(write_toml(tmp_path / "r.toml", settings_for(erp_case, None)))

    resynced = await cli("resync", HOSTILE_TABLE, "--config", config)
    verified = await cli("verify", "--config", config)

    assert resynced[0] == 0, resynced[1]
    assert verified[0] == 0, verified[1]
    assert await table_text(erp_case.replica_dsn, f"erp.{table}") == await table_text(
        erp_case.erp_dsn, table
    )
    assert await erp.fetchval("SELECT count(*) FROM victim") == 1
    assert (
        await fetchval(erp_case.replica_dsn, "SELECT count(*) FROM public.victim") == 0
    )
    await erp.close()


async def test_bi_role_reads_the_mirrors_and_nothing_else(
    erp_case: ErpCase,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await seeded(erp_case)
    await replicate(erp_case)
    role = "bi_" + erp_case.slot.removeprefix("slot_")
    monkeypatch.setenv("REPLICATOR_TEST_BI_PASSWORD", "s3cret'; --")
    config = str(write_toml(tmp_path / "r.toml", settings_for(erp_case, None)))

    created = await cli(
        "bi-role",
        "--config",
        config,
        "--name",
        role,
        "--password-env",
        "REPLICATOR_TEST_BI_PASSWORD",
    )
    later = await asyncpg.connect(erp_case.replica_dsn)
    await later.execute(
        "CREATE TABLE erp.created_later (id int); CREATE TABLE "
        "sf.created_later (id int)"
    )
    await later.close()
    base, _, db = erp_case.replica_dsn.rpartition("/")
    bi = await asyncpg.connect(base.replace("postgres@", f"{role}@") + "/" + db)
    try:
        customers = await bi.fetchval("SELECT count(*) FROM erp.customer")
        later_rows = await bi.fetchval("SELECT count(*) FROM erp.created_later")
        refused: list[Any] = []
        for statement in (
            "SELECT * FROM replicator.checkpoints",
            "INSERT INTO erp.customer VALUES (999, 'x', 'y')",
            "UPDATE erp.customer SET name = 'x'",
            "DELETE FROM sf.created_later",
            "CREATE TABLE erp.mine (id int)",
            "TRUNCATE erp.invoice",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await bi.execute(statement)
            refused.append(statement)
    finally:
        await bi.close()
        admin = await asyncpg.connect(erp_case.replica_dsn)
        await admin.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
        await admin.close()

    assert created[0] == 0, created[1]
    assert customers == 40 and later_rows == 0
    assert len(refused) == 6
