"""The typed syntax tree of a SOQL query and the error every SOQL step raises.

``soql`` builds these frozen dataclasses from text and ``soql_eval`` runs them;
``error_at`` renders Salesforce's caret diagram for an error at a position.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import TypeAlias

__all__ = [
    "And",
    "BooleanValue",
    "Comparison",
    "Condition",
    "DateLiteral",
    "DateTimeValue",
    "DateValue",
    "FieldRef",
    "FieldsMacro",
    "InList",
    "Includes",
    "Like",
    "Not",
    "NullValue",
    "NumberValue",
    "Or",
    "OrderItem",
    "Query",
    "SelectItem",
    "SoqlError",
    "StringValue",
    "Value",
    "decode_string",
    "error_at",
    "parse_datetime_literal",
]


class SoqlError(Exception):
    """A query Salesforce would refuse: ``code`` and ``message`` as in the REST body."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# -- AST -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldRef:
    """A field as written: ``Name`` or a dotted path such as ``Account.Name``."""

    path: tuple[str, ...]
    line: int
    column: int

    @property
    def text(self) -> str:
        return ".".join(self.path)


@dataclass(frozen=True, slots=True)
class FieldsMacro:
    """``FIELDS(ALL)``, ``FIELDS(STANDARD)`` or ``FIELDS(CUSTOM)``."""

    kind: str  # upper case
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class StringValue:
    value: str  # escapes decoded; ``\\%`` and ``\\_`` kept as ``%`` and ``_``
    raw: str  # between the quotes, escapes as written (LIKE needs them)


@dataclass(frozen=True, slots=True)
class NumberValue:
    value: Decimal


@dataclass(frozen=True, slots=True)
class BooleanValue:
    value: bool


@dataclass(frozen=True, slots=True)
class NullValue:
    pass


@dataclass(frozen=True, slots=True)
class DateValue:
    value: date


@dataclass(frozen=True, slots=True)
class DateTimeValue:
    value: datetime  # aware, UTC


@dataclass(frozen=True, slots=True)
class DateLiteral:
    """A relative date range such as ``TODAY`` or ``LAST_N_DAYS:7``."""

    name: str  # upper case, without the ``:n``
    n: int | None = None


Value: TypeAlias = (
    StringValue
    | NumberValue
    | BooleanValue
    | NullValue
    | DateValue
    | DateTimeValue
    | DateLiteral
)


@dataclass(frozen=True, slots=True)
class Comparison:
    field: FieldRef
    op: str  # one of = != < <= > >= (``<>`` is read as ``!=``)
    value: Value


@dataclass(frozen=True, slots=True)
class InList:
    field: FieldRef
    values: tuple[Value, ...]
    negated: bool


@dataclass(frozen=True, slots=True)
class Like:
    field: FieldRef
    pattern: StringValue


@dataclass(frozen=True, slots=True)
class Includes:
    """``INCLUDES`` / ``EXCLUDES`` on a multi-select picklist."""

    field: FieldRef
    values: tuple[Value, ...]
    negated: bool


@dataclass(frozen=True, slots=True)
class And:
    operands: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Or:
    operands: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Not:
    operand: Condition


Condition: TypeAlias = Comparison | InList | Like | Includes | And | Or | Not
SelectItem: TypeAlias = FieldRef | FieldsMacro


@dataclass(frozen=True, slots=True)
class OrderItem:
    field: FieldRef
    descending: bool = False
    nulls_last: bool = False


@dataclass(frozen=True, slots=True)
class Query:
    """One parsed ``SELECT``; ``count`` is true for ``SELECT COUNT()``."""

    text: str
    object_name: str
    object_line: int
    object_column: int
    select: tuple[SelectItem, ...]
    count: bool = False
    alias: str | None = None
    where: Condition | None = None
    order_by: tuple[OrderItem, ...] = ()
    limit: int | None = None
    offset: int | None = None


def error_at(text: str, line: int, column: int, code: str, message: str) -> SoqlError:
    """Build an error with Salesforce's caret diagram pointing at line:column."""
    lines = text.splitlines() or [""]
    shown = lines[line - 1] if 0 < line <= len(lines) else lines[-1]
    caret = " " * (column - 1) + "^"
    return SoqlError(
        code, f"\n{shown}\n{caret}\nERROR at Row:{line}:Column:{column}\n{message}"
    )


def parse_datetime_literal(text: str) -> datetime:
    text = text.upper()
    if text.endswith("Z"):
        text = text[:-1] + "+00:00"
    elif re.search(r"[+-]\d{4}$", text):
        text = text[:-2] + ":" + text[-2:]
    return datetime.fromisoformat(text).astimezone(UTC)


_ESCAPES = {
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "b": "\b",
    "f": "\f",
    '"': '"',
    "'": "'",
    "\\": "\\",
    "_": "_",
    "%": "%",
}


def decode_string(raw: str) -> str | None:
    """Decode SOQL string escapes; None when an escape is not SOQL's."""
    out: list[str] = []
    chars = iter(raw)
    for char in chars:
        if char != "\\":
            out.append(char)
            continue
        escaped = next(chars, "")
        if escaped == "u":
            digits = "".join(next(chars, "") for _ in range(4))
            if not re.fullmatch(r"[0-9A-Fa-f]{4}", digits):
                return None
            out.append(chr(int(digits, 16)))
            continue
        decoded = _ESCAPES.get(escaped.lower() if escaped in "NRTBF" else escaped)
        if decoded is None:
            return None
        out.append(decoded)
    return "".join(out)
