"""Two-way sync end to end: ERP and the emulator, resolution, outbox, no echo loops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from replicator.config import Settings, parse
from replicator.emulator.app import EmulatorConfig
from replicator.sinks.runner import run_outbox
from replicator.sources.erp.source import ErpPipeline
from replicator.sources.salesforce.source import SalesforcePipeline
from tests.fixtures.emulator import Served
from tests.fixtures.pg import ErpCase
from tests.test_sf_source import Org, org_client

pytestmark = pytest.mark.integration

CUSTOMER_DDL = """
CREATE TABLE customer (customer_code text PRIMARY KEY, name text NOT NULL, phone text,
                       billing_city text, billing_state text);
"""


def sync_settings(case: ErpCase, served: Served) -> Settings:
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
                "objects": ["Account"],
                "long_poll_timeout_seconds": 2,
                "skew_seconds": 5,
                "client_name": "ERPSync",
            },
            "ops": {"listen": ""},
            # edits in this test follow each other within milliseconds
            "sync": {"tie_window_seconds": 0.001},
            "entities": [
                {
                    "name": "customer",
                    "salesforce": "Account",
                    "erp": "public.customer",
                    "external_id": "ERP_Customer_Code__c",
                    "erp_new_key": "code(name)",
                    "direction": "both",
                    "delete_policy": "mark",
                    "fields": [
                        {"name": "name", "salesforce": "Name", "erp": "name"},
                        {"name": "phone", "salesforce": "Phone", "erp": "phone"},
                        {
                            "name": "city",
                            "salesforce": "BillingCity",
                            "erp": "billing_city",
                        },
                        {
                            "name": "state",
                            "salesforce": "BillingState",
                            "erp": "billing_state",
                            "transform": "us_state",
                        },
                    ],
                }
            ],
        }
    )


@pytest.fixture(autouse=True)
def _sf_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    config = EmulatorConfig()
    monkeypatch.setenv("REPLICATOR_TEST_SF_SECRET", config.client_secret)
    monkeypatch.setenv(
        "REPLICATOR_TEST_SF_PASSWORD", config.password + config.security_token
    )


@contextlib.asynccontextmanager
async def syncing(settings: Settings) -> AsyncIterator[None]:
    stop = asyncio.Event()
    erp, sf = ErpPipeline(settings), SalesforcePipeline(settings)
    tasks = [asyncio.create_task(erp.run(stop)), asyncio.create_task(sf.run(stop))]
    async with asyncio.timeout(30):
        await erp.ready.wait()
        await sf.ready.wait()
    tasks.append(asyncio.create_task(run_outbox(settings, stop)))
    try:
        yield
    finally:
        stop.set()
        async with asyncio.timeout(20):
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def until(check: Callable[[], Awaitable[Any]], timeout: float = 25) -> Any:
    last = None
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                last = await check()
                if last:
                    return last
                await asyncio.sleep(0.2)
    pytest.fail(f"condition never held (last value {last!r})")


async def account_by_code(org: Org, code: str) -> dict[str, Any] | None:
    body = await org.call(
        "GET",
        "/query?q="
        + (
            "SELECT Id, Name, Phone, BillingCity, BillingState FROM Account "
            f"WHERE ERP_Customer_Code__c = '{code}'"
        ).replace(" ", "+"),
    )
    return body["records"][0] if body["records"] else None


async def test_changes_flow_both_ways_with_transforms_and_no_echo_loop(
    erp_case: ErpCase, serve_emulator: Any, f0_config: EmulatorConfig
) -> None:
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(CUSTOMER_DDL)
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        settings = sync_settings(erp_case, served)
        async with syncing(settings):
            # a customer entered in the ERP is created in Salesforce, state as a code
            await erp.execute(
                "INSERT INTO customer VALUES ('C-1001', 'Acme Tools', "
                "'555-0100', 'Portsmouth', 'New Hampshire')"
            )
            created = await until(lambda: account_by_code(org, "C-1001"))
            # a Salesforce edit reaches the ERP, the state as a name
            await org.update(
                "Account",
                created["Id"],
                Phone="555-0199",
                BillingState="VT",
                BillingCity="Burlington",
            )
            erp_row = await until(
                lambda: erp.fetchrow(
                    "SELECT phone, billing_city, billing_state FROM customer "
                    "WHERE customer_code = 'C-1001' AND phone = '555-0199'"
                )
            )
            # an ERP edit reaches Salesforce
            await erp.execute(
                "UPDATE customer SET name = 'Acme Tools Ltd' "
                "WHERE customer_code = 'C-1001'"
            )
            renamed = await until(lambda: _named(org, "Acme Tools Ltd"))
            await asyncio.sleep(3)  # let any echo come back and settle
            replica = await asyncpg.connect(erp_case.replica_dsn)
            unified = await replica.fetchrow(
                "SELECT unified_id, sf_id, erp_key, name, phone, city, state "
                "FROM unified.customer WHERE erp_key = 'C-1001'"
            )
            # the accounts the org held at switch-on were created in the ERP;
            # only this customer's writes count here
            writes = await replica.fetch(
                "SELECT target, fields::text FROM replicator.outbox "
                "WHERE cause->>'unified_id' = $1 ORDER BY id",
                unified["unified_id"],
            )
            conflicts = await replica.fetch(
                "SELECT field, kept_value, kept_source, discarded_value, discarded_source "
                "FROM replicator.conflicts WHERE kept_source <> discarded_source "
                "AND entity_key = $1",
                unified["unified_id"],
            )
            await replica.close()

    await erp.close()
    assert created["BillingState"] == "NH"
    assert tuple(erp_row) == ("555-0199", "Burlington", "Vermont")
    assert renamed["Id"] == created["Id"]
    assert tuple(unified)[1:] == (
        created["Id"],
        "C-1001",
        "Acme Tools Ltd",
        "555-0199",
        "Burlington",
        "Vermont",
    )
    # one write per user edit and target: create in SF, the SF edit to the ERP,
    # the rename to SF; the echoes of those writes caused none
    assert [w["target"] for w in writes] == ["salesforce", "erp", "salesforce"]
    # the log holds exactly the values the later edits replaced; no echo of
    # our own writes ever competed with them
    # (the rename replaced an ERP value by an ERP value: not across sources)
    assert sorted((c["field"], c["discarded_value"]) for c in conflicts) == [
        ("city", "Portsmouth"),
        ("phone", "555-0100"),
        ("state", "New Hampshire"),
    ]


async def _named(org: Org, name: str) -> dict[str, Any] | None:
    record = await account_by_code(org, "C-1001")
    return record if record and record["Name"] == name else None


async def test_write_backs_and_operator_commands_land_in_the_audit_trail(
    erp_case: ErpCase, serve_emulator: Any, f0_config: EmulatorConfig, tmp_path: Any
) -> None:
    """Each write-back is audited with its cause and answer; pruning keeps recent rows."""
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(CUSTOMER_DDL)
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        settings = sync_settings(erp_case, served)
        async with syncing(settings):
            await erp.execute(
                "INSERT INTO customer VALUES ('C-7', 'Birch Supply', "
                "'555-0200', 'Keene', 'New Hampshire')"
            )
            created = await until(lambda: account_by_code(org, "C-7"))
            replica = await asyncpg.connect(erp_case.replica_dsn)
            audited = await until(
                lambda: replica.fetchrow(
                    "SELECT subject, detail->>'target' AS target, detail->'answer' AS answer, "
                    "detail->'cause'->>'source' AS source FROM replicator.audit "
                    "WHERE kind = 'write_back' "
                    "AND detail->'cause'->>'unified_id' = 'erp:C-7'"
                )
            )
    await erp.close()
    from replicator.store import audit

    await replica.execute("UPDATE replicator.audit SET at = now() - interval '10 days'")
    deleted = await audit.prune(replica, __import__("datetime").timedelta(days=5))
    left = await replica.fetchval("SELECT count(*) FROM replicator.audit")
    await replica.close()

    assert audited["target"] == "salesforce"
    assert audited["source"] == "erp"
    assert created["Id"] in audited["answer"]
    assert deleted["replicator.audit"] >= 1
    assert left == 0


async def test_echo_of_an_earlier_write_never_reverts_a_newer_value(
    erp_case: ErpCase, serve_emulator: Any, f0_config: EmulatorConfig
) -> None:
    """BUG-35: two quick ERP edits; the echo of the first write to Salesforce comes
    back after the second edit and must not flip the field back, nor be written
    to the ERP."""
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(CUSTOMER_DDL)
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        settings = sync_settings(erp_case, served)
        async with syncing(settings):
            await erp.execute(
                "INSERT INTO customer VALUES ('C-1001', 'Acme Tools', "
                "'555-0100', 'Portsmouth', 'New Hampshire')"
            )
            await until(lambda: account_by_code(org, "C-1001"))
            await erp.execute(
                "UPDATE customer SET phone = '555-0101' WHERE customer_code = 'C-1001'"
            )
            await erp.execute(
                "UPDATE customer SET phone = '555-0102' WHERE customer_code = 'C-1001'"
            )
            settled = await until(lambda: _phone_is(org, "555-0102"))
            await asyncio.sleep(3)  # every echo has come back by now
            final = await account_by_code(org, "C-1001")
            replica = await asyncpg.connect(erp_case.replica_dsn)
            uid = await replica.fetchval(
                "SELECT unified_id FROM unified.customer WHERE erp_key = 'C-1001'"
            )
            to_erp = await replica.fetchval(
                "SELECT count(*) FROM replicator.outbox WHERE target = 'erp' "
                "AND cause->>'unified_id' = $1",
                uid,
            )
            unified = await replica.fetchval(
                "SELECT phone FROM unified.customer WHERE unified_id = $1", uid
            )
            await replica.close()
            erp_phone = await erp.fetchval(
                "SELECT phone FROM customer WHERE customer_code = 'C-1001'"
            )

    await erp.close()
    assert settled["Phone"] == "555-0102"
    assert final is not None and final["Phone"] == "555-0102"
    assert (erp_phone, unified) == ("555-0102", "555-0102")
    assert to_erp == 0  # the engine never wrote to this ERP row


async def _phone_is(org: Org, phone: str) -> dict[str, Any] | None:
    record = await account_by_code(org, "C-1001")
    return record if record and record["Phone"] == phone else None


async def test_conflicts_list_shows_decisions_between_the_systems_by_default(
    erp_case: ErpCase,
    serve_emulator: Any,
    f0_config: EmulatorConfig,
    tmp_path: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from replicator.cli import main
    from replicator.store.tables import create_schema

    replica = await asyncpg.connect(erp_case.replica_dsn)
    await create_schema(replica)
    await replica.execute(
        "INSERT INTO replicator.conflicts (entity, entity_key, field, kept_value, "
        "kept_source, discarded_value, discarded_source, rule) VALUES "
        "('customer', 'erp:C-1', 'phone', '555-2', 'salesforce', '555-1', 'erp', 'lww'),"
        "('customer', 'erp:C-1', 'name', 'B', 'erp', 'A', 'erp', 'lww')"
    )
    await replica.close()
    config = tmp_path / "r.toml"
    config.write_text(f'[replica]\ndsn = "{erp_case.replica_dsn}"\n')

    across = await asyncio.to_thread(main, ["conflicts", "list", "-c", str(config)])
    across_out = capsys.readouterr().out
    every = await asyncio.to_thread(
        main, ["conflicts", "list", "--all", "-c", str(config)]
    )
    every_out = capsys.readouterr().out

    rows_across = across_out.strip().splitlines()[1:]  # under the header line
    rows_every = every_out.strip().splitlines()[1:]
    assert (across, every) == (0, 0)
    assert len(rows_across) == 1 and " phone " in rows_across[0]
    assert len(rows_every) == 2
    assert sorted(" name " in r for r in rows_every) == [False, True]
