"""Duplicate matching: normalisation and the none / single / many outcome."""

from __future__ import annotations

from typing import Any

import pytest

from replicator.mapping.config import MatchRule
from replicator.mapping.matching import (
    match,
    match_key,
    normalise_company,
    normalise_email,
    normalise_phone,
    normalise_postal,
    normaliser_for,
)

COMPANY_POSTAL = MatchRule(fields=("company_name", "postal_code"))
EMAIL = MatchRule(fields=("email",))
PHONE = MatchRule(fields=("phone",))


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("Alfreds Futterkiste", "ALFREDS FUTTERKISTE GmbH"),
        ("Antonio Moreno Taquería", "antonio moreno taqueria"),
        ("Blauer See Delikatessen", "Blauer See Delikatessen G.m.b.H."),
        ("Bólido Comidas preparadas", "Bolido Comidas Preparadas, S.A."),
        ("Around the Horn", "Around the Horn Ltd."),
        ("Great Lakes Food Market", "Great Lakes Food Market, Inc."),
        ("Ernst Handel", "Ernst Handel AG"),
        ("Die Wandernde Kuh", "Die Wandernde Kuh GmbH & Co. KG"),
        ("Rancho grande", "Rancho Grande S.A. de C.V."),
        ("The Cracker Box", "Cracker Box"),
        ("Königlich Essen", "Koniglich Essen"),
    ],
)
def test_company_names_normalise_alike(left: str, right: str) -> None:
    assert normalise_company(left) == normalise_company(right)


def test_company_normalisation_keeps_a_name_that_is_only_a_suffix() -> None:
    assert normalise_company("Co") == "co"
    assert normalise_company("  ") is None


def test_other_normalisers() -> None:
    assert normalise_postal("wa1 1dp") == normalise_postal("WA11DP") == "WA11DP"
    assert normalise_postal("05432-043") == "05432043"
    assert normalise_phone("(171) 555-7788") == "1715557788"
    assert normalise_phone("n/a") is None
    assert normalise_email("  Maria@Alfreds.DE ") == "maria@alfreds.de"


def test_normaliser_is_chosen_by_field_name_or_explicitly() -> None:
    assert normaliser_for("company_name") is normalise_company
    assert normaliser_for("billing_postal_code") is normalise_postal
    assert normaliser_for("fax") is normalise_phone
    assert normaliser_for("contact_email") is normalise_email
    assert normaliser_for("customer_code", "postal") is normalise_postal
    assert normaliser_for("city")("  São   Paulo ") == "sao paulo"


def test_one_candidate_is_a_single_match() -> None:
    record = {"company_name": "Alfreds Futterkiste", "postal_code": "12209"}
    candidates = [
        {
            "id": "001A",
            "company_name": "ALFREDS FUTTERKISTE GmbH",
            "postal_code": "12209",
        },
        {"id": "001B", "company_name": "Alfreds Futterkiste", "postal_code": "12208"},
    ]

    result = match(record, candidates, [COMPANY_POSTAL])

    assert result.kind == "single"
    assert [c["id"] for c in result.candidates] == ["001A"]
    assert result.rule == 0


def test_two_candidates_are_many() -> None:
    record = {"company_name": "Alfreds Futterkiste", "postal_code": "12209"}
    candidates = [
        {
            "id": "001A",
            "company_name": "ALFREDS FUTTERKISTE GmbH",
            "postal_code": "12209",
        },
        {
            "id": "001C",
            "company_name": "Alfreds Futterkiste Ltd",
            "postal_code": "122 09",
        },
    ]

    result = match(record, candidates, [COMPANY_POSTAL])

    assert result.kind == "many"
    assert {c["id"] for c in result.candidates} == {"001A", "001C"}


def test_no_candidate_is_none() -> None:
    record = {"company_name": "Alfreds Futterkiste", "postal_code": "12209"}

    result = match(record, [{"company_name": "Ernst Handel", "postal_code": "8010"}],
                   [COMPANY_POSTAL])  # fmt: skip

    assert result.kind == "none"
    assert result.candidates == ()
    assert result.rule is None


def test_rules_are_tried_in_order_and_skip_missing_fields() -> None:
    """A record without a postal code cannot use the first rule; email decides."""
    record: dict[str, Any] = {
        "company_name": "Alfreds", "postal_code": None, "email": "Maria@Alfreds.de",
    }  # fmt: skip
    candidates: list[dict[str, Any]] = [
        {"id": "1", "company_name": "Alfreds", "postal_code": None, "email": "x@y.z"},
        {"id": "2", "company_name": "Other", "email": "maria@alfreds.de"},
    ]

    result = match(record, candidates, [COMPANY_POSTAL, EMAIL, PHONE])

    assert result.kind == "single"
    assert result.candidates[0]["id"] == "2"
    assert result.rule == 1


def test_empty_values_never_match_each_other() -> None:
    record = {"phone": "n/a"}
    candidates: list[dict[str, Any]] = [{"phone": None}, {"phone": "--"}]

    assert match(record, candidates, [PHONE]).kind == "none"


def test_explicit_normaliser_overrides_the_name() -> None:
    rule = MatchRule(fields=("code",), normalize={"code": "phone"})

    assert match_key({"code": "AB-12 3"}, rule) == ("123",)
