"""Field values as the REST API checks them: coercion, limits and the error bodies.

Pure functions over ``FieldSchema``: a JSON value in, the stored value out, or
an ``ApiError`` carrying Salesforce's error code and message (reference
§5.7). Datetimes are stored in the REST wire form
``2024-06-04T12:00:00.000+0000``, dates as ``2024-06-04``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from replicator.emulator import ids
from replicator.emulator.schema import FieldSchema, ObjectSchema

__all__ = [
    "ApiError",
    "check_required",
    "coerce_value",
    "format_datetime",
    "invalid_field",
    "parse_datetime",
]

TEXT_TYPES = frozenset(
    {
        "string",
        "textarea",
        "email",
        "phone",
        "url",
        "picklist",
        "multipicklist",
        "combobox",
        "encryptedstring",
    }
)
NUMBER_TYPES = frozenset({"double", "currency", "percent"})
_EMAIL_RE = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
# Given a normalised id: the object its prefix belongs to, and whether the
# record exists (a lookup to a deleted record is still a valid reference).
ReferenceLookup = Callable[[str], tuple[str | None, bool]]
_TIME_RE = re.compile(r"\d{2}:\d{2}(:\d{2}(\.\d{1,3})?)?Z?")


class ApiError(Exception):
    """A Salesforce API error: HTTP status, ``errorCode``, message, fields.

    ``fields`` is ``None`` when Salesforce's body has no ``fields`` key.
    A status of 300 carries the matching record ids of an ambiguous upsert.
    """

    def __init__(
        self,
        status: int,
        error_code: str,
        message: str,
        *,
        fields: tuple[str, ...] | None = None,
        matches: tuple[str, ...] = (),
    ) -> None:
        super().__init__(f"{error_code}: {message}")
        self.status = status
        self.error_code = error_code
        self.message = message
        self.fields = fields
        self.matches = matches

    def body(self) -> dict[str, Any]:
        """Return one element of a REST error array (``errorCode`` form)."""
        item: dict[str, Any] = {"message": self.message, "errorCode": self.error_code}
        if self.fields is not None:
            item["fields"] = list(self.fields)
        return item

    def collection_body(self) -> dict[str, Any]:
        """Return one entry of a collections ``errors`` list (``statusCode`` form)."""
        return {
            "statusCode": self.error_code,
            "message": self.message,
            "fields": list(self.fields or ()),
        }


def format_datetime(value: datetime) -> str:
    """Render a datetime the way REST does: UTC, milliseconds, ``+0000``."""
    value = value.astimezone(UTC)
    millis = value.microsecond // 1000
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{millis:03d}+0000"


def parse_datetime(value: str) -> datetime:
    """Parse ``2024-06-04T12:00:00.000+0000``, ``...Z`` or ``...+00:00``."""
    text = value.strip()
    if re.search(r"[+-]\d{4}$", text):
        text = text[:-2] + ":" + text[-2:]
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def invalid_field(obj: ObjectSchema, name: str) -> ApiError:
    # Wording of an unknown field in a write body is [UNCONFIRMED] (§5.7).
    return ApiError(
        400,
        "INVALID_FIELD",
        f"No such column '{name}' on sobject of type {obj.name}",
        fields=(),
    )


def check_required(obj: ObjectSchema, record: Mapping[str, Any]) -> None:
    """Raise ``REQUIRED_FIELD_MISSING`` naming every empty required field."""
    missing = [
        name
        for name, field in obj.fields.items()
        if not field.nillable
        and field.createable
        and field.type != "boolean"
        and field.auto_number_format is None
        and record.get(name) in (None, "")
    ]
    if missing:
        raise ApiError(
            400,
            "REQUIRED_FIELD_MISSING",
            f"Required fields are missing: [{', '.join(missing)}]",
            fields=tuple(missing),
        )


def coerce_value(
    field: FieldSchema,
    value: Any,
    lookup: ReferenceLookup | None = None,
) -> Any:
    """Return the stored form of ``value`` for ``field`` or raise ``ApiError``."""
    if value is None or (value == "" and field.type != "boolean"):
        return False if field.type == "boolean" else None
    if field.type in TEXT_TYPES:
        return _text(field, value)
    if field.type in NUMBER_TYPES or field.type == "int":
        return _number(field, value)
    if field.type == "boolean":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise _parser_error("boolean", value)
    if field.type == "date":
        return _date(value)
    if field.type == "datetime":
        try:
            return format_datetime(parse_datetime(str(value)))
        except ValueError:
            raise _parser_error("datetime", value) from None
    if field.type == "time":
        if isinstance(value, str) and _TIME_RE.fullmatch(value):
            return value
        raise _parser_error("time", value)
    if field.type in ("reference", "id"):
        return _reference(field, value, lookup)
    return value


def _label(field: FieldSchema) -> str:
    return field.label or field.name


def _parser_error(type_name: str, value: Any) -> ApiError:
    kind = "VALUE_STRING" if isinstance(value, str) else "VALUE_NUMBER"
    return ApiError(
        400,
        "JSON_PARSER_ERROR",
        f"Cannot deserialize instance of {type_name} from {kind} value {value} "
        "or request may be missing a required field",
    )


def _text(field: FieldSchema, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _parser_error("string", value)
    text = str(value)
    if field.length and len(text) > field.length:
        raise ApiError(
            400,
            "STRING_TOO_LONG",
            f"{_label(field)}: data value too large: {text} "
            f"(max length={field.length})",
            fields=(field.name,),
        )
    if field.type == "email" and not _EMAIL_RE.fullmatch(text):
        raise ApiError(
            400,
            "INVALID_EMAIL_ADDRESS",
            f"{_label(field)}: invalid email address: {text}",
            fields=(field.name,),
        )
    if field.restricted_picklist and field.type in ("picklist", "multipicklist"):
        chosen = text.split(";") if field.type == "multipicklist" else [text]
        for item in chosen:
            if item not in field.picklist_values:
                raise ApiError(
                    400,
                    "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                    f"{_label(field)}: bad value for restricted picklist field: {item}",
                    fields=(field.name,),
                )
    return text


def _number(field: FieldSchema, value: Any) -> int | float:
    if isinstance(value, bool):
        raise _parser_error(field.type, value)
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise _parser_error("double", value) from None
    if not number.is_finite():
        raise _parser_error("double", value)
    if field.precision:
        if abs(number) >= Decimal(10) ** (field.precision - field.scale):
            raise ApiError(
                400,
                "NUMBER_OUTSIDE_VALID_RANGE",
                f"{_label(field)}: value outside of valid range on numeric field: "
                f"{value}",
                fields=(field.name,),
            )
        # Salesforce rounds half up, not to even.
        number = number.quantize(Decimal(1).scaleb(-field.scale), ROUND_HALF_UP)
    if field.type == "int":
        if number != number.to_integral_value():
            raise _parser_error("int", value)
        return int(number)
    return float(number)


def _date(value: Any) -> str:
    if isinstance(value, str):
        try:
            return date.fromisoformat(value[:10]).isoformat()
        except ValueError:
            pass
    raise _parser_error("date", value)


def _reference(field: FieldSchema, value: Any, lookup: ReferenceLookup | None) -> str:
    wrong_type = ApiError(
        400,
        "MALFORMED_ID",
        f"{_label(field)}: id value of incorrect type: {value}",
        fields=(field.name,),
    )
    if not isinstance(value, str) or not ids.is_valid_id(value):
        raise wrong_type
    normal = ids.normalize_id(value)
    if lookup is None:
        return normal
    object_name, exists = lookup(normal)
    targets = {t.lower() for t in field.reference_to}
    if targets and (object_name is None or object_name.lower() not in targets):
        raise wrong_type
    if not exists:
        raise ApiError(
            400, "INVALID_CROSS_REFERENCE_KEY", "invalid cross reference id", fields=()
        )
    return normal
