"""Sample the pipelines and the replica into the ops state and the metrics.

Every ``sample_seconds`` the collector reads each pipeline's stats object
(no hooks on the hot path beyond a few counters kept there), the replica's
checkpoints, dead letters and outbox, and the ERP slot. Stream states move
through ``OpsState`` so each change is logged and notified once.

ERP lag in seconds is measured the way PostgreSQL measures a standby's
``replay_lag``: the collector records (time, ``pg_current_wal_lsn()``)
samples, and the replica is behind by the age of the newest sample its
checkpoint has not reached yet (zero when it has reached them all).
Salesforce lag is the time from the source's commit to the replica's
commit of the latest applied batch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from replicator.config import Settings
from replicator.ops.metrics import Metrics
from replicator.ops.state import DOWN, RESYNCING, STARTING, STOPPED, STREAMING, OpsState

logger = logging.getLogger(__name__)

_PROBE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
_LSN_SAMPLES = 600


def _lsn(text: str | None) -> int | None:
    if not text:
        return None
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass
class _Carry:
    """Totals of stats objects a pipeline has replaced (one per SF run)."""

    stats: Any = None
    base: collections.Counter[tuple[str, str]] | None = None
    last: collections.Counter[tuple[str, str]] | None = None


class Collector:
    """Sample ``pipelines`` (name -> pipeline) every ``settings.ops.sample_seconds``."""

    def __init__(self, settings: Settings, state: OpsState, metrics: Metrics) -> None:
        self.settings = settings
        self.state = state
        self.metrics = metrics
        self.pipelines: dict[str, Any] = {}
        self.running: dict[str, asyncio.Task[Any]] = {}
        self._carry: dict[str, _Carry] = {}
        self._lsn_samples: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=_LSN_SAMPLES
        )
        self._replica: asyncpg.Connection | None = None
        self._erp: asyncpg.Connection | None = None
        self._checkpointed: set[str] = set()  # streams with a checkpoint
        self._checkpointed_known = False  # the replica was read at least once

    async def run(self) -> None:
        """Sample until cancelled; probes that fail are retried at the next sample."""
        try:
            while True:
                try:
                    await self.sample()
                except Exception:  # a task boundary: metrics must not stop the daemon
                    logger.warning("metrics sample failed", exc_info=True)
                await asyncio.sleep(self.settings.ops.sample_seconds)
        finally:
            for conn in (self._replica, self._erp):
                if conn is not None:
                    conn.terminate()

    async def sample(self) -> None:
        await self._probe_erp()
        for name, pipeline in self.pipelines.items():
            if name == "erp":
                self._sample_erp(pipeline)
            else:
                self._sample_salesforce(pipeline)
        await self._probe_replica()

    def mark_stopped(self) -> None:
        for name in list(self.state.streams):
            self.state.set_state(name, STOPPED)
            self.metrics.up.labels(name).set(0)

    # -- pipelines ------------------------------------------------------------

    def _task_state(self, key: str, pipeline: Any) -> str:
        task = self.running.get(key)
        if task is None or task.done():
            return STOPPED
        return STREAMING if pipeline.ready.is_set() else DOWN

    def _sample_erp(self, pipeline: Any) -> None:
        name = pipeline.erp_settings.stream
        stats = pipeline.stats
        totals = self.metrics.totals
        totals.received[(name, "*")] = stats.changes
        for table, count in getattr(stats, "by_table", {}).items():
            totals.applied[(name, table)] = count
        self._drain_latencies(name, stats)
        state = self._task_state("erp", pipeline)
        applier = pipeline.applier
        checkpoint = applier.checkpoint_lsn if applier is not None else None
        if state == DOWN and name not in self._checkpointed:
            # no checkpoint yet: the initial snapshot is loading
            state = RESYNCING if self._checkpointed_known else STARTING
        lag = self._erp_lag(checkpoint) if state == STREAMING else None
        self._set(name, state, lag=lag, last_event_at=stats.last_commit_time or None)

    def _erp_lag(self, checkpoint: int | None) -> float | None:
        if checkpoint is None or not self._lsn_samples:
            return None
        now = time.time()
        behind = [at for at, lsn in self._lsn_samples if lsn > checkpoint]
        return round(now - behind[0], 3) if behind else 0.0

    def _sample_salesforce(self, pipeline: Any) -> None:
        stats = pipeline.stats
        applier = pipeline.applier
        prefix = pipeline.cfg.stream_prefix
        if stats is not None:
            self._carry_totals(prefix, stats)
            self._drain_latencies(prefix, stats)
            self.metrics.totals.dead_lettered[prefix] = stats.dead_letters
        state = self._task_state("salesforce", pipeline)
        if state == DOWN and (
            getattr(pipeline, "_to_load", None)
            or getattr(pipeline, "_to_catch_up", None)
        ):
            state = RESYNCING
        positions = getattr(pipeline, "_positions", {})
        last_commit = getattr(pipeline, "_last_commit", {})
        channels = [s.channel for s in applier.objects.values()] if applier else []
        if channels and prefix in self.state.streams:
            # the placeholder shown until the objects are described
            del self.state.streams[prefix]
            self.metrics.up.remove(prefix)
            self.metrics.resync_running.remove(prefix)
        for channel in channels or [None]:
            stream = applier.stream_name(channel) if channel else prefix
            position = positions.get(channel) if channel else None
            committed = last_commit.get(channel) if channel else None
            self._set(
                stream,
                state,
                lag=self._sf_lag(stats) if state == STREAMING else None,
                position=None if position is None else str(position),
                last_event_at=committed.timestamp() if committed else None,
            )

    def _sf_lag(self, stats: Any) -> float:
        return float(getattr(stats, "last_latency", 0.0) or 0.0)

    def _carry_totals(self, prefix: str, stats: Any) -> None:
        """Keep SF totals monotonic: each run_once makes a new stats object."""
        carry = self._carry.setdefault(prefix, _Carry(base=collections.Counter()))
        assert carry.base is not None
        if carry.stats is not stats and carry.last is not None:
            carry.base.update(carry.last)
        carry.stats = stats
        current: collections.Counter[tuple[str, str]] = collections.Counter()
        for obj, count in getattr(stats, "received_by_object", {}).items():
            current[("received", obj)] = count
        for obj, count in getattr(stats, "applied_by_object", {}).items():
            current[("applied", obj)] = count
        current[("resyncs", "")] = stats.catch_ups
        carry.last = current
        merged = carry.base + current
        totals = self.metrics.totals
        for (kind, obj), count in merged.items():
            if kind == "received":
                totals.received[(prefix, obj)] = count
            elif kind == "applied":
                totals.applied[(prefix, obj)] = count
        totals.resyncs[prefix] = merged[("resyncs", "")]

    def _drain_latencies(self, stream: str, stats: Any) -> None:
        latencies = getattr(stats, "latencies", None)
        if not latencies:
            return
        drained = list(latencies)
        latencies.clear()
        histogram = self.metrics.apply_latency.labels(stream)
        for value in drained:
            histogram.observe(max(0.0, value))

    def _set(self, stream: str, state: str, **fields: Any) -> None:
        previous = self.state.streams.get(stream)
        prev_state = previous.state if previous is not None else None
        was_resyncing = prev_state == RESYNCING
        status = self.state.set_state(
            stream,
            state,
            lag_seconds=fields.pop("lag"),
            **{k: v for k, v in fields.items() if v is not None},
        )
        self.metrics.up.labels(stream).set(1 if state == STREAMING else 0)
        if status.lag_seconds is not None:
            self.metrics.lag.labels(stream).set(status.lag_seconds)
        running = time.time() - status.since if state == RESYNCING else 0.0
        self.metrics.resync_running.labels(stream).set(running)
        if prev_state == DOWN and state == STREAMING:
            # Observed at sampling: a fault shorter than a sample goes uncounted.
            reconnects = self.metrics.totals.reconnects
            reconnects[stream] = reconnects.get(stream, 0) + 1
        if state == RESYNCING and not was_resyncing:
            self.state.notify({"event": "resync", "stream": stream, "phase": "started"})
        elif was_resyncing and state != RESYNCING:
            self.state.notify({"event": "resync", "stream": stream, "phase": "done"})

    # -- databases ------------------------------------------------------------

    async def _connection(self, attr: str, dsn: str) -> asyncpg.Connection | None:
        conn: asyncpg.Connection | None = getattr(self, attr)
        if conn is not None and not conn.is_closed():
            return conn
        try:
            async with asyncio.timeout(5):
                conn = await asyncpg.connect(
                    dsn, server_settings={"application_name": "replicator metrics"}
                )
        except _PROBE_ERRORS as exc:
            logger.debug(
                "metrics probe cannot connect", extra={"error": type(exc).__name__}
            )
            conn = None
        setattr(self, attr, conn)
        return conn

    async def _probe_erp(self) -> None:
        erp = self.settings.erp
        if erp is None or "erp" not in self.pipelines:
            return
        conn = await self._connection("_erp", erp.database.resolve())
        if conn is None:
            return
        try:
            async with asyncio.timeout(5):
                row = await conn.fetchrow(
                    "SELECT pg_current_wal_lsn()::text AS lsn, (SELECT pg_wal_lsn_diff("
                    "pg_current_wal_lsn(), restart_lsn) FROM pg_replication_slots "
                    "WHERE slot_name = $1) AS retained",
                    erp.slot,
                )
        except _PROBE_ERRORS as exc:
            logger.debug("erp probe failed", extra={"error": type(exc).__name__})
            self._erp = None
            conn.terminate()
            return
        lsn = _lsn(row["lsn"])
        if lsn is not None:
            self._lsn_samples.append((time.time(), lsn))
        if row["retained"] is not None:
            self.metrics.slot_retained.labels(erp.slot).set(float(row["retained"]))

    async def _probe_replica(self) -> None:
        conn = await self._connection("_replica", self.settings.replica.resolve())
        if conn is None:
            return
        try:
            async with asyncio.timeout(5):
                await self._read_replica(conn)
        except _PROBE_ERRORS as exc:
            logger.debug("replica probe failed", extra={"error": type(exc).__name__})
            self._replica = None
            conn.terminate()

    async def _read_replica(self, conn: asyncpg.Connection) -> None:
        tables = {
            r["name"]
            for r in await conn.fetch(
                "SELECT c.relname AS name FROM pg_class c JOIN pg_namespace n ON "
                "n.oid = c.relnamespace WHERE n.nspname = 'replicator'"
            )
        }
        if "checkpoints" in tables:
            for r in await conn.fetch(
                "SELECT stream, extract(epoch FROM now() - updated_at)::float8 AS age "
                "FROM replicator.checkpoints"
            ):
                self.metrics.checkpoint_age.labels(r["stream"]).set(r["age"])
                self._checkpointed.add(r["stream"])
        self._checkpointed_known = True
        if "checkpoint_history" in tables and "erp" in self.pipelines:
            stream = self.settings.erp.stream if self.settings.erp else "erp"
            count = await conn.fetchval(
                "SELECT count(*) FROM replicator.checkpoint_history WHERE stream = $1 "
                "AND reason IN ('snapshot', 'resync')",
                stream,
            )
            self.metrics.totals.resyncs[stream] = int(count)
        if "dead_letters" in tables:
            parked = {
                r["stream"]: r["n"]
                for r in await conn.fetch(
                    "SELECT stream, count(*) AS n FROM replicator.dead_letters "
                    "WHERE status = 'parked' GROUP BY stream"
                )
            }
            for stream, n in parked.items():
                self.metrics.dead_letters.labels(stream).set(n)
            self.state.set_dead_letters(
                sum(parked.values()), self.settings.ops.dead_letter_threshold
            )
        if "outbox" in tables:
            await self._read_outbox(conn)
        if "conflicts" in tables:
            with contextlib.suppress(asyncpg.PostgresError):
                self.metrics.totals.conflicts = int(
                    await conn.fetchval("SELECT count(*) FROM replicator.conflicts")
                )

    async def _read_outbox(self, conn: asyncpg.Connection) -> None:
        # The outbox arrives with the two-way sync; until its columns settle,
        # read what is there and leave the gauges absent when it does not fit.
        try:
            row = await conn.fetchrow(
                "SELECT count(*) AS depth, extract(epoch FROM now() - min(created_at))"
                "::float8 AS age FROM replicator.outbox WHERE status <> 'done'"
            )
        except asyncpg.PostgresError:
            return
        self.metrics.outbox_depth.set(row["depth"])
        self.metrics.outbox_age.set(row["age"] or 0.0)
