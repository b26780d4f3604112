"""Settings of mapped entities (``[[entities]]``) and of the sync (``[sync]``).

Frozen pydantic models checked at load: owners that are no source of their
entity, fields listed twice, unknown transforms or rules, match and
validation rules on unmapped fields. Each error names the TOML key and the
fix. Checks against the live schemas are in ``schema_check``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from replicator.mapping import transforms, validation
from replicator.mapping.matching import NORMALISERS

__all__ = [
    "SYSTEMS",
    "Direction",
    "EntitySettings",
    "FieldMap",
    "MatchRule",
    "SyncSettings",
    "System",
    "ValidateRule",
    "check_entities",
]

System = Literal["erp", "salesforce"]
Direction = Literal["both", "to_salesforce", "to_erp"]
SYSTEMS: tuple[System, ...] = ("erp", "salesforce")

_NAME = r"^[a-z_][a-z0-9_]{0,62}$"
_SF_NAME = r"^[A-Za-z][A-Za-z0-9_]{0,79}$"
_ERP_TABLE = r"^[a-z_][a-z0-9_$]*\.[a-z_][a-z0-9_$]*$"


def _error(message: str) -> PydanticCustomError:
    # Type "mapping": replicator.config renders the message alone (it names the key).
    return PydanticCustomError("mapping", message)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FieldMap(_Frozen):
    """One unified field: where it lives on each side, who owns it, its transform."""

    name: str = Field(pattern=_NAME)
    salesforce: str = Field(pattern=_SF_NAME)
    erp: str = Field(min_length=1)
    owner: System | None = None
    enforce: bool = False
    transform: str | None = None
    reverse: bool = False  # swap the transform's directions
    # The name of another entity: the field holds a key of that entity (the
    # ERP key column on the ERP side, the record Id on the Salesforce side);
    # its unified value is the referenced record's unified_id.
    reference: str | None = Field(None, pattern=_NAME)

    @field_validator("transform")
    @classmethod
    def _known_transform(cls, spec: str | None) -> str | None:
        if spec is not None:
            try:
                transforms.build(spec)
            except ValueError as exc:
                raise _error(str(exc)) from None
        return spec


class MatchRule(_Frozen):
    """Duplicate match rule: unified fields compared after normalisation."""

    fields: tuple[str, ...] = Field(min_length=1)
    # field -> normaliser (company, postal, phone, email, text, exact); default by name
    normalize: dict[str, str] = Field(default_factory=dict)

    @field_validator("normalize")
    @classmethod
    def _known_normalisers(cls, value: dict[str, str]) -> dict[str, str]:
        for field, name in value.items():
            if name not in NORMALISERS:
                raise _error(
                    f"normalize.{field} = {name!r} is unknown; use one of "
                    + ", ".join(sorted(NORMALISERS))
                )
        return value


class ValidateRule(_Frozen):
    """A validation rule on one unified field."""

    field: str
    rule: str

    @model_validator(mode="after")
    def _known_rule(self) -> ValidateRule:
        try:
            validation.compile_rule(self.field, self.rule)
        except ValueError as exc:
            raise _error(f"rule = {self.rule!r}: {exc}") from None
        return self


class EntitySettings(_Frozen):
    """One mapped entity: a Salesforce object and an ERP table as one."""

    name: str = Field(pattern=_NAME)
    salesforce: str = Field(pattern=_SF_NAME)
    erp: str = Field(pattern=_ERP_TABLE)
    external_id: str = Field(pattern=_SF_NAME)
    erp_sf_id_column: str | None = None
    # How a record created from Salesforce gets its ERP key: "next" (max + 1 of
    # a one-column numeric key), "code(field)" (letters of a unified field,
    # as long as the key column, made unique), or unset when every key column
    # is a mapped field (an order line keyed by its order and product).
    erp_new_key: str | None = Field(None, pattern=r"^(next|code\([a-z_][a-z0-9_]*\))$")
    direction: Direction = "both"
    owner: System | None = None
    delete_policy: Literal["propagate", "mark", "ignore"] = "mark"
    fields: tuple[FieldMap, ...] = ()
    match: tuple[MatchRule, ...] = ()
    validate_: tuple[ValidateRule, ...] = Field((), alias="validate")

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @property
    def sources(self) -> frozenset[System]:
        """The systems whose changes flow into this entity."""
        if self.direction == "to_salesforce":
            return frozenset({"erp"})
        if self.direction == "to_erp":
            return frozenset({"salesforce"})
        return frozenset(SYSTEMS)

    @property
    def targets(self) -> frozenset[System]:
        """The systems this entity writes to."""
        if self.direction == "both":
            return frozenset(SYSTEMS)
        return frozenset({"salesforce" if self.direction == "to_salesforce" else "erp"})

    def owner_of(self, field: FieldMap) -> System | None:
        """The field's owner, else the entity's."""
        return field.owner or self.owner

    def field(self, name: str) -> FieldMap:
        for mapped in self.fields:
            if mapped.name == name:
                return mapped
        raise KeyError(name)

    def transform(
        self, name: str, context: transforms.TransformContext | None = None
    ) -> transforms.Transform | None:
        """Return field ``name``'s transform bound to it, or None if it has none."""
        mapped = self.field(name)
        if mapped.transform is None:
            return None
        built = transforms.build(mapped.transform, field=name, context=context)
        return built.reversed() if mapped.reverse else built

    @model_validator(mode="after")
    def _consistent(self) -> EntitySettings:
        problems = [
            *self._owner_problems(),
            *_duplicates("fields[].name", (f.name for f in self.fields)),
            *_duplicates("fields[].salesforce", (f.salesforce for f in self.fields)),
            *_duplicates("fields[].erp", (f.erp for f in self.fields)),
            *self._reference_problems(),
            *self._transform_and_reference(),
        ]
        if problems:
            raise _error(f"entity {self.name!r}: " + "; ".join(problems))
        return self

    def _owner_problems(self) -> list[str]:
        problems = []
        fix = (
            f"direction = {self.direction!r} takes changes from "
            + " and ".join(sorted(self.sources))
            + "; set owner to one of them or change direction"
        )
        if self.owner is not None and self.owner not in self.sources:
            problems.append(f"owner = {self.owner!r} is not a source ({fix})")
        for index, mapped in enumerate(self.fields):
            if mapped.owner is not None and mapped.owner not in self.sources:
                problems.append(
                    f"fields[{index}].owner = {mapped.owner!r} (field {mapped.name!r}) "
                    f"is not a source ({fix})"
                )
            if mapped.enforce and self.owner_of(mapped) is None:
                problems.append(
                    f"fields[{index}].enforce = true (field {mapped.name!r}) needs an "
                    "owner; set owner on the field or the entity, or remove enforce"
                )
        return problems

    def _transform_and_reference(self) -> list[str]:
        problems = []
        for index, mapped in enumerate(self.fields):
            if mapped.reference is not None and mapped.transform is not None:
                problems.append(
                    f"fields[{index}] (field {mapped.name!r}) has both reference and "
                    "transform; a reference maps keys, remove the transform"
                )
        if self.erp_new_key and self.erp_new_key.startswith("code("):
            name = self.erp_new_key[5:-1]
            if name not in {f.name for f in self.fields}:
                problems.append(
                    f"erp_new_key = {self.erp_new_key!r} names {name!r}, not a field; "
                    "map it in [[entities.fields]] or fix the name"
                )
        return problems

    def _reference_problems(self) -> list[str]:
        known = {f.name for f in self.fields}
        hint = "; map it in [[entities.fields]] or fix the name"
        problems = []
        for index, rule in enumerate(self.match):
            for name in rule.fields:
                if name not in known:
                    problems.append(
                        f"match[{index}].fields names {name!r}, not a field{hint}"
                    )
            for name in rule.normalize:
                if name not in rule.fields:
                    problems.append(
                        f"match[{index}].normalize names {name!r}, not in its fields"
                    )
        for index, check in enumerate(self.validate_):
            if check.field not in known:
                problems.append(
                    f"validate[{index}].field = {check.field!r} is not a field{hint}"
                )
        return problems


def _duplicates(key: str, values: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    problems = []
    for value in values:
        if value in seen:
            problems.append(
                f"{key} {value!r} is listed twice; keep one [[entities.fields]] entry"
            )
        seen.add(value)
    return problems


class SyncSettings(_Frozen):
    """``[sync]``: conflict resolution across the two systems.

    Write-backs to Salesforce reuse ``[salesforce] client_name`` as the
    ``Sforce-Call-Options`` client, so their echoes are recognised.
    """

    tie_window_seconds: float = Field(1.0, gt=0)  # clock skew bound; see the design
    precedence: tuple[System, System] = ("erp", "salesforce")

    @field_validator("precedence")
    @classmethod
    def _both_systems(cls, value: tuple[System, System]) -> tuple[System, System]:
        if set(value) != set(SYSTEMS):
            raise _error(
                f"precedence = {list(value)!r} must name erp and salesforce once "
                'each, e.g. ["erp", "salesforce"]'
            )
        return value


RESERVED_NAMES = frozenset({"match_review"})


def check_entities(entities: tuple[EntitySettings, ...]) -> list[str]:
    """Cross-entity problems: a name, object or table mapped twice, bad references."""
    names = {e.name for e in entities}
    problems = [
        *_duplicates_of("name", (e.name for e in entities)),
        *_duplicates_of("salesforce", (e.salesforce for e in entities)),
        *_duplicates_of("erp", (e.erp for e in entities)),
    ]
    for entity in entities:
        if entity.name in RESERVED_NAMES:
            problems.append(
                f"entities[].name {entity.name!r} is reserved (a table of the "
                "unified schema has it); choose another name"
            )
        for mapped in entity.fields:
            if mapped.reference is not None and mapped.reference not in names:
                problems.append(
                    f"entity {entity.name!r} field {mapped.name!r}: reference = "
                    f"{mapped.reference!r} is not an entity; use one of "
                    + ", ".join(sorted(names))
                )
    return problems


def _duplicates_of(key: str, values: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    problems = []
    for value in values:
        if value in seen:
            problems.append(
                f"entities[].{key} {value!r} appears in two entities; "
                "map it in one [[entities]] entry"
            )
        seen.add(value)
    return problems
