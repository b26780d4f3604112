"""Seed an org from sObject Tree JSON files, data plans and built-in sample records.

A data plan (``sample-data-plan.json``, the ``sf data import tree`` format)
lists tree files per object; records carry ``attributes.referenceId`` and
refer to each other with ``"@<referenceId>"`` values, resolved across files
in plan order. Nested child records (``"Contacts": {"records": [...]}``)
are created after their parent with the lookup filled in. Seeding writes as
the system, so values such as ``CaseNumber`` are kept as given.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from replicator.emulator.schema import ObjectSchema
from replicator.emulator.state import OrgState, Transaction

if TYPE_CHECKING:
    from replicator.emulator.app import EmulatorConfig

__all__ = [
    "STANDARD_SEED",
    "SeedError",
    "ensure_user",
    "load_plan",
    "load_tree",
    "seed_org",
]

logger = logging.getLogger(__name__)


class SeedError(ValueError):
    """Seed data that cannot be loaded; the message names the file and record."""


def ensure_user(state: OrgState, username: str) -> str:
    """Return the id of the user ``username``, creating it when missing."""
    user = state.find_user(username)
    if user is not None:
        return str(user["Id"])
    local = username.split("@")[0]
    with state.transaction(user_id="") as tx:
        user_id = tx.create(
            "User",
            {
                "Username": username,
                "LastName": "Integration",
                "FirstName": "Emulator",
                "Email": username,
                "Alias": local[:8],
                "CommunityNickname": local[:40],
            },
            system=True,
        )
        # The first user created itself.
        tx.update(
            "User",
            user_id,
            {"CreatedById": user_id, "LastModifiedById": user_id},
            system=True,
        )
    logger.info("user created", extra={"user_id": user_id})
    return user_id


def seed_org(state: OrgState, config: EmulatorConfig) -> None:
    """Load the configured seed data into an org that holds no records yet."""
    if any(
        True
        for name in state.schema.objects
        if name != "User"
        for _ in state.records(name, include_deleted=True)
    ):
        logger.info("seed skipped: org has records")
        return
    user_id = ensure_user(state, config.username)
    refs: dict[str, str] = {}
    with state.transaction(user_id=user_id) as tx:
        if config.seed_standard:
            load_records(tx, state, STANDARD_SEED, refs, source="standard seed")
        for plan in config.seed_plans:
            load_plan(tx, state, Path(plan), refs)


def load_plan(
    tx: Transaction, state: OrgState, plan_path: Path, refs: dict[str, str]
) -> None:
    """Load every file of a data plan, resolving ``@references`` in ``refs``."""
    try:
        plan = orjson.loads(plan_path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise SeedError(f"cannot read data plan {str(plan_path)!r}: {exc}") from exc
    for entry in plan:
        for name in entry.get("files", []):
            load_tree(tx, state, plan_path.parent / name, refs)


def load_tree(
    tx: Transaction, state: OrgState, tree_path: Path, refs: dict[str, str]
) -> None:
    """Load one sObject Tree file (``{"records": [...]}``)."""
    try:
        tree = orjson.loads(tree_path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise SeedError(f"cannot read tree file {str(tree_path)!r}: {exc}") from exc
    load_records(tx, state, tree.get("records", []), refs, source=str(tree_path))


def load_records(
    tx: Transaction,
    state: OrgState,
    records: Sequence[Mapping[str, Any]],
    refs: dict[str, str],
    *,
    source: str,
    parent: tuple[str, str] | None = None,
) -> None:
    """Create tree records (and their nested children) in ``tx``."""
    for record in records:
        attributes = record.get("attributes", {})
        object_name = attributes.get("type")
        obj = state.schema.get(str(object_name)) if object_name else None
        if obj is None:
            raise SeedError(f"{source}: unknown object type {object_name!r}")
        values: dict[str, Any] = {}
        children: list[tuple[str, list[Mapping[str, Any]]]] = []
        for key, value in record.items():
            if key == "attributes":
                continue
            if isinstance(value, dict) and "records" in value:
                children.append((key, value["records"]))
            else:
                values[key] = _resolve(value, refs, source)
        if parent is not None:
            values[parent[0]] = parent[1]
        try:
            record_id = tx.create(obj.name, values, system=True)
        except Exception as exc:
            raise SeedError(
                f"{source}: record {attributes.get('referenceId')!r}: {exc}"
            ) from exc
        if attributes.get("referenceId"):
            refs[str(attributes["referenceId"])] = record_id
        for relationship, child_records in children:
            field = _child_field(state, obj, relationship, source)
            load_records(
                tx, state, child_records, refs, source=source, parent=(field, record_id)
            )


def _resolve(value: Any, refs: Mapping[str, str], source: str) -> Any:
    if isinstance(value, str) and value.startswith("@"):
        if value[1:] not in refs:
            raise SeedError(f"{source}: unresolved reference {value!r}")
        return refs[value[1:]]
    return value


def _child_field(
    state: OrgState, parent: ObjectSchema, relationship: str, source: str
) -> str:
    for obj in state.schema.objects.values():
        for field in obj.fields.values():
            if parent.name not in field.reference_to:
                continue
            name = field.child_relationship_name or obj.label_plural.replace(" ", "")
            if name.lower() == relationship.lower():
                return field.name
    raise SeedError(
        f"{source}: {parent.name} has no child relationship {relationship!r}"
    )


def _account(
    ref: str, name: str, street: str, city: str, state: str, postal: str, **extra: Any
) -> dict[str, Any]:
    return {
        "attributes": {"type": "Account", "referenceId": ref},
        "Name": name,
        "BillingStreet": street,
        "BillingCity": city,
        "BillingState": state,
        "BillingPostalCode": postal,
        "BillingCountry": "US",
        **extra,
    }


# A few standard records with realistic values: US billing addresses carry
# state codes (NH, VT, ME), as Salesforce orgs with state picklists store them.
STANDARD_SEED: list[dict[str, Any]] = [
    _account(
        "StdAccount1",
        "Acme Tools",
        "12 Harbor Rd",
        "Portsmouth",
        "NH",
        "03801",
        Phone="555-0100",
        Industry="Machinery",
        Rating="Warm",
        Type="Customer - Direct",
        Contacts={
            "records": [
                {
                    "attributes": {"type": "Contact", "referenceId": "StdContact1"},
                    "FirstName": "Dana",
                    "LastName": "Whitfield",
                    "Salutation": "Ms.",
                    "Title": "Purchasing Manager",
                    "Email": "dana.whitfield@acme.example",
                    "Phone": "555-0101",
                    "MailingStreet": "12 Harbor Rd",
                    "MailingCity": "Portsmouth",
                    "MailingState": "NH",
                    "MailingPostalCode": "03801",
                    "MailingCountry": "US",
                },
            ]
        },
    ),
    _account(
        "StdAccount2",
        "Birch Supply",
        "4 Mill St",
        "Keene",
        "NH",
        "03431",
        Phone="555-0200",
        Industry="Retail",
        Rating="Cold",
        Type="Customer - Channel",
        Contacts={
            "records": [
                {
                    "attributes": {"type": "Contact", "referenceId": "StdContact2"},
                    "FirstName": "Luis",
                    "LastName": "Ortega",
                    "Title": "Owner",
                    "Email": "luis@birchsupply.example",
                    "Phone": "555-0201",
                },
            ]
        },
    ),
    _account(
        "StdAccount3",
        "Green Mountain Cycles",
        "88 Church St",
        "Burlington",
        "VT",
        "05401",
        Phone="802-555-0142",
        Industry="Recreation",
        Website="https://greenmountaincycles.example",
    ),
    _account(
        "StdAccount4",
        "Casco Bay Outfitters",
        "210 Commercial St",
        "Portland",
        "ME",
        "04101",
        Phone="207-555-0178",
        Industry="Retail",
        Rating="Hot",
    ),
    {
        "attributes": {"type": "Pricebook2", "referenceId": "StdPricebook"},
        "Name": "Standard Price Book",
        "IsActive": True,
        "IsStandard": True,
    },
    {
        "attributes": {"type": "Product2", "referenceId": "StdProduct1"},
        "Name": "Trail Helmet",
        "ProductCode": "HLM-100",
        "Family": "Accessories",
        "IsActive": True,
        "StockKeepingUnit": "HLM-100-M",
    },
    {
        "attributes": {"type": "Product2", "referenceId": "StdProduct2"},
        "Name": "Commuter E-Bike",
        "ProductCode": "EBK-200",
        "Family": "Bikes",
        "IsActive": True,
        "StockKeepingUnit": "EBK-200-L",
    },
    {
        "attributes": {"type": "PricebookEntry", "referenceId": "StdEntry1"},
        "Pricebook2Id": "@StdPricebook",
        "Product2Id": "@StdProduct1",
        "UnitPrice": 89.0,
        "IsActive": True,
    },
    {
        "attributes": {"type": "PricebookEntry", "referenceId": "StdEntry2"},
        "Pricebook2Id": "@StdPricebook",
        "Product2Id": "@StdProduct2",
        "UnitPrice": 2499.0,
        "IsActive": True,
    },
]
