"""Echo suppression: tell the changes we caused from the changes people made.

Every value the sinks write into a system comes back through that system's
stream. A field whose incoming value equals a value we wrote to that system,
for that record and field, and whose echo has not come back yet, is an echo:
it updates the mirror and nothing else. Any pending write counts, not only the
latest (BUG-35: the echo of an older write that arrives after a newer change
must not revert it). Other fields of the same change are genuine: a trigger or
flow that ran in our own transaction carries our origin too, so the origin
(:func:`is_own_origin`) cannot decide for the whole change (BUG-40).

Values compare with :func:`~replicator.conflict.rules.values_equal`, so a JSON
field that the ERP normalised is still recognised (BUG-38).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from replicator.conflict.rules import values_equal
from replicator.errors import InvariantError

__all__ = ["PendingWrite", "is_own_origin", "split_echoes"]


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """A value we wrote to a system whose echo has not come back yet."""

    target: str
    key: str
    field: str
    value: Any
    written_at: datetime


def split_echoes(
    change_fields: Mapping[str, Any],
    pending: Sequence[PendingWrite],
    *,
    json_fields: set[str],
) -> tuple[dict[str, Any], list[PendingWrite]]:
    """
    Split a change into genuine fields and the echoes of our own writes.

    ``pending`` holds the not-yet-echoed writes to the system the change comes
    from, for the record it changes, in that system's field names and values
    (the caller selects them). Returns the genuine fields and the pending
    writes that are now settled: for each echoed field, the oldest write with
    that value and every earlier write to the same field, which the system
    applied before it (a system's change events follow its commit order, so a
    coalesced echo stands for the writes it overtook).

    Raises:
        InvariantError: ``pending`` mixes targets or records.
    """
    if len({(w.target, w.key) for w in pending}) > 1:
        raise InvariantError(
            "pending writes of several targets or records given to one change: "
            f"{sorted({(w.target, w.key) for w in pending})!r}"
        )
    by_field: dict[str, list[PendingWrite]] = {}
    for write in sorted(pending, key=lambda w: w.written_at):
        by_field.setdefault(write.field, []).append(write)

    genuine: dict[str, Any] = {}
    settled: list[PendingWrite] = []
    for name, value in change_fields.items():
        writes = by_field.get(name, [])
        json = name in json_fields
        match = next(
            (
                i
                for i, w in enumerate(writes)
                if values_equal(w.value, value, json=json)
            ),
            None,
        )
        if match is None:
            genuine[name] = value
        else:
            settled.extend(writes[: match + 1])
    return genuine, settled


def is_own_origin(origin: str | None, *, client: str) -> bool:
    """
    Tell whether a change was made by us, from its origin.

    ``origin`` is the ERP transaction's replication origin name (equal to
    ``client``) or a Salesforce ``changeOrigin`` such as
    ``com/salesforce/api/rest/60.0;client=ERPSync``, whose ``client`` comes
    from the ``Sforce-Call-Options`` header of the call (P4).
    """
    if not origin:
        return False
    if origin == client:
        return True
    _, _, options = origin.partition(";")
    for option in options.split(";"):
        name, _, value = option.partition("=")
        if name.strip() == "client" and value.strip() == client:
            return True
    return False
