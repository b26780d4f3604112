"""Record ids: the case-safe checksum, normalisation and generated ids."""

from __future__ import annotations

import pytest

from replicator.emulator import ids


@pytest.mark.parametrize(
    ("id15", "suffix"),
    [
        ("0015f00002JUXA8", "AAP"),
        ("003RO0000035WQg", "YAM"),
        ("70130000001tcyI", "AAQ"),
        ("a02Hs0000179WYr", "IAM"),
        ("a0D30000001n7Pi", "EAI"),
        ("000000000000000", "AAA"),
    ],
)
def test_checksum_matches_documented_ids(id15: str, suffix: str) -> None:
    assert ids.checksum(id15) == suffix


def test_normalize_turns_15_into_18_and_keeps_18() -> None:
    assert ids.normalize_id("0015f00002JUXA8") == "0015f00002JUXA8AAP"
    assert ids.normalize_id("0015f00002JUXA8AAP") == "0015f00002JUXA8AAP"


def test_normalize_accepts_lower_case_suffix() -> None:
    """The suffix is case-insensitive; the normal form is upper case."""
    assert ids.normalize_id("0015f00002JUXA8aap") == "0015f00002JUXA8AAP"


@pytest.mark.parametrize(
    "bad", ["", "BOGUS", "0015f00002JUXA8AAQ", "0015f00002JUXA8A", "001-f00002JUXA8"]
)
def test_malformed_ids_are_refused(bad: str) -> None:
    assert not ids.is_valid_id(bad)
    with pytest.raises(ValueError, match="malformed id"):
        ids.normalize_id(bad)


def test_generated_ids_are_valid_distinct_and_carry_the_prefix() -> None:
    generator = ids.IdGenerator()

    made = [generator.next_id("001") for _ in range(100)]

    assert len(set(made)) == 100
    assert all(
        len(i) == 18 and i.startswith("001") and ids.is_valid_id(i) for i in made
    )


def test_generator_continues_from_saved_counters() -> None:
    first = ids.IdGenerator()
    first.next_id("003")

    second = ids.IdGenerator(first.counters)

    assert second.next_id("003") == ids.make_id("003", 2)


def test_make_id_refuses_bad_prefix_and_numbers() -> None:
    with pytest.raises(ValueError, match="key prefix"):
        ids.make_id("01", 1)
    with pytest.raises(ValueError, match="too large"):
        ids.make_id("001", 62**9)


def test_empty_id_is_well_formed() -> None:
    assert ids.is_valid_id(ids.EMPTY_ID)
