"""State-change notices posted as JSON to an optional webhook.

Notices wait in a bounded queue drained by one task, so a slow or dead
receiver never blocks replication; when the queue is full the oldest notice
is dropped (and counted). The URL may carry a token, so it is never logged.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import aiohttp

from replicator.backoff import Backoff

logger = logging.getLogger(__name__)

_QUEUE = 1000
_ATTEMPTS = 3


class Notifier:
    """Post each notice to ``url``; run ``serve()`` as a task of the daemon."""

    def __init__(
        self, url: str | None, *, timeout: float = 5.0, instance: str = ""
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.instance = instance or socket.gethostname()
        self.dropped = 0
        self.sent = 0
        self._queue: asyncio.Queue[dict[str, Any]] | None = None

    def __repr__(self) -> str:
        return f"Notifier(enabled={self.url is not None})"

    def notify(self, notice: dict[str, Any]) -> None:
        """Queue ``notice`` without waiting; a no-op without a URL."""
        if self.url is None:
            return
        if self._queue is None:
            self._queue = asyncio.Queue(_QUEUE)
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait({**notice, "at": time.time(), "instance": self.instance})

    async def serve(self) -> None:
        """Deliver queued notices until cancelled."""
        if self.url is None:
            await asyncio.Event().wait()
            return
        if self._queue is None:
            self._queue = asyncio.Queue(_QUEUE)
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                notice = await self._queue.get()
                try:
                    await self._post(http, notice)
                finally:
                    self._queue.task_done()

    async def drain(self) -> None:
        """Return once every queued notice was delivered or given up on."""
        if self._queue is not None:
            await self._queue.join()

    async def _post(self, http: aiohttp.ClientSession, notice: dict[str, Any]) -> None:
        assert self.url is not None
        backoff = Backoff(initial=0.5, cap=5.0)
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                async with http.post(self.url, json=notice) as response:
                    if response.status < 300:
                        self.sent += 1
                        return
                    error = f"status {response.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                error = type(exc).__name__
            logger.warning(
                "webhook notice not delivered",
                extra={
                    "event_kind": notice.get("event"),
                    "attempt": attempt,
                    "error": error,
                },
            )
            if attempt < _ATTEMPTS:
                await asyncio.sleep(backoff.next_delay())
        self.dropped += 1
