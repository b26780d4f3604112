"""The org's records: writes in transactions, system fields, the recycle bin, SQLite.

Records live in memory as flat dicts of stored values by API name
(``BillingStreet``, never ``BillingAddress``) and are written through to
SQLite at each commit, so a restarted emulator keeps its org. One REST call
or one composite call is one ``Transaction``; when it commits, every
registered ``ChangeListener`` receives the list of ``RecordChange`` it made
(the CDC part builds change events from it). Automations registered with
``add_automation`` may add field changes to a record inside the same
transaction, as a flow or trigger would. Values are checked by ``values``.

Contract for listeners: ``before`` is ``None`` for CREATE, ``after`` is
``None`` for DELETE; for UNDELETE ``before`` is the record as it was in the
recycle bin. All changes of one transaction share one ``commit_time``, which
is also the records' ``SystemModstamp``.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

import orjson

from replicator.emulator import ids
from replicator.emulator.schema import ObjectSchema, OrgSchema
from replicator.emulator.values import (
    ApiError,
    check_required,
    coerce_value,
    format_datetime,
    invalid_field,
)

__all__ = [
    "CHANGE_TYPES",
    "ApiError",
    "Automation",
    "ChangeListener",
    "OrgState",
    "RecordChange",
    "Transaction",
]

logger = logging.getLogger(__name__)

CHANGE_TYPES = ("CREATE", "UPDATE", "DELETE", "UNDELETE")
DB_FILE = "org.sqlite3"

# Fields the server maintains; a client that sends them gets
# INVALID_FIELD_FOR_INSERT_UPDATE (Id itself has its own message).
SYSTEM_FIELDS = (
    "IsDeleted",
    "CreatedDate",
    "CreatedById",
    "LastModifiedDate",
    "LastModifiedById",
    "SystemModstamp",
)

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS records (
    id TEXT PRIMARY KEY,
    object_name TEXT NOT NULL,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (prefix TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class RecordChange:
    """One record's change inside a committed transaction."""

    object_name: str
    record_id: str  # 18 characters
    change_type: str  # "CREATE" | "UPDATE" | "DELETE" | "UNDELETE"
    before: Mapping[str, Any] | None
    after: Mapping[str, Any] | None
    commit_time: datetime  # UTC, millisecond precision


class ChangeListener(Protocol):
    """Receives every committed transaction, in commit order."""

    def on_transaction(
        self, changes: list[RecordChange], *, origin: str | None, user_id: str
    ) -> None: ...


class Automation(Protocol):
    """A flow or trigger stand-in: returns more field values for the record.

    Called after each API write of a record of its object, inside the same
    transaction; ``after`` already holds the write's values. Returned values
    are applied as a system update (no createable/updateable checks) and
    become part of the same ``RecordChange``. Return ``None`` or ``{}`` to
    change nothing.
    """

    def __call__(
        self,
        change_type: str,
        before: Mapping[str, Any] | None,
        after: Mapping[str, Any],
    ) -> Mapping[str, Any] | None: ...


class Transaction:
    """A unit of writes; obtained from ``OrgState.transaction``.

    Each operation checks everything before it touches a record, so an
    ``ApiError`` leaves the transaction as it was: the caller may go on with
    other records (collections with ``allOrNone=false``) or let the error
    leave the ``with`` block, which rolls everything back.
    """

    def __init__(self, state: OrgState, origin: str | None, user_id: str) -> None:
        self._state = state
        self.origin = origin
        self.user_id = user_id
        self.commit_time = state._next_commit_time()
        self.changes: list[RecordChange] = []
        self._undo: list[tuple[str, dict[str, Any] | None]] = []
        self._counters_before = dict(state._ids.counters)

    @property
    def now(self) -> str:
        return format_datetime(self.commit_time)

    def create(
        self, object_name: str, values: Mapping[str, Any], *, system: bool = False
    ) -> str:
        """Insert a record and return its 18-character id.

        ``system`` writes skip the createable check (seed data may set
        ``CaseNumber`` or an auto-number ``Name``).
        """
        obj = self._state.object(object_name)
        if "Id" in values or "id" in values:
            raise ApiError(
                400,
                "INVALID_FIELD",
                "The Id field should not be specified in the sobject data.",
            )
        clean = self._state._check_values(obj, values, create=True, system=system)
        record = self._state._defaults(obj, self.user_id, self.now)
        record.update(clean)
        self._state._fill_auto_numbers(obj, record)
        self._state._derive(obj, record)
        check_required(obj, record)
        self._state._check_unique(obj, record, None)
        record_id = self._state._ids.next_id(obj.key_prefix)
        record["Id"] = record_id
        record = self._automate(obj, "CREATE", None, record)
        self._put(record_id, record)
        self._record_change(obj, record_id, "CREATE", None, record)
        return record_id

    def update(
        self,
        object_name: str | None,
        record_id: str,
        values: Mapping[str, Any],
        *,
        system: bool = False,
    ) -> None:
        """Change fields of a live record (``ENTITY_IS_DELETED`` when binned)."""
        obj, before = self._state._live(object_name, record_id)
        values = {k: v for k, v in values.items() if k not in ("Id", "id")}
        clean = self._state._check_values(obj, values, create=False, system=system)
        record = dict(before)
        record.update(clean)
        self._state._derive(obj, record)
        check_required(obj, record)
        self._state._check_unique(obj, record, before["Id"])
        record["LastModifiedDate"] = self.now
        record["LastModifiedById"] = self.user_id
        record["SystemModstamp"] = self.now
        record = self._automate(obj, "UPDATE", before, record)
        self._put(before["Id"], record)
        self._record_change(obj, before["Id"], "UPDATE", before, record)

    def delete(self, object_name: str | None, record_id: str) -> None:
        """Move a live record to the recycle bin."""
        obj, before = self._state._live(object_name, record_id)
        record = dict(before)
        record["IsDeleted"] = True
        record["SystemModstamp"] = self.now
        record["LastModifiedDate"] = self.now
        record["LastModifiedById"] = self.user_id
        self._put(before["Id"], record)
        self._record_change(obj, before["Id"], "DELETE", before, None)

    def undelete(self, object_name: str | None, record_id: str) -> None:
        """Restore a record from the recycle bin."""
        obj, before = self._state._existing(object_name, record_id)
        if not before["IsDeleted"]:
            raise ApiError(
                400, "UNDELETE_FAILED", "Entity is not in the recycle bin", fields=()
            )
        record = dict(before)
        record["IsDeleted"] = False
        record["SystemModstamp"] = self.now
        record["LastModifiedDate"] = self.now
        record["LastModifiedById"] = self.user_id
        record = self._automate(obj, "UNDELETE", before, record)
        self._put(before["Id"], record)
        self._record_change(obj, before["Id"], "UNDELETE", before, record)

    def upsert(
        self,
        object_name: str,
        field_name: str,
        value: str,
        values: Mapping[str, Any],
    ) -> tuple[str, bool]:
        """Create or update by an external id; return the id and whether created.

        Raises ``ApiError`` with status 300 when several records match.
        """
        matches = self._state.match_external_id(object_name, field_name, value)
        if len(matches) > 1:
            raise ApiError(300, "MULTIPLE_CHOICES", "", matches=tuple(matches))
        if matches:
            self.update(object_name, matches[0], values)
            return matches[0], False
        obj = self._state.object(object_name)
        field = obj.fields[self._state.external_id_field(obj, field_name)]
        merged = dict(values)
        if field.name != "Id":
            merged[field.name] = value
        return self.create(object_name, merged), True

    def _automate(
        self,
        obj: ObjectSchema,
        change_type: str,
        before: Mapping[str, Any] | None,
        record: dict[str, Any],
    ) -> dict[str, Any]:
        for automation in self._state._automations.get(obj.name, ()):
            extra = automation(change_type, before, MappingProxyType(record))
            if not extra:
                continue
            clean = self._state._check_values(obj, extra, create=False, system=True)
            record = {**record, **clean}
            self._state._derive(obj, record)
        return record

    def _put(self, record_id: str, record: dict[str, Any]) -> None:
        self._undo.append((record_id, self._state._records.get(record_id)))
        self._state._records[record_id] = record

    def _record_change(
        self,
        obj: ObjectSchema,
        record_id: str,
        change_type: str,
        before: Mapping[str, Any] | None,
        after: Mapping[str, Any] | None,
    ) -> None:
        self.changes.append(
            RecordChange(
                object_name=obj.name,
                record_id=record_id,
                change_type=change_type,
                before=None if before is None else MappingProxyType(before),
                after=None if after is None else MappingProxyType(after),
                commit_time=self.commit_time,
            )
        )

    def _rollback(self) -> None:
        for record_id, previous in reversed(self._undo):
            if previous is None:
                self._state._records.pop(record_id, None)
            else:
                self._state._records[record_id] = previous
        self._undo.clear()
        self.changes.clear()
        self._state._ids.counters = self._counters_before


class OrgState:
    """Every record of one org, with its schema and its persistence."""

    def __init__(
        self,
        schema: OrgSchema,
        *,
        data_dir: Path | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.schema = schema
        self._clock = clock or (lambda: datetime.now(UTC))
        self._last_commit = datetime.min.replace(tzinfo=UTC)
        self._listeners: list[ChangeListener] = []
        self._automations: dict[str, list[Automation]] = {}
        self._records: dict[str, dict[str, Any]] = {}
        path = ":memory:" if data_dir is None else str(Path(data_dir) / DB_FILE)
        if data_dir is not None:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.executescript(_SCHEMA_SQL)
        self._ids = ids.IdGenerator(dict(self._db.execute("SELECT * FROM counters")))
        for record_id, data in self._db.execute("SELECT id, data FROM records"):
            self._records[record_id] = orjson.loads(data)
        self.org_id = self._load_org_id()
        logger.info(
            "org state opened",
            extra={"path": path, "records": len(self._records), "org_id": self.org_id},
        )

    # -- reading ------------------------------------------------------------

    def object(self, name: str) -> ObjectSchema:
        """Return an object's schema or raise ``NOT_FOUND`` (404)."""
        obj = self.schema.get(name)
        if obj is None:
            raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")
        return obj

    def get(
        self, record_id: str, *, include_deleted: bool = False
    ) -> Mapping[str, Any] | None:
        """Return a record by id (15 or 18 characters), or ``None``."""
        try:
            record = self._records.get(ids.normalize_id(record_id))
        except ValueError:
            return None
        if record is None or (record["IsDeleted"] and not include_deleted):
            return None
        return MappingProxyType(record)

    def records(
        self, object_name: str, *, include_deleted: bool = False
    ) -> Iterator[Mapping[str, Any]]:
        """Yield the records of one object in creation order, read-only.

        Each yielded mapping is a snapshot: later writes replace it rather
        than change it.
        """
        obj = self.object(object_name)
        prefix = obj.key_prefix
        for record_id, record in list(self._records.items()):
            if record_id.startswith(prefix) and (
                include_deleted or not record["IsDeleted"]
            ):
                yield MappingProxyType(record)

    def match_external_id(
        self, object_name: str, field_name: str, value: str
    ) -> list[str]:
        """Return the ids of live records whose external id field is ``value``."""
        obj = self.object(object_name)
        name = self.external_id_field(obj, field_name)
        if name == "Id":
            record = self.get(value) if ids.is_valid_id(value) else None
            if record is None or not record["Id"].startswith(obj.key_prefix):
                return []
            return [record["Id"]]
        field = obj.fields[name]
        matches = []
        for record in self.records(obj.name):
            stored = record.get(name)
            if stored is None:
                continue
            if field.type in ("string", "email", "phone", "url"):
                if str(stored).lower() == value.lower():
                    matches.append(record["Id"])
            elif str(stored) == value:
                matches.append(record["Id"])
        return matches

    def external_id_field(self, obj: ObjectSchema, field_name: str) -> str:
        """Return the API name of an idLookup field, or raise ``NOT_FOUND``."""
        for name, field in obj.fields.items():
            if name.lower() == field_name.lower() and (
                field.external_id or name == "Id"
            ):
                return name
        raise ApiError(
            404,
            "NOT_FOUND",
            "Provided external ID field does not exist or is not accessible: "
            f"{field_name}",
        )

    def find_user(self, username: str) -> Mapping[str, Any] | None:
        """Return the active user with this username (case-insensitive)."""
        if self.schema.get("User") is None:
            return None
        for record in self.records("User"):
            if str(record.get("Username", "")).lower() == username.lower():
                return record
        return None

    # -- writing ------------------------------------------------------------

    @contextmanager
    def transaction(
        self, *, origin: str | None = None, user_id: str
    ) -> Iterator[Transaction]:
        """Group writes into one commit; an exception rolls all of them back."""
        tx = Transaction(self, origin, user_id)
        try:
            yield tx
        except BaseException:
            tx._rollback()
            raise
        if tx.changes:
            self._persist(tx)
            self._notify(tx)

    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: ChangeListener) -> None:
        self._listeners.remove(listener)

    def add_automation(self, object_name: str, fn: Automation) -> Callable[[], None]:
        """Run ``fn`` on every API write of ``object_name``; return its remover."""
        obj = self.object(object_name)
        self._automations.setdefault(obj.name, []).append(fn)

        def remove() -> None:
            self._automations[obj.name].remove(fn)

        return remove

    def clear_automations(self) -> None:
        self._automations.clear()

    def close(self) -> None:
        self._db.close()

    # -- internals ----------------------------------------------------------

    def _load_org_id(self) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'org_id'").fetchone()
        if row is not None:
            return str(row[0])
        org_id = ids.make_id("00D", 1)
        self._db.execute("INSERT INTO meta VALUES ('org_id', ?)", (org_id,))
        return org_id

    def _next_commit_time(self) -> datetime:
        now = self._clock().astimezone(UTC)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)
        if now <= self._last_commit:
            now = self._last_commit + timedelta(milliseconds=1)
        self._last_commit = now
        return now

    def _existing(
        self, object_name: str | None, record_id: str
    ) -> tuple[ObjectSchema, dict[str, Any]]:
        try:
            normal = ids.normalize_id(record_id)
        except ValueError:
            raise ApiError(
                400, "MALFORMED_ID", f"malformed id {record_id}", fields=()
            ) from None
        obj = self.schema.by_prefix(normal[:3])
        if obj is None or (
            object_name is not None and self.object(object_name) is not obj
        ):
            raise ApiError(400, "MALFORMED_ID", f"malformed id {record_id}", fields=())
        record = self._records.get(normal)
        if record is None:
            raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")
        return obj, record

    def _live(
        self, object_name: str | None, record_id: str
    ) -> tuple[ObjectSchema, dict[str, Any]]:
        obj, record = self._existing(object_name, record_id)
        if record["IsDeleted"]:
            raise ApiError(404, "ENTITY_IS_DELETED", "entity is deleted", fields=())
        return obj, record

    def _defaults(self, obj: ObjectSchema, user_id: str, now: str) -> dict[str, Any]:
        record: dict[str, Any] = {}
        for name, field in obj.fields.items():
            if field.type == "address" or field.type == "location":
                continue
            value = field.default_value
            if field.type == "boolean" and value is None:
                value = False
            record[name] = value
        record.update(
            IsDeleted=False,
            CreatedDate=now,
            CreatedById=user_id,
            LastModifiedDate=now,
            LastModifiedById=user_id,
            SystemModstamp=now,
        )
        if "OwnerId" in obj.fields:
            record["OwnerId"] = user_id
        return {k: v for k, v in record.items() if k in obj.fields}

    def _check_values(
        self,
        obj: ObjectSchema,
        values: Mapping[str, Any],
        *,
        create: bool,
        system: bool,
    ) -> dict[str, Any]:
        clean: dict[str, Any] = {}
        not_writable: list[str] = []
        for name, value in values.items():
            field = obj.fields.get(name) or _by_lower(obj, name)
            if field is None:
                raise invalid_field(obj, name)
            writable = field.createable if create else field.updateable
            if not (writable or system) or (field.calculated and not system):
                not_writable.append(field.name)
                continue
            clean[field.name] = coerce_value(field, value, self._lookup)
        if not_writable:
            raise ApiError(
                400,
                "INVALID_FIELD_FOR_INSERT_UPDATE",
                f"Unable to create/update fields: {', '.join(not_writable)}. Please "
                "check the security settings of this field and verify that it is "
                "read/write for your profile or permission set.",
                fields=tuple(not_writable),
            )
        return clean

    def _lookup(self, record_id: str) -> tuple[str | None, bool]:
        obj = self.schema.by_prefix(record_id[:3])
        return (obj.name if obj else None), record_id in self._records

    def _fill_auto_numbers(self, obj: ObjectSchema, record: dict[str, Any]) -> None:
        for name, field in obj.fields.items():
            if field.auto_number_format is None or record.get(name) is not None:
                continue
            key = f"{obj.key_prefix}:{name}"
            number = self._ids.counters.get(key, 0) + 1
            self._ids.counters[key] = number
            record[name] = _format_auto_number(field.auto_number_format, number)

    def _derive(self, obj: ObjectSchema, record: dict[str, Any]) -> None:
        # Contact and Lead keep Name as the compound of its parts.
        parts = [f for f in obj.compound_components("Name") if f.name != "Name"]
        if parts and "Name" in obj.fields:
            first = record.get("FirstName")
            last = record.get("LastName")
            record["Name"] = " ".join(p for p in (first, last) if p) or None

    def _check_unique(
        self, obj: ObjectSchema, record: Mapping[str, Any], own_id: str | None
    ) -> None:
        for name, field in obj.fields.items():
            value = record.get(name)
            if not field.unique or value is None:
                continue
            for other in self.records(obj.name):
                other_value = other.get(name)
                if other["Id"] == own_id or other_value is None:
                    continue
                if str(other_value).lower() == str(value).lower():
                    raise ApiError(
                        400,
                        "DUPLICATE_VALUE",
                        f"duplicate value found: {name} duplicates value on record "
                        f"with id: {other['Id']}",
                        fields=(),
                    )

    def _persist(self, tx: Transaction) -> None:
        touched = {change.record_id for change in tx.changes}
        rows = [
            (rid, _object_of(self, rid), orjson.dumps(self._records[rid]))
            for rid in touched
        ]
        with _sqlite_tx(self._db):
            self._db.executemany(
                "INSERT OR REPLACE INTO records (id, object_name, data) "
                "VALUES (?, ?, ?)",
                rows,
            )
            self._db.executemany(
                "INSERT OR REPLACE INTO counters VALUES (?, ?)",
                list(self._ids.counters.items()),
            )

    def _notify(self, tx: Transaction) -> None:
        logger.debug(
            "transaction committed",
            extra={"changes": len(tx.changes), "origin": tx.origin},
        )
        for listener in list(self._listeners):
            try:
                listener.on_transaction(
                    list(tx.changes), origin=tx.origin, user_id=tx.user_id
                )
            except Exception:
                logger.exception("change listener failed")


@contextmanager
def _sqlite_tx(db: sqlite3.Connection) -> Iterator[None]:
    db.execute("BEGIN")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _object_of(state: OrgState, record_id: str) -> str:
    obj = state.schema.by_prefix(record_id[:3])
    return obj.name if obj is not None else ""


def _by_lower(obj: ObjectSchema, name: str) -> Any:
    lowered = name.lower()
    for key, field in obj.fields.items():
        if key.lower() == lowered:
            return field
    return None


def _format_auto_number(display_format: str, number: int) -> str:
    # "O-{00000}" -> "O-00042"; the braces hold the zero-padded width.
    start = display_format.find("{")
    end = display_format.find("}", start)
    if start < 0 or end < 0:
        return f"{display_format}{number}"
    width = end - start - 1
    return f"{display_format[:start]}{number:0{width}d}{display_format[end + 1 :]}"
