"""``verify`` of mapped entities: Salesforce, the ERP and the unified table agree.

The pure comparison is tested on hand-made snapshots; the integration tests
run the sync against real PostgreSQL and the emulator, then change each
system behind its back and read what verify reports.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from replicator.config import Settings, parse
from replicator.emulator.app import EmulatorConfig
from replicator.mapping.config import EntitySettings, FieldMap
from replicator.unified import sync_engine
from replicator.verify import print_reports
from replicator.verify_unified import (
    EntityReport,
    Link,
    Snapshot,
    agree,
    compare_entity,
    verify_entities,
)
from tests.fixtures.emulator import Served
from tests.fixtures.pg import ErpCase
from tests.test_sf_source import Org, org_client
from tests.test_sync import syncing, until

CUSTOMER = EntitySettings(
    name="customer",
    salesforce="Account",
    erp="public.customer",
    external_id="ERP_Customer_Code__c",
    fields=(
        FieldMap(name="name", salesforce="Name", erp="name"),
        FieldMap(name="phone", salesforce="Phone", erp="phone"),
        FieldMap(name="city", salesforce="BillingCity", erp="billing_city"),
        FieldMap(
            name="state",
            salesforce="BillingState",
            erp="billing_state",
            transform="us_state",
        ),
    ),
)


def unified_row(uid: str, sf_id: str | None, erp_key: str | None, **fields: Any) -> Any:
    return {
        "unified_id": uid,
        "sf_id": sf_id,
        "erp_key": erp_key,
        "deleted_at": fields.pop("deleted_at", None),
        **{f.name: fields.get(f.name) for f in CUSTOMER.fields},
    }


ACME = {"name": "Acme", "phone": "555-0100", "city": "Keene", "state": "Vermont"}
ACME_ERP = {
    "customer_code": "C-1",
    "name": "Acme",
    "phone": "555-0100",
    "billing_city": "Keene",
    "billing_state": "Vermont",
}
ACME_SF = {
    "Id": "001A",
    "Name": "Acme",
    "Phone": "555-0100",
    "BillingCity": "Keene",
    "BillingState": "VT",
}


# -- pure --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "unified"),
    [
        (Decimal("12.50"), "12.5"),
        (12.5, "12.50"),
        (7, "7.0"),
        ({"b": [1, 2.5], "a": None}, '{"a": null, "b": [1, 2.50]}'),
        ('{"a":  1}', '{"a": 1}'),
        ("2024-05-01T10:00:00.000+0000", "2024-05-01T12:00:00+02:00"),
        (dt.datetime(2024, 5, 1, 10, tzinfo=dt.UTC), "2024-05-01T10:00:00+00:00"),
        (True, "true"),
        (None, None),
    ],
)
def test_values_that_mean_the_same_agree(value: Any, unified: str | None) -> None:
    assert agree(value, unified)


@pytest.mark.parametrize(
    ("value", "unified"),
    [
        (Decimal("12.5"), "12.51"),
        ("01234", "1234"),  # text stays text: a postal code is no number
        ({"a": 1}, '{"a": 2}'),
        ("2024-05-01T10:00:00", "2024-05-01T10:00:00+00:00"),  # naive: no instant
        (False, "true"),
        ("", None),
        (None, "x"),
    ],
)
def test_values_that_differ_disagree(value: Any, unified: str | None) -> None:
    assert not agree(value, unified)


def test_rows_that_agree_under_the_transform_report_nothing() -> None:
    snapshot = Snapshot(
        [unified_row("erp:C-1", "001A", "C-1", **ACME)],
        {"C-1": ACME_ERP},
        {"001A": ACME_SF},
    )

    report = compare_entity(CUSTOMER, snapshot, {})

    assert report.ok
    assert (report.unified_rows, report.erp_rows, report.salesforce_rows) == (1, 1, 1)


def test_each_field_difference_is_one_line_with_all_three_values() -> None:
    snapshot = Snapshot(
        [unified_row("erp:C-1", "001A", "C-1", **ACME)],
        {"C-1": {**ACME_ERP, "phone": "555-0199"}},
        {"001A": {**ACME_SF, "BillingState": "NH"}},
    )

    report = compare_entity(CUSTOMER, snapshot, {})

    assert [d.line() for d in report.differences] == [
        "customer erp:C-1 phone: erp='555-0199' salesforce='555-0100' "
        "unified='555-0100'",
        "customer erp:C-1 state: erp='Vermont' salesforce='NH' (as 'New Hampshire') "
        "unified='Vermont'",
    ]


def test_direction_decides_which_unlinked_records_are_differences() -> None:
    """A to_erp entity needs every Salesforce record in the ERP, not the reverse;
    a record held by an open review awaits it and is no difference."""
    entity = CUSTOMER.model_copy(update={"direction": "to_erp"})
    snapshot = Snapshot(
        [unified_row("sf:001A", "001A", "C-1", **ACME)],
        {"C-1": ACME_ERP, "C-2": {**ACME_ERP, "customer_code": "C-2"}},
        {
            "001A": ACME_SF,
            "001B": {**ACME_SF, "Id": "001B"},
            "001C": {**ACME_SF, "Id": "001C"},
        },
        review={("salesforce", "001C")},
    )

    report = compare_entity(entity, snapshot, {})

    assert [d.line() for d in report.differences] == [
        "customer - record: erp=<missing> salesforce='001B' unified=<no row>"
    ]
    assert report.awaiting == ["customer salesforce record '001C'"]


def test_a_record_gone_from_its_system_is_a_difference_unless_deleted() -> None:
    snapshot = Snapshot(
        [
            unified_row("erp:C-1", "001A", "C-1", **ACME),
            unified_row(
                "erp:C-2", "001B", "C-2", deleted_at=dt.datetime.now(dt.UTC), **ACME
            ),
        ],
        {"C-1": ACME_ERP},
        {},
    )

    report = compare_entity(CUSTOMER, snapshot, {})

    assert [d.line() for d in report.differences] == [
        "customer erp:C-1 record: erp='C-1' salesforce=<gone '001A'> unified=linked"
    ]


def test_a_link_naming_another_record_is_a_difference() -> None:
    entity = CUSTOMER.model_copy(update={"erp_sf_id_column": "sf_id"})
    snapshot = Snapshot(
        [unified_row("erp:C-1", "001A", "C-1", **ACME)],
        {"C-1": {**ACME_ERP, "sf_id": "001B"}},
        {"001A": {**ACME_SF, "ERP_Customer_Code__c": "C-7"}},
    )

    report = compare_entity(entity, snapshot, {})

    assert [d.line() for d in report.differences] == [
        "customer erp:C-1 ERP_Customer_Code__c: erp='C-1' salesforce='C-7' "
        "unified=linked",
        "customer erp:C-1 sf_id: erp='001B' salesforce='001A' unified=linked",
    ]


def test_reference_fields_hold_the_referenced_rows_keys() -> None:
    contact = EntitySettings(
        name="contact",
        salesforce="Contact",
        erp="public.contact",
        external_id="ERP_Contact_Id__c",
        fields=(
            FieldMap(
                name="customer",
                salesforce="AccountId",
                erp="customer_code",
                reference="customer",
            ),
        ),
    )
    customers = {"erp:C-1": Link("001A", "C-1"), "erp:C-2": Link("001B", "C-2")}
    rows: list[dict[str, Any]] = [
        {"unified_id": f"erp:{n}", "sf_id": f"003{n}", "erp_key": str(n)}
        | {"deleted_at": None, "customer": "erp:C-1"}
        for n in (1, 2, 3)
    ]
    snapshot = Snapshot(
        rows,
        {
            "1": {"customer_code": "C-1"},
            "2": {"customer_code": "C-2"},
            "3": {"customer_code": "C-1"},
        },
        {
            "0031": {"AccountId": "001A"},
            "0032": {"AccountId": "001A"},
            "0033": {"AccountId": "001B"},
        },
    )

    report = compare_entity(contact, snapshot, {"customer": customers})

    unified = "unified='erp:C-1' (erp 'C-1', salesforce '001A')"
    assert [d.line() for d in report.differences] == [
        f"contact erp:2 customer: erp='C-2' salesforce='001A' {unified}",
        f"contact erp:3 customer: erp='C-1' salesforce='001B' {unified}",
    ]


def test_printed_differences_are_capped_with_a_count(
    capsys: pytest.CaptureFixture[str],
) -> None:
    snapshot = Snapshot(
        [unified_row(f"erp:C-{n}", None, f"C-{n}", **ACME) for n in range(5)],
        {f"C-{n}": ACME_ERP for n in range(5)},
        {},
    )

    report = compare_entity(CUSTOMER, snapshot, {}, sample=2)
    ok = print_reports([report])

    out = capsys.readouterr().out.splitlines()
    assert not ok
    assert report.mismatches == 5
    assert "DIFFERS (5 differences)" in out[0]
    assert out[1:] == [
        "      customer erp:C-0 record: erp='C-0' salesforce=<missing> unified=linked",
        "      customer erp:C-1 record: erp='C-1' salesforce=<missing> unified=linked",
        "      ... and 3 more differences",
        "verify: 0 tables, 1 entities, 1 with differences -> FAILED",
    ]


# -- against real PostgreSQL and the emulator ----------------------------------------

CUSTOMER_DDL = """
CREATE TABLE customer (customer_code text PRIMARY KEY, name text NOT NULL, phone text,
                       billing_city text, billing_state text);
"""


CONTACT_ID_FIELD = """<?xml version="1.0" encoding="UTF-8"?>
<CustomField xmlns="http://soap.sforce.com/2006/04/metadata">
<fullName>ERP_Contact_Id__c</fullName><label>ERP Contact Id</label><type>Text</type>
<length>20</length><externalId>true</externalId><unique>true</unique>
</CustomField>
"""


@pytest.fixture
def empty_org(account_metadata_dir: Path) -> EmulatorConfig:
    """E-Bikes' schema, F0's Account fields, a Contact external id; no records."""
    fields = account_metadata_dir / "Contact" / "fields"
    fields.mkdir(parents=True)
    (fields / "ERP_Contact_Id__c.field-meta.xml").write_text(CONTACT_ID_FIELD)
    return EmulatorConfig.ebikes(
        metadata_dirs=(*EmulatorConfig.ebikes().metadata_dirs, account_metadata_dir),
        seed_plans=(),
        seed_standard=False,
        long_poll_timeout_seconds=2.0,
    )


@pytest.fixture(autouse=True)
def _sf_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    config = EmulatorConfig()
    monkeypatch.setenv("REPLICATOR_TEST_SF_SECRET", config.client_secret)
    monkeypatch.setenv(
        "REPLICATOR_TEST_SF_PASSWORD", config.password + config.security_token
    )


def settings_for(
    case: ErpCase, served: Served, entities: list[EntitySettings]
) -> Settings:
    return parse(
        {
            "replica": {"dsn": case.replica_dsn},
            "erp": {
                "database": {"dsn": case.erp_dsn},
                "slot": case.slot,
                "publication": case.publication,
                "heartbeat_seconds": 0.2,
                "status_interval_seconds": 0.5,
            },
            "salesforce": {
                "login_url": served.url,
                "client_id": served.config.client_id,
                "client_secret_env": "REPLICATOR_TEST_SF_SECRET",
                "username": served.config.username,
                "password_env": "REPLICATOR_TEST_SF_PASSWORD",
                "objects": sorted({e.salesforce for e in entities}),
                "long_poll_timeout_seconds": 2,
                "skew_seconds": 5,
                "client_name": "ERPSync",
            },
            "ops": {"listen": ""},
            "sync": {"tie_window_seconds": 0.001},
            "entities": [e.model_dump(by_alias=True) for e in entities],
        }
    )


async def account_by_code(org: Org, code: str) -> dict[str, Any] | None:
    soql = f"SELECT Id FROM Account WHERE ERP_Customer_Code__c = '{code}'"
    body = await org.call("GET", "/query?q=" + soql.replace(" ", "+"))
    return body["records"][0] if body["records"] else None


async def agreeing(settings: Settings) -> list[EntityReport] | None:
    reports = await verify_entities(settings)
    return reports if all(r.ok for r in reports) else None


async def cli_verify(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run ``replicator verify`` in-process on ``settings``; return its exit code."""
    from replicator import config
    from replicator.cli import main

    monkeypatch.setattr(config, "load", lambda path: settings)
    # main() points the replicator logger at this test's captured stdout
    logger = logging.getLogger("replicator")
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    monkeypatch.setattr(logger, "level", logger.level)
    return await asyncio.to_thread(main, ["verify", "--config", "replicator.toml"])


@pytest.mark.integration
async def test_verify_agrees_after_the_sync_then_reports_changes_behind_its_back(
    erp_case: ErpCase,
    serve_emulator: Any,
    empty_org: EmulatorConfig,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With the pipelines stopped, an ERP edit, a Salesforce edit, a deleted
    account and records created on each side are exactly what verify reports;
    an account held by an open duplicate review only awaits it."""
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(CUSTOMER_DDL)
    async with serve_emulator(empty_org) as served, org_client(served) as org:
        settings = settings_for(erp_case, served, [CUSTOMER])
        async with syncing(settings):
            await erp.execute(
                "INSERT INTO customer VALUES "
                "('C-1', 'Acme Tools', '555-0100', 'Portsmouth', 'New Hampshire'), "
                "('C-2', 'Birch Supply', '555-0200', 'Keene', 'New Hampshire')"
            )
            acme = await until(lambda: account_by_code(org, "C-1"))
            birch = await until(lambda: account_by_code(org, "C-2"))
            await org.update("Account", birch["Id"], BillingState="VT")
            await until(
                lambda: erp.fetchval(
                    "SELECT billing_state = 'Vermont' FROM customer "
                    "WHERE customer_code = 'C-2'"
                )
            )
            settled = await until(lambda: agreeing(settings), timeout=15)
        agreed = await cli_verify(settings, monkeypatch)
        agreed_out = capsys.readouterr().out

        await erp.execute(
            "UPDATE customer SET phone = '555-0199' WHERE customer_code = 'C-1';"
            "INSERT INTO customer VALUES ('C-3', 'Cedar Ltd', NULL, NULL, NULL)"
        )
        await org.update("Account", acme["Id"], BillingCity="Nashua")
        await org.delete("Account", birch["Id"])
        orphan = await org.create("Account", Name="Orphan Co")
        held = await org.create("Account", Name="Held Co")
        replica = await asyncpg.connect(erp_case.replica_dsn)
        # the columns of replicator.store.tables.match_review that verify reads
        await replica.execute(
            "CREATE TABLE IF NOT EXISTS unified.match_review (entity text, side text, "
            "record_key text, record jsonb, candidates jsonb, held text[], "
            "status text DEFAULT 'open')"
        )
        await replica.execute(
            "INSERT INTO unified.match_review (entity, side, record_key, record, "
            "candidates, held) VALUES ('customer', 'salesforce', $1, '{}', '[]', "
            "ARRAY['salesforce:' || $1, 'erp:C-9'])",
            held,
        )
        await replica.close()
        (report,) = await verify_entities(settings)
        broken = await cli_verify(settings, monkeypatch)
        broken_out = capsys.readouterr().out
    await erp.close()

    assert [r.mismatches for r in settled] == [0]
    assert settled[0].unified_rows == 2
    assert agreed == 0, agreed_out
    assert "unified.customer" in agreed_out
    assert "1 entities" in agreed_out
    lines = [d.line() for d in report.differences]
    assert lines == [
        "customer erp:C-1 phone: erp='555-0199' salesforce='555-0100' "
        "unified='555-0100'",
        "customer erp:C-1 city: erp='Portsmouth' salesforce='Nashua' "
        "unified='Portsmouth'",
        f"customer erp:C-2 record: erp='C-2' salesforce=<gone {birch['Id']!r}> "
        "unified=linked",
        "customer - record: erp='C-3' salesforce=<missing> unified=<no row>",
        f"customer - record: erp=<missing> salesforce={orphan!r} unified=<no row>",
    ]
    assert report.awaiting == [f"customer salesforce record {held!r}"]
    assert broken == 1
    assert all(f"      {line}" in broken_out.splitlines() for line in lines)


@pytest.mark.integration
async def test_reference_fields_are_checked_against_the_referenced_rows_keys(
    erp_case: ErpCase, serve_emulator: Any, empty_org: EmulatorConfig
) -> None:
    """A contact's customer is the customer's unified_id: the ERP must hold its
    ERP key and Salesforce its Id. The unified rows are written here, so the
    check does not depend on the sync's handling of references."""
    customer = CUSTOMER.model_copy(update={"fields": CUSTOMER.fields[:1]})
    contact = EntitySettings(
        name="contact",
        salesforce="Contact",
        erp="public.contact",
        external_id="ERP_Contact_Id__c",
        direction="to_erp",
        fields=(
            FieldMap(name="last_name", salesforce="LastName", erp="last_name"),
            FieldMap(
                name="customer",
                salesforce="AccountId",
                erp="customer_code",
                reference="customer",
            ),
        ),
    )
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(
        CUSTOMER_DDL + "CREATE TABLE contact (contact_id int PRIMARY KEY, "
        "last_name text, customer_code text REFERENCES customer);"
        "INSERT INTO customer (customer_code, name) VALUES ('C-1', 'Acme'), "
        "('C-2', 'Birch');"
        # an ERP-only contact: the entity only carries Salesforce to the ERP
        "INSERT INTO contact VALUES (1, 'Ng', 'C-1'), (2, 'Ode', 'C-1'), "
        "(3, 'Pym', 'C-2')"
    )
    replica = await asyncpg.connect(erp_case.replica_dsn)
    async with serve_emulator(empty_org) as served, org_client(served) as org:
        settings = settings_for(erp_case, served, [customer, contact])
        acme = await org.create("Account", Name="Acme")
        birch = await org.create("Account", Name="Birch")
        ng = await org.create("Contact", LastName="Ng", AccountId=acme)
        ode = await org.create("Contact", LastName="Ode", AccountId=acme)
        await sync_engine(settings, replica)
        await replica.executemany(
            "INSERT INTO unified.customer (unified_id, sf_id, erp_key, name) "
            "VALUES ($1, $2, $3, $4)",
            [("erp:C-1", acme, "C-1", "Acme"), ("erp:C-2", birch, "C-2", "Birch")],
        )
        await replica.executemany(
            "INSERT INTO unified.contact (unified_id, sf_id, erp_key, last_name, "
            "customer) VALUES ($1, $2, $3, $4, 'erp:C-1')",
            [(f"sf:{ng}", ng, "1", "Ng"), (f"sf:{ode}", ode, "2", "Ode")],
        )
        before = await verify_entities(settings)

        await erp.execute(
            "UPDATE contact SET customer_code = 'C-2' WHERE contact_id = 1"
        )
        await org.update("Contact", ode, AccountId=birch)
        after = await verify_entities(settings)
    await replica.close()
    await erp.close()

    assert [(r.entity, r.mismatches) for r in before] == [
        ("customer", 0),
        ("contact", 0),
    ]
    assert after[0].ok
    unified = f"unified='erp:C-1' (erp 'C-1', salesforce {acme!r})"
    assert [d.line() for d in after[1].differences] == [
        f"contact sf:{ng} customer: erp='C-2' salesforce={acme!r} {unified}",
        f"contact sf:{ode} customer: erp='C-1' salesforce={birch!r} {unified}",
    ]
