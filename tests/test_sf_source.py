"""The Salesforce source against the emulator over loopback HTTP and a real replica."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import pytest

from replicator.config import Settings, parse
from replicator.emulator.app import EmulatorConfig
from replicator.emulator.streaming import STREAMING_KEY
from replicator.sources.salesforce.source import SalesforcePipeline
from replicator.verify import TableReport, verify_sf
from tests.fixtures.emulator import Served, ServeEmulator
from tests.fixtures.pg import ErpCase

pytestmark = pytest.mark.integration

OBJECTS = ["Account", "Contact", "Opportunity", "Product__c"]


def sf_settings(
    case: ErpCase, served: Served, objects: list[str] = OBJECTS
) -> Settings:
    return parse(
        {
            "replica": {"dsn": case.replica_dsn},
            "salesforce": {
                "login_url": served.url,
                "client_id": served.config.client_id,
                "client_secret_env": "REPLICATOR_TEST_SF_SECRET",
                "username": served.config.username,
                "password_env": "REPLICATOR_TEST_SF_PASSWORD",
                "objects": objects,
                "long_poll_timeout_seconds": 2,
                "skew_seconds": 5,
            },
        }
    )


@pytest.fixture(autouse=True)
def _sf_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    config = EmulatorConfig()
    monkeypatch.setenv("REPLICATOR_TEST_SF_SECRET", config.client_secret)
    monkeypatch.setenv(
        "REPLICATOR_TEST_SF_PASSWORD", config.password + config.security_token
    )


@dataclass
class Org:
    """REST calls against the served emulator, as another user of the org would make."""

    served: Served
    http: aiohttp.ClientSession
    token: str

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        url = f"{self.served.url}/services/data/v60.0{path}"
        async with self.http.request(
            method, url, json=body, headers={"Authorization": f"Bearer {self.token}"}
        ) as resp:
            text = await resp.text()
            assert resp.status < 300, (resp.status, text)
            return await resp.json() if text else None

    async def create(self, obj: str, **fields: Any) -> str:
        return str((await self.call("POST", f"/sobjects/{obj}", fields))["id"])

    async def update(self, obj: str, record_id: str, **fields: Any) -> None:
        await self.call("PATCH", f"/sobjects/{obj}/{record_id}", fields)

    async def delete(self, obj: str, record_id: str) -> None:
        await self.call("DELETE", f"/sobjects/{obj}/{record_id}")


@contextlib.asynccontextmanager
async def org_client(served: Served) -> AsyncIterator[Org]:
    async with aiohttp.ClientSession() as http:
        yield Org(served, http, await served.token())


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[SalesforcePipeline]:
    pipeline = SalesforcePipeline(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(pipeline.run(stop))
    try:
        async with asyncio.timeout(30):
            while not pipeline.ready.is_set():
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
        yield pipeline
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await task


async def eventually_mirrored(
    settings: Settings, timeout: float = 20
) -> list[TableReport]:
    """Poll ``verify_sf`` until every mirror equals the org; fail with the last report."""
    reports: list[TableReport] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                reports = await verify_sf(settings)
                if all(r.ok for r in reports):
                    return reports
                await asyncio.sleep(0.3)
    pytest.fail(
        "mirror never equalled the org: "
        + "; ".join(
            f"{r.table}: missing {r.missing} extra {r.extra}"
            for r in reports
            if not r.ok
        )
    )


async def test_initial_load_then_live_changes_mirror_the_org(
    erp_case: ErpCase, emulator: Served
) -> None:
    settings = sf_settings(erp_case, emulator)
    async with running(settings), org_client(emulator) as org:
        loaded = await eventually_mirrored(settings)
        account = await org.create(
            "Account",
            Name="Velo Works",
            BillingStreet="12 Harbor Rd",
            BillingCity="Portsmouth",
            BillingState="NH",
            BillingPostalCode="03801",
            BillingCountry="US",
            Phone="555-0100",
            AnnualRevenue=1234567.89,
        )
        await org.update("Account", account, BillingCity="Keene")
        await org.update("Account", account, Phone=None)
        contact = await org.create(
            "Contact", LastName="Okafor", FirstName="Ada", AccountId=account
        )
        await org.update("Contact", contact, FirstName="Adaeze")
        gone = await org.create("Account", Name="Short Lived")
        await org.delete("Account", gone)
        await eventually_mirrored(settings)
        in_org = await org.call("GET", f"/sobjects/Account/{account}")

    replica = await asyncpg.connect(erp_case.replica_dsn)
    row = await replica.fetchrow(
        "SELECT billing_street, billing_city, billing_state, phone, annual_revenue::text "
        "FROM sf.account WHERE id = $1",
        account,
    )
    deleted = await replica.fetchval(
        "SELECT is_deleted FROM sf.account WHERE id = $1", gone
    )
    name = await replica.fetchval(
        "SELECT first_name FROM sf.contact WHERE id = $1", contact
    )
    await replica.close()
    assert {r.table for r in loaded} == {
        "sf.account",
        "sf.contact",
        "sf.opportunity",
        "sf.product__c",
    }
    assert min(r.source_rows for r in loaded if r.table == "sf.product__c") > 0
    assert tuple(row)[:4] == ("12 Harbor Rd", "Keene", "NH", None)
    assert float(row[4]) == in_org["AnnualRevenue"]
    assert deleted is True
    assert name == "Adaeze"


async def test_restart_resumes_from_stored_replay_ids_without_reapplying(
    erp_case: ErpCase, emulator: Served
) -> None:
    settings = sf_settings(erp_case, emulator, ["Account"])
    async with running(settings), org_client(emulator) as org:
        first = await org.create("Account", Name="Before Stop")
        await eventually_mirrored(settings)
    async with org_client(emulator) as org:
        await org.update("Account", first, Name="While Stopped")
        second = await org.create("Account", Name="Also While Stopped")

    async with running(settings) as pipeline:
        await eventually_mirrored(settings)
        stats = pipeline.stats

    assert stats.applied == 2
    assert stats.skipped == 0
    assert second


async def test_gap_events_reread_the_record_over_rest(
    erp_case: ErpCase, emulator: Served
) -> None:
    settings = sf_settings(erp_case, emulator, ["Account"])
    async with running(settings) as pipeline, org_client(emulator) as org:
        record = await org.create("Account", Name="Gap Co", Industry="Energy")
        await eventually_mirrored(settings)
        emulator.app[STREAMING_KEY].faults.gap_for([record])
        await org.update("Account", record, Industry="Banking", Phone="555-0123")
        await eventually_mirrored(settings)
        refetched = pipeline.stats.refetched

    assert refetched >= 1


async def test_gap_overflow_catches_the_object_up(
    erp_case: ErpCase, emulator: Served
) -> None:
    settings = sf_settings(erp_case, emulator, ["Account"])
    async with running(settings) as pipeline, org_client(emulator) as org:
        await eventually_mirrored(settings)
        emulator.app[STREAMING_KEY].faults.set_overflow_threshold(3)
        ids = [await org.create("Account", Name=f"Bulk {i}") for i in range(6)]
        await org.call(
            "PATCH",
            "/composite/sobjects",
            {
                "allOrNone": True,
                "records": [
                    {
                        "attributes": {"type": "Account"},
                        "id": i,
                        "Rating": "Hot",
                        "Industry": "Retail",
                    }
                    for i in ids
                ],
            },
        )
        await eventually_mirrored(settings)
        catch_ups = pipeline.stats.catch_ups

    assert catch_ups >= 1


async def test_long_text_diff_is_applied_and_a_stale_copy_is_reread(
    erp_case: ErpCase, emulator: Served
) -> None:
    """A {"diff": ...} value patches the stored text; when it does not fit, REST decides."""
    settings = sf_settings(erp_case, emulator, ["Account"])
    text = "\n".join(f"line {i}: Preferred carrier Northwind." for i in range(80))
    async with running(settings) as pipeline, org_client(emulator) as org:
        record = await org.create("Account", Name="Long Text Co", Description=text)
        await eventually_mirrored(settings)
        await org.update(
            "Account", record, Description=text.replace("line 7:", "line seven:")
        )
        await eventually_mirrored(settings)
        refetched_after_fit = pipeline.stats.refetched
        replica = await asyncpg.connect(erp_case.replica_dsn)
        await replica.execute(
            "UPDATE sf.account SET description = 'stale' WHERE id = $1", record
        )
        await replica.close()
        await org.update(
            "Account", record, Description=text.replace("line 9:", "line nine:")
        )
        await eventually_mirrored(settings)
        refetched_after_stale = pipeline.stats.refetched

    assert refetched_after_fit == 0
    assert refetched_after_stale == 1


async def test_replay_id_outside_retention_heals_by_catch_up(
    erp_case: ErpCase, serve_emulator: ServeEmulator, tmp_path: Any
) -> None:
    config = EmulatorConfig.ebikes(
        long_poll_timeout_seconds=2.0, replay_retention_seconds=1.5
    )
    async with serve_emulator(config) as served:
        settings = sf_settings(erp_case, served, ["Account"])
        async with running(settings), org_client(served) as org:
            record = await org.create("Account", Name="Retained")
            await eventually_mirrored(settings)
        async with org_client(served) as org:
            await org.update("Account", record, Name="Changed During Outage")
            fresh = await org.create("Account", Name="Created During Outage")
        await asyncio.sleep(2.0)  # the outage outlasts the retention window

        async with running(settings) as pipeline:
            await eventually_mirrored(settings)
            catch_ups = pipeline.stats.catch_ups

    replica = await asyncpg.connect(erp_case.replica_dsn)
    history = await replica.fetchval(
        "SELECT count(*) FROM replicator.checkpoint_history WHERE position = 'catch-up'"
    )
    names = await replica.fetch(
        "SELECT name FROM sf.account WHERE id = ANY($1::text[])", [record, fresh]
    )
    await replica.close()
    assert catch_ups == 1
    assert history == 1
    assert sorted(r[0] for r in names) == [
        "Changed During Outage",
        "Created During Outage",
    ]
