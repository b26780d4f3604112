"""The [[entities]] and [sync] settings: parsed, or refused naming key and fix."""

from __future__ import annotations

import tomllib
from typing import Any

import pytest

from replicator.config import parse
from replicator.errors import ConfigError
from replicator.mapping.config import EntitySettings

EXAMPLE = """
[replica]
dsn = "postgresql://replica/db"

[sync]
tie_window_seconds = 2
precedence = ["salesforce", "erp"]

[[entities]]
name = "customer"
salesforce = "Account"
erp = "public.customers"
external_id = "ERP_Customer_Id__c"
erp_sf_id_column = "sf_account_id"
direction = "both"
owner = "salesforce"
delete_policy = "mark"
  [[entities.fields]]
  name = "company_name"
  salesforce = "Name"
  erp = "company_name"
  [[entities.fields]]
  name = "region"
  salesforce = "BillingState"
  erp = "region"
  owner = "erp"
  enforce = true
  transform = "us_state"
  [[entities.fields]]
  name = "postal_code"
  salesforce = "BillingPostalCode"
  erp = "postal_code"
  [[entities.fields]]
  name = "phone"
  salesforce = "Phone"
  erp = "phone"
  [[entities.match]]
  fields = ["company_name", "postal_code"]
  [[entities.validate]]
  field = "phone"
  rule = "phone"
"""


def _data() -> dict[str, Any]:
    return tomllib.loads(EXAMPLE)


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(data)
    return str(caught.value)


def test_example_entity_parses_with_sync_settings() -> None:
    settings = parse(_data())

    entity = settings.entities[0]
    assert entity.name == "customer"
    assert entity.sources == frozenset({"erp", "salesforce"})
    assert entity.owner_of(entity.field("region")) == "erp"
    assert entity.owner_of(entity.field("phone")) == "salesforce"
    assert entity.validate_[0].rule == "phone"
    assert entity.match[0].fields == ("company_name", "postal_code")
    assert settings.sync.tie_window_seconds == 2
    assert settings.sync.precedence == ("salesforce", "erp")


def test_defaults_without_entities_or_sync() -> None:
    settings = parse({"replica": {"dsn": "postgresql://replica/db"}})

    assert settings.entities == ()
    assert settings.sync.tie_window_seconds == 1
    assert settings.sync.precedence == ("erp", "salesforce")


def test_entity_transform_is_bound_to_its_field() -> None:
    entity = parse(_data()).entities[0]

    transform = entity.transform("region")

    assert transform is not None
    assert transform.field == "region"
    assert transform.to_unified("WA") == "Washington"
    assert entity.transform("phone") is None


def test_owner_that_is_not_a_source_names_key_and_fix() -> None:
    data = _data()
    data["entities"][0]["direction"] = "to_salesforce"  # only the ERP is a source

    message = _error(data)

    assert message.startswith("entities.0: entity 'customer': owner = 'salesforce'")
    assert "is not a source" in message
    assert "set owner to one of them or change direction" in message
    assert "{" not in message  # no dump of the input


def test_field_owner_that_is_not_a_source_names_the_field() -> None:
    data = _data()
    data["entities"][0]["direction"] = "to_erp"
    del data["entities"][0]["owner"]

    message = _error(data)

    assert "fields[1].owner = 'erp' (field 'region') is not a source" in message


def test_field_listed_twice_is_one_error() -> None:
    data = _data()
    data["entities"][0]["fields"].append(
        {"name": "city", "salesforce": "Name", "erp": "city"}
    )

    message = _error(data)

    assert "fields[].salesforce 'Name' is listed twice" in message
    assert "keep one [[entities.fields]] entry" in message


def test_unknown_transform_names_key_and_known_ones() -> None:
    data = _data()
    data["entities"][0]["fields"][0]["transform"] = "soundex"

    message = _error(data)

    assert message.startswith("entities.0.fields.0.transform: unknown transform")
    assert "us_state" in message
    assert "Adding a transform" in message


def test_bad_transform_arguments_are_refused_at_load() -> None:
    data = _data()
    data["entities"][0]["fields"][0]["transform"] = "decimal(2,5)"

    assert "s <= p" in _error(data)


def test_unknown_rule_names_key_and_known_ones() -> None:
    data = _data()
    data["entities"][0]["validate"][0]["rule"] = "luhn"

    message = _error(data)

    assert message.startswith("entities.0.validate.0: rule = 'luhn': unknown")
    assert "email" in message


def test_validate_and_match_on_unmapped_fields_are_refused() -> None:
    data = _data()
    data["entities"][0]["validate"][0]["field"] = "email"
    data["entities"][0]["match"][0]["fields"] = ["vat_number"]

    message = _error(data)

    assert "validate[0].field = 'email' is not a field" in message
    assert "match[0].fields names 'vat_number', not a field" in message


def test_enforce_without_any_owner_is_refused() -> None:
    data = _data()
    del data["entities"][0]["owner"]
    del data["entities"][0]["fields"][1]["owner"]

    assert "fields[1].enforce = true (field 'region') needs an owner" in _error(data)


def test_precedence_must_name_both_systems() -> None:
    data = _data()
    data["sync"]["precedence"] = ["erp", "erp"]

    message = _error(data)

    assert message.startswith("sync.precedence: precedence = ['erp', 'erp']")


def test_same_object_in_two_entities_is_refused() -> None:
    data = _data()
    twin = dict(data["entities"][0], name="customer_copy", erp="public.suppliers")
    data["entities"].append(twin)

    message = _error(data)

    assert (
        "entities: entities[].salesforce 'Account' appears in two entities" in message
    )


def test_unknown_key_in_an_entity_is_refused() -> None:
    data = _data()
    data["entities"][0]["owners"] = "erp"

    assert "entities.0.owners: unknown key" in _error(data)


def test_entity_settings_are_frozen() -> None:
    entity = parse(_data()).entities[0]

    with pytest.raises(ValueError, match="frozen"):
        entity.name = "other"  # type: ignore[misc]
    assert isinstance(entity, EntitySettings)
