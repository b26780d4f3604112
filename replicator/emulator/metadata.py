"""Load SFDX source-format object metadata into an ``OrgSchema``.

Reads ``objects/<Object>/<Object>.object-meta.xml`` and
``objects/<Object>/fields/*.field-meta.xml``. Custom objects get the usual
system fields and a ``Name`` field (text or auto-number) and a key prefix
``a00``, ``a01``, ... assigned in name order, so the same folder always
yields the same prefixes. Platform events (``__e``) have no records: they go
to ``OrgSchema.platform_events``. Fields on standard objects extend them.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from pathlib import Path

from replicator.emulator.schema import FieldSchema, ObjectSchema, OrgSchema
from replicator.emulator.standard import system_fields

__all__ = ["custom_prefix", "load_metadata", "parse_field"]

logger = logging.getLogger(__name__)

_NS = "{http://soap.sforce.com/2006/04/metadata}"
_PREFIX_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# metadata type -> (describe type, default length)
_TYPES: dict[str, tuple[str, int]] = {
    "Text": ("string", 255),
    "TextArea": ("textarea", 255),
    "LongTextArea": ("textarea", 32768),
    "Html": ("textarea", 32768),
    "EncryptedText": ("encryptedstring", 175),
    "Number": ("double", 0),
    "Currency": ("currency", 0),
    "Percent": ("percent", 0),
    "Checkbox": ("boolean", 0),
    "Date": ("date", 0),
    "DateTime": ("datetime", 0),
    "Time": ("time", 0),
    "Picklist": ("picklist", 255),
    "MultiselectPicklist": ("multipicklist", 4099),
    "Lookup": ("reference", 18),
    "MasterDetail": ("reference", 18),
    "Email": ("email", 80),
    "Phone": ("phone", 40),
    "Url": ("url", 255),
    "AutoNumber": ("string", 30),
    "Summary": ("double", 0),
}
_EXTRA_TYPE_INFO = {
    "TextArea": "plaintextarea",
    "LongTextArea": "plaintextarea",
    "Html": "richtextarea",
}


def custom_prefix(index: int) -> str:
    """Return the key prefix of the ``index``-th custom object: a00, a01, ..."""
    high, low = divmod(index, len(_PREFIX_CHARS))
    return "a" + _PREFIX_CHARS[high] + _PREFIX_CHARS[low]


def _text(element: ET.Element, tag: str) -> str | None:
    found = element.find(_NS + tag)
    return found.text.strip() if found is not None and found.text else None


def _flag(element: ET.Element, tag: str) -> bool:
    return _text(element, tag) == "true"


def _int(element: ET.Element, tag: str, default: int = 0) -> int:
    value = _text(element, tag)
    return int(value) if value else default


def parse_field(path: Path) -> FieldSchema:
    """Return the field described by one ``*.field-meta.xml`` file."""
    root = ET.parse(path).getroot()
    name = _text(root, "fullName") or path.name.split(".")[0]
    meta_type = _text(root, "type") or "Text"
    formula = _text(root, "formula")
    describe_type, default_length = _TYPES.get(meta_type, ("string", 255))
    if formula is not None:
        describe_type = _formula_type(_text(root, "formulaReturnType"))
    values, default, restricted = _picklist(root)
    calculated = formula is not None or meta_type == "Summary"
    required = _flag(root, "required") or meta_type == "MasterDetail"
    precision = _int(root, "precision")
    scale = _int(root, "scale")
    if meta_type == "Summary":
        precision, scale = 18, 2
    checkbox_default = _text(root, "defaultValue") if meta_type == "Checkbox" else None
    return FieldSchema(
        name=name,
        type=describe_type,
        label=_text(root, "label") or name,
        length=_int(root, "length", default_length) if default_length else 0,
        precision=precision,
        scale=scale,
        nillable=not required and meta_type != "Checkbox",
        createable=not calculated,
        updateable=not calculated
        and not (
            meta_type == "MasterDetail" and not _flag(root, "reparentableMasterDetail")
        ),
        calculated=calculated,
        external_id=_flag(root, "externalId"),
        unique=_flag(root, "unique"),
        reference_to=tuple(
            r.text.strip() for r in root.findall(_NS + "referenceTo") if r.text
        ),
        relationship_name=name.removesuffix("__c") + "__r"
        if meta_type in ("Lookup", "MasterDetail")
        else None,
        child_relationship_name=(_text(root, "relationshipName") or "") + "__r"
        if _text(root, "relationshipName")
        else None,
        picklist_values=values,
        restricted_picklist=restricted,
        default_value=default if default is not None else _bool(checkbox_default),
        extra_type_info=_EXTRA_TYPE_INFO.get(meta_type),
        formula=formula,
    )


def _bool(value: str | None) -> bool | None:
    return None if value is None else value.lower() == "true"


def _formula_type(return_type: str | None) -> str:
    mapping = {
        "Number": "double",
        "Currency": "currency",
        "Percent": "percent",
        "Checkbox": "boolean",
        "Date": "date",
        "DateTime": "datetime",
    }
    return mapping.get(return_type or "Text", "string")


def _picklist(root: ET.Element) -> tuple[tuple[str, ...], str | None, bool]:
    value_set = root.find(_NS + "valueSet")
    if value_set is None:
        return (), None, False
    values = []
    default = None
    for value in value_set.iter(_NS + "value"):
        full_name = _text(value, "fullName")
        if full_name is None:
            continue
        values.append(full_name)
        if _flag(value, "default"):
            default = full_name
    return tuple(values), default, _flag(value_set, "restricted")


def _name_field(root: ET.Element) -> FieldSchema:
    element = root.find(_NS + "nameField")
    label = (_text(element, "label") if element is not None else None) or "Name"
    if element is not None and _text(element, "type") == "AutoNumber":
        return FieldSchema(
            "Name",
            "string",
            label=label,
            length=80,
            nillable=False,
            createable=False,
            updateable=False,
            auto_number_format=_text(element, "displayFormat") or "{0}",
        )
    return FieldSchema("Name", "string", label=label, length=80)


def load_metadata(objects_dir: Path, schema: OrgSchema) -> list[str]:
    """Add every object under ``objects_dir`` to ``schema``; return their names."""
    loaded = []
    next_prefix = sum(1 for o in schema.objects.values() if o.custom)
    for folder in sorted(p for p in objects_dir.iterdir() if p.is_dir()):
        name = folder.name
        field_files = sorted((folder / "fields").glob("*.field-meta.xml"))
        fields = [parse_field(p) for p in field_files]
        existing = schema.get(name)
        if existing is not None:
            for field in fields:
                existing.fields[field.name] = field
            loaded.append(name)
            continue
        meta_file = folder / f"{name}.object-meta.xml"
        root = ET.parse(meta_file).getroot() if meta_file.exists() else ET.Element("x")
        obj = ObjectSchema(
            name=name,
            key_prefix=custom_prefix(next_prefix),
            label=_text(root, "label") or name,
            label_plural=_text(root, "pluralLabel") or name,
            custom=True,
        )
        if name.endswith("__e"):
            obj.fields = {f.name: f for f in fields}
            obj.cdc_enabled = False
            schema.platform_events[name] = obj
            logger.info("platform event skipped", extra={"object": name})
            continue
        next_prefix += 1
        owned = _text(root, "sharingModel") != "ControlledByParent"
        head, tail = system_fields(owner=owned)
        obj.fields = {f.name: f for f in [*head, _name_field(root), *fields, *tail]}
        schema.add(obj)
        loaded.append(name)
    logger.info("metadata loaded", extra={"dir": str(objects_dir), "objects": loaded})
    return loaded
