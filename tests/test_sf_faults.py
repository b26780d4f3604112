"""The Salesforce pipeline as a real process under faults, against a live org.

``python -m replicator run`` runs as a subprocess against the emulator served
in this test's event loop on a fixed loopback port with a data dir (so it can
be restarted), while the org keeps changing. The process is SIGKILLed at
several points, the emulator restarted, sessions forgotten, tokens expired,
connections dropped and REST calls refused; then ``--until-caught-up`` must
leave a mirror equal to the org (``verify_sf``), with no replay id applied
twice (checkpoint history strictly increasing per channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from replicator.config import Settings
from replicator.config import load as load_config
from replicator.emulator.app import EmulatorConfig, create_app
from replicator.emulator.keys import TOKENS_KEY
from replicator.emulator.streaming import STREAMING_KEY
from tests.fixtures.emulator import Served
from tests.fixtures.pg import ErpCase
from tests.test_sf_source import Org, eventually_mirrored

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OBJECTS = ["Account", "Contact"]
SECRETS = {
    "REPLICATOR_TEST_SF_SECRET": EmulatorConfig().client_secret,
    "REPLICATOR_TEST_SF_PASSWORD": EmulatorConfig().password
    + EmulatorConfig().security_token,
}


@pytest.fixture(autouse=True)
def _sf_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def serve(config: EmulatorConfig) -> AsyncIterator[Served]:
    """Serve on ``config.port``, so a restart comes back where the daemon looks."""
    runner = web.AppRunner(create_app(config), shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port).start()
    try:
        yield Served(f"http://127.0.0.1:{config.port}", runner.app, config)
    finally:
        await runner.cleanup()


def write_config(path: Path, case: ErpCase, config: EmulatorConfig) -> Settings:
    objects = ", ".join(f'"{o}"' for o in OBJECTS)
    path.write_text(f"""
[replica]
dsn = "{case.replica_dsn}"

[salesforce]
login_url = "http://127.0.0.1:{config.port}"
client_id = "{config.client_id}"
client_secret_env = "REPLICATOR_TEST_SF_SECRET"
username = "{config.username}"
password_env = "REPLICATOR_TEST_SF_PASSWORD"
objects = [{objects}]
long_poll_timeout_seconds = 2
skew_seconds = 5

[ops]
listen = ""
""")
    return load_config(path)


class Daemon:
    """One ``python -m replicator run`` process; output kept in files."""

    def __init__(self, config: Path, logs: Path) -> None:
        self.config = config
        self.logs = logs
        self.proc: asyncio.subprocess.Process | None = None
        self.runs = 0

    async def start(self, *extra: str) -> None:
        self.runs += 1
        out = open(self.logs / f"daemon-{self.runs}.log", "wb")  # noqa: SIM115, ASYNC230
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "replicator",
            "run",
            "--config",
            str(self.config),
            *extra,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, **SECRETS},
        )
        out.close()

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def until_caught_up(self, seconds: float = 60) -> None:
        await self.start("--until-caught-up")
        assert self.proc is not None
        async with asyncio.timeout(seconds):
            code = await self.proc.wait()
        assert code == 0, self.output()

    def output(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-4000:]
            for p in sorted(self.logs.glob("daemon-*.log"))
        )

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()


@contextlib.asynccontextmanager
async def org_session(served: Served) -> AsyncIterator[Org]:
    async with aiohttp.ClientSession() as http:
        yield Org(served, http, await served.token())


class Traffic:
    """Keeps changing the org: creates, updates, deletes, a contact per account."""

    def __init__(self) -> None:
        self.accounts: list[str] = []
        self.writes = 0
        self.rng = random.Random(1717502400)

    async def step(self, org: Org) -> None:
        roll = self.rng.random()
        if roll < 0.35 or len(self.accounts) < 3:
            record = await org.create(
                "Account", Name=f"Traffic {self.writes}", Phone=f"555-{self.writes:04d}"
            )
            self.accounts.append(record)
            await org.create(
                "Contact", LastName=f"Buyer {self.writes}", AccountId=record
            )
        elif roll < 0.9:
            await org.update(
                "Account",
                self.rng.choice(self.accounts),
                Rating=self.rng.choice(["Hot", "Warm", "Cold"]),
                Description=f"step {self.writes}",
            )
        else:
            await org.delete(
                "Account", self.accounts.pop(self.rng.randrange(len(self.accounts)))
            )
        self.writes += 1

    async def run(self, served: Served, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        async with org_session(served) as org:
            while loop.time() < end:
                await self.step(org)
                await asyncio.sleep(0.02)


async def checkpoint_positions(case: ErpCase) -> dict[str, str]:
    conn = await asyncpg.connect(case.replica_dsn)
    try:
        with contextlib.suppress(asyncpg.UndefinedTableError):
            rows = await conn.fetch(
                "SELECT stream, position FROM replicator.checkpoints"
            )
            return {r[0]: r[1] for r in rows}
        return {}
    finally:
        await conn.close()


async def assert_nothing_applied_twice(case: ErpCase) -> None:
    """Per channel, the replay ids of committed batches only ever grow."""
    conn = await asyncpg.connect(case.replica_dsn)
    try:
        rows = await conn.fetch(
            "SELECT stream, position FROM replicator.checkpoint_history "
            "WHERE reason = 'apply' ORDER BY id"
        )
    finally:
        await conn.close()
    last: dict[str, int] = {}
    for stream, position in rows:
        assert int(position) > last.get(stream, -3), (stream, position, last)
        last[stream] = int(position)
    assert last, "no batch was ever applied"


async def until(condition: Any, seconds: float = 30) -> None:
    async with asyncio.timeout(seconds):
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.05)


@pytest.fixture
def emulator_config(tmp_path: Path) -> EmulatorConfig:
    return EmulatorConfig.ebikes(
        port=_free_port(), data_dir=tmp_path / "org", long_poll_timeout_seconds=2.0
    )


async def test_sigkill_during_load_mid_stream_and_after_a_commit_loses_nothing(
    erp_case: ErpCase,
    emulator_config: EmulatorConfig,
    tmp_path: Path,
) -> None:
    settings = write_config(tmp_path / "replicator.toml", erp_case, emulator_config)
    daemon = Daemon(tmp_path / "replicator.toml", tmp_path)
    traffic = Traffic()
    try:
        async with serve(emulator_config) as served:
            # 1. During the initial load: REST is slow, the kill lands mid-query.
            served.faults.latency_seconds = 0.4
            await daemon.start()
            await until(
                lambda: any(
                    "FROM Account" in r.query.get("q", "")
                    for r in served.faults.requests
                )
            )
            await traffic.run(served, 0.5)
            await daemon.kill()
            served.faults.latency_seconds = 0.0
            loaded_at_kill = await checkpoint_positions(erp_case)

            # 2. Mid-stream, with the org changing throughout.
            await daemon.start()
            writer = asyncio.create_task(traffic.run(served, 6.0))
            await until(lambda: _moved(erp_case, {}), seconds=30)
            await asyncio.sleep(1.3)
            await daemon.kill()
            await writer

            # 3. Right after a commit: kill the moment a checkpoint moves.
            before = await checkpoint_positions(erp_case)
            await daemon.start()
            writer = asyncio.create_task(traffic.run(served, 4.0))
            await until(lambda: _moved(erp_case, before), seconds=30)
            await daemon.kill()
            await writer
            async with org_session(served) as org:  # changes while nobody listens
                for _ in range(5):
                    await traffic.step(org)

            await daemon.until_caught_up()
            reports = await eventually_mirrored(settings, timeout=10)
    finally:
        await daemon.stop()

    assert set(loaded_at_kill.values()) <= {"-2"}  # killed before streaming began
    assert all(r.ok for r in reports)
    assert sum(r.source_rows for r in reports) > 0
    await assert_nothing_applied_twice(erp_case)
    assert traffic.writes > 50


async def _loaded(case: ErpCase) -> bool:
    return len(await checkpoint_positions(case)) == len(OBJECTS)


async def _moved(case: ErpCase, before: dict[str, str]) -> bool:
    now = await checkpoint_positions(case)
    return any(
        p.lstrip("-").isdigit() and int(p) > 0 and before.get(s) != p
        for s, p in now.items()
    )


async def test_daemon_survives_restarts_lost_sessions_expired_tokens_and_refusals(
    erp_case: ErpCase,
    emulator_config: EmulatorConfig,
    tmp_path: Path,
) -> None:
    """While the daemon runs: the emulator restarts on its port with its data,
    sessions are forgotten, tokens expire, long polls are cut, and GAP re-reads
    meet REQUEST_LIMIT_EXCEEDED and 503. The mirror converges."""
    settings = write_config(tmp_path / "replicator.toml", erp_case, emulator_config)
    daemon = Daemon(tmp_path / "replicator.toml", tmp_path)
    traffic = Traffic()
    try:
        async with serve(emulator_config) as served:
            await daemon.start()
            await until(lambda: _loaded(erp_case), seconds=30)
            await traffic.run(served, 1.0)
            await until(lambda: _moved(erp_case, {}), seconds=30)
            streaming = served.app[STREAMING_KEY]
            streaming.faults.forget_clients()
            await traffic.run(served, 1.0)
            served.app[TOKENS_KEY].expire_all()
            await traffic.run(served, 1.0)
            streaming.faults.drop_connections()
            await traffic.run(served, 1.0)
            streaming.faults.gap_next_changes(6)
            served.faults.fail_next(2, "REQUEST_LIMIT_EXCEEDED", path_contains="/query")
            served.faults.fail_next(2, "SERVICE_UNAVAILABLE", path_contains="/query")
            await traffic.run(served, 1.5)
            await until(lambda: not served.faults._planned, seconds=15)
        async with serve(emulator_config) as restarted:  # same port, same data
            await traffic.run(restarted, 1.5)
            before = await checkpoint_positions(erp_case)
            await until(lambda: _moved(erp_case, before), seconds=30)
            await traffic.run(restarted, 1.0)
            await asyncio.sleep(3.0)
            await daemon.kill()
            await daemon.until_caught_up()
            reports = await eventually_mirrored(settings, timeout=10)
    finally:
        await daemon.stop()

    assert all(r.ok for r in reports)
    assert "REQUEST_LIMIT_EXCEEDED" in daemon.output()
    assert "SERVER_UNAVAILABLE" in daemon.output()
    await assert_nothing_applied_twice(erp_case)
