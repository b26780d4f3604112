"""SOQL for the emulated org: parse text into the typed AST of ``soql_ast``.

``parse`` reads one statement with the LALR grammar in ``soql.lark`` and
raises ``SoqlError`` with Salesforce's code and message (caret diagram
included, reference §5.5). ``execute`` (from ``soql_eval``) runs a parsed query
over record mappings. Both are pure: the HTTP side lives in ``query.py``.
"""

from __future__ import annotations

import functools
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import lark

from replicator.emulator.soql_ast import (
    And,
    BooleanValue,
    Comparison,
    Condition,
    DateLiteral,
    DateTimeValue,
    DateValue,
    FieldRef,
    FieldsMacro,
    Includes,
    InList,
    Like,
    Not,
    NullValue,
    NumberValue,
    Or,
    OrderItem,
    Query,
    SelectItem,
    SoqlError,
    StringValue,
    Value,
    decode_string,
    error_at,
    parse_datetime_literal,
)
from replicator.emulator.soql_eval import (
    execute,
    format_datetime,
    resolve_object,
    validate,
)

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
    "execute",
    "format_datetime",
    "parse",
    "resolve_object",
    "validate",
]

MAX_OFFSET = 2000


# -- parsing -------------------------------------------------------------------


@functools.cache
def _parser() -> lark.Lark:
    grammar = Path(__file__).with_name("soql.lark").read_text(encoding="utf-8")
    return lark.Lark(grammar, parser="lalr", lexer="contextual")


@lark.v_args(inline=True)
class _Builder(lark.Transformer[lark.Token, Any]):
    """Turn the lark tree into AST dataclasses."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self._text = text

    def start(self, select: Any, obj: lark.Token, *clauses: Any) -> Query:
        parts: dict[str, Any] = {}
        for clause in clauses:
            parts.update(clause)
        if select == "COUNT":
            items: tuple[SelectItem, ...] = ()
        else:
            items = tuple(select)
        return Query(
            text=self._text,
            object_name=str(obj),
            object_line=obj.line or 1,
            object_column=obj.column or 1,
            select=items,
            count=select == "COUNT",
            **parts,
        )

    def count_star(self) -> str:
        return "COUNT"

    def select_list(self, *items: SelectItem) -> list[SelectItem]:
        return list(items)

    def fields_macro(self, kind: lark.Token) -> FieldsMacro:
        return FieldsMacro(str(kind).upper(), kind.line or 1, kind.column or 1)

    def alias(self, name: lark.Token) -> dict[str, Any]:
        return {"alias": str(name)}

    def field_path(self, *names: lark.Token) -> FieldRef:
        first = names[0]
        return FieldRef(
            tuple(str(n) for n in names), first.line or 1, first.column or 1
        )

    def where(self, condition: Condition) -> dict[str, Any]:
        return {"where": condition}

    def and_(self, *operands: Condition) -> And:
        return And(operands)

    def or_(self, *operands: Condition) -> Or:
        return Or(operands)

    def not_(self, operand: Condition) -> Not:
        return Not(operand)

    def comparison(self, field: FieldRef, op: lark.Token, value: Value) -> Comparison:
        return Comparison(field, "!=" if op == "<>" else str(op), value)

    def in_(self, field: FieldRef, values: tuple[Value, ...]) -> InList:
        return InList(field, values, negated=False)

    def not_in(self, field: FieldRef, values: tuple[Value, ...]) -> InList:
        return InList(field, values, negated=True)

    def like(self, field: FieldRef, value: Value) -> Like:
        if not isinstance(value, StringValue):
            raise error_at(
                self._text,
                field.line,
                field.column,
                "MALFORMED_QUERY",
                "LIKE needs a string literal",
            )
        return Like(field, value)

    def includes(self, field: FieldRef, values: tuple[Value, ...]) -> Includes:
        return Includes(field, values, negated=False)

    def excludes(self, field: FieldRef, values: tuple[Value, ...]) -> Includes:
        return Includes(field, values, negated=True)

    def value_list(self, *values: Value) -> tuple[Value, ...]:
        return values

    def string(self, token: lark.Token) -> StringValue:
        raw = str(token)[1:-1]
        decoded = decode_string(raw)
        if decoded is None:
            raise error_at(
                self._text,
                token.line or 1,
                token.column or 1,
                "MALFORMED_QUERY",
                f"Invalid string literal '{raw}'. "
                "Illegal character sequence '\\' in string literal.",
            )
        return StringValue(decoded, raw)

    def number(self, token: lark.Token) -> NumberValue:
        return NumberValue(Decimal(str(token)))

    def datetime(self, token: lark.Token) -> DateTimeValue:
        try:
            return DateTimeValue(parse_datetime_literal(str(token)))
        except ValueError:
            raise error_at(
                self._text,
                token.line or 1,
                token.column or 1,
                "MALFORMED_QUERY",
                f"value of datetime literal {token} is not valid",
            ) from None

    def date(self, token: lark.Token) -> DateValue:
        try:
            return DateValue(date.fromisoformat(str(token)))
        except ValueError:
            raise error_at(
                self._text,
                token.line or 1,
                token.column or 1,
                "MALFORMED_QUERY",
                f"value of date literal {token} is not valid",
            ) from None

    def date_literal(self, token: lark.Token) -> DateLiteral:
        return DateLiteral(str(token).upper())

    def date_n_literal(self, token: lark.Token) -> DateLiteral:
        name, _, n = str(token).partition(":")
        return DateLiteral(name.upper(), int(n))

    def null(self) -> NullValue:
        return NullValue()

    def true(self, _token: lark.Token) -> BooleanValue:
        return BooleanValue(True)

    def false(self, _token: lark.Token) -> BooleanValue:
        return BooleanValue(False)

    def order_by(self, *items: OrderItem) -> dict[str, Any]:
        return {"order_by": items}

    def order_item(self, field: FieldRef, *modifiers: lark.Token) -> OrderItem:
        words = {str(m).upper() for m in modifiers}
        return OrderItem(field, descending="DESC" in words, nulls_last="LAST" in words)

    def limit(self, token: lark.Token) -> dict[str, Any]:
        return {"limit": int(token)}

    def offset(self, token: lark.Token) -> dict[str, Any]:
        offset = int(token)
        if offset > MAX_OFFSET:
            raise SoqlError(
                "NUMBER_OUTSIDE_VALID_RANGE",
                f"Maximum SOQL offset allowed is {MAX_OFFSET}",
            )
        return {"offset": offset}


def _token_text(token: lark.Token) -> str:
    return "<EOF>" if token.type == "$END" else str(token)


def parse(text: str) -> Query:
    """Parse one SOQL statement.

    Raises:
        SoqlError: ``MALFORMED_QUERY`` for text that is not a SOQL statement
            this emulator understands.
    """
    if not text or not text.strip():
        raise SoqlError("MALFORMED_QUERY", "SOQL statements cannot be empty or null")
    try:
        tree = _parser().parse(text)
    except lark.UnexpectedToken as exc:
        token = exc.token
        line = token.line if token.type != "$END" else exc.line
        column = token.column if token.type != "$END" else exc.column
        if token.type == "$END" or line is None or line < 1:
            line, column = _end_position(text)
        raise error_at(
            text,
            line,
            column or 1,
            "MALFORMED_QUERY",
            f"unexpected token: {_token_text(token)}",
        ) from None
    except lark.UnexpectedCharacters as exc:
        raise SoqlError(
            "MALFORMED_QUERY",
            f"line {exc.line}:{exc.column - 1} no viable alternative at character "
            f"'{exc.char}'",
        ) from None
    except lark.UnexpectedEOF:
        line, column = _end_position(text)
        raise error_at(
            text, line, column, "MALFORMED_QUERY", "unexpected token: <EOF>"
        ) from None
    try:
        query: Query = _Builder(text).transform(tree)
    except lark.exceptions.VisitError as exc:
        if isinstance(exc.orig_exc, SoqlError):
            raise exc.orig_exc from None
        raise
    return query


def _end_position(text: str) -> tuple[int, int]:
    lines = text.rstrip().splitlines() or [""]
    return len(lines), len(lines[-1]) + 1
