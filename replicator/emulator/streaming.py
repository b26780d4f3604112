"""The Streaming API of the emulator: CDC publishing and the CometD endpoint.

``setup_streaming(app)`` (called by the app factory) opens the event log in
the org's data dir, registers ``CdcPublisher`` as the state's change listener,
mounts ``/cometd/<version>`` and the streaming fault routes. The publisher
turns each committed transaction into change events (``cdc``), appends them
to the log (``eventlog``) and wakes the held long polls (``cometd``).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
from aiohttp import web

from replicator.emulator import cdc, streaming_faults
from replicator.emulator.cometd import MISSING_VERSION, CometdServer, CometdSettings
from replicator.emulator.eventlog import LOG_FILE_NAME, EventLog
from replicator.emulator.keys import CONFIG_KEY, STATE_KEY, TOKENS_KEY
from replicator.emulator.schema import OrgSchema
from replicator.emulator.state import RecordChange

__all__ = ["STREAMING_KEY", "CdcPublisher", "Streaming", "setup_streaming"]

logger = logging.getLogger(__name__)


class CdcPublisher:
    """The state's change listener: committed transactions become change events."""

    def __init__(
        self,
        schema: OrgSchema,
        log: EventLog,
        on_published: Callable[[], None],
        *,
        api_version: str = "60.0",
    ) -> None:
        self.schema = schema
        self.log = log
        self.options = cdc.BuildOptions(api_version=api_version)
        self._on_published = on_published
        # commitNumber is a system change number: increasing, never reused.
        self._commit_numbers = itertools.count(int(time.time() * 1000) * 10)
        self.published = 0

    def on_transaction(
        self, changes: list[RecordChange], *, origin: str | None, user_id: str
    ) -> None:
        events = cdc.build_events(
            changes,
            self.schema,
            origin=origin,
            user_id=user_id,
            commit_number=next(self._commit_numbers),
            options=self.options,
        )
        self.publish(events)

    def publish(self, events: list[cdc.ChangeEvent]) -> None:
        """Append built events to the log and wake the subscribers."""
        if not events:
            return
        stored = self.log.append(events, [orjson.dumps(e.payload) for e in events])
        self.published += len(stored)
        logger.debug(
            "change events published",
            extra={"count": len(stored), "replay_id": stored[-1].replay_id},
        )
        self._on_published()


@dataclass(frozen=True, slots=True)
class Streaming:
    """The streaming parts of one emulator app, for tests and fault routes."""

    log: EventLog
    server: CometdServer
    publisher: CdcPublisher
    faults: streaming_faults.StreamingFaults


STREAMING_KEY: web.AppKey[Streaming] = web.AppKey("emulator.streaming", Streaming)


def setup_streaming(app: web.Application) -> Streaming:
    """Open the event log, listen to the org's commits and mount ``/cometd``."""
    config = app[CONFIG_KEY]
    state = app[STATE_KEY]
    tokens = app[TOKENS_KEY]
    path = None if config.data_dir is None else Path(config.data_dir) / LOG_FILE_NAME
    log = EventLog(path, retention=config.replay_retention_seconds)

    def authenticate(header: str) -> str | None:
        session = tokens.validate(header)
        if session is None:
            return None
        # A token in use by a streaming client does not time out
        # (streaming_handling_errors).
        tokens.keep_alive(session.access_token)
        return session.user_id

    settings = CometdSettings(long_poll_timeout=config.long_poll_timeout_seconds)
    server = CometdServer(log, state.schema, authenticate, settings)
    publisher = CdcPublisher(
        state.schema, log, server.notify, api_version=config.api_version
    )
    state.add_listener(publisher)
    faults = streaming_faults.StreamingFaults(state, server, publisher)
    streaming = app[STREAMING_KEY] = Streaming(log, server, publisher, faults)

    app.router.add_post("/cometd", _missing_version)
    app.router.add_post("/cometd/", _missing_version)
    app.router.add_post("/cometd/{version}", server.handle)
    app.router.add_post("/cometd/{version}/", server.handle)
    streaming_faults.setup_routes(app, faults)

    async def release_polls(app: web.Application) -> None:
        server.close()

    async def close_log(app: web.Application) -> None:
        state.remove_listener(publisher)
        log.close()

    app.on_shutdown.append(release_polls)
    app.on_cleanup.append(close_log)
    logger.info(
        "streaming api ready",
        extra={"event_log": str(path), "last_replay_id": log.last_id},
    )
    return streaming


async def _missing_version(request: web.Request) -> web.Response:
    return web.Response(status=400, text=MISSING_VERSION)
