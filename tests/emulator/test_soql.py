"""Pure tests of the SOQL parser and evaluator: no I/O, a hand-made schema.

Expected results are computed from the records with plain Python filters, so
the tests say what SOQL means rather than what the evaluator happens to do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from replicator.emulator import soql
from replicator.emulator.schema import FieldSchema, ObjectSchema, OrgSchema

NOW = datetime(2024, 6, 5, 15, 30, tzinfo=UTC)  # a Wednesday
TODAY = NOW.date()

_SUFFIX = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"


def id18(id15: str) -> str:
    """Append the case checksum (reference §5.9), written again for the tests."""
    suffix = ""
    for start in (0, 5, 10):
        bits = sum(1 << i for i, c in enumerate(id15[start : start + 5]) if c.isupper())
        suffix += _SUFFIX[bits]
    return id15 + suffix


def _fields(*specs: tuple[str, str] | FieldSchema) -> dict[str, FieldSchema]:
    out = {}
    for spec in specs:
        field = spec if isinstance(spec, FieldSchema) else FieldSchema(*spec)
        out[field.name] = field
    return out


def make_schema() -> OrgSchema:
    billing = [
        FieldSchema(f"Billing{part}", kind, compound_field_name="BillingAddress")
        for part, kind in (
            ("Street", "textarea"),
            ("City", "string"),
            ("State", "string"),
            ("PostalCode", "string"),
            ("Country", "string"),
        )
    ]
    account = ObjectSchema(
        "Account",
        "001",
        fields=_fields(
            ("Id", "id"),
            ("IsDeleted", "boolean"),
            ("Name", "string"),
            ("Industry", "picklist"),
            ("AnnualRevenue", "currency"),
            ("NumberOfEmployees", "int"),
            ("CreatedDate", "datetime"),
            ("LastActivityDate", "date"),
            ("ParentId", "reference"),
            ("Active__c", "boolean"),
            ("Regions__c", "multipicklist"),
            *billing,
            ("BillingAddress", "address"),
        ),
    )
    return OrgSchema({"Account": account})


def _account(number: int, **values: Any) -> dict[str, Any]:
    record = {
        "Id": id18(f"001Dn000000{number:04d}"),
        "IsDeleted": False,
        "Name": None,
        "Industry": None,
        "AnnualRevenue": None,
        "NumberOfEmployees": None,
        "CreatedDate": "2024-01-01T00:00:00.000+0000",
        "LastActivityDate": None,
        "ParentId": None,
        "Active__c": False,
        "Regions__c": None,
        "BillingStreet": None,
        "BillingCity": None,
        "BillingState": None,
        "BillingPostalCode": None,
        "BillingCountry": None,
    }
    record.update(values)
    return record


RECORDS = [
    _account(
        1,
        Name="Acme",
        Industry="Energy",
        AnnualRevenue=5e6,
        NumberOfEmployees=120,
        Active__c=True,
        Regions__c="EMEA;APAC",
        CreatedDate="2024-06-05T09:00:00.000+0000",
        LastActivityDate="2024-06-04",
        BillingCity="Paris",
        BillingCountry="France",
    ),
    _account(
        2,
        Name="acme subsidiary",
        Industry="energy",
        AnnualRevenue=1e5,
        NumberOfEmployees=8,
        CreatedDate="2024-06-04T23:59:59.000+0000",
        ParentId=id18("001Dn0000000001"),
        Regions__c="EMEA",
    ),
    _account(
        3,
        Name="Globex_Corp",
        Industry="Media",
        AnnualRevenue=None,
        NumberOfEmployees=3000,
        CreatedDate="2024-05-20T12:00:00.000+0000",
        LastActivityDate="2024-05-01",
        Regions__c="AMER;APAC",
    ),
    _account(
        4,
        Name="Initech 100%",
        Industry=None,
        AnnualRevenue=2.5e7,
        NumberOfEmployees=None,
        CreatedDate="2023-12-31T23:00:00.000+0000",
    ),
    _account(
        5,
        Name=None,
        Industry="Media",
        AnnualRevenue=0.0,
        NumberOfEmployees=0,
        CreatedDate="2024-06-06T01:00:00.000+0000",
    ),
    _account(
        6, Name="Deleted Inc", Industry="Energy", IsDeleted=True, NumberOfEmployees=5
    ),
]
LIVE = [r for r in RECORDS if not r["IsDeleted"]]


def run(text: str, *, include_deleted: bool = False) -> list[dict[str, Any]]:
    return soql.execute(
        soql.parse(text),
        make_schema(),
        RECORDS,
        include_deleted=include_deleted,
        now=NOW,
    )


def ids_of(rows: list[dict[str, Any]]) -> list[str]:
    return [row["attributes"]["url"].rsplit("/", 1)[1] for row in rows]


def expect(predicate: Callable[[Mapping[str, Any]], bool]) -> list[str]:
    return [r["Id"] for r in LIVE if predicate(r)]


def fold(value: Any) -> Any:
    return value.casefold() if isinstance(value, str) else value


# -- parsing -------------------------------------------------------------------


def test_parse_builds_typed_ast() -> None:
    query = soql.parse(
        "select Id, Name from Account where Name = 'x' and AnnualRevenue > 10 "
        "order by Name desc nulls last limit 5 offset 2"
    )

    assert query.object_name == "Account"
    assert [f.text for f in query.select] == ["Id", "Name"]  # type: ignore[union-attr]
    assert query.where == soql.And(
        (
            soql.Comparison(
                soql.FieldRef(("Name",), 1, 36), "=", soql.StringValue("x", "x")
            ),
            soql.Comparison(
                soql.FieldRef(("AnnualRevenue",), 1, 51),
                ">",
                soql.NumberValue(Decimal("10")),
            ),
        )
    )
    assert query.order_by[0].descending
    assert query.order_by[0].nulls_last
    assert (query.limit, query.offset) == (5, 2)


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("2024-06-04T12:00:00Z", datetime(2024, 6, 4, 12, tzinfo=UTC)),
        ("2024-06-04T12:00:00+02:00", datetime(2024, 6, 4, 10, tzinfo=UTC)),
        ("2024-06-04T12:00:00.000+0000", datetime(2024, 6, 4, 12, tzinfo=UTC)),
        (
            "2024-06-04T12:00:00.25-0130",
            datetime(2024, 6, 4, 13, 30, 0, 250000, tzinfo=UTC),
        ),
    ],
)
def test_datetime_literals_parse_to_utc(literal: str, expected: datetime) -> None:
    query = soql.parse(f"SELECT Id FROM Account WHERE CreatedDate > {literal}")

    assert isinstance(query.where, soql.Comparison)
    assert query.where.value == soql.DateTimeValue(expected)


def test_literal_kinds_parse() -> None:
    query = soql.parse(
        "SELECT Id FROM Account WHERE Name IN ('a\\'b', 'c\\\\d', 'e\\nf') OR "
        "X__c = null OR Y__c = TRUE OR Z__c = false OR D__c = 2024-06-04 OR "
        "N__c = -1.5 OR C__c = LAST_N_DAYS:7 OR T__c = today"
    )

    assert isinstance(query.where, soql.Or)
    values = [
        getattr(op, "value", None) or getattr(op, "values", None)
        for op in query.where.operands
    ]
    assert values[0] == (
        soql.StringValue("a'b", "a\\'b"),
        soql.StringValue("c\\d", "c\\\\d"),
        soql.StringValue("e\nf", "e\\nf"),
    )
    assert isinstance(query.where.operands[1], soql.Comparison)
    assert query.where.operands[1].value == soql.NullValue()
    assert values[2:] == [
        soql.BooleanValue(True),
        soql.BooleanValue(False),
        soql.DateValue(date(2024, 6, 4)),
        soql.NumberValue(Decimal("-1.5")),
        soql.DateLiteral("LAST_N_DAYS", 7),
        soql.DateLiteral("TODAY"),
    ]


def test_keywords_are_case_insensitive_and_names_may_contain_them() -> None:
    query = soql.parse(
        "SeLeCt Limit__c, Order__c FrOm Order WhErE Limit__c = 1 LiMiT 3"
    )

    assert query.object_name == "Order"
    assert query.limit == 3


def test_count_and_fields_macro_parse() -> None:
    count = soql.parse("SELECT COUNT() FROM Account")
    fields = soql.parse("SELECT FIELDS(standard) FROM Account")

    assert count.count
    assert count.select == ()
    assert fields.select == (soql.FieldsMacro("STANDARD", 1, 15),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "SELECT Id FORM Account",
            "\nSELECT Id FORM Account\n          ^\nERROR at Row:1:Column:11\n"
            "unexpected token: FORM",
        ),
        (
            "SELECT Id FROM Account WHERE",
            "\nSELECT Id FROM Account WHERE\n                            ^\n"
            "ERROR at Row:1:Column:29\nunexpected token: <EOF>",
        ),
        (
            "SELECT Id FROM Account WHERE Name = 'a' AND Name = 'b' OR Name = 'c'",
            "\nSELECT Id FROM Account WHERE Name = 'a' AND Name = 'b' OR Name = 'c'\n"
            + " " * 55
            + "^\nERROR at Row:1:Column:56\nunexpected token: OR",
        ),
        (
            'SELECT Id FROM Account WHERE Name = "x"',
            "line 1:36 no viable alternative at character '\"'",
        ),
        ("   ", "SOQL statements cannot be empty or null"),
    ],
)
def test_malformed_queries_report_salesforce_messages(text: str, message: str) -> None:
    with pytest.raises(soql.SoqlError) as caught:
        soql.parse(text)

    assert caught.value.code == "MALFORMED_QUERY"
    assert caught.value.message == message


def test_error_on_a_later_line_points_at_that_line() -> None:
    with pytest.raises(soql.SoqlError) as caught:
        soql.parse("SELECT Id\nFROM Account\nWHERE Name = = 'x'")

    assert caught.value.message.startswith(
        "\nWHERE Name = = 'x'\n             ^\nERROR at Row:3:Column:14\n"
    )


def test_offset_above_2000_is_refused() -> None:
    with pytest.raises(soql.SoqlError) as caught:
        soql.parse("SELECT Id FROM Account OFFSET 2001")

    assert caught.value.code == "NUMBER_OUTSIDE_VALID_RANGE"


def test_illegal_escape_is_malformed() -> None:
    with pytest.raises(soql.SoqlError) as caught:
        soql.parse("SELECT Id FROM Account WHERE Name = 'a\\qb'")

    assert caught.value.code == "MALFORMED_QUERY"


# -- schema validation ---------------------------------------------------------


def test_unknown_object_is_invalid_type_with_caret() -> None:
    with pytest.raises(soql.SoqlError) as caught:
        run("SELECT Id FROM Widget")

    assert caught.value.code == "INVALID_TYPE"
    assert caught.value.message == (
        "\nSELECT Id FROM Widget\n               ^\nERROR at Row:1:Column:16\n"
        "sObject type 'Widget' is not supported. If you are attempting to use a "
        "custom object, be sure to append the '__c' after the entity name. Please "
        "reference your WSDL or the describe call for the appropriate names."
    )


@pytest.mark.parametrize(
    ("text", "column"),
    [
        ("SELECT Id, FullName FROM Account", 12),
        ("SELECT Id FROM Account WHERE FullName = 'x'", 30),
        ("SELECT Id FROM Account ORDER BY FullName", 33),
    ],
)
def test_unknown_field_is_invalid_field_with_caret(text: str, column: int) -> None:
    with pytest.raises(soql.SoqlError) as caught:
        run(text)

    assert caught.value.code == "INVALID_FIELD"
    assert caught.value.message == (
        f"\n{text}\n{' ' * (column - 1)}^\nERROR at Row:1:Column:{column}\n"
        "No such column 'FullName' on entity 'Account'. If you are attempting to "
        "use a custom field, be sure to append the '__c' after the custom field "
        "name. Please reference your WSDL or the describe call for the appropriate "
        "names."
    )


@pytest.mark.parametrize(
    ("condition", "fragment"),
    [
        ("Name = 5", "field 'Name' must be of type string and should be enclosed"),
        (
            "NumberOfEmployees = '5'",
            "field 'NumberOfEmployees' must be of type integer and should not be",
        ),
        ("AnnualRevenue = '5'", "must be of type double and should not be enclosed"),
        ("Active__c = 'true'", "must be of type boolean and should not be enclosed"),
        ("CreatedDate = 2024-01-01", "must be of type dateTime and should not be"),
        ("LastActivityDate = 2024-01-01T00:00:00Z", "must be of type date and"),
        ("Name = TODAY", "must be of type string"),
    ],
)
def test_literal_of_wrong_type_is_invalid_field(condition: str, fragment: str) -> None:
    with pytest.raises(soql.SoqlError) as caught:
        run(f"SELECT Id FROM Account WHERE {condition}")

    assert caught.value.code == "INVALID_FIELD"
    assert "\nvalue of filter criterion for field '" in caught.value.message
    assert fragment in caught.value.message


def test_malformed_id_literal_is_refused() -> None:
    with pytest.raises(soql.SoqlError) as caught:
        run("SELECT Id FROM Account WHERE Id = 'nope'")

    assert caught.value.code == "INVALID_QUERY_FILTER_OPERATOR"
    assert caught.value.message.endswith("invalid ID field: nope")


def test_compound_field_cannot_be_filtered() -> None:
    with pytest.raises(soql.SoqlError) as caught:
        run("SELECT Id FROM Account WHERE BillingAddress = null")

    assert caught.value.code == "INVALID_FIELD"


def test_relationship_paths_are_refused_as_unknown_relationships() -> None:
    with pytest.raises(soql.SoqlError) as caught:
        run("SELECT Parent.Name FROM Account")

    assert caught.value.code == "INVALID_FIELD"
    assert "Didn't understand relationship 'Parent'" in caught.value.message


def test_duplicate_field_is_refused() -> None:
    with pytest.raises(soql.SoqlError) as caught:
        run("SELECT Id, Name, name FROM Account")

    assert caught.value.message.endswith("duplicate field selected: name")


def test_fields_all_needs_a_limit_of_at_most_200() -> None:
    with pytest.raises(soql.SoqlError) as caught:
        run("SELECT FIELDS(ALL) FROM Account")

    assert caught.value.code == "MALFORMED_QUERY"
    assert caught.value.message == (
        "The SOQL FIELDS function must have a LIMIT of at most 200"
    )


# -- selection -----------------------------------------------------------------


def test_select_returns_canonical_names_and_attributes() -> None:
    rows = run("SELECT id, NAME FROM account WHERE Name = 'Acme'")

    assert rows == [
        {
            "attributes": {
                "type": "Account",
                "url": f"/services/data/v62.0/sobjects/Account/{RECORDS[0]['Id']}",
            },
            "Id": RECORDS[0]["Id"],
            "Name": "Acme",
        }
    ]


def test_object_name_and_alias_may_prefix_fields() -> None:
    rows = run("SELECT a.Name, Account.Industry FROM Account a WHERE a.Name = 'Acme'")

    assert [(r["Name"], r["Industry"]) for r in rows] == [("Acme", "Energy")]


def test_compound_address_comes_nested_and_components_flat() -> None:
    rows = run(
        "SELECT BillingAddress, BillingCity FROM Account ORDER BY Name NULLS LAST"
    )

    assert rows[0]["BillingAddress"] == {
        "city": "Paris",
        "country": "France",
        "postalCode": None,
        "state": None,
        "street": None,
    }
    assert rows[0]["BillingCity"] == "Paris"
    assert all(r["BillingAddress"] is None for r in rows[1:])


def test_fields_standard_and_custom_split_by_suffix() -> None:
    standard = run("SELECT FIELDS(STANDARD) FROM Account WHERE Name = 'Acme'")[0]
    custom = run("SELECT FIELDS(CUSTOM) FROM Account WHERE Name = 'Acme' LIMIT 1")[0]

    assert "Name" in standard
    assert "BillingAddress" in standard
    assert "Active__c" not in standard
    assert set(custom) == {"attributes", "Active__c", "Regions__c"}


def test_values_keep_their_wire_form() -> None:
    row = run(
        "SELECT CreatedDate, LastActivityDate, AnnualRevenue, NumberOfEmployees, "
        "Active__c FROM Account WHERE Name = 'Acme'"
    )[0]

    assert row["CreatedDate"] == "2024-06-05T09:00:00.000+0000"
    assert row["LastActivityDate"] == "2024-06-04"
    assert row["AnnualRevenue"] == 5e6
    assert row["NumberOfEmployees"] == 120
    assert row["Active__c"] is True


def test_python_datetimes_in_records_are_rendered_as_rest_does() -> None:
    record = _account(
        9, Name="Py", CreatedDate=datetime(2024, 6, 4, 12, 0, 0, 123456, tzinfo=UTC)
    )

    rows = soql.execute(
        soql.parse(
            "SELECT CreatedDate FROM Account WHERE CreatedDate > 2024-06-04T11:59:59Z"
        ),
        make_schema(),
        [record],
        include_deleted=False,
    )

    assert rows[0]["CreatedDate"] == "2024-06-04T12:00:00.123+0000"


# -- filtering -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("condition", "predicate"),
    [
        ("Name = 'ACME'", lambda r: fold(r["Name"]) == "acme"),
        ("Name != 'acme'", lambda r: fold(r["Name"]) != "acme"),
        ("Name <> 'acme'", lambda r: fold(r["Name"]) != "acme"),
        ("Name = null", lambda r: r["Name"] is None),
        ("Name != null", lambda r: r["Name"] is not None),
        ("Name = ''", lambda r: r["Name"] is None),
        ("Name > 'b'", lambda r: r["Name"] is not None and fold(r["Name"]) > "b"),
        (
            "Name <= 'Acme'",
            lambda r: r["Name"] is not None and fold(r["Name"]) <= "acme",
        ),
        (
            "Industry IN ('energy', 'MEDIA')",
            lambda r: fold(r["Industry"]) in ("energy", "media"),
        ),
        ("Industry NOT IN ('energy')", lambda r: fold(r["Industry"]) != "energy"),
        ("Industry IN ('Media', null)", lambda r: r["Industry"] in ("Media", None)),
        (
            "AnnualRevenue > 100000",
            lambda r: r["AnnualRevenue"] is not None and r["AnnualRevenue"] > 1e5,
        ),
        (
            "AnnualRevenue >= 100000",
            lambda r: r["AnnualRevenue"] is not None and r["AnnualRevenue"] >= 1e5,
        ),
        (
            "AnnualRevenue < 100000.0",
            lambda r: r["AnnualRevenue"] is not None and r["AnnualRevenue"] < 1e5,
        ),
        ("AnnualRevenue != 0", lambda r: r["AnnualRevenue"] != 0),
        ("NumberOfEmployees = 8", lambda r: r["NumberOfEmployees"] == 8),
        ("NumberOfEmployees < null", lambda r: False),
        ("Active__c = true", lambda r: r["Active__c"]),
        ("Active__c = FALSE", lambda r: not r["Active__c"]),
        (
            "CreatedDate >= 2024-06-04T23:59:59Z",
            lambda r: r["CreatedDate"] >= "2024-06-04T23:59:59",
        ),
        (
            "CreatedDate < 2024-06-05T01:00:00+02:00",
            lambda r: r["CreatedDate"] < "2024-06-04T23:00:00",
        ),
        (
            "LastActivityDate = 2024-06-04",
            lambda r: r["LastActivityDate"] == "2024-06-04",
        ),
        (
            "LastActivityDate < 2024-06-04",
            lambda r: (
                r["LastActivityDate"] is not None
                and r["LastActivityDate"] < "2024-06-04"
            ),
        ),
        (
            "Regions__c = 'apac;emea'",
            lambda r: (
                r["Regions__c"] is not None
                and set(r["Regions__c"].split(";")) == {"APAC", "EMEA"}
            ),
        ),
        (
            "Regions__c INCLUDES ('APAC')",
            lambda r: "APAC" in (r["Regions__c"] or "").split(";"),
        ),
        (
            "Regions__c INCLUDES ('AMER;APAC', 'EMEA;x')",
            lambda r: {"AMER", "APAC"} <= set((r["Regions__c"] or "").split(";")),
        ),
        (
            "Regions__c EXCLUDES ('EMEA')",
            lambda r: "EMEA" not in (r["Regions__c"] or "").split(";"),
        ),
    ],
)
def test_operators_match_salesforce_semantics(
    condition: str, predicate: Callable[[Mapping[str, Any]], bool]
) -> None:
    rows = run(f"SELECT Id FROM Account WHERE {condition}")

    assert ids_of(rows) == expect(predicate)


@pytest.mark.parametrize(
    ("pattern", "regex_like"),
    [
        ("acme%", lambda n: n.lower().startswith("acme")),
        ("%CORP", lambda n: n.lower().endswith("corp")),
        ("%e%", lambda n: "e" in n.lower()),
        (
            "a_me",
            lambda n: len(n) == 4 and n.lower()[0] == "a" and n.lower()[2:] == "me",
        ),
        ("Globex\\_%", lambda n: n.startswith("Globex_")),
        ("%100\\%", lambda n: n.endswith("100%")),
        ("%", lambda n: True),
    ],
)
def test_like_is_case_insensitive_with_wildcards_and_escapes(
    pattern: str, regex_like: Callable[[str], bool]
) -> None:
    rows = run(f"SELECT Id FROM Account WHERE Name LIKE '{pattern}'")

    assert ids_of(rows) == expect(
        lambda r: r["Name"] is not None and regex_like(r["Name"])
    )


def test_not_like_matches_nulls() -> None:
    rows = run("SELECT Id FROM Account WHERE NOT Name LIKE 'acme%'")

    assert ids_of(rows) == expect(
        lambda r: r["Name"] is None or not r["Name"].lower().startswith("acme")
    )


def test_boolean_logic_with_parentheses_and_not() -> None:
    rows = run(
        "SELECT Id FROM Account WHERE (Industry = 'Media' OR AnnualRevenue > 1000000) "
        "AND NOT (NumberOfEmployees = null OR NumberOfEmployees > 1000)"
    )

    assert ids_of(rows) == expect(
        lambda r: (
            (fold(r["Industry"]) == "media" or (r["AnnualRevenue"] or 0) > 1e6)
            and not (r["NumberOfEmployees"] is None or r["NumberOfEmployees"] > 1000)
        )
    )


def test_ids_match_in_15_and_18_character_forms_case_insensitively_for_18() -> None:
    target = RECORDS[0]["Id"]

    by_18 = run(f"SELECT Id FROM Account WHERE Id = '{target}'")
    by_15 = run(f"SELECT Id FROM Account WHERE Id = '{target[:15]}'")
    by_lower_18 = run(f"SELECT Id FROM Account WHERE Id = '{target.lower()}'")
    by_lower_15 = run(f"SELECT Id FROM Account WHERE Id = '{target[:15].lower()}'")
    children = run(f"SELECT Id FROM Account WHERE ParentId IN ('{target[:15]}')")

    assert ids_of(by_18) == ids_of(by_15) == ids_of(by_lower_18) == [target]
    assert by_lower_15 == []
    assert ids_of(children) == expect(lambda r: r["ParentId"] == target)


# -- date literals -------------------------------------------------------------


def _created(r: Mapping[str, Any]) -> datetime:
    return datetime.strptime(r["CreatedDate"], "%Y-%m-%dT%H:%M:%S.%f%z")


@pytest.mark.parametrize(
    ("literal", "start", "end"),
    [
        ("TODAY", TODAY, TODAY + timedelta(days=1)),
        ("YESTERDAY", TODAY - timedelta(days=1), TODAY),
        ("TOMORROW", TODAY + timedelta(days=1), TODAY + timedelta(days=2)),
        ("LAST_N_DAYS:1", TODAY - timedelta(days=1), TODAY + timedelta(days=1)),
        ("LAST_N_DAYS:30", TODAY - timedelta(days=30), TODAY + timedelta(days=1)),
        ("THIS_WEEK", date(2024, 6, 2), date(2024, 6, 9)),
        ("THIS_MONTH", date(2024, 6, 1), date(2024, 7, 1)),
        ("LAST_MONTH", date(2024, 5, 1), date(2024, 6, 1)),
        ("THIS_YEAR", date(2024, 1, 1), date(2025, 1, 1)),
        ("LAST_YEAR", date(2023, 1, 1), date(2024, 1, 1)),
        ("N_DAYS_AGO:1", TODAY - timedelta(days=1), TODAY),
    ],
)
def test_date_literals_are_utc_day_ranges_on_datetimes(
    literal: str, start: date, end: date
) -> None:
    low = datetime(start.year, start.month, start.day, tzinfo=UTC)
    high = datetime(end.year, end.month, end.day, tzinfo=UTC)

    equal = run(f"SELECT Id FROM Account WHERE CreatedDate = {literal}")
    before = run(f"SELECT Id FROM Account WHERE CreatedDate < {literal}")
    after = run(f"SELECT Id FROM Account WHERE CreatedDate > {literal}")

    assert ids_of(equal) == expect(lambda r: low <= _created(r) < high)
    assert ids_of(before) == expect(lambda r: _created(r) < low)
    assert ids_of(after) == expect(lambda r: _created(r) >= high)


def test_date_literals_compare_dates_on_date_fields() -> None:
    rows = run("SELECT Id FROM Account WHERE LastActivityDate = YESTERDAY")
    later = run("SELECT Id FROM Account WHERE LastActivityDate >= LAST_N_DAYS:7")

    assert ids_of(rows) == expect(lambda r: r["LastActivityDate"] == "2024-06-04")
    assert ids_of(later) == expect(
        lambda r: (
            r["LastActivityDate"] is not None and r["LastActivityDate"] >= "2024-05-29"
        )
    )


# -- order, limit, offset, count, deleted --------------------------------------


def _sorted(key: str, *, reverse: bool, nulls_last: bool) -> list[str]:
    present = [r for r in LIVE if r[key] is not None]
    absent = [r for r in LIVE if r[key] is None]
    present.sort(key=lambda r: fold(r[key]), reverse=reverse)
    ordered = present + absent if nulls_last else absent + present
    return [r["Id"] for r in ordered]


@pytest.mark.parametrize(
    ("clause", "reverse", "nulls_last"),
    [
        ("Name", False, False),
        ("Name ASC", False, False),
        ("Name DESC", True, False),
        ("Name ASC NULLS LAST", False, True),
        ("Name DESC NULLS LAST", True, True),
        ("Name desc nulls first", True, False),
    ],
)
def test_order_by_is_case_insensitive_with_nulls_first_by_default(
    clause: str, reverse: bool, nulls_last: bool
) -> None:
    rows = run(f"SELECT Id FROM Account ORDER BY {clause}")

    assert ids_of(rows) == _sorted("Name", reverse=reverse, nulls_last=nulls_last)


def test_order_by_several_keys() -> None:
    rows = run(
        "SELECT Id FROM Account ORDER BY Industry NULLS LAST, AnnualRevenue DESC"
    )

    def key(r: Mapping[str, Any]) -> tuple[Any, ...]:
        industry = fold(r["Industry"])
        revenue = r["AnnualRevenue"]
        return (industry is None, industry or "", revenue is not None, -(revenue or 0))

    assert ids_of(rows) == [r["Id"] for r in sorted(LIVE, key=key)]


def test_limit_and_offset_slice_the_ordered_result() -> None:
    rows = run("SELECT Id FROM Account ORDER BY NumberOfEmployees LIMIT 2 OFFSET 1")

    ordered = _sorted("NumberOfEmployees", reverse=False, nulls_last=False)
    assert ids_of(rows) == ordered[1:3]


def test_count_returns_one_row_per_match_without_fields() -> None:
    rows = run("SELECT COUNT() FROM Account WHERE Industry = 'energy'")

    assert len(rows) == len(expect(lambda r: fold(r["Industry"]) == "energy"))
    assert all(set(row) == {"attributes"} for row in rows)


def test_deleted_records_only_with_include_deleted() -> None:
    live = run("SELECT Id FROM Account")
    every = run("SELECT Id, IsDeleted FROM Account", include_deleted=True)
    binned = run("SELECT Id FROM Account WHERE IsDeleted = true", include_deleted=True)

    assert ids_of(live) == [r["Id"] for r in LIVE]
    assert ids_of(every) == [r["Id"] for r in RECORDS]
    assert ids_of(binned) == [r["Id"] for r in RECORDS if r["IsDeleted"]]
