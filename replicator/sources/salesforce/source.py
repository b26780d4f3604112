"""The Salesforce source end to end: describe, initial load, stream, catch-up.

Order of work at start-up: describe every object and shape its mirror; open
the stream (objects without a checkpoint subscribe for new events only);
load those objects over REST once subscribed, so no change between load and
stream is missed (the mirror's SystemModstamp guard drops what the load
already holds). Events are applied in batches that end when the stream goes
quiet, each batch one replica transaction with its replay ids.

A replay id outside the retention window heals itself: the object is caught
up by SystemModstamp since the last applied event (minus a skew margin), and
its stream restarts from the oldest retained event (-2).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

import aiohttp
import asyncpg

from replicator.backoff import retry_until_stopped
from replicator.config import SalesforceSettings, Settings
from replicator.errors import (
    ConfigError,
    StoreConnectionError,
    StoreError,
    first_error,
)
from replicator.sources.erp.snapshot import SESSION_SETTINGS
from replicator.sources.salesforce.applier import SfApplier
from replicator.sources.salesforce.cdc import (
    CompoundMap,
    MalformedEvent,
    RecordChange,
    parse_message,
)
from replicator.sources.salesforce.rest import RestClient
from replicator.store import checkpoints
from replicator.store.mirror import MirrorStore
from replicator.store.tables import create_schema
from replicator.unified import sync_engine

logger = logging.getLogger(__name__)

_BATCH_EVENTS = 10_000


def build_authenticator(cfg: SalesforceSettings) -> Any:
    """Create the authenticator the settings describe."""
    from replicator.sources.salesforce.auth import Authenticator, Credentials

    key = None
    if cfg.private_key_file:
        with open(cfg.private_key_file) as fh:
            key = fh.read()
    return Authenticator(
        Credentials(
            login_url=cfg.login_url,
            client_id=cfg.client_id,
            client_secret=cfg.secret(cfg.client_secret_env, "client secret"),
            username=cfg.username,
            password=cfg.secret(cfg.password_env, "password"),
            refresh_token=cfg.secret(cfg.refresh_token_env, "refresh token"),
            private_key_pem=key,
            grant=cfg.grant,
        )
    )


class SalesforcePipeline:
    """Mirror the configured Salesforce objects into the replica's ``sf`` schema."""

    def __init__(self, settings: Settings) -> None:
        if settings.salesforce is None:
            raise ConfigError(
                "the config has no [salesforce] section; add one to mirror the org"
            )
        self.settings = settings
        self.cfg = settings.salesforce
        self.applier: SfApplier | None = None
        self.ready = asyncio.Event()
        self.loaded = asyncio.Event()
        self._positions: dict[str, int] = {}
        self._last_commit: dict[str, dt.datetime] = {}
        self._catch_up_first: dict[str, dt.datetime | None] = {}
        self._catch_up_reasons: dict[str, str] = {}

    @property
    def stats(self) -> Any:
        return self.applier.stats if self.applier else None

    async def run(self, stop: asyncio.Event) -> None:
        await retry_until_stopped(
            "salesforce pipeline", lambda: self.run_once(stop), stop
        )

    async def run_once(self, stop: asyncio.Event) -> None:
        try:
            replica = await asyncpg.connect(
                self.settings.replica.resolve(), server_settings=SESSION_SETTINGS
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreConnectionError(f"cannot connect to the replica: {exc}") from exc
        auth = build_authenticator(self.cfg)
        try:
            async with aiohttp.ClientSession() as http:
                await auth.login()
                rest = RestClient(
                    auth,
                    http,
                    api_version=self.cfg.api_version,
                    client_name=self.cfg.client_name,
                )
                await create_schema(replica)
                store = MirrorStore(replica, self.cfg.stream_prefix, schema="sf")
                self.applier = SfApplier(
                    store,
                    rest,
                    stream_prefix=self.cfg.stream_prefix,
                    skew=dt.timedelta(seconds=self.cfg.skew_seconds),
                    sync=await sync_engine(self.settings, replica),
                )
                await self._prepare(replica)
                await self._stream(auth, stop)
        except (
            OSError,
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
        ) as exc:
            raise StoreConnectionError(f"replica connection lost: {exc}") from exc
        except asyncpg.PostgresError as exc:
            raise StoreError(f"replica rejected a change: {exc}") from exc
        finally:
            self.ready.clear()
            replica.terminate()

    async def _prepare(self, replica: asyncpg.Connection) -> None:
        assert self.applier is not None
        compounds: dict[str, CompoundMap] = {}
        for name in self.cfg.objects:
            state = await self.applier.prepare(name)
            describe = await self.applier.rest.describe(name)
            compounds[state.shape.object_name] = CompoundMap.from_describe(
                describe["fields"]
            )
            cp = await checkpoints.load(
                replica, self.applier.stream_name(state.channel)
            )
            if cp is None:
                self._positions[state.channel] = -1
            else:
                self._positions[state.channel] = int(cp.position)
                if cp.position == "-2":
                    # Loaded, but no event applied since: replay -2 cannot
                    # tell whether events fell out of retention meanwhile, so
                    # catch up from the load's time first (the guard drops
                    # what the mirror already holds).
                    loaded = cp.details.get("loaded_at")
                    self._catch_up_first[state.shape.object_name] = (
                        dt.datetime.fromisoformat(loaded) if loaded else None
                    )
                    self._catch_up_reasons[state.shape.object_name] = (
                        "no event since the initial load"
                    )
                commit_ms = cp.details.get("commit_ms")
                if commit_ms:
                    self._last_commit[state.channel] = dt.datetime.fromtimestamp(
                        commit_ms / 1000, tz=dt.UTC
                    )
        self._compounds = compounds

    def _replay_for(self, channel: str) -> int | None:
        position = self._positions.get(channel, -1)
        return None if position == -1 else position

    async def _stream(self, auth: Any, stop: asyncio.Event) -> None:
        from replicator.errors import ReplayOutOfWindowError
        from replicator.sources.salesforce.streaming import SalesforceStream

        assert self.applier is not None
        applier = self.applier
        self._to_load = [
            o for o, s in applier.objects.items() if self._positions[s.channel] == -1
        ]
        self._to_catch_up: dict[str, dt.datetime | None] = dict(self._catch_up_first)
        self._catch_up_first.clear()
        while not stop.is_set():
            channels = [s.channel for s in applier.objects.values()]
            stream = SalesforceStream(
                auth,
                channels,
                self._replay_for,
                api_version=self.cfg.api_version,
                long_poll_timeout=self.cfg.long_poll_timeout_seconds,
                client_name=self.cfg.client_name,
            )
            try:
                async with stream:
                    await self._consume(stream, stop)
                    return
            except ReplayOutOfWindowError as exc:
                await self._heal(exc.channel)

    async def _heal(self, channel: str) -> None:
        """The stored replay id is gone: resubscribe with -2, catch the object up.

        BUG-18: never fall back to -1 (new events only), which loses what
        the bus still holds; -2 replays every retained event and the catch-up
        covers the gap before them. The modstamp guard drops the overlap.
        """
        assert self.applier is not None
        obj = next(o for o, s in self.applier.objects.items() if s.channel == channel)
        since = self._last_commit.get(channel)
        logger.error(
            "events lost: replay id outside the retention window, "
            "reconciling over REST and resubscribing with -2",
            extra={
                "object": obj,
                "channel": channel,
                "gap": True,
                "replay_id": self._positions.get(channel),
                "since": since.isoformat() if since else None,
            },
        )
        # The catch-up runs once the new stream is subscribed, so nothing
        # committed in between is missed.
        self._positions[channel] = -2
        self._to_catch_up[obj] = since

    async def _consume(self, stream: Any, stop: asyncio.Event) -> None:
        assert self.applier is not None
        applier = self.applier
        queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=10_000)

        async def read() -> None:
            async for event in stream:
                await queue.put(event)

        try:
            await self._consume_tasks(read(), queue, stop)
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    async def _consume_tasks(
        self, read: Any, queue: asyncio.Queue[Any], stop: asyncio.Event
    ) -> None:
        assert self.applier is not None
        applier = self.applier
        async with asyncio.TaskGroup() as tg:
            reader = tg.create_task(read, name="source:salesforce:read")
            while self._to_load:
                obj = self._to_load[0]
                await applier.load(obj)
                self._positions[applier.objects[obj].channel] = -2
                self._to_load.pop(0)
            for obj, since in list(self._to_catch_up.items()):
                reason = self._catch_up_reasons.pop(
                    obj, "replay id outside retention window"
                )
                await applier.catch_up(obj, since, reason=reason)
                self._positions[applier.objects[obj].channel] = -2
                del self._to_catch_up[obj]
            self.loaded.set()
            self.ready.set()
            stopper = tg.create_task(stop.wait(), name="source:salesforce:stop")
            while not stop.is_set():
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait(
                    {getter, stopper, reader}, return_when=asyncio.FIRST_COMPLETED
                )
                if getter not in done:
                    getter.cancel()
                    if reader in done and reader.exception() is not None:
                        raise reader.exception()  # type: ignore[misc]
                    break
                batch = [getter.result()]
                await self._settle(queue, batch)
                await self._apply(batch)
            reader.cancel()
            stopper.cancel()

    async def _settle(self, queue: asyncio.Queue[Any], batch: list[Any]) -> None:
        """Gather events until the stream is quiet for ``settle_ms`` (a transaction's end)."""
        while len(batch) < _BATCH_EVENTS:
            try:
                async with asyncio.timeout(self.cfg.settle_ms / 1000):
                    batch.append(await queue.get())
            except TimeoutError:
                return

    async def _apply(self, events: list[Any]) -> None:
        assert self.applier is not None
        changes: list[RecordChange] = []
        for event in events:
            try:
                changes += parse_message(event.raw, self._compounds)
            except MalformedEvent as exc:
                async with self.applier.store.conn.transaction():
                    await self.applier.dead_letter(
                        None, str(exc), raw=event.raw, channel=event.channel, entity="?"
                    )
        if changes:
            await self.applier.apply(changes)
            for change in changes:
                if change.replay_id > self._positions.get(change.channel, -1):
                    self._positions[change.channel] = change.replay_id
                    self._last_commit[change.channel] = change.commit_time
