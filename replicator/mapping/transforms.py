"""Field transforms between Salesforce values and the unified (ERP) domain.

A transform is a pair of functions registered by name: ``to_unified`` takes a
Salesforce value into the unified domain (the ERP's representation and type,
see docs/two-way-sync.md) and ``from_unified`` takes a unified value to
Salesforce. ERP values are already unified and pass through untouched.
Canonical values round-trip exactly in both directions; a value a transform
cannot map raises :class:`TransformError` naming the field, the value and the
reason, and the caller dead-letters that field only. ``None`` maps to ``None``.

Built in: ``us_state``, ``country_iso``, ``decimal(p,s)``,
``date_datetime(zone)`` and ``picklist(a=b, ...)``. Add one with
:func:`register` or the ``replicator.transforms`` entry point group.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import zoneinfo
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from importlib.metadata import entry_points
from typing import Any, Literal

from replicator.errors import ApplyError
from replicator.mapping._countries import ALIASES, COUNTRIES
from replicator.mapping._spec import Spec, parse_spec, split_args

__all__ = [
    "COUNTRIES",
    "ENTRY_POINT_GROUP",
    "US_STATES",
    "Convert",
    "Kind",
    "Transform",
    "TransformContext",
    "TransformError",
    "Unmappable",
    "build",
    "names",
    "register",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "replicator.transforms"

# Value kinds the schema check compares (see schema_check.py).
Kind = Literal["text", "number", "boolean", "date", "datetime", "time", "json"]
Convert = Callable[[Any], Any]

# USPS names and codes: the fallback when no lookup (the ERP's us_states) is given.
US_STATES: dict[str, str] = {
    "Alabama": "AL", "Alaska": "AK", "Arizona": "AZ", "Arkansas": "AR",
    "California": "CA", "Colorado": "CO", "Connecticut": "CT", "Delaware": "DE",
    "District of Columbia": "DC", "Florida": "FL", "Georgia": "GA", "Hawaii": "HI",
    "Idaho": "ID", "Illinois": "IL", "Indiana": "IN", "Iowa": "IA", "Kansas": "KS",
    "Kentucky": "KY", "Louisiana": "LA", "Maine": "ME", "Maryland": "MD",
    "Massachusetts": "MA", "Michigan": "MI", "Minnesota": "MN", "Mississippi": "MS",
    "Missouri": "MO", "Montana": "MT", "Nebraska": "NE", "Nevada": "NV",
    "New Hampshire": "NH", "New Jersey": "NJ", "New Mexico": "NM", "New York": "NY",
    "North Carolina": "NC", "North Dakota": "ND", "Ohio": "OH", "Oklahoma": "OK",
    "Oregon": "OR", "Pennsylvania": "PA", "Rhode Island": "RI",
    "South Carolina": "SC", "South Dakota": "SD", "Tennessee": "TN", "Texas": "TX",
    "Utah": "UT", "Vermont": "VT", "Virginia": "VA", "Washington": "WA",
    "West Virginia": "WV", "Wisconsin": "WI", "Wyoming": "WY",
    "American Samoa": "AS", "Guam": "GU", "Northern Mariana Islands": "MP",
    "Puerto Rico": "PR", "U.S. Virgin Islands": "VI",
}  # fmt: skip

# The field a converter runs for, so its log lines can name it.
_FIELD: ContextVar[str] = ContextVar("transform_field", default="")

_TEXT: frozenset[Kind] = frozenset({"text"})
_NUMBER: frozenset[Kind] = frozenset({"number"})


class TransformError(ApplyError):
    """A value the field's transform cannot map; that field is dead-lettered."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"field {field!r} cannot map {value!r}: {reason}")
        self.field = field
        self.value = value
        self.reason = reason


class Unmappable(ValueError):
    """Raised by a converter function with the reason; the wrapper adds the field."""


@dataclass(frozen=True, slots=True)
class TransformContext:
    """Lookups a transform may use, read from the ERP at start-up.

    ``us_states`` maps a state name to its code (the ERP's ``us_states``
    table: ``state_name -> state_abbr``); ``countries`` maps an ISO code to the
    ERP's name for it, overriding the built-in names.
    """

    us_states: Mapping[str, str] | None = None
    countries: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Transform:
    """A bound transform: the converter pair, the kinds it joins, its field."""

    spec: str
    to_unified_fn: Convert
    from_unified_fn: Convert
    sf_kinds: frozenset[Kind] | None = None  # None: any kind
    erp_kinds: frozenset[Kind] | None = None
    field: str = ""

    def to_unified(self, value: Any) -> Any:
        """Return the Salesforce ``value`` in the unified (ERP) domain."""
        return self._run(self.to_unified_fn, value)

    def from_unified(self, value: Any) -> Any:
        """Return the unified ``value`` as Salesforce holds it."""
        return self._run(self.from_unified_fn, value)

    def for_field(self, field: str) -> Transform:
        """Return this transform naming ``field`` in its errors."""
        return dataclasses.replace(self, field=field)

    def reversed(self) -> Transform:
        """Return the transform with its directions swapped (``reverse = true``)."""
        return dataclasses.replace(
            self,
            to_unified_fn=self.from_unified_fn,
            from_unified_fn=self.to_unified_fn,
            sf_kinds=self.erp_kinds,
            erp_kinds=self.sf_kinds,
        )

    def _run(self, fn: Convert, value: Any) -> Any:
        if value is None:
            return None
        token = _FIELD.set(self.field)
        try:
            return fn(value)
        except Unmappable as exc:
            raise TransformError(self.field, value, f"{self.spec}: {exc}") from None
        finally:
            _FIELD.reset(token)


Factory = Callable[[Spec, TransformContext], tuple[Convert, Convert]]


@dataclass(frozen=True, slots=True)
class _Entry:
    factory: Factory
    sf_kinds: frozenset[Kind] | None
    erp_kinds: frozenset[Kind] | None


_REGISTRY: dict[str, _Entry] = {}
_entry_points_loaded = False


def register(
    name: str,
    *,
    sf_kinds: frozenset[Kind] | set[Kind] | None = None,
    erp_kinds: frozenset[Kind] | set[Kind] | None = None,
) -> Callable[[Factory], Factory]:
    """Register a transform factory under ``name`` (a decorator).

    The factory receives the parsed spelling (``spec.args`` for the
    comma-separated arguments, ``spec.raw`` for the text between the
    parentheses) and the :class:`TransformContext`, and returns the pair
    ``(to_unified, from_unified)``. It raises ``ValueError`` for bad
    arguments (reported at config load); the converters raise
    :class:`Unmappable` with a reason for a value they cannot map. The kinds
    say which Salesforce and ERP types it joins, for the start-up schema check.
    """
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"transform name {name!r} must be lower-case snake case")

    def decorate(factory: Factory) -> Factory:
        _REGISTRY[name] = _Entry(
            factory,
            None if sf_kinds is None else frozenset(sf_kinds),
            None if erp_kinds is None else frozenset(erp_kinds),
        )
        return factory

    return decorate


def names() -> frozenset[str]:
    """Return every registered transform name, entry points included."""
    _load_entry_points()
    return frozenset(_REGISTRY)


def build(
    spec: str, *, field: str = "", context: TransformContext | None = None
) -> Transform:
    """Return the transform spelled ``spec``, e.g. ``"decimal(18,2)"``.

    Raises:
        ValueError: an unknown name or arguments the factory refuses; the
            message says how to fix it.
    """
    parsed = parse_spec(spec)
    _load_entry_points()
    entry = _REGISTRY.get(parsed.name)
    if entry is None:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(
            f"unknown transform {parsed.name!r}; use one of {known}, or register "
            "one (docs/two-way-sync.md, 'Adding a transform')"
        )
    to_unified, from_unified = entry.factory(parsed, context or TransformContext())
    return Transform(
        spec.strip(), to_unified, from_unified, entry.sf_kinds, entry.erp_kinds, field
    )


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        loaded = point.load()
        # A module registers itself on import; a bare factory takes the point's name.
        if callable(loaded) and point.name not in _REGISTRY:
            register(point.name)(loaded)


def _no_args(spec: Spec) -> None:
    if spec.args:
        raise ValueError(f"transform {spec.name!r} takes no arguments; remove them")


def _fold(text: str) -> str:
    """Case, accents kept; dots, commas and repeated spaces dropped."""
    return " ".join(re.sub(r"[.,]", " ", text).casefold().split())


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise Unmappable(f"expected text ({what}), got {type(value).__name__}")
    return value


# -- us_state ---------------------------------------------------------------


@register("us_state", sf_kinds=_TEXT, erp_kinds=_TEXT)
def _us_state(spec: Spec, context: TransformContext) -> tuple[Convert, Convert]:
    """Salesforce two-letter code <-> ERP state name.

    The lookup (the ERP's ``us_states``) is authoritative when given: Northwind
    spells Iowa ``IO``, so ``IO`` it is. Codes of the built-in table that the
    lookup does not use (``IA``) are accepted as aliases. A state name on the
    Salesforce side, or a code on the ERP side, is accepted and canonicalised
    (a name in the unified domain, a code in Salesforce).
    """
    _no_args(spec)
    to_code = dict(context.us_states or US_STATES)
    to_name = {code.upper(): name for name, code in to_code.items()}
    if len(to_name) != len(to_code):
        raise ValueError(
            "the us_states lookup gives two states one code; fix the table"
        )
    folded = {_fold(name): name for name in to_code}
    for name, code in US_STATES.items():
        if code not in to_name and _fold(name) in folded:
            to_name[code] = folded[_fold(name)]

    def to_unified(value: Any) -> str:
        text = _text(value, "a state code").strip()
        found = to_name.get(text.upper()) or folded.get(_fold(text))
        if found is None:
            raise Unmappable("not a US state code or name")
        return found

    def from_unified(value: Any) -> str:
        text = _text(value, "a state name").strip()
        name = folded.get(_fold(text)) or to_name.get(text.upper())
        if name is None:
            raise Unmappable("not a US state name or code")
        return to_code[name]

    return to_unified, from_unified


# -- country_iso --------------------------------------------------------------


@register("country_iso", sf_kinds=_TEXT, erp_kinds=_TEXT)
def _country_iso(spec: Spec, context: TransformContext) -> tuple[Convert, Convert]:
    """Salesforce ISO 3166-1 alpha-2 code <-> ERP country name.

    ``from_unified`` (name to code) canonicalises: many spellings ("USA",
    "United States", "U.S.A.", "usa", the code itself) give one code.
    ``to_unified`` (code to name) gives exactly one name per code: the
    context's (the ERP's own spelling), else the built-in one ("USA", "UK",
    "Germany"). So code -> name -> code is always exact, and name -> code ->
    name is exact for canonical names.
    """
    _no_args(spec)
    to_name = dict(COUNTRIES)
    to_name.update(
        {code.upper(): name for code, name in (context.countries or {}).items()}
    )
    to_code: dict[str, str] = {}
    for code, name in COUNTRIES.items():
        to_code[_fold(name)] = code
    for alias, code in ALIASES.items():
        to_code[_fold(alias)] = code
    for code, name in to_name.items():  # the ERP's spellings win
        to_code[_fold(name)] = code

    def to_unified(value: Any) -> str:
        text = _text(value, "an ISO country code").strip()
        # Orgs without country picklists hold names too ("USA", "Germany").
        code = text.upper() if text.upper() in to_name else to_code.get(_fold(text))
        if code is None:
            raise Unmappable("neither an ISO 3166-1 alpha-2 code nor a known country")
        return to_name[code]

    def from_unified(value: Any) -> str:
        text = _text(value, "a country name").strip()
        code = to_code.get(_fold(text))
        if code is None and text.upper() in to_name:
            code = text.upper()
        if code is None:
            raise Unmappable("unknown country; add it to the country lookup")
        return code

    return to_unified, from_unified


# -- decimal(p,s) -----------------------------------------------------------


def _decimal_of(value: Any) -> Decimal:
    """Exact decimal of ``value``; a float goes through its shortest repr."""
    if isinstance(value, bool):
        raise Unmappable("expected a number, got a boolean")
    if isinstance(value, Decimal):
        number = value
    elif isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, float):
        number = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            raise Unmappable("not a number") from None
    else:
        raise Unmappable(f"expected a number, got {type(value).__name__}")
    if not number.is_finite():
        raise Unmappable(f"{number} is not a finite number; Salesforce cannot hold it")
    return number


@register("decimal", sf_kinds=_NUMBER, erp_kinds=_NUMBER)
def _decimal(spec: Spec, context: TransformContext) -> tuple[Convert, Convert]:
    """ERP float (or numeric) <-> exact Salesforce amount of scale ``s``.

    ``decimal(p,s)`` gives the unified side a float (a ``real`` or ``double
    precision`` column); ``decimal(p,s,numeric)`` a Decimal. Floats are read
    through their shortest repr and rounded with quantize (half up, as
    Salesforce rounds), never with float arithmetic; a value that changes is
    logged (BUG-09). NaN and infinities are refused, as is an amount with more
    integer digits than ``p - s`` or one a float cannot hold exactly.
    """
    args = spec.args
    if len(args) not in (2, 3) or not all(a.isdigit() for a in args[:2]):
        raise ValueError(
            f"write decimal(precision,scale) or decimal(precision,scale,numeric), "
            f"not {spec.name}({spec.raw or ''})"
        )
    precision, scale = int(args[0]), int(args[1])
    if not 1 <= precision <= 38 or scale > precision:
        raise ValueError("decimal(p,s) needs 1 <= p <= 38 and s <= p")
    numeric = len(args) == 3
    if numeric and args[2] != "numeric":
        raise ValueError(f"the third argument of decimal is 'numeric', not {args[2]!r}")
    step = Decimal(1).scaleb(-scale)
    limit = Decimal(10) ** (precision - scale)

    def exact(value: Any) -> Decimal:
        number = _decimal_of(value)
        rounded = number.quantize(step, rounding=ROUND_HALF_UP)
        if abs(rounded) >= limit:
            raise Unmappable(f"more than {precision - scale} integer digits")
        if rounded != number:
            logger.info("decimal rounded", extra={
                "field": _FIELD.get(), "value": str(number), "rounded": str(rounded),
                "scale": scale,
            })  # fmt: skip
        return rounded

    def to_unified(value: Any) -> Decimal | float:
        amount = exact(value)
        if numeric:
            return amount
        approx = float(amount)
        if Decimal(repr(approx)).quantize(step) != amount:
            raise Unmappable("more digits than a float column holds exactly")
        return approx

    return to_unified, exact


# -- date_datetime(zone) -----------------------------------------------------


def _instant(value: Any) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise Unmappable("not an ISO 8601 datetime") from None
    if not isinstance(value, datetime):
        raise Unmappable(f"expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        # BUG-34: a naive value would be read in the host's zone.
        raise Unmappable("a datetime without an offset is ambiguous")
    return value


def _calendar_date(value: Any) -> date:
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            raise Unmappable("not an ISO 8601 date") from None
    if isinstance(value, datetime) or not isinstance(value, date):
        raise Unmappable(f"expected a date, got {type(value).__name__}")
    return value


def _salesforce_datetime(instant: datetime) -> str:
    utc = instant.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


@register(
    "date_datetime", sf_kinds=frozenset({"datetime"}), erp_kinds=frozenset({"date"})
)
def _date_datetime(spec: Spec, context: TransformContext) -> tuple[Convert, Convert]:
    """ERP date <-> Salesforce datetime at 00:00 in a zone (default UTC).

    ``date_datetime(Europe/Berlin)``; add ``truncate`` to accept a datetime
    that is not local midnight (its local date is kept and Salesforce is then
    written back at midnight); without it such a value is refused. The zone
    is the configured one, never the host's (BUG-10, BUG-34); Salesforce gets
    UTC text with ``Z``.
    """
    args = spec.args
    if len(args) > 2 or (len(args) == 2 and args[1] != "truncate"):
        raise ValueError(
            "write date_datetime, date_datetime(Zone/Name) or "
            "date_datetime(Zone/Name, truncate)"
        )
    try:
        zone = zoneinfo.ZoneInfo(args[0]) if args and args[0] else UTC
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {args[0]!r}; use an IANA name like 'Europe/Berlin'"
        ) from None
    truncate = len(args) == 2
    zone_name = args[0] if args and args[0] else "UTC"

    def midnight(day: date) -> datetime:
        return datetime.combine(day, time(0), tzinfo=zone)

    def to_unified(value: Any) -> date:
        instant = _instant(value)
        day = instant.astimezone(zone).date()
        if not truncate and midnight(day).astimezone(UTC) != instant.astimezone(UTC):
            raise Unmappable(
                f"not 00:00 in {zone_name}; add truncate to keep only the date"
            )
        return day

    def from_unified(value: Any) -> str:
        return _salesforce_datetime(midnight(_calendar_date(value)))

    return to_unified, from_unified


# -- picklist(a=b, ...) -------------------------------------------------------


def _literal(token: str) -> str | int | bool:
    """A picklist side: quoted text, an integer, true/false, or bare text."""
    if len(token) >= 2 and token[0] == token[-1] and token[0] in "'\"":
        return token[1:-1]
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token in ("true", "false"):
        return token == "true"
    return token


def _pairs(raw: str) -> list[tuple[str | int | bool, str | int | bool]]:
    pairs = []
    for item in split_args(raw, keep_quotes=True):
        found = re.fullmatch(r"""\s*('[^']*'|"[^"]*"|[^=]*?)\s*=\s*(.*?)\s*""", item)
        if found is None or not found.group(1) or not found.group(2):
            raise ValueError(
                f"picklist entry {item!r} is not salesforce_value=erp_code; "
                "write e.g. picklist(Hot=H, 'Closed Won'=W)"
            )
        pairs.append((_literal(found.group(1)), _literal(found.group(2))))
    return pairs


def _as_text(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@register("picklist")
def _picklist(spec: Spec, context: TransformContext) -> tuple[Convert, Convert]:
    """Salesforce picklist value <-> ERP code, a one-to-one table.

    ``picklist(Hot=H, Warm=W, 'Closed Won'=CW)``; unquoted integers and
    true/false are typed (``picklist(true=0, false=1)`` joins ``IsActive`` and
    Northwind's ``discontinued``).
    """
    if not spec.raw or not spec.raw.strip():
        raise ValueError("picklist needs its table, e.g. picklist(Hot=H, Cold=C)")
    pairs = _pairs(spec.raw)
    to_code = {(type(sf), sf): code for sf, code in pairs}
    to_value = {(type(code), code): sf for sf, code in pairs}
    if len(to_code) != len(pairs) or len(to_value) != len(pairs):
        raise ValueError(
            "a picklist value or code appears twice; the table must be "
            "one-to-one so values round-trip"
        )

    # Values also arrive as text (unified rows hold text): "0" is the code 0.
    code_by_text = {_as_text(sf): code for sf, code in pairs}
    value_by_text = {_as_text(code): sf for sf, code in pairs}

    def to_unified(value: Any) -> Any:
        if (type(value), value) in to_code:
            return to_code[(type(value), value)]
        if isinstance(value, str) and value in code_by_text:
            return code_by_text[value]
        raise Unmappable("not in the picklist table; add it")

    def from_unified(value: Any) -> Any:
        if (type(value), value) in to_value:
            return to_value[(type(value), value)]
        if isinstance(value, str) and value in value_by_text:
            return value_by_text[value]
        raise Unmappable("no picklist value has this code; add it")

    return to_unified, from_unified
