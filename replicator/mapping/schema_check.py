"""Check the entity mappings against both live schemas at start-up (pure).

Inputs are what the sources already read: Salesforce describe results and
the ERP catalog's :class:`TableInfo`. Each problem is one line naming the
entity, the TOML key and the fix; the daemon stops on any.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from replicator.mapping.config import EntitySettings, FieldMap
from replicator.mapping.transforms import Kind, TransformContext
from replicator.sources.erp.catalog import ColumnInfo, TableInfo

__all__ = ["check_mapping", "erp_kind", "salesforce_kind"]

_SF_KINDS: dict[str, Kind] = {
    **dict.fromkeys(
        ("string", "textarea", "picklist", "multipicklist", "combobox", "email",
         "phone", "url", "encryptedstring", "id", "reference", "base64"),
        "text",
    ),
    **dict.fromkeys(("int", "double", "currency", "percent"), "number"),
    "boolean": "boolean",
    "date": "date",
    "datetime": "datetime",
    "time": "time",
}  # fmt: skip
_ERP_PREFIXES: tuple[tuple[str, Kind], ...] = (
    ("character", "text"),
    ("varchar", "text"),
    ("char", "text"),
    ("text", "text"),
    ("citext", "text"),
    ("uuid", "text"),
    ("name", "text"),
    ("smallint", "number"),
    ("integer", "number"),
    ("bigint", "number"),
    ("real", "number"),
    ("double precision", "number"),
    ("numeric", "number"),
    ("decimal", "number"),
    ("money", "number"),
    ("boolean", "boolean"),
    ("date", "date"),
    ("timestamp", "datetime"),
    ("time", "time"),
    ("jsonb", "json"),
    ("json", "json"),
)
_SUGGEST = {
    ("text", "number"): "decimal(p,s) or a picklist",
    ("number", "number"): "decimal(p,s)",
    ("datetime", "date"): "date_datetime",
    ("boolean", "number"): "picklist(true=0, false=1)",
    ("boolean", "text"): "picklist(true=Y, false=N)",
    ("text", "text"): "us_state, country_iso or a picklist",
}


def salesforce_kind(field: Mapping[str, Any]) -> Kind | None:
    """The value kind of a describe field; None for compound (address, location)."""
    return _SF_KINDS.get(str(field.get("type", "string")))


def erp_kind(column: ColumnInfo) -> Kind | None:
    """The value kind of an ERP column; None for arrays and unknown types."""
    if column.enum is not None and not column.mirror_type.endswith("[]"):
        return "text"
    mirror_type = column.mirror_type.lower()
    if mirror_type.endswith("[]"):
        return None
    for prefix, kind in _ERP_PREFIXES:
        if mirror_type.startswith(prefix):
            return kind
    return None


def check_mapping(
    entities: Sequence[EntitySettings],
    sf_describes: Mapping[str, Mapping[str, Any]],
    erp_tables: Mapping[str, TableInfo],
    context: TransformContext | None = None,
) -> list[str]:
    """Return one line per problem of ``entities`` against both schemas."""
    problems: list[str] = []
    for index, entity in enumerate(entities):
        where = f"entity {entity.name!r} (entities[{index}])"
        describe = _describe(sf_describes, entity.salesforce)
        table = _table(erp_tables, entity.erp)
        if describe is None:
            problems.append(
                f"{where}: salesforce = {entity.salesforce!r} is not an object of the "
                "org; use its API name (Setup > Object Manager) and add it to "
                f"[salesforce] objects{_close(entity.salesforce, sf_describes)}"
            )
        if table is None:
            problems.append(
                f"{where}: erp = {entity.erp!r} is not a table the ERP publishes; "
                f"write schema.table{_close(entity.erp, erp_tables)}"
            )
        sf_fields = _fields(describe) if describe is not None else None
        if sf_fields is not None:
            problems += _external_id(where, entity, sf_fields)
        if table is not None:
            problems += _sf_id_column(where, entity, table)
            problems += _new_keys(where, entity, table)
        objects = {e.name: e.salesforce for e in entities}
        for position, mapped in enumerate(entity.fields):
            problems += _field(
                f"{where} fields[{position}] {mapped.name!r}",
                entity, mapped, sf_fields, table, context, objects,
            )  # fmt: skip
    return problems


def _describe(
    describes: Mapping[str, Mapping[str, Any]], name: str
) -> Mapping[str, Any] | None:
    found = describes.get(name)
    if found is None:
        found = next(
            (d for n, d in describes.items() if n.lower() == name.lower()), None
        )
    return found


def _table(tables: Mapping[str, TableInfo], name: str) -> TableInfo | None:
    found = tables.get(name)
    if found is None:
        found = next(
            (t for t in tables.values() if f"{t.schema}.{t.name}" == name), None
        )
    return found


def _fields(describe: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {str(f["name"]): f for f in describe.get("fields", ())}


def _close(name: str, known: Iterable[str]) -> str:
    found = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {found[0]!r}?)" if found else ""


def _external_id(
    where: str, entity: EntitySettings, fields: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    obj, name = entity.salesforce, entity.external_id
    field = fields.get(name)
    if field is None:
        return [
            f"{where}: external_id = {name!r} is not a field of {obj}; create it "
            f"(External ID, Unique) or fix the name{_close(name, fields)}"
        ]
    if not field.get("externalId"):
        return [
            f"{where}: external_id = {name!r} is not an External ID field of {obj}; "
            "tick External ID on it in Setup or name a field that has it"
        ]
    if salesforce_kind(field) not in ("text", "number"):
        return [
            f"{where}: external_id = {name!r} is a {field.get('type')} field; "
            "use a text or number External ID field"
        ]
    return []


def _sf_id_column(where: str, entity: EntitySettings, table: TableInfo) -> list[str]:
    name = entity.erp_sf_id_column
    if name is None:
        return []
    column = table.columns.get(name)
    if column is None:
        return [
            f"{where}: erp_sf_id_column = {name!r} is not a column of {entity.erp}; "
            f"add it (varchar(18)) or fix the name{_close(name, table.columns)}"
        ]
    if erp_kind(column) != "text":
        return [
            f"{where}: erp_sf_id_column = {name!r} is {column.mirror_type}; a "
            "Salesforce Id needs a text column such as varchar(18)"
        ]
    return []


def _new_keys(where: str, entity: EntitySettings, table: TableInfo) -> list[str]:
    """A record created from Salesforce needs an ERP key: mapped, or generated."""
    if "erp" not in entity.targets or not table.key:
        return []
    mapped = {f.erp for f in entity.fields}
    if all(column in mapped for column in table.key):
        return []  # keyed by its fields (an order line by its order and product)
    key = ", ".join(table.key)
    columns = [table.columns.get(c) for c in table.key]
    kinds = {erp_kind(c) if c is not None else None for c in columns}
    spec = entity.erp_new_key
    if len(table.key) > 1:
        return [
            f"{where}: the ERP key ({key}) has several columns that are not all "
            "mapped fields; map each key column, or set direction = 'to_salesforce'"
        ]
    if spec in (None, "next") and kinds != {"number"}:
        return [
            f"{where}: the ERP key {key} is not a number, so records created in "
            'Salesforce cannot take max + 1; set erp_new_key = "code(<a text '
            "field>)\" or direction = 'to_salesforce'"
        ]
    if spec is not None and spec.startswith("code(") and kinds != {"text"}:
        return [
            f"{where}: erp_new_key = {spec!r} makes letter codes but the ERP key "
            f"{key} is not text; use erp_new_key = 'next'"
        ]
    return []


def _field(
    where: str,
    entity: EntitySettings,
    mapped: FieldMap,
    sf_fields: Mapping[str, Mapping[str, Any]] | None,
    table: TableInfo | None,
    context: TransformContext | None,
    objects: Mapping[str, str] | None = None,
) -> list[str]:
    problems = []
    sf_field = column = None
    if sf_fields is not None:
        sf_field = sf_fields.get(mapped.salesforce)
        if sf_field is None:
            problems.append(
                f"{where}: salesforce = {mapped.salesforce!r} is not a field of "
                f"{entity.salesforce}; use its API name"
                f"{_close(mapped.salesforce, sf_fields)}"
            )
        else:
            problems += _writable(where, entity, mapped, sf_field)
    if table is not None:
        column = table.columns.get(mapped.erp)
        if column is None:
            problems.append(
                f"{where}: erp = {mapped.erp!r} is not a column of {entity.erp}; "
                f"fix the column name{_close(mapped.erp, table.columns)}"
            )
    if sf_field is not None and mapped.reference is not None:
        problems += _reference(where, entity, mapped, sf_field, objects or {})
    elif sf_field is not None and column is not None:
        problems += _types(where, entity, mapped, sf_field, column, context)
    return problems


def _reference(
    where: str,
    entity: EntitySettings,
    mapped: FieldMap,
    field: Mapping[str, Any],
    objects: Mapping[str, str],
) -> list[str]:
    """A reference field holds Ids of the referenced entity's object; the ERP any key."""
    target = objects.get(mapped.reference or "")
    pointing = [str(o) for o in field.get("referenceTo") or ()]
    if field.get("type") != "reference" or (target and target not in pointing):
        return [
            f"{where}: {entity.salesforce}.{mapped.salesforce} does not refer to "
            f"{target or mapped.reference!r} records (it is {field.get('type')}"
            + (f" to {', '.join(pointing)}" if pointing else "")
            + "); map the lookup field to that object, or remove reference"
        ]
    return []


def _writable(
    where: str, entity: EntitySettings, mapped: FieldMap, field: Mapping[str, Any]
) -> list[str]:
    """A field the sync may write to Salesforce must be createable or updateable."""
    if "salesforce" not in entity.targets or entity.owner_of(mapped) == "salesforce":
        return []
    if field.get("calculated") or not (
        field.get("createable") or field.get("updateable")
    ):
        return [
            f"{where}: {entity.salesforce}.{mapped.salesforce} is read-only in "
            "Salesforce (formula, roll-up or system field); set owner = "
            "'salesforce' on the field, or direction = 'to_erp', or remove it"
        ]
    return []


def _types(
    where: str,
    entity: EntitySettings,
    mapped: FieldMap,
    sf_field: Mapping[str, Any],
    column: ColumnInfo,
    context: TransformContext | None,
) -> list[str]:
    sf_kind, db_kind = salesforce_kind(sf_field), erp_kind(column)
    sf_type = f"{entity.salesforce}.{mapped.salesforce} ({sf_field.get('type')})"
    erp_type = f"{entity.erp}.{mapped.erp} ({column.mirror_type})"
    if sf_kind is None:
        return [
            f"{where}: {sf_type} is a compound field; map its components "
            "(e.g. BillingCity, BillingState) instead"
        ]
    if db_kind is None:
        return [
            f"{where}: {erp_type} has a type the sync cannot map; map another column"
        ]
    transform = entity.transform(mapped.name, context) if mapped.transform else None
    if transform is None:
        if sf_kind == db_kind or (sf_kind, db_kind) == ("text", "json"):
            return []  # a long text holds JSON; it is compared as JSON
        hint = _SUGGEST.get((sf_kind, db_kind))
        fix = f"add transform = {hint!r}" if hint else "map columns of matching types"
        return [
            f"{where}: {sf_type} cannot map onto {erp_type} without a transform; {fix}"
        ]
    wrong = []
    if transform.sf_kinds is not None and sf_kind not in transform.sf_kinds:
        wrong.append(
            f"Salesforce {'/'.join(sorted(transform.sf_kinds))}, not {sf_type}"
        )
    if transform.erp_kinds is not None and db_kind not in transform.erp_kinds:
        wrong.append(f"ERP {'/'.join(sorted(transform.erp_kinds))}, not {erp_type}")
    if not wrong:
        return []
    flip = " (or set reverse = true)" if mapped.reverse is False else ""
    return [
        f"{where}: transform {mapped.transform!r} joins "
        + " and ".join(wrong)
        + f"; pick a transform for these types{flip}"
    ]
