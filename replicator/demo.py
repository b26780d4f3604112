"""``replicator demo``: both sources on a laptop with nothing installed.

Starts an embedded PostgreSQL (or uses ``$REPLICATOR_PG_DSN``) with the
Northwind ERP and a replica database, and the Salesforce emulator serving the
E-Bikes org plus the demo's ERP fields and accounts Northwind already holds.
Both are mirrored and synced both ways (customers, products, orders, order
lines) while realistic traffic runs on each side, then the field scenario of
issue 5 runs step by step (``replicator.scenario``); the demo ends with a
row-by-row verification of every mirror and of every entity across both
systems.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from replicator.config import Settings, parse
from replicator.daemon import install_signal_handlers, run_loop
from replicator.emulator.app import EmulatorConfig, create_app
from replicator.errors import first_error
from replicator.pgserver import TempPostgres, free_port
from replicator.scenario import FieldScenario
from replicator.sinks.runner import run_outbox
from replicator.sources.erp.source import ErpPipeline
from replicator.sources.salesforce.source import SalesforcePipeline
from replicator.traffic import NorthwindTraffic, OrgRest, OrgTraffic
from replicator.verify import print_reports, verify_erp, verify_sf
from replicator.verify_unified import verify_entities

logger = logging.getLogger(__name__)

DEMO_ORG = Path(__file__).parent / "data" / "demo_org"
_SECRET_ENV = "REPLICATOR_DEMO_SF_SECRET"
_PASSWORD_ENV = "REPLICATOR_DEMO_SF_PASSWORD"
# The four entities of the field scenario (issue 5); config/replicator.toml
# holds the same mapping as TOML, with the reasons in its comments.
CUSTOMER_MAPPING: dict[str, Any] = {
    "name": "customer",
    "salesforce": "Account",
    "erp": "public.customers",
    "external_id": "ERP_Customer_Id__c",
    "erp_new_key": "code(company_name)",
    "direction": "both",
    "delete_policy": "mark",
    "fields": [
        {
            "name": "company_name",
            "salesforce": "Name",
            "erp": "company_name",
            "owner": "salesforce",
        },
        {"name": "address", "salesforce": "BillingStreet", "erp": "address"},
        {"name": "city", "salesforce": "BillingCity", "erp": "city"},
        # Northwind keeps US states as codes (OR, WA, CA) and other regions as
        # they are spelled locally (BC, Québec, Co. Cork): codes on both sides,
        # no transform (us_state would turn codes into names, refuse the rest)
        {"name": "region", "salesforce": "BillingState", "erp": "region"},
        {
            "name": "postal_code",
            "salesforce": "BillingPostalCode",
            "erp": "postal_code",
        },
        {
            "name": "country",
            "salesforce": "BillingCountry",
            "erp": "country",
            "transform": "country_iso",
        },
        {"name": "phone", "salesforce": "Phone", "erp": "phone"},
    ],
    "match": [{"fields": ["company_name", "postal_code"]}, {"fields": ["phone"]}],
}
PRODUCT_MAPPING: dict[str, Any] = {
    "name": "product",
    "salesforce": "Product2",
    "erp": "public.products",
    "external_id": "ERP_Product_Id__c",
    "erp_new_key": "next",
    "direction": "both",
    "delete_policy": "mark",
    "fields": [
        {"name": "product_name", "salesforce": "Name", "erp": "product_name"},
        {
            "name": "unit_price",
            "salesforce": "Unit_Price__c",
            "erp": "unit_price",
            "owner": "erp",
            "transform": "decimal(16,2)",
        },
        {
            "name": "units_in_stock",
            "salesforce": "Units_In_Stock__c",
            "erp": "units_in_stock",
            "owner": "erp",
        },
        {
            "name": "discontinued",
            "salesforce": "IsActive",
            "erp": "discontinued",
            "transform": "picklist(true=0, false=1)",
        },
    ],
}
ORDER_MAPPING: dict[str, Any] = {
    "name": "order",
    "salesforce": "Order",
    "erp": "public.orders",
    "external_id": "ERP_Order_Id__c",
    "erp_new_key": "next",
    "direction": "both",
    "delete_policy": "mark",
    "fields": [
        {
            "name": "customer",
            "salesforce": "AccountId",
            "erp": "customer_id",
            "reference": "customer",
        },
        {"name": "order_date", "salesforce": "EffectiveDate", "erp": "order_date"},
        {
            "name": "shipped_date",
            "salesforce": "Shipped_Date__c",
            "erp": "shipped_date",
            "owner": "erp",
            "transform": "date_datetime",
        },
        {
            "name": "freight",
            "salesforce": "Freight__c",
            "erp": "freight",
            "transform": "decimal(16,2)",
        },
        {"name": "ship_name", "salesforce": "Ship_Name__c", "erp": "ship_name"},
        {"name": "ship_address", "salesforce": "ShippingStreet", "erp": "ship_address"},
        {"name": "ship_city", "salesforce": "ShippingCity", "erp": "ship_city"},
        {"name": "ship_region", "salesforce": "ShippingState", "erp": "ship_region"},
        {
            "name": "ship_postal_code",
            "salesforce": "ShippingPostalCode",
            "erp": "ship_postal_code",
        },
        {
            "name": "ship_country",
            "salesforce": "ShippingCountry",
            "erp": "ship_country",
            "transform": "country_iso",
        },
    ],
}
# Salesforce to the ERP only: an order line in Salesforce needs a
# PricebookEntry, which the ERP has no notion of, so the ERP's lines are not
# created in Salesforce. Keyed by its order and product (no erp_new_key).
ORDER_LINE_MAPPING: dict[str, Any] = {
    "name": "order_line",
    "salesforce": "OrderItem",
    "erp": "public.order_details",
    "external_id": "ERP_Line_Id__c",
    "direction": "to_erp",
    "delete_policy": "propagate",
    "fields": [
        {
            "name": "order",
            "salesforce": "OrderId",
            "erp": "order_id",
            "reference": "order",
        },
        {
            "name": "product",
            "salesforce": "Product2Id",
            "erp": "product_id",
            "reference": "product",
        },
        {
            "name": "unit_price",
            "salesforce": "UnitPrice",
            "erp": "unit_price",
            "transform": "decimal(18,2)",
        },
        {"name": "quantity", "salesforce": "Quantity", "erp": "quantity"},
        {"name": "discount", "salesforce": "Discount__c", "erp": "discount"},
    ],
}
ENTITIES = (CUSTOMER_MAPPING, PRODUCT_MAPPING, ORDER_MAPPING, ORDER_LINE_MAPPING)
DEMO_OBJECTS = (
    "Account",
    "Contact",
    "Opportunity",
    "Case",
    "Product__c",
    "Product_Family__c",
    "Order__c",
    "Order_Item__c",
    "Product2",
    "Order",
    "OrderItem",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=_positive, default=20, help="seconds of traffic (default 20)"
    )
    parser.add_argument(
        "--rate",
        type=_positive,
        default=40,
        help="ERP transactions a second (default 40)",
    )
    parser.add_argument(
        "--sf-rate",
        type=_positive,
        default=10,
        help="Salesforce writes a second (default 10)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep running after the traffic stops, until Ctrl-C",
    )
    parser.add_argument(
        "--no-scenario",
        action="store_true",
        help="skip the field scenario that runs after the traffic",
    )


def northwind_sql() -> str:
    return resources.files("replicator.data").joinpath("northwind.sql").read_text()


async def _create_databases(admin_dsn: str, suffix: str) -> tuple[str, str]:
    base = admin_dsn.rsplit("/", 1)[0]
    conn = await asyncpg.connect(admin_dsn)
    try:
        for name in (f"demo_erp{suffix}", f"demo_replica{suffix}"):
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    return f"{base}/demo_erp{suffix}", f"{base}/demo_replica{suffix}"


async def _drop_databases(admin_dsn: str, suffix: str) -> None:
    """Leave an existing server as it was: drop the demo's databases and slot."""
    with contextlib.suppress(OSError, asyncpg.PostgresError):
        conn = await asyncpg.connect(admin_dsn)
        try:
            await conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = $1 AND NOT active",
                f"demo_slot{suffix}",
            )
            for name in (f"demo_erp{suffix}", f"demo_replica{suffix}"):
                await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await conn.close()


_SYNC_COUNTS = """
SELECT (SELECT count(*) FROM replicator.outbox WHERE status = 'done') AS written,
       (SELECT count(*) FROM replicator.outbox WHERE status = 'pending') AS pending,
       (SELECT count(*) FROM replicator.conflicts
        WHERE kept_source <> discarded_source) AS conflicts,
       (SELECT count(*) FROM replicator.dead_letters) AS parked
"""


async def _progress(
    pipeline: ErpPipeline,
    traffic: NorthwindTraffic,
    erp_dsn: str,
    stop: asyncio.Event,
    sf: SalesforcePipeline,
    org: OrgTraffic,
) -> None:
    conn = await asyncpg.connect(erp_dsn)
    replica = await asyncpg.connect(pipeline.settings.replica.resolve())
    started = time.monotonic()
    last_changes = 0
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await stop.wait()
            lag = await conn.fetchval(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn) "
                "FROM pg_replication_slots WHERE slot_name = $1",
                pipeline.erp_settings.slot,
            )
            stats = pipeline.stats
            rate = stats.changes - last_changes
            last_changes = stats.changes
            sf_stats = sf.stats
            sync = await replica.fetchrow(_SYNC_COUNTS)
            made = traffic.stats.transactions
            print(
                f"  {time.monotonic() - started:5.1f}s  ERP: {made:5d} tx made, "
                f"{stats.transactions:5d} applied ({stats.changes:6d} changes, "
                f"{rate:4d}/s, slot lag {int(lag or 0):6d} B)   Salesforce: "
                f"{org.stats.transactions:4d} writes, "
                f"{sf_stats.events if sf_stats else 0:5d} events applied   sync: "
                f"{sync['written']} written back, {sync['pending']} pending, "
                f"{sync['conflicts']} conflicts, {sync['parked']} dead letters",
                flush=True,
            )
    finally:
        await conn.close()
        await replica.close()


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive finite number")
    return value


async def demo(args: argparse.Namespace) -> int:
    """Run the demo; errors of its task groups come out as the one that matters."""
    try:
        return await _demo(args)
    except BaseExceptionGroup as group:
        raise first_error(group) from None


async def _demo(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    install_signal_handlers(stop)
    server: TempPostgres | None = None
    admin_dsn = os.environ.get("REPLICATOR_PG_DSN")
    if not admin_dsn:
        print("starting an embedded PostgreSQL (wal_level=logical) ...", flush=True)
        server = await asyncio.to_thread(TempPostgres().start)
        admin_dsn = server.dsn("postgres")
    suffix = "" if server else f"_{uuid.uuid4().hex[:6]}"
    try:
        erp_dsn, replica_dsn = await _create_databases(admin_dsn, suffix)
        erp = await asyncpg.connect(erp_dsn)
        await erp.execute(northwind_sql())
        print(
            f"ERP:     Northwind loaded into {erp_dsn}\nreplica: {replica_dsn}",
            flush=True,
        )
        async with _serve_emulator() as (org_url, emulator_config):
            os.environ.update(demo_secrets(emulator_config))
            settings = parse(
                demo_config(
                    erp_dsn, replica_dsn, org_url, emulator_config, suffix=suffix
                )
            )
            print(
                f"Salesforce: the E-Bikes org served by the emulator at {org_url}",
                flush=True,
            )
            scenario_ok = await _run_both(
                args, settings, erp, erp_dsn, org_url, emulator_config, stop
            )
            await erp.close()
            if stop.is_set():
                # the last changes were not drained: a comparison would
                # report data still in flight as differences
                print(
                    "interrupted: the streams were not drained, so the field "
                    "scenario and the verification were skipped",
                    flush=True,
                )
                return 130
            print(
                "verifying every mirror against its source, row by row, and every "
                "entity across both systems ...",
                flush=True,
            )
            reports = await verify_erp(settings) + await verify_sf(settings)
            reports += await verify_entities(settings)
        verified = print_reports(reports)
        return 0 if verified and scenario_ok else 1
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)
        else:
            await _drop_databases(admin_dsn, suffix)


async def _run_both(
    args: argparse.Namespace,
    settings: Settings,
    erp: asyncpg.Connection,
    erp_dsn: str,
    org_url: str,
    emulator_config: EmulatorConfig,
    stop: asyncio.Event,
) -> bool:
    """Run traffic, then the field scenario; True unless a scenario step failed."""
    pipeline = ErpPipeline(settings)
    sf = SalesforcePipeline(settings)
    traffic = NorthwindTraffic(erp)
    sources_stop = asyncio.Event()
    scenario_ok = True
    async with aiohttp.ClientSession() as http, asyncio.TaskGroup() as tg:
        erp_task = tg.create_task(pipeline.run(sources_stop), name="demo:erp")
        sf_task = tg.create_task(sf.run(sources_stop), name="demo:salesforce")
        await pipeline.ready.wait()
        await sf.ready.wait()
        outbox_task = tg.create_task(
            run_outbox(settings, sources_stop), name="demo:outbox"
        )
        org = OrgRest(org_url, await _login(http, org_url, emulator_config), http)
        org_traffic = OrgTraffic(org)
        print(
            f"replicating; traffic on both sides for {args.duration:.0f}s "
            f"(ERP {args.rate:.0f} tx/s, Salesforce {args.sf_rate:.0f} writes/s)",
            flush=True,
        )
        watch_stop = asyncio.Event()
        watcher = tg.create_task(
            _progress(pipeline, traffic, erp_dsn, watch_stop, sf, org_traffic)
        )
        async with asyncio.TaskGroup() as load:
            load.create_task(
                traffic.run(rate=args.rate, duration=args.duration, stop=stop)
            )
            load.create_task(
                org_traffic.run(rate=args.sf_rate, duration=args.duration, stop=stop)
            )
        if args.keep and not stop.is_set():
            print("traffic done; still replicating, Ctrl-C to stop", flush=True)
            await stop.wait()
        await _settle(settings, erp, sf, stop)
        watch_stop.set()
        await watcher
        if not args.no_scenario and not stop.is_set():
            scenario_ok = await _field_scenario(settings, erp, org)
            await _settle(settings, erp, sf, stop)
        sources_stop.set()
        await erp_task
        await sf_task
        await outbox_task
    print(
        f"ERP traffic: {traffic.stats.by_kind}\n"
        f"Salesforce traffic: {org_traffic.stats.by_kind}"
    )
    return scenario_ok


async def _settle(
    settings: Settings,
    erp: asyncpg.Connection,
    sf: SalesforcePipeline,
    stop: asyncio.Event,
) -> None:
    """Let both streams catch up and the outbox drain."""
    assert settings.erp is not None
    target = await erp.fetchval("SELECT pg_current_wal_lsn()::text")
    await _wait_caught_up(erp, settings.erp.slot, target, stop)
    await _wait_quiet(sf, stop)
    await _wait_outbox(settings, stop)
    await _wait_quiet(sf, stop)


async def _field_scenario(
    settings: Settings, erp: asyncpg.Connection, org: OrgRest
) -> bool:
    print("the field scenario (issue 5), step by step:", flush=True)
    replica = await asyncpg.connect(settings.replica.resolve())
    try:
        scenario = FieldScenario(erp, replica, org, sync=settings.sync, say=_say)
        results = await scenario.run()
    finally:
        await replica.close()
    return all(r.passed for r in results)


def _say(line: str) -> None:
    print(line, flush=True)


def demo_emulator_config(**overrides: Any) -> EmulatorConfig:
    """Return the E-Bikes org plus the demo's fields and seed accounts.

    ``demo_org/objects`` adds the ERP id (external id) fields and the ERP's
    product, order and line fields; ``demo_org/data`` seeds accounts that
    Northwind already holds, spelled differently, for the linking at switch-on.
    """
    base = EmulatorConfig.ebikes()
    settings: dict[str, Any] = {
        "metadata_dirs": (*base.metadata_dirs, DEMO_ORG / "objects"),
        "seed_plans": (*base.seed_plans, DEMO_ORG / "data" / "sample-data-plan.json"),
        **overrides,
    }
    return EmulatorConfig.ebikes(**settings)


def demo_secrets(config: EmulatorConfig) -> dict[str, str]:
    """The environment variables ``demo_config`` names for the org's secrets."""
    return {
        _SECRET_ENV: config.client_secret,
        _PASSWORD_ENV: config.password + config.security_token,
    }


def demo_config(
    erp_dsn: str,
    replica_dsn: str,
    org_url: str,
    config: EmulatorConfig,
    *,
    suffix: str = "",
) -> dict[str, Any]:
    """Return the demo's settings as data: both sources and the four entities."""
    return {
        "replica": {"dsn": replica_dsn},
        "erp": {
            "database": {"dsn": erp_dsn},
            "heartbeat_seconds": 1,
            "status_interval_seconds": 1,
            "slot": f"demo_slot{suffix}",
            "publication": "demo_pub",
        },
        "salesforce": {
            "login_url": org_url,
            "client_id": config.client_id,
            "client_secret_env": _SECRET_ENV,
            "username": config.username,
            "password_env": _PASSWORD_ENV,
            "objects": list(DEMO_OBJECTS),
            "long_poll_timeout_seconds": 10,
        },
        "entities": [dict(entity) for entity in ENTITIES],
    }


@contextlib.asynccontextmanager
async def _serve_emulator() -> AsyncIterator[tuple[str, EmulatorConfig]]:
    config = demo_emulator_config()
    runner = web.AppRunner(create_app(config))
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}", config
    finally:
        await runner.cleanup()


async def _login(
    http: aiohttp.ClientSession, org_url: str, config: EmulatorConfig
) -> str:
    async with http.post(
        f"{org_url}/services/oauth2/token",
        data={
            "grant_type": "password",
            "client_id": config.client_id,
            "client_secret": config.client_secret,
            "username": config.username,
            "password": config.password + config.security_token,
        },
    ) as resp:
        return str((await resp.json())["access_token"])


async def _wait_outbox(settings: Settings, stop: asyncio.Event) -> None:
    """Wait until every write-back is done or failed, or the rest stops moving.

    Rows can wait on something that never comes (an order whose account was
    refused by Salesforce); after 5 s without progress the demo goes on and
    says how many are left. A minute at most.
    """
    conn = await asyncpg.connect(settings.replica.resolve())
    try:
        deadline = time.monotonic() + 60
        last, moved = -1, time.monotonic()
        while time.monotonic() < deadline and not stop.is_set():
            pending = await conn.fetchval(
                "SELECT count(*) FROM replicator.outbox WHERE status = 'pending'"
            )
            if not pending:
                return
            if pending != last:
                last, moved = pending, time.monotonic()
            elif time.monotonic() - moved > 5:
                print(f"outbox: {pending} write-backs still pending", flush=True)
                return
            await asyncio.sleep(0.3)
    finally:
        await conn.close()


async def _wait_quiet(
    sf: SalesforcePipeline, stop: asyncio.Event, quiet: float = 1.5
) -> None:
    last = -1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not stop.is_set():
        seen = sf.stats.events if sf.stats else 0
        if seen == last:
            return
        last = seen
        await asyncio.sleep(quiet)


async def _wait_caught_up(
    erp: asyncpg.Connection, slot: str, target: str, stop: asyncio.Event
) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not stop.is_set():
        done = await erp.fetchval(
            "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots "
            "WHERE slot_name = $2",
            target,
            slot,
        )
        if done:
            return
        await asyncio.sleep(0.2)


def run(args: argparse.Namespace) -> int:
    result = 0

    async def main() -> None:
        nonlocal result
        result = await demo(args)

    run_loop(main)
    return result
