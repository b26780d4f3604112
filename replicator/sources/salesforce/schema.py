"""Salesforce describe -> mirror table shape (pure).

One naming rule for every object and field: the API name in snake case
(``BillingCity`` -> ``billing_city``, ``ERP_Customer_Id__c`` ->
``erp_customer_id__c``, ``PricebookEntry`` -> ``pricebook_entry``), so BI users
recognise it and never need quotes. Types follow describe: numbers keep their
precision and scale, datetimes become timestamptz, ids varchar(18).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from replicator.sources.erp.catalog import ColumnInfo

_SPLIT_LOWER_UPPER = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SPLIT_ACRONYM = re.compile(r"(?<=[A-Z])(?=[A-Z][a-z])")
_TEXT_TYPES = frozenset(
    {
        "string",
        "textarea",
        "picklist",
        "multipicklist",
        "combobox",
        "email",
        "phone",
        "url",
        "encryptedstring",
        "anyType",
        "base64",
        "complexvalue",
    }
)
_COMPOUND_TYPES = frozenset({"address", "location"})
_STRINGS = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")
_NUMBERS = re.compile(r"\b\d+\.\d+\b")
_IDENTIFIER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(\()?")
_LITERALS = frozenset({"TRUE", "FALSE", "NULL", "AND", "OR", "NOT"})
_VOLATILE = frozenset({"NOW", "TODAY", "TIMENOW", "TIMEVALUE", "RAND"})


def snake(name: str) -> str:
    """Return ``name`` in snake case (the mirror's name for an API name)."""
    return _SPLIT_ACRONYM.sub("_", _SPLIT_LOWER_UPPER.sub("_", name)).lower()


def pg_type(field: Mapping[str, Any]) -> str | None:
    """The replica type for one describe field, or None for compound fields."""
    kind = str(field.get("type", "string"))
    if kind in _COMPOUND_TYPES:
        return None
    if kind in ("id", "reference"):
        return "varchar(18)"
    if kind == "boolean":
        return "boolean"
    if kind == "int":
        return "bigint"
    if kind in ("double", "currency", "percent"):
        precision, scale = (
            int(field.get("precision") or 0),
            int(field.get("scale") or 0),
        )
        return f"numeric({precision},{scale})" if precision else "numeric"
    if kind == "date":
        return "date"
    if kind == "datetime":
        return "timestamptz"
    if kind == "time":
        return "time"
    return "text"


@dataclass(frozen=True, slots=True)
class MirrorField:
    api_name: str
    column: str
    type: str
    calculated: bool
    updateable: bool


@dataclass(frozen=True, slots=True)
class ObjectShape:
    """How one object is mirrored: its table and its fields in column order."""

    object_name: str
    table: str
    fields: tuple[MirrorField, ...]

    @property
    def by_api(self) -> dict[str, MirrorField]:
        return {f.api_name: f for f in self.fields}

    # Fields whose change can move a derived value; None when any change can.
    refresh_inputs: frozenset[str] | None = frozenset()

    @property
    def calculated(self) -> list[MirrorField]:
        return [f for f in self.fields if f.calculated]

    def needs_refresh(self, change_type: str, changed: Iterable[str]) -> bool:
        """Whether a change of ``changed`` fields can alter a derived value."""
        inputs = self.refresh_inputs
        if inputs is None or change_type in ("CREATE", "UNDELETE"):
            return inputs is None or bool(self.calculated)
        return not inputs.isdisjoint(changed)

    def columns(self) -> list[ColumnInfo]:
        return [ColumnInfo(f.column, f.type) for f in self.fields]


def shape_of(describe: Mapping[str, Any]) -> ObjectShape:
    """Build the mirror shape of an object from its describe result."""
    fields: list[MirrorField] = []
    used: set[str] = set()
    # A compound parent that is a value of its own (Contact.Name) never comes in
    # events, only its components do: refresh it like a formula.
    parents = {f.get("compoundFieldName") for f in describe["fields"]} - {None}
    for f in describe["fields"]:
        kind = pg_type(f)
        if kind is None:
            continue
        name = str(f["name"])
        column = snake(name)
        if column in used:  # two API names with one snake form: keep them apart
            column = name.lower()
        used.add(column)
        derived = bool(f.get("calculated")) or name in parents
        fields.append(
            MirrorField(name, column, kind, derived, bool(f.get("updateable")))
        )
    inputs = _refresh_inputs(describe["fields"], parents)
    table = snake(str(describe["name"]))
    return ObjectShape(str(describe["name"]), table, tuple(fields), inputs)


def _refresh_inputs(
    fields: list[Mapping[str, Any]], parents: set[Any]
) -> frozenset[str] | None:
    """The fields derived values read, or None when that is not known for sure.

    A compound parent reads its components. A formula reads the identifiers of
    its ``calculatedFormula``; one that reaches another object (``Account.Name``),
    a global (``$User``), the clock or anything not a field of this object is
    unknown, and is then refreshed after every change as before.
    """
    # Formula field names are case-insensitive; a formula over a formula is
    # not followed.
    plain = {
        str(f["name"]).lower(): str(f["name"])
        for f in fields
        if not f.get("calculated")
    }
    inputs: set[str] = set()
    for f in fields:
        name = str(f["name"])
        if pg_type(f) is None:
            continue
        if name in parents:
            inputs.update(
                str(c["name"]) for c in fields if c.get("compoundFieldName") == name
            )
        elif f.get("calculated"):
            formula = _STRINGS.sub("", str(f.get("calculatedFormula") or ""))
            if not formula or "$" in formula or "." in _NUMBERS.sub("", formula):
                return None
            for token, call in _IDENTIFIER.findall(formula):
                if call:
                    if token.upper() in _VOLATILE:
                        return None
                elif token.upper() not in _LITERALS:
                    if token.lower() not in plain:
                        return None
                    inputs.add(plain[token.lower()])
    return frozenset(inputs)


def to_text(value: Any) -> str | None:
    """Render a JSON value as text the replica casts into the column type."""
    if value is None:
        return None
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list)):
        import orjson

        return orjson.dumps(value).decode()
    return str(value)
