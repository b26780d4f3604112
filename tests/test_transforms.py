"""Transforms: exact round trips on Northwind's states and countries, refusals."""

from __future__ import annotations

import logging
import re
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from importlib.resources import files
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.mapping import transforms
from replicator.mapping.transforms import (
    Transform,
    TransformContext,
    TransformError,
    Unmappable,
    build,
    register,
)

_INSERT = re.compile(r"^INSERT INTO (\w+) VALUES \((.*)\);$")
_VALUE = re.compile(r"'((?:[^']|'')*)'|(NULL)|(-?[\d.]+)")


def _northwind_rows(table: str) -> list[list[str | None]]:
    """Rows of ``table`` from the bundled dump: text, NULL and numbers as text."""
    text = files("replicator.data").joinpath("northwind.sql").read_text("utf-8")
    rows = []
    for line in text.splitlines():
        found = _INSERT.match(line)
        if found and found.group(1) == table:
            values = _VALUE.findall(found.group(2))
            rows.append([
                None if null else (text.replace("''", "'") if number == "" else number)
                for text, null, number in values
            ])  # fmt: skip
    return rows


def _texts(values: set[str | None]) -> list[str]:
    return sorted(v for v in values if v is not None)


NORTHWIND_STATES = {str(row[1]): str(row[2]) for row in _northwind_rows("us_states")}
NORTHWIND_COUNTRIES = _texts(
    {row[8] for row in _northwind_rows("customers")}
    | {row[8] for row in _northwind_rows("suppliers")}
    | {row[13] for row in _northwind_rows("orders")}
    | {row[11] for row in _northwind_rows("employees")}
)
US_REGIONS = _texts({row[6] for row in _northwind_rows("customers") if row[8] == "USA"})


def test_northwind_parse_finds_the_data() -> None:
    assert len(NORTHWIND_STATES) == 51
    assert NORTHWIND_STATES["Iowa"] == "IO"  # Northwind's own code, not USPS IA
    assert {"USA", "UK", "Germany", "Venezuela", "Japan"} <= set(NORTHWIND_COUNTRIES)
    assert {"OR", "WA", "CA", "AK"} <= set(US_REGIONS)


@pytest.mark.parametrize(
    "context",
    [TransformContext(us_states=NORTHWIND_STATES), TransformContext()],
    ids=["erp-lookup", "built-in"],
)
def test_us_state_round_trips_every_northwind_state(context: TransformContext) -> None:
    state = build("us_state", field="region", context=context)
    codes = context.us_states or transforms.US_STATES

    for name in NORTHWIND_STATES:
        code = state.from_unified(name)
        assert code == codes[name]
        assert state.to_unified(code) == name
        assert state.from_unified(state.to_unified(code)) == code


def test_us_state_maps_northwind_customer_regions() -> None:
    state = build("us_state", context=TransformContext(us_states=NORTHWIND_STATES))

    names = {code: state.to_unified(code) for code in US_REGIONS}

    assert names["OR"] == "Oregon"
    assert names["AK"] == "Alaska"
    assert all(state.from_unified(name) == code for code, name in names.items())


def test_us_state_lookup_wins_and_usps_code_is_an_alias() -> None:
    """With the ERP's table Iowa is IO; Salesforce's IA is still understood."""
    state = build("us_state", context=TransformContext(us_states=NORTHWIND_STATES))

    assert state.from_unified("Iowa") == "IO"
    assert state.to_unified("IA") == "Iowa"
    assert state.to_unified("IO") == "Iowa"


def test_us_state_canonicalises_names_and_case() -> None:
    state = build("us_state")

    assert state.to_unified("california") == "California"
    assert state.to_unified("ny") == "New York"
    assert state.from_unified("WA") == "WA"


def test_us_state_refuses_a_region_that_is_no_state() -> None:
    state = build("us_state", field="region")

    with pytest.raises(TransformError) as caught:
        state.to_unified("BC")

    assert caught.value.field == "region"
    assert caught.value.value == "BC"
    assert "not a US state" in caught.value.reason


def test_us_state_lookup_with_two_states_on_one_code_is_refused() -> None:
    with pytest.raises(ValueError, match="one code"):
        build("us_state", context=TransformContext(us_states={"A": "XX", "B": "XX"}))


@pytest.mark.parametrize("name", NORTHWIND_COUNTRIES)
def test_country_iso_round_trips_every_northwind_country(name: str) -> None:
    country = build("country_iso", field="country")

    code = country.from_unified(name)

    assert re.fullmatch(r"[A-Z]{2}", code)
    assert country.to_unified(code) == name
    assert country.from_unified(country.to_unified(code)) == code


def test_country_iso_knows_northwind_spellings() -> None:
    country = build("country_iso")

    assert country.from_unified("USA") == "US"
    assert country.from_unified("UK") == "GB"
    assert country.to_unified("US") == "USA"
    assert country.to_unified("GB") == "UK"


def test_country_iso_name_to_code_canonicalises() -> None:
    """Many spellings give one code; the code gives back the one canonical name."""
    country = build("country_iso")

    spellings = ["United States", "U.S.A.", "usa", "United States of America", "US"]

    assert {country.from_unified(s) for s in spellings} == {"US"}
    assert country.to_unified(country.from_unified("U.S.A.")) == "USA"


def test_every_iso_code_round_trips() -> None:
    country = build("country_iso")

    for code in transforms.COUNTRIES:
        assert country.from_unified(country.to_unified(code)) == code


def test_country_iso_context_names_override() -> None:
    country = build("country_iso", context=TransformContext(countries={"US": "U.S."}))

    assert country.to_unified("US") == "U.S."
    assert country.from_unified("U.S.") == "US"


def test_country_iso_refuses_an_unknown_country() -> None:
    country = build("country_iso", field="country")

    with pytest.raises(TransformError, match="unknown country"):
        country.from_unified("Atlantis")
    with pytest.raises(TransformError, match="alpha-2"):
        country.to_unified("XX")


def test_decimal_sends_float_price_as_exact_amount() -> None:
    price = build("decimal(18,2)", field="unit_price")

    amount = price.from_unified(18.4)

    assert isinstance(amount, Decimal)
    assert str(amount) == "18.40"
    assert price.to_unified(amount) == 18.4


def test_decimal_rounds_half_up_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    """BUG-09: 0.1234567890123456789 goes to a scale of 6 as 0.123457, logged."""
    cost = build("decimal(12,6)", field="unit_cost")

    with caplog.at_level(logging.INFO, logger="replicator.mapping.transforms"):
        amount = cost.from_unified(Decimal("0.1234567890123456789"))

    assert str(amount) == "0.123457"
    assert [r.getMessage() for r in caplog.records] == ["decimal rounded"]
    assert caplog.records[0].__dict__["field"] == "unit_cost"
    assert str(build("decimal(5,2)").from_unified(Decimal("0.125"))) == "0.13"


@pytest.mark.parametrize("special", [float("nan"), "NaN", Decimal("NaN"), float("inf")])
def test_decimal_refuses_nan_and_infinity(special: Any) -> None:
    cost = build("decimal(12,6)", field="unit_cost")

    with pytest.raises(TransformError, match="not a finite number") as caught:
        cost.from_unified(special)

    assert caught.value.field == "unit_cost"


def test_decimal_refuses_too_many_integer_digits_and_booleans() -> None:
    price = build("decimal(5,2)")

    with pytest.raises(TransformError, match="integer digits"):
        price.from_unified(1000.0)
    with pytest.raises(TransformError, match="boolean"):
        price.from_unified(True)


def test_decimal_numeric_keeps_a_decimal_on_the_erp_side() -> None:
    price = build("decimal(20,0,numeric)")

    assert price.to_unified(Decimal("9007199254740993")) == Decimal("9007199254740993")


def test_decimal_refuses_digits_a_float_cannot_hold() -> None:
    price = build("decimal(18,0)")

    with pytest.raises(TransformError, match="float column"):
        price.to_unified(Decimal("9007199254740993"))


@given(
    cents=st.integers(min_value=-(10**13) + 1, max_value=10**13 - 1),
    scale=st.integers(min_value=0, max_value=4),
)
def test_decimal_amount_round_trips_through_a_float(cents: int, scale: int) -> None:
    """Any amount of up to 13 digits survives Salesforce -> float ERP -> Salesforce."""
    price = build(f"decimal(15,{scale})")
    amount = Decimal(cents).scaleb(-scale)

    unified = price.to_unified(amount)

    assert isinstance(unified, float)
    back = price.from_unified(unified)
    assert back == amount
    assert str(back) == str(amount.quantize(Decimal(1).scaleb(-scale)))
    assert price.to_unified(back) == unified


@given(
    value=st.floats(
        allow_nan=False, allow_infinity=False, min_value=-1e9, max_value=1e9
    )
)
def test_decimal_float_round_trips_once_at_scale(value: float) -> None:
    """A float ERP price, once sent, is stable: unified -> SF -> unified -> SF."""
    price = build("decimal(18,2)")

    amount = price.from_unified(value)
    unified = price.to_unified(amount)

    assert price.from_unified(unified) == amount
    assert price.to_unified(price.from_unified(unified)) == unified


def test_date_datetime_sends_midnight_of_the_zone_as_utc() -> None:
    """BUG-34: the date's midnight in the configured zone, never the host's."""
    shipped = build("date_datetime(America/Chicago)", field="shipped_date")

    text = shipped.from_unified(date(2024, 3, 31))

    assert text == "2024-03-31T05:00:00.000Z"
    assert shipped.to_unified(text) == date(2024, 3, 31)


def test_date_datetime_defaults_to_utc() -> None:
    shipped = build("date_datetime")

    assert shipped.from_unified("2024-03-31") == "2024-03-31T00:00:00.000Z"
    assert shipped.to_unified("2024-03-31T00:00:00.000Z") == date(2024, 3, 31)


def test_date_datetime_accepts_the_same_instant_with_an_offset() -> None:
    shipped = build("date_datetime(Asia/Kolkata)")

    local = datetime(2024, 3, 31, tzinfo=timezone(timedelta(hours=5, minutes=30)))

    assert shipped.to_unified(local) == date(2024, 3, 31)


def test_date_datetime_round_trips_every_day_of_a_dst_year() -> None:
    shipped = build("date_datetime(Europe/Berlin)")
    day = date(2024, 1, 1)

    for offset in range(366):
        current = day + timedelta(days=offset)
        assert shipped.to_unified(shipped.from_unified(current)) == current


def test_date_datetime_refuses_a_time_of_day_unless_truncating() -> None:
    strict = build("date_datetime(UTC)", field="shipped_date")
    loose = build("date_datetime(UTC, truncate)")

    with pytest.raises(TransformError, match="not 00:00 in UTC"):
        strict.to_unified("2024-03-10T08:00:00.000Z")
    assert loose.to_unified("2024-03-10T08:00:00.000Z") == date(2024, 3, 10)


def test_date_datetime_refuses_a_naive_datetime() -> None:
    shipped = build("date_datetime")

    with pytest.raises(TransformError, match="without an offset"):
        shipped.to_unified("2024-03-10T00:00:00")
    with pytest.raises(TransformError, match="expected a date"):
        shipped.from_unified(datetime(2024, 3, 10))


def test_date_datetime_refuses_an_unknown_zone() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        build("date_datetime(Mars/Olympus)")


def test_picklist_maps_values_to_codes_both_ways() -> None:
    rating = build("picklist(Hot=H, Warm=W, 'Closed Won'=CW)", field="rating")

    assert rating.to_unified("Closed Won") == "CW"
    assert rating.from_unified("H") == "Hot"
    with pytest.raises(TransformError, match="not in the picklist table"):
        rating.to_unified("Cold")


def test_picklist_types_booleans_and_integers() -> None:
    """Product2.IsActive onto Northwind's discontinued (0/1)."""
    active = build("picklist(true=0, false=1)")

    assert active.to_unified(True) == 0
    assert active.from_unified(1) is False
    # unified rows hold text: "1" is the code 1, "true" the value True
    assert active.from_unified("1") is False
    assert active.to_unified("true") == 0
    with pytest.raises(TransformError):
        active.from_unified("2")
    with pytest.raises(TransformError):
        active.from_unified(1.5)


def test_picklist_must_be_one_to_one() -> None:
    with pytest.raises(ValueError, match="one-to-one"):
        build("picklist(Hot=H, Warm=H)")


def test_none_passes_every_transform() -> None:
    for spec in ("us_state", "country_iso", "decimal(18,2)", "date_datetime"):
        transform = build(spec)
        assert transform.to_unified(None) is None
        assert transform.from_unified(None) is None


def test_reversed_swaps_directions_and_kinds() -> None:
    state = build("us_state").reversed()

    assert state.to_unified("Oregon") == "OR"
    assert state.from_unified("OR") == "Oregon"


def test_unknown_transform_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown transform 'soundex'; use one of"):
        build("soundex")


def test_a_registered_transform_is_built_by_name() -> None:
    @register("yes_no_test", sf_kinds={"boolean"}, erp_kinds={"text"})
    def _yes_no(spec: Any, context: TransformContext) -> tuple[Any, Any]:
        def to_unified(value: Any) -> str:
            return "Y" if value else "N"

        def from_unified(value: Any) -> bool:
            if value not in ("Y", "N"):
                raise Unmappable("expected Y or N")
            return bool(value == "Y")

        return to_unified, from_unified

    try:
        flag = build("yes_no_test", field="active")

        assert isinstance(flag, Transform)
        assert flag.to_unified(True) == "Y"
        assert flag.sf_kinds == frozenset({"boolean"})
        with pytest.raises(TransformError, match="expected Y or N"):
            flag.from_unified("maybe")
        assert "yes_no_test" in transforms.names()
    finally:
        transforms._REGISTRY.pop("yes_no_test")


def test_country_iso_reads_names_from_orgs_without_country_picklists() -> None:
    country = build("country_iso")

    assert country.to_unified("USA") == "USA"
    assert country.to_unified("Germany") == "Germany"
    assert country.to_unified("de") == "Germany"
    with pytest.raises(TransformError):
        country.to_unified("Atlantis")
