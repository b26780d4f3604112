"""The retained change events of the emulated org, with their replay ids.

One log for every CDC channel: an event gets one replay id from a single
increasing sequence and is read by ``/data/ChangeEvents`` and by its object's
channel, so each channel sees increasing, non-contiguous ids, as Salesforce
documents. Stored in SQLite (a file in the emulator's data dir, so clients
resume after a restart; in memory without one); recent events are also kept
in memory so live delivery does not touch SQLite. Events older than the
retention window are purged and their ids become invalid replay positions.

SQLite is called on the event loop: appends are one small transaction in WAL
mode with ``synchronous=NORMAL`` (well under a millisecond), and keeping them
in the writer's call keeps replay ids in commit order.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from replicator.emulator.cdc import ALL_CHANGES_CHANNEL, ChangeEvent

__all__ = [
    "ALL_EVENTS",
    "DEFAULT_RETENTION",
    "NEW_EVENTS",
    "EventLog",
    "InvalidReplayId",
    "StoredEvent",
]

logger = logging.getLogger(__name__)

DEFAULT_RETENTION = 72 * 3600.0  # seconds; CDC events are kept 72 hours
NEW_EVENTS = -1
ALL_EVENTS = -2
LOG_FILE_NAME = "events.sqlite3"
_CACHE_SIZE = 50_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    replay_id INTEGER PRIMARY KEY,
    channel   TEXT NOT NULL,
    created   REAL NOT NULL,
    schema    TEXT NOT NULL,
    payload   BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_channel ON events (channel, replay_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class InvalidReplayId(ValueError):
    """A replay id outside the retention window or never issued."""

    def __init__(self, replay_id: int) -> None:
        super().__init__(f"replay id {replay_id} is not retained")
        self.replay_id = replay_id


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One retained event; ``channel`` is its object's single-entity channel."""

    replay_id: int
    channel: str
    created: float
    schema: str
    payload: bytes  # the JSON ``payload`` object, serialized once


class EventLog:
    """Append change events, give them replay ids, read them back after an id."""

    def __init__(
        self,
        path: Path | None,
        *,
        retention: float = DEFAULT_RETENTION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.retention = retention
        self._clock = clock
        self._db = sqlite3.connect(str(path) if path else ":memory:")
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self.last_id = self._meta("last_id")
        self.purged_through = self._meta("purged_through")
        # Recent events, oldest first; lists (not deques) for O(1) indexing.
        self._cache: list[StoredEvent] = []
        self._cache_ids: list[int] = []
        self.purge()

    def close(self) -> None:
        self._db.close()

    def _meta(self, key: str) -> int:
        row = self._db.execute(
            "SELECT value FROM meta WHERE key = ?", (key,)
        ).fetchone()
        return int(row[0]) if row else 0

    def append(
        self, events: Sequence[ChangeEvent], payloads: Sequence[bytes]
    ) -> list[StoredEvent]:
        """Store serialized events in order and return them with their replay ids."""
        now = self._clock()
        stored = [
            StoredEvent(self.last_id + n, event.channel, now, event.schema, payload)
            for n, (event, payload) in enumerate(zip(events, payloads, strict=True), 1)
        ]
        if not stored:
            return stored
        with self._db:
            self._db.executemany(
                "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                [
                    (e.replay_id, e.channel, e.created, e.schema, e.payload)
                    for e in stored
                ],
            )
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('last_id', ?)",
                (stored[-1].replay_id,),
            )
        self.last_id = stored[-1].replay_id
        self._cache.extend(stored)
        self._cache_ids.extend(e.replay_id for e in stored)
        if len(self._cache) > 2 * _CACHE_SIZE:
            del self._cache[:-_CACHE_SIZE]
            del self._cache_ids[:-_CACHE_SIZE]
        return stored

    def purge(self) -> None:
        """Drop events older than the retention window."""
        cutoff = self._clock() - self.retention
        row = self._db.execute(
            "SELECT max(replay_id) FROM events WHERE created < ?", (cutoff,)
        ).fetchone()
        if row[0] is None:
            return
        with self._db:
            self._db.execute("DELETE FROM events WHERE replay_id <= ?", (row[0],))
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('purged_through', ?)", (row[0],)
            )
        self.purged_through = row[0]
        keep = bisect.bisect_right(self._cache_ids, row[0])
        del self._cache[:keep]
        del self._cache_ids[:keep]
        logger.debug("event log purged", extra={"through": row[0]})

    def start_position(self, replay_id: int) -> int:
        """Return the id after which a subscription with ``replay_id`` reads.

        Raises:
            InvalidReplayId: the id is neither -1 nor -2 and lies outside the
                retained range (purged, or never issued by this log).
        """
        self.purge()
        if replay_id == NEW_EVENTS:
            return self.last_id
        if replay_id == ALL_EVENTS:
            return self.purged_through
        if not self.purged_through <= replay_id <= self.last_id:
            raise InvalidReplayId(replay_id)
        return replay_id

    def read_after(
        self, replay_id: int, channel: str, limit: int
    ) -> tuple[list[StoredEvent], int]:
        """Return up to ``limit`` events of ``channel`` with ids above ``replay_id``.

        Also returns the id the reader may resume after: the last event
        returned, or the last id examined when fewer than ``limit`` matched,
        so a channel with rare events does not rescan the same stretch.
        """
        if replay_id >= self.last_id or limit <= 0:
            return [], replay_id
        if self._cache_ids and self._cache_ids[0] <= replay_id + 1:
            return self._read_cache(replay_id, channel, limit)
        if channel == ALL_CHANGES_CHANNEL:
            rows = self._db.execute(
                "SELECT * FROM events WHERE replay_id > ? ORDER BY replay_id LIMIT ?",
                (replay_id, limit),
            )
        else:
            rows = self._db.execute(
                "SELECT * FROM events WHERE channel = ? AND replay_id > ? "
                "ORDER BY replay_id LIMIT ?",
                (channel, replay_id, limit),
            )
        events = [StoredEvent(*row) for row in rows]
        if len(events) == limit:
            return events, events[-1].replay_id
        return events, self.last_id

    def _read_cache(
        self, replay_id: int, channel: str, limit: int
    ) -> tuple[list[StoredEvent], int]:
        start = bisect.bisect_right(self._cache_ids, replay_id)
        if channel == ALL_CHANGES_CHANNEL:
            events = self._cache[start : start + limit]
            return events, events[-1].replay_id if events else replay_id
        out: list[StoredEvent] = []
        for event in itertools.islice(self._cache, start, None):
            if event.channel == channel:
                out.append(event)
                if len(out) >= limit:
                    return out, event.replay_id
        return out, self.last_id
