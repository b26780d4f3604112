"""The production Streaming API client against the emulator, over loopback HTTP.

Each test drives ``SalesforceStream`` through one way a session is lost in
the field (restart, forgotten client, expired token, network outage, denied
handshakes, held connects, a replay id past retention) and checks that the
consumer sees every event once, in order, and that the resubscription
carries the stored replay id.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from replicator.backoff import Backoff
from replicator.emulator.app import EmulatorConfig, create_app
from replicator.emulator.keys import STATE_KEY, TOKENS_KEY
from replicator.emulator.streaming import STREAMING_KEY, Streaming
from replicator.errors import (
    ReplayOutOfWindowError,
    SalesforceAuthError,
    SalesforceSubscribeError,
)
from replicator.sources.salesforce.auth import Authenticator, Credentials
from replicator.sources.salesforce.streaming import (
    ALL_EVENTS,
    SalesforceStream,
    StreamEvent,
)

pytestmark = pytest.mark.integration

ACCOUNTS = "/data/AccountChangeEvent"
WAIT = 15.0  # seconds any test waits for events before failing


@dataclass
class Org:
    """One served emulator app and the parts these tests reach into."""

    app: web.Application
    url: str
    config: EmulatorConfig

    @property
    def streaming(self) -> Streaming:
        return self.app[STREAMING_KEY]

    def write(self, name: str) -> str:
        state = self.app[STATE_KEY]
        user = state.find_user(self.config.username)
        assert user is not None
        with state.transaction(user_id=str(user["Id"])) as tx:
            return tx.create("Account", {"Name": name})

    def authenticator(self, **overrides: Any) -> Authenticator:
        config = self.config
        fields: dict[str, Any] = {
            "login_url": self.url,
            "client_id": config.client_id,
            "client_secret": config.client_secret,
            "username": config.username,
            "password": config.password + config.security_token,
            **overrides,
        }
        return Authenticator(Credentials(**fields))


@dataclass
class Replica:
    """Plays the replica: stores each event's replay id once it is "applied"."""

    stored: dict[str, int] = field(default_factory=dict)
    events: list[StreamEvent] = field(default_factory=list)

    def replay_for(self, channel: str) -> int | None:
        return self.stored.get(channel)

    def apply(self, event: StreamEvent) -> None:
        self.events.append(event)
        self.stored[event.channel] = event.replay_id

    @property
    def names(self) -> list[str]:
        return [e.payload["Name"] for e in self.events]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(tmp_path: Path, **overrides: Any) -> EmulatorConfig:
    settings: dict[str, Any] = {
        "port": _free_port(),
        "data_dir": tmp_path / "org",
        "long_poll_timeout_seconds": 1.0,
        **overrides,
    }
    return EmulatorConfig(**settings)


@asynccontextmanager
async def serve(config: EmulatorConfig) -> AsyncIterator[Org]:
    """Serve on ``config.port``, so that a restart comes back on the same port."""
    runner = web.AppRunner(create_app(config), shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port).start()
    try:
        yield Org(runner.app, f"http://127.0.0.1:{config.port}", config)
    finally:
        await runner.cleanup()


def _stream(
    auth: Authenticator,
    replay_for: Callable[[str], int | None],
    **overrides: Any,
) -> SalesforceStream:
    options: dict[str, Any] = {
        "long_poll_timeout": 1.0,
        "connection_timeout": 2.0,
        "backoff": Backoff(initial=0.2, factor=2.0, cap=1.0),
        "client_name": "test",
        **overrides,
    }
    return SalesforceStream(auth, [ACCOUNTS], replay_for, **options)


async def _take(stream: SalesforceStream, replica: Replica, count: int) -> None:
    async with asyncio.timeout(WAIT):
        for _ in range(count):
            replica.apply(await anext(stream))


def _subscribe_replay_ids(caplog: pytest.LogCaptureFixture) -> list[int]:
    """The ``ext.replay`` of each subscribe, as the emulator logged it."""
    return [
        r.replay_id  # type: ignore[attr-defined]
        for r in caplog.records
        if r.name == "replicator.emulator.cometd"
        and r.getMessage() == "cometd subscribe"
    ]


async def test_events_arrive_in_order_with_their_replay_ids(tmp_path: Path) -> None:
    replica = Replica()
    async with (
        serve(_config(tmp_path)) as org,
        _stream(org.authenticator(), replica.replay_for) as stream,
    ):
        ids = [org.write(name) for name in ("one", "two", "three")]
        await _take(stream, replica, 3)

    assert replica.names == ["one", "two", "three"]
    replay_ids = [e.replay_id for e in replica.events]
    assert replay_ids == sorted(replay_ids)
    assert len(set(replay_ids)) == 3
    first = replica.events[0]
    assert first.channel == ACCOUNTS
    assert first.payload["ChangeEventHeader"]["recordIds"] == [ids[0]]
    assert first.raw["data"]["event"]["replayId"] == first.replay_id
    assert stream.stats.connects >= 1
    assert stream.stats.handshakes == 1
    assert stream.stats.last_connect_at is not None


async def test_replay_all_events_accepts_minus_two(tmp_path: Path) -> None:
    replica = Replica()
    async with serve(_config(tmp_path)) as org:
        org.write("retained-1")
        org.write("retained-2")
        async with _stream(org.authenticator(), lambda _: ALL_EVENTS) as stream:
            await _take(stream, replica, 2)

    assert replica.names == ["retained-1", "retained-2"]
    assert stream.replay_ids_sent == {ACCOUNTS: ALL_EVENTS}


async def test_resumes_from_stored_replay_id_after_emulator_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Events written while the client is away are replayed from its stored id."""
    caplog.set_level(logging.INFO, logger="replicator.emulator.cometd")
    config = _config(tmp_path)
    replica = Replica()
    async with serve(config) as org:
        stream = _stream(org.authenticator(), replica.replay_for)
        await stream.__aenter__()
        org.write("before-1")
        org.write("before-2")
        await _take(stream, replica, 2)
    stored_before_restart = replica.stored[ACCOUNTS]

    try:
        async with serve(config) as restarted:
            # Written before the client can resubscribe: only replay finds them.
            restarted.write("after-1")
            restarted.write("after-2")
            await _take(stream, replica, 2)
    finally:
        await stream.aclose()

    assert replica.names == ["before-1", "before-2", "after-1", "after-2"]
    assert _subscribe_replay_ids(caplog)[-1] == stored_before_restart
    assert stream.stats.reconnects >= 1


@pytest.mark.parametrize("advice", ["handshake", "none"])
async def test_unknown_client_resubscribes_from_the_stored_replay_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, advice: str
) -> None:
    """BUG-19: after ``403::Unknown client`` the resubscribe carries the id of
    the last applied event, not -1, -2 or the id the stream started with."""
    caplog.set_level(logging.INFO, logger="replicator.emulator.cometd")
    replica = Replica()
    async with serve(_config(tmp_path)) as org:
        org.streaming.faults.configure(unknown_client_advice=advice)
        org.write("stored-before-start")
        start_id = org.streaming.log.last_id
        replica.stored[ACCOUNTS] = start_id
        async with _stream(org.authenticator(), replica.replay_for) as stream:
            for name in ("101", "102", "103"):
                org.write(name)
            await _take(stream, replica, 3)
            applied = replica.stored[ACCOUNTS]

            org.streaming.faults.forget_clients()
            org.write("104")
            org.write("105")
            await _take(stream, replica, 2)

    assert replica.names == ["101", "102", "103", "104", "105"]
    assert _subscribe_replay_ids(caplog) == [start_id, applied]
    assert stream.stats.reconnects == 1
    assert stream.stats.duplicates_dropped == 0


async def test_lagging_consumer_gets_no_duplicates_after_resubscription(
    tmp_path: Path,
) -> None:
    """The replica's id lags what was handed over: the server replays the
    difference and the stream drops it (streaming-clients.md §4)."""
    replica = Replica()
    lagging: dict[str, int] = {}
    async with (
        serve(_config(tmp_path)) as org,
        _stream(org.authenticator(), lagging.get) as stream,
    ):
        for name in ("a", "b", "c"):
            org.write(name)
        await _take(stream, replica, 3)
        lagging[ACCOUNTS] = replica.events[0].replay_id  # only "a" applied

        org.streaming.faults.forget_clients()
        org.write("d")
        await _take(stream, replica, 1)

    assert replica.names == ["a", "b", "c", "d"]
    assert stream.replay_ids_sent == {ACCOUNTS: replica.events[0].replay_id}
    assert stream.stats.duplicates_dropped == 2


async def test_expired_token_reauthenticates_without_loss(tmp_path: Path) -> None:
    """``401::Authentication invalid`` on a connect: log in again, resend, go on."""
    replica = Replica()
    async with serve(_config(tmp_path)) as org:
        auth = org.authenticator()
        async with _stream(auth, replica.replay_for) as stream:
            org.write("before-expiry")
            await _take(stream, replica, 1)
            requests_before = auth.token_requests

            org.app[TOKENS_KEY].expire_all()
            org.write("after-expiry-1")
            org.write("after-expiry-2")
            await _take(stream, replica, 2)

    assert replica.names == ["before-expiry", "after-expiry-1", "after-expiry-2"]
    assert auth.token_requests > requests_before
    assert org.app[TOKENS_KEY].validate(auth.header()["Authorization"]) is not None


async def test_network_outage_longer_than_connection_timeout_recovers(
    tmp_path: Path,
) -> None:
    """The server is gone for longer than ``connection_timeout``: the stream
    reopens with backoff until it is back, then replays what it missed."""
    config = _config(tmp_path)
    replica = Replica()
    async with serve(config) as org:
        stream = _stream(
            org.authenticator(), replica.replay_for, connection_timeout=1.0
        )
        await stream.__aenter__()
        org.write("before")
        await _take(stream, replica, 1)

    async def consume() -> None:
        await _take(stream, replica, 2)

    try:
        async with asyncio.TaskGroup() as tasks:
            consumer = tasks.create_task(consume())
            await asyncio.sleep(2.5)  # down for longer than the timeout
            async with serve(config) as restarted:
                restarted.write("after-1")
                restarted.write("after-2")
                await consumer
    finally:
        await stream.aclose()

    assert replica.names == ["before", "after-1", "after-2"]
    assert stream.stats.reconnects >= 1


async def test_denied_handshakes_back_off_and_recover(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """BUG-20: handshakes denied for the concurrent-user limit are retried with
    growing gaps, never in a loop, then the stream resumes from its stored id."""
    replica = Replica()
    async with serve(_config(tmp_path)) as org:
        server = org.streaming.server
        backoff = Backoff(initial=1.0, factor=2.0, cap=4.0)
        async with _stream(
            org.authenticator(), replica.replay_for, backoff=backoff
        ) as stream:
            org.write("first")
            await _take(stream, replica, 1)

            org.streaming.faults.deny_handshakes(
                "403::Organization concurrent user limit exceeded"
            )
            org.streaming.faults.forget_clients()
            consumer = asyncio.create_task(_take(stream, replica, 1))
            times = await _handshake_times(server, seconds=8.0)
            org.streaming.faults.deny_handshakes(None)
            org.write("after-recovery")
            await consumer

    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 2 <= len(times) <= 4, times
    assert gaps[0] >= 1.0
    assert all(later >= earlier * 0.95 for earlier, later in itertools.pairwise(gaps))
    assert replica.names == ["first", "after-recovery"]
    assert any(
        r.getMessage() == "salesforce streaming concurrent user limit exceeded"
        for r in caplog.records
    )


async def _until(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds, for at most ``WAIT`` seconds."""
    for _ in range(int(WAIT / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition never held")


async def _handshake_times(server: Any, *, seconds: float) -> list[float]:
    """Return when the emulator saw each handshake during ``seconds``."""
    loop = asyncio.get_running_loop()
    start, seen, times = loop.time(), server.handshakes, []
    while loop.time() - start < seconds:
        await asyncio.sleep(0.02)
        if server.handshakes > seen:
            times.extend([loop.time()] * (server.handshakes - seen))
            seen = server.handshakes
    return times


async def test_session_forgotten_over_and_over_does_not_loop_handshakes(
    tmp_path: Path,
) -> None:
    """BUG-20's loop: each new session is lost at once. The library would
    handshake again immediately every time; the stream waits longer each time."""
    replica = Replica()
    async with serve(_config(tmp_path)) as org:
        server = org.streaming.server
        backoff = Backoff(initial=1.0, factor=2.0, cap=4.0)
        async with _stream(
            org.authenticator(), replica.replay_for, backoff=backoff
        ) as stream:
            org.write("first")
            await _take(stream, replica, 1)
            consumer = asyncio.create_task(_take(stream, replica, 1))
            before = server.handshakes

            async def forget() -> None:
                while True:
                    org.streaming.faults.forget_clients()
                    await asyncio.sleep(0.05)

            forgetter = asyncio.create_task(forget())
            await asyncio.sleep(6.0)
            forgetter.cancel()
            handshakes = server.handshakes - before
            org.write("after")
            await consumer

    assert 1 <= handshakes <= 4
    assert replica.names == ["first", "after"]


async def test_watchdog_reopens_a_session_whose_connects_never_return(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The org holds every connect far past the long-poll period: no connect
    succeeds for ``watchdog_periods`` periods, so the session is torn down and
    subscribed again, and nothing is lost."""
    replica = Replica()
    async with (
        serve(_config(tmp_path)) as org,
        _stream(
            org.authenticator(),
            replica.replay_for,
            watchdog_periods=2,
            connection_timeout=30.0,  # the library's own timeout stays out of it
        ) as stream,
    ):
        org.write("before")
        await _take(stream, replica, 1)

        org.streaming.faults.configure(long_poll_timeout=3600.0)
        consumer = asyncio.create_task(_take(stream, replica, 1))
        await _until(lambda: stream.stats.reconnects > 0)
        org.streaming.faults.reset()
        org.write("after")
        await consumer

    assert replica.names == ["before", "after"]
    assert any(
        r.getMessage() == "salesforce stream lost" and "stalled" in r.error  # type: ignore[attr-defined]
        for r in caplog.records
    )


async def test_replay_id_outside_retention_raises_with_the_channel(
    tmp_path: Path,
) -> None:
    """BUG-18: a stale id is an error for the caller to heal, not a silent -2."""
    async with serve(_config(tmp_path, replay_retention_seconds=1.0)) as org:
        org.write("expired-1")
        org.write("expired-2")
        stale = org.streaming.log.last_id - 1
        await asyncio.sleep(1.2)
        org.write("retained")
        async with _stream(org.authenticator(), lambda _: stale) as stream:
            with pytest.raises(ReplayOutOfWindowError) as gone:
                await anext(stream)
            with pytest.raises(ReplayOutOfWindowError):
                await anext(stream)  # and again: no fallback behind the caller

    assert gone.value.channel == ACCOUNTS
    assert gone.value.replay_id == stale
    assert not gone.value.retriable
    assert stream.replay_ids_sent == {ACCOUNTS: stale}
    assert stream.stats.handshakes == 1


async def test_unknown_channel_is_a_non_retriable_subscribe_error(
    tmp_path: Path,
) -> None:
    async with serve(_config(tmp_path)) as org:
        stream = SalesforceStream(
            org.authenticator(), ["/data/NoSuchChangeEvent"], lambda _: None
        )
        async with stream:
            with pytest.raises(SalesforceSubscribeError, match="Change Data Capture"):
                await anext(stream)


async def test_bad_credentials_stop_the_stream_with_a_clear_error(
    tmp_path: Path,
) -> None:
    async with serve(_config(tmp_path)) as org:
        auth = org.authenticator(password="wrong-password")
        async with _stream(auth, lambda _: None) as stream:
            with pytest.raises(SalesforceAuthError) as refused:
                await anext(stream)

    assert "security token" in str(refused.value)
    assert "wrong-password" not in str(refused.value)
    assert auth.token_requests == 1
