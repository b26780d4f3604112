"""Turn CometD Change Data Capture messages into flat record changes (pure, no I/O).

What Salesforce sends and what this module makes of it
(``reference/salesforce.md`` section 4):

* compound fields arrive nested (``BillingAddress: {"Street": ...}``) and are
  flattened to the component fields SOQL returns (``BillingStreet``); a
  component that is absent stays absent, so the other components are kept;
* a field present with JSON null is set to null; an absent field is unchanged;
* a long text value may arrive as ``{"diff": "--- \\n+++ <sha256>\\n@@ ..."}``,
  kept apart so the applier can patch its stored copy and check the hash;
* one event may name several ``recordIds``: one change per record;
* GAP_ events carry no values; GAP_OVERFLOW names only the object.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from replicator.errors import ApplyError

CHANGE_TYPES = frozenset(
    {
        "CREATE",
        "UPDATE",
        "DELETE",
        "UNDELETE",
        "GAP_CREATE",
        "GAP_UPDATE",
        "GAP_DELETE",
        "GAP_UNDELETE",
        "GAP_OVERFLOW",
    }
)
_HEADER = "ChangeEventHeader"


class MalformedEvent(ApplyError):
    """A change event that cannot be understood; it goes to the dead-letter table."""


@dataclass(frozen=True, slots=True)
class RecordChange:
    """One record's change from one event, with flat field values."""

    object_name: str
    record_id: str
    change_type: str
    fields: Mapping[str, Any]  # API name -> value (None is an explicit null)
    diffs: Mapping[str, str]  # API name -> unified diff against the stored value
    commit_time: dt.datetime
    transaction_key: str
    sequence: int
    origin: str
    replay_id: int
    channel: str
    changed_fields: tuple[str, ...] = ()

    @property
    def is_gap(self) -> bool:
        return self.change_type.startswith("GAP_")

    @property
    def client(self) -> str | None:
        """The ``client=`` part of ``changeOrigin`` (who wrote the change), if any."""
        _, sep, client = self.origin.partition(";client=")
        return client or None if sep else None


@dataclass(frozen=True, slots=True)
class CompoundMap:
    """Where each component of each compound field lands, for one object."""

    components: Mapping[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def from_describe(cls, fields: list[Mapping[str, Any]]) -> CompoundMap:
        """Build from describe's field list (``name`` and ``compoundFieldName``)."""
        out: dict[tuple[str, str], str] = {}
        for f in fields:
            compound = f.get("compoundFieldName")
            if not compound:
                continue
            name = str(f["name"])
            out[(compound, _component_of(compound, name))] = name
        return cls(out)

    def flatten(self, compound: str, value: Mapping[str, Any]) -> dict[str, Any]:
        flat = {}
        for component, v in value.items():
            target = self.components.get((compound, component))
            if target is None:
                raise MalformedEvent(
                    f"unknown component {component!r} of compound field {compound!r}"
                )
            flat[target] = v
        return flat


def _component_of(compound: str, name: str) -> str:
    if compound.endswith("Address") and name.startswith(compound[: -len("Address")]):
        return name[len(compound) - len("Address") :]
    geo = re.fullmatch(r"(.+)__(Latitude|Longitude)__s", name)
    if geo and compound == geo.group(1) + "__c":
        return geo.group(2)
    return name


def parse_message(
    message: Mapping[str, Any], compounds: Mapping[str, CompoundMap]
) -> list[RecordChange]:
    """Split one CometD data message into one change per record.

    Raises ``MalformedEvent`` with the reason when the message cannot be used.
    """
    try:
        data = message["data"]
        payload = data["payload"]
        header = payload[_HEADER]
        replay_id = int(data["event"]["replayId"])
        object_name = str(header["entityName"])
        change_type = str(header["changeType"])
        record_ids = list(header["recordIds"])
        commit_ms = int(header["commitTimestamp"])
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedEvent(f"change event lacks a required part: {exc!r}") from exc
    if change_type not in CHANGE_TYPES:
        raise MalformedEvent(f"unknown changeType {change_type!r}")
    fields: dict[str, Any] = {}
    diffs: dict[str, str] = {}
    compound_map = compounds.get(object_name, CompoundMap())
    for name, value in payload.items():
        if name == _HEADER:
            continue
        if isinstance(value, dict) and set(value) == {"diff"}:
            diffs[name] = str(value["diff"])
        elif isinstance(value, dict):
            fields.update(compound_map.flatten(name, value))
        else:
            fields[name] = value
    commit_time = dt.datetime.fromtimestamp(commit_ms / 1000, tz=dt.UTC)
    return [
        RecordChange(
            object_name=object_name,
            record_id=str(rid),
            change_type=change_type,
            fields=fields,
            diffs=diffs,
            commit_time=commit_time,
            transaction_key=str(header.get("transactionKey", "")),
            sequence=int(header.get("sequenceNumber", 0)),
            origin=str(header.get("changeOrigin", "")),
            replay_id=replay_id,
            channel=str(message.get("channel", "")),
            changed_fields=tuple(header.get("changedFields") or ()),
        )
        for rid in record_ids
    ]


_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


class DiffMismatch(Exception):
    """The stored copy is not what the diff was made against: re-read the record."""


def _diff_lines(lines: list[str]) -> list[tuple[str, str]]:
    """Pair each hunk body line's marker with its text, newline included."""
    out: list[tuple[str, str]] = []
    for line in lines:
        if line.startswith(
            "\\"
        ):  # "\ No newline at end of file": the last line had none
            if out:
                marker, text = out[-1]
                out[-1] = (marker, text[:-1])
        elif line[:1] in (" ", "-", "+", "@"):
            out.append((line[:1], line[1:] + "\n") if line[:1] != "@" else ("@", line))
    return out


def apply_diff(old: str | None, diff: str) -> str:
    """Apply a CDC unified diff to ``old`` and check the result against its hash.

    The diff's ``+++`` line carries the SHA-256 (hex) of the new value.
    Raises ``DiffMismatch`` when a context or removed line does not match, or
    when the result's hash differs.
    """
    lines = diff.split("\n")
    if (
        len(lines) < 2
        or not lines[0].startswith("---")
        or not lines[1].startswith("+++")
    ):
        raise DiffMismatch("not a unified diff")
    expected_hash = lines[1][3:].strip()
    source = (old or "").splitlines(keepends=True)
    out: list[str] = []
    pos = 0
    for marker, text in _diff_lines(lines[2:]):
        if marker == "@":
            match = _HUNK.match(text)
            if match is None:
                raise DiffMismatch(f"bad hunk header {text!r}")
            start = int(match.group(1))
            count = 1 if match.group(2) is None else int(match.group(2))
            begin = start - 1 if count else start
            if begin < pos:
                raise DiffMismatch("hunks overlap")
            out.extend(source[pos:begin])
            pos = begin
        elif marker == "+":
            out.append(text)
        else:
            if pos >= len(source) or source[pos] != text:
                raise DiffMismatch(f"line {pos + 1} of the stored copy differs")
            if marker == " ":
                out.append(text)
            pos += 1
    out.extend(source[pos:])
    new = "".join(out)
    if expected_hash and hashlib.sha256(new.encode()).hexdigest() != expected_hash:
        raise DiffMismatch("hash of the patched value differs")
    return new
