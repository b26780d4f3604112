"""Bayeux 1.0 long-polling at ``/cometd/<version>`` as Salesforce serves it.

Handshake, connect, subscribe (with the replay extension), unsubscribe and
disconnect, with Salesforce's error strings inside HTTP 200 replies
(``reference/salesforce.md`` section 2). A session's first ``/meta/connect``
is answered at once with advice; later ones are held until events arrive or
the long-poll timeout ends. Delivery is pulled from the ``EventLog``: each
subscription keeps the replay id it has delivered up to, so replay (-2, a
stored id) and live events take one path and a slow client only lags.
Sessions live in memory only: after a restart every client is unknown.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import orjson
from aiohttp import web

from replicator.emulator.cdc import ALL_CHANGES_CHANNEL, channel_for
from replicator.emulator.eventlog import EventLog, InvalidReplayId, StoredEvent
from replicator.emulator.schema import OrgSchema

__all__ = [
    "Authenticate",
    "CometdServer",
    "CometdSettings",
    "replay_invalid_error",
]

logger = logging.getLogger(__name__)

#: Return the user id of an ``Authorization`` header value (``Bearer``, ``OAuth``
#: or bare token), or ``None`` when the token is invalid or expired.
Authenticate = Callable[[str], str | None]

# Error strings, exactly as Salesforce sends them (reference section 2.10).
AUTH_REQUIRED = "401::Request requires authentication"
AUTH_INVALID = "401::Authentication invalid"
HANDSHAKE_DENIED = "403::Handshake denied"
UNKNOWN_CLIENT = "403::Unknown client"
CHANNEL_NOT_SPECIFIED = "400::Channel name not specified"
CHANNEL_NO_SLASH = "400::Channel subscriptions must start with a leading '/'"
# Reference section 8.1: captures differ on one or two spaces after "invalid.";
# the emulator follows the current documentation (one space).
_REPLAY_INVALID = (
    "400::The replayId {{{}}} you provided was invalid. Please provide a valid ID, "
    "-2 to replay all events, or -1 to replay only new events."
)
_REPLAY_NOT_IN_MAP = (
    "400::The replayId for channel {{{}}} wasn't found using the provided replay "
    "ID map {{{}}}. Ensure that the channel name you provided in the replay map "
    "is valid and matches the channel name used for subscribing."
)
_NO_SUCH_CHANNEL = (
    "400::The channel you requested to subscribe to does not exist {{{}}}"
)
_NOT_SUPPORTED = "403::Publish denied"  # [UNCONFIRMED]: no capture of a CDC publish

MISSING_VERSION = "API version in the URI is mandatory. URI format: '/cometd/68.0'"
OLD_VERSION = (
    "Unsupported API version. Only API versions '37.0' and later are supported."
)
TOO_LARGE = "Maximum Request Size Exceeded"
COOKIE_NAME = "BAYEUX_BROWSER"
_ID_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def replay_invalid_error(replay_id: int) -> str:
    """Return the subscribe error for a replay id outside the retention window."""
    return _REPLAY_INVALID.format(replay_id)


@dataclass(frozen=True, slots=True)
class CometdSettings:
    """Timing and limits of the streaming endpoint (seconds, bytes, counts)."""

    long_poll_timeout: float = 110.0  # streaming/limits: socket timeout
    max_interval: float = 40.0  # a client silent this long is forgotten
    max_events_per_response: int = 1000  # undocumented in Salesforce
    max_request_bytes: int = 32_768
    strict_array_body: bool = False  # Winter '27: a bare object body is a 400
    require_cookie: bool = False
    unknown_client_advice: str = "handshake"  # or "none", also seen in the field
    min_api_version: float = 37.0
    cdc_min_api_version: float = 44.0  # /data/ channels exist from 44.0


@dataclass(eq=False)
class _Session:
    client_id: str
    user_id: str
    browser: str
    subscriptions: dict[str, int] = field(default_factory=dict)  # channel -> cursor
    connected: bool = False
    held: _Hold | None = None  # the connect being held, if any
    last_seen: float = 0.0


@dataclass(eq=False, slots=True)
class _Hold:
    """A held ``/meta/connect``: set to answer it, with a reason when early."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""

    def release(self, reason: str = "") -> None:
        self.reason = self.reason or reason
        self.event.set()


class _Dropped(Exception):
    """The connection of a held long poll is to be cut, not answered."""


class CometdServer:
    """The Streaming API endpoint of one emulated org."""

    def __init__(
        self,
        log: EventLog,
        schema: OrgSchema,
        authenticate: Authenticate,
        settings: CometdSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.schema = schema
        self.settings = settings or CometdSettings()
        self._authenticate = authenticate
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self.handshakes = 0
        #: Fault hook: when set, handshakes are denied with this failure reason.
        self.deny_handshakes: str | None = None

    # -- control --------------------------------------------------------------

    def notify(self) -> None:
        """Wake the held connects: new events are in the log."""
        for session in self._sessions.values():
            if session.held is not None and session.subscriptions:
                session.held.release()

    def forget_clients(self) -> int:
        """Forget every session; held connects get ``403::Unknown client``."""
        sessions = list(self._sessions.values())
        self._sessions.clear()
        self._release(sessions, "forgotten")
        return len(sessions)

    def drop_connections(self) -> int:
        """Cut the TCP connection of every held long poll, as a network fault does."""
        held = [s for s in self._sessions.values() if s.held is not None]
        self._release(held, "dropped")
        return len(held)

    def close(self) -> None:
        """Release every held connect at shutdown (their connections are cut)."""
        self._release(list(self._sessions.values()), "dropped")
        self._sessions.clear()

    @property
    def client_ids(self) -> list[str]:
        return list(self._sessions)

    @staticmethod
    def _release(sessions: list[_Session], reason: str) -> None:
        for session in sessions:
            if session.held is not None:
                session.held.release(reason)

    # -- HTTP -----------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one POST to ``/cometd/<version>``."""
        version = request.match_info.get("version", "").strip("/")
        problem = self._check_version(version)
        if problem is not None:
            return web.Response(status=400, text=problem)
        if (request.content_length or 0) > self.settings.max_request_bytes:
            return web.Response(status=413, text=TOO_LARGE)
        raw = await request.read()
        if len(raw) > self.settings.max_request_bytes:
            return web.Response(status=413, text=TOO_LARGE)
        messages = self._parse(raw, request.content_type)
        if isinstance(messages, web.Response):
            return messages

        header = request.headers.get("Authorization", "").strip()
        if not header:
            return _reply([orjson.dumps({"error": AUTH_REQUIRED, "successful": False})])
        # Checked on every request: a token that expired or was revoked fails
        # the next connect (streaming_handling_errors).
        user_id = self._authenticate(header)
        api_version = float(version)
        ctx = _Request(user_id, api_version, request.cookies.get(COOKIE_NAME))

        parts: list[bytes] = []
        replies: list[bytes] = []
        try:
            for message in messages:
                replies.append(await self._dispatch(message, ctx, parts))
        except _Dropped:
            _cut(request)
            raise asyncio.CancelledError from None
        response = _reply(parts + replies)
        if ctx.new_browser is not None:
            response.set_cookie(COOKIE_NAME, ctx.new_browser, httponly=True)
        return response

    def _check_version(self, version: str) -> str | None:
        if not version:
            return MISSING_VERSION
        try:
            number = float(version)
        except ValueError:
            return MISSING_VERSION
        return OLD_VERSION if number < self.settings.min_api_version else None

    def _parse(
        self, raw: bytes, content_type: str
    ) -> list[dict[str, Any]] | web.Response:
        if content_type == "application/x-www-form-urlencoded":
            form = parse_qs(raw.decode("utf-8", "replace"))
            raw = form.get("message", [""])[0].encode()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return web.Response(status=400, text="Invalid JSON in request body")
        if isinstance(body, dict) and not self.settings.strict_array_body:
            body = [body]
        if not isinstance(body, list) or not all(isinstance(m, dict) for m in body):
            return web.Response(status=400, text="Request body must be a JSON array")
        return body

    # -- Bayeux ---------------------------------------------------------------

    async def _dispatch(
        self, message: dict[str, Any], ctx: _Request, parts: list[bytes]
    ) -> bytes:
        channel = message.get("channel")
        if channel == "/meta/handshake":
            return orjson.dumps(self._handshake(message, ctx))
        session = self._session(message.get("clientId"))
        if session is None:
            return orjson.dumps(self._unknown_client(message))
        if ctx.user_id is None:
            return orjson.dumps(self._auth_invalid(message, session))
        if self.settings.require_cookie and ctx.browser != session.browser:
            reply = _base(message, session)
            reply["error"] = (
                f"400::Client {session.client_id} has established a session, "
                f"but no {COOKIE_NAME} cookie present"
            )
            return orjson.dumps(reply)
        session.last_seen = self._clock()
        if channel == "/meta/connect":
            reply = await self._connect(message, session, parts)
        elif channel == "/meta/subscribe":
            reply = self._subscribe(message, session, ctx)
        elif channel == "/meta/unsubscribe":
            reply = self._unsubscribe(message, session)
        elif channel == "/meta/disconnect":
            reply = self._disconnect(message, session)
        else:
            reply = _base(message, session)
            reply["error"] = _NOT_SUPPORTED
        session.last_seen = self._clock()
        return orjson.dumps(reply)

    def _session(self, client_id: object) -> _Session | None:
        session = self._sessions.get(client_id) if isinstance(client_id, str) else None
        if session is None:
            return None
        idle = self._clock() - session.last_seen
        if session.held is None and idle > self.settings.max_interval:
            del self._sessions[session.client_id]
            logger.info("cometd client expired", extra={"client_id": session.client_id})
            return None
        return session

    def _handshake(self, message: dict[str, Any], ctx: _Request) -> dict[str, Any]:
        self.handshakes += 1
        reason = AUTH_INVALID if ctx.user_id is None else self.deny_handshakes
        if ctx.user_id is None or reason is not None:
            reply: dict[str, Any] = {
                "ext": {
                    "sfdc": {"failureReason": reason},
                    "replay": True,
                    "payload.format": True,
                },
                "advice": {"reconnect": "none"},
                "channel": "/meta/handshake",
            }
            _echo_id(message, reply)
            reply.update(error=HANDSHAKE_DENIED, successful=False)
            return reply
        self._expire_idle()
        client_id = _client_id()
        ctx.new_browser = ctx.browser or secrets.token_hex(12)
        self._sessions[client_id] = _Session(
            client_id, ctx.user_id, ctx.new_browser, last_seen=self._clock()
        )
        logger.info("cometd handshake", extra={"client_id": client_id})
        reply = {
            "ext": {"replay": True, "payload.format": True},
            "minimumVersion": "1.0",
            "clientId": client_id,
            "supportedConnectionTypes": ["long-polling"],
            "channel": "/meta/handshake",
        }
        _echo_id(message, reply)
        reply.update(version="1.0", successful=True)
        return reply

    def _expire_idle(self) -> None:
        for client_id in list(self._sessions):
            self._session(client_id)

    def _unknown_client(self, message: dict[str, Any]) -> dict[str, Any]:
        advice = self.settings.unknown_client_advice
        reply: dict[str, Any] = {}
        if advice == "none" and isinstance(message.get("clientId"), str):
            reply["clientId"] = message["clientId"]
        reply["advice"] = {"interval": 0, "reconnect": advice}
        reply["channel"] = message.get("channel")
        _echo_id(message, reply)
        reply.update(error=UNKNOWN_CLIENT, successful=False)
        return reply

    def _auth_invalid(
        self, message: dict[str, Any], session: _Session
    ) -> dict[str, Any]:
        reply = _base(message, session)
        if message.get("channel") == "/meta/connect":
            reply["advice"] = {"reconnect": "none", "interval": 0}
        reply["error"] = AUTH_INVALID
        return reply

    async def _connect(
        self, message: dict[str, Any], session: _Session, parts: list[bytes]
    ) -> dict[str, Any]:
        connection_type = message.get("connectionType")
        if connection_type != "long-polling":
            reply = _base(message, session)
            reply["error"] = f"400::Invalid connection type {{{connection_type}}}"
            return reply
        timeout = self.settings.long_poll_timeout
        advice = message.get("advice")
        if isinstance(advice, dict) and isinstance(advice.get("timeout"), int | float):
            timeout = min(timeout, advice["timeout"] / 1000)
        first = not session.connected
        session.connected = True

        events = self._take(session)
        if not events and not first and timeout > 0:
            try:
                async with asyncio.timeout(timeout):
                    outcome = await self._hold(session)
            except TimeoutError:
                outcome = ""
            if outcome == "forgotten":
                return self._unknown_client(message)
            if outcome == "dropped":
                raise _Dropped
            if outcome in ("disconnected", "superseded"):
                reply = _base(message, session)
                reply["advice"] = {"reconnect": "none", "interval": 0}
                reply["successful"] = True
                return reply
            events = self._take(session)
        parts.extend(events)
        reply = _base(message, session)
        if first:
            reply["advice"] = {
                "interval": 0,
                "timeout": int(self.settings.long_poll_timeout * 1000),
                "reconnect": "retry",
            }
        reply["successful"] = True
        return reply

    async def _hold(self, session: _Session) -> str:
        """Wait for events or a release; return the release reason ("" for events).

        The caller bounds the wait with ``asyncio.timeout``.
        """
        if session.held is not None:  # one outstanding connect per client
            session.held.release("superseded")
        held = session.held = _Hold()
        try:
            await held.event.wait()
        finally:
            if session.held is held:
                session.held = None
        return held.reason

    def _take(self, session: _Session) -> list[bytes]:
        """Return the next delivery of data messages and advance the cursors."""
        room = self.settings.max_events_per_response
        picked: list[tuple[int, bytes]] = []
        for channel, cursor in list(session.subscriptions.items()):
            if room <= 0:
                break
            events, scanned = self.log.read_after(cursor, channel, room)
            session.subscriptions[channel] = scanned
            picked.extend((e.replay_id, _data_message(e, channel)) for e in events)
            room -= len(events)
        if len(session.subscriptions) > 1:
            picked.sort(key=lambda item: item[0])
        return [message for _, message in picked]

    def _subscribe(
        self, message: dict[str, Any], session: _Session, ctx: _Request
    ) -> dict[str, Any]:
        subscription = message.get("subscription")
        reply = _base(message, session)
        reply["subscription"] = subscription
        error = self._subscription_error(subscription, ctx.api_version)
        if error is None:
            assert isinstance(subscription, str)
            try:
                replay = self._replay_id(message, subscription)
                cursor = self.log.start_position(replay)
            except _SubscribeError as exc:
                error = str(exc)
            except InvalidReplayId as exc:
                error = replay_invalid_error(exc.replay_id)
        if error is not None:
            reply["error"] = error
            return reply
        assert isinstance(subscription, str)
        session.subscriptions[subscription] = cursor
        if session.held is not None and cursor < self.log.last_id:
            # A replay backlog is waiting: answer the held connect now, as a
            # CometD server delivers as soon as the subscription exists.
            session.held.release()
        logger.info(
            "cometd subscribe",
            extra={
                "client_id": session.client_id,
                "channel": subscription,
                "replay_id": replay,
            },
        )
        reply["successful"] = True
        return reply

    def _subscription_error(
        self, subscription: object, api_version: float
    ) -> str | None:
        if not isinstance(subscription, str) or not subscription:
            return CHANNEL_NOT_SPECIFIED
        if not subscription.startswith("/"):
            return CHANNEL_NO_SLASH
        if api_version < self.settings.cdc_min_api_version or not self._exists(
            subscription
        ):
            return _NO_SUCH_CHANNEL.format(subscription)
        return None

    def _exists(self, channel: str) -> bool:
        if channel == ALL_CHANGES_CHANNEL:
            return True
        return any(
            obj.cdc_enabled and channel_for(obj.name) == channel
            for obj in self.schema.objects.values()
        )

    @staticmethod
    def _replay_id(message: Mapping[str, Any], channel: str) -> int:
        ext = message.get("ext")
        replay = ext.get("replay") if isinstance(ext, dict) else None
        if not isinstance(replay, dict):
            return -1  # no replay ext: new events only (durability page)
        if channel not in replay:
            raise _SubscribeError(_REPLAY_NOT_IN_MAP.format(channel, _java_map(replay)))
        value = replay[channel]
        try:
            return int(value)
        except (TypeError, ValueError):
            raise _SubscribeError(replay_invalid_error_text(value)) from None

    def _unsubscribe(
        self, message: dict[str, Any], session: _Session
    ) -> dict[str, Any]:
        subscription = message.get("subscription")
        reply = _base(message, session)
        reply["subscription"] = subscription
        if isinstance(subscription, str):
            session.subscriptions.pop(subscription, None)
        reply["successful"] = True
        return reply

    def _disconnect(self, message: dict[str, Any], session: _Session) -> dict[str, Any]:
        self._sessions.pop(session.client_id, None)
        if session.held is not None:
            session.held.release("disconnected")
        reply = _base(message, session)
        reply["successful"] = True
        return reply


class _SubscribeError(Exception):
    pass


@dataclass(slots=True)
class _Request:
    user_id: str | None
    api_version: float
    browser: str | None
    new_browser: str | None = None


def replay_invalid_error_text(value: object) -> str:
    return _REPLAY_INVALID.format(value)


def _base(message: Mapping[str, Any], session: _Session) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "clientId": session.client_id,
        "channel": message.get("channel"),
    }
    _echo_id(message, reply)
    reply["successful"] = False
    return reply


def _echo_id(message: Mapping[str, Any], reply: dict[str, Any]) -> None:
    if "id" in message:
        reply["id"] = message["id"]


def _client_id() -> str:
    length = 26 + secrets.randbelow(4)
    return "".join(secrets.choice(_ID_CHARS) for _ in range(length))


def _java_map(replay: Mapping[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in replay.items()) + "}"


def _data_message(event: StoredEvent, channel: str) -> bytes:
    return b"".join(
        (
            b'{"data":{"schema":"',
            event.schema.encode(),
            b'","payload":',
            event.payload,
            b',"event":{"replayId":',
            str(event.replay_id).encode(),
            b'}},"channel":"',
            channel.encode(),
            b'"}',
        )
    )


def _reply(parts: list[bytes]) -> web.Response:
    body = b"[" + b",".join(parts) + b"]"
    return web.Response(body=body, content_type="application/json", charset="utf-8")


def _cut(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()
