"""aiosfstream-ng, an independent Salesforce streaming client, against the emulator.

The client authenticates with the password flow, subscribes over CometD and
must see what it would see from an org: replay, resume after a server
restart, re-handshake after ``403::Unknown client``, the invalid-replay error.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiosfstream_ng import ReplayMarker, ReplayOption
from aiosfstream_ng.exceptions import ServerError

from replicator.emulator.app import EmulatorConfig, create_app
from replicator.emulator.keys import STATE_KEY
from replicator.emulator.state import OrgState
from replicator.emulator.streaming import STREAMING_KEY, Streaming
from tests.emulator.sfclient import EmulatorAuthenticator, EmulatorClient
from tests.fixtures.emulator import ServeEmulator

pytestmark = pytest.mark.integration

ACCOUNTS = "/data/AccountChangeEvent"
RECEIVE_TIMEOUT = 10.0


class Emulator:
    """One served emulator app, with the parts these tests reach into."""

    def __init__(self, app: web.Application, url: str, config: EmulatorConfig) -> None:
        self.app = app
        self.url = url
        self.config = config

    @property
    def state(self) -> OrgState:
        return self.app[STATE_KEY]

    @property
    def streaming(self) -> Streaming:
        return self.app[STREAMING_KEY]

    def write(self, name: str, **values: Any) -> str:
        with self.state.transaction(user_id=_user_id(self.state)) as tx:
            return tx.create("Account", {"Name": name, **values})


def _user_id(state: OrgState) -> str:
    user = state.find_user(EmulatorConfig().username)
    assert user is not None
    return str(user["Id"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@asynccontextmanager
async def serve_on_port(config: EmulatorConfig) -> AsyncIterator[Emulator]:
    """Serve on ``config.port``: a restart must come back on the same port,
    which the shared ``serve_emulator`` fixture (port 0) cannot do."""
    runner = web.AppRunner(create_app(config), shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, config.host, config.port).start()
    try:
        yield Emulator(runner.app, f"http://127.0.0.1:{config.port}", config)
    finally:
        await runner.cleanup()


@pytest.fixture
def serve(serve_emulator: ServeEmulator) -> Callable[..., Any]:
    """Adapt the shared fixture's ``Served`` to ``Emulator``."""

    @asynccontextmanager
    async def served(config: EmulatorConfig) -> AsyncIterator[Emulator]:
        async with serve_emulator(config) as running:
            yield Emulator(running.app, running.url, running.config)

    return served


def _config(tmp_path: Path, **overrides: Any) -> EmulatorConfig:
    return EmulatorConfig(
        port=_free_port(),
        data_dir=tmp_path / "org",
        long_poll_timeout_seconds=1.0,
        **overrides,
    )


def _client(
    emulator: Emulator, replay: Any = ReplayOption.NEW_EVENTS, **kwargs: Any
) -> EmulatorClient:
    config = emulator.config
    auth = EmulatorAuthenticator(
        emulator.url,
        consumer_key=config.client_id,
        consumer_secret=config.client_secret,
        username=config.username,
        password=config.password + config.security_token,
    )
    return EmulatorClient(auth, replay=replay, connection_timeout=10, **kwargs)


async def _receive(client: EmulatorClient, count: int) -> list[dict[str, Any]]:
    messages = []
    async with asyncio.timeout(RECEIVE_TIMEOUT):
        for _ in range(count):
            messages.append(await client.receive())
    return messages


def _names(emulator: Emulator, messages: list[dict[str, Any]]) -> list[str]:
    return [m["data"]["payload"]["Name"] for m in messages]


async def test_subscribe_receives_new_events_with_headers(
    tmp_path: Path, serve: Callable[..., Any]
) -> None:
    async with serve(_config(tmp_path)) as emulator:
        client = _client(emulator)
        await client.open()
        await client.subscribe(ACCOUNTS)

        record_id = emulator.write("Live Account", Phone="555-0100")
        (message,) = await _receive(client, 1)
        await client.close()

    assert message["channel"] == ACCOUNTS
    header = message["data"]["payload"]["ChangeEventHeader"]
    assert header["changeType"] == "CREATE"
    assert header["recordIds"] == [record_id]
    assert message["data"]["payload"]["Phone"] == "555-0100"


async def test_replay_all_events_delivers_retained_ones_first(
    tmp_path: Path, serve: Callable[..., Any]
) -> None:
    async with serve(_config(tmp_path)) as emulator:
        for name in ("one", "two", "three"):
            emulator.write(name)
        client = _client(emulator, ReplayOption.ALL_EVENTS)
        await client.open()
        await client.subscribe(ACCOUNTS)

        messages = await _receive(client, 3)
        await client.close()

    assert _names(emulator, messages) == ["one", "two", "three"]
    ids = [m["data"]["event"]["replayId"] for m in messages]
    assert ids == sorted(ids)


async def test_client_resumes_by_replay_id_after_emulator_restart(
    tmp_path: Path,
) -> None:
    """Events written while the client reconnects are delivered from its stored id."""
    config = _config(tmp_path)
    storage: dict[str, ReplayMarker] = {}
    async with serve_on_port(config) as emulator:
        client = _client(emulator, storage)
        await client.open()
        await client.subscribe(ACCOUNTS)
        emulator.write("before-1")
        emulator.write("before-2")
        before = await _receive(client, 2)

    async with serve_on_port(config) as restarted:
        # Written before the client can resubscribe: only replay finds them.
        restarted.write("after-1")
        restarted.write("after-2")
        after = await _receive(client, 2)
        await client.close()

    assert _names(restarted, before) == ["before-1", "before-2"]
    assert _names(restarted, after) == ["after-1", "after-2"]
    assert storage[ACCOUNTS].replay_id == after[-1]["data"]["event"]["replayId"]


async def test_client_rehandshakes_after_unknown_client_without_loss(
    tmp_path: Path, serve: Callable[..., Any]
) -> None:
    async with serve(_config(tmp_path)) as emulator:
        client = _client(emulator, {})
        await client.open()
        await client.subscribe(ACCOUNTS)
        emulator.write("first")
        first = await _receive(client, 1)
        handshakes = emulator.streaming.server.handshakes

        emulator.streaming.faults.forget_clients()
        emulator.write("while-forgotten")
        rest = await _receive(client, 1)
        await client.close()

    assert _names(emulator, first + rest) == ["first", "while-forgotten"]
    assert emulator.streaming.server.handshakes > handshakes


async def test_client_reconnects_after_dropped_connections(
    tmp_path: Path, serve: Callable[..., Any]
) -> None:
    async with serve(_config(tmp_path)) as emulator:
        client = _client(emulator, {})
        await client.open()
        await client.subscribe(ACCOUNTS)

        await asyncio.sleep(0.1)
        emulator.streaming.faults.drop_connections()
        emulator.write("after-drop")
        messages = await _receive(client, 1)
        await client.close()

    assert _names(emulator, messages) == ["after-drop"]


async def test_replay_id_outside_retention_is_refused_and_fallback_replays_all(
    tmp_path: Path, serve: Callable[..., Any]
) -> None:
    config = _config(tmp_path, replay_retention_seconds=1.5)
    async with serve(config) as emulator:
        # Two expired events, so that the stored id is not 0 (which the
        # library treats as "no id" and does not send).
        emulator.write("expired-1")
        emulator.write("expired-2")
        stale = emulator.streaming.log.last_id
        await asyncio.sleep(1.6)
        emulator.write("retained")
        stored = {ACCOUNTS: ReplayMarker("1", stale - 1)}

        strict = _client(emulator, dict(stored))
        await strict.open()
        with pytest.raises(ServerError) as refused:
            await strict.subscribe(ACCOUNTS)
        await strict.close()

        lenient = _client(
            emulator, dict(stored), replay_fallback=ReplayOption.ALL_EVENTS
        )
        await lenient.open()
        await lenient.subscribe(ACCOUNTS)
        messages = await _receive(lenient, 1)
        await lenient.close()

    error = refused.value.args[1]["error"]
    assert error.startswith(
        f"400::The replayId {{{stale - 1}}} you provided was invalid."
    )
    assert _names(emulator, messages) == ["retained"]
