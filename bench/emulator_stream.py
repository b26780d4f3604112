"""Events per second from the emulator's Streaming API to 1 and 5 subscribers.

Runs the emulator in a child process on 127.0.0.1 with an in-memory org and
measures, for a bare long-polling subscriber (aiohttp, no client library)
and for aiosfstream-ng:

- replay: N retained events replayed with -2;
- live: subscribers on -1 while the emulator makes N record updates
  (100 per transaction) through its state.

Usage: python bench/emulator_stream.py [--events 50000] [--client-events 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replicator.emulator.app import EmulatorConfig, create_app

CHANNEL = "/data/AccountChangeEvent"
Subscriber = Callable[[str, EmulatorConfig, int, int, asyncio.Event], Awaitable[int]]


def _serve(config: EmulatorConfig, ready: Any) -> None:
    from aiohttp import web

    async def main() -> None:
        runner = web.AppRunner(create_app(config))
        await runner.setup()
        await web.TCPSite(runner, config.host, config.port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


async def _token(http: aiohttp.ClientSession, url: str, config: EmulatorConfig) -> str:
    form = {
        "grant_type": "password",
        "client_id": config.client_id,
        "client_secret": config.client_secret,
        "username": config.username,
        "password": config.password + config.security_token,
    }
    async with http.post(url + "/services/oauth2/token", data=form) as response:
        return str((await response.json())["access_token"])


async def bare_subscriber(
    url: str,
    config: EmulatorConfig,
    replay: int,
    last_id: int,
    subscribed: asyncio.Event,
) -> int:
    """Handshake, subscribe and long-poll until ``last_id`` arrives; return count."""
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": "Bearer " + await _token(http, url, config)}
        endpoint = url + "/cometd/60.0"

        async def post(message: dict[str, Any]) -> list[dict[str, Any]]:
            async with http.post(
                endpoint,
                data=orjson.dumps([message]),
                headers=headers | {"Content-Type": "application/json"},
            ) as r:
                return orjson.loads(await r.read())  # type: ignore[no-any-return]

        (hs,) = await post(
            {
                "channel": "/meta/handshake",
                "version": "1.0",
                "supportedConnectionTypes": ["long-polling"],
            }
        )
        client_id = hs["clientId"]
        connect = {
            "channel": "/meta/connect",
            "clientId": client_id,
            "connectionType": "long-polling",
        }
        await post(connect)
        await post(
            {
                "channel": "/meta/subscribe",
                "clientId": client_id,
                "subscription": CHANNEL,
                "ext": {"replay": {CHANNEL: replay}},
            }
        )
        subscribed.set()
        count = 0
        while True:
            replies = await post(connect)
            for message in replies:
                if message.get("channel") == CHANNEL:
                    count += 1
                    if message["data"]["event"]["replayId"] >= last_id:
                        return count


async def aiosfstream_subscriber(
    url: str,
    config: EmulatorConfig,
    replay: int,
    last_id: int,
    subscribed: asyncio.Event,
) -> int:
    from aiosfstream_ng import ReplayOption

    from tests.emulator.sfclient import EmulatorAuthenticator, EmulatorClient

    auth = EmulatorAuthenticator(
        url,
        consumer_key=config.client_id,
        consumer_secret=config.client_secret,
        username=config.username,
        password=config.password + config.security_token,
    )
    option = ReplayOption.ALL_EVENTS if replay == -2 else ReplayOption.NEW_EVENTS
    client = EmulatorClient(auth, replay=option, max_pending_count=0)
    await client.open()
    await client.subscribe(CHANNEL)
    subscribed.set()
    count = 0
    try:
        while True:
            message = await client.receive()
            if message.get("channel") == CHANNEL:
                count += 1
                if message["data"]["event"]["replayId"] >= last_id:
                    return count
    finally:
        await client.close()


async def _status(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url + "/__emulator__/streaming") as response:
        return await response.json()  # type: ignore[no-any-return]


async def _load(http: aiohttp.ClientSession, url: str, count: int) -> None:
    body = {"count": count, "perTransaction": 100}
    async with http.post(url + "/__emulator__/streaming/load", json=body) as response:
        response.raise_for_status()
        await response.read()


async def measure(
    url: str,
    config: EmulatorConfig,
    subscriber: Subscriber,
    subscribers: int,
    events: int,
    mode: str,
) -> tuple[float, int]:
    """Return (events/s per subscriber, events each received) for one scenario."""
    async with aiohttp.ClientSession() as http:
        if mode == "replay":
            await _load(http, url, events)
            last_id = (await _status(http, url))["lastReplayId"]
            ready = [asyncio.Event() for _ in range(subscribers)]
            started = time.perf_counter()
            counts = await asyncio.gather(
                *(subscriber(url, config, -2, last_id, e) for e in ready)
            )
            seconds = time.perf_counter() - started
            return min(counts) / seconds, min(counts)

        before = (await _status(http, url))["lastReplayId"]
        # Pool records (100 creates) come first when the pool is new.
        ready = [asyncio.Event() for _ in range(subscribers)]
        last_id = before + events + 100
        tasks = [
            asyncio.ensure_future(subscriber(url, config, -1, last_id, e))
            for e in ready
        ]
        await asyncio.gather(*(e.wait() for e in ready))
        started = time.perf_counter()
        await _load(http, url, events)
        counts = await asyncio.gather(*tasks)
        seconds = time.perf_counter() - started
        return min(counts) / seconds, min(counts)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(config: EmulatorConfig) -> multiprocessing.Process:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=_serve, args=(config, ready), daemon=True)
    process.start()
    if not ready.wait(60):
        process.kill()
        raise SystemExit("emulator did not start")
    return process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument(
        "--client-events",
        type=int,
        default=10_000,
        help="events for the aiosfstream-ng runs (slower client)",
    )
    args = parser.parse_args(argv)

    results: dict[tuple[str, str, int], float] = {}
    plan = [
        ("bare", bare_subscriber, args.events),
        ("aiosfstream-ng", aiosfstream_subscriber, args.client_events),
    ]
    for mode in ("replay", "live"):
        for name, subscriber, events in plan:
            for subscribers in (1, 5):
                # A fresh emulator per run: each run's log holds only its events.
                config = EmulatorConfig(
                    port=_free_port(), long_poll_timeout_seconds=5.0
                )
                process = _start(config)
                try:
                    rate, received = asyncio.run(
                        measure(
                            f"http://127.0.0.1:{config.port}",
                            config,
                            subscriber,
                            subscribers,
                            events,
                            mode,
                        )
                    )
                finally:
                    process.kill()
                    process.join()
                results[(mode, name, subscribers)] = rate
                print(
                    f"{mode:6} {name:15} subscribers={subscribers} events={events:6} "
                    f"received/subscriber={received:6} "
                    f"{rate:10,.0f} events/s per subscriber "
                    f"{rate * subscribers:10,.0f} events/s total",
                    flush=True,
                )

    print()
    for mode in ("replay", "live"):
        bare1 = results[(mode, "bare", 1)]
        bare5 = results[(mode, "bare", 5)]
        aio1 = results[(mode, "aiosfstream-ng", 1)]
        aio5 = results[(mode, "aiosfstream-ng", 5)]
        print(
            f"{mode:6} bare 5/1 total {bare5 * 5 / bare1:4.2f}x; "
            f"aiosfstream-ng 5/1 total {aio5 * 5 / aio1:4.2f}x; "
            f"aiosfstream-ng/bare (1 subscriber) {aio1 / bare1:4.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
