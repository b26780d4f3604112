"""``replicator run`` as real processes against real PostgreSQL: graceful and
immediate stops, the instance lock with a standby that takes over, a lost
lock, exit codes, and logs that never carry a secret."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.fixtures.erp_daemon import (
    REPO,
    Daemon,
    checkpoint_lsn,
    fetchval,
    slot_row,
    wait_caught_up,
    wait_for,
    write_config,
)
from tests.fixtures.pg import ErpCase, assert_mirrored

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SCHEMA = """
CREATE TABLE ledger (id bigserial PRIMARY KEY, memo text NOT NULL);
INSERT INTO ledger (memo) SELECT 'seed' FROM generate_series(1, 200);
"""


def config_for(case: ErpCase, path: Path, extra: str = "") -> Path:
    write_config(
        path,
        replica_dsn=case.replica_dsn,
        erp_dsn=case.erp_dsn,
        slot=case.slot,
        publication=case.publication,
    )
    with open(path, "a") as fh:
        fh.write('\n[ops]\nlisten = "127.0.0.1:0"\nsample_seconds = 0.3\n' + extra)
    return path


class Writer:
    """One connection inserting one ledger row per transaction, in order."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.commits = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while not self._stop.is_set():
                await conn.execute(
                    "INSERT INTO ledger (memo) VALUES ($1)", f"w{self.commits}"
                )
                self.commits += 1
                await asyncio.sleep(0.003)
        finally:
            await conn.close()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="test:writer")

    async def stop(self) -> int:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.commits


@contextlib.asynccontextmanager
async def prepared(case: ErpCase) -> AsyncIterator[None]:
    conn = await asyncpg.connect(case.erp_dsn)
    try:
        await conn.execute(SCHEMA)
    finally:
        await conn.close()
    yield


def send(daemon: Daemon, signum: int) -> None:
    assert daemon.proc is not None
    daemon.proc.send_signal(signum)


def log_events(daemon: Daemon, run: int | None = None) -> list[str]:
    return [r.get("event", "") for r in daemon.records(run)]


async def applied_batches(replica_dsn: str) -> int:
    try:
        return int(
            await fetchval(
                replica_dsn,
                "SELECT count(*) FROM "
                "replicator.checkpoint_history WHERE reason = 'apply'",
            )
        )
    except asyncpg.UndefinedTableError:
        return 0


async def wait_streaming(case: ErpCase, after: int = 2) -> None:
    async def moved() -> bool:
        return await applied_batches(case.replica_dsn) > after

    await wait_for(moved, timeout=60, what="applied batches")


async def wait_log(
    daemon: Daemon, event: str, *, within: float, run: int | None = None
) -> dict[str, Any]:
    async def seen() -> dict[str, Any] | None:
        for record in daemon.records(run or daemon.runs):
            if record.get("event") == event:
                return record
        if daemon.proc is not None and daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited before {event!r}:\n{daemon.output()}")
        return None

    record: dict[str, Any] = await wait_for(seen, timeout=within, what=f"log {event!r}")
    return record


async def ops_port(daemon: Daemon) -> int:
    return int((await wait_log(daemon, "ops server listening", within=30))["port"])


async def http_status(port: int, path: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}{path}") as response,
    ):
        return response.status, await response.json()


async def assert_nothing_lost_nothing_twice(case: ErpCase) -> None:
    await assert_mirrored(case, "ledger")
    replica = await asyncpg.connect(case.replica_dsn)
    try:
        applied = [
            r["lsn"]
            for r in await replica.fetch(
                "SELECT lsn FROM replicator.checkpoint_history WHERE reason = 'apply' "
                "ORDER BY id"
            )
        ]
    finally:
        await replica.close()
    assert applied == sorted(set(applied))  # strictly increasing: nothing re-applied


async def restart_until_caught_up(daemon: Daemon) -> None:
    daemon.start(until_caught_up=True)
    assert await daemon.wait(90) == 0, daemon.output()


# -- stopping ------------------------------------------------------------------------


async def test_sigterm_mid_stream_drains_commits_acknowledges_and_exits_0(
    erp_case: ErpCase,
    tmp_path: Path,
) -> None:
    """SIGTERM under load: exit 0; the mirror holds exactly the rows up to the
    checkpoint (no hole, nothing past it), the slot is acknowledged to the
    checkpoint, and a restart catches up with nothing lost or applied twice."""
    async with prepared(erp_case):
        daemon = Daemon(config_for(erp_case, tmp_path / "r.toml"), tmp_path)
        writer = Writer(erp_case.erp_dsn)
        try:
            daemon.start()
            writer.start()
            await wait_streaming(erp_case)
            await asyncio.sleep(0.5)

            send(daemon, signal.SIGTERM)
            code = await daemon.wait(30)
            await writer.stop()
            stored = await checkpoint_lsn(erp_case.replica_dsn)
            slot = await slot_row(erp_case.erp_dsn, erp_case.slot)
            assert slot is not None
            confirmed = slot["confirmed"]
            count, top = await _mirror_extent(erp_case.replica_dsn)
            await restart_until_caught_up(daemon)
        finally:
            daemon.close()

    assert code == 0, daemon.output()
    events = log_events(daemon, 1)
    assert "stop requested" in events
    assert "daemon stopped" in events
    assert "task did not stop within the shutdown deadline, cancelling" not in events
    assert confirmed == stored
    assert count == top  # every row up to the last applied one, no hole
    await assert_nothing_lost_nothing_twice(erp_case)


async def _mirror_extent(replica_dsn: str) -> tuple[int, int]:
    conn = await asyncpg.connect(replica_dsn)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS n, max(id) AS top FROM erp.ledger"
        )
        return int(row["n"]), int(row["top"])
    finally:
        await conn.close()


SLOW_APPLY = """
CREATE FUNCTION public.slow_apply() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN PERFORM pg_sleep(4); RETURN NULL; END $$;
CREATE TRIGGER slow_apply BEFORE INSERT ON erp.ledger
FOR EACH STATEMENT EXECUTE FUNCTION public.slow_apply();
"""


async def test_second_sigint_exits_at_once_and_a_restart_loses_nothing(
    erp_case: ErpCase,
    tmp_path: Path,
) -> None:
    """The first SIGINT starts a drain held up by a slow replica; the second exits
    the process at once (130); the rolled-back batch comes again after restart."""
    async with prepared(erp_case):
        daemon = Daemon(config_for(erp_case, tmp_path / "r.toml"), tmp_path)
        writer = Writer(erp_case.erp_dsn)
        try:
            daemon.start()
            writer.start()
            await wait_streaming(erp_case)
            replica = await asyncpg.connect(erp_case.replica_dsn)
            await replica.execute(SLOW_APPLY)
            await asyncio.sleep(1.0)  # the applier is now inside a slow statement

            send(daemon, signal.SIGINT)
            await wait_log(daemon, "stop requested", within=10)
            started = time.monotonic()
            send(daemon, signal.SIGINT)
            code = await daemon.wait(10)
            elapsed = time.monotonic() - started
            await replica.execute("DROP TRIGGER slow_apply ON erp.ledger")
            await replica.close()
            await writer.stop()
            await restart_until_caught_up(daemon)
        finally:
            daemon.close()

    assert code == 130, daemon.output()
    assert elapsed < 3.5  # well before the 4 s statement could have finished
    assert "second interrupt, exiting now" in log_events(daemon, 1)
    await assert_nothing_lost_nothing_twice(erp_case)


async def test_drain_past_the_deadline_is_cancelled_naming_the_task(
    erp_case: ErpCase,
    tmp_path: Path,
) -> None:
    """A drain held up past ``shutdown_seconds`` is cancelled with a warning that
    names the task; the exit is still 0 and a restart loses nothing."""
    async with prepared(erp_case):
        config = config_for(
            erp_case, tmp_path / "r.toml", "\n[daemon]\nshutdown_seconds = 1\n"
        )
        daemon = Daemon(config, tmp_path)
        writer = Writer(erp_case.erp_dsn)
        try:
            daemon.start()
            writer.start()
            await wait_streaming(erp_case)
            replica = await asyncpg.connect(erp_case.replica_dsn)
            await replica.execute(SLOW_APPLY)
            await asyncio.sleep(1.0)

            send(daemon, signal.SIGTERM)
            code = await daemon.wait(20)
            await replica.execute("DROP TRIGGER slow_apply ON erp.ledger")
            await replica.close()
            await writer.stop()
            await restart_until_caught_up(daemon)
        finally:
            daemon.close()

    assert code == 0, daemon.output()
    (warning,) = [
        r
        for r in daemon.records(1)
        if r["event"] == "task did not stop within the shutdown deadline, cancelling"
    ]
    assert warning["task"] == f"source:erp:{erp_case.slot}"
    await assert_nothing_lost_nothing_twice(erp_case)


# -- one active instance ------------------------------------------------------------


async def test_standby_waits_then_takes_over_when_the_active_instance_is_killed(
    erp_case: ErpCase,
    tmp_path: Path,
) -> None:
    """Two processes, one config: the second is a standby (alive, not ready); after
    SIGKILL of the first it takes the lock within seconds and streams on."""
    async with prepared(erp_case):
        config = config_for(erp_case, tmp_path / "r.toml")
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        first, second = Daemon(config, tmp_path / "a"), Daemon(config, tmp_path / "b")
        writer = Writer(erp_case.erp_dsn)
        try:
            first.start()
            writer.start()
            await wait_streaming(erp_case)
            second.start()
            await wait_log(
                second, "standby: another instance holds the lock, waiting", within=30
            )
            port = await ops_port(second)
            health = await http_status(port, "/healthz")
            readiness = await http_status(port, "/readyz")

            first.kill()
            killed_at = time.monotonic()
            await wait_log(second, "instance lock acquired", within=30)
            took_over = time.monotonic() - killed_at

            async def ready() -> bool:
                return (await http_status(port, "/readyz"))[0] == 200

            await wait_for(ready, timeout=60, what="the new active instance ready")
            await writer.stop()
            await wait_caught_up(erp_case.erp_dsn, erp_case.replica_dsn, timeout=60)
            send(second, signal.SIGTERM)
            code = await second.wait(30)
        finally:
            first.close()
            second.close()

    assert health == (200, {"status": "alive", "role": "standby"})
    assert readiness[0] == 503
    assert "instance is standby" in readiness[1]["reasons"]
    assert took_over < 15
    assert code == 0, second.output()
    await assert_nothing_lost_nothing_twice(erp_case)


KILL_LOCK_SESSION = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    "WHERE application_name = 'replicator lock' "
    "AND datname = current_database()"
)


async def test_lost_lock_exits_3_when_configured_to_exit(
    erp_case: ErpCase,
    tmp_path: Path,
) -> None:
    async with prepared(erp_case):
        config = config_for(
            erp_case,
            tmp_path / "r.toml",
            '\n[daemon]\non_lost_lock = "exit"\nlock_check_seconds = 0.5\n',
        )
        daemon = Daemon(config, tmp_path)
        try:
            daemon.start()
            await wait_log(daemon, "stream state changed", within=60)
            await fetchval(erp_case.replica_dsn, KILL_LOCK_SESSION)
            code = await daemon.wait(30)
        finally:
            daemon.close()

    assert code == 3, daemon.output()
    assert "instance lock lost, stopping every stream now" in log_events(daemon)
    assert "lock" in daemon.stderr().lower()


async def test_lost_lock_goes_back_to_standby_and_resumes_by_default(
    erp_case: ErpCase,
    tmp_path: Path,
) -> None:
    async with prepared(erp_case):
        daemon = Daemon(config_for(erp_case, tmp_path / "r.toml"), tmp_path)
        writer = Writer(erp_case.erp_dsn)
        try:
            daemon.start()
            writer.start()
            await wait_streaming(erp_case)
            await fetchval(erp_case.replica_dsn, KILL_LOCK_SESSION)
            await wait_log(
                daemon, "instance lock lost, stopping every stream now", within=30
            )

            async def reacquired() -> bool:
                return log_events(daemon).count("instance lock acquired") >= 2

            await wait_for(reacquired, timeout=30, what="the lock taken again")
            await writer.stop()
            await wait_caught_up(erp_case.erp_dsn, erp_case.replica_dsn, timeout=60)
            send(daemon, signal.SIGTERM)
            code = await daemon.wait(30)
        finally:
            daemon.close()

    assert code == 0, daemon.output()
    await assert_nothing_lost_nothing_twice(erp_case)


# -- exit codes and logs ------------------------------------------------------------


class VerboseDaemon(Daemon):
    """The daemon at DEBUG, where a leak would most likely show."""

    def start(self, *, until_caught_up: bool = False) -> subprocess.Popen[bytes]:
        self.runs += 1
        out = self.log_dir / f"daemon-{self.runs}.out"
        err = self.log_dir / f"daemon-{self.runs}.err"
        self.logs.append(out)
        cmd = [
            sys.executable,
            "-m",
            "replicator",
            "-v",
            "--log-format",
            "json",
            "run",
            "--config",
            str(self.config),
        ]
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            self.proc = subprocess.Popen(
                cmd,
                stdout=stdout,
                stderr=stderr,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self.proc


async def test_config_error_exits_2_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[replica]\ndsn = "postgresql://x@127.0.0.1/db"\nretries = 3\n')
    daemon = Daemon(config, tmp_path)

    daemon.start()
    code = await daemon.wait(30)

    assert code == 2
    assert daemon.stderr().strip().count("\n") == 0
    assert "retries" in daemon.stderr()
    assert "unknown key" in daemon.stderr()


async def test_logs_never_carry_a_password_token_or_full_dsn(
    erp_case: ErpCase,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run at DEBUG with passwords in both DSNs (one through dsn_env) and a webhook
    URL carrying a token that cannot be reached: no secret in stdout or stderr."""
    password, token = "S3cret-pw-4711", "hook-token-0815"
    replica_dsn = erp_case.replica_dsn.replace("postgres@", f"postgres:{password}@")
    erp_dsn = erp_case.erp_dsn.replace("postgres@", f"postgres:{password}@")
    monkeypatch.setenv("TEST_ERP_DSN", erp_dsn)
    monkeypatch.setenv("TEST_HOOK", f"http://127.0.0.1:9/hook?token={token}")
    config = tmp_path / "r.toml"
    config.write_text(
        f"[replica]\ndsn = {json.dumps(replica_dsn)}\n\n"
        f"[erp]\nslot = {json.dumps(erp_case.slot)}\n"
        f"publication = {json.dumps(erp_case.publication)}\nheartbeat_seconds = 0.2\n"
        'status_interval_seconds = 0.5\n\n[erp.database]\ndsn_env = "TEST_ERP_DSN"\n\n'
        '[ops]\nlisten = "127.0.0.1:0"\nsample_seconds = 0.2\n'
        'webhook_url_env = "TEST_HOOK"\n'
        "webhook_timeout_seconds = 0.5\n"
    )
    async with prepared(erp_case):
        daemon = VerboseDaemon(config, tmp_path)
        daemon.start()
        await wait_log(daemon, "stream state changed", within=60)
        await asyncio.sleep(1.0)  # a few samples, notices and their failures
        send(daemon, signal.SIGTERM)
        code = await daemon.wait(30)
    stdout = "\n".join(p.read_text() for p in daemon.logs)

    assert code == 0, daemon.output()
    assert "webhook notice not delivered" in log_events(daemon)
    for secret in (password, token, erp_dsn, replica_dsn):
        assert secret not in stdout
        assert secret not in daemon.stderr()
