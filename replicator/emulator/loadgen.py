"""Record changes at a chosen rate, through the org state, for benchmarks and demos.

Every write goes through ``OrgState.transaction``, so listeners (CDC) see
real committed transactions. ``rate`` is changes per second (0: as fast as
the loop allows, yielding between transactions); ``per_transaction`` groups
changes into one transaction each.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass

from replicator.emulator.state import OrgState

__all__ = ["LoadGenerator", "LoadResult"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoadResult:
    changes: int
    transactions: int
    seconds: float


class LoadGenerator:
    """Create a pool of records, then update them round-robin."""

    def __init__(
        self,
        state: OrgState,
        user_id: str,
        *,
        object_name: str = "Account",
        field: str = "Phone",
        pool_size: int = 100,
        origin: str | None = "loadgen",
    ) -> None:
        self._state = state
        self._user_id = user_id
        self._object = object_name
        self._field = field
        self._pool_size = pool_size
        self._origin = origin
        self._pool: list[str] = []
        self._counter = itertools.count(1)

    def create_pool(self) -> list[str]:
        """Create the records that updates will change (one transaction)."""
        if not self._pool:
            with self._state.transaction(
                origin=self._origin, user_id=self._user_id
            ) as tx:
                self._pool = [
                    tx.create(self._object, {"Name": f"Load {n:05d}"})
                    for n in range(self._pool_size)
                ]
        return self._pool

    def write(self, count: int) -> None:
        """Make ``count`` record updates in one transaction."""
        pool = self.create_pool()
        with self._state.transaction(origin=self._origin, user_id=self._user_id) as tx:
            for _ in range(count):
                n = next(self._counter)
                tx.update(
                    self._object, pool[n % len(pool)], {self._field: f"555-{n:07d}"}
                )

    async def run(
        self, total: int, *, rate: float = 0.0, per_transaction: int = 1
    ) -> LoadResult:
        """Make ``total`` changes at ``rate`` changes per second (0: unpaced)."""
        self.create_pool()
        loop = asyncio.get_running_loop()
        started = loop.time()
        done = transactions = 0
        while done < total:
            size = min(per_transaction, total - done)
            self.write(size)
            done += size
            transactions += 1
            if rate > 0:
                # Pace against the start time, so a slow tick is caught up.
                delay = started + done / rate - loop.time()
                await asyncio.sleep(max(0.0, delay))
            else:
                await asyncio.sleep(0)
        seconds = loop.time() - started
        logger.info(
            "load generated",
            extra={"changes": done, "transactions": transactions, "seconds": seconds},
        )
        return LoadResult(done, transactions, seconds)
