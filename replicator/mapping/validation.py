"""Validation rules on unified field values, run before a change is accepted.

A rule is spelled like a transform: ``required``, ``email``, ``phone``,
``range(min,max)``, ``picklist(a,b,c)``, ``regex(pattern)``,
``max_length(n)``. :func:`validate` checks a change's unified fields and
returns one :class:`Violation` per failed rule; the caller quarantines those
fields (dead-letter with the rule) and lets the rest of the change go on.
Add a rule with :func:`register_rule` (docs/two-way-sync.md, "Adding a
validation rule").
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

from replicator.mapping._spec import Spec, parse_spec

__all__ = [
    "Check",
    "Rule",
    "RuleSpec",
    "Violation",
    "compile_rule",
    "register_rule",
    "rule_names",
    "validate",
]

# A check returns None when the value passes, else what is wrong with it.
Check = Callable[[Any], str | None]
RuleFactory = Callable[[Spec], Check]

_EMAIL = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")
_PHONE = re.compile(r"^\+?[0-9()./\s-]+((x|ext\.?)\s*\d{1,6})?$", re.IGNORECASE)
_RULES: dict[str, RuleFactory] = {}


@dataclass(frozen=True, slots=True)
class Violation:
    """One field that failed one rule."""

    field: str
    rule: str
    value: Any
    message: str


class RuleSpec(Protocol):
    """What :func:`validate` needs of a configured rule (``[[entities.validate]]``)."""

    @property
    def field(self) -> str: ...

    @property
    def rule(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Rule:
    """A compiled rule on one field."""

    field: str
    rule: str
    check: Check
    required: bool  # checked also when the field is absent from a complete record


def register_rule(name: str) -> Callable[[RuleFactory], RuleFactory]:
    """Register a rule factory under ``name`` (a decorator).

    The factory receives the parsed spelling (``spec.args``, ``spec.raw``),
    raises ``ValueError`` for bad arguments (reported at config load) and
    returns a check: ``value -> None`` when the value passes, else a short
    message. Checks never see ``None`` (only ``required`` looks at absence).
    """

    def decorate(factory: RuleFactory) -> RuleFactory:
        _RULES[name] = factory
        compile_rule.cache_clear()
        return factory

    return decorate


def rule_names() -> frozenset[str]:
    """Return every registered rule name."""
    return frozenset(_RULES)


@functools.lru_cache(maxsize=1024)
def compile_rule(field: str, rule: str) -> Rule:
    """Compile the rule spelled ``rule`` on ``field``.

    Raises:
        ValueError: an unknown rule or bad arguments, with the fix.
    """
    spec = parse_spec(rule)
    factory = _RULES.get(spec.name)
    if factory is None:
        known = ", ".join(sorted(_RULES))
        raise ValueError(
            f"unknown validation rule {spec.name!r}; use one of {known}, or register "
            "one (docs/two-way-sync.md, 'Adding a validation rule')"
        )
    return Rule(field, rule.strip(), factory(spec), spec.name == "required")


def validate(
    fields: Mapping[str, Any],
    rules: Iterable[RuleSpec | Rule],
    *,
    complete: bool = False,
) -> list[Violation]:
    """Return the violations of ``rules`` by the unified ``fields``.

    A change carries only the fields it changed, so an absent field is not
    checked; with ``complete`` (a new record, a full re-read) an absent
    ``required`` field is a violation. ``None`` fails only ``required``.
    """
    violations = []
    for configured in rules:
        rule = (
            configured
            if isinstance(configured, Rule)
            else compile_rule(configured.field, configured.rule)
        )
        if rule.field not in fields:
            if complete and rule.required:
                violations.append(
                    Violation(rule.field, rule.rule, None, "required field is missing")
                )
            continue
        value = fields[rule.field]
        if value is None and not rule.required:
            continue
        message = rule.check(value)
        if message is not None:
            violations.append(Violation(rule.field, rule.rule, value, message))
    return violations


def _no_args(spec: Spec) -> None:
    if spec.args:
        raise ValueError(f"rule {spec.name!r} takes no arguments; remove them")


@register_rule("required")
def _required(spec: Spec) -> Check:
    _no_args(spec)

    def check(value: Any) -> str | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return "required field is empty"
        return None

    return check


@register_rule("email")
def _email(spec: Spec) -> Check:
    _no_args(spec)

    def check(value: Any) -> str | None:
        if not isinstance(value, str) or len(value) > 254 or not _EMAIL.match(value):
            return "not an email address"
        return None

    return check


@register_rule("phone")
def _phone(spec: Spec) -> Check:
    """Digits with the usual separators, 7 to 15 digits (E.164's maximum)."""
    _no_args(spec)

    def check(value: Any) -> str | None:
        if not isinstance(value, str) or not _PHONE.match(value.strip()):
            return "not a phone number"
        digits = sum(c.isdigit() for c in re.split(r"(?i)x|ext", value)[0])
        if not 7 <= digits <= 15:
            return f"a phone number has 7 to 15 digits, not {digits}"
        return None

    return check


def _number(text: str) -> Decimal:
    try:
        number = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a number") from None
    if not number.is_finite():
        raise ValueError(f"{text!r} is not a finite number")
    return number


@register_rule("range")
def _range(spec: Spec) -> Check:
    """``range(min,max)``, inclusive; leave a bound empty for none: ``range(0,)``."""
    if len(spec.args) != 2 or not any(spec.args):
        raise ValueError("write range(min,max), with one bound empty for none")
    low = _number(spec.args[0]) if spec.args[0] else None
    high = _number(spec.args[1]) if spec.args[1] else None
    if low is not None and high is not None and low > high:
        raise ValueError(f"range({low},{high}) is empty; put the smaller bound first")

    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(
            value, int | float | Decimal | str
        ):
            return "not a number"
        try:
            number = _number(repr(value) if isinstance(value, float) else str(value))
        except ValueError:
            return "not a finite number"
        if (low is not None and number < low) or (high is not None and number > high):
            return f"outside {spec.name}({spec.raw})"
        return None

    return check


@register_rule("picklist")
def _picklist(spec: Spec) -> Check:
    """``picklist(a, b, 'c, d')``: the value is one of these (compared as text)."""
    allowed = frozenset(spec.args)
    if not allowed:
        raise ValueError("picklist needs its values, e.g. picklist(Hot, Warm, Cold)")

    def check(value: Any) -> str | None:
        if str(value) not in allowed:
            return "not one of the picklist values"
        return None

    return check


@register_rule("regex")
def _regex(spec: Spec) -> Check:
    """``regex(pattern)``: the whole text matches (commas need no quoting)."""
    if not spec.raw:
        raise ValueError("regex needs a pattern, e.g. regex(^[A-Z]{5}$)")
    try:
        pattern = re.compile(spec.raw)
    except re.error as exc:
        raise ValueError(f"regex({spec.raw}) does not compile: {exc}") from None

    def check(value: Any) -> str | None:
        if not isinstance(value, str) or pattern.fullmatch(value) is None:
            return f"does not match {spec.raw}"
        return None

    return check


@register_rule("max_length")
def _max_length(spec: Spec) -> Check:
    if len(spec.args) != 1 or not spec.args[0].isdigit():
        raise ValueError("write max_length(n) with a whole number n")
    limit = int(spec.args[0])

    def check(value: Any) -> str | None:
        if isinstance(value, str) and len(value) > limit:
            return f"longer than {limit} characters"
        return None

    return check
