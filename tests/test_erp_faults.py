"""Faults around ``replicator run``: SIGKILL, server restarts, a lost replica, bad set-up.

The daemon runs as a real process (``python -m replicator run``) with a
concurrent workload on the ERP. After every fault the mirrors must equal the
ERP, with nothing lost and nothing applied twice: a replica trigger records
every write to the append-only ``ledger`` mirror, so a re-applied insert shows
up as a second write of its id.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import psycopg2
import psycopg2.extras
import pytest

from replicator.pgserver import TempPostgres
from tests.fixtures.erp_daemon import (
    Daemon,
    PausablePostgres,
    checkpoint_lsn,
    fetchval,
    lsn_at_least,
    slot_row,
    wait_caught_up,
    wait_for,
    write_config,
)
from tests.fixtures.pg import ErpCase, PgServer, assert_mirrored, replicate

pytestmark = pytest.mark.integration

ERP_SCHEMA = """
CREATE TABLE account (id int PRIMARY KEY, balance numeric(14,2) NOT NULL, note text);
CREATE TABLE ledger (id bigserial PRIMARY KEY, account_id int NOT NULL,
                     amount numeric(12,2) NOT NULL, memo text);
INSERT INTO account SELECT g, 0, 'seed' FROM generate_series(1, 50) g;
INSERT INTO ledger (account_id, amount, memo)
  SELECT 1 + g % 50, g % 97, 'seed ' || g FROM generate_series(1, {seed_rows}) g;
"""

# Every write to erp.ledger (snapshot copy included) is recorded with its id;
# the shadow table of the initial load gets the trigger when it is created.
# With ``slow`` the load's COPY also waits 2 s before its statement ends.
REPLICA_PROBES = """
CREATE TABLE public.ledger_writes (n bigserial, id bigint, op text);
CREATE FUNCTION public.record_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO public.ledger_writes (id, op) VALUES (NEW.id, TG_OP); RETURN NULL; END $$;
CREATE FUNCTION public.slow_copy() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_TABLE_NAME LIKE '\\_shadow\\_%' THEN PERFORM pg_sleep({slow}); END IF;
  RETURN NULL;
END $$;
CREATE FUNCTION public.add_probes() RETURNS event_trigger LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
    IF r.object_type = 'table' AND r.object_identity IN ('erp._shadow_ledger', 'erp.ledger')
    THEN
      EXECUTE format('CREATE TRIGGER record_write AFTER INSERT OR UPDATE ON %s '
                     'FOR EACH ROW EXECUTE FUNCTION public.record_write()', r.object_identity);
      EXECUTE format('CREATE TRIGGER slow_copy AFTER INSERT ON %s FOR EACH STATEMENT '
                     'EXECUTE FUNCTION public.slow_copy()', r.object_identity);
    END IF;
  END LOOP;
END $$;
CREATE EVENT TRIGGER add_probes ON ddl_command_end WHEN TAG IN ('CREATE TABLE')
  EXECUTE FUNCTION public.add_probes();
"""


@dataclass
class Setup:
    """One ERP database, one replica database and a daemon pointed at them."""

    case: ErpCase
    daemon: Daemon


@contextlib.asynccontextmanager
async def setup(
    case: ErpCase,
    tmp_path: Path,
    *,
    seed_rows: int = 2000,
    slow: float = 0.0,
) -> AsyncIterator[Setup]:
    erp = await asyncpg.connect(case.erp_dsn)
    await erp.execute(ERP_SCHEMA.format(seed_rows=seed_rows))
    await erp.close()
    replica = await asyncpg.connect(case.replica_dsn)
    await replica.execute(REPLICA_PROBES.format(slow=slow))
    await replica.close()
    config = write_config(
        tmp_path / "replicator.toml",
        replica_dsn=case.replica_dsn,
        erp_dsn=case.erp_dsn,
        slot=case.slot,
        publication=case.publication,
    )
    daemon = Daemon(config, tmp_path)
    try:
        yield Setup(case, daemon)
    finally:
        daemon.close()


class Workload:
    """Small ERP transactions in a loop: ledger appends and account updates."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.commits = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        rng = random.Random(7)
        conn: asyncpg.Connection | None = None
        while not self._stop.is_set():
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(self.dsn)
                async with conn.transaction():
                    account = rng.randint(1, 50)
                    await conn.execute(
                        "INSERT INTO ledger (account_id, amount, memo) SELECT $1, g, 'w' "
                        "FROM generate_series(1, 5) g",
                        account,
                    )
                    await conn.execute(
                        "UPDATE account SET balance = balance + 15, note = $2 "
                        "WHERE id = $1",
                        account,
                        f"tx {self.commits}",
                    )
                self.commits += 1
            except (
                OSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                asyncpg.InternalClientError,
            ):
                # the ERP restarts under us: reconnect; the comparison at the
                # end holds whether an in-flight commit happened or not
                if conn is not None:
                    conn.terminate()
                conn = None
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.005)
        if conn is not None:
            await conn.close()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="test:erp-workload")

    async def stop(self) -> int:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.commits


async def assert_nothing_lost_nothing_twice(case: ErpCase) -> None:
    """Mirrors equal the ERP; every ledger id was written exactly once; history is sane."""
    ledger_rows = await assert_mirrored(case, "ledger")
    await assert_mirrored(case, "account")
    replica = await asyncpg.connect(case.replica_dsn)
    try:
        twice = await replica.fetch(
            "SELECT id, array_agg(op) AS ops FROM public.ledger_writes GROUP BY id "
            "HAVING count(*) > 1 LIMIT 5"
        )
        written = await replica.fetchval(
            "SELECT count(DISTINCT id) FROM public.ledger_writes"
        )
        history = await replica.fetch(
            "SELECT reason, lsn FROM replicator.checkpoint_history ORDER BY id"
        )
    finally:
        await replica.close()
    assert [dict(r) for r in twice] == []
    assert written == ledger_rows
    assert [h["reason"] for h in history].count("snapshot") == 1
    applied = [h["lsn"] for h in history if h["reason"] == "apply"]
    assert applied == sorted(set(applied))  # strictly increasing: never re-applied


async def applied_batches(replica_dsn: str) -> int:
    try:
        return int(
            await fetchval(
                replica_dsn,
                "SELECT count(*) FROM replicator.checkpoint_history "
                "WHERE reason = 'apply'",
            )
        )
    except asyncpg.UndefinedTableError:  # the daemon has not created its schema yet
        return 0


async def new_apply_row(replica_dsn: str, after: int) -> bool:
    return await applied_batches(replica_dsn) > after


# -- (a) SIGKILL ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", ["initial_snapshot", "mid_stream", "after_commit"])
async def test_sigkill_then_restart_loses_nothing_and_applies_nothing_twice(
    erp_case: ErpCase, tmp_path: Path, kill_at: str
) -> None:
    """SIGKILL at one point of a run under load, again mid-stream after a restart,
    then ``--until-caught-up``: the mirrors equal the ERP, each ledger row once."""
    seed_rows = 30_000 if kill_at == "initial_snapshot" else 2000
    async with setup(
        erp_case,
        tmp_path,
        seed_rows=seed_rows,
        slow=2.0 if kill_at == "initial_snapshot" else 0.0,
    ) as s:
        workload = Workload(erp_case.erp_dsn)
        workload.start()
        daemon = s.daemon
        replica_dsn = erp_case.replica_dsn

        daemon.start()
        if kill_at == "initial_snapshot":
            await wait_for(
                lambda: slot_row(erp_case.erp_dsn, erp_case.slot),
                timeout=30,
                interval=0.02,
                what="the slot of the initial load",
            )
            await asyncio.sleep(0.5)
            daemon.kill()
            killed_before_snapshot = await checkpoint_lsn(replica_dsn) is None
        else:
            await wait_for(
                lambda: new_apply_row(replica_dsn, 3),
                timeout=30,
                interval=0.01,
                what="a few applied batches",
            )
            if kill_at == "mid_stream":
                await asyncio.sleep(random.uniform(0.1, 0.6))
            else:
                applied = await applied_batches(replica_dsn)
                await wait_for(
                    lambda: new_apply_row(replica_dsn, applied),
                    timeout=10,
                    interval=0.005,
                    what="the next commit",
                )
            daemon.kill()
            killed_before_snapshot = False
        daemon.start()
        await wait_for(lambda: checkpoint_lsn(replica_dsn), timeout=60, what="snapshot")
        await asyncio.sleep(1.0)
        daemon.kill()
        commits = await workload.stop()
        daemon.start(until_caught_up=True)
        exit_code = await daemon.wait(90)

    assert exit_code == 0, daemon.output()
    assert commits > 20
    assert killed_before_snapshot == (kill_at == "initial_snapshot")
    await assert_nothing_lost_nothing_twice(erp_case)


# -- (b) ERP restart ------------------------------------------------------------


@pytest.fixture(scope="module")
def erp_server() -> Iterator[PausablePostgres]:
    """An ERP server of its own, restarted by a test."""
    server = PausablePostgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def replica_server() -> Iterator[PausablePostgres]:
    """A replica server of its own, stopped and started by a test."""
    server = PausablePostgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def case_on(
    erp: TempPostgres | PgServer,
    replica: TempPostgres | PgServer,
) -> AsyncIterator[ErpCase]:
    """An ERP database and a replica database on the given servers."""
    n = uuid.uuid4().hex[:8]
    made = []
    for server, name in ((erp, f"erp_{n}"), (replica, f"replica_{n}")):
        admin_dsn = server.dsn("postgres")
        await _admin(admin_dsn, f"CREATE DATABASE {name}")
        made.append((admin_dsn, name))
    pg = PgServer(erp.dsn("postgres"), None)
    try:
        yield ErpCase(
            pg,
            erp.dsn(f"erp_{n}"),
            replica.dsn(f"replica_{n}"),
            f"slot_{n}",
            f"pub_{n}",
        )
    finally:
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            await _admin(
                erp.dsn("postgres"),
                "SELECT pg_drop_replication_slot(slot_name) "
                f"FROM pg_replication_slots WHERE slot_name = 'slot_{n}'",
            )
        for admin_dsn, name in made:
            with contextlib.suppress(OSError, asyncpg.PostgresError):
                await _admin(admin_dsn, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def _admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def retry_errors(daemon: Daemon) -> list[dict]:
    return [r for r in daemon.records() if r["level"] == "error" and "retry_in" in r]


@pytest.mark.slow
async def test_erp_restart_mid_stream_is_retried_and_resumed_without_loss(
    erp_server: PausablePostgres, pg_server: PgServer, tmp_path: Path
) -> None:
    """The ERP server restarts under load: the daemon logs the lost connection,
    retries with backoff, resumes from its checkpoint and loses nothing."""
    async with case_on(erp_server, pg_server) as case, setup(case, tmp_path) as s:
        workload = Workload(case.erp_dsn)
        workload.start()
        s.daemon.start()
        await wait_for(
            lambda: new_apply_row(case.replica_dsn, 2), timeout=30, what="streaming"
        )

        await asyncio.to_thread(erp_server.restart)
        await asyncio.sleep(2.0)
        commits = await workload.stop()
        await wait_caught_up(case.erp_dsn, case.replica_dsn, timeout=60)
        s.daemon.proc.terminate()
        exit_code = await s.daemon.wait(20)

        assert exit_code == 0
        assert commits > 20
        assert retry_errors(s.daemon)
        await assert_nothing_lost_nothing_twice(case)


# -- (c) replica unavailable ----------------------------------------------------


@pytest.mark.slow
async def test_replica_unavailable_for_a_while_holds_the_slot_then_catches_up(
    replica_server: PausablePostgres, pg_server: PgServer, tmp_path: Path
) -> None:
    """The replica is down for 4 s under load: the slot never passes the stored
    checkpoint, errors are retried with growing delays, and nothing is lost."""
    async with case_on(pg_server, replica_server) as case, setup(case, tmp_path) as s:
        workload = Workload(case.erp_dsn)
        workload.start()
        s.daemon.start()
        await wait_for(
            lambda: new_apply_row(case.replica_dsn, 2), timeout=30, what="streaming"
        )

        replica_server.pause()
        try:
            confirmed_seen = []
            for _ in range(40):
                confirmed_seen.append(
                    (await slot_row(case.erp_dsn, case.slot))["confirmed"]
                )
                await asyncio.sleep(0.1)
        finally:
            replica_server.resume()
        # read before the daemon's next attempt (its backoff is past 2 s by now)
        stored = await checkpoint_lsn(case.replica_dsn)
        await asyncio.sleep(1.0)
        commits = await workload.stop()
        await wait_caught_up(case.erp_dsn, case.replica_dsn, timeout=60)
        s.daemon.proc.terminate()
        exit_code = await s.daemon.wait(20)

        for confirmed in confirmed_seen:
            assert await lsn_at_least(case.erp_dsn, stored, confirmed)
        delays = [r["retry_in"] for r in retry_errors(s.daemon)]
        assert len(delays) >= 2
        assert delays[:3] == sorted(delays[:3])
        assert exit_code == 0
        assert commits > 20
        await assert_nothing_lost_nothing_twice(case)


# -- (d) start-up errors -------------------------------------------------------


async def run_to_exit(
    case: ErpCase, tmp_path: Path, timeout: float = 40
) -> tuple[int, str]:
    config = write_config(
        tmp_path / "replicator.toml",
        replica_dsn=case.replica_dsn,
        erp_dsn=case.erp_dsn,
        slot=case.slot,
        publication=case.publication,
    )
    daemon = Daemon(config, tmp_path)
    try:
        daemon.start()
        code = await daemon.wait(timeout)
    finally:
        daemon.close()
    return code, daemon.stderr()


def assert_one_line(stderr: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    for word in words:
        assert word.lower() in lines[0].lower(), lines[0]


@pytest.mark.slow
async def test_startup_with_wal_level_replica_exits_naming_the_fix(
    pg_server: PgServer, tmp_path: Path
) -> None:
    server = TempPostgres(settings={"wal_level": "replica"}).start()
    try:
        async with case_on(server, pg_server) as case:
            code, stderr = await run_to_exit(case, tmp_path)
    finally:
        server.stop()

    assert code != 0
    assert_one_line(stderr, "wal_level", "logical", "restart")


async def test_startup_without_replication_privilege_exits_naming_the_fix(
    erp_case: ErpCase, tmp_path: Path
) -> None:
    role = f"norepl_{uuid.uuid4().hex[:8]}"
    await _admin(erp_case.server.admin_dsn, f"CREATE ROLE {role} LOGIN")
    try:
        erp_dsn = erp_case.erp_dsn.replace("postgres@", f"{role}@")
        case = ErpCase(
            erp_case.server,
            erp_dsn,
            erp_case.replica_dsn,
            erp_case.slot,
            erp_case.publication,
        )
        code, stderr = await run_to_exit(case, tmp_path)
    finally:
        await _admin(erp_case.server.admin_dsn, f"DROP ROLE {role}")

    assert code != 0
    assert_one_line(stderr, role, "REPLICATION", "ALTER ROLE")


@pytest.mark.parametrize("identity", ["no_key", "identity_nothing", "full_without_key"])
async def test_startup_with_a_published_table_without_key_exits_naming_the_fix(
    erp_case: ErpCase, tmp_path: Path, identity: str
) -> None:
    """A table whose rows cannot be matched by key stops start-up, naming the table."""
    ddl = {
        "no_key": "CREATE TABLE event_log (at timestamptz, what text)",
        "identity_nothing": "CREATE TABLE event_log (id int PRIMARY KEY, what text);"
        "ALTER TABLE event_log REPLICA IDENTITY NOTHING",
        "full_without_key": "CREATE TABLE event_log (at timestamptz, what text);"
        "ALTER TABLE event_log REPLICA IDENTITY FULL",
    }[identity]
    await _admin(erp_case.erp_dsn, "CREATE TABLE fine (id int PRIMARY KEY);" + ddl)

    code, stderr = await run_to_exit(erp_case, tmp_path)

    assert code != 0
    assert_one_line(stderr, "event_log", "primary key")
    assert await checkpoint_lsn(erp_case.replica_dsn) is None


@pytest.mark.slow
async def test_startup_with_the_slot_held_by_another_process_exits_naming_the_fix(
    erp_case: ErpCase, tmp_path: Path
) -> None:
    await _admin(
        erp_case.erp_dsn,
        f"CREATE TABLE t (id int PRIMARY KEY);"
        f"CREATE PUBLICATION {erp_case.publication} FOR ALL TABLES",
    )
    await _admin(
        erp_case.erp_dsn,
        f"SELECT pg_create_logical_replication_slot('{erp_case.slot}', 'pgoutput')",
    )
    holder = psycopg2.connect(
        erp_case.erp_dsn,
        connection_factory=psycopg2.extras.LogicalReplicationConnection,
    )
    try:
        holder.cursor().start_replication(
            slot_name=erp_case.slot,
            decode=False,
            options={"proto_version": "1", "publication_names": erp_case.publication},
        )
        assert (await slot_row(erp_case.erp_dsn, erp_case.slot))["active"]

        code, stderr = await run_to_exit(erp_case, tmp_path, timeout=60)
    finally:
        holder.close()

    assert code != 0
    assert_one_line(stderr, erp_case.slot, "in use", "stop")


async def test_table_keyed_by_a_replica_identity_index_replicates_updates_and_deletes(
    erp_case: ErpCase, connect
) -> None:
    """A table without a primary key but with REPLICA IDENTITY USING INDEX passes
    the start-up check, so its mirror is keyed by that index: deletes carry only
    the index's columns."""
    erp = await connect(erp_case.erp_dsn)
    await erp.execute("""
        CREATE TABLE tag (code text NOT NULL, label text, weight int);
        CREATE UNIQUE INDEX tag_code ON tag (code);
        ALTER TABLE tag REPLICA IDENTITY USING INDEX tag_code;
        INSERT INTO tag VALUES ('a', 'alpha', 1), ('b', 'beta', 2), ('c', 'gamma', 3);
    """)
    await replicate(erp_case)

    await erp.execute("UPDATE tag SET label = 'ALPHA' WHERE code = 'a'")
    await erp.execute("UPDATE tag SET code = 'bb' WHERE code = 'b'")
    await erp.execute("DELETE FROM tag WHERE code = 'c'")
    await replicate(erp_case)

    assert await assert_mirrored(erp_case, "tag") == 2
