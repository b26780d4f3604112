"""Fault injection for the Streaming API: lost connections, lost sessions, gaps.

Python helpers on ``StreamingFaults`` and the same operations over HTTP
under ``/__emulator__/streaming/``: cut held long polls, forget every client,
simulate a restart (both; the event log persists), send ``GAP_`` events for
chosen records or for the next N changes, lower the ``GAP_OVERFLOW``
threshold, deny handshakes, and register an automation that sets fields in
the same transaction as an API write. ``POST .../load`` drives ``loadgen``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from replicator.emulator.cdc import BuildOptions

if TYPE_CHECKING:
    from replicator.emulator.cometd import CometdServer
    from replicator.emulator.state import OrgState
    from replicator.emulator.streaming import CdcPublisher

__all__ = ["FAULTS_KEY", "PREFIX", "StreamingFaults", "setup_routes"]

logger = logging.getLogger(__name__)

PREFIX = "/__emulator__/streaming"


class StreamingFaults:
    """Switches that make the Streaming API misbehave as a real org can."""

    def __init__(
        self, state: OrgState, server: CometdServer, publisher: CdcPublisher
    ) -> None:
        self._state = state
        self._server = server
        self._publisher = publisher
        self.gap_records: set[str] = set()
        self.gap_next = 0
        self._removers: list[Callable[[], None]] = []
        publisher.options = dataclasses.replace(publisher.options, gap=self._is_gap)
        self._default_options = publisher.options
        self._default_settings = server.settings

    def drop_connections(self) -> int:
        """Cut every held long poll; clients see a network error and reconnect."""
        count = self._server.drop_connections()
        logger.warning("streaming connections dropped", extra={"count": count})
        return count

    def forget_clients(self) -> int:
        """Forget every CometD session: next requests get ``403::Unknown client``."""
        count = self._server.forget_clients()
        logger.warning("streaming clients forgotten", extra={"count": count})
        return count

    def restart(self) -> None:
        """Act as a server restart: connections cut, sessions lost, log kept."""
        self._server.drop_connections()
        self._server.forget_clients()
        logger.warning("streaming restarted")

    def gap_for(self, record_ids: Iterable[str]) -> None:
        """Send changes of these records as ``GAP_`` events until ``reset``."""
        self.gap_records.update(_id18(r) for r in record_ids)

    def gap_next_changes(self, count: int) -> None:
        """Send the next ``count`` record changes as ``GAP_`` events."""
        self.gap_next = count

    def set_overflow_threshold(self, threshold: int) -> None:
        """Overflow transactions with more than ``threshold`` changes."""
        self._publisher.options = dataclasses.replace(
            self._publisher.options, overflow_threshold=threshold
        )

    def deny_handshakes(self, reason: str | None) -> None:
        """Deny handshakes, giving ``reason`` as ``failureReason``; None ends it."""
        self._server.deny_handshakes = reason

    def configure(self, **settings: Any) -> None:
        """Change ``CometdSettings`` fields, e.g. ``long_poll_timeout=1.0``."""
        self._server.settings = dataclasses.replace(self._server.settings, **settings)

    def add_automation(self, object_name: str, values: Mapping[str, Any]) -> None:
        """Set ``values`` on every API write of ``object_name``, in its transaction.

        Plays a record-triggered flow: the extra fields land in the same
        change event as the write, under the writer's ``changeOrigin``.
        """
        fixed = dict(values)

        def automation(
            change_type: str,
            before: Mapping[str, Any] | None,
            after: Mapping[str, Any],
        ) -> Mapping[str, Any] | None:
            return {k: v for k, v in fixed.items() if after.get(k) != v}

        self._removers.append(self._state.add_automation(object_name, automation))

    def reset(self) -> None:
        """Undo every fault: no gaps, default thresholds, settings, no automations."""
        self.gap_records.clear()
        self.gap_next = 0
        self._publisher.options = self._default_options
        self._server.settings = self._default_settings
        self._server.deny_handshakes = None
        for remove in self._removers:
            remove()
        self._removers.clear()

    def status(self) -> dict[str, Any]:
        options: BuildOptions = self._publisher.options
        return {
            "clients": len(self._server.client_ids),
            "handshakes": self._server.handshakes,
            "lastReplayId": self._server.log.last_id,
            "purgedThrough": self._server.log.purged_through,
            "published": self._publisher.published,
            "gapRecords": sorted(self.gap_records),
            "gapNext": self.gap_next,
            "overflowThreshold": options.overflow_threshold,
            "denyHandshakes": self._server.deny_handshakes,
            "settings": dataclasses.asdict(self._server.settings),
        }

    def _is_gap(self, object_name: str, record_id: str) -> bool:
        if record_id in self.gap_records:
            return True
        if self.gap_next > 0:
            self.gap_next -= 1
            return True
        return False


def _id18(record_id: str) -> str:
    from replicator.emulator.ids import normalize_id

    try:
        return normalize_id(record_id)
    except ValueError:
        return record_id


FAULTS_KEY: web.AppKey[StreamingFaults] = web.AppKey(
    "emulator.streaming_faults", StreamingFaults
)


def setup_routes(app: web.Application, faults: StreamingFaults) -> None:
    """Mount the fault routes under ``/__emulator__/streaming``."""
    app[FAULTS_KEY] = faults
    app.router.add_get(PREFIX, _status)
    app.router.add_post(f"{PREFIX}/drop-connections", _drop)
    app.router.add_post(f"{PREFIX}/forget-clients", _forget)
    app.router.add_post(f"{PREFIX}/restart", _restart)
    app.router.add_post(f"{PREFIX}/gap", _gap)
    app.router.add_post(f"{PREFIX}/overflow", _overflow)
    app.router.add_post(f"{PREFIX}/handshakes", _handshakes)
    app.router.add_post(f"{PREFIX}/settings", _settings)
    app.router.add_post(f"{PREFIX}/automation", _automation)
    app.router.add_post(f"{PREFIX}/reset", _reset)
    app.router.add_post(f"{PREFIX}/load", _load)


async def _status(request: web.Request) -> web.Response:
    return _json(request.app[FAULTS_KEY].status())


async def _drop(request: web.Request) -> web.Response:
    return _json({"dropped": request.app[FAULTS_KEY].drop_connections()})


async def _forget(request: web.Request) -> web.Response:
    return _json({"forgotten": request.app[FAULTS_KEY].forget_clients()})


async def _restart(request: web.Request) -> web.Response:
    request.app[FAULTS_KEY].restart()
    return _json({"restarted": True})


async def _gap(request: web.Request) -> web.Response:
    """Body ``{"recordIds": [...]}`` and/or ``{"next": N}``."""
    faults, body = request.app[FAULTS_KEY], await _body(request)
    faults.gap_for(body.get("recordIds", ()))
    if "next" in body:
        faults.gap_next_changes(int(body["next"]))
    return _json(faults.status())


async def _overflow(request: web.Request) -> web.Response:
    """Body ``{"threshold": N}``."""
    faults, body = request.app[FAULTS_KEY], await _body(request)
    faults.set_overflow_threshold(int(body["threshold"]))
    return _json(faults.status())


async def _handshakes(request: web.Request) -> web.Response:
    """Body ``{"failureReason": "403::..."}``; ``null`` accepts handshakes again."""
    faults, body = request.app[FAULTS_KEY], await _body(request)
    faults.deny_handshakes(body.get("failureReason"))
    return _json(faults.status())


async def _settings(request: web.Request) -> web.Response:
    """Body: ``CometdSettings`` fields, e.g. ``{"long_poll_timeout": 1.0}``."""
    faults, body = request.app[FAULTS_KEY], await _body(request)
    try:
        faults.configure(**body)
    except TypeError as exc:
        return _json({"error": str(exc)}, status=400)
    return _json(faults.status())


async def _automation(request: web.Request) -> web.Response:
    """Body ``{"object": "Account", "values": {"Rating": "Hot"}}``."""
    faults, body = request.app[FAULTS_KEY], await _body(request)
    faults.add_automation(str(body["object"]), dict(body["values"]))
    return _json(faults.status())


async def _reset(request: web.Request) -> web.Response:
    request.app[FAULTS_KEY].reset()
    return _json(request.app[FAULTS_KEY].status())


async def _load(request: web.Request) -> web.Response:
    """Body ``{"count": N, "rate": R, "perTransaction": K, "object": "Account"}``.

    Makes N real record updates (see ``loadgen``) and answers when done.
    """
    from replicator.emulator.keys import CONFIG_KEY, STATE_KEY
    from replicator.emulator.loadgen import LoadGenerator

    body = await _body(request)
    state = request.app[STATE_KEY]
    user = state.find_user(request.app[CONFIG_KEY].username)
    if user is None:
        return _json({"error": "no user to write as"}, status=400)
    generator = LoadGenerator(
        state, str(user["Id"]), object_name=str(body.get("object", "Account"))
    )
    result = await generator.run(
        int(body.get("count", 1000)),
        rate=float(body.get("rate", 0.0)),
        per_transaction=int(body.get("perTransaction", 1)),
    )
    return _json(dataclasses.asdict(result))


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    body = orjson.loads(raw) if raw else {}
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="expected a JSON object")
    return body


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json"
    )
