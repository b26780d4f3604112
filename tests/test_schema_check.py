"""The mapping against both schemas: emulator describe and a hand-built ERP catalog."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from replicator.emulator.describe import describe_object
from replicator.emulator.schema import FieldSchema
from replicator.emulator.standard import standard_schema
from replicator.mapping.config import EntitySettings
from replicator.mapping.schema_check import check_mapping
from replicator.mapping.transforms import TransformContext
from replicator.sources.erp.catalog import ColumnInfo, EnumType, TableInfo


def _describes() -> dict[str, dict[str, Any]]:
    schema = standard_schema()
    account = schema.objects["Account"]
    account.fields["ERP_Customer_Id__c"] = FieldSchema(
        "ERP_Customer_Id__c", "string", length=5, external_id=True, unique=True
    )
    account.fields["Plain_Code__c"] = FieldSchema("Plain_Code__c", "string", length=5)
    product = schema.objects["Product2"]
    product.fields["ERP_Product_Id__c"] = FieldSchema(
        "ERP_Product_Id__c", "double", precision=18, external_id=True
    )
    product.fields["Unit_Price__c"] = FieldSchema(
        "Unit_Price__c", "currency", precision=18, scale=2
    )
    product.fields["Stock__c"] = FieldSchema("Stock__c", "double", precision=18)
    return {
        name: describe_object(schema, schema.objects[name], "60.0")
        for name in ("Account", "Product2", "Order")
    }


def _table(name: str, columns: dict[str, str], key: tuple[str, ...]) -> TableInfo:
    schema, table = name.split(".")
    return TableInfo(
        oid=1, schema=schema, name=table, root_oid=1, root_schema=schema,
        root_name=table, key=key, replica_identity="d",
        columns={n: ColumnInfo(n, t) for n, t in columns.items()},
    )  # fmt: skip


TABLES = {
    "public.customers": _table("public.customers", {
        "customer_id": "character varying(5)",
        "company_name": "character varying(40)",
        "city": "character varying(15)",
        "region": "character varying(15)",
        "country": "character varying(15)",
        "phone": "character varying(24)",
        "sf_account_id": "character varying(18)",
        "since": "date",
        "active": "boolean",
    }, ("customer_id",)),
    "public.products": _table("public.products", {
        "product_id": "smallint",
        "product_name": "character varying(40)",
        "unit_price": "real",
        "units_in_stock": "smallint",
        "discontinued": "integer",
    }, ("product_id",)),
    "public.orders": _table("public.orders", {
        "order_id": "smallint",
        "shipped_date": "date",
        "order_date": "date",
        "freight": "real",
        "tags": "text[]",
    }, ("order_id",)),
}  # fmt: skip


def _customer(**changes: Any) -> EntitySettings:
    data: dict[str, Any] = {
        "name": "customer",
        "salesforce": "Account",
        "erp": "public.customers",
        "external_id": "ERP_Customer_Id__c",
        "erp_sf_id_column": "sf_account_id",
        "erp_new_key": "code(company_name)",
        "owner": "salesforce",
        "fields": [
            {"name": "company_name", "salesforce": "Name", "erp": "company_name"},
            {"name": "city", "salesforce": "BillingCity", "erp": "city"},
            {"name": "region", "salesforce": "BillingState", "erp": "region",
             "transform": "us_state"},
            {"name": "country", "salesforce": "BillingCountry", "erp": "country",
             "transform": "country_iso"},
            {"name": "phone", "salesforce": "Phone", "erp": "phone"},
        ],
    }  # fmt: skip
    data.update(changes)
    names = [f["name"] for f in data["fields"] if isinstance(f, dict)]
    if "erp_new_key" not in changes and "company_name" not in names and names:
        data["erp_new_key"] = f"code({names[0]})"  # a variant without the name
    return EntitySettings.model_validate(data)


def _product(fields: list[dict[str, Any]]) -> EntitySettings:
    return EntitySettings.model_validate({
        "name": "product", "salesforce": "Product2", "erp": "public.products",
        "external_id": "ERP_Product_Id__c", "owner": "erp", "fields": fields,
    })  # fmt: skip


def _one(entities: list[EntitySettings]) -> str:
    problems = check_mapping(entities, _describes(), TABLES)
    assert len(problems) == 1, problems
    return problems[0]


def test_northwind_mapping_passes() -> None:
    product = _product([
        {"name": "product_name", "salesforce": "Name", "erp": "product_name"},
        {"name": "unit_price", "salesforce": "Unit_Price__c", "erp": "unit_price",
         "transform": "decimal(18,2)"},
        {"name": "units_in_stock", "salesforce": "Stock__c", "erp": "units_in_stock"},
        {"name": "discontinued", "salesforce": "IsActive", "erp": "discontinued",
         "transform": "picklist(true=0, false=1)"},
    ])  # fmt: skip

    assert check_mapping([_customer(), product], _describes(), TABLES) == []


def test_unknown_object_and_table_are_one_line_each() -> None:
    entity = _customer(salesforce="Acount", erp="public.customer")

    problems = check_mapping([entity], _describes(), TABLES)

    assert len(problems) == 2
    assert problems[0].startswith(
        "entity 'customer' (entities[0]): salesforce = 'Acount' is not an object"
    )
    assert "did you mean 'Account'?" in problems[0]
    assert "erp = 'public.customer' is not a table" in problems[1]
    assert "did you mean 'public.customers'?" in problems[1]


def test_unknown_salesforce_field_suggests_the_api_name() -> None:
    entity = _customer(
        fields=[{"name": "city", "salesforce": "BilingCity", "erp": "city"}]
    )

    problem = _one([entity])

    assert (
        "fields[0] 'city': salesforce = 'BilingCity' is not a field of Account"
        in problem
    )
    assert "did you mean 'BillingCity'?" in problem


def test_unknown_erp_column_is_reported() -> None:
    entity = _customer(
        fields=[{"name": "city", "salesforce": "BillingCity", "erp": "town"}]
    )

    assert "erp = 'town' is not a column of public.customers" in _one([entity])


def test_external_id_must_be_an_external_id_in_describe() -> None:
    problem = _one([_customer(external_id="Plain_Code__c")])

    assert (
        "external_id = 'Plain_Code__c' is not an External ID field of Account"
        in problem
    )
    assert "tick External ID" in problem


def test_missing_external_id_field_is_reported() -> None:
    assert "is not a field of Account; create it" in _one(
        [_customer(external_id="X__c")]
    )


def test_sf_id_column_must_exist_and_hold_text() -> None:
    assert "erp_sf_id_column = 'sf_id' is not a column" in _one(
        [_customer(erp_sf_id_column="sf_id")]
    )
    assert "needs a text column" in _one([_customer(erp_sf_id_column="since")])


@pytest.mark.parametrize(
    ("sf_field", "erp_column", "expected"),
    [
        (
            "IsDeleted",
            "since",
            "(boolean) cannot map onto public.customers.since (date)",
        ),
        (
            "Name",
            "active",
            "(string) cannot map onto public.customers.active (boolean)",
        ),
        ("CreatedDate", "since", "add transform = 'date_datetime'"),
        ("BillingAddress", "city", "is a compound field; map its components"),
    ],
)
def test_types_that_cannot_map_are_reported(
    sf_field: str, erp_column: str, expected: str
) -> None:
    entity = _customer(
        fields=[{"name": "x", "salesforce": sf_field, "erp": erp_column}]
    )

    assert expected in _one([entity])


def test_text_onto_a_number_without_transform_is_reported() -> None:
    product = _product(
        [{"name": "price", "salesforce": "ProductCode", "erp": "unit_price"}]
    )

    problem = _one([product])

    assert (
        "Product2.ProductCode (string) cannot map onto public.products.unit_price"
        in problem
    )
    assert "without a transform" in problem


def test_transform_on_the_wrong_types_is_reported() -> None:
    product = _product([
        {"name": "name", "salesforce": "Name", "erp": "product_name",
         "transform": "decimal(18,2)"},
    ])  # fmt: skip

    problem = _one([product])

    assert (
        "transform 'decimal(18,2)' joins Salesforce number, not Product2.Name"
        in problem
    )


def test_read_only_salesforce_field_written_by_the_sync_is_reported() -> None:
    order = EntitySettings.model_validate({
        "name": "order", "salesforce": "Order", "erp": "public.orders",
        "external_id": "OrderNumber", "fields": [
            {"name": "freight", "salesforce": "TotalAmount", "erp": "freight",
             "transform": "decimal(18,2)"},
        ],
    })  # fmt: skip

    problems = check_mapping([order], _describes(), TABLES)

    assert any("Order.TotalAmount is read-only in Salesforce" in p for p in problems)
    assert any("'OrderNumber' is not an External ID field" in p for p in problems)


def test_read_only_field_owned_by_salesforce_is_fine() -> None:
    entity = _customer(
        fields=[{"name": "created", "salesforce": "CreatedDate", "erp": "since",
                 "transform": "date_datetime", "owner": "salesforce"}]
    )  # fmt: skip

    assert check_mapping([entity], _describes(), TABLES) == []


def test_array_and_enum_columns() -> None:
    tables = dict(TABLES)
    enum = EnumType("public", "tier", ("gold", "silver"))
    customers = TABLES["public.customers"]
    tables["public.customers"] = dataclasses.replace(customers, columns={
        **customers.columns,
        "tier": ColumnInfo("tier", 'erp."tier"', enum),
        "tags": ColumnInfo("tags", "text[]"),
    })  # fmt: skip
    entity = _customer(fields=[
        {"name": "tier", "salesforce": "Rating", "erp": "tier"},
        {"name": "tags", "salesforce": "Site", "erp": "tags"},
    ])  # fmt: skip

    problems = check_mapping([entity], _describes(), tables)

    assert len(problems) == 1
    assert (
        "public.customers.tags (text[]) has a type the sync cannot map" in problems[0]
    )


def test_context_is_used_to_build_transforms() -> None:
    context = TransformContext(us_states={"Oregon": "OR"})

    assert check_mapping([_customer()], _describes(), TABLES, context) == []


def test_text_erp_key_without_a_generator_is_one_line() -> None:
    """Records created in Salesforce need an ERP key: max + 1 cannot make a text one."""
    problems = check_mapping([_customer(erp_new_key=None)], _describes(), TABLES)
    to_salesforce = check_mapping(
        [_customer(erp_new_key=None, direction="to_salesforce", owner=None)],
        _describes(),
        TABLES,
    )

    assert len(problems) == 1
    assert "the ERP key customer_id is not a number" in problems[0]
    assert 'erp_new_key = "code(<a text field>)"' in problems[0]
    assert to_salesforce == []
