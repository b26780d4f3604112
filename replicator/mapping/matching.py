"""Duplicate matching of an unlinked record against the other side (pure).

Match rules are tried in order; a rule compares the normalised values of its
unified fields and applies only when the record has every one of them. The
first rule with any candidate decides: one candidate links the two records,
several go to the review list, none means the record is new. Finding the
candidates (unlinked records), the review table and the CLI live elsewhere.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

__all__ = [
    "LEGAL_SUFFIXES",
    "NORMALISERS",
    "MatchResult",
    "MatchRuleSpec",
    "match",
    "match_key",
    "normalise",
    "normaliser_for",
]

Normaliser = Callable[[Any], str | None]
Record = TypeVar("Record", bound=Mapping[str, Any])

# Tokens dropped from the end of a company name, after dots are removed
# ("S.A." -> "sa", "Ltd." -> "ltd"). Multi-word forms are lists of tokens.
LEGAL_SUFFIXES: frozenset[str] = frozenset({
    "inc", "incorporated", "corp", "corporation", "co", "company", "llc", "llp",
    "lp", "ltd", "limited", "plc", "gmbh", "mbh", "ag", "kg", "kgaa", "ohg", "ug",
    "ev", "sa", "sas", "sarl", "srl", "spa", "sl", "slu", "sau", "sca", "cv",
    "de", "bv", "nv", "vof", "oy", "oyj", "ab", "as", "asa", "aps", "a/s", "kk",
    "pty", "pte", "bhd", "sdn", "lda", "ltda", "me", "eireli", "sp", "zoo",
    "and",
})  # fmt: skip
_LEADING = frozenset({"the"})


class MatchRuleSpec(Protocol):
    """What matching needs of a configured rule (``[[entities.match]]``)."""

    @property
    def fields(self) -> tuple[str, ...]: ...

    @property
    def normalize(self) -> Mapping[str, str]: ...


@dataclass(frozen=True, slots=True)
class MatchResult(Generic[Record]):
    """The outcome: no candidate, exactly one, or several for review."""

    kind: Literal["none", "single", "many"]
    candidates: tuple[Record, ...] = ()
    rule: int | None = None  # index of the rule that decided


def _plain(text: str) -> str:
    """Case-folded, accents removed, whitespace collapsed."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(stripped.replace("ß", "ss").split())


def _text_of(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def normalise_text(value: Any) -> str | None:
    text = _text_of(value)
    return _plain(text) or None if text is not None else None


def normalise_company(value: Any) -> str | None:
    """Case, accents, punctuation and legal suffixes (Inc, Ltd, GmbH, S.A.) go."""
    text = _text_of(value)
    if text is None:
        return None
    plain = _plain(text).replace("&", " and ")
    plain = re.sub("[.'\u2019]", "", plain)  # dots and apostrophes join: S.A. -> sa
    tokens = re.sub(r"[^\w/]+", " ", plain).split()
    while tokens and tokens[0] in _LEADING:
        tokens.pop(0)
    while len(tokens) > 1 and tokens[-1] in LEGAL_SUFFIXES:
        tokens.pop()
    return " ".join(tokens) or None


def normalise_postal(value: Any) -> str | None:
    """Upper case without spaces or hyphens: ``"wa1 1dp"`` -> ``"WA11DP"``."""
    text = _text_of(value)
    if text is None:
        return None
    return re.sub(r"[\s-]+", "", text).upper() or None


def normalise_phone(value: Any) -> str | None:
    """Digits only: ``"(171) 555-7788"`` -> ``"1715557788"``."""
    text = _text_of(value)
    if text is None:
        return None
    return "".join(c for c in text if c.isdigit()) or None


def normalise_email(value: Any) -> str | None:
    text = _text_of(value)
    if text is None:
        return None
    return text.strip().lower() or None


def normalise_exact(value: Any) -> str | None:
    text = _text_of(value)
    return text if text else None


NORMALISERS: dict[str, Normaliser] = {
    "company": normalise_company,
    "postal": normalise_postal,
    "phone": normalise_phone,
    "email": normalise_email,
    "text": normalise_text,
    "exact": normalise_exact,
}

_BY_NAME = (
    ("email", "email"),
    ("phone", "phone"),
    ("fax", "phone"),
    ("mobile", "phone"),
    ("postal", "postal"),
    ("zip", "postal"),
    ("company", "company"),
    ("account_name", "company"),
)


def normaliser_for(field: str, explicit: str | None = None) -> Normaliser:
    """Return the normaliser named ``explicit``, else the one ``field``'s name implies.

    Names containing email, phone/fax/mobile, postal/zip or company pick theirs;
    anything else is compared as plain text (case, accents and spaces ignored).
    """
    if explicit is not None:
        return NORMALISERS[explicit]
    lowered = field.lower()
    for part, name in _BY_NAME:
        if part in lowered:
            return NORMALISERS[name]
    return NORMALISERS["text"]


def normalise(field: str, value: Any, explicit: str | None = None) -> str | None:
    """Return ``value`` of ``field`` normalised for comparison (None: no value)."""
    return normaliser_for(field, explicit)(value)


def match_key(record: Mapping[str, Any], rule: MatchRuleSpec) -> tuple[str, ...] | None:
    """Return the rule's normalised values of ``record``, or None if one is empty.

    Equal keys match; the integration can index candidates by this key.
    """
    key = []
    for field in rule.fields:
        value = normalise(field, record.get(field), rule.normalize.get(field))
        if value is None:
            return None
        key.append(value)
    return tuple(key)


def match(
    record: Mapping[str, Any],
    candidates: Sequence[Record],
    rules: Sequence[MatchRuleSpec],
) -> MatchResult[Record]:
    """Match ``record`` against ``candidates`` with the first rule that finds any."""
    for index, rule in enumerate(rules):
        key = match_key(record, rule)
        if key is None:
            continue
        found = tuple(c for c in candidates if match_key(c, rule) == key)
        if len(found) == 1:
            return MatchResult("single", found, index)
        if found:
            return MatchResult("many", found, index)
    return MatchResult("none")
