"""Convergence of conflict resolution, property-tested with hypothesis.

Any permutation, duplication or replay of one set of changes from both sources
gives the same unified state and the same conflict decisions, as defined in
the docstring of ``replicator.conflict.rules``; both also match a model that
reads them off the set directly. Resolution is idempotent.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from replicator.conflict import (
    Change,
    EntityRule,
    FieldRule,
    FieldState,
    PendingWrite,
    Resolution,
    UnifiedState,
    Version,
    canonical_value,
    delete_effect,
    resolve,
    split_echoes,
    values_equal,
)

T0 = datetime(2024, 6, 4, 12, 0, 0, tzinfo=UTC)
SOURCES = ("erp", "salesforce")

# Few values, so that equal, numerically equal and JSON-equal values collide.
PLAIN_VALUES = ["1", "1.0", "1.00", "2", "x", "03801", None]
JSON_VALUES = ['{"k":1,"l":[1,2]}', '{"l": [1, 2], "k": 1.0}', '{"k":2}', "[2,1]", None]

FIELDS = {
    "name": FieldRule("name"),
    "attributes": FieldRule("attributes", json=True),
    "credit_limit": FieldRule("credit_limit", owner="erp", enforce=True),
    "rating": FieldRule("rating", owner="salesforce"),
}


@dataclass(frozen=True)
class Case:
    rule: EntityRule
    changes: list[Change]
    arrivals: list[list[Change]]


@st.composite
def rules(draw: st.DrawFn) -> EntityRule:
    return EntityRule(
        name="customer",
        fields=FIELDS,
        owner=draw(st.sampled_from([None, None, "erp"])),
        delete_policy=draw(st.sampled_from(["propagate", "mark", "ignore"])),
        precedence=tuple(draw(st.permutations(SOURCES))),
        tie_window=timedelta(milliseconds=draw(st.sampled_from([1, 500, 1000]))),
        existence_owner=draw(st.sampled_from([None, "erp", "salesforce"])),
    )


@st.composite
def changes(draw: st.DrawFn, index: int) -> Change:
    source = draw(st.sampled_from(SOURCES))
    # 100 ms steps over 3 s: ties, shared buckets and bucket edges all occur.
    time = T0 + timedelta(milliseconds=100 * draw(st.integers(0, 30)))
    # Distinct positions keep versions distinct: a version is one change.
    position = str(index) if source == "salesforce" else f"0/{index:X}"
    version = Version(time, source, position)
    if draw(st.integers(0, 6)) == 0:
        return Change(source, "delete", {}, version)
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), min_size=1, unique=True))
    fields = {
        name: draw(st.sampled_from(JSON_VALUES if FIELDS[name].json else PLAIN_VALUES))
        for name in names
    }
    return Change(source, "upsert", fields, version)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    rule = draw(rules())
    count = draw(st.integers(1, 8))
    made = [draw(changes(i)) for i in range(count)]
    arrivals = []
    for _ in range(3):
        replayed = draw(st.lists(st.sampled_from(made), max_size=4))
        arrivals.append(draw(st.permutations(made + replayed)))
    return Case(rule, made, arrivals)


def fold(
    changes: Iterable[Change], rule: EntityRule
) -> tuple[UnifiedState, list[Resolution]]:
    state: UnifiedState | None = None
    results = []
    for change in changes:
        result = resolve(state, change, rule)
        results.append(result)
        state = result.state
    return state or UnifiedState(), results


def canon(rule: EntityRule, name: str, value: Any) -> Hashable:
    return canonical_value(value, json=rule.field_rule(name).json)


def decisions(
    rule: EntityRule, state: UnifiedState, results: Sequence[Resolution]
) -> set[tuple[str, Hashable]]:
    """The discarded values of the returned conflicts, minus the final values."""
    logged = {
        (c.field, canon(rule, c.field, c.discarded_value))
        for r in results
        for c in r.conflicts
    }
    final = {
        (name, canon(rule, name, held.value)) for name, held in state.fields.items()
    }
    return logged - final


def model_state(rule: EntityRule, changes: Sequence[Change]) -> UnifiedState:
    """The state read off the set of changes, with no folding."""
    deletes = [c.version for c in changes if c.op == "delete"]
    gone = [v for v in deletes if delete_effect(v, rule) == "propagate"]
    if gone:
        return UnifiedState({}, max(gone, key=rule.key))
    marks = [v for v in deletes if delete_effect(v, rule) == "mark"]

    # Per field, the owner's values outrank the other system's; among equals
    # the greatest version wins.
    fields: dict[str, FieldState] = {}
    ranks: dict[str, tuple[bool, Any]] = {}
    for change in changes:
        for name, value in change.fields.items():
            rank = (change.source == rule.owner_of(name), rule.key(change.version))
            if name not in ranks or rank > ranks[name]:
                ranks[name] = rank
                fields[name] = FieldState(value, change.version)
    return UnifiedState(fields, max(marks, key=rule.key) if marks else None)


def model_decisions(
    rule: EntityRule, changes: Sequence[Change], final: UnifiedState
) -> set[tuple[str, Hashable]]:
    """Every value some change carried that is not the field's final value."""
    carried = {
        (name, canon(rule, name, value))
        for change in changes
        for name, value in change.fields.items()
    }
    kept = {
        (name, canon(rule, name, held.value)) for name, held in final.fields.items()
    }
    return carried - kept


@settings(max_examples=150, deadline=None)
@given(cases())
def test_any_order_duplication_or_replay_converges(case: Case) -> None:
    rule = case.rule
    expected_state = model_state(rule, case.changes)
    expected = model_decisions(rule, case.changes, expected_state)

    outcomes = [fold(arrival, rule) for arrival in [case.changes, *case.arrivals]]

    for state, results in outcomes:
        assert state == expected_state
        assert decisions(rule, state, results) == expected


@settings(max_examples=75, deadline=None)
@given(cases())
def test_resolution_is_idempotent_and_accepts_only_semantic_changes(
    case: Case,
) -> None:
    """
    Applying a change again to the state it produced changes nothing, and
    ``accepted`` lists exactly the fields whose unified value changed.
    """
    rule = case.rule
    state = UnifiedState()

    for change in case.arrivals[0]:
        first = resolve(state, change, rule)
        again = resolve(first.state, change, rule)
        changed = {
            name
            for name, held in first.state.fields.items()
            if name not in state.fields
            or canon(rule, name, state.fields[name].value)
            != canon(rule, name, held.value)
        }
        state = first.state

        assert again.state == first.state
        assert again.accepted == {}
        assert set(again.conflicts) <= set(first.conflicts)
        assert again.enforce.items() <= first.enforce.items()
        assert set(first.accepted) == changed


@st.composite
def echo_cases(draw: st.DrawFn) -> tuple[dict[str, Any], list[PendingWrite]]:
    names = ["phone", "attributes"]
    writes = [
        PendingWrite(
            "salesforce",
            "C-1001",
            name,
            draw(
                st.sampled_from(JSON_VALUES if name == "attributes" else PLAIN_VALUES)
            ),
            T0 + timedelta(milliseconds=i),
        )
        for i, name in enumerate(draw(st.lists(st.sampled_from(names), max_size=5)))
    ]
    fields = draw(
        st.dictionaries(
            st.sampled_from(names), st.sampled_from(PLAIN_VALUES + JSON_VALUES)
        )
    )
    return fields, draw(st.permutations(writes))


@settings(max_examples=100, deadline=None)
@given(echo_cases())
def test_echo_split_matches_any_pending_value_in_any_order(
    case: tuple[dict[str, Any], list[PendingWrite]],
) -> None:
    """A field is an echo iff some pending write to it has an equal value."""
    fields, pending = case
    json_fields = {"attributes"}

    genuine, settled = split_echoes(fields, pending, json_fields=json_fields)
    again = split_echoes(fields, list(reversed(pending)), json_fields=json_fields)

    for name, value in fields.items():
        matches = sorted(
            (
                w
                for w in pending
                if w.field == name
                and values_equal(w.value, value, json=name in json_fields)
            ),
            key=lambda w: w.written_at,
        )
        assert (name in genuine) == (not matches)
        assert not matches or matches[0] in settled
    assert {w.field for w in settled} <= set(fields) - set(genuine)
    assert again == (genuine, settled)
