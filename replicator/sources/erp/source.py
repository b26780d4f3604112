"""The ERP source end to end: set-up checks, slot, initial snapshot, stream, apply.

``ErpPipeline.run_once`` connects, decides where to start from the stored
checkpoint and the slot, loads a snapshot if needed, then streams: a reader
task fills a bounded queue (backpressure), the applier drains it and commits
whole source transactions with their checkpoint. ``run`` restarts
``run_once`` with backoff on retriable errors; every restart resumes from the
checkpoint, which is always correct since re-sent changes are skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import asyncpg

from replicator.applier import ApplyStats, ErpApplier, SourceInfo
from replicator.backoff import retry_until_stopped
from replicator.config import Settings
from replicator.errors import (
    ConfigError,
    ErpConnectionError,
    ErpSetupError,
    StoreConnectionError,
    StoreError,
    first_error,
)
from replicator.sources.erp.catalog import (
    Catalog,
    check_prerequisites,
    candidate_tables,
    tables_without_identity,
)
from replicator.sources.erp.pgoutput import lsn_to_str
from replicator.sources.erp.replication import ReplicationStream
from replicator.sources.erp.snapshot import (
    SESSION_SETTINGS,
    copy_tables,
    published_tables,
)
from replicator.store import checkpoints, incarnation
from replicator.store.checkpoints import Checkpoint
from replicator.store.mirror import MirrorStore
from replicator.store.tables import create_schema
from replicator.unified import sync_engine

logger = logging.getLogger(__name__)

# InternalClientError: asyncpg's protocol state broke with the connection (a
# server shut down mid-operation); the connection is unusable, a retry is not.
_CONNECTION_ERRORS = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionFailureError,
    asyncpg.AdminShutdownError,
    asyncpg.InternalClientError,
)


def _parse_lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


async def _connect(dsn: str, what: str) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(dsn, server_settings=SESSION_SETTINGS)
    except asyncpg.ClientConfigurationError as exc:
        raise ConfigError(f"the {what} DSN is not valid: {exc}; fix its value") from exc
    except asyncpg.InvalidPasswordError as exc:
        raise ErpSetupError(
            f"{what} rejected the credentials: {exc}; fix the DSN"
        ) from exc
    except (
        asyncpg.InvalidCatalogNameError,
        asyncpg.InvalidAuthorizationSpecificationError,
    ) as exc:
        raise ErpSetupError(
            f"cannot connect to the {what}: {exc}; fix the database "
            "or user name in its DSN"
        ) from exc
    except (*_CONNECTION_ERRORS, asyncpg.TooManyConnectionsError) as exc:
        cls = StoreConnectionError if what == "replica" else ErpConnectionError
        raise cls(f"cannot connect to the {what}: {exc}") from exc


def _no_key_message(tables: list[str]) -> str:
    return (
        f"table(s) {', '.join(tables)} to replicate have no primary key or replica "
        "identity index, so their rows cannot be matched by key; add a primary key, "
        "ALTER TABLE ... REPLICA IDENTITY USING INDEX <unique index>, or leave them "
        "out with [erp] tables = [...]"
    )


class ErpPipeline:
    """Replicate the ERP into the replica's ``erp`` schema."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if settings.erp is None:
            raise ConfigError(
                "the config has no [erp] section; add one to replicate the ERP"
            )
        self.erp_settings = settings.erp
        self.stats = ApplyStats()
        self.applier: ErpApplier | None = None
        self.caught_up = asyncio.Event()
        self.ready = asyncio.Event()
        self._target_lsn: int | None = None
        self._awaiting_input = (
            True  # the apply task waits on the queue, holding nothing
        )

    async def run(
        self, stop: asyncio.Event, *, until_caught_up: bool = False
    ) -> ApplyStats:
        """Run until ``stop`` is set (or caught up), restarting on passing faults."""
        await retry_until_stopped(
            "erp pipeline",
            lambda: self.run_once(stop, until_caught_up=until_caught_up),
            stop,
        )
        return self.stats

    async def run_once(
        self, stop: asyncio.Event, *, until_caught_up: bool = False
    ) -> None:
        erp_dsn = self.erp_settings.database.resolve()
        replica = await _connect(self.settings.replica.resolve(), "replica")
        erp: asyncpg.Connection | None = None
        ddl: asyncpg.Connection | None = None
        stream = ReplicationStream(
            erp_dsn, status_interval=self.erp_settings.status_interval_seconds
        )
        try:
            erp = await _connect(erp_dsn, "ERP")
            start_lsn, source = await self._prepare(replica, erp, stream)
            if until_caught_up:
                self._target_lsn = await self._current_lsn(erp)
            ddl = await _connect(self.settings.replica.resolve(), "replica")
            store = MirrorStore(replica, self.erp_settings.stream, ddl)
            sync = await sync_engine(self.settings, replica)
            self.applier = ErpApplier(
                store,
                Catalog(erp),
                source,
                start_lsn,
                batch_changes=self.settings.apply.batch_changes,
                confirm=stream.confirm,
                own_origin=self.erp_settings.origin,
                sync=sync,
            )
            self.applier.stats = self.stats
            self.ready.set()
            await self._stream(stream, erp, start_lsn, stop, until_caught_up)
        except (asyncpg.PostgresConnectionError, *_CONNECTION_ERRORS) as exc:
            raise StoreConnectionError(
                f"replica or ERP connection lost: {exc}"
            ) from exc
        except asyncpg.PostgresError as exc:
            raise StoreError(f"replica rejected a change: {exc}") from exc
        finally:
            self.ready.clear()
            if self.applier is not None:
                await self.applier.rollback()
            await stream.close()
            for conn in (erp, replica, ddl):
                if conn is not None:
                    conn.terminate()

    async def _current_lsn(self, erp: asyncpg.Connection) -> int:
        text = await erp.fetchval("SELECT pg_current_wal_lsn()::text")
        high, _, low = text.partition("/")
        return (int(high, 16) << 32) | int(low, 16)

    async def _ensure_publication(self, erp: asyncpg.Connection) -> None:
        pub = self.erp_settings.publication
        if await erp.fetchval("SELECT 1 FROM pg_publication WHERE pubname = $1", pub):
            return
        if not self.erp_settings.create_publication:
            raise ErpSetupError(
                f"publication {pub!r} does not exist; create it with "
                f"CREATE PUBLICATION {pub} FOR ALL TABLES"
            )
        target = "ALL TABLES"
        if self.erp_settings.tables:
            target = "TABLE " + ", ".join(self.erp_settings.tables)
        # Check before creating: a publication of a table without a replica
        # identity makes the ERP's own UPDATEs and DELETEs on it fail.
        bad = await tables_without_identity(
            erp, await candidate_tables(erp, self.erp_settings.tables)
        )
        if bad:
            raise ErpSetupError(_no_key_message(bad))
        try:
            await erp.execute(
                f"CREATE PUBLICATION {pub} FOR {target} "
                "WITH (publish_via_partition_root = true)"
            )
        except asyncpg.InsufficientPrivilegeError as exc:
            raise ErpSetupError(
                f"cannot create publication {pub!r}: {exc}; create it as a superuser "
                f"(CREATE PUBLICATION {pub} FOR ALL TABLES) or grant the rights"
            ) from exc
        logger.info("publication created", extra={"publication": pub, "tables": target})

    async def _wait_slot_free(
        self, erp: asyncpg.Connection, slot: str
    ) -> asyncpg.Record | None:
        deadline = time.monotonic() + 15
        while True:
            row = await erp.fetchrow(
                "SELECT active, active_pid, confirmed_flush_lsn::text AS confirmed, "
                "wal_status FROM pg_replication_slots WHERE slot_name = $1",
                slot,
            )
            if row is None or not row["active"]:
                return row
            if time.monotonic() > deadline:
                raise ErpSetupError(
                    f"replication slot {slot!r} is in use by another process "
                    f"(pid {row['active_pid']}); stop that consumer, or give this "
                    "instance its own erp.slot"
                )
            await asyncio.sleep(0.5)

    async def _prepare(
        self,
        replica: asyncpg.Connection,
        erp: asyncpg.Connection,
        stream: ReplicationStream,
    ) -> tuple[int, SourceInfo]:
        cfg = self.erp_settings
        await create_schema(replica)
        await check_prerequisites(erp)
        await self._ensure_publication(erp)
        catalog = Catalog(erp)
        bad = await tables_without_identity(
            erp, await catalog.publication_tables(cfg.publication)
        )
        if bad:
            raise ErpSetupError(_no_key_message(bad))
        system = await stream.open()
        source = SourceInfo(
            cfg.stream, system.system_identifier, system.timeline, cfg.slot
        )
        cp = await checkpoints.load(replica, cfg.stream)
        slot = await self._wait_slot_free(erp, cfg.slot)
        restored = await incarnation.was_restored(replica)
        why = self._why_resync(cp, slot, system.system_identifier, restored)
        if why is None:
            assert cp is not None and cp.lsn is not None
            logger.info(
                "resuming from checkpoint",
                extra={
                    "position": cp.position,
                    "slot_confirmed": slot and slot["confirmed"],
                },
            )
            await incarnation.record(replica)
            return cp.lsn, source
        if cp is not None:
            logger.warning(
                "resyncing every erp table from a new slot",
                extra={
                    "slot": cfg.slot,
                    "reason": why,
                    "checkpoint": cp.position,
                    "slot_confirmed": slot and slot["confirmed"],
                },
            )
        if slot is not None:
            logger.warning(
                "dropping replication slot without a usable checkpoint",
                extra={"slot": cfg.slot},
            )
            await erp.execute("SELECT pg_drop_replication_slot($1)", cfg.slot)
        lsn = await self._snapshot(
            replica,
            erp,
            stream,
            source,
            reason="snapshot" if cp is None else "resync",
            why=why,
        )
        await incarnation.record(replica)
        return lsn, source

    def _why_resync(
        self,
        cp: Checkpoint | None,
        slot: asyncpg.Record | None,
        system_identifier: str,
        restored: bool,
    ) -> str | None:
        """Say why the stream cannot resume from ``cp``, or None when it can.

        The slot is confirmed only up to what the replica committed, or past
        it by WAL with nothing published (psycopg2 moves an idle stream's flush
        position to the keepalive's WAL end), so a slot ahead of the checkpoint
        means released changes only when the replica was restored from a backup.
        """
        if cp is None or cp.lsn is None:
            return "no checkpoint"
        if slot is None:
            return "replication slot missing (dropped)"
        if (
            cp.system_identifier != system_identifier
            or cp.slot_name != self.erp_settings.slot
        ):
            return "checkpoint belongs to another server or slot"
        if slot["wal_status"] == "lost":
            return "replication slot invalidated (wal_status lost)"
        if restored and slot["confirmed"] and _parse_lsn(slot["confirmed"]) > cp.lsn:
            return "replica restored from a backup; the slot released changes it lacks"
        return None

    async def _snapshot(
        self,
        replica: asyncpg.Connection,
        erp_conn: asyncpg.Connection,
        stream: ReplicationStream,
        source: SourceInfo,
        *,
        reason: str = "snapshot",
        why: str = "no checkpoint",
    ) -> int:
        cfg = self.erp_settings
        new_slot = await stream.create_slot(cfg.slot)
        # A separate connection reads the exported snapshot; the replication
        # connection must run no other command until the copy is done.
        reader = await _connect(cfg.database.resolve(), "ERP")
        try:
            tables = await published_tables(Catalog(reader), cfg.publication)
            store = MirrorStore(replica, cfg.stream)
            async with replica.transaction():
                await copy_tables(reader, new_slot.snapshot_name, tables, store)
                await checkpoints.save(
                    replica,
                    Checkpoint(
                        cfg.stream,
                        lsn_to_str(new_slot.consistent_lsn),
                        new_slot.consistent_lsn,
                        source.system_identifier,
                        source.timeline,
                        cfg.slot,
                        {"snapshot": new_slot.snapshot_name, "why": why},
                    ),
                    reason=reason,
                )
        finally:
            reader.terminate()
        logger.info(
            "initial snapshot loaded",
            extra={
                "tables": len(tables),
                "position": lsn_to_str(new_slot.consistent_lsn),
            },
        )
        return new_slot.consistent_lsn

    async def _stream(
        self,
        stream: ReplicationStream,
        erp: asyncpg.Connection,
        start_lsn: int,
        stop: asyncio.Event,
        until_caught_up: bool,
    ) -> None:
        cfg = self.erp_settings
        assert self.applier is not None
        applier = self.applier
        queue: asyncio.Queue[list[Any] | int] = asyncio.Queue(
            maxsize=self.settings.apply.queue_chunks
        )

        async def read() -> None:
            async for item in stream.stream(cfg.slot, cfg.publication, start_lsn):
                await queue.put(item)

        async def heartbeat() -> None:
            # A connection of its own: the applier's catalog look-ups use ``erp``,
            # and asyncpg refuses two operations at once on one connection.
            conn = await _connect(cfg.database.resolve(), "ERP")
            try:
                while True:
                    await asyncio.sleep(cfg.heartbeat_seconds)
                    await conn.execute(
                        "SELECT pg_logical_emit_message(false, 'replicator.heartbeat', '')"
                    )
            finally:
                conn.terminate()

        async def consume() -> None:
            while not stop.is_set():
                self._awaiting_input = True
                item = await queue.get()
                self._awaiting_input = False
                if isinstance(item, int):
                    await self._on_idle(applier, item, until_caught_up)
                    if until_caught_up and self.caught_up.is_set():
                        return
                    continue
                await applier.handle_chunk(item)
                if applier.should_commit(input_idle=queue.empty()):
                    await applier.commit()

        try:
            await self._run_tasks(read(), heartbeat(), consume(), stop, applier)
        except BaseExceptionGroup as group:
            raise first_error(group) from None

    async def _run_tasks(self, read, heartbeat, consume, stop, applier) -> None:  # type: ignore[no-untyped-def]
        cfg = self.erp_settings
        async with asyncio.TaskGroup() as tg:
            reader = tg.create_task(read, name=f"source:erp:{cfg.slot}:read")
            beat = tg.create_task(heartbeat, name=f"source:erp:{cfg.slot}:heartbeat")
            waiter = tg.create_task(stop.wait(), name=f"source:erp:{cfg.slot}:stop")
            done = tg.create_task(consume, name=f"source:erp:{cfg.slot}:apply")
            await asyncio.wait({done, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if done.done() and done.exception() is not None:
                raise done.exception()  # type: ignore[misc]
            # Drain: let the chunk in hand finish first (the replica connection
            # runs one operation at a time), commit what is whole, stop reading.
            if not done.done() and not self._awaiting_input:
                await done
            if not applier.in_transaction:
                await applier.commit()
            for task in (reader, beat, waiter, done):
                task.cancel()

    async def _on_idle(
        self, applier: ErpApplier, wal_end: int, until_caught_up: bool
    ) -> None:
        if applier.should_commit(input_idle=True):
            await applier.commit()
        if not applier.in_transaction and not applier.has_uncommitted:
            await applier.advance_idle(max(wal_end, applier.idle_lsn))
            if (
                self._target_lsn is not None
                and applier.checkpoint_lsn >= self._target_lsn
            ):
                self.caught_up.set()
