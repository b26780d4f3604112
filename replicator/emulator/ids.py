"""Salesforce record ids: 15-character case-sensitive ids and their 18-character form.

An id is a 3-character key prefix (the object type), 2 pod characters, one
reserved character and a 9-character record number. The 18-character form
appends a checksum of three characters that makes the id case-insensitive;
APIs return 18 characters and accept both (reference §5.9).
"""

from __future__ import annotations

import re

__all__ = [
    "EMPTY_ID",
    "IdGenerator",
    "checksum",
    "is_valid_id",
    "key_prefix",
    "make_id",
    "normalize_id",
]

EMPTY_ID = "000000000000000AAA"

_SUFFIX_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ID_RE = re.compile(r"[0-9A-Za-z]{15}(?:[0-9A-Za-z]{3})?")
_POD = "Dn"  # the emulated instance; real orgs show e.g. "5f", "Hs", "RO"
_RESERVED = "0"
_NUMBER_WIDTH = 9


def checksum(id15: str) -> str:
    """Return the 3-character suffix that makes a 15-character id case-safe.

    Each 5-character chunk gives a 5-bit number whose bit i is set when the
    chunk's i-th character is an upper-case letter; the number indexes
    ``A..Z0..5``.
    """
    if len(id15) != 15:
        raise ValueError(f"a 15-character id is required, not {id15!r}")
    suffix = []
    for start in (0, 5, 10):
        bits = 0
        for offset, char in enumerate(id15[start : start + 5]):
            if "A" <= char <= "Z":
                bits |= 1 << offset
        suffix.append(_SUFFIX_ALPHABET[bits])
    return "".join(suffix)


def is_valid_id(value: object) -> bool:
    """Tell whether ``value`` is a well-formed 15- or 18-character id."""
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        return False
    return len(value) == 15 or checksum(value[:15]) == value[15:].upper()


def normalize_id(value: str) -> str:
    """Return the 18-character form of a 15- or 18-character id.

    The suffix of an 18-character id is case-insensitive: it is returned
    upper case. Raises ``ValueError`` for anything that is not an id.
    """
    if not is_valid_id(value):
        raise ValueError(f"malformed id {value!r}")
    return value[:15] + checksum(value[:15])


def key_prefix(value: str) -> str:
    """Return the 3-character key prefix of an id."""
    return value[:3]


def make_id(prefix: str, number: int) -> str:
    """Build the 18-character id of record ``number`` of the object ``prefix``."""
    if len(prefix) != 3:
        raise ValueError(f"a key prefix has 3 characters, not {prefix!r}")
    if number < 0:
        raise ValueError(f"record numbers are not negative: {number}")
    digits = []
    for _ in range(_NUMBER_WIDTH):
        number, rest = divmod(number, 62)
        digits.append(_BASE62[rest])
    if number:
        raise ValueError(f"record number too large for prefix {prefix!r}")
    id15 = prefix + _POD + _RESERVED + "".join(reversed(digits))
    return id15 + checksum(id15)


class IdGenerator:
    """Hand out increasing record numbers per key prefix.

    The state persists ``counters`` so ids never repeat across restarts.
    """

    def __init__(self, counters: dict[str, int] | None = None) -> None:
        self.counters: dict[str, int] = dict(counters or {})

    def next_id(self, prefix: str) -> str:
        number = self.counters.get(prefix, 0) + 1
        self.counters[prefix] = number
        return make_id(prefix, number)
