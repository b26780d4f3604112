"""Change Data Capture payloads as the CometD flavour of the Streaming API carries them.

Pure: turns the record changes of one committed transaction into change event
payloads (``ChangeEventHeader`` plus body fields) following
``reference/salesforce.md`` section 4. Replay ids, channels' envelopes and
delivery belong to ``eventlog`` and ``cometd``.

CometD rules kept here: compound fields are nested (``BillingAddress.Street``),
a nulled field is an explicit JSON ``null`` (no ``nulledFields``), a long text
change may travel as ``{"diff": ...}`` (no ``diffFields``), ``IsDeleted``,
``SystemModstamp`` and formula fields never appear, identical changes to several
records of one transaction share one event, and a transaction past the overflow
threshold ends with one ``GAP_OVERFLOW`` event per object.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, Protocol

import orjson

from replicator.emulator.schema import FieldSchema, ObjectSchema, OrgSchema

__all__ = [
    "ALL_CHANGES_CHANNEL",
    "OVERFLOW_RECORD_ID",
    "BuildOptions",
    "Change",
    "ChangeEvent",
    "build_events",
    "change_origin",
    "channel_for",
    "event_name",
    "format_datetime",
    "schema_id",
]

ALL_CHANGES_CHANNEL = "/data/ChangeEvents"
OVERFLOW_RECORD_ID = "000000000000000AAA"

# cdc_event_fields_body: never in a change event body; Id travels in recordIds.
_NEVER_IN_BODY = frozenset(
    {
        "Id",
        "IsDeleted",
        "SystemModstamp",
        "LastActivityDate",
        "LastViewedDate",
        "LastReferencedDate",
        "PhotoUrl",
    }
)
# Fields that make up the audit trail: they change on every write and do not
# count as the user's change for the overflow threshold.
_AUDIT_FIELDS = frozenset({"LastModifiedDate", "LastModifiedById"})
# cdc_data_diff_event_fields: long text values from this length may be diffs.
_DIFF_MIN_LENGTH = 1000
_LONG_TEXT_MIN_LENGTH = 256
_FULL_TYPES = frozenset({"CREATE", "UNDELETE"})
_MERGEABLE_TYPES = frozenset(
    {"UPDATE", "DELETE", "GAP_CREATE", "GAP_UPDATE", "GAP_DELETE", "GAP_UNDELETE"}
)


class Change(Protocol):
    """What this module reads from the state's ``RecordChange``."""

    @property
    def object_name(self) -> str: ...
    @property
    def record_id(self) -> str: ...
    @property
    def change_type(self) -> str: ...
    @property
    def before(self) -> Mapping[str, Any] | None: ...
    @property
    def after(self) -> Mapping[str, Any] | None: ...
    @property
    def commit_time(self) -> datetime: ...


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One change event: its object, schema id and ``payload`` object."""

    entity: str
    schema: str
    payload: dict[str, Any]

    @property
    def channel(self) -> str:
        return channel_for(self.entity)


@dataclass(frozen=True, slots=True)
class BuildOptions:
    """How one transaction becomes events.

    ``gap`` says, per (object, record id), whether that change must be sent as
    a ``GAP_`` event (fault injection); ``overflow_threshold`` is the number of
    changes after which the rest of the transaction overflows (100,000 in an
    org); ``max_event_bytes`` turns bigger events into ``GAP_`` events (1 MB).
    """

    api_version: str = "60.0"
    overflow_threshold: int = 100_000
    max_event_bytes: int = 1_000_000
    gap: Callable[[str, str], bool] | None = None


def event_name(object_name: str) -> str:
    """Return the change event name: ``AccountChangeEvent``, ``Foo__ChangeEvent``."""
    if object_name.endswith("__c"):
        return object_name[:-3] + "__ChangeEvent"
    return object_name + "ChangeEvent"


def channel_for(object_name: str) -> str:
    """Return an object's single-entity channel, e.g. ``/data/AccountChangeEvent``."""
    return "/data/" + event_name(object_name)


def change_origin(api_version: str, client: str | None, api: str = "rest") -> str:
    """Return ``changeOrigin`` for a write made through ``api`` by ``client``."""
    origin = f"com/salesforce/api/{api}/{api_version}"
    return f"{origin};client={client}" if client else origin


def format_datetime(value: datetime) -> str:
    """Render a datetime as CDC does: UTC, milliseconds, ``Z``."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC)
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def schema_id(obj: ObjectSchema) -> str:
    """Return a 22-character schema id that changes with the object's field set."""
    names = ",".join(sorted(obj.fields))
    digest = hashlib.sha256(f"{obj.name}:{names}".encode()).digest()[:16]
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def epoch_ms(value: datetime) -> int:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return int(value.timestamp() * 1000)


def transaction_key() -> str:
    """Return a fresh key in the shape of ``0001284f-bf79-b4c7-c7d8-de9e3018d47b``."""
    return str(uuid.uuid4())


def db_transaction_key(number: int) -> str:
    """Return a database-level transaction id as gap events carry, ``0Mc...``."""
    chars = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    digits = []
    for _ in range(12):
        number, rest = divmod(number, 62)
        digits.append(chars[rest])
    return "0Mc" + "".join(reversed(digits))


def build_events(
    changes: Iterable[Change],
    org: OrgSchema,
    *,
    origin: str | None,
    user_id: str,
    commit_number: int,
    options: BuildOptions | None = None,
) -> list[ChangeEvent]:
    """Build the change events of one committed transaction, in sequence order.

    Changes to objects whose CDC is not enabled produce nothing. Several changes
    to one record collapse into one event (first change type, committed values).
    """
    options = options or BuildOptions()
    collapsed = _collapse(c for c in changes if _is_captured(org, c.object_name))
    if not collapsed:
        return []
    commit_time = collapsed[-1].commit_time
    header_base = {
        "commitNumber": commit_number,
        "commitUser": user_id,
        "changeOrigin": change_origin(options.api_version, origin),
        "transactionKey": transaction_key(),
        "commitTimestamp": epoch_ms(commit_time),
    }

    bodies: list[_Body] = []
    overflowed: dict[str, ObjectSchema] = {}
    counted = 0
    for change in collapsed:
        obj = org.get(change.object_name)
        assert obj is not None  # filtered by _is_captured
        if counted >= options.overflow_threshold:
            overflowed.setdefault(obj.name, obj)
            continue
        change_type, changed, body = _body(obj, change)
        counted += _weight(change_type, changed)
        if options.gap is not None and options.gap(obj.name, change.record_id):
            change_type, changed, body = "GAP_" + change_type, [], {}
        bodies.append((obj, change_type, changed, body, change.record_id))

    events = _merge(bodies)
    out: list[ChangeEvent] = []
    for obj, change_type, changed, body, record_ids in events:
        header = _header(header_base, obj, change_type, changed, record_ids)
        payload = {**body, "ChangeEventHeader": header}
        if len(orjson.dumps(payload)) > options.max_event_bytes:
            change_type = "GAP_" + change_type
            header = _header(header_base, obj, change_type, [], record_ids)
            payload = {"ChangeEventHeader": header}
        out.append(ChangeEvent(obj.name, schema_id(obj), payload))
    for obj in overflowed.values():
        header = _header(header_base, obj, "GAP_OVERFLOW", [], [OVERFLOW_RECORD_ID])
        out.append(ChangeEvent(obj.name, schema_id(obj), {"ChangeEventHeader": header}))

    # sequenceNumber is the 1-based order in the transaction; gap events carry
    # 1, an empty origin and a database transaction id (cdc_other_events_gap).
    for number, event in enumerate(out, start=1):
        header = event.payload["ChangeEventHeader"]
        if header["changeType"].startswith("GAP_") and header["changeType"] != (
            "GAP_OVERFLOW"
        ):
            header["sequenceNumber"] = 1
            header["changeOrigin"] = ""
            header["transactionKey"] = db_transaction_key(commit_number)
        else:
            header["sequenceNumber"] = number
    return out


def _is_captured(org: OrgSchema, object_name: str) -> bool:
    obj = org.get(object_name)
    return obj is not None and obj.cdc_enabled


# object, change type, changedFields, body, record id
_Body = tuple[ObjectSchema, str, list[str], dict[str, Any], str]


@dataclass(slots=True)
class _Collapsed:
    object_name: str
    record_id: str
    change_type: str
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    commit_time: datetime


def _collapse(changes: Iterable[Change]) -> list[_Collapsed]:
    """Fold several changes of one record into the first one's slot."""
    by_record: dict[tuple[str, str], _Collapsed] = {}
    for change in changes:
        key = (change.object_name, change.record_id)
        seen = by_record.get(key)
        if seen is None:
            by_record[key] = _Collapsed(
                change.object_name,
                change.record_id,
                change.change_type,
                change.before,
                change.after,
                change.commit_time,
            )
            continue
        seen.after = change.after
        seen.commit_time = change.commit_time
        if change.after is None:
            seen.change_type = "DELETE"
    return list(by_record.values())


def _weight(change_type: str, changed: list[str]) -> int:
    """Count a change as the overflow threshold does: 1, or 1 per changed field."""
    if change_type != "UPDATE":
        return 1
    return max(1, sum(1 for name in changed if name not in _AUDIT_FIELDS))


def _body(
    obj: ObjectSchema, change: _Collapsed
) -> tuple[str, list[str], dict[str, Any]]:
    """Return the change type, ``changedFields`` and body of one change."""
    change_type = change.change_type
    if change_type == "DELETE" or change.after is None:
        return "DELETE", [], {}
    if change_type in _FULL_TYPES or change.before is None:
        values = {k: v for k, v in change.after.items() if v is not None}
        body, _ = _render(obj, values, None)
        return change_type if change_type in _FULL_TYPES else "CREATE", [], body
    before, after = change.before, change.after
    diff = {
        name: after.get(name)
        for name in after.keys() | before.keys()
        if after.get(name) != before.get(name)
    }
    # LastModifiedDate is in every UPDATE, changed or not (cdc_event_fields_body).
    if after.get("LastModifiedDate") is not None:
        diff["LastModifiedDate"] = after["LastModifiedDate"]
    body, changed = _render(obj, diff, before)
    return "UPDATE", changed, body


def _render(
    obj: ObjectSchema,
    values: Mapping[str, Any],
    before: Mapping[str, Any] | None,
) -> tuple[dict[str, Any], list[str]]:
    """Render flat field values into a CDC body, nesting compound components.

    Returns the body and the ``changedFields`` names, in describe order with
    ``LastModifiedDate`` last, as real events show them.
    """
    body: dict[str, Any] = {}
    changed: list[str] = []
    tail: list[str] = []
    for name in _ordered(obj, values):
        fs = obj.fields.get(name)
        if not _is_in_body(obj, name, fs):
            continue
        value = _value(fs, values[name], None if before is None else before.get(name))
        if fs is not None and fs.compound_field_name:
            part = _component(fs.compound_field_name, name)
            body.setdefault(fs.compound_field_name, {})[part] = value
            changed.append(f"{fs.compound_field_name}.{part}")
        elif name == "LastModifiedById":
            # In the body when another user edits, not in changedFields
            # (sf-events/update-contact-nulled.json, from a real capture).
            body[name] = value
        else:
            body[name] = value
            (tail if name == "LastModifiedDate" else changed).append(name)
    return body, changed + tail


def _ordered(obj: ObjectSchema, values: Mapping[str, Any]) -> list[str]:
    known = [name for name in obj.fields if name in values]
    return known + sorted(name for name in values if name not in obj.fields)


def _is_in_body(obj: ObjectSchema, name: str, fs: FieldSchema | None) -> bool:
    if name in _NEVER_IN_BODY or name == "attributes":
        return False
    if fs is None:
        return True
    if fs.calculated or fs.type in ("address", "location"):
        return False
    # A compound parent (Contact.Name) is rendered from its components.
    return not (fs.compound_field_name is None and obj.compound_components(name))


def _component(compound: str, name: str) -> str:
    """Return the key of a component: ``BillingStreet`` -> ``Street``."""
    if compound.endswith("__c"):
        base = compound[:-3] + "__"
        name = name.removesuffix("__s")
    elif compound.endswith("Address"):
        base = compound[: -len("Address")]
    else:
        base = ""
    return name[len(base) :] if base and name.startswith(base) else name


def _value(fs: FieldSchema | None, value: Any, old: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, datetime):
        return format_datetime(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if fs is None or not isinstance(value, str):
        return value
    if fs.type == "datetime":
        return _rest_to_cdc_datetime(value)
    if _is_diffable(fs, value, old):
        return {"diff": text_diff(old, value)}
    return value


def _rest_to_cdc_datetime(value: str) -> str:
    """REST writes ``2026-01-02T03:04:05.000+0000``; CDC writes ``...000Z``."""
    try:
        parsed = datetime.strptime(value, "%Y-%m-%dT%H:%M:%S.%f%z")
    except ValueError:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return value
    return format_datetime(parsed)


def _is_diffable(fs: FieldSchema, value: str, old: Any) -> bool:
    return (
        fs.type == "textarea"
        and fs.length >= _LONG_TEXT_MIN_LENGTH
        and isinstance(old, str)
        and len(value) >= _DIFF_MIN_LENGTH
    )


def text_diff(old: str, new: str) -> str:
    """Return the diff a long text change carries (cdc_data_diff_event_fields).

    ``--- `` then ``+++ <sha256 hex of the new value, UTF-8>`` then unified
    hunks without context lines.
    """
    digest = hashlib.sha256(new.encode()).hexdigest()
    lines = [f"--- \n+++ {digest}\n"]
    old_lines = old.splitlines(keepends=True)
    new_lines = new.splitlines(keepends=True)
    hunks = difflib.unified_diff(old_lines, new_lines, n=0, lineterm="")
    for line in list(hunks)[2:]:  # the file header is written above
        if line.startswith("@@"):
            lines.append(line + "\n")
        elif line.endswith("\n"):
            lines.append(line)
        else:
            lines.append(line + "\n\\ No newline at end of file\n")
    return "".join(lines)


def _merge(
    bodies: list[_Body],
) -> list[tuple[ObjectSchema, str, list[str], dict[str, Any], list[str]]]:
    """Give identical changes to several records one event with all their ids."""
    merged: list[tuple[ObjectSchema, str, list[str], dict[str, Any], list[str]]] = []
    index: dict[bytes, int] = {}
    for obj, change_type, changed, body, record_id in bodies:
        if change_type not in _MERGEABLE_TYPES:
            merged.append((obj, change_type, changed, body, [record_id]))
            continue
        key = orjson.dumps(
            [obj.name, change_type, changed, body], option=orjson.OPT_SORT_KEYS
        )
        if key in index:
            merged[index[key]][4].append(record_id)
            continue
        index[key] = len(merged)
        merged.append((obj, change_type, changed, body, [record_id]))
    return merged


def _header(
    base: Mapping[str, Any],
    obj: ObjectSchema,
    change_type: str,
    changed: list[str],
    record_ids: list[str],
) -> dict[str, Any]:
    """Return a header in the key order of real captures (order is not meaningful)."""
    return {
        "commitNumber": base["commitNumber"],
        "commitUser": base["commitUser"],
        "sequenceNumber": 0,
        "entityName": obj.name,
        "changeType": change_type,
        "changedFields": list(changed),
        "changeOrigin": base["changeOrigin"],
        "transactionKey": base["transactionKey"],
        "commitTimestamp": base["commitTimestamp"],
        "recordIds": list(record_ids),
    }
