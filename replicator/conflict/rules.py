"""Field-level conflict resolution of a unified entity: pure, no I/O.

:func:`resolve` folds one source change into the unified state of one record.
Per field, not per row:

* **Owner wins.** A field's owner is ``FieldRule.owner``, else the entity's
  ``owner``. A change from another system to an owned field never reaches the
  unified row: it is a conflict with rule ``owner`` and, with ``enforce``, the
  owner's value is returned in ``Resolution.enforce`` to be written back to the
  system that changed it.
* **Last writer wins** otherwise: each field is a register holding the value
  of the greatest version (:func:`~replicator.conflict.versions.version_key`:
  bucketed commit time, source precedence, commit time, position). Any order,
  duplication or replay of the same changes leaves the same state.
* **Equality.** A value equal to the current one (:func:`values_equal`: JSON
  compared semantically, numbers by value) changes nothing and logs nothing.
  When such a change is newer, the register takes its version and its text
  (``'10.00'`` for ``'10.0'``) so that the state does not depend on arrival
  order, but nothing is reported as accepted, so nothing is written back.
  A change with the version already held is a duplicate and decides nothing.

Deletes are tombstones; the outcome of a delete racing an update depends only
on the set of changes, not on their order:

* ``propagate`` by the entity's ``existence_owner`` (or by any source when it
  has none): the record is **gone**. A delete beats every update, older or
  newer: the state keeps no field values, ``deleted`` holds the greatest such
  delete, every value held when the delete arrives and every update arriving
  later is a conflict with rule ``deleted``. The other system's record is
  deleted by the caller.
* ``mark``, and ``propagate`` by a system that does not own existence (P3: a
  Salesforce delete of an ERP customer): the record is **marked**. ``deleted``
  holds the greatest such delete (who, when); updates keep resolving as usual
  and no value is discarded; the other system's record is left alone (flagged
  for review). A gone-delete outranks every mark.
* ``ignore``: the delete changes nothing here (the mirror has it).

A version identifies one change: two changes with equal versions are assumed
to carry the same values. A deleted record cannot come back through an
update; an undelete is an operator's resync.

**The same conflict decisions.** Every discard is a :class:`Conflict`: an
arriving value older than the current one, a current value replaced by a
newer different one, a non-owner's value, a value removed by a delete. For a
set ``C`` of changes (plus the fields of the starting state), the decisions
are the set::

    D(C) = {(field, canonical(value)) : some change in C, or the start state,
            carries value for field, and value is not the final value of field}

where ``canonical`` is the form :func:`values_equal` compares, and a gone
record has no final values. In every arrival order, with any duplication or
replay, the discarded values of the returned conflicts, minus the final
values, are exactly ``D(C)``: every value that lost is logged at least once
and the log never names a value that no change carried. Versions and rules
cannot be part of an order-independent definition, because equality decides
whether a discard is a conflict at all: with ``a@1, a@2, b@3`` in version order
only ``a@2`` is discarded (``a@1`` was replaced by an equal value), while
``a@1, b@3, a@2`` discards both; and a non-owner's value equal to the owner's
current value is no conflict, but is one once the owner has moved on. A
replayed change that loses is logged again; the set is unchanged. The kept
value and the rule of any one row describe that arrival. Replacements are
logged because an order-independent log needs them (an older value arriving
late is a discard), so a source's own successive edits appear too (kept and
discarded source equal); a reader may hide those rows.
"""

from __future__ import annotations

import json as _json
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Literal

from replicator.conflict.versions import Version, VersionKey, version_key
from replicator.errors import ConfigError, InvariantError

__all__ = [
    "Change",
    "Conflict",
    "DeletePolicy",
    "EntityRule",
    "FieldRule",
    "FieldState",
    "Resolution",
    "UnifiedState",
    "canonical_value",
    "delete_effect",
    "is_gone",
    "resolve",
    "values_equal",
]

DeletePolicy = Literal["propagate", "mark", "ignore"]
_DELETE_POLICIES = ("propagate", "mark", "ignore")
_EMPTY: Mapping[str, Any] = MappingProxyType({})

# Numbers as text: no leading zeros (postal codes such as '03801' stay text),
# an optional fraction and exponent.
_NUMBER = re.compile(r"[+-]?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


@dataclass(frozen=True, slots=True)
class FieldRule:
    """How one unified field is resolved: its owner, enforcement, JSON-ness."""

    name: str
    owner: str | None = None
    enforce: bool = False
    json: bool = False


@dataclass(frozen=True, slots=True)
class EntityRule:
    """
    How the fields and deletes of one unified entity are resolved.

    ``existence_owner`` is the system that owns record existence; it defaults
    to ``owner``. Under ``propagate`` a delete from another system only marks
    the record (P3 of the field-failure cases).
    """

    name: str
    fields: Mapping[str, FieldRule]
    owner: str | None
    delete_policy: DeletePolicy
    sources: tuple[str, ...] = ("erp", "salesforce")
    precedence: tuple[str, ...] = ("erp", "salesforce")
    tie_window: timedelta = timedelta(seconds=1)
    existence_owner: str | None = None

    def __post_init__(self) -> None:
        if self.delete_policy not in _DELETE_POLICIES:
            raise ConfigError(
                f"entity {self.name!r}: delete policy {self.delete_policy!r} "
                f"is not one of {', '.join(_DELETE_POLICIES)}"
            )
        if self.tie_window <= timedelta(0):
            raise ConfigError(
                f"entity {self.name!r}: tie window {self.tie_window!r} must be positive"
            )
        owners = [("owner", self.owner), ("existence owner", self.existence_owner)]
        owners += [(f"owner of {f.name!r}", f.owner) for f in self.fields.values()]
        for what, owner in owners:
            if owner is not None and owner not in self.sources:
                raise ConfigError(
                    f"entity {self.name!r}: {what} {owner!r} is not one of its "
                    f"sources ({', '.join(self.sources)})"
                )

    def field_rule(self, name: str) -> FieldRule:
        """Return the rule of a field; an undeclared field is plain LWW."""
        return self.fields.get(name) or FieldRule(name)

    def owner_of(self, name: str) -> str | None:
        """Return the system that owns a field, if any."""
        return self.field_rule(name).owner or self.owner

    def key(self, version: Version) -> VersionKey:
        """Return the total-order key of a version under this entity's rule."""
        return version_key(version, self.tie_window, self.precedence)


@dataclass(frozen=True, slots=True)
class FieldState:
    """The unified value of a field and the version that set it."""

    value: Any
    version: Version


@dataclass(frozen=True, slots=True)
class UnifiedState:
    """The unified record: field registers and the delete tombstone, if any."""

    fields: Mapping[str, FieldState] = field(default_factory=dict)
    deleted: Version | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """One source's change to one record, in unified field names and values."""

    source: str
    op: Literal["upsert", "delete"]
    fields: Mapping[str, Any]
    version: Version


@dataclass(frozen=True, slots=True)
class Conflict:
    """A decision that discarded a value (one conflict-log row)."""

    field: str
    kept_value: Any
    kept_version: Version | None
    discarded_value: Any
    discarded_version: Version
    rule: Literal["owner", "lww", "deleted"]


@dataclass(frozen=True, slots=True)
class Resolution:
    """
    The outcome of one change.

    ``accepted`` holds the fields whose unified value changed (to be written
    to the systems that differ); ``enforce`` holds owner values to write back
    to the change's source, a non-owner that changed an enforced field.
    """

    state: UnifiedState
    accepted: Mapping[str, Any]
    conflicts: tuple[Conflict, ...]
    enforce: Mapping[str, Any]


def canonical_value(value: Any, *, json: bool) -> Hashable:
    """
    Return the form in which values are compared (see :func:`values_equal`).

    JSON text is parsed (numbers as decimals, objects without key order);
    text that is not JSON stays text. Other text that reads as a number
    (``'10.0'``) is its decimal value; numbers likewise; ``bool`` stays apart
    from ``1`` and ``0``.
    """
    if value is None:
        # SQL NULL, also for JSON fields: it is not the JSON text 'null'
        return ("v", None)
    if json and isinstance(value, str | bytes):
        try:
            parsed = _json.loads(value, parse_float=Decimal, parse_int=Decimal)
        except ValueError:
            return ("s", value)
        return _canonical_json(parsed)
    if json:
        return _canonical_json(value)
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return _canonical_number(Decimal(value))
    if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
        return _canonical_number(value)
    if isinstance(value, dict | list | tuple):
        return _canonical_json(value)
    try:
        hash(value)
    except TypeError:
        return ("r", repr(value))
    return ("v", value)


def values_equal(a: Any, b: Any, *, json: bool) -> bool:
    """
    Tell whether two field values are the same value.

    JSON fields compare semantically: ``'{"tier":"gold"}'`` equals
    ``'{"tier": "gold"}'`` (BUG-38: jsonb rewrites key order and spacing).
    Numbers compare by value: ``'10.0'`` equals ``'10.00'`` and ``10``.
    """
    return canonical_value(a, json=json) == canonical_value(b, json=json)


def is_gone(state: UnifiedState, rule: EntityRule) -> bool:
    """Tell whether a record is deleted for good (see the module docstring)."""
    return state.deleted is not None and _delete_kind(state.deleted, rule) == 2


def delete_effect(version: Version, rule: EntityRule) -> DeletePolicy:
    """Return what a delete with this version does to the other system."""
    return ("ignore", "mark", "propagate")[_delete_kind(version, rule)]


def resolve(state: UnifiedState | None, change: Change, rule: EntityRule) -> Resolution:
    """
    Fold one source change into the unified state of a record.

    Raises:
        InvariantError: the change comes from a system that is not a source
            of the entity.
    """
    if change.source not in rule.sources:
        raise InvariantError(
            f"entity {rule.name!r}: change from {change.source!r}, which is not "
            f"one of its sources ({', '.join(rule.sources)})"
        )
    if state is None:
        state = UnifiedState()
    if change.op == "delete":
        return _resolve_delete(state, change, rule)
    if is_gone(state, rule):
        return _reject_deleted(state, change)
    return _Folder(state, change, rule).run()


class _Folder:
    """The upsert of one change, field by field."""

    def __init__(self, state: UnifiedState, change: Change, rule: EntityRule):
        self.state = state
        self.change = change
        self.rule = rule
        self.fields = dict(state.fields)
        self.accepted: dict[str, Any] = {}
        self.conflicts: list[Conflict] = []
        self.enforce: dict[str, Any] = {}

    def run(self) -> Resolution:
        for name in sorted(self.change.fields):
            value = self.change.fields[name]
            owner = self.rule.owner_of(name)
            current = self.fields.get(name)
            if (
                owner is not None
                and owner != self.change.source
                and current is not None
                and current.version.source == owner
            ):
                self._reject_non_owner(name, value)
            else:
                self._last_writer_wins(name, value)
        return Resolution(
            state=UnifiedState(self.fields, self.state.deleted),
            accepted=self.accepted,
            conflicts=tuple(self.conflicts),
            enforce=self.enforce,
        )

    def _equal(self, name: str, a: Any, b: Any) -> bool:
        return values_equal(a, b, json=self.rule.field_rule(name).json)

    def _reject_non_owner(self, name: str, value: Any) -> None:
        current = self.fields.get(name)
        if current is not None and self._equal(name, current.value, value):
            return
        self.conflicts.append(
            Conflict(
                field=name,
                kept_value=current.value if current else None,
                kept_version=current.version if current else None,
                discarded_value=value,
                discarded_version=self.change.version,
                rule="owner",
            )
        )
        if current is not None and self.rule.field_rule(name).enforce:
            self.enforce[name] = current.value

    def _last_writer_wins(self, name: str, value: Any) -> None:
        version = self.change.version
        current = self.fields.get(name)
        if current is None:
            self.fields[name] = FieldState(value, version)
            self.accepted[name] = value
            return

        owner = self.rule.owner_of(name)
        new_key = (version.source == owner, self.rule.key(version))
        current_key = (current.version.source == owner, self.rule.key(current.version))
        if new_key == current_key:
            return
        same = self._equal(name, current.value, value)
        # The owner's value beats the other system's whatever the times.
        why: Literal["owner", "lww"] = (
            "owner" if new_key[0] != current_key[0] else "lww"
        )

        if new_key > current_key:
            # A newer equal value takes over version and text silently, so
            # that the state is the same whatever the arrival order.
            self.fields[name] = FieldState(value, version)
            if not same:
                self.accepted[name] = value
                self.conflicts.append(
                    Conflict(name, value, version, current.value, current.version, why)
                )
        elif not same:
            self.conflicts.append(
                Conflict(name, current.value, current.version, value, version, why)
            )


def _delete_kind(version: Version, rule: EntityRule) -> int:
    """Return 0 (ignored), 1 (marks the record) or 2 (the record is gone)."""
    if rule.delete_policy == "ignore":
        return 0
    if rule.delete_policy == "mark":
        return 1
    existence_owner = rule.existence_owner or rule.owner
    return 2 if existence_owner in (None, version.source) else 1


def _resolve_delete(
    state: UnifiedState, change: Change, rule: EntityRule
) -> Resolution:
    kind = _delete_kind(change.version, rule)
    unchanged = Resolution(state, _EMPTY, (), _EMPTY)
    if kind == 0:
        return unchanged

    # The tombstone is the greatest delete of the strongest kind seen.
    def rank(version: Version) -> tuple[int, VersionKey]:
        return (_delete_kind(version, rule), rule.key(version))

    if state.deleted is not None and rank(state.deleted) >= rank(change.version):
        return unchanged
    if kind == 1 or is_gone(state, rule):
        return Resolution(
            UnifiedState(state.fields, change.version), _EMPTY, (), _EMPTY
        )

    # The record goes: every value it held is discarded by the delete.
    conflicts = tuple(
        Conflict(name, None, change.version, held.value, held.version, "deleted")
        for name, held in sorted(state.fields.items())
    )
    return Resolution(UnifiedState({}, change.version), _EMPTY, conflicts, _EMPTY)


def _reject_deleted(state: UnifiedState, change: Change) -> Resolution:
    conflicts = tuple(
        Conflict(name, None, state.deleted, value, change.version, "deleted")
        for name, value in sorted(change.fields.items())
    )
    return Resolution(state, _EMPTY, conflicts, _EMPTY)


def _canonical_number(value: int | float | Decimal) -> Hashable:
    number = value if isinstance(value, Decimal) else Decimal(repr(value))
    if number.is_nan():
        return ("nan",)
    return ("n", number)


def _canonical_json(value: Any) -> Hashable:
    if value is None:
        return ("z",)
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int | float | Decimal):
        return _canonical_number(value)
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, Mapping):
        return ("o", frozenset((str(k), _canonical_json(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return ("a", tuple(_canonical_json(v) for v in value))
    return ("v", repr(value))
