"""``replicator demo``: the whole ERP path on a laptop with nothing installed.

Starts an embedded PostgreSQL (or uses ``$REPLICATOR_PG_DSN``), loads the
Northwind ERP, replicates it into a replica database while realistic traffic
runs, shows progress each second, and ends with a row-by-row verification.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import time
import uuid
from importlib import resources

import asyncpg

from replicator.config import Settings, parse
from replicator.daemon import install_signal_handlers, run_loop
from replicator.pgserver import TempPostgres
from replicator.sources.erp.source import ErpPipeline
from replicator.traffic import NorthwindTraffic
from replicator.verify import print_reports, verify_erp

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=20, help="seconds of traffic")
    parser.add_argument("--rate", type=float, default=40, help="ERP transactions a second")
    parser.add_argument("--keep", action="store_true",
                        help="keep running after the traffic stops, until Ctrl-C")


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


async def _progress(pipeline: ErpPipeline, traffic: NorthwindTraffic, erp_dsn: str,
                    stop: asyncio.Event) -> None:
    conn = await asyncpg.connect(erp_dsn)
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
                pipeline.erp_settings.slot)
            stats = pipeline.stats
            rate = stats.changes - last_changes
            last_changes = stats.changes
            print(f"  {time.monotonic() - started:5.1f}s  erp transactions "
                  f"{traffic.stats.transactions:6d}  applied: {stats.transactions:6d} tx "
                  f"{stats.changes:7d} changes  {rate:6d}/s  slot lag "
                  f"{int(lag or 0):>8d} bytes", flush=True)
    finally:
        await conn.close()


async def demo(args: argparse.Namespace) -> int:
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
        print(f"ERP:     Northwind loaded into {erp_dsn}\nreplica: {replica_dsn}", flush=True)
        settings: Settings = parse({
            "replica": {"dsn": replica_dsn},
            "erp": {"database": {"dsn": erp_dsn}, "heartbeat_seconds": 1,
                    "status_interval_seconds": 1, "slot": f"demo_slot{suffix}",
                    "publication": "demo_pub"},
        })
        pipeline = ErpPipeline(settings)
        traffic = NorthwindTraffic(erp)
        async with asyncio.TaskGroup() as tg:
            daemon = tg.create_task(pipeline.run(stop), name="demo:erp")
            await pipeline.ready.wait()
            print("replicating; traffic on the ERP for "
                  f"{args.duration:.0f}s at {args.rate:.0f} transactions/s", flush=True)
            watch_stop = asyncio.Event()
            watcher = tg.create_task(_progress(pipeline, traffic, erp_dsn, watch_stop))
            await traffic.run(rate=args.rate, duration=args.duration, stop=stop)
            if args.keep and not stop.is_set():
                print("traffic done; still replicating, Ctrl-C to stop", flush=True)
                await stop.wait()
            # let the stream catch up on the last transactions, then stop
            target = await erp.fetchval("SELECT pg_current_wal_lsn()::text")
            await _wait_caught_up(erp, settings.erp.slot, target, stop)
            watch_stop.set()
            await watcher
            stop.set()
            await daemon
        await erp.close()
        print(f"traffic: {traffic.stats.by_kind}")
        print("verifying every table, row by row ...", flush=True)
        return 0 if print_reports(await verify_erp(settings)) else 1
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)


async def _wait_caught_up(erp: asyncpg.Connection, slot: str, target: str,
                          stop: asyncio.Event) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not stop.is_set():
        done = await erp.fetchval(
            "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots "
            "WHERE slot_name = $2", target, slot)
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
