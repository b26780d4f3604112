"""What the daemon knows about itself: its role and each stream's state and lag.

Every change of state is one INFO log line and one notice to the webhook (if
configured); readings that do not change the state (lag, counts) only update
the fields. Readiness is computed here so ``/readyz`` and tests agree.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Stream states, as logged, notified and shown by ``replicator status``.
STARTING = "starting"
RESYNCING = "resyncing"
STREAMING = "streaming"
DOWN = "down"
STOPPED = "stopped"


@dataclass(slots=True)
class StreamStatus:
    """One stream as last sampled."""

    name: str
    state: str = STARTING
    lag_seconds: float | None = None
    position: str | None = None
    last_event_at: float | None = None
    since: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "lag_seconds": self.lag_seconds,
            "position": self.position,
            "last_event_at": self.last_event_at,
            "state_since": self.since,
        }


Notice = dict[str, Any]


class OpsState:
    """The daemon's role and streams; calls ``notify`` on every state change."""

    def __init__(
        self,
        *,
        lag_budget: float,
        notify: Callable[[Notice], None] | None = None,
    ) -> None:
        self.lag_budget = lag_budget
        self.role = "starting"
        self.streams: dict[str, StreamStatus] = {}
        self.dead_letters = 0
        self._notify = notify or (lambda notice: None)

    def notify(self, notice: Notice) -> None:
        """Pass ``notice`` to the webhook (if any)."""
        self._notify(notice)

    def set_role(self, role: str) -> None:
        if role == self.role:
            return
        previous, self.role = self.role, role
        logger.info("instance role changed", extra={"role": role, "previous": previous})
        self._notify({"event": "role", "role": role, "previous": previous})

    def set_state(self, stream: str, state: str, **fields: Any) -> StreamStatus:
        """Record ``stream``'s ``state``; log and notify if it changed."""
        status = self.streams.get(stream)
        if status is None:
            status = self.streams[stream] = StreamStatus(stream, state="new")
        for key, value in fields.items():
            setattr(status, key, value)
        if status.state != state:
            previous = status.state
            status.state, status.since = state, time.time()
            logger.info(
                "stream state changed",
                extra={
                    "stream": stream,
                    "state": state,
                    "previous": previous,
                    "position": status.position,
                },
            )
            self._notify(
                {
                    "event": "stream_state",
                    "stream": stream,
                    "state": state,
                    "previous": previous,
                    "position": status.position,
                }
            )
        return status

    def set_dead_letters(self, count: int, threshold: int) -> None:
        """Record the parked dead letters; notify when ``threshold`` is crossed."""
        previous, self.dead_letters = self.dead_letters, count
        if previous < threshold <= count or count < threshold <= previous:
            above = count >= threshold
            log = logger.warning if above else logger.info
            log(
                "dead letters crossed the threshold",
                extra={"dead_letters": count, "threshold": threshold, "above": above},
            )
            self._notify(
                {
                    "event": "dead_letters",
                    "count": count,
                    "threshold": threshold,
                    "above": above,
                }
            )

    def readiness(self) -> tuple[bool, list[str]]:
        """Return whether every stream streams within its lag budget, and why not."""
        reasons = []
        if self.role != "active":
            reasons.append(f"instance is {self.role}")
        if not self.streams:
            reasons.append("no stream started yet")
        for status in self.streams.values():
            if status.state != STREAMING:
                reasons.append(f"stream {status.name} is {status.state}")
            elif (
                status.lag_seconds is not None and status.lag_seconds > self.lag_budget
            ):
                reasons.append(
                    f"stream {status.name} lags {status.lag_seconds:.1f}s, "
                    f"over its budget of {self.lag_budget:g}s"
                )
        return not reasons, reasons
