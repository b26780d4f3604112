"""Validation rules on unified fields: each rule, partial changes, adding a rule."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from replicator.mapping import validation
from replicator.mapping.config import ValidateRule
from replicator.mapping.validation import (
    Violation,
    compile_rule,
    register_rule,
    validate,
)


def _rules(*pairs: tuple[str, str]) -> list[ValidateRule]:
    return [ValidateRule(field=field, rule=rule) for field, rule in pairs]


def test_valid_record_has_no_violations() -> None:
    rules = _rules(
        ("company_name", "required"),
        ("email", "email"),
        ("phone", "phone"),
        ("discount", "range(0,1)"),
        ("rating", "picklist(Hot, Warm, Cold)"),
        ("customer_id", "regex(^[A-Z]{5}$)"),
    )
    record = {
        "company_name": "Alfreds Futterkiste",
        "email": "maria@alfreds.de",
        "phone": "030-0074321",
        "discount": Decimal("0.15"),
        "rating": "Warm",
        "customer_id": "ALFKI",
    }

    assert validate(record, rules) == []


@pytest.mark.parametrize(
    ("field", "rule", "value", "message"),
    [
        ("company_name", "required", "  ", "required field is empty"),
        ("company_name", "required", None, "required field is empty"),
        ("email", "email", "maria@", "not an email address"),
        ("email", "email", "maria at alfreds.de", "not an email address"),
        ("phone", "phone", "call me", "not a phone number"),
        ("phone", "phone", "555-12", "a phone number has 7 to 15 digits, not 5"),
        ("discount", "range(0,1)", 1.5, "outside range(0,1)"),
        ("discount", "range(0,1)", "lots", "not a finite number"),
        ("discount", "range(0,1)", float("nan"), "not a finite number"),
        ("stock", "range(0,)", -1, "outside range(0,)"),
        (
            "rating",
            "picklist(Hot, Warm, Cold)",
            "Tepid",
            "not one of the picklist values",
        ),
        ("customer_id", "regex(^[A-Z]{5}$)", "alfki", "does not match ^[A-Z]{5}$"),
        ("city", "max_length(15)", "Frankfurt am Main", "longer than 15 characters"),
    ],
)
def test_each_rule_reports_its_violation(
    field: str, rule: str, value: Any, message: str
) -> None:
    violations = validate({field: value}, _rules((field, rule)))

    assert violations == [Violation(field, rule, value, message)]


@pytest.mark.parametrize(
    "phone",
    ["(5) 555-4729", "0921-12 34 65", "88.60.15.31", "(171) 555-7788", "+49 30 1234567",
     "(071) 23 67 22 20", "555-1234 ext. 12"],
)  # fmt: skip
def test_northwind_phone_formats_pass(phone: str) -> None:
    assert validate({"phone": phone}, _rules(("phone", "phone"))) == []


def test_absent_fields_are_not_checked_in_a_partial_change() -> None:
    rules = _rules(("company_name", "required"), ("email", "email"))

    assert validate({"city": "Berlin"}, rules) == []


def test_absent_required_field_fails_a_complete_record() -> None:
    rules = _rules(("company_name", "required"), ("email", "email"))

    violations = validate({"city": "Berlin"}, rules, complete=True)

    assert violations == [
        Violation("company_name", "required", None, "required field is missing")
    ]


def test_null_fails_only_required() -> None:
    rules = _rules(("email", "email"), ("discount", "range(0,1)"))

    assert validate({"email": None, "discount": None}, rules) == []


def test_regex_keeps_its_commas() -> None:
    rules = _rules(("code", "regex(^[A-Z]{2,3}$)"))

    assert validate({"code": "ABC"}, rules) == []
    assert len(validate({"code": "ABCD"}, rules)) == 1


def test_several_violations_are_all_reported() -> None:
    rules = _rules(("email", "email"), ("phone", "phone"), ("email", "max_length(5)"))

    violations = validate({"email": "nope", "phone": "x"}, rules)

    assert [(v.field, v.rule) for v in violations] == [
        ("email", "email"),
        ("phone", "phone"),
    ]


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ("luhn", "unknown validation rule 'luhn'"),
        ("range(5,1)", "is empty"),
        ("range(a,1)", "not a number"),
        ("range(,)", "write range"),
        ("regex([)", "does not compile"),
        ("picklist()", "needs its values"),
        ("email(strict)", "takes no arguments"),
        ("max_length(ten)", "whole number"),
    ],
)
def test_bad_rules_are_refused_when_compiled(rule: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compile_rule("field", rule)


def test_a_registered_rule_is_used_by_name() -> None:
    @register_rule("postal_de_test")
    def _postal_de(spec: Any) -> validation.Check:
        def check(value: Any) -> str | None:
            return None if str(value).isdigit() and len(str(value)) == 5 else "bad PLZ"

        return check

    try:
        rules = _rules(("postal_code", "postal_de_test"))

        assert validate({"postal_code": "12209"}, rules) == []
        assert validate({"postal_code": "1220"}, rules)[0].message == "bad PLZ"
        assert "postal_de_test" in validation.rule_names()
    finally:
        validation._RULES.pop("postal_de_test")
        compile_rule.cache_clear()
