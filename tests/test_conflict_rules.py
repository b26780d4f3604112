"""Resolution rules, versions and echoes of the two-way sync (pure, no I/O).

The cases follow fixture F0 of ../shared/cases/field-failures.md: customer
C-1001 (Account 001Dn00000AbCdEIAV) and the policies P1-P4, with the times of
the cases (2024-06-04T12:00:00Z = 1717502400000 ms).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal

import pytest

import replicator.conflict as conflict
from replicator.conflict import (
    Change,
    Conflict,
    EntityRule,
    FieldRule,
    FieldState,
    PendingWrite,
    Resolution,
    UnifiedState,
    Version,
    delete_effect,
    is_gone,
    is_own_origin,
    resolve,
    split_echoes,
    values_equal,
    version_from_json,
    version_key,
    version_to_json,
)
from replicator.errors import ConfigError, InvariantError

T0 = datetime(2024, 6, 4, 12, 0, 0, tzinfo=UTC)  # 1717502400000 ms
KEY = "C-1001"

# P1: the ERP owns customer_code, credit_limit and existence; Salesforce owns
# industry and rating; the rest is shared (LWW). P3: an ERP delete deletes the
# Account, a Salesforce delete flags the customer for review.
CUSTOMER = EntityRule(
    name="customer",
    fields={
        "customer_code": FieldRule("customer_code", owner="erp"),
        "credit_limit": FieldRule("credit_limit", owner="erp", enforce=True),
        "industry": FieldRule("industry", owner="salesforce"),
        "rating": FieldRule("rating", owner="salesforce"),
        "name": FieldRule("name"),
        "phone": FieldRule("phone"),
        "notes": FieldRule("notes"),
        "attributes": FieldRule("attributes", json=True),
    },
    owner=None,
    delete_policy="propagate",
    existence_owner="erp",
)

# Baseline B0 for C-1001, as loaded before the case (an ERP snapshot).
B0 = {
    "customer_code": "C-1001",
    "name": "Acme Tools",
    "phone": "555-0100",
    "industry": "Machinery",
    "rating": "Warm",
    "credit_limit": "2500.00",
    "attributes": '{"tier": "silver"}',
}
B0_VERSION = Version(datetime(2024, 6, 1, tzinfo=UTC), "erp", "0/1000000")
# Both systems held B0 when they were linked: an owned field carries its
# owner's version (the owner holds the value), the others the ERP's.
B0_SF_VERSION = Version(datetime(2024, 6, 1, tzinfo=UTC), "salesforce", "1")
B0_STATE = UnifiedState(
    {
        f: FieldState(
            v, B0_SF_VERSION if CUSTOMER.owner_of(f) == "salesforce" else B0_VERSION
        )
        for f, v in B0.items()
    }
)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


Op = Literal["upsert", "delete"]


def erp(seconds: float, lsn: str, op: Op = "upsert", **fields: Any) -> Change:
    return Change("erp", op, fields, Version(at(seconds), "erp", lsn))


def sf(seconds: float, replay: int, op: Op = "upsert", **fields: Any) -> Change:
    version = Version(at(seconds), "salesforce", str(replay))
    return Change("salesforce", op, fields, version)


def fold(
    changes: Iterable[Change],
    rule: EntityRule = CUSTOMER,
    state: UnifiedState | None = B0_STATE,
) -> tuple[UnifiedState, list[Resolution]]:
    results = []
    for change in changes:
        result = resolve(state, change, rule)
        results.append(result)
        state = result.state
    assert state is not None
    return state, results


def values(state: UnifiedState) -> dict[str, Any]:
    return {name: held.value for name, held in state.fields.items()}


def conflicts_of(results: Iterable[Resolution]) -> list[Conflict]:
    return [c for r in results for c in r.conflicts]


# Ownership (P1)


def test_first_value_of_a_field_is_accepted() -> None:
    change = erp(0, "0/2000000", name="Acme")

    result = resolve(None, change, CUSTOMER)

    assert result.accepted == {"name": "Acme"}
    assert result.state.fields["name"] == FieldState("Acme", change.version)
    assert result.conflicts == ()


def test_non_owner_change_to_owned_field_is_logged_not_applied() -> None:
    """P1: the ERP owns credit_limit, so a Salesforce edit never reaches it."""
    change = sf(10, 101, credit_limit="9999.00")

    result = resolve(B0_STATE, change, CUSTOMER)

    assert result.state == B0_STATE
    assert result.accepted == {}
    assert result.conflicts == (
        Conflict(
            "credit_limit", "2500.00", B0_VERSION, "9999.00", change.version, "owner"
        ),
    )


def test_enforced_owner_field_writes_owner_value_back() -> None:
    """With enforce the owner's value is written back to the non-owner."""
    result = resolve(B0_STATE, sf(10, 101, credit_limit="9999.00"), CUSTOMER)

    assert result.enforce == {"credit_limit": "2500.00"}


def test_unenforced_owner_field_writes_nothing_back() -> None:
    result = resolve(B0_STATE, erp(10, "0/2000000", industry="Robotics"), CUSTOMER)

    assert result.enforce == {}
    assert [c.rule for c in result.conflicts] == ["owner"]
    assert values(result.state)["industry"] == "Machinery"


def test_owner_change_wins_even_when_older_than_non_owner_change() -> None:
    state, results = fold(
        [
            sf(60, 101, credit_limit="9999.00"),
            erp(0, "0/2000000", credit_limit="3000.00"),
        ]
    )

    assert values(state)["credit_limit"] == "3000.00"
    assert results[1].accepted == {"credit_limit": "3000.00"}


def test_non_owner_value_equal_to_owner_value_logs_nothing() -> None:
    result = resolve(B0_STATE, sf(10, 101, credit_limit="2500.0"), CUSTOMER)

    assert result.conflicts == ()
    assert result.enforce == {}


def test_entity_owner_owns_fields_without_an_owner() -> None:
    rule = EntityRule("product", {}, owner="erp", delete_policy="propagate")

    first = resolve(None, sf(0, 101, price="12.50"), rule)
    # the owner's later value, and an older one, both beat the other system's
    owned = resolve(first.state, erp(-5, "0/1", price="11.00"), rule)
    after = resolve(owned.state, sf(9, 102, price="13.00"), rule)

    # until the owner sets it, the other system's value fills the field
    assert first.state.fields["price"].value == "12.50"
    assert first.conflicts == ()
    assert owned.state.fields["price"].value == "11.00"
    assert [(c.field, c.rule, c.discarded_value) for c in owned.conflicts] == [
        ("price", "owner", "12.50")
    ]
    assert after.state.fields["price"].value == "11.00"
    assert [(c.rule, c.discarded_value) for c in after.conflicts] == [
        ("owner", "13.00")
    ]


def test_rule_with_owner_outside_its_sources_is_refused() -> None:
    with pytest.raises(ConfigError, match="'sap' is not one of its sources"):
        EntityRule("x", {"a": FieldRule("a", owner="sap")}, None, "mark")


def test_one_way_entity_keeps_the_default_precedence() -> None:
    rule = EntityRule("price_list", {}, "erp", "propagate", sources=("erp",))

    assert rule.precedence == ("erp", "salesforce")


def test_change_from_unknown_source_is_an_invariant_error() -> None:
    change = Change("sap", "upsert", {"name": "x"}, Version(T0, "sap", "1"))

    with pytest.raises(InvariantError, match="'sap'"):
        resolve(None, change, CUSTOMER)


# Last writer wins, the tie rule and clocks (P2)


@pytest.mark.parametrize("reverse", [False, True])
def test_newer_commit_time_wins_in_either_order(reverse: bool) -> None:
    changes = [erp(0, "0/2000000", phone="555-0101"), sf(10, 101, phone="555-0199")]

    state, results = fold(reversed(changes) if reverse else changes)

    assert values(state)["phone"] == "555-0199"
    lost = [(c.discarded_value, c.rule) for c in conflicts_of(results)]
    assert ("555-0101", "lww") in lost


@pytest.mark.parametrize("reverse", [False, True])
def test_exact_tie_goes_to_the_erp(reverse: bool) -> None:
    """P2: on an exact tie of commit times the ERP wins."""
    changes = [erp(0, "0/2000000", name="Acme ERP"), sf(0, 101, name="Acme SF")]

    state, _ = fold(reversed(changes) if reverse else changes)

    assert values(state)["name"] == "Acme ERP"


@pytest.mark.parametrize("reverse", [False, True])
def test_later_salesforce_change_in_the_same_bucket_loses_to_the_erp(
    reverse: bool,
) -> None:
    """Inside one tie-window bucket precedence decides before time does."""
    changes = [erp(0.1, "0/2000000", name="Acme ERP"), sf(0.9, 101, name="Acme SF")]

    state, _ = fold(reversed(changes) if reverse else changes)

    assert values(state)["name"] == "Acme ERP"


def test_buckets_are_aligned_not_sliding() -> None:
    """1 ms apart across a bucket boundary is not a tie: the later change wins."""
    changes = [erp(0.999, "0/2000000", name="Acme ERP"), sf(1.0, 101, name="Acme SF")]

    state, _ = fold(changes)

    assert values(state)["name"] == "Acme SF"


def test_precedence_is_configurable() -> None:
    rule = EntityRule("c", {}, None, "mark", precedence=("salesforce", "erp"))

    state, _ = fold([erp(0, "0/2", name="E"), sf(0, 101, name="S")], rule, None)

    assert values(state)["name"] == "S"


def test_same_source_same_time_is_broken_by_position_numerically() -> None:
    """Replay id 10 follows 9, LSN 0/A follows 0/9: numbers, not text."""
    state, _ = fold([sf(0, 10, name="ten"), sf(0, 9, name="nine")])
    lsn_state, _ = fold([erp(0, "0/A", name="A"), erp(0, "0/9", name="9")])

    assert values(state)["name"] == "ten"
    assert values(lsn_state)["name"] == "A"


def test_positions_order_numbers_before_text() -> None:
    keys = sorted(["10a", "9", "10", "0/B", "abc"], key=conflict.position_key)

    assert keys == ["9", "10", "0/B", "10a", "abc"]


def test_replaced_value_is_logged_whichever_arrives_first() -> None:
    """
    A value replaced by a newer one is discarded as surely as a late older one:
    both orders log 555-0101, so the log does not depend on arrival order.
    """
    older, newer = erp(0, "0/2", phone="555-0101"), sf(10, 101, phone="555-0199")

    _, in_order = fold([older, newer], state=None)
    _, late = fold([newer, older], state=None)

    assert (
        conflicts_of(in_order)
        == conflicts_of(late)
        == [
            Conflict(
                "phone", "555-0199", newer.version, "555-0101", older.version, "lww"
            )
        ]
    )


def test_duplicate_change_decides_nothing() -> None:
    change = sf(10, 101, phone="555-0199")
    state, _ = fold([change])

    again = resolve(state, change, CUSTOMER)

    assert again.state == state
    assert (again.accepted, again.conflicts) == ({}, ())


SKEW = timedelta(seconds=3)  # Salesforce's clock runs 3 s ahead of the ERP's


def skewed_sf(true_seconds: float, replay: int, **fields: Any) -> Change:
    return sf(true_seconds + SKEW.total_seconds(), replay, **fields)


@pytest.mark.parametrize("reverse", [False, True])
def test_skewed_clock_larger_than_the_window_misorders_close_edits(
    reverse: bool,
) -> None:
    """
    The skew assumption matters: with a 1 s window, a Salesforce clock 3 s ahead
    makes an edit 2 s older than the ERP's win, deterministically in any order.
    """
    changes = [skewed_sf(0, 101, name="SF, first"), erp(2, "0/2", name="ERP, later")]

    state, _ = fold(reversed(changes) if reverse else changes)

    assert values(state)["name"] == "SF, first"


@pytest.mark.parametrize("reverse", [False, True])
def test_window_sized_to_the_skew_lets_precedence_decide_close_edits(
    reverse: bool,
) -> None:
    """A 6 s window (> 3 s skew): edits that close are a tie, the ERP wins."""
    rule = EntityRule("customer", CUSTOMER.fields, None, "mark", tie_window=SKEW + SKEW)
    changes = [skewed_sf(0, 101, name="SF, first"), erp(2, "0/2", name="ERP, later")]

    state, _ = fold(reversed(changes) if reverse else changes, rule)

    assert values(state)["name"] == "ERP, later"


@pytest.mark.parametrize("reverse", [False, True])
def test_edits_further_apart_than_skew_and_window_follow_true_time(
    reverse: bool,
) -> None:
    """Truly later by more than skew + window: the later edit wins despite skew."""
    sf_later = [erp(0, "0/2", name="ERP"), skewed_sf(4.01, 101, name="SF")]
    erp_later = [skewed_sf(0, 102, name="SF"), erp(4.01, "0/3", name="ERP")]

    sf_state, _ = fold(reversed(sf_later) if reverse else sf_later)
    erp_state, _ = fold(reversed(erp_later) if reverse else erp_later)

    assert values(sf_state)["name"] == "SF"
    assert values(erp_state)["name"] == "ERP"


# Deletes (P3)


@pytest.mark.parametrize("reverse", [False, True])
def test_erp_delete_beats_a_newer_salesforce_update(reverse: bool) -> None:
    """P3: the record is gone; the update is logged with rule deleted."""
    changes = [erp(0, "0/2", "delete"), sf(10, 101, phone="555-0199")]

    state, results = fold(reversed(changes) if reverse else changes)

    assert is_gone(state, CUSTOMER)
    assert state.fields == {}
    assert state.deleted == changes[0].version
    lost = {(c.field, c.discarded_value, c.rule) for c in conflicts_of(results)}
    assert ("phone", "555-0199", "deleted") in lost
    assert ("name", "Acme Tools", "deleted") in lost
    assert results[-1].accepted == {}


@pytest.mark.parametrize("reverse", [False, True])
def test_salesforce_delete_marks_and_a_racing_erp_update_still_applies(
    reverse: bool,
) -> None:
    """P3: a Salesforce delete never deletes the ERP customer; it flags it."""
    changes = [sf(0, 101, "delete"), erp(10, "0/2", phone="555-0101")]

    state, results = fold(reversed(changes) if reverse else changes)

    assert delete_effect(changes[0].version, CUSTOMER) == "mark"
    assert not is_gone(state, CUSTOMER)
    assert state.deleted == changes[0].version
    assert values(state)["phone"] == "555-0101"
    assert [c.rule for c in conflicts_of(results)] == ["lww"]  # 555-0100 replaced


def test_erp_delete_propagates() -> None:
    assert delete_effect(erp(0, "0/2", "delete").version, CUSTOMER) == "propagate"


@pytest.mark.parametrize("reverse", [False, True])
def test_gone_delete_outranks_a_later_mark(reverse: bool) -> None:
    changes = [erp(0, "0/2", "delete"), sf(10, 101, "delete")]

    state, _ = fold(reversed(changes) if reverse else changes)

    assert is_gone(state, CUSTOMER)
    assert state.deleted == changes[0].version


@pytest.mark.parametrize("reverse", [False, True])
def test_propagate_without_existence_owner_lets_either_side_delete(
    reverse: bool,
) -> None:
    rule = EntityRule("contact", {}, None, "propagate")
    changes = [erp(10, "0/2", name="late"), sf(0, 101, "delete")]

    state, _ = fold(reversed(changes) if reverse else changes, rule)

    assert is_gone(state, rule)
    assert state.fields == {}


@pytest.mark.parametrize("reverse", [False, True])
def test_ignored_delete_leaves_the_unified_record_alone(reverse: bool) -> None:
    rule = EntityRule("note", {}, None, "ignore")
    changes = [erp(0, "0/2", "delete"), sf(10, 101, name="kept")]

    state, _ = fold(reversed(changes) if reverse else changes, rule)

    assert state.deleted is None
    assert values(state)["name"] == "kept"


# Equality (BUG-38 and numbers)


@pytest.mark.parametrize(
    ("a", "b", "json", "equal"),
    [
        (
            '{"tier":"gold","regions":["EU","US"]}',
            '{"tier": "gold", "regions": ["EU", "US"]}',
            True,
            True,
        ),
        ('{"a":1,"b":2}', '{"b": 2, "a": 1.0}', True, True),
        ('{"a":1,"a":2}', '{"a": 2}', True, True),
        ({"tier": "gold"}, '{"tier": "gold"}', True, True),
        ('{"regions":["EU","US"]}', '{"regions": ["US", "EU"]}', True, False),
        ('{"a":"1"}', '{"a": 1}', True, False),
        ("null", None, True, False),
        ("not json", "not json", True, True),
        ("10.0", "10.00", False, True),
        ("10", 10, False, True),
        (None, None, False, True),
        (Decimal("2500.00"), "2500.0", False, True),
        (2500.5, "2500.50", False, True),
        ("2500.00", "2500.01", False, False),
        ("03801", "3801", False, False),
        ("555-0100", "555-0100", False, True),
        (True, 1, False, False),
        ("Acme", "acme", False, False),
    ],
)
def test_values_equal(a: Any, b: Any, json: bool, equal: bool) -> None:
    assert values_equal(a, b, json=json) is equal
    assert values_equal(b, a, json=json) is equal


def test_semantically_equal_json_decides_nothing_and_writes_nothing() -> None:
    """BUG-38: the ERP's normalised jsonb is the same value, not a change."""
    state, _ = fold([sf(0, 101, attributes='{"tier":"gold","regions":["EU","US"]}')])
    normalised = '{"tier": "gold", "regions": ["EU", "US"]}'

    result = resolve(state, erp(1, "0/2", attributes=normalised), CUSTOMER)

    assert (result.accepted, result.conflicts, result.enforce) == ({}, (), {})


def test_numerically_equal_value_decides_nothing() -> None:
    result = resolve(B0_STATE, erp(10, "0/2", credit_limit="2500.0"), CUSTOMER)

    assert (result.accepted, result.conflicts) == ({}, ())


def test_newer_equal_value_takes_version_and_text_silently() -> None:
    """The register holds the newest version's text, so order cannot matter."""
    change = erp(10, "0/2", credit_limit="2500.0")

    result = resolve(B0_STATE, change, CUSTOMER)

    assert result.state.fields["credit_limit"] == FieldState("2500.0", change.version)


# Echoes (BUG-35, BUG-38, BUG-40) and origins (P4)


def write(
    field: str, value: Any, seconds: float, target: str = "salesforce"
) -> PendingWrite:
    return PendingWrite(target, KEY, field, value, at(seconds))


def test_bug35_echo_of_older_write_after_newer_change_does_not_revert() -> None:
    """
    BUG-35: ERP phone 555-0101 (12:00:00) then 555-0102 (12:00:05); the echo
    E1 of the first PATCH (12:00:06) arrives after the second change.
    """
    state, results = fold(
        [erp(0, "0/2", phone="555-0101"), erp(5, "0/3", phone="555-0102")]
    )
    pending = [write("phone", "555-0101", 0.1), write("phone", "555-0102", 5.1)]
    history = [values(r.state)["phone"] for r in results]

    genuine_e1, settled_e1 = split_echoes(
        {"phone": "555-0101"}, pending, json_fields=set()
    )
    left = [w for w in pending if w not in settled_e1]
    genuine_e2, settled_e2 = split_echoes(
        {"phone": "555-0102"}, left, json_fields=set()
    )

    assert history == ["555-0101", "555-0102"]
    assert (genuine_e1, settled_e1) == ({}, [pending[0]])
    assert (genuine_e2, settled_e2) == ({}, [pending[1]])
    assert values(state)["phone"] == "555-0102"


def test_bug35_coalesced_echo_settles_the_writes_it_overtook() -> None:
    pending = [write("phone", "555-0101", 0.1), write("phone", "555-0102", 5.1)]

    genuine, settled = split_echoes({"phone": "555-0102"}, pending, json_fields=set())

    assert (genuine, settled) == ({}, pending)


def test_bug35_unsuppressed_echo_would_be_a_newer_change() -> None:
    """Why echoes are split first: LWW alone takes E1 (12:00:06) as newest."""
    state, _ = fold([erp(0, "0/2", phone="555-0101"), erp(5, "0/3", phone="555-0102")])

    result = resolve(state, sf(6, 101, phone="555-0101"), CUSTOMER)

    assert result.accepted == {"phone": "555-0101"}


def test_bug38_normalised_json_echo_is_recognised() -> None:
    """BUG-38: the ERP echo of our compact JSON comes back normalised."""
    compact = '{"tier":"gold","regions":["EU","US"]}'
    state, results = fold([sf(0, 101, attributes=compact)])
    pending = [write("attributes", compact, 0.5, target="erp")]

    genuine, settled = split_echoes(
        {"attributes": '{"tier": "gold", "regions": ["EU", "US"]}'},
        pending,
        json_fields={"attributes"},
    )
    later = resolve(
        state,
        erp(300, "0/3", attributes='{"tier": "platinum", "regions": ["EU", "US"]}'),
        CUSTOMER,
    )

    assert results[0].accepted == {"attributes": compact}
    assert (genuine, settled) == ({}, pending)
    assert list(later.accepted) == ["attributes"]
    assert values_equal(
        later.accepted["attributes"],
        '{"tier":"platinum","regions":["EU","US"]}',
        json=True,
    )


def test_bug40_erp_echo_is_suppressed_and_the_other_field_is_not() -> None:
    """
    BUG-40: Salesforce sets Industry; our ERP write comes back through pgoutput
    in a transaction where a trigger also set name: only name is a change.
    """
    state, first = fold([sf(0, 101, industry="Robotics")])
    pending = [write("industry", "Robotics", 0.5, target="erp")]

    genuine, settled = split_echoes(
        {"industry": "Robotics", "name": "Acme Tools Intl"}, pending, json_fields=set()
    )
    result = resolve(state, erp(2, "0/3", **genuine), CUSTOMER)

    assert first[0].accepted == {"industry": "Robotics"}
    assert (genuine, settled) == ({"name": "Acme Tools Intl"}, pending)
    assert result.accepted == {"name": "Acme Tools Intl"}
    assert values(result.state)["industry"] == "Robotics"


def test_value_we_never_wrote_is_genuine() -> None:
    pending = [write("phone", "555-0101", 0.1)]

    genuine, settled = split_echoes({"phone": "555-0199"}, pending, json_fields=set())

    assert (genuine, settled) == ({"phone": "555-0199"}, [])


def test_pending_writes_of_two_records_are_refused() -> None:
    pending = [
        write("phone", "1", 0),
        PendingWrite("salesforce", "C-1002", "phone", "1", at(0)),
    ]

    with pytest.raises(InvariantError, match="C-1002"):
        split_echoes({"phone": "1"}, pending, json_fields=set())


@pytest.mark.parametrize(
    ("origin", "ours"),
    [
        ("com/salesforce/api/rest/60.0;client=ERPSync", True),
        ("com/salesforce/api/soap/60.0;client=ERPSync ", True),
        ("replicator", True),
        ("", False),
        (None, False),
        ("com/salesforce/api/rest/60.0;client=ERPSyncX", False),
        ("com/salesforce/api/rest/60.0", False),
        ("com/salesforce/api/soap/60.0;client=SfdcInternalAPI/", False),
    ],
)
def test_own_origin(origin: str | None, ours: bool) -> None:
    """P4: our calls carry Sforce-Call-Options client=ERPSync; the ERP an origin."""
    client = "replicator" if origin == "replicator" else "ERPSync"

    assert is_own_origin(origin, client=client) is ours


# Versions


def test_version_times_are_utc() -> None:
    local = datetime(2024, 6, 4, 14, 0, tzinfo=timezone(timedelta(hours=2)))

    assert Version(local, "erp", "0/1").commit_time == T0
    with pytest.raises(ValueError, match="no time zone"):
        Version(datetime(2024, 6, 4, 12), "erp", "0/1")


@pytest.mark.parametrize(
    ("version", "t"),
    [
        (Version(T0, "salesforce", "101"), 1717502400000),
        (Version(T0 + timedelta(microseconds=7), "erp", "0/16B3748"), 1717502400000007),
        (Version(T0 + timedelta(milliseconds=10), "erp", "0/1"), 1717502400010),
    ],
)
def test_version_json_round_trip(version: Version, t: int) -> None:
    data = version_to_json(version)

    assert data == {"t": t, "s": version.source, "p": version.position}
    assert version_from_json(data) == version


def test_version_key_needs_a_positive_window() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        version_key(Version(T0, "erp", "1"), timedelta(0), ("erp",))


def test_package_exports_what_it_lists() -> None:
    assert sorted(conflict.__all__) == conflict.__all__
    for name in conflict.__all__:
        assert hasattr(conflict, name), name
