"""Exponential backoff with jitter, shared by every component that retries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from replicator.errors import ReplicatorError

logger = logging.getLogger(__name__)


@dataclass
class Backoff:
    """Delays of ``initial * factor**attempt``, capped, each spread by ``jitter``."""

    initial: float = 0.5
    factor: float = 2.0
    cap: float = 30.0
    jitter: float = 0.2
    attempt: int = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.initial * self.factor**self.attempt)
        self.attempt += 1
        return delay * (1 + random.uniform(-self.jitter, self.jitter))

    def reset(self) -> None:
        self.attempt = 0


async def retry_until_stopped(
    what: str,
    attempt: Callable[[], Awaitable[None]],
    stop: asyncio.Event,
    *,
    settled_after: float = 60.0,
) -> None:
    """Run ``attempt`` until it returns or ``stop`` is set; retry retriable errors.

    The delay grows with consecutive failures and starts over after an
    attempt that ran for ``settled_after`` seconds: a new fault, not the same.
    Errors that are not retriable propagate.
    """
    backoff = Backoff()
    while not stop.is_set():
        started = time.monotonic()
        try:
            await attempt()
            return
        except ReplicatorError as exc:
            if not exc.retriable:
                raise
            if time.monotonic() - started > settled_after:
                backoff.reset()
            delay = backoff.next_delay()
            logger.error(
                "%s failed, retrying: %s",
                what,
                exc,
                extra={
                    "error": str(exc),
                    "retry_in": round(delay, 2),
                    "attempt": backoff.attempt,
                },
            )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stop.wait()
