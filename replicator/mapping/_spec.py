"""Parse the ``name(arguments)`` spellings of transforms and validation rules.

``decimal(18,2)``, ``range(0, 100)``, ``picklist(Hot=1, Warm=2)``,
``regex(^[A-Z]{5}$)``: a name, then optionally the raw text between the
outer parentheses. Each factory splits its own arguments (a regex keeps its
commas), with :func:`split_args` for the common comma-separated case.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Spec", "parse_spec", "split_args"]

_SPEC = re.compile(r"^\s*([a-z][a-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Spec:
    """A parsed spelling: the registered name and the raw argument text."""

    name: str
    raw: str | None  # None when written without parentheses

    @property
    def args(self) -> tuple[str, ...]:
        return () if self.raw is None else split_args(self.raw)


def parse_spec(text: str) -> Spec:
    """Split ``text`` into its name and raw arguments.

    Raises:
        ValueError: ``text`` is not ``name`` or ``name(...)``.
    """
    found = _SPEC.match(text)
    if found is None:
        raise ValueError(
            f"{text!r} is not a name or name(arguments); write e.g. "
            "'us_state' or 'decimal(18,2)'"
        )
    return Spec(found.group(1), found.group(2))


def split_args(raw: str, *, keep_quotes: bool = False) -> tuple[str, ...]:
    """Split on top-level commas; single or double quotes protect a comma.

    With ``keep_quotes`` the quotes stay in the parts, so a caller can tell
    ``'01'`` (text) from ``01`` (a number).
    """
    parts: list[str] = []
    current: list[str] = []
    quote: str | None = None
    for char in raw:
        if quote is not None:
            if char == quote:
                quote = None
                if keep_quotes:
                    current.append(char)
            else:
                current.append(char)
        elif char in "'\"":
            quote = char
            if keep_quotes:
                current.append(char)
        elif char == ",":
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    if quote is not None:
        raise ValueError(f"unclosed quote in {raw!r}; close it with {quote}")
    last = "".join(current).strip()
    if last or parts:
        parts.append(last)
    return tuple(parts)
