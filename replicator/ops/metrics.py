"""Prometheus metrics of one daemon, in a registry of its own.

Totals the pipelines already keep (events, dead letters, catch-ups,
restarts) are exported as counters by a custom collector that reads the
latest sample, instead of mirroring every increment; the apply latency is a
real histogram fed with the latencies drained at each sample.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector as _PromCollector

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


@dataclass
class Totals:
    """Monotonic totals, keyed by (stream, entity) or stream."""

    received: dict[tuple[str, str], int] = field(default_factory=dict)
    applied: dict[tuple[str, str], int] = field(default_factory=dict)
    dead_lettered: dict[str, int] = field(default_factory=dict)
    resyncs: dict[str, int] = field(default_factory=dict)
    reconnects: dict[str, int] = field(default_factory=dict)
    conflicts: int = 0
    notices_dropped: int = 0


class _TotalsCollector(_PromCollector):
    def __init__(self, totals: Totals) -> None:
        self.totals = totals

    def collect(self) -> Iterator[CounterMetricFamily]:
        t = self.totals
        received = CounterMetricFamily(
            "replicator_events_received",
            "change events received from a source",
            labels=["stream", "entity"],
        )
        for (stream, entity), value in sorted(t.received.items()):
            received.add_metric([stream, entity], value)
        yield received
        applied = CounterMetricFamily(
            "replicator_events_applied",
            "row changes written to the replica (after collapsing to net effect)",
            labels=["stream", "entity"],
        )
        for (stream, entity), value in sorted(t.applied.items()):
            applied.add_metric([stream, entity], value)
        yield applied
        for name, doc, values in (
            (
                "replicator_dead_lettered",
                "events parked in the dead-letter table",
                t.dead_lettered,
            ),
            (
                "replicator_resyncs",
                "initial loads, resyncs and catch-ups started",
                t.resyncs,
            ),
            (
                "replicator_source_reconnects",
                "restarts of a source after a fault",
                t.reconnects,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=["stream"])
            for stream, value in sorted(values.items()):
                family.add_metric([stream], value)
            yield family
        yield CounterMetricFamily(
            "replicator_conflicts",
            "field values discarded by conflict resolution",
            value=t.conflicts,
        )
        yield CounterMetricFamily(
            "replicator_notices_dropped",
            "webhook notices that were not delivered",
            value=t.notices_dropped,
        )


class Metrics:
    """Every metric the daemon exports; ``registry`` is what ``/metrics`` renders."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.totals = Totals()
        self.registry.register(_TotalsCollector(self.totals))
        r = self.registry
        self.apply_latency = Histogram(
            "replicator_apply_latency_seconds",
            "time from the source's commit to the replica's commit, per batch",
            ["stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.lag = Gauge(
            "replicator_lag_seconds",
            "how far the replica is behind the source",
            ["stream"],
            registry=r,
        )
        self.up = Gauge(
            "replicator_stream_up",
            "1 while the stream is connected and streaming",
            ["stream"],
            registry=r,
        )
        self.resync_running = Gauge(
            "replicator_resync_running_seconds",
            "how long the stream's current load or resync has run (0: none)",
            ["stream"],
            registry=r,
        )
        self.checkpoint_age = Gauge(
            "replicator_checkpoint_age_seconds",
            "seconds since the stream's checkpoint last moved",
            ["stream"],
            registry=r,
        )
        self.dead_letters = Gauge(
            "replicator_dead_letters",
            "dead letters parked, waiting for an operator",
            ["stream"],
            registry=r,
        )
        self.outbox_depth = Gauge(
            "replicator_outbox_depth", "outbox rows not yet written back", registry=r
        )
        self.outbox_age = Gauge(
            "replicator_outbox_oldest_age_seconds",
            "age of the oldest outbox row not yet written back",
            registry=r,
        )
        self.slot_retained = Gauge(
            "replicator_erp_slot_wal_retained_bytes",
            "WAL the ERP server keeps for the slot (current LSN - restart_lsn)",
            ["slot"],
            registry=r,
        )
        self.active = Gauge(
            "replicator_instance_active",
            "1 when this instance holds the lock, 0 as a standby",
            registry=r,
        )
        self.up_info = Gauge(
            "replicator_up", "1 while the daemon process runs", registry=r
        )
        self.up_info.set(1)
