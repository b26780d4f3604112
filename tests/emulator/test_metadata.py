"""SFDX source-format metadata: field types, picklists, prefixes, platform events."""

from __future__ import annotations

from pathlib import Path

from replicator.emulator.app import EBIKES_DIR
from replicator.emulator.metadata import custom_prefix, load_metadata, parse_field
from replicator.emulator.standard import standard_schema

OBJECTS = EBIKES_DIR / "objects"


def test_ebikes_objects_load_with_deterministic_prefixes() -> None:
    first, second = standard_schema(), standard_schema()

    loaded = load_metadata(OBJECTS, first)
    load_metadata(OBJECTS, second)

    assert loaded == ["Order_Item__c", "Order__c", "Product_Family__c", "Product__c"]
    prefixes = {name: first.objects[name].key_prefix for name in loaded}
    assert prefixes == {name: second.objects[name].key_prefix for name in loaded}
    assert len(set(prefixes.values())) == 4
    assert all(p.startswith("a") for p in prefixes.values())


def test_platform_events_are_kept_apart() -> None:
    schema = standard_schema()

    load_metadata(OBJECTS, schema)

    assert "Manufacturing_Event__e" not in schema.objects
    assert "Order_Id__c" in schema.platform_events["Manufacturing_Event__e"].fields


def test_field_types_map_to_describe_types() -> None:
    schema = standard_schema()
    load_metadata(OBJECTS, schema)
    order = schema.objects["Order__c"]
    item = schema.objects["Order_Item__c"]
    product = schema.objects["Product__c"]

    assert order.fields["Name"].auto_number_format == "O-{00000}"
    assert order.fields["Account__c"].type == "reference"
    assert order.fields["Account__c"].nillable is False
    assert order.fields["Account__c"].child_relationship_name == "Orders__r"
    assert order.fields["Status__c"].restricted_picklist is True
    assert order.fields["Status__c"].default_value == "Draft"
    assert item.fields["Price__c"].type == "currency"
    assert (item.fields["Price__c"].precision, item.fields["Price__c"].scale) == (6, 0)
    assert product.fields["Picture_URL__c"].type == "url"
    assert product.fields["Description__c"].type == "textarea"
    assert product.fields["Description__c"].length == 1000
    assert "OwnerId" in order.fields and "SystemModstamp" in order.fields


def _field(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "F__c.field-meta.xml"
    path.write_text(
        '<CustomField xmlns="http://soap.sforce.com/2006/04/metadata">'
        f"<fullName>F__c</fullName><label>F</label>{body}</CustomField>"
    )
    return path


def test_formula_and_summary_fields_are_calculated(tmp_path: Path) -> None:
    formula = parse_field(
        _field(
            tmp_path,
            "<type>Number</type><formula>A__c * 2</formula>"
            "<formulaReturnType>Number</formulaReturnType>",
        )
    )
    summary = parse_field(_field(tmp_path, "<type>Summary</type>"))

    assert (formula.calculated, formula.createable, formula.type) == (
        True,
        False,
        "double",
    )
    assert formula.formula == "A__c * 2"
    assert summary.calculated is True


def test_external_id_unique_and_required_flags(tmp_path: Path) -> None:
    field = parse_field(
        _field(
            tmp_path,
            "<type>Text</type><length>20</length><externalId>true"
            "</externalId><unique>true</unique><required>true</required>",
        )
    )

    assert (field.external_id, field.unique, field.nillable, field.length) == (
        True,
        True,
        False,
        20,
    )


def test_fields_of_a_standard_object_extend_it(tmp_path: Path) -> None:
    fields = tmp_path / "Account" / "fields"
    fields.mkdir(parents=True)
    (fields / "Tier__c.field-meta.xml").write_text(
        '<CustomField xmlns="http://soap.sforce.com/2006/04/metadata">'
        "<fullName>Tier__c</fullName><type>Checkbox</type>"
        "<defaultValue>false</defaultValue></CustomField>"
    )
    schema = standard_schema()

    load_metadata(tmp_path, schema)

    assert schema.objects["Account"].key_prefix == "001"
    assert schema.objects["Account"].fields["Tier__c"].type == "boolean"


def test_custom_prefixes_are_distinct() -> None:
    assert [custom_prefix(i) for i in (0, 1, 10, 62)] == ["a00", "a01", "a0A", "a10"]
