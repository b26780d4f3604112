"""The field scenario of issue 5 against real PostgreSQL and the emulator.

The ERP is Northwind and the org the demo's (E-Bikes plus the ERP fields and
the seeded overlapping accounts), mapped as ``replicator demo`` maps them.
The scenario reports each step; the assertions below read both systems
again, the ERP with asyncpg and the org with simple-salesforce, and check the
values each step must have left.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
import requests
from simple_salesforce.api import Salesforce

from replicator.config import Settings, parse
from replicator.demo import (
    ENTITIES,
    demo_config,
    demo_emulator_config,
    demo_secrets,
    northwind_sql,
)
from replicator.emulator.app import EmulatorConfig
from replicator.mapping.config import EntitySettings
from replicator.scenario import (
    AMBIGUOUS,
    LINKED,
    ORDER_LINES,
    FieldScenario,
    StepResult,
    parse_sf_datetime,
)
from replicator.sinks.runner import run_outbox
from replicator.sources.erp.source import ErpPipeline
from replicator.sources.salesforce.source import SalesforcePipeline
from replicator.traffic import OrgRest
from tests.fixtures.emulator import Served
from tests.fixtures.pg import ErpCase

CONFIG = Path(__file__).resolve().parents[1] / "config" / "replicator.toml"
_ACCOUNTS = (
    "SELECT Id, Name, ERP_Customer_Id__c, Phone, BillingStreet, BillingCity, "
    "BillingState, BillingPostalCode, BillingCountry FROM Account"
)
_ORDERS = (
    "SELECT Id, ERP_Order_Id__c, Shipped_Date__c, AccountId FROM Order "
    "WHERE Ship_Name__c LIKE 'Field order%'"
)
_PRODUCTS = (
    "SELECT ERP_Product_Id__c, Unit_Price__c, Units_In_Stock__c, IsActive "
    "FROM Product2 WHERE ERP_Product_Id__c IN ('3', '4', '5')"
)


@pytest.fixture(autouse=True)
def _demo_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in demo_secrets(EmulatorConfig()).items():
        monkeypatch.setenv(name, value)


def test_example_config_maps_what_the_demo_maps() -> None:
    """config/replicator.toml documents the four entities the demo runs."""
    parsed = tomllib.loads(CONFIG.read_text())["entities"]

    from_toml = [EntitySettings.model_validate(e) for e in parsed]
    from_demo = [EntitySettings.model_validate(e) for e in ENTITIES]

    assert [e.name for e in from_toml] == ["customer", "product", "order", "order_line"]
    assert from_toml == from_demo


def _settings(case: ErpCase, served: Served) -> Settings:
    data = demo_config(case.erp_dsn, case.replica_dsn, served.url, served.config)
    data["erp"].update(
        slot=case.slot,
        publication=case.publication,
        heartbeat_seconds=0.2,
        status_interval_seconds=0.5,
    )
    data["salesforce"]["long_poll_timeout_seconds"] = 2
    data["ops"] = {"listen": ""}
    return parse(data)


@contextlib.asynccontextmanager
async def _syncing(settings: Settings) -> AsyncIterator[None]:
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


class _HttpsToHttp(requests.adapters.HTTPAdapter):
    """simple-salesforce builds https URLs; the loopback emulator speaks http."""

    def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        request.url = request.url.replace("https://", "http://", 1)
        return super().send(request, *args, **kwargs)


def _simple_salesforce(url: str, token: str) -> Salesforce:
    session = requests.Session()
    session.mount("https://", _HttpsToHttp())
    return Salesforce(
        instance_url=url.replace("http://", "https://"),
        session_id=token,
        session=session,
        version="60.0",
    )


async def _soql(sf: Salesforce, soql: str) -> list[dict[str, Any]]:
    # simple-salesforce blocks: off the loop that serves the emulator
    body = await asyncio.to_thread(sf.query_all, soql)
    return list(body["records"])


async def _run_scenario(
    case: ErpCase, served: Served, erp: asyncpg.Connection
) -> tuple[list[StepResult], list[str]]:
    settings = _settings(case, served)
    lines: list[str] = []
    replica = await asyncpg.connect(case.replica_dsn)
    try:
        async with _syncing(settings), aiohttp.ClientSession() as http:
            org = OrgRest(served.url, await served.token(), http, client="field-user")
            scenario = FieldScenario(
                erp, replica, org, sync=settings.sync, timeout=20, say=lines.append
            )
            results = await scenario.run()
    finally:
        await replica.close()
    return results, lines


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_field_scenario_runs_end_to_end(
    erp_case: ErpCase, serve_emulator: Any
) -> None:
    """Every step passes, and both systems hold the values each step must leave."""
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(northwind_sql())
    config = demo_emulator_config(long_poll_timeout_seconds=2.0)

    async with serve_emulator(config) as served:
        results, lines = await _run_scenario(erp_case, served, erp)
        sf = _simple_salesforce(served.url, await served.token())
        accounts = await _soql(sf, _ACCOUNTS)
        orders = await _soql(sf, _ORDERS)
        products = await _soql(sf, _PRODUCTS)
    replica = await asyncpg.connect(erp_case.replica_dsn)
    try:
        erp_state = await _erp_state(erp, orders)
        review = await replica.fetch(
            "SELECT status, candidates::text FROM unified.match_review "
            "WHERE entity = 'customer' AND record_key = $1",
            AMBIGUOUS[0],
        )
        conflicts = await replica.fetch(
            "SELECT kept_value, kept_source, discarded_value, discarded_source, rule "
            "FROM replicator.conflicts WHERE entity = 'customer' AND field = 'phone' "
            "AND discarded_value LIKE '503-555-%'"
        )
    finally:
        await replica.close()
        await erp.close()

    assert [line for line in lines if "FAIL" in line] == [], "\n".join(lines)
    assert all(r.passed for r in results)
    seen = _Seen(accounts, orders, products, erp_state, review, conflicts)
    _assert_linked(seen)
    _assert_products(seen)
    _assert_order_and_shipping(seen)
    _assert_address(seen)
    _assert_conflict_logged(seen)


@dataclass(frozen=True)
class _Seen:
    """Both systems and the replica, read after the scenario."""

    accounts: list[dict[str, Any]]
    orders: list[dict[str, Any]]
    products: list[dict[str, Any]]
    erp: dict[str, Any]
    review: list[asyncpg.Record]
    conflicts: list[asyncpg.Record]

    def account(self, code: str) -> dict[str, Any]:
        """The seeded account of a linked customer, by its name (Salesforce's)."""
        [found] = [a for a in self.accounts if a["Name"] == LINKED[code]]
        return found


def _assert_linked(seen: _Seen) -> None:
    """(f) Seeded accounts hold their customers' keys, once; the ambiguous pair
    is in review, unlinked, and neither side got a duplicate."""
    holders = {
        code: [a["Name"] for a in seen.accounts if a["ERP_Customer_Id__c"] == code]
        for code in LINKED
    }
    twins = [a for a in seen.accounts if a["Name"].startswith(AMBIGUOUS[1])]

    assert holders == {code: [name] for code, name in LINKED.items()}
    assert [a["ERP_Customer_Id__c"] for a in twins] == [None, None]
    assert [r["status"] for r in seen.review] == ["open"]
    assert all(a["Id"] in seen.review[0]["candidates"] for a in twins)
    assert seen.erp["wartian"] == [AMBIGUOUS[0]]


def _assert_products(seen: _Seen) -> None:
    """(b) Stock and the price (exact) as the ERP holds them; IsActive is not
    discontinued."""
    by_product = {int(p["ERP_Product_Id__c"]): p for p in seen.products}
    for product_id, price, stock, discontinued in seen.erp["products"]:
        record = by_product[product_id]
        assert Decimal(str(record["Units_In_Stock__c"])) == stock
        assert record["IsActive"] is (discontinued == 0)
        if product_id == 3:
            assert Decimal(str(record["Unit_Price__c"])) == price


def _assert_order_and_shipping(seen: _Seen) -> None:
    """(a) The Salesforce order is in the ERP with its lines; (c) its shipped
    date came back as midnight UTC."""
    [order] = seen.orders
    shipped = seen.erp["order"]["shipped_date"]

    assert order["AccountId"] == seen.account("ALFKI")["Id"]
    assert seen.erp["order"]["customer_id"] == "ALFKI"
    assert seen.erp["lines"] == list(ORDER_LINES)
    assert parse_sf_datetime(order["Shipped_Date__c"]) == dt.datetime.combine(
        shipped, dt.time(0), tzinfo=dt.UTC
    )


def _assert_address(seen: _Seen) -> None:
    """(d) The ERP's last address, the country as an ISO code in Salesforce."""
    around = seen.account("AROUT")
    street, city, region, postal = "120 Hanover Sq.", "London", None, "WA1 1DP"

    assert seen.erp["arout"] == (street, city, region, postal, "UK")
    assert (around["BillingStreet"], around["BillingCity"]) == (street, city)
    assert (around["BillingState"], around["BillingPostalCode"]) == (region, postal)
    assert around["BillingCountry"] == "GB"


def _assert_conflict_logged(seen: _Seen) -> None:
    """(e) Both systems hold the ERP's phone (precedence in one tie window);
    Salesforce's is in the conflict log."""
    phone = seen.erp["greal_phone"]
    logged = [
        (r["kept_value"], r["kept_source"], r["discarded_source"], r["rule"])
        for r in seen.conflicts
    ]

    assert seen.account("GREAL")["Phone"] == phone
    assert logged == [(phone, "erp", "salesforce", "lww")]


async def _erp_state(
    erp: asyncpg.Connection, orders: list[dict[str, Any]]
) -> dict[str, Any]:
    state: dict[str, Any] = {}
    state["wartian"] = [
        r[0]
        for r in await erp.fetch(
            "SELECT customer_id FROM customers WHERE company_name LIKE $1",
            AMBIGUOUS[1] + "%",
        )
    ]
    state["products"] = [
        (r[0], Decimal(str(r[1])).quantize(Decimal("0.01")), r[2], r[3])
        for r in await erp.fetch(
            "SELECT product_id, unit_price, units_in_stock, discontinued "
            "FROM products WHERE product_id IN (3, 4, 5) ORDER BY product_id"
        )
    ]
    order_id = int(orders[0]["ERP_Order_Id__c"]) if len(orders) == 1 else -1
    state["order"] = await erp.fetchrow(
        "SELECT customer_id, shipped_date FROM orders WHERE order_id = $1", order_id
    )
    state["lines"] = [
        (
            r[0],
            Decimal(str(r[1])).quantize(Decimal("0.01")),
            r[2],
            Decimal(str(r[3])).quantize(Decimal("0.01")),
        )
        for r in await erp.fetch(
            "SELECT product_id, unit_price, quantity, discount FROM order_details "
            "WHERE order_id = $1 ORDER BY product_id",
            order_id,
        )
    ]
    row = await erp.fetchrow(
        "SELECT address, city, region, postal_code, country FROM customers "
        "WHERE customer_id = 'AROUT'"
    )
    state["arout"] = tuple(row) if row else None
    state["greal_phone"] = await erp.fetchval(
        "SELECT phone FROM customers WHERE customer_id = 'GREAL'"
    )
    return state
