"""Operations: health and readiness endpoints, Prometheus metrics, state-change notices.

``OpsState`` holds what the daemon knows about itself (role, each stream's
state and lag); ``Collector`` samples the pipelines' stats and the replica
into it and into the metrics; ``OpsServer`` serves ``/healthz``, ``/readyz``
and ``/metrics``; ``Notifier`` posts state changes to a webhook.
"""

from __future__ import annotations

from replicator.ops.collector import Collector
from replicator.ops.metrics import Metrics
from replicator.ops.server import OpsServer
from replicator.ops.state import OpsState, StreamStatus
from replicator.ops.webhook import Notifier

__all__ = ["Collector", "Metrics", "Notifier", "OpsServer", "OpsState", "StreamStatus"]
