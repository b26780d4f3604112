"""The event log: replay ids, reads per channel, persistence and retention."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from replicator.emulator.cdc import ALL_CHANGES_CHANNEL, ChangeEvent
from replicator.emulator.eventlog import (
    ALL_EVENTS,
    NEW_EVENTS,
    EventLog,
    InvalidReplayId,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _append(log: EventLog, *entities: str) -> list[int]:
    events = [
        ChangeEvent(e, "S" * 22, {"ChangeEventHeader": {"entityName": e}})
        for e in entities
    ]
    stored = log.append(events, [orjson.dumps(e.payload) for e in events])
    return [e.replay_id for e in stored]


def test_replay_ids_increase_across_appends() -> None:
    log = EventLog(None)

    first = _append(log, "Account", "Contact")
    second = _append(log, "Account")

    assert first + second == [1, 2, 3]
    assert log.last_id == 3


def test_object_channel_reads_only_its_events_all_changes_reads_every_one() -> None:
    log = EventLog(None)
    _append(log, "Account", "Contact", "Account")

    accounts, _ = log.read_after(0, "/data/AccountChangeEvent", 10)
    everything, _ = log.read_after(0, ALL_CHANGES_CHANNEL, 10)

    assert [e.replay_id for e in accounts] == [1, 3]
    assert [e.replay_id for e in everything] == [1, 2, 3]


def test_read_is_limited_and_resumes_after_the_last_event() -> None:
    log = EventLog(None)
    _append(log, *["Account"] * 5)

    events, resume = log.read_after(1, ALL_CHANGES_CHANNEL, 2)
    rest, _ = log.read_after(resume, ALL_CHANGES_CHANNEL, 10)

    assert [e.replay_id for e in events] == [2, 3]
    assert [e.replay_id for e in rest] == [4, 5]


def test_start_positions_for_new_all_and_stored_ids() -> None:
    log = EventLog(None)
    _append(log, "Account", "Account")

    assert log.start_position(NEW_EVENTS) == 2
    assert log.start_position(ALL_EVENTS) == 0
    assert log.start_position(1) == 1
    with pytest.raises(InvalidReplayId):
        log.start_position(3)


def test_log_file_survives_reopen_and_reads_from_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    log = EventLog(path)
    _append(log, "Account", "Contact", "Account")
    log.close()

    reopened = EventLog(path)
    accounts, _ = reopened.read_after(1, "/data/AccountChangeEvent", 10)

    assert reopened.last_id == 3
    assert [e.replay_id for e in accounts] == [3]
    assert (
        orjson.loads(accounts[0].payload)["ChangeEventHeader"]["entityName"]
        == "Account"
    )
    assert _append(reopened, "Account") == [4]


def test_events_older_than_retention_are_purged_and_their_ids_invalid() -> None:
    clock = FakeClock()
    log = EventLog(None, retention=10.0, clock=clock)
    _append(log, "Account", "Account")
    clock.now += 11
    _append(log, "Account")

    log.purge()

    assert log.start_position(ALL_EVENTS) == 2
    assert log.start_position(2) == 2
    with pytest.raises(InvalidReplayId):
        log.start_position(1)
    events, _ = log.read_after(0, ALL_CHANGES_CHANNEL, 10)
    assert [e.replay_id for e in events] == [3]
