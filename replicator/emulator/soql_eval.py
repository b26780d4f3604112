"""Run a parsed SOQL query over an org's records, the way Salesforce answers it.

``execute`` validates the query against an ``OrgSchema`` (``INVALID_TYPE``,
``INVALID_FIELD``, literal types) and evaluates it over flat record mappings
whose values may be Python values or their REST wire strings, returning
REST-shaped record dicts. Semantics follow the SOQL reference: text compares
case-insensitively; ``= null`` and ``!= null`` test for null while ``!=`` and
``NOT IN`` also match nulls; nulls sort first unless ``NULLS LAST``; ids match
in 15- or 18-character form; date literals such as ``TODAY`` are UTC ranges.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, TypeAlias

from replicator.emulator.schema import FieldSchema, ObjectSchema, OrgSchema
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
    SoqlError,
    StringValue,
    Value,
    decode_string,
    error_at,
    parse_datetime_literal,
)

__all__ = ["execute", "format_datetime", "resolve_object", "validate"]

FIELDS_MACRO_MAX_LIMIT = 200


# -- record values -------------------------------------------------------------

_TEXT_TYPES = frozenset(
    {
        "string",
        "textarea",
        "picklist",
        "email",
        "phone",
        "url",
        "combobox",
        "encryptedstring",
        "time",
        "base64",
    }
)
_ID_TYPES = frozenset({"id", "reference"})
_NUMBER_TYPES = frozenset({"double", "currency", "int", "percent", "long"})
_COMPOUND_TYPES = frozenset({"address", "location"})
_CHECKSUM_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"


def _kind(field: FieldSchema) -> str:
    """Group a describe type into the comparison family it belongs to."""
    if field.type in _TEXT_TYPES:
        return "text"
    if field.type in _ID_TYPES:
        return "id"
    if field.type in _NUMBER_TYPES:
        return "number"
    return field.type  # boolean, date, datetime, multipicklist, address, ...


def _id15(value: str) -> str | None:
    """Return the case-exact 15-character id, restoring case from an 18's suffix."""
    if not re.fullmatch(r"[0-9A-Za-z]{15}([0-9A-Za-z]{3})?", value):
        return None
    if len(value) == 15:
        return value
    chars = list(value[:15])
    for chunk, suffix_char in enumerate(value[15:].upper()):
        bits = _CHECKSUM_ALPHABET.index(suffix_char)
        for offset in range(5):
            index = chunk * 5 + offset
            upper = bool(bits & (1 << offset))
            chars[index] = chars[index].upper() if upper else chars[index].lower()
    return "".join(chars)


def _to_datetime(value: object) -> datetime:
    """Read a stored datetime: an aware ``datetime`` or any REST/CDC wire form."""
    if isinstance(value, datetime):
        aware = value if value.tzinfo else value.replace(tzinfo=UTC)
        return aware.astimezone(UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    return parse_datetime_literal(str(value))


def _to_date(value: object) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(str(value)[:10])


def _normalize(value: object, kind: str) -> Any:
    """Map a stored value into the domain its field compares in (None for null)."""
    if value is None or (value == "" and kind in ("text", "id", "multipicklist")):
        return None
    if kind == "text":
        return str(value).casefold()
    if kind == "id":
        return _id15(str(value)) or str(value)
    if kind == "number":
        try:
            return Decimal(str(value))
        except InvalidOperation:
            return None
    if kind == "boolean":
        return value if isinstance(value, bool) else str(value).lower() == "true"
    if kind == "date":
        return _to_date(value)
    if kind == "datetime":
        return _to_datetime(value)
    if kind == "multipicklist":
        return frozenset(p.strip().casefold() for p in str(value).split(";") if p)
    return value


def format_datetime(value: datetime) -> str:
    """Render a datetime as REST does: ``2013-05-20T20:49:32.000+0000``."""
    utc = value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}+0000"


def _wire(value: object, field: FieldSchema) -> Any:
    """Render a stored value the way a REST query response carries it."""
    if value is None:
        return None
    if isinstance(value, datetime) and field.type == "datetime":
        return format_datetime(value)
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return int(value) if field.type == "int" else float(value)
    return value


# -- date literals -------------------------------------------------------------


def _add_months(day: date, months: int) -> date:
    index = day.year * 12 + day.month - 1 + months
    return date(index // 12, index % 12 + 1, 1)


def _date_range(literal: DateLiteral, today: date) -> tuple[date, date]:
    """Return ``[start, end)`` of a relative date literal (weeks start on Sunday)."""
    n = literal.n or 0
    week = today - timedelta(days=(today.weekday() + 1) % 7)
    month = today.replace(day=1)
    quarter = date(today.year, (today.month - 1) // 3 * 3 + 1, 1)
    year = date(today.year, 1, 1)
    day = timedelta(days=1)
    ranges: dict[str, Callable[[], tuple[date, date]]] = {
        "YESTERDAY": lambda: (today - day, today),
        "TODAY": lambda: (today, today + day),
        "TOMORROW": lambda: (today + day, today + 2 * day),
        "LAST_WEEK": lambda: (week - 7 * day, week),
        "THIS_WEEK": lambda: (week, week + 7 * day),
        "NEXT_WEEK": lambda: (week + 7 * day, week + 14 * day),
        "LAST_MONTH": lambda: (_add_months(month, -1), month),
        "THIS_MONTH": lambda: (month, _add_months(month, 1)),
        "NEXT_MONTH": lambda: (_add_months(month, 1), _add_months(month, 2)),
        "LAST_QUARTER": lambda: (_add_months(quarter, -3), quarter),
        "THIS_QUARTER": lambda: (quarter, _add_months(quarter, 3)),
        "NEXT_QUARTER": lambda: (_add_months(quarter, 3), _add_months(quarter, 6)),
        "LAST_YEAR": lambda: (_add_months(year, -12), year),
        "THIS_YEAR": lambda: (year, _add_months(year, 12)),
        "NEXT_YEAR": lambda: (_add_months(year, 12), _add_months(year, 24)),
        "LAST_90_DAYS": lambda: (today - 90 * day, today + day),
        "NEXT_90_DAYS": lambda: (today + day, today + 91 * day),
        # LAST_N_DAYS:n runs from n days ago through the end of today
        "LAST_N_DAYS": lambda: (today - n * day, today + day),
        "NEXT_N_DAYS": lambda: (today + day, today + (n + 1) * day),
        "N_DAYS_AGO": lambda: (today - n * day, today - (n - 1) * day),
        "LAST_N_WEEKS": lambda: (week - 7 * n * day, week),
        "NEXT_N_WEEKS": lambda: (week + 7 * day, week + 7 * (n + 1) * day),
        "LAST_N_MONTHS": lambda: (_add_months(month, -n), month),
        "NEXT_N_MONTHS": lambda: (_add_months(month, 1), _add_months(month, n + 1)),
        "LAST_N_YEARS": lambda: (_add_months(year, -12 * n), year),
        "NEXT_N_YEARS": lambda: (
            _add_months(year, 12),
            _add_months(year, 12 * (n + 1)),
        ),
    }
    return ranges[literal.name]()


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


# -- validation against the schema ---------------------------------------------

_NO_SUCH_COLUMN = (
    "No such column '{field}' on entity '{entity}'. If you are attempting to use a "
    "custom field, be sure to append the '__c' after the custom field name. Please "
    "reference your WSDL or the describe call for the appropriate names."
)
_NO_SUCH_RELATIONSHIP = (
    "Didn't understand relationship '{name}' in field path. If you are attempting "
    "to use a custom relationship, be sure to append the '__r' after the custom "
    "relationship name. Please reference your WSDL or the describe call for the "
    "appropriate names."
)
_NOT_SUPPORTED = (
    "sObject type '{name}' is not supported. If you are attempting to use a custom "
    "object, be sure to append the '__c' after the entity name. Please reference "
    "your WSDL or the describe call for the appropriate names."
)
_LITERAL_TYPE_NAMES = {
    "int": "integer",
    "long": "long",
    "boolean": "boolean",
    "date": "date",
    "datetime": "dateTime",
    "id": "id",
    "reference": "id",
}


def resolve_object(query: Query, schema: OrgSchema) -> ObjectSchema:
    """Return the queried object, or raise ``INVALID_TYPE`` as Salesforce does."""
    obj = schema.get(query.object_name)
    if obj is None:
        raise error_at(
            query.text,
            query.object_line,
            query.object_column,
            "INVALID_TYPE",
            _NOT_SUPPORTED.format(name=query.object_name),
        )
    return obj


@dataclass(frozen=True, slots=True)
class _Context:
    query: Query
    obj: ObjectSchema
    fields: Mapping[str, FieldSchema]  # lower-case API name -> field
    today: date

    def error(self, ref: FieldRef, code: str, message: str) -> SoqlError:
        return error_at(self.query.text, ref.line, ref.column, code, message)

    def field(self, ref: FieldRef) -> FieldSchema:
        """Resolve a written field, allowing the object name or alias as prefix."""
        path = ref.path
        prefixes = {self.obj.name.lower()}
        if self.query.alias:
            prefixes.add(self.query.alias.lower())
        if len(path) > 1 and path[0].lower() in prefixes:
            path = path[1:]
        if len(path) > 1:
            # TODO(soql-relationships): parent paths such as Account.Name are not
            # evaluated; they fail as unknown relationships instead.
            raise self.error(
                ref, "INVALID_FIELD", _NO_SUCH_RELATIONSHIP.format(name=path[0])
            )
        found = self.fields.get(path[0].lower())
        if found is None:
            raise self.error(
                ref,
                "INVALID_FIELD",
                _NO_SUCH_COLUMN.format(field=path[0], entity=self.obj.name),
            )
        return found

    def filter_field(self, ref: FieldRef) -> FieldSchema:
        field = self.field(ref)
        if field.type in _COMPOUND_TYPES:
            raise self.error(
                ref,
                "INVALID_FIELD",
                f"field '{field.name}' can not be filtered in a query call",
            )
        return field


def _literal_error(ctx: _Context, ref: FieldRef, field: FieldSchema) -> SoqlError:
    kind = _kind(field)
    quoted = kind in ("text", "id", "multipicklist")
    type_name = _LITERAL_TYPE_NAMES.get(field.type, "string" if quoted else "double")
    how = (
        "should be enclosed in quotes" if quoted else "should not be enclosed in quotes"
    )
    return ctx.error(
        ref,
        "INVALID_FIELD",
        f"value of filter criterion for field '{field.name}' must be of "
        f"type {type_name} and {how}",
    )


def _literal(ctx: _Context, ref: FieldRef, field: FieldSchema, value: Value) -> Any:
    """Check a literal against its field's type and normalize it like stored values."""
    kind = _kind(field)
    if isinstance(value, NullValue):
        return None
    if kind in ("text", "multipicklist") and isinstance(value, StringValue):
        return _normalize(value.value, kind)
    if kind == "id" and isinstance(value, StringValue):
        if value.value == "":
            return None
        id15 = _id15(value.value)
        if id15 is None:
            raise ctx.error(
                ref, "INVALID_QUERY_FILTER_OPERATOR", f"invalid ID field: {value.value}"
            )
        return id15
    accepted: dict[str, type] = {
        "number": NumberValue,
        "boolean": BooleanValue,
        "date": DateValue,
        "datetime": DateTimeValue,
    }
    if kind in accepted and isinstance(value, accepted[kind]):
        return value.value  # type: ignore[union-attr]
    raise _literal_error(ctx, ref, field)


# -- predicates ----------------------------------------------------------------

Record: TypeAlias = Mapping[str, Any]
Predicate: TypeAlias = Callable[[Record], bool]

_ORDERED_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _getter(field: FieldSchema) -> Callable[[Record], Any]:
    kind = _kind(field)
    name = field.name
    return lambda record: _normalize(record.get(name), kind)


def _compile(cond: Condition, ctx: _Context) -> Predicate:
    if isinstance(cond, And):
        ands = [_compile(c, ctx) for c in cond.operands]
        return lambda r: all(p(r) for p in ands)
    if isinstance(cond, Or):
        ors = [_compile(c, ctx) for c in cond.operands]
        return lambda r: any(p(r) for p in ors)
    if isinstance(cond, Not):
        inner = _compile(cond.operand, ctx)
        return lambda r: not inner(r)
    if isinstance(cond, Comparison):
        return _compile_comparison(cond, ctx)
    if isinstance(cond, InList):
        return _compile_in(cond, ctx)
    if isinstance(cond, Like):
        return _compile_like(cond, ctx)
    return _compile_includes(cond, ctx)


def _compile_comparison(cond: Comparison, ctx: _Context) -> Predicate:
    field = ctx.filter_field(cond.field)
    get = _getter(field)
    if isinstance(cond.value, DateLiteral):
        return _compile_date_range(cond, field, ctx)
    literal = _literal(ctx, cond.field, field, cond.value)
    if cond.op == "=":
        return lambda r: get(r) == literal
    if cond.op == "!=":
        return lambda r: get(r) != literal
    if literal is None:
        return lambda r: False
    compare = _ORDERED_OPS[cond.op]

    def ordered(record: Record) -> bool:
        value = get(record)
        return value is not None and compare(value, literal)

    return ordered


def _compile_date_range(
    cond: Comparison, field: FieldSchema, ctx: _Context
) -> Predicate:
    assert isinstance(cond.value, DateLiteral)
    kind = _kind(field)
    if kind not in ("date", "datetime"):
        raise _literal_error(ctx, cond.field, field)
    first, after = _date_range(cond.value, ctx.today)
    start: Any = first if kind == "date" else _midnight(first)
    end: Any = after if kind == "date" else _midnight(after)
    get = _getter(field)
    tests: dict[str, Callable[[Any], bool]] = {
        "=": lambda v: start <= v < end,
        "!=": lambda v: not start <= v < end,
        "<": lambda v: v < start,
        "<=": lambda v: v < end,
        ">": lambda v: v >= end,
        ">=": lambda v: v >= start,
    }
    test = tests[cond.op]

    def in_range(record: Record) -> bool:
        value = get(record)
        if value is None:
            return cond.op == "!="
        return test(value)

    return in_range


def _compile_in(cond: InList, ctx: _Context) -> Predicate:
    field = ctx.filter_field(cond.field)
    get = _getter(field)
    literals = {_literal(ctx, cond.field, field, v) for v in cond.values}
    if cond.negated:
        return lambda r: get(r) not in literals
    return lambda r: get(r) in literals


def _like_regex(raw: str) -> re.Pattern[str]:
    """Translate a LIKE pattern (``%``, ``_``, ``\\%``, ``\\_``) to a regex."""
    parts: list[str] = []
    index = 0
    while index < len(raw):
        char = raw[index]
        if char == "\\" and index + 1 < len(raw):
            decoded = decode_string(raw[index : index + 2]) or raw[index + 1]
            parts.append(re.escape(decoded))
            index += 2
            continue
        parts.append({"%": ".*", "_": "."}.get(char, re.escape(char)))
        index += 1
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


def _compile_like(cond: Like, ctx: _Context) -> Predicate:
    field = ctx.filter_field(cond.field)
    if _kind(field) not in ("text", "id"):
        raise ctx.error(
            cond.field,
            "INVALID_QUERY_FILTER_OPERATOR",
            f"invalid operator on {field.type} field: LIKE",
        )
    pattern = _like_regex(cond.pattern.raw)
    name = field.name

    def like(record: Record) -> bool:
        value = record.get(name)
        return value is not None and pattern.fullmatch(str(value)) is not None

    return like


def _compile_includes(cond: Includes, ctx: _Context) -> Predicate:
    field = ctx.filter_field(cond.field)
    if field.type != "multipicklist":
        raise ctx.error(
            cond.field,
            "INVALID_QUERY_FILTER_OPERATOR",
            "includes or excludes operator only valid on multipicklist field",
        )
    get = _getter(field)
    wanted = [_literal(ctx, cond.field, field, v) or frozenset() for v in cond.values]

    def includes(record: Record) -> bool:
        chosen = get(record) or frozenset()
        hit = any(want and want <= chosen for want in wanted)
        return not hit if cond.negated else hit

    return includes


# -- ordering and projection ---------------------------------------------------


def _sort(
    records: list[Record], order_by: tuple[OrderItem, ...], ctx: _Context
) -> None:
    """Sort in place, one stable pass per key from the last to the first."""
    getters = []
    for item in order_by:
        field = ctx.field(item.field)
        if field.type in _COMPOUND_TYPES or field.type == "multipicklist":
            raise ctx.error(
                item.field,
                "INVALID_FIELD",
                f"field '{field.name}' can not be sorted in a query call",
            )
        getters.append((item, _getter(field)))
    for item, get in reversed(getters):
        keyed = [(get(record), record) for record in records]
        nulls = [record for value, record in keyed if value is None]
        values = [(value, record) for value, record in keyed if value is not None]
        values.sort(key=lambda pair: pair[0], reverse=item.descending)
        ordered = [record for _, record in values]
        records[:] = ordered + nulls if item.nulls_last else nulls + ordered


def _component_key(compound: FieldSchema, component: FieldSchema) -> str:
    """``BillingStreet`` -> ``street``; ``Spot__Latitude__s`` -> ``latitude``."""
    name = component.name.removesuffix("__s")
    if compound.name.endswith("__c"):
        prefix = compound.name.removesuffix("__c") + "__"
    else:
        prefix = compound.name.removesuffix("Address")
    key = name.removeprefix(prefix)
    return key[:1].lower() + key[1:]


Projector: TypeAlias = Callable[[Record], Any]


def _projector(field: FieldSchema, obj: ObjectSchema) -> Projector:
    if field.type not in _COMPOUND_TYPES:
        name = field.name
        return lambda record: _wire(record.get(name), field)
    parts = [(_component_key(field, c), c) for c in obj.compound_components(field.name)]

    def compound(record: Record) -> dict[str, Any] | None:
        values = {key: _wire(record.get(c.name), c) for key, c in parts}
        if all(v is None for v in values.values()):
            return None
        return dict(sorted(values.items()))

    return compound


def _macro_fields(macro: FieldsMacro, obj: ObjectSchema) -> list[FieldSchema]:
    fields = list(obj.fields.values())
    if macro.kind == "ALL":
        return fields
    if macro.kind == "CUSTOM":
        return [f for f in fields if f.name.endswith(("__c", "__s"))]
    return [f for f in fields if not f.name.endswith(("__c", "__s"))]


def _projection(query: Query, ctx: _Context) -> list[tuple[str, Projector]]:
    chosen: dict[str, FieldSchema] = {}
    for item in query.select:
        if isinstance(item, FieldsMacro):
            for field in _macro_fields(item, ctx.obj):
                chosen.setdefault(field.name, field)
            continue
        field = ctx.field(item)
        if field.name in chosen:
            raise ctx.error(
                item, "MALFORMED_QUERY", f"duplicate field selected: {item.text}"
            )
        chosen[field.name] = field
    return [(name, _projector(field, ctx.obj)) for name, field in chosen.items()]


def _check_fields_macro(query: Query) -> None:
    for item in query.select:
        if not isinstance(item, FieldsMacro):
            continue
        if item.kind not in ("ALL", "STANDARD", "CUSTOM"):
            raise error_at(
                query.text,
                item.line,
                item.column,
                "MALFORMED_QUERY",
                f"unexpected token: {item.kind}",
            )
        bounded = query.limit is not None and query.limit <= FIELDS_MACRO_MAX_LIMIT
        if item.kind != "STANDARD" and not bounded:
            raise SoqlError(
                "MALFORMED_QUERY",
                "The SOQL FIELDS function must have a LIMIT of at most "
                f"{FIELDS_MACRO_MAX_LIMIT}",
            )


# -- execution -----------------------------------------------------------------


def _context(query: Query, schema: OrgSchema, now: datetime | None) -> _Context:
    obj = resolve_object(query, schema)
    today = (now or datetime.now(UTC)).astimezone(UTC).date()
    fields = {name.lower(): field for name, field in obj.fields.items()}
    return _Context(query, obj, fields, today)


def validate(query: Query, schema: OrgSchema) -> ObjectSchema:
    """Check the query against the schema without records; return its object."""
    execute(query, schema, (), include_deleted=False)
    return resolve_object(query, schema)


def execute(
    query: Query,
    schema: OrgSchema,
    records: Iterable[Mapping[str, Any]],
    *,
    include_deleted: bool,
    now: datetime | None = None,
    api_version: str = "62.0",
) -> list[dict[str, Any]]:
    """Run a parsed query over ``records`` (all of the queried object's type).

    Records are flat mappings by API name; dates and datetimes may be Python
    values or their wire strings. Records with a true ``IsDeleted`` are skipped
    unless ``include_deleted`` (queryAll). Each result carries ``attributes``
    like a REST query record; for ``SELECT COUNT()`` each matched record is
    returned with its attributes only, and the caller reports their number.
    ``now`` fixes the clock for date literals such as ``TODAY``.

    Raises:
        SoqlError: ``INVALID_TYPE``, ``INVALID_FIELD`` and the other codes
            Salesforce returns for a query that does not fit the schema.
    """
    _check_fields_macro(query)
    ctx = _context(query, schema, now)
    keep = _compile(query.where, ctx) if query.where is not None else None
    projection = [] if query.count else _projection(query, ctx)
    matched = [
        record
        for record in records
        if (include_deleted or not record.get("IsDeleted"))
        and (keep is None or keep(record))
    ]
    _sort(matched, query.order_by, ctx)
    start = query.offset or 0
    end = None if query.limit is None else start + query.limit
    obj_name = ctx.obj.name
    rows = []
    for record in matched[start:end]:
        url = f"/services/data/v{api_version}/sobjects/{obj_name}/{record.get('Id')}"
        row: dict[str, Any] = {"attributes": {"type": obj_name, "url": url}}
        for name, project in projection:
            row[name] = project(record)
        rows.append(row)
    return rows
