"""Object and field metadata of the emulated org (the contract between parts).

``state`` and ``rest`` (records, describe), ``soql`` (queries) and ``cdc``
(change events) all read an org's schema through these types. Loaders for the
built-in standard objects and for SFDX source-format metadata fill them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class FieldSchema:
    """One field as describe reports it."""

    name: str  # API name, e.g. "BillingStreet", "Price__c"
    type: str  # describe type: id, string, textarea, picklist, double, currency,
    #            int, percent, boolean, date, datetime, time, email, phone, url,
    #            reference, address, location, multipicklist, encryptedstring
    label: str = ""
    length: int = 0
    precision: int = 0
    scale: int = 0
    nillable: bool = True
    createable: bool = True
    updateable: bool = True
    calculated: bool = False  # formula or roll-up: never in change events
    external_id: bool = False
    unique: bool = False
    reference_to: tuple[str, ...] = ()
    relationship_name: str | None = None  # parent side: "Account", "Account__r"
    child_relationship_name: str | None = None  # child side: "Contacts", "Orders__r"
    compound_field_name: str | None = None  # "BillingAddress" for BillingStreet
    picklist_values: tuple[str, ...] = ()
    restricted_picklist: bool = False
    default_value: object = None
    extra_type_info: str | None = None  # "plaintextarea", "richtextarea", ...
    auto_number_format: str | None = None  # "O-{00000}": server-assigned on create
    formula: str | None = None  # a calculated field's expression (not evaluated)


@dataclass(slots=True)
class ObjectSchema:
    """One sObject type: its fields in describe order and its key prefix."""

    name: str
    key_prefix: str  # three characters, e.g. "001" for Account
    label: str = ""
    label_plural: str = ""
    custom: bool = False
    fields: dict[str, FieldSchema] = field(default_factory=dict)
    cdc_enabled: bool = True

    def compound_components(self, compound: str) -> list[FieldSchema]:
        """Return the fields whose ``compound_field_name`` is ``compound``."""
        return [f for f in self.fields.values() if f.compound_field_name == compound]


@dataclass(slots=True)
class OrgSchema:
    """Every object of one org, by API name (case-insensitive lookup)."""

    objects: dict[str, ObjectSchema] = field(default_factory=dict)
    # Platform events (``__e``) have no records: kept apart from ``objects``.
    platform_events: dict[str, ObjectSchema] = field(default_factory=dict)

    def add(self, obj: ObjectSchema) -> None:
        """Add or replace an object, refusing a key prefix another one holds."""
        holder = self.by_prefix(obj.key_prefix)
        if holder is not None and holder.name != obj.name:
            raise ValueError(
                f"key prefix {obj.key_prefix!r} of {obj.name!r} is taken by "
                f"{holder.name!r}"
            )
        self.objects[obj.name] = obj

    def get(self, name: str) -> ObjectSchema | None:
        found = self.objects.get(name)
        if found is not None:
            return found
        lowered = name.lower()
        for key, obj in self.objects.items():
            if key.lower() == lowered:
                return obj
        return None

    def by_prefix(self, prefix: str) -> ObjectSchema | None:
        for obj in self.objects.values():
            if obj.key_prefix == prefix:
                return obj
        return None
