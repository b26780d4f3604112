"""Describe results and record rendering for REST: what a client sees of the schema.

``describe_object`` builds ``/sobjects/<Type>/describe``; ``render_record``
turns a stored record into its REST JSON shape (``attributes``, flat fields,
compound address fields as objects with lower-case keys). The query part
renders its rows with ``render_record`` too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from replicator.emulator.schema import FieldSchema, ObjectSchema, OrgSchema

__all__ = [
    "describe_field",
    "describe_global_entry",
    "describe_object",
    "record_url",
    "render_record",
]

_SOAP_TYPES = {
    "id": "tns:ID",
    "reference": "tns:ID",
    "boolean": "xsd:boolean",
    "int": "xsd:int",
    "double": "xsd:double",
    "currency": "xsd:double",
    "percent": "xsd:double",
    "date": "xsd:date",
    "datetime": "xsd:dateTime",
    "time": "xsd:time",
    "address": "urn:address",
    "location": "urn:location",
    "base64": "xsd:base64Binary",
}
_ADDRESS_PARTS = (
    ("city", "City"),
    ("country", "Country"),
    ("geocodeAccuracy", "GeocodeAccuracy"),
    ("latitude", "Latitude"),
    ("longitude", "Longitude"),
    ("postalCode", "PostalCode"),
    ("state", "State"),
    ("street", "Street"),
)


def record_url(version: str, object_name: str, record_id: str) -> str:
    return f"/services/data/v{version}/sobjects/{object_name}/{record_id}"


def render_record(
    obj: ObjectSchema,
    record: Mapping[str, Any],
    version: str,
    fields: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Return a record as REST returns it; ``fields`` are API names to keep."""
    out: dict[str, Any] = {
        "attributes": {
            "type": obj.name,
            "url": record_url(version, obj.name, record["Id"]),
        }
    }
    names = list(obj.fields) if fields is None else list(fields)
    for name in names:
        field = obj.fields[name]
        if field.type == "address":
            out[name] = _address(obj, name, record)
        elif field.type == "location":
            out[name] = _location(obj, name, record)
        else:
            out[name] = record.get(name)
    return out


def _address(
    obj: ObjectSchema, compound: str, record: Mapping[str, Any]
) -> dict[str, Any] | None:
    parts = {f.name for f in obj.compound_components(compound)}
    prefix = compound.removesuffix("Address")
    value: dict[str, Any] = {}
    for key, suffix in _ADDRESS_PARTS:
        name = prefix + suffix
        value[key] = record.get(name) if name in parts else None
    return value if any(v is not None for v in value.values()) else None


def _location(
    obj: ObjectSchema, compound: str, record: Mapping[str, Any]
) -> dict[str, Any] | None:
    parts = {f.name: f for f in obj.compound_components(compound)}
    latitude = next((record.get(n) for n in parts if n.endswith("Latitude__s")), None)
    longitude = next((record.get(n) for n in parts if n.endswith("Longitude__s")), None)
    if latitude is None and longitude is None:
        return None
    return {"latitude": latitude, "longitude": longitude}


def describe_field(field: FieldSchema) -> dict[str, Any]:
    """Return one entry of a describe result's ``fields``."""
    text_like = field.type not in _SOAP_TYPES
    auto = field.auto_number_format is not None
    return {
        "aggregatable": field.type not in ("textarea", "address", "location"),
        "autoNumber": auto,
        "byteLength": field.length * 3 if text_like or field.type == "id" else 0,
        "calculated": field.calculated,
        "calculatedFormula": field.formula,
        "cascadeDelete": False,
        "caseSensitive": False,
        "compoundFieldName": field.compound_field_name,
        "createable": field.createable,
        "custom": field.name.endswith("__c"),
        "defaultValue": field.default_value,
        "defaultedOnCreate": field.default_value is not None
        or field.type == "boolean"
        or auto
        or (not field.createable and not field.calculated and field.type != "address"),
        "digits": 18 if field.type == "int" else 0,
        "externalId": field.external_id,
        "extraTypeInfo": field.extra_type_info,
        "filterable": field.type not in ("textarea", "address", "location"),
        "groupable": field.type not in ("textarea", "double", "currency", "percent"),
        "htmlFormatted": field.extra_type_info == "richtextarea",
        "idLookup": field.name == "Id" or field.external_id,
        "label": field.label or field.name,
        "length": field.length if text_like or field.type == "id" else 0,
        "name": field.name,
        "nameField": field.name == "Name",
        "nillable": field.nillable,
        "picklistValues": [
            {
                "active": True,
                "defaultValue": value == field.default_value,
                "label": value,
                "validFor": None,
                "value": value,
            }
            for value in field.picklist_values
        ],
        "precision": field.precision,
        "referenceTo": list(field.reference_to),
        "relationshipName": field.relationship_name,
        "restrictedPicklist": field.restricted_picklist,
        "scale": field.scale,
        "soapType": _SOAP_TYPES.get(field.type, "xsd:string"),
        "sortable": field.type not in ("textarea", "address", "location"),
        "type": field.type,
        "unique": field.unique,
        "updateable": field.updateable,
    }


def describe_global_entry(obj: ObjectSchema, version: str) -> dict[str, Any]:
    """Return an object's entry in ``/sobjects`` (also its basic info)."""
    base = f"/services/data/v{version}/sobjects/{obj.name}"
    return {
        "activateable": False,
        "createable": True,
        "custom": obj.custom,
        "customSetting": False,
        "deletable": True,
        "deprecatedAndHidden": False,
        "feedEnabled": False,
        "keyPrefix": obj.key_prefix,
        "label": obj.label or obj.name,
        "labelPlural": obj.label_plural or obj.label or obj.name,
        "layoutable": True,
        "mergeable": obj.name in ("Account", "Contact", "Lead", "Case"),
        "name": obj.name,
        "queryable": True,
        "replicateable": True,
        "retrieveable": True,
        "searchable": True,
        "triggerable": True,
        "undeletable": True,
        "updateable": True,
        "urls": {
            "sobject": base,
            "describe": f"{base}/describe",
            "rowTemplate": f"{base}/{{ID}}",
        },
    }


def describe_object(
    schema: OrgSchema, obj: ObjectSchema, version: str
) -> dict[str, Any]:
    """Return the full describe result of one object."""
    result = describe_global_entry(obj, version)
    result.update(
        childRelationships=_child_relationships(schema, obj),
        fields=[describe_field(f) for f in obj.fields.values()],
        recordTypeInfos=[],
        supportedScopes=[
            {"label": "All " + (obj.label_plural or obj.name), "name": "everything"}
        ],
    )
    return result


def _child_relationships(schema: OrgSchema, obj: ObjectSchema) -> list[dict[str, Any]]:
    children = []
    for other in schema.objects.values():
        for field in other.fields.values():
            if field.type != "reference" or obj.name not in field.reference_to:
                continue
            children.append(
                {
                    "cascadeDelete": False,
                    "childSObject": other.name,
                    "deprecatedAndHidden": False,
                    "field": field.name,
                    "relationshipName": _plural_relationship(other, field),
                    "restrictedDelete": False,
                }
            )
    return children


def _plural_relationship(child: ObjectSchema, field: FieldSchema) -> str | None:
    # Custom lookups name it in their metadata ("Orders__r"); standard ones
    # default to the child's plural label ("Contacts").
    if field.child_relationship_name:
        return field.child_relationship_name
    return child.label_plural.replace(" ", "") if child.label_plural else None
