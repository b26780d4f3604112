"""The ops side: readiness rules, the webhook, /healthz /readyz /metrics of a running
daemon against real PostgreSQL, and ``replicator status``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import yaml  # type: ignore[import-untyped]
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from replicator.cli import main
from replicator.config import parse
from replicator.daemon import Daemon
from replicator.emulator.app import EmulatorConfig
from replicator.ops import Metrics, Notifier, OpsState
from replicator.ops.server import OpsServer, parse_listen
from tests.fixtures.emulator import Served
from tests.fixtures.erp_daemon import REPO, wait_for, write_config
from tests.fixtures.pg import ErpCase, replicate
from tests.test_sf_source import org_client, sf_settings

pytestmark = pytest.mark.timeout(120)


# -- pure rules ----------------------------------------------------------------


def test_readiness_needs_the_active_role_and_every_stream_within_budget() -> None:
    state = OpsState(lag_budget=10)
    state.set_role("active")
    state.set_state("erp", "streaming", lag_seconds=1.0)
    state.set_state("sf:AccountChangeEvent", "streaming", lag_seconds=11.0)

    ready, reasons = state.readiness()

    assert not ready
    assert reasons == [
        "stream sf:AccountChangeEvent lags 11.0s, over its budget of 10s"
    ]


def test_readiness_of_a_standby_is_false_even_with_no_streams() -> None:
    state = OpsState(lag_budget=10)
    state.set_role("standby")

    ready, reasons = state.readiness()

    assert not ready
    assert "instance is standby" in reasons


def test_state_changes_notify_once_each_and_dead_letters_on_crossing() -> None:
    notices: list[dict[str, Any]] = []
    state = OpsState(lag_budget=10, notify=notices.append)

    state.set_state("erp", "streaming")
    state.set_state("erp", "streaming", lag_seconds=2.0)
    state.set_state("erp", "down")
    state.set_state("erp", "streaming")
    for count in (0, 2, 5, 6, 1):
        state.set_dead_letters(count, threshold=5)

    kinds = [(n["event"], n.get("state"), n.get("above")) for n in notices]
    assert kinds == [
        ("stream_state", "streaming", None),
        ("stream_state", "down", None),
        ("stream_state", "streaming", None),
        ("dead_letters", None, True),
        ("dead_letters", None, False),
    ]


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
        ("[::1]:0", ("::1", 0)),
        (":9108", ("0.0.0.0", 9108)),
    ],
)
def test_listen_addresses_parse(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


async def test_an_address_in_use_leaves_the_daemon_running_without_endpoint(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Replication matters more than its endpoint: a taken port is an error line."""
    state, metrics = OpsState(lag_budget=5), Metrics()
    async with (
        OpsServer("127.0.0.1:0", state, metrics) as first,
        OpsServer(f"127.0.0.1:{first.port}", state, metrics) as second,
    ):
        port = second.port

    assert port is None
    assert "ops endpoint unavailable" in caplog.text


# -- webhook ---------------------------------------------------------------------


@contextlib.asynccontextmanager
async def receiver(
    fail_first: int = 0,
) -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A local aiohttp server that records the JSON bodies posted to /hook."""
    received: list[dict[str, Any]] = []
    failures = [fail_first]

    async def hook(request: web.Request) -> web.Response:
        if failures[0] > 0:
            failures[0] -= 1
            return web.Response(status=503)
        received.append(await request.json())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/hook?token=hook-secret", received
    finally:
        await runner.cleanup()


async def test_webhook_posts_each_state_change_as_json_retrying_a_refusal() -> None:
    async with receiver(fail_first=1) as (url, received):
        notifier = Notifier(url, timeout=5, instance="test-host")
        state = OpsState(lag_budget=5, notify=notifier.notify)
        task = asyncio.create_task(notifier.serve())
        try:
            state.set_state("erp", "streaming")
            state.set_state("erp", "down")
            state.set_state("erp", "streaming")
            state.notify({"event": "resync", "stream": "erp", "phase": "started"})
            async with asyncio.timeout(15):
                await notifier.drain()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    assert [(r["event"], r.get("state") or r.get("phase")) for r in received] == [
        ("stream_state", "streaming"),
        ("stream_state", "down"),
        ("stream_state", "streaming"),
        ("resync", "started"),
    ]
    assert all(r["instance"] == "test-host" and r["at"] > 0 for r in received)


# -- a daemon in process -----------------------------------------------------------

SCHEMA = """
CREATE TABLE item (id serial PRIMARY KEY, name text);
CREATE TABLE note (id serial PRIMARY KEY, body text);
INSERT INTO item (name) SELECT 'i' || g FROM generate_series(1, 50) g;
"""


OPS_FAST = parse(
    {"replica": {"dsn": "x"}, "ops": {"listen": "127.0.0.1:0", "sample_seconds": 0.2}}
).ops


LATENCY_SF = ("replicator_apply_latency_seconds_count", (("stream", "sf"),))


def metric_values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as response:
        return response.status, await response.text()


async def test_running_daemon_serves_health_readiness_and_metrics(
    erp_case: ErpCase,
) -> None:
    """Against real PostgreSQL: ready once streaming; metrics count per stream and
    table, observe the apply latency, and show the slot's retained WAL."""
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(SCHEMA)
    settings = erp_case.settings().model_copy(
        update={
            "ops": parse(
                {
                    "replica": {"dsn": "x"},
                    "ops": {"listen": "127.0.0.1:0", "sample_seconds": 0.2},
                }
            ).ops
        }
    )
    stop = asyncio.Event()
    daemon = Daemon(settings, stop)
    task = asyncio.create_task(daemon.serve())
    try:
        async with aiohttp.ClientSession() as http:
            await wait_for(
                lambda: asyncio.sleep(0, daemon.ops_port),
                timeout=20,
                what="the ops server",
            )
            base = f"http://127.0.0.1:{daemon.ops_port}"

            async def ready() -> bool:
                return (await get(http, base + "/readyz"))[0] == 200

            await wait_for(ready, timeout=30, what="/readyz 200")
            for i in range(20):
                await erp.execute("INSERT INTO note (body) VALUES ($1)", f"n{i}")
            await erp.execute("UPDATE item SET name = name || '!' WHERE id <= 5")

            async def counted() -> dict[Any, float] | None:
                values = metric_values((await get(http, base + "/metrics"))[1])
                key = (
                    "replicator_events_applied_total",
                    (("entity", "note"), ("stream", "erp")),
                )
                return values if values.get(key) == 20 else None

            values = await wait_for(counted, timeout=30, what="note rows counted")
            health = await get(http, base + "/healthz")
            readyz = json.loads((await get(http, base + "/readyz"))[1])
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await erp.close()

    assert health[0] == 200
    assert json.loads(health[1])["role"] == "active"
    assert readyz["ready"]
    assert readyz["streams"]["erp"]["state"] == "streaming"
    erp_labels = (("stream", "erp"),)
    assert (
        values[("replicator_events_received_total", (("entity", "*"), *erp_labels))]
        >= 25
    )
    assert values[("replicator_apply_latency_seconds_count", erp_labels)] >= 1
    assert values[("replicator_stream_up", erp_labels)] == 1
    assert values[("replicator_lag_seconds", erp_labels)] >= 0
    assert values[("replicator_instance_active", ())] == 1
    assert (
        values[("replicator_erp_slot_wal_retained_bytes", (("slot", erp_case.slot),))]
        >= 0
    )
    assert ("replicator_checkpoint_age_seconds", erp_labels) in values
    assert values[("replicator_conflicts_total", ())] == 0


@pytest.fixture
def _keep_logging() -> Iterator[None]:
    """main() sets up logging on the captured stdout: put the handlers back."""
    logger = logging.getLogger("replicator")
    saved = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.usefixtures("_keep_logging")
async def test_status_reports_each_stream_from_the_replica_without_the_daemon(
    erp_case: ErpCase,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(SCHEMA)
    await replicate(erp_case)
    await erp.execute("INSERT INTO note (body) SELECT 'x' FROM generate_series(1, 30)")
    await erp.close()
    await replicate(erp_case)
    config = write_config(
        tmp_path / "r.toml",
        replica_dsn=erp_case.replica_dsn,
        erp_dsn=erp_case.erp_dsn,
        slot=erp_case.slot,
        publication=erp_case.publication,
    )

    # main() runs its own event loop: call it from a thread, as a shell would
    code_json = await asyncio.to_thread(
        main, ["status", "--config", str(config), "--json"]
    )
    report = json.loads(capsys.readouterr().out)
    code_table = await asyncio.to_thread(main, ["status", "--config", str(config)])
    table = capsys.readouterr().out

    assert code_json == 0
    assert code_table == 0
    assert report["daemon"] == "not running"
    (stream,) = report["streams"]
    assert stream["stream"] == "erp"
    assert stream["state"] == "stopped"
    assert stream["events_per_second"] > 0
    assert stream["dead_letters"] == 0
    assert stream["last_event_at"] is not None
    assert "/" in stream["position"]
    assert "events_per_s" in table.splitlines()[1]
    assert "erp" in table


def test_every_metric_the_example_alerts_use_is_exported() -> None:
    rules = yaml.safe_load((REPO / "deploy" / "alerts.yml").read_text())
    used = {
        name
        for rule in rules["groups"][0]["rules"]
        for name in re.findall(r"\breplicator_\w+", rule["expr"])
    }
    exported = set()
    for family in Metrics().registry.collect():
        exported.add(family.name)
        if family.type == "counter":
            exported.add(family.name + "_total")

    assert used
    assert used <= exported, used - exported


async def test_salesforce_streams_are_ready_and_counted_per_object(
    erp_case: ErpCase, emulator: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against the emulator: one stream per channel, ready once subscribed and
    loaded; events from the org are counted per object with their latency."""
    config = EmulatorConfig()
    monkeypatch.setenv("REPLICATOR_TEST_SF_SECRET", config.client_secret)
    monkeypatch.setenv(
        "REPLICATOR_TEST_SF_PASSWORD", config.password + config.security_token
    )
    settings = sf_settings(erp_case, emulator, ["Account"]).model_copy(
        update={"ops": OPS_FAST}
    )
    stop = asyncio.Event()
    daemon = Daemon(settings, stop)
    task = asyncio.create_task(daemon.serve())
    try:
        async with aiohttp.ClientSession() as http, org_client(emulator) as org:
            await wait_for(
                lambda: asyncio.sleep(0, daemon.ops_port), timeout=20, what="ops"
            )
            base = f"http://127.0.0.1:{daemon.ops_port}"

            async def ready() -> bool:
                return (await get(http, base + "/readyz"))[0] == 200

            await wait_for(ready, timeout=60, what="/readyz 200")
            for i in range(3):
                await org.create("Account", Name=f"ops test {i}")
            received = (
                "replicator_events_received_total",
                (("entity", "Account"), ("stream", "sf")),
            )

            async def counted() -> dict[Any, float] | None:
                values = metric_values((await get(http, base + "/metrics"))[1])
                latency = values.get(LATENCY_SF, 0)
                return values if values.get(received, 0) >= 3 and latency else None

            values = await wait_for(counted, timeout=30, what="Account events")
            readyz = json.loads((await get(http, base + "/readyz"))[1])
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)

    assert list(readyz["streams"]) == ["sf:/data/AccountChangeEvent"]
    assert values[LATENCY_SF] >= 1
    stream = (("stream", "sf:/data/AccountChangeEvent"),)
    assert values[("replicator_stream_up", stream)] == 1
    assert ("replicator_checkpoint_age_seconds", stream) in values


async def test_webhook_hears_a_stream_go_down_and_come_back(erp_case: ErpCase) -> None:
    """The ERP's walsender is killed under a running daemon: the webhook receives
    the stream going down and streaming again, and the reconnect is counted."""
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(SCHEMA)
    async with receiver() as (url, received):
        settings = erp_case.settings().model_copy(
            update={
                "ops": parse(
                    {
                        "replica": {"dsn": "x"},
                        "ops": {
                            "listen": "",
                            "sample_seconds": 0.1,
                            "webhook_url_env": "TEST_OPS_HOOK",
                        },
                    }
                ).ops
            }
        )
        os.environ["TEST_OPS_HOOK"] = url
        stop = asyncio.Event()
        daemon = Daemon(settings, stop)
        task = asyncio.create_task(daemon.serve())
        try:

            def states() -> list[str]:
                return [r["state"] for r in received if r["event"] == "stream_state"]

            await wait_for(
                lambda: asyncio.sleep(0, "streaming" in states()),
                timeout=30,
                what="streaming notice",
            )
            await erp.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE slot_name = $1",
                erp_case.slot,
            )
            await wait_for(
                lambda: asyncio.sleep(0, states().count("streaming") >= 2),
                timeout=30,
                what="streaming again",
            )
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            del os.environ["TEST_OPS_HOOK"]
            await erp.close()

    seen = states()
    first = seen.index("streaming")
    assert seen[first : first + 3] == ["streaming", "down", "streaming"]
    assert daemon.metrics.totals.reconnects["erp"] >= 1
    assert all(r["event"] != "stream_state" or "stream" in r for r in received)


def test_ops_package_exports_what_it_names() -> None:
    import replicator.ops as ops

    assert all(hasattr(ops, name) for name in ops.__all__)
    assert sorted(ops.__all__) == ops.__all__
