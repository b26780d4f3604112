"""Validation and transforms at ingestion, end to end: what fails waits in dead letters.

A value that fails a rule of the mapping (``[[entities.validate]]``) or that
its transform cannot map is quarantined with the reason; the mirror keeps the
source's value, nothing invalid reaches the other system, and the rest of the
same change goes on. A new record missing a required field is created nowhere.
Against real PostgreSQL and the emulator; expected values are read from the
systems (the ERP with asyncpg, Salesforce over REST).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import asyncpg
import pytest

from replicator.config import parse
from replicator.emulator.app import EmulatorConfig
from tests.fixtures.emulator import Served
from tests.fixtures.pg import ErpCase
from tests.test_sf_source import Org, org_client
from tests.test_sync import syncing, until

pytestmark = pytest.mark.integration

CUSTOMER_DDL = """
CREATE TABLE customer (
    customer_code text PRIMARY KEY,
    company_name text NOT NULL,
    phone text,
    email text,
    city text,
    country text,
    employees integer,
    rating text
);
INSERT INTO customer VALUES ('I-1', 'Iris Components', '603-555-0101',
    'orders@iris.example', 'Nashua', 'USA', 40, 'Warm');
"""
ACCOUNT_FIELDS = (
    "Id, Name, Phone, Billing_Email__c, BillingCity, BillingCountry, "
    "NumberOfEmployees, Rating, ERP_Customer_Code__c"
)
EMAIL_FIELD = """<?xml version="1.0" encoding="UTF-8"?>
<CustomField xmlns="http://soap.sforce.com/2006/04/metadata">
<fullName>Billing_Email__c</fullName><label>Billing Email</label>
<type>Text</type><length>80</length>
</CustomField>
"""
RULES = {
    "city": "required",
    "email": "email",
    "phone": "phone",
    "employees": "range(0,100000)",
    "rating": "picklist(Hot,Warm,Cold)",
}


def config_data(case: ErpCase, served: Served) -> dict[str, Any]:
    return {
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
            "objects": ["Account"],
            "long_poll_timeout_seconds": 2,
            "skew_seconds": 5,
            "client_name": "ERPSync",
        },
        "ops": {"listen": ""},
        "sync": {"tie_window_seconds": 0.001},
        "entities": [
            {
                "name": "customer",
                "salesforce": "Account",
                "erp": "public.customer",
                "external_id": "ERP_Customer_Code__c",
                "erp_new_key": "code(name)",
                "fields": [
                    {"name": "name", "salesforce": "Name", "erp": "company_name"},
                    {"name": "phone", "salesforce": "Phone", "erp": "phone"},
                    {"name": "email", "salesforce": "Billing_Email__c", "erp": "email"},
                    {"name": "city", "salesforce": "BillingCity", "erp": "city"},
                    {
                        "name": "country",
                        "salesforce": "BillingCountry",
                        "erp": "country",
                        "transform": "country_iso",
                    },
                    {
                        "name": "employees",
                        "salesforce": "NumberOfEmployees",
                        "erp": "employees",
                    },
                    {"name": "rating", "salesforce": "Rating", "erp": "rating"},
                ],
                "validate": [{"field": f, "rule": r} for f, r in RULES.items()],
            }
        ],
    }


@pytest.fixture(autouse=True)
def _sf_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    config = EmulatorConfig()
    monkeypatch.setenv("REPLICATOR_TEST_SF_SECRET", config.client_secret)
    monkeypatch.setenv(
        "REPLICATOR_TEST_SF_PASSWORD", config.password + config.security_token
    )


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """Other tests' `main` may have pointed logging at a stream since closed."""
    logger = logging.getLogger("replicator")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:] = []
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture
def ingest_config(f0_config: EmulatorConfig, account_metadata_dir: Path) -> Any:
    """F0's org plus a text field for the account's billing email."""
    fields = account_metadata_dir / "Account" / "fields"
    (fields / "Billing_Email__c.field-meta.xml").write_text(EMAIL_FIELD)
    return f0_config


class Systems:
    """The ERP, the org and the replica of one running sync."""

    def __init__(self, erp: asyncpg.Connection, org: Org, replica: asyncpg.Connection):
        self.erp, self.org, self.replica = erp, org, replica

    async def accounts(self, where: str) -> list[dict[str, Any]]:
        soql = f"SELECT {ACCOUNT_FIELDS} FROM Account WHERE {where}"
        body = await self.org.call("GET", "/query?q=" + quote_plus(soql))
        return list(body["records"])

    async def account_of(self, code: str) -> dict[str, Any] | None:
        found = await self.accounts(f"ERP_Customer_Code__c = '{code}'")
        return found[0] if found else None

    async def customer(self, where: str, *args: Any) -> asyncpg.Record | None:
        return await self.erp.fetchrow(f"SELECT * FROM customer WHERE {where}", *args)

    async def letters(self, key: str) -> dict[str, asyncpg.Record]:
        """Dead letters of one record, by field."""
        rows = await self.replica.fetch(
            "SELECT stream, reason, payload->>'field' AS field, "
            "payload->>'value' AS value FROM replicator.dead_letters "
            "WHERE source_key = $1 ORDER BY id",
            key,
        )
        return {r["field"]: r for r in rows}

    async def mirror(self, account_id: str) -> asyncpg.Record:
        return await self.replica.fetchrow(
            "SELECT * FROM sf.account WHERE id = $1", account_id
        )

    async def erp_writes(self, unified_id: str) -> list[str]:
        """The ERP columns the sync queued for one record, in order."""
        rows = await self.replica.fetch(
            "SELECT fields::text AS f FROM replicator.outbox WHERE target = 'erp' "
            "AND cause->>'unified_id' = $1 ORDER BY id",
            unified_id,
        )
        return [r["f"] for r in rows]


@contextlib.asynccontextmanager
async def running(
    case: ErpCase, serve_emulator: Any, config: EmulatorConfig
) -> AsyncIterator[Systems]:
    """The sync running, I-1 already copied to Salesforce."""
    erp = await asyncpg.connect(case.erp_dsn)
    await erp.execute(CUSTOMER_DDL)
    try:
        async with (
            serve_emulator(config) as served,
            org_client(served) as org,
            syncing(parse(config_data(case, served))),
        ):
            replica = await asyncpg.connect(case.replica_dsn)
            systems = Systems(erp, org, replica)
            try:
                await until(lambda: systems.account_of("I-1"))
                yield systems
            finally:
                await replica.close()
    finally:
        await erp.close()


async def test_invalid_values_of_a_salesforce_edit_wait_in_dead_letters(
    erp_case: ErpCase, serve_emulator: Any, ingest_config: EmulatorConfig
) -> None:
    """An edit with a bad email, phone, count and picklist value: each is
    quarantined under its rule, the mirror keeps it, the ERP never gets it,
    and the edit's valid city reaches the ERP."""
    async with running(erp_case, serve_emulator, ingest_config) as systems:
        erp_before = await systems.customer("customer_code = 'I-1'")
        iris = await systems.account_of("I-1")
        assert iris is not None
        assert erp_before is not None
        await systems.org.update(
            "Account",
            iris["Id"],
            Billing_Email__c="orders at iris",
            Phone="12",
            NumberOfEmployees=250000,
            Rating="Lukewarm",
            BillingCity="Manchester",
        )

        after = await until(
            lambda: systems.customer("customer_code = 'I-1' AND city = 'Manchester'")
        )
        letters = await systems.letters(iris["Id"])
        mirror = await systems.mirror(iris["Id"])
        unified = await systems.replica.fetchrow(
            "SELECT * FROM unified.customer WHERE erp_key = 'I-1'"
        )
        writes = await systems.erp_writes(unified["unified_id"])
        source = await systems.account_of("I-1")

    quarantined = {"email", "phone", "employees", "rating"}
    assert set(letters) == quarantined
    for field in quarantined:
        assert f"field {field!r}" in letters[field]["reason"]
        assert f"rule {RULES[field]!r}" in letters[field]["reason"]
        assert letters[field]["stream"] == "sync:salesforce"
    assert letters["email"]["value"] == "orders at iris"
    # the mirror shows the record as Salesforce has it
    assert source is not None
    assert (
        mirror["billing_email__c"],
        mirror["phone"],
        mirror["number_of_employees"],
        mirror["rating"],
    ) == (
        source["Billing_Email__c"],
        source["Phone"],
        source["NumberOfEmployees"],
        source["Rating"],
    )
    # nothing invalid reached the ERP or the unified row; the city did
    for column in ("email", "phone", "employees", "rating"):
        assert after[column] == erp_before[column], column
        assert not any(f'"{column}"' in w for w in writes), writes
    assert (unified["email"], unified["rating"]) == (
        erp_before["email"],
        erp_before["rating"],
    )
    assert (after["city"], unified["city"]) == ("Manchester", "Manchester")


async def test_unknown_country_from_salesforce_waits_and_the_rest_flows(
    erp_case: ErpCase, serve_emulator: Any, ingest_config: EmulatorConfig
) -> None:
    async with running(erp_case, serve_emulator, ingest_config) as systems:
        erp_before = await systems.customer("customer_code = 'I-1'")
        iris = await systems.account_of("I-1")
        assert iris is not None
        assert erp_before is not None
        await systems.org.update(
            "Account", iris["Id"], BillingCountry="Narnia", BillingCity="Concord"
        )

        after = await until(
            lambda: systems.customer("customer_code = 'I-1' AND city = 'Concord'")
        )
        letters = await systems.letters(iris["Id"])
        mirror = await systems.mirror(iris["Id"])

    assert set(letters) == {"country"}
    reason = letters["country"]["reason"]
    assert "country_iso" in reason
    assert "'Narnia'" in reason
    assert mirror["billing_country"] == "Narnia"
    assert after["country"] == erp_before["country"] == "USA"


async def test_unknown_country_from_the_erp_waits_and_the_rest_flows(
    erp_case: ErpCase, serve_emulator: Any, ingest_config: EmulatorConfig
) -> None:
    async with running(erp_case, serve_emulator, ingest_config) as systems:
        await systems.erp.execute(
            "UPDATE customer SET country = 'Atlantis', phone = '603-555-0202' "
            "WHERE customer_code = 'I-1'"
        )

        source = await until(
            lambda: systems.accounts(
                "ERP_Customer_Code__c = 'I-1' AND Phone = '603-555-0202'"
            )
        )
        letters = await systems.letters("I-1")

    assert source[0]["BillingCountry"] == "US"
    assert "country" in letters
    assert "'Atlantis'" in letters["country"]["reason"]


async def test_new_record_missing_a_required_field_is_created_nowhere(
    erp_case: ErpCase, serve_emulator: Any, ingest_config: EmulatorConfig
) -> None:
    """Neither an account nor an ERP customer without a city is copied; a
    record entered after each shows the stream went past it. Once the
    account gets its city, it is created in the ERP."""
    async with running(erp_case, serve_emulator, ingest_config) as systems:
        org, erp = systems.org, systems.erp
        quill = await org.create("Account", Name="Quill Outdoor", Phone="6035550303")
        await erp.execute(
            "INSERT INTO customer (customer_code, company_name, phone) "
            "VALUES ('R-1', 'Reed Mills', '603-555-0404')"
        )
        later = await org.create(
            "Account", Name="Later Account", BillingCity="Keene", Phone="6035550505"
        )
        await erp.execute(
            "INSERT INTO customer (customer_code, company_name, city) "
            "VALUES ('R-2', 'Later Customer', 'Keene')"
        )

        await until(lambda: systems.customer("company_name = 'Later Account'"))
        await until(lambda: systems.account_of("R-2"))
        quill_letters = await systems.letters(quill)
        reed_letters = await systems.letters("R-1")
        quill_in_erp = await systems.customer("company_name = 'Quill Outdoor'")
        reed_in_sf = await systems.account_of("R-1")
        unified = await systems.replica.fetchval(
            "SELECT count(*) FROM unified.customer WHERE sf_id = $1 OR erp_key = 'R-1'",
            quill,
        )
        # the missing city arrives: now the account is a customer
        await org.update("Account", quill, BillingCity="Dover")
        filled = await until(lambda: systems.customer("company_name = 'Quill Outdoor'"))

    assert later
    for letters in (quill_letters, reed_letters):
        assert set(letters) == {"city"}
        assert "rule 'required'" in letters["city"]["reason"]
    assert quill_letters["city"]["stream"] == "sync:salesforce"
    assert reed_letters["city"]["stream"] == "sync:erp"
    assert (quill_in_erp, reed_in_sf, unified) == (None, None, 0)
    assert (filled["city"], filled["phone"]) == ("Dover", "6035550303")
