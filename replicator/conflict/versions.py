"""Versions of field values and the total order that decides between them.

A version is ``(commit_time, source, position)``: the source's commit time of
the transaction that set the value (ERP: the pgoutput Commit timestamp;
Salesforce: ``ChangeEventHeader.commitTimestamp``), the source system, and the
position of the change in that source's stream (LSN text, replay id).

The two clocks may disagree. The assumption is that they differ by less than
``tie_window``. Times are therefore compared in buckets of ``tie_window``
(``floor(epoch / tie_window)``); inside one bucket the fixed source precedence
decides, then the commit time, then the position. The sort key is::

    (bucket, precedence rank, commit time, position, source)

A key is a plain tuple, so the order is total and transitive and every replica
decides the same way whatever order the changes arrive in. A window compared
pairwise ("within 1 s of each other") would not be transitive. What this buys
and what it does not: a change made more than ``skew + tie_window`` after
another one (in true time) always wins; two changes closer than that are
decided deterministically, but not necessarily in true time order.

Positions compare numerically when they are integers (replay ids) or LSNs
(``16/B374D848``); other positions compare as text; numeric positions sort
before textual ones, which keeps the key a total order (comparing a mixed
pair "as text" would not be transitive: ``9 < 10`` numerically, ``10 < 10a``
and ``10a < 9`` as text).

Serialised for the ``versions jsonb`` column as ``{"t": ..., "s": ..., "p":
...}``: ``t`` is epoch milliseconds when the time has no sub-millisecond part
(every Salesforce time) and epoch microseconds otherwise (ERP commit times);
the reader tells them apart by magnitude (``|t| >= 10**14`` is microseconds:
as milliseconds that would be the year 5138).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = [
    "Version",
    "VersionKey",
    "position_key",
    "version_from_json",
    "version_key",
    "version_to_json",
]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
# An epoch in milliseconds stays below this until the year 5138; an epoch in
# microseconds is above it from 1973 on.
_US_THRESHOLD = 10**14

_INTEGER = re.compile(r"[0-9]+")
_LSN = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")

# (bucket, precedence rank, time in us, (position kind, number, text), source)
VersionKey = tuple[int, int, int, tuple[int, int, str], str]


@dataclass(frozen=True, slots=True)
class Version:
    """Where a field value came from: commit time (UTC), source, position."""

    commit_time: datetime
    source: str
    position: str

    def __post_init__(self) -> None:
        if self.commit_time.tzinfo is None:
            raise ValueError(
                f"commit time {self.commit_time!r} has no time zone; "
                "versions compare in UTC"
            )
        object.__setattr__(self, "commit_time", self.commit_time.astimezone(UTC))

    @property
    def epoch_us(self) -> int:
        """Return the commit time as integer microseconds since the epoch."""
        return (self.commit_time - EPOCH) // _US


def position_key(position: str) -> tuple[int, int, str]:
    """Return the sort key of a position: numbers first, then text."""
    if _INTEGER.fullmatch(position):
        return (0, int(position), position)
    lsn = _LSN.fullmatch(position)
    if lsn:
        return (0, (int(lsn[1], 16) << 32) | int(lsn[2], 16), position)
    return (1, 0, position)


def version_key(
    version: Version, tie_window: timedelta, precedence: Sequence[str]
) -> VersionKey:
    """
    Return the total-order key of a version: greater keys win.

    A source missing from ``precedence`` ranks below every listed one; the
    source name is the last component so that distinct versions never compare
    equal.
    """
    window_us = tie_window // _US
    if window_us <= 0:
        raise ValueError(f"tie window {tie_window!r} must be positive")
    epoch_us = version.epoch_us
    if version.source in precedence:
        rank = len(precedence) - list(precedence).index(version.source)
    else:
        rank = 0
    return (
        epoch_us // window_us,
        rank,
        epoch_us,
        position_key(version.position),
        version.source,
    )


def version_to_json(version: Version) -> dict[str, Any]:
    """Return the ``versions jsonb`` form of a version."""
    epoch_us = version.epoch_us
    t = epoch_us // 1000 if epoch_us % 1000 == 0 else epoch_us
    return {"t": t, "s": version.source, "p": version.position}


def version_from_json(data: Mapping[str, Any]) -> Version:
    """Read a version written by :func:`version_to_json`."""
    t = data["t"]
    if not isinstance(t, int) or isinstance(t, bool):
        raise TypeError(f"version time {t!r} is not an integer epoch")
    epoch_us = t if abs(t) >= _US_THRESHOLD else t * 1000
    return Version(
        commit_time=EPOCH + timedelta(microseconds=epoch_us),
        source=str(data["s"]),
        position=str(data["p"]),
    )
