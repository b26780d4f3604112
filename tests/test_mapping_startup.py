"""The mapping against the live schemas at start-up: real PostgreSQL and the emulator.

Each problem is one line of one ``ConfigError``; ``replicator run`` exits 2 with
those lines on stderr before any stream starts, and ``replicator check`` lists
them as failed items.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from replicator import check
from replicator.config import Settings, parse
from replicator.emulator.app import EmulatorConfig
from replicator.errors import ConfigError
from replicator.mapping.startup import (
    check_schemas,
    check_when_reachable,
    mapping_problems,
    read_erp,
)
from tests.fixtures.emulator import Served, ServeEmulator
from tests.fixtures.erp_daemon import Daemon
from tests.fixtures.pg import ErpCase

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# F0's customer (shared/cases/field-failures.md) plus a date and a parent key,
# and Northwind's us_states, which spells Iowa IO.
ERP_DDL = """
CREATE TABLE customer (
  customer_code text PRIMARY KEY, name text NOT NULL, phone text, industry text,
  rating text, credit_limit numeric(12,2), billing_street text, billing_city text,
  billing_state text, billing_postal text, billing_country text, notes text,
  attributes jsonb, sf_account_ref text, updated_at timestamp,
  customer_since date, parent_code text
);
CREATE TABLE us_states (
  state_id smallint PRIMARY KEY, state_name varchar(100), state_abbr varchar(2),
  state_region varchar(50)
);
INSERT INTO us_states VALUES (1, 'Iowa', 'IO', 'midwest'),
  (2, 'New Hampshire', 'NH', 'north-east');
"""

TAX_EXEMPT_XML = """<?xml version="1.0" encoding="UTF-8"?>
<CustomField xmlns="http://soap.sforce.com/2006/04/metadata">
<fullName>Tax_Exempt__c</fullName><label>Tax Exempt</label><type>Checkbox</type>
<defaultValue>false</defaultValue>
</CustomField>
"""

GOOD_FIELDS: list[dict[str, Any]] = [
    {"name": "name", "salesforce": "Name", "erp": "name"},
    {"name": "phone", "salesforce": "Phone", "erp": "phone"},
    {"name": "industry", "salesforce": "Industry", "erp": "industry",
     "owner": "salesforce"},
    {"name": "rating", "salesforce": "Rating", "erp": "rating", "owner": "salesforce"},
    {"name": "credit_limit", "salesforce": "Credit_Limit__c", "erp": "credit_limit",
     "owner": "erp"},
    {"name": "city", "salesforce": "BillingCity", "erp": "billing_city"},
    {"name": "state", "salesforce": "BillingState", "erp": "billing_state",
     "transform": "us_state"},
    {"name": "country", "salesforce": "BillingCountry", "erp": "billing_country",
     "transform": "country_iso"},
    {"name": "notes", "salesforce": "Description", "erp": "notes"},
    {"name": "parent", "salesforce": "ParentId", "erp": "parent_code",
     "reference": "customer"},
]  # fmt: skip


@pytest.fixture
def startup_config(account_metadata_dir: Path, tmp_path: Path) -> EmulatorConfig:
    """F0's org (custom Account fields) plus a Tax_Exempt__c checkbox."""
    extra = tmp_path / "extra" / "objects"
    (extra / "Account" / "fields").mkdir(parents=True)
    (extra / "Account" / "fields" / "Tax_Exempt__c.field-meta.xml").write_text(
        TAX_EXEMPT_XML
    )
    return EmulatorConfig.ebikes(
        metadata_dirs=(
            *EmulatorConfig.ebikes().metadata_dirs,
            account_metadata_dir,
            extra,
        ),
        long_poll_timeout_seconds=2.0,
    )


@pytest.fixture(autouse=True)
def _sf_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    config = EmulatorConfig()
    monkeypatch.setenv("REPLICATOR_TEST_SF_SECRET", config.client_secret)
    monkeypatch.setenv(
        "REPLICATOR_TEST_SF_PASSWORD", config.password + config.security_token
    )


@pytest.fixture
async def served(
    erp_case: ErpCase, serve_emulator: ServeEmulator, startup_config: EmulatorConfig
) -> AsyncIterator[Served]:
    """The ERP with F0's customer table, and the org served."""
    erp = await asyncpg.connect(erp_case.erp_dsn)
    try:
        await erp.execute(ERP_DDL)
    finally:
        await erp.close()
    async with serve_emulator(startup_config) as org:
        yield org


def config_data(
    case: ErpCase,
    served: Served,
    fields: list[dict[str, Any]],
    *,
    entity: dict[str, Any] | None = None,
    erp: dict[str, Any] | None = None,
    objects: tuple[str, ...] = ("Account",),
) -> dict[str, Any]:
    return {
        "replica": {"dsn": case.replica_dsn},
        "erp": {
            "database": {"dsn": case.erp_dsn},
            "slot": case.slot,
            "publication": case.publication,
            **(erp or {}),
        },
        "salesforce": {
            "login_url": served.url,
            "client_id": served.config.client_id,
            "client_secret_env": "REPLICATOR_TEST_SF_SECRET",
            "username": served.config.username,
            "password_env": "REPLICATOR_TEST_SF_PASSWORD",
            "objects": list(objects),
            "long_poll_timeout_seconds": 2,
            "client_name": "ERPSync",
        },
        "entities": [
            {
                "name": "customer",
                "salesforce": "Account",
                "erp": "public.customer",
                "external_id": "ERP_Customer_Code__c",
                "erp_new_key": "code(name)",
                "fields": fields,
                **(entity or {}),
            }
        ],
    }


def settings_for(
    case: ErpCase, served: Served, fields: list[dict[str, Any]], **kwargs: Any
) -> Settings:
    return parse(config_data(case, served, fields, **kwargs))


async def problems_of(settings: Settings) -> list[str]:
    """The problem lines of the ``ConfigError`` that ``check_schemas`` raises."""
    with pytest.raises(ConfigError) as raised:
        await check_schemas(settings)
    header, *lines = str(raised.value).splitlines()
    assert f"({len(lines)} problem" in header
    return lines


def with_field(**mapped: Any) -> list[dict[str, Any]]:
    return [*GOOD_FIELDS, mapped]


# -- in process ------------------------------------------------------------------


async def test_a_good_mapping_passes(erp_case: ErpCase, served: Served) -> None:
    settings = settings_for(erp_case, served, GOOD_FIELDS)

    problems = await mapping_problems(settings)
    await check_schemas(settings)  # raises nothing

    assert problems == []


async def test_the_erp_us_states_table_is_the_transforms_lookup(
    erp_case: ErpCase, served: Served
) -> None:
    settings = settings_for(erp_case, served, GOOD_FIELDS)
    assert settings.erp is not None

    tables, context = await read_erp(settings.erp, settings.entities)

    assert list(tables) == ["public.customer"]
    assert tables["public.customer"].columns["attributes"].mirror_type == "jsonb"
    assert context.us_states == {"Iowa": "IO", "New Hampshire": "NH"}


async def test_an_unknown_salesforce_field_is_one_line_with_a_suggestion(
    erp_case: ErpCase, served: Served
) -> None:
    settings = settings_for(
        erp_case,
        served,
        with_field(name="fax", salesforce="Faxx", erp="sf_account_ref"),
    )

    lines = await problems_of(settings)

    assert len(lines) == 1
    assert "fields[10] 'fax': salesforce = 'Faxx' is not a field of Account" in lines[0]
    assert "did you mean 'Fax'?" in lines[0]


async def test_an_unknown_erp_column_is_one_line(
    erp_case: ErpCase, served: Served
) -> None:
    settings = settings_for(
        erp_case, served, with_field(name="site", salesforce="Site", erp="web_site")
    )

    lines = await problems_of(settings)

    assert len(lines) == 1
    assert (
        "fields[10] 'site': erp = 'web_site' is not a column of public.customer"
        in (lines[0])
    )


async def test_a_date_column_onto_a_boolean_field_is_one_line(
    erp_case: ErpCase, served: Served
) -> None:
    settings = settings_for(
        erp_case,
        served,
        with_field(name="exempt", salesforce="Tax_Exempt__c", erp="customer_since"),
    )

    lines = await problems_of(settings)

    assert len(lines) == 1
    assert (
        "Account.Tax_Exempt__c (boolean) cannot map onto "
        "public.customer.customer_since (date) without a transform"
    ) in lines[0]


async def test_several_problems_give_one_line_each(
    erp_case: ErpCase, served: Served
) -> None:
    """Unknown object fields, columns and types are all reported in one go."""
    fields = [
        *GOOD_FIELDS,
        {"name": "fax", "salesforce": "Faxx", "erp": "phone_2"},
        {"name": "site", "salesforce": "Site", "erp": "web_site"},
        {"name": "exempt", "salesforce": "Tax_Exempt__c", "erp": "customer_since"},
    ]
    settings = settings_for(erp_case, served, fields)

    lines = await problems_of(settings)

    assert len(lines) == 4
    assert ["'fax'" in line for line in lines] == [True, True, False, False]
    assert "'Faxx' is not a field of Account" in lines[0]
    assert "'phone_2' is not a column" in lines[1]
    assert "'web_site' is not a column" in lines[2]
    assert "(boolean) cannot map onto" in lines[3]


async def test_an_unknown_table_and_an_unread_object_are_reported(
    erp_case: ErpCase, served: Served
) -> None:
    """A table the stream does not carry, and an object the stream does not read."""
    settings = settings_for(
        erp_case,
        served,
        GOOD_FIELDS,
        erp={"tables": ["public.us_states"]},
        objects=("Contact",),
    )

    lines = await problems_of(settings)

    assert len(lines) == 2
    assert "salesforce = 'Account' is not in [salesforce] objects" in lines[0]
    assert "erp = 'public.customer' is not a table the ERP publishes" in lines[1]


async def test_a_reference_to_an_unknown_entity_stops_at_load(
    erp_case: ErpCase, served: Served
) -> None:
    fields = with_field(
        name="owner_ref", salesforce="OwnerId", erp="sf_account_ref", reference="user"
    )

    with pytest.raises(ConfigError) as raised:
        settings_for(erp_case, served, fields)

    message = str(raised.value)
    assert "\n" not in message
    assert "field 'owner_ref': reference = 'user' is not an entity" in message


async def test_an_unreachable_erp_is_waited_for_until_stopped(
    erp_case: ErpCase, served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """A system that does not answer is no mapping problem: the check retries."""
    settings = parse(
        {
            **config_data(erp_case, served, GOOD_FIELDS),
            "erp": {"database": {"dsn": "postgresql://postgres@127.0.0.1:9/erp"}},
        }
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(1.5, stop.set)

    async with asyncio.timeout(10):
        await check_when_reachable(settings, stop)

    assert any("mapping schema check failed" in r.message for r in caplog.records)


async def test_check_lists_each_problem_as_a_failed_item(
    erp_case: ErpCase, served: Served
) -> None:
    good = settings_for(erp_case, served, GOOD_FIELDS)
    bad = settings_for(
        erp_case,
        served,
        with_field(name="exempt", salesforce="Tax_Exempt__c", erp="customer_since"),
    )

    passed = [i for i in await check.check(good) if i.name.startswith("mapping")]
    failed = [i for i in await check.check(bad) if i.name.startswith("mapping")]

    assert [(i.ok, i.detail) for i in passed] == [(True, "1 entities, 10 fields")]
    assert len(failed) == 1
    assert not failed[0].ok
    assert "(boolean) cannot map onto" in failed[0].detail


async def test_a_long_text_area_onto_a_jsonb_column_passes(
    erp_case: ErpCase, served: Served
) -> None:
    """F0 maps Account.Attributes__c (Long Text Area) onto customer.attributes."""
    settings = settings_for(
        erp_case,
        served,
        with_field(name="attributes", salesforce="Attributes__c", erp="attributes"),
    )

    assert await mapping_problems(settings) == []


# -- replicator run --------------------------------------------------------------


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for these configs: tables, arrays of tables, scalars, lists."""
    scalars, tables = [], []
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            tables.append(f"\n[{path}]\n" + to_toml(value, path))
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                tables.append(f"\n[[{path}]]\n" + to_toml(item, path))
        else:
            scalars.append(f"{key} = {json.dumps(value)}\n")
    return "".join(scalars) + "".join(tables)


async def run_daemon(tmp_path: Path, data: dict[str, Any]) -> tuple[int, str]:
    config = tmp_path / "replicator.toml"
    config.write_text(to_toml(data))
    daemon = Daemon(config, tmp_path)
    daemon.start()
    try:
        code = await daemon.wait(60)
    finally:
        daemon.close()
    return code, daemon.stderr()


async def test_run_exits_2_with_one_line_per_problem_before_any_stream(
    erp_case: ErpCase, served: Served, tmp_path: Path
) -> None:
    fields = [
        *GOOD_FIELDS,
        {"name": "fax", "salesforce": "Faxx", "erp": "sf_account_ref"},
        {"name": "site", "salesforce": "Site", "erp": "web_site"},
        {"name": "exempt", "salesforce": "Tax_Exempt__c", "erp": "customer_since"},
    ]

    code, stderr = await run_daemon(tmp_path, config_data(erp_case, served, fields))

    lines = stderr.strip().splitlines()
    slot = await _slot_exists(erp_case)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("replicator: configuration error: the mapping")
    assert "(3 problems)" in lines[0]
    assert len(lines) == 4
    assert "salesforce = 'Faxx' is not a field of Account" in lines[1]
    assert "erp = 'web_site' is not a column of public.customer" in lines[2]
    assert "Account.Tax_Exempt__c (boolean) cannot map onto" in lines[3]
    assert not slot  # no stream started


async def test_run_exits_2_for_a_reference_to_an_unknown_entity(
    erp_case: ErpCase, served: Served, tmp_path: Path
) -> None:
    fields = with_field(
        name="owner_ref", salesforce="OwnerId", erp="sf_account_ref", reference="user"
    )

    code, stderr = await run_daemon(tmp_path, config_data(erp_case, served, fields))

    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().count("\n") == 0
    assert "reference = 'user' is not an entity" in stderr


async def _slot_exists(case: ErpCase) -> bool:
    conn = await asyncpg.connect(case.erp_dsn)
    try:
        return bool(
            await conn.fetchval(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", case.slot
            )
        )
    finally:
        await conn.close()
