"""The production Streaming API client: CDC events over CometD, never silent.

Built on aiosfstream-ng 0.7.5 / aiocometd-ng 0.5.6 with the subclasses that
reference/streaming-clients.md calls for: a client that builds the CometD URL
from the session's instance URL and waits for reconnection without the
``loop=`` argument Python 3.10 removed, long-polling only, and an
authenticator that takes its session from the shared ``Authenticator`` and
logs in again when a failed re-authentication left no token (§3).

``SalesforceStream`` owns recovery. A monitoring extension records every
successful handshake, subscribe and ``/meta/connect`` and turns a
``reconnect: handshake`` advice into ``none``, so the library never loops on
handshakes by itself (BUG-20); every lost session (``403::Unknown client``,
server restart, network down longer than ``connection_timeout``, a denied
handshake, a stall seen by the watchdog) ends the client, and the iterator
opens a new one after a growing, capped delay and subscribes each channel
from ``replay_for(channel)`` (BUG-19). Messages the old client had prefetched
are delivered first; events are de-duplicated by replay id per channel,
because a resubscription from a stored id replays what was already handed
over (§4). A replay id outside the retention window raises
``ReplayOutOfWindowError`` instead of falling back to -2 (BUG-18).
Every aiosfstream, aiocometd and aiohttp exception becomes a
``SalesforceError`` here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, cast

import aiohttp
import orjson
from aiocometd_ng.client import Client as CometdClient
from aiocometd_ng.constants import ConnectionType, MetaChannel, TransportState
from aiocometd_ng.exceptions import (
    AiocometdException,
    ServerError,
    TransportTimeoutError,
)
from aiocometd_ng.extensions import Extension
from aiocometd_ng.transports.base import TransportBase
from aiocometd_ng.typing import Headers, JsonObject, Payload
from aiosfstream_ng.auth import AuthenticatorBase
from aiosfstream_ng.client import Client as SalesforceClient
from aiosfstream_ng.client import ReplayMarkerStoragePolicy
from aiosfstream_ng.exceptions import AuthenticationError
from aiosfstream_ng.replay import ReplayMarker, ReplayMarkerStorage

from replicator.backoff import Backoff
from replicator.errors import (
    ReplayOutOfWindowError,
    SalesforceAuthError,
    SalesforceConnectionError,
    SalesforceError,
    SalesforceStreamError,
    SalesforceSubscribeError,
)
from replicator.sources.salesforce.auth import Authenticator, Session

__all__ = [
    "ALL_EVENTS",
    "NEW_EVENTS",
    "ReplayFor",
    "SalesforceStream",
    "StreamEvent",
    "StreamStats",
]

logger = logging.getLogger(__name__)

NEW_EVENTS = -1  # replay option: only events published after subscribing
ALL_EVENTS = -2  # replay option: every retained event, then new ones

#: Returns the stored replay id of a channel, None for new events only (-1),
#: or -2; may be a coroutine function.
ReplayFor = Callable[[str], "int | Awaitable[int | None] | None"]

# reference/salesforce.md §2.4; captures differ on the spaces after "invalid."
_REPLAY_INVALID = re.compile(r"replayId \{(-?\d+)\} you provided was invalid")
_CHANNEL_REFUSED = ("400::The channel you requested", "403:denied_by_security_policy")
_CLOSE_TIMEOUT = 2.0  # for /meta/disconnect to a server that may be gone
_ALERT_AFTER = 5  # consecutive failed cycles before an ERROR (BUG-20)


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One change event: its channel, replay id, ``data.payload`` and the message."""

    channel: str
    replay_id: int
    payload: dict[str, Any]
    raw: dict[str, Any]


@dataclass(slots=True)
class StreamStats:
    """Counters for metrics and readiness.

    ``handshakes`` counts handshake requests sent, ``connects`` successful
    ``/meta/connect`` replies, ``reconnects`` clients opened after a lost one;
    ``last_connect_at`` is the wall-clock time (epoch seconds) of the last
    successful connect.
    """

    connects: int = 0
    handshakes: int = 0
    reconnects: int = 0
    duplicates_dropped: int = 0
    last_connect_at: float | None = None


class SalesforceStream:
    """Change events of ``channels``, resumed from ``replay_for`` after any loss.

    Use as ``async with SalesforceStream(...) as stream: async for event in
    stream``. Entering opens the first session; failures, including that
    one's, surface from the iterator: retriable ones are handled there by
    reopening, others (``SalesforceAuthError``, ``SalesforceSubscribeError``,
    ``ReplayOutOfWindowError``) are raised. ``replay_for`` is called at every
    subscription; while it returns None, -1 or -2 for a channel that has
    already delivered events, the stream resumes after the last one it
    delivered instead.

    ``long_poll_timeout`` is how long the org holds a ``/meta/connect``
    (110 s on Salesforce); with no successful connect for ``watchdog_periods``
    of those, or with subscriptions missing one period after a handshake,
    the session is torn down and opened again. ``connection_timeout`` bounds
    how long the library may try to reconnect by itself after a network
    error, and how long opening a session may take. ``client_name`` names the
    stream in log lines.
    """

    def __init__(
        self,
        auth: Authenticator,
        channels: list[str],
        replay_for: ReplayFor,
        *,
        api_version: str = "60.0",
        connection_timeout: float = 30.0,
        watchdog_periods: int = 3,
        long_poll_timeout: float = 110.0,
        client_name: str | None = None,
        max_pending_count: int = 100,
        backoff: Backoff | None = None,
    ) -> None:
        if not channels:
            raise ValueError("a stream needs at least one channel")
        self.channels = list(dict.fromkeys(channels))
        self.stats = StreamStats()
        self._auth = auth
        self._replay_for = replay_for
        self._api_version = api_version
        self._connection_timeout = connection_timeout
        self._long_poll_timeout = long_poll_timeout
        self._stall_after = watchdog_periods * long_poll_timeout
        self._name = client_name or "salesforce"
        self._max_pending_count = max_pending_count
        # Grows from 1 s to 2 minutes (BUG-20: first gap >= 1 s, cap <= 5 min).
        self._backoff = backoff or Backoff(initial=1.0, factor=2.0, cap=120.0)
        self._bridge = _SessionBridge(auth)
        self._client: _Client | None = None
        self._monitor: _Monitor | None = None
        self._backlog: deque[JsonObject] = deque()
        self._highest: dict[str, int] = {}
        self._sent: dict[str, int] = {}
        self._opened_at = 0.0
        self._failures = 0  # consecutive failed cycles, for the BUG-20 alert
        self._lost = False  # a session was lost: the next open waits first
        self._terminal: SalesforceError | None = None
        self._closed = True

    def __repr__(self) -> str:
        return (
            f"SalesforceStream(name={self._name!r}, channels={self.channels!r}, "
            f"connected={self.is_connected})"
        )

    @property
    def is_connected(self) -> bool:
        """Whether a session is open and its last connect is recent enough."""
        monitor = self._monitor
        if self._client is None or monitor is None:
            return False
        return time.monotonic() < monitor.deadline(self.channels, self._stall_after)

    @property
    def replay_ids_sent(self) -> dict[str, int]:
        """The replay id of each channel's latest subscribe request."""
        return dict(self._sent)

    async def __aenter__(self) -> SalesforceStream:
        self._closed = False
        await self._open_or_defer()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Disconnect and stop the iterator."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.discard()
            logger.info("salesforce stream closed", extra={"stream": self._name})

    def __aiter__(self) -> SalesforceStream:
        return self

    async def __anext__(self) -> StreamEvent:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._terminal is not None:
                raise self._terminal
            if self._backlog:
                event = self._accept(self._backlog.popleft())
            elif self._client is None:
                await self._reopen()
                continue
            else:
                event = await self._next_event(self._client)
            if event is not None:
                return event

    # -- sessions ----------------------------------------------------------------

    async def _reopen(self) -> None:
        if self._lost:
            delay = self._next_delay()
            logger.info(
                "salesforce stream reopening",
                extra={
                    "stream": self._name,
                    "delay": round(delay, 2),
                    "attempt": self._failures,
                },
            )
            await asyncio.sleep(delay)
        await self._open_or_defer()
        if self._client is not None:
            self.stats.reconnects += 1

    async def _open_or_defer(self) -> None:
        """Open a session; keep a failure for the iterator to handle."""
        try:
            await self._open()
        except SalesforceError as exc:
            self._failed(exc)

    async def _open(self) -> None:
        monitor = _Monitor(self.stats)
        self._bridge.monitor = monitor
        client = _Client(
            self._bridge,
            api_version=self._api_version,
            replay=_ReplayExtension(self._replay_id_for),
            monitor=monitor,
            connection_timeout=self._connection_timeout,
            max_pending_count=self._max_pending_count,
        )
        try:
            with self._translated():
                async with asyncio.timeout(self._connection_timeout):
                    await client.open()
                    for channel in self.channels:
                        await client.subscribe(channel)
        except BaseException:
            self._backlog.extend(await client.discard())
            raise
        self._client, self._monitor = client, monitor
        self._opened_at = time.monotonic()
        logger.info(
            "salesforce stream subscribed",
            extra={"stream": self._name, "replay_ids": dict(self._sent)},
        )

    async def _next_event(self, client: _Client) -> StreamEvent | None:
        try:
            message = await self._receive(client)
        except SalesforceError as exc:
            self._client = None
            self._backlog.extend(await client.discard())
            self._failed(exc, session_age=time.monotonic() - self._opened_at)
            return None
        return self._accept(message)

    async def _receive(self, client: _Client) -> JsonObject:
        """Return the next message, or raise when the session is lost or stalled."""
        monitor = self._monitor
        assert monitor is not None
        while True:
            remaining = monitor.deadline(self.channels, self._stall_after)
            remaining -= time.monotonic()
            if remaining <= 0:
                raise SalesforceStreamError(monitor.stall_reason(self.channels))
            try:
                async with asyncio.timeout(remaining) as deadline:
                    with self._translated():
                        message = await client.receive()
            except TimeoutError:
                if deadline.expired():
                    continue  # look again: a connect may have moved the deadline
                raise
            monitor.delivered()
            return message

    def _failed(
        self, exc: SalesforceError, *, session_age: float | None = None
    ) -> None:
        """Record a lost session or a failed open; keep a final error."""
        if session_age is not None and session_age >= self._long_poll_timeout:
            # The session lived a long-poll period: start the delays again.
            self._backoff.reset()
            self._failures = 0
        self._lost = True
        self._failures += 1
        fields = {"stream": self._name, "error": str(exc), "attempt": self._failures}
        if not exc.retriable:
            self._terminal = exc
            logger.error("salesforce stream stopped", extra=fields)
            return
        logger.warning("salesforce stream lost", extra=fields)
        if self._failures == _ALERT_AFTER or self._failures % 20 == 0:
            logger.error("salesforce stream keeps failing", extra=fields)

    def _next_delay(self) -> float:
        """Return a delay that never shrinks until the cap (jitter only upward)."""
        base = self._backoff.initial * self._backoff.factor**self._backoff.attempt
        self._backoff.attempt += 1
        spread = base * (1 + random.uniform(0, self._backoff.jitter))
        return min(self._backoff.cap, spread)

    # -- replay ids --------------------------------------------------------------

    async def _replay_id_for(self, channel: str) -> int:
        stored = self._replay_for(channel)
        if inspect.isawaitable(stored):
            stored = await stored
        delivered = self._highest.get(channel)
        if stored is not None and stored >= 0:
            chosen = stored
        elif delivered is not None:
            chosen = delivered  # never resume with -1/-2 after delivering
        else:
            chosen = NEW_EVENTS if stored is None else stored
        self._sent[channel] = chosen
        return chosen

    def _accept(self, message: JsonObject) -> StreamEvent | None:
        channel = str(message.get("channel", ""))
        data = message.get("data")
        event = data.get("event") if isinstance(data, dict) else None
        replay_id = event.get("replayId") if isinstance(event, dict) else None
        if not isinstance(replay_id, int) or not isinstance(data, dict):
            logger.error(
                "salesforce event without replay id dropped",
                extra={"stream": self._name, "channel": channel},
            )
            return None
        highest = self._highest.get(channel)
        if highest is not None and replay_id <= highest:
            self.stats.duplicates_dropped += 1
            logger.debug(
                "salesforce duplicate event dropped",
                extra={"channel": channel, "replay_id": replay_id},
            )
            return None
        self._highest[channel] = replay_id
        payload = data.get("payload")
        return StreamEvent(
            channel, replay_id, payload if isinstance(payload, dict) else {}, message
        )

    # -- errors ------------------------------------------------------------------

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Turn the libraries' exceptions into ``SalesforceError``s."""
        try:
            yield
        except _RefusedForAnotherReason as exc:
            reason = ServerError("handshake refused", exc.reply)
            raise self._server_error(reason) from exc
        except AuthenticationError as exc:
            failure = self._bridge.failure or SalesforceAuthError(
                "the streaming endpoint refused the session after a new login"
            )
            raise failure from exc
        except ServerError as exc:
            raise self._server_error(exc) from exc
        except TransportTimeoutError as exc:
            if self._bridge.failure is not None:
                raise self._bridge.failure from exc  # why it never reconnected
            raise SalesforceConnectionError(
                "no connection to the streaming endpoint for "
                f"{self._connection_timeout}s"
            ) from exc
        except AiocometdException as exc:
            raise SalesforceStreamError(f"streaming client failed: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise SalesforceConnectionError(
                f"streaming endpoint unreachable: {exc}"
            ) from exc
        except TimeoutError as exc:
            raise SalesforceConnectionError(
                f"streaming session not open after {self._connection_timeout}s"
            ) from exc

    def _server_error(self, exc: ServerError) -> SalesforceError:
        response = exc.response if isinstance(exc.response, dict) else {}
        error = str(response.get("error") or exc.message)
        channel = response.get("channel")
        if channel == MetaChannel.SUBSCRIBE:
            subscription = str(response.get("subscription", ""))
            invalid = _REPLAY_INVALID.search(error)
            if invalid is not None:
                return ReplayOutOfWindowError(subscription, int(invalid[1]))
            if error.startswith(_CHANNEL_REFUSED):
                return SalesforceSubscribeError(
                    f"channel {subscription!r} refused the subscription: {error}; "
                    "select the object for Change Data Capture in Setup and check "
                    "the user's access to it"
                )
            return SalesforceStreamError(f"subscribe to {subscription!r}: {error}")
        if channel == MetaChannel.HANDSHAKE:
            ext = response.get("ext")
            sfdc = ext.get("sfdc") if isinstance(ext, dict) else None
            reason = sfdc.get("failureReason") if isinstance(sfdc, dict) else None
            if reason and "concurrent user limit" in str(reason):
                logger.error(
                    "salesforce streaming concurrent user limit exceeded",
                    extra={"stream": self._name, "error": reason},
                )
            return SalesforceStreamError(f"handshake denied: {reason or error}")
        if error.startswith("401") and self._bridge.failure is not None:
            return self._bridge.failure
        return SalesforceStreamError(f"streaming session lost: {error}")


class _SessionBridge(AuthenticatorBase):
    """aiosfstream's authenticator, fed by the shared ``Authenticator``.

    A 401 or 403 reply makes the library call ``authenticate``, which logs in
    again unless the refusal was ``403::Unknown client`` (a lost session, not
    a bad token). ``outgoing`` logs in when a failed attempt left no token, so
    one failed re-login cannot wedge the client (streaming-clients.md §3), and
    picks up a token the REST client has renewed meanwhile.
    """

    def __init__(self, auth: Authenticator) -> None:
        super().__init__()
        self._auth = auth
        self._last_token: str | None = None
        self.failure: SalesforceError | None = None
        self.monitor: _Monitor | None = None

    def __repr__(self) -> str:
        return f"_SessionBridge(token_url={self._token_url!r})"

    @property
    def _token_url(self) -> str:
        return self._auth.token_url

    async def ensure(self) -> Session:
        """Adopt the current session, logging in if there is none."""
        session = self._auth.current or await self._auth.login()
        self._adopt(session)
        return session

    async def authenticate(self) -> None:
        reply = self.monitor.last_failure if self.monitor is not None else None
        if reply is not None and not _is_token_refusal(reply):
            # A lost session or a denied handshake (concurrent-user limit):
            # a new token would not help. The library re-sends after this;
            # for a handshake that would double every attempt (BUG-20).
            if reply.get("channel") == MetaChannel.HANDSHAKE:
                raise _RefusedForAnotherReason(reply)
            return
        self.access_token = self.token_type = None
        try:
            session = await self._auth.refresh(stale_token=self._last_token)
        except SalesforceError as exc:
            self.failure = exc
            logger.warning(
                "salesforce streaming re-authentication failed",
                extra={"error": str(exc)},
            )
            raise AuthenticationError("re-authentication failed") from exc
        self.failure = None
        self._adopt(session)

    async def _authenticate(self) -> tuple[int, JsonObject]:
        # Required by the base class; ``authenticate`` above does not call it.
        session = await self._auth.refresh(stale_token=self._last_token)
        return 200, {"access_token": session.access_token, "token_type": "Bearer"}

    async def outgoing(self, payload: Payload, headers: Headers) -> None:
        current = self._auth.current
        if self.access_token is None:
            if current is not None and current.access_token != self._last_token:
                self._adopt(current)
            else:
                await self.authenticate()
        elif current is not None and current.access_token != self.access_token:
            self._adopt(current)
        headers["Authorization"] = f"Bearer {self.access_token}"

    def _adopt(self, session: Session) -> None:
        self.access_token = self._last_token = session.access_token
        self.token_type = "Bearer"
        self.instance_url = session.instance_url


class _RefusedForAnotherReason(AuthenticationError):
    """A 403 reply the library took for an auth failure; ``reply`` says why."""

    def __init__(self, reply: JsonObject) -> None:
        super().__init__("refused, not for the token", reply)
        self.reply = reply


def _is_token_refusal(reply: JsonObject) -> bool:
    """Whether a failed reply means the token is bad (reference §1.6, §2.2)."""
    ext = reply.get("ext")
    sfdc = ext.get("sfdc") if isinstance(ext, dict) else None
    reason = sfdc.get("failureReason") if isinstance(sfdc, dict) else None
    return str(reply.get("error", "")).startswith("401") or str(reason).startswith(
        "401"
    )


class _ReplayExtension(ReplayMarkerStorage):
    """Put ``ext.replay`` on every subscribe, asking the stream for the id."""

    def __init__(self, replay_id_for: Callable[[str], Awaitable[int]]) -> None:
        super().__init__()
        self._replay_id_for = replay_id_for

    async def insert_replay_id(self, message: JsonObject) -> None:
        channel = message["subscription"]
        message.setdefault("ext", {})["replay"] = {
            channel: await self._replay_id_for(channel)
        }

    async def get_replay_marker(self, subscription: str) -> ReplayMarker | None:
        return None  # the replica holds replay ids, not this object

    async def set_replay_marker(self, subscription: str, marker: ReplayMarker) -> None:
        return None


class _Monitor(Extension):
    """Watch one session's replies; leave re-handshakes to the stream.

    Records successful handshakes, subscribes and connects for the watchdog
    and the stats. A ``reconnect: handshake`` advice becomes ``none``: the
    library would otherwise handshake again at once, and again after every
    failed connect, with no backoff (BUG-20, aiocometd #1). Failed replies
    keep the last advised timeout, because the library replaces its whole
    advice with the last one seen and would lose its request timeout.
    """

    def __init__(self, stats: StreamStats) -> None:
        self.stats = stats
        now = time.monotonic()
        self.opened_at = now
        self.last_connect = now
        self.last_delivery = now
        self.handshake_at: float | None = None
        self.subscribed: set[str] = set()
        self.last_failure: JsonObject | None = None
        self._timeout: int | float | None = None

    async def outgoing(self, payload: Payload, headers: Headers) -> None:
        for message in payload:
            if message.get("channel") == MetaChannel.HANDSHAKE:
                self.stats.handshakes += 1

    async def incoming(self, payload: Payload, headers: Headers | None = None) -> None:
        now = time.monotonic()
        for message in payload:
            advice = message.get("advice")
            if isinstance(advice, dict):
                self._steer(advice)
            channel = message.get("channel")
            if not str(channel).startswith("/meta/"):
                continue
            if message.get("successful") is not True:
                self.last_failure = message
                logger.debug(
                    "salesforce streaming reply failed",
                    extra={"channel": channel, "error": message.get("error")},
                )
            elif channel == MetaChannel.CONNECT:
                self.last_connect = now
                self.last_failure = None
                self.stats.connects += 1
                self.stats.last_connect_at = time.time()
            elif channel == MetaChannel.HANDSHAKE:
                self.handshake_at = now
                self.subscribed.clear()
            elif channel == MetaChannel.SUBSCRIBE:
                self.subscribed.add(str(message.get("subscription")))

    def _steer(self, advice: dict[str, Any]) -> None:
        timeout = advice.get("timeout")
        if isinstance(timeout, int | float):
            self._timeout = timeout
        elif self._timeout is not None:
            advice["timeout"] = self._timeout
        if advice.get("reconnect") == "handshake":
            advice["reconnect"] = "none"

    def delivered(self) -> None:
        # A consumer that was busy held the library's queue full, which
        # suspends its connects: that time is no stall.
        self.last_delivery = time.monotonic()

    def deadline(self, channels: list[str], stall_after: float) -> float:
        """Return the monotonic time at which the session counts as stalled."""
        deadline = max(self.last_connect, self.last_delivery) + stall_after
        if self.handshake_at is not None and not self.subscribed.issuperset(channels):
            deadline = min(deadline, self.handshake_at + stall_after)
        return deadline

    def stall_reason(self, channels: list[str]) -> str:
        missing = sorted(set(channels) - self.subscribed)
        if missing:
            return f"subscriptions {missing!r} did not come back after a handshake"
        quiet = time.monotonic() - max(self.last_connect, self.last_delivery)
        return f"no successful /meta/connect for {quiet:.1f}s; stream stalled"


class _Client(SalesforceClient):
    """``aiosfstream_ng.Client`` fixed for Python 3.11 and Salesforce.

    Long-polling only (reference/salesforce.md §2.1), the CometD URL from the
    session's instance URL and API version, a connection timeout that works
    (streaming-clients.md §2), and ``discard`` to release everything whatever
    state the client is in.
    """

    def __init__(
        self,
        bridge: _SessionBridge,
        *,
        api_version: str,
        replay: _ReplayExtension,
        monitor: _Monitor,
        connection_timeout: float,
        max_pending_count: int,
    ) -> None:
        super().__init__(
            bridge,
            replay=replay,
            # ids are stored by the consumer, in the replica (BUG-22)
            replay_storage_policy=ReplayMarkerStoragePolicy.MANUAL,
            connection_timeout=connection_timeout,
            max_pending_count=max_pending_count,
            # Decoding long-poll replies is the largest single cost of a
            # backlog replay; orjson does it several times faster than json.
            json_loads=orjson.loads,
        )
        self._connection_types = [ConnectionType.LONG_POLLING]
        assert self.extensions is not None
        self.extensions.append(monitor)
        self.api_version = api_version

    def get_cometd_url(self, instance_url: str) -> str:  # type: ignore[override]
        return f"{instance_url.rstrip('/')}/cometd/{self.api_version}"

    async def open(self) -> None:
        bridge = cast(_SessionBridge, self.auth)
        session = await bridge.ensure()
        self.url = self.get_cometd_url(session.instance_url)
        await CometdClient.open(self)

    # The name ``timeout`` is the library's: this overrides its method.
    async def _wait_connection_timeout(self, timeout: float) -> None:  # noqa: ASYNC109
        """Return once the transport has been reconnecting for ``timeout``."""
        transport = self._transport
        assert transport is not None
        while True:
            await transport.wait_for_state(TransportState.CONNECTING)
            try:
                async with asyncio.timeout(timeout):
                    await transport.wait_for_state(TransportState.CONNECTED)
            except TimeoutError:
                return

    async def discard(self) -> list[JsonObject]:
        """Stop the transport, close the HTTP session, return unread messages."""
        transport = self._transport
        pending: list[JsonObject] = []
        try:
            if transport is not None:
                task = getattr(transport, "_connect_task", None)
                if isinstance(transport, TransportBase) and task is not None:
                    # Its callback calls result() on the cancelled task and
                    # asyncio logs the CancelledError as an unhandled error.
                    task.remove_done_callback(transport._connect_done)
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await transport.disconnect()
                await transport.close()
        except (TimeoutError, AiocometdException, aiohttp.ClientError) as exc:
            logger.debug("salesforce streaming disconnect failed", extra={"error": exc})
        finally:
            queue = self._incoming_queue
            while queue is not None and not queue.empty():
                pending.append(queue.get_nowait())
            await self._close_http_session()
            self._closed = True
        return pending
