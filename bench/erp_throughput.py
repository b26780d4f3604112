"""ERP to replica throughput: replicator's pipeline against native logical replication.

Two throwaway clusters on loopback: the ERP (publisher) and the replica. The
workload is an order-lines table, 100 row changes a transaction (60 inserts,
30 updates of two columns, 10 deletes of old rows), the same for both paths:

- backlog: the workload is committed first, then drained; native and ours
  drain the very same WAL (both slots exist before it is written);
- concurrent: the consumer runs while the workload is generated; each path
  gets its own database with an identical, deterministic workload.

Native is a subscription on the replica cluster (its apply worker runs with
``synchronous_commit=off``, its default); ours is ``ErpPipeline`` in a child
process, so its peak RSS (VmHWM) is its own. Every run is verified: row count
and an order-independent checksum of ``row::text`` on both sides.

Lag (concurrent mode) is the age of the oldest committed but not yet applied
source transaction, sampled on the replica every 20 ms, plus the time from the
workload's last commit until the replica holds it.

Usage: python bench/erp_throughput.py [--sizes 100000,500000] [--million]
(``--million`` adds a 1,000,000-change backlog drained by ours alone, about a
minute, to compare peak RSS with the 100k run.)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replicator.pgserver import TempPostgres

TX_ROWS = 100  # 60 inserts, 30 updates, 10 deletes
PUBLICATION = "bench_pub"
RENDER = {
    "TimeZone": "UTC",
    "DateStyle": "ISO",
    "IntervalStyle": "postgres",
    "extra_float_digits": "3",
}

SOURCE_DDL = """
CREATE TABLE order_lines (
    id bigint PRIMARY KEY, order_id bigint NOT NULL, sku text NOT NULL,
    qty integer NOT NULL, unit_price numeric(12,2) NOT NULL, status text NOT NULL,
    note text, updated_at timestamptz NOT NULL);
CREATE TABLE bench_marker (id integer PRIMARY KEY, at timestamptz NOT NULL);
"""

GENERATOR = """
CREATE FUNCTION bench_tx(first_id bigint, upd bigint[], del bigint[])
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO order_lines
    SELECT g, g / 7, 'SKU-' || (g % 5000), (g % 17) + 1,
           ((g % 100000) / 100.0)::numeric(12,2), 'new',
           'order line ' || g || ' for customer ' || (g % 997), now()
    FROM generate_series(first_id, first_id + 59) g;
    UPDATE order_lines SET qty = qty + 1, status = 'changed' WHERE id = ANY(upd);
    DELETE FROM order_lines WHERE id = ANY(del);
END $$;
"""

CHECKSUM = (
    "SELECT count(*), coalesce(sum(hashtextextended(t::text, 0)), 0)::text "
    "FROM {table} t"
)


def rss_kb(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in kB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line[:5]] = int(line.split()[1])
    return out


# -- the workload --------------------------------------------------------------


def transaction_ids(t: int, rng: random.Random) -> tuple[int, list[int], list[int]]:
    """Ids for source transaction ``t``: first insert id, updated ids, deleted ids.

    Inserts take 60 new ids; deletes take the 10 oldest rows still alive (far
    behind, so no batch sees them inserted); updates hit 30 random live rows.
    """
    first = 60 * t + 1
    deleted = list(range(10 * t + 1, 10 * t + 11))
    updated = rng.sample(range(10 * t + 11, 60 * t + 61), 30)
    return first, updated, deleted


@dataclass
class Workload:
    changes: int
    commits: list[float] = field(default_factory=list)  # monotonic commit times
    seconds: float = 0.0
    last_commit: float = 0.0


async def generate(dsn: str, work: Workload, marker: int) -> Workload:
    """Commit the workload's changes, 100 a transaction, then a marker row."""
    conn = await asyncpg.connect(dsn, server_settings={"synchronous_commit": "off"})
    rng = random.Random(42)
    stmt = await conn.prepare("SELECT bench_tx($1, $2, $3)")
    start = time.monotonic()
    for t in range(work.changes // TX_ROWS):
        first, updated, deleted = transaction_ids(t, rng)
        await stmt.fetchval(first, updated, deleted)
        work.commits.append(time.monotonic())
        if t % 50 == 49:
            await asyncio.sleep(0)  # let the lag sampler run
    # The marker commits durably, which flushes all WAL before it.
    await conn.execute("SET synchronous_commit = on")
    await conn.execute("INSERT INTO bench_marker VALUES ($1, now())", marker)
    work.last_commit = time.monotonic()
    work.seconds = work.last_commit - start
    await conn.close()
    return work


# -- consumers -----------------------------------------------------------------


async def wait_marker(dsn: str, table: str, marker: int, limit: float = 600) -> float:
    """Poll the replica until the marker row is there; return the monotonic time."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if await conn.fetchval(f"SELECT 1 FROM {table} WHERE id = $1", marker):
                return time.monotonic()
            await asyncio.sleep(0.005)
        raise TimeoutError(f"marker {marker} never reached {table}")
    finally:
        await conn.close()


async def sample_lag(
    dsn: str, table: str, work: Workload, done: asyncio.Event, samples: list[float]
) -> None:
    """Age of the oldest committed but unapplied transaction, every 20 ms."""
    conn = await asyncpg.connect(dsn)
    try:
        while not done.is_set():
            applied_ids = await conn.fetchval(
                f"SELECT coalesce(max(id), 0) FROM {table}"
            )
            now = time.monotonic()
            applied = applied_ids // 60  # transaction t inserts ids up to 60(t+1)
            committed = len(work.commits)
            samples.append(now - work.commits[applied] if applied < committed else 0.0)
            await asyncio.sleep(0.02)
    finally:
        await conn.close()


class Ours:
    """``ErpPipeline`` in a child process (this file with ``--child``)."""

    def __init__(
        self, erp_dsn: str, replica_dsn: str, slot: str, *, follow: bool
    ) -> None:
        self.args = json.dumps(
            {"erp": erp_dsn, "replica": replica_dsn, "slot": slot, "follow": follow}
        )
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--child",
            self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if line.strip() != b"READY":
            raise RuntimeError(f"pipeline did not start: {line!r}")

    async def finish(self) -> dict[str, Any]:
        """Stop a following pipeline (or wait for a draining one); return its report."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.close()
        out, _ = await self.proc.communicate()
        if self.proc.returncode != 0:
            raise RuntimeError(f"pipeline failed with exit code {self.proc.returncode}")
        return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def child(args: dict[str, Any]) -> None:
    """Run the pipeline; print READY once streaming, then a JSON report."""
    from replicator.config import parse
    from replicator.sources.erp.source import ErpPipeline

    settings = parse(
        {
            "replica": {"dsn": args["replica"]},
            "erp": {
                "database": {"dsn": args["erp"]},
                "slot": args["slot"],
                "publication": PUBLICATION,
                "create_publication": False,
            },
        }
    )

    gc_time = [0.0, 0.0]

    def gc_timer(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_time[1] = time.perf_counter()
        else:
            gc_time[0] += time.perf_counter() - gc_time[1]

    gc.callbacks.append(gc_timer)

    async def main() -> dict[str, Any]:
        pipeline = ErpPipeline(settings)
        stop = asyncio.Event()
        if args["follow"]:
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
            )

            async def on_eof() -> None:
                await reader.read()
                stop.set()

            eof = asyncio.create_task(on_eof())
        marks: list[Any] = []

        class Ready(asyncio.Event):
            def set(self) -> None:
                # Stamped when set: the streaming tasks may run long before
                # a task waiting on the event gets its turn.
                if not marks:
                    marks.extend((time.perf_counter(), os.times(), rss_kb()))
                    gc_time[0] = 0.0
                super().set()

        pipeline.ready = Ready()
        run = asyncio.create_task(
            pipeline.run(stop, until_caught_up=not args["follow"])
        )
        ready = asyncio.create_task(pipeline.ready.wait())
        await asyncio.wait({run, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not marks:
            await run  # it ended before streaming: raises what stopped it
        start, cpu, at_ready = marks
        print("READY", flush=True)
        stats = await run
        end, cpu_end = time.perf_counter(), os.times()
        if args["follow"]:
            eof.cancel()
        return {
            "seconds": end - start,
            "changes": stats.changes,
            "batches": stats.batches,
            "gc_seconds": round(gc_time[0], 3),
            "rss_ready_kb": at_ready["VmRSS"],
            "peak_rss_kb": rss_kb()["VmHWM"],
            "cpu_seconds": (cpu_end.user - cpu.user) + (cpu_end.system - cpu.system),
        }

    try:
        import uvloop

        report = uvloop.run(main())
    except ImportError:
        report = asyncio.run(main())
    print(json.dumps(report), flush=True)


class Native:
    """A subscription on the replica cluster to the ERP publication."""

    def __init__(self, erp_dsn: str, replica_dsn: str, name: str) -> None:
        self.erp_dsn, self.replica_dsn, self.name = erp_dsn, replica_dsn, name

    async def create(self, *, enabled: bool) -> None:
        conn = await asyncpg.connect(self.replica_dsn)
        await conn.execute(SOURCE_DDL)
        await conn.execute(
            f"CREATE SUBSCRIPTION {self.name} CONNECTION '{self.erp_dsn}' "
            f"PUBLICATION {PUBLICATION} WITH (copy_data = false, "
            f"enabled = {str(enabled).lower()})"
        )
        await conn.close()

    async def wait_streaming(self) -> None:
        """Wait until the subscription's walsender streams from the ERP."""
        conn = await asyncpg.connect(self.erp_dsn)
        try:
            async with asyncio.timeout(30):
                while not await conn.fetchval(
                    "SELECT 1 FROM pg_stat_replication WHERE application_name = $1 "
                    "AND state = 'streaming'",
                    self.name,
                ):
                    await asyncio.sleep(0.02)
        finally:
            await conn.close()

    async def set_enabled(self, enabled: bool) -> None:
        conn = await asyncpg.connect(self.replica_dsn)
        await conn.execute(
            f"ALTER SUBSCRIPTION {self.name} {'ENABLE' if enabled else 'DISABLE'}"
        )
        await conn.close()

    async def worker_peak_rss_kb(self) -> int:
        conn = await asyncpg.connect(self.replica_dsn)
        pid = await conn.fetchval(
            "SELECT pid FROM pg_stat_subscription WHERE subname = $1 AND relid IS NULL",
            self.name,
        )
        await conn.close()
        return rss_kb(pid)["VmHWM"] if pid else 0

    async def drop(self) -> None:
        conn = await asyncpg.connect(self.replica_dsn)
        await conn.execute(f"DROP SUBSCRIPTION IF EXISTS {self.name}")
        await conn.close()


# -- one benchmark run -----------------------------------------------------------


@dataclass
class Result:
    label: str
    changes: int
    seconds: float
    peak_rss_kb: int = 0
    lag_max: float | None = None
    lag_mean: float | None = None
    catch_up: float | None = None
    generator_rate: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.changes / self.seconds


class Bench:
    def __init__(self, erp: TempPostgres, replica: TempPostgres) -> None:
        self.erp, self.replica = erp, replica
        self.counter = 0

    async def _admin(self, cluster: TempPostgres, sql: str) -> None:
        conn = await asyncpg.connect(cluster.dsn())
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def source_db(self, name: str) -> str:
        await self._admin(self.erp, f"CREATE DATABASE {name}")
        conn = await asyncpg.connect(self.erp.dsn(name))
        await conn.execute(SOURCE_DDL + GENERATOR)
        await conn.execute(
            f"CREATE PUBLICATION {PUBLICATION} FOR TABLE order_lines, bench_marker"
        )
        await conn.close()
        return self.erp.dsn(name)

    async def replica_db(self, name: str) -> str:
        await self._admin(self.replica, f"CREATE DATABASE {name}")
        return self.replica.dsn(name)

    async def drop(self, cluster: TempPostgres, *names: str) -> None:
        for name in names:
            await self._admin(cluster, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    async def prepare_ours(self, erp_dsn: str, replica_dsn: str, slot: str) -> None:
        """Create our slot, snapshot the empty tables and store a checkpoint."""
        ours = Ours(erp_dsn, replica_dsn, slot, follow=False)
        await ours.start()
        await ours.finish()

    async def drop_slot(self, erp_dsn: str, slot: str) -> None:
        conn = await asyncpg.connect(erp_dsn)
        await conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM "
            "pg_replication_slots WHERE slot_name = $1",
            slot,
        )
        await conn.close()

    async def verify(self, erp_dsn: str, target_dsn: str, table: str) -> int:
        src = await asyncpg.connect(erp_dsn, server_settings=RENDER)
        dst = await asyncpg.connect(target_dsn, server_settings=RENDER)
        expected = await src.fetchrow(CHECKSUM.format(table="order_lines"))
        got = await dst.fetchrow(CHECKSUM.format(table=table))
        await src.close()
        await dst.close()
        if tuple(expected) != tuple(got):
            raise AssertionError(
                f"{target_dsn} {table}: {tuple(got)} != {tuple(expected)}"
            )
        return int(expected[0])

    async def backlog(self, changes: int, *, native_too: bool = True) -> list[Result]:
        """One workload committed first; native drains it, then ours."""
        n = self.counter = self.counter + 1
        erp = await self.source_db(f"erp_b{n}")
        ours_dsn = await self.replica_db(f"ours_b{n}")
        native = Native(erp, await self.replica_db(f"native_b{n}"), f"sub_b{n}")
        if native_too:
            await native.create(enabled=False)
        await self.prepare_ours(erp, ours_dsn, f"ours_b{n}")
        work = await generate(erp, Workload(changes), marker=1)
        results = []

        if native_too:
            start = time.monotonic()
            await native.set_enabled(True)
            end = await wait_marker(native.replica_dsn, "bench_marker", 1)
            rss = await native.worker_peak_rss_kb()
            await native.set_enabled(False)
            rows = await self.verify(erp, native.replica_dsn, "order_lines")
            results.append(
                Result(
                    "native",
                    changes,
                    end - start,
                    rss,
                    generator_rate=changes / work.seconds,
                    extra={"rows": rows},
                )
            )

        ours = Ours(erp, ours_dsn, f"ours_b{n}", follow=False)
        await ours.start()
        report = await ours.finish()
        rows = await self.verify(erp, ours_dsn, "erp.order_lines")
        results.append(
            Result(
                "ours",
                changes,
                report["seconds"],
                report["peak_rss_kb"],
                generator_rate=changes / work.seconds,
                extra={"rows": rows, **report},
            )
        )

        if native_too:
            await native.drop()
        await self.drop_slot(erp, f"ours_b{n}")
        await self.drop(self.replica, f"ours_b{n}", f"native_b{n}")
        await self.drop(self.erp, f"erp_b{n}")
        return results

    async def concurrent(self, changes: int, which: str) -> Result:
        """The consumer runs while the workload is generated."""
        n = self.counter = self.counter + 1
        erp = await self.source_db(f"erp_c{n}")
        target = await self.replica_db(f"{which}_c{n}")
        native = Native(erp, target, f"sub_c{n}")
        ours = Ours(erp, target, f"ours_c{n}", follow=True)
        if which == "native":
            await native.create(enabled=True)
            table = "order_lines"
            await native.wait_streaming()
        else:
            await self.prepare_ours(erp, target, f"ours_c{n}")
            await ours.start()
            table = "erp.order_lines"

        work = Workload(changes)
        samples: list[float] = []
        done = asyncio.Event()
        sampler = asyncio.create_task(sample_lag(target, table, work, done, samples))
        start = time.monotonic()
        await generate(erp, work, marker=2)
        end = await wait_marker(
            target, "bench_marker" if which == "native" else "erp.bench_marker", 2
        )
        done.set()
        await sampler

        if which == "native":
            rss = await native.worker_peak_rss_kb()
            extra: dict[str, Any] = {}
        else:
            report = await ours.finish()
            rss, extra = report["peak_rss_kb"], report
        rows = await self.verify(erp, target, table)
        result = Result(
            which,
            changes,
            end - start,
            rss,
            lag_max=max(samples, default=0.0),
            lag_mean=sum(samples) / len(samples) if samples else 0.0,
            catch_up=end - work.last_commit,
            generator_rate=changes / work.seconds,
            extra={"rows": rows, **extra},
        )
        if which == "native":
            await native.drop()
        else:
            await self.drop_slot(erp, f"ours_c{n}")
        await self.drop(self.replica, target.rsplit("/", 1)[1])
        await self.drop(self.erp, f"erp_c{n}")
        return result


# -- report ------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(title: str, rows: list[tuple[int, Result, Result]]) -> None:
    print(f"\n{title}")
    head = (
        f"{'changes':>9} {'native/s':>10} {'ours/s':>10} {'ratio':>6} "
        f"{'native RSS':>11} {'ours RSS':>9} {'gen/s':>8}"
    )
    lagged = rows and rows[0][2].lag_max is not None
    if lagged:
        head += (
            f" {'lag max n/o (s)':>16} {'lag mean n/o (s)':>17} "
            f"{'catch-up n/o (s)':>17}"
        )
    print(head)
    print("-" * len(head))
    for size, nat, ours in rows:
        line = (
            f"{size:>9,} {nat.rate:>10,.0f} {ours.rate:>10,.0f} "
            f"{ours.rate / nat.rate:>6.2f} {nat.peak_rss_kb / 1024:>9.1f}MB "
            f"{ours.peak_rss_kb / 1024:>7.1f}MB {_fmt(ours.generator_rate, ',.0f'):>8}"
        )
        if lagged:
            line += (
                f" {_fmt(nat.lag_max, '.3f'):>7} / {_fmt(ours.lag_max, '.3f'):<6}"
                f" {_fmt(nat.lag_mean, '.3f'):>7} / {_fmt(ours.lag_mean, '.3f'):<7}"
                f" {_fmt(nat.catch_up, '.3f'):>7} / {_fmt(ours.catch_up, '.3f'):<7}"
            )
        print(line)


async def run(sizes: list[int], million: bool, modes: set[str]) -> None:
    erp = TempPostgres(settings={"max_wal_size": "4GB", "checkpoint_timeout": "30min"})
    replica = TempPostgres(
        settings={"max_wal_size": "4GB", "checkpoint_timeout": "30min"}
    )
    erp.start()
    replica.start()
    try:
        bench = Bench(erp, replica)
        backlog_rows, concurrent_rows = [], []
        for size in sizes:
            if "backlog" in modes:
                nat, ours = await bench.backlog(size)
                backlog_rows.append((size, nat, ours))
                print(
                    f"backlog {size:,}: native {nat.rate:,.0f}/s, ours "
                    f"{ours.rate:,.0f}/s (ratio {ours.rate / nat.rate:.2f}; "
                    f"ours cpu {ours.extra['cpu_seconds']:.1f}s, "
                    f"{ours.extra['batches']} batches, rows {ours.extra['rows']:,})",
                    flush=True,
                )
            if "concurrent" in modes:
                nat = await bench.concurrent(size, "native")
                ours = await bench.concurrent(size, "ours")
                concurrent_rows.append((size, nat, ours))
                print(
                    f"concurrent {size:,}: native {nat.rate:,.0f}/s, ours "
                    f"{ours.rate:,.0f}/s, catch-up {nat.catch_up:.3f}s / "
                    f"{ours.catch_up:.3f}s",
                    flush=True,
                )
        million_results = []
        if million:
            for size in (100_000, 1_000_000):
                start = time.monotonic()
                (ours,) = await bench.backlog(size, native_too=False)
                million_results.append((size, ours, time.monotonic() - start))

        print(
            "\nERP -> replica, 100 changes a transaction "
            "(60% insert, 30% update, 10% delete); rows and checksums verified"
        )
        if backlog_rows:
            print_table("Backlog (committed first, then drained)", backlog_rows)
        if concurrent_rows:
            print_table(
                "Concurrent (consumer running during the workload; "
                "lag = age of oldest unapplied transaction; "
                "catch-up = last commit -> on replica)",
                concurrent_rows,
            )
        if million_results:
            print("\nFlat memory, ours alone, backlog drained")
            print(
                f"{'changes':>10} {'ours/s':>10} {'peak RSS':>10} {'RSS at start':>13} "
                f"{'phase wall':>11}"
            )
            for size, ours, wall in million_results:
                print(
                    f"{size:>10,} {ours.rate:>10,.0f} {ours.peak_rss_kb / 1024:>8.1f}MB "
                    f"{ours.extra['rss_ready_kb'] / 1024:>11.1f}MB {wall:>10.1f}s"
                )
        print(
            "\nRSS: ours = VmHWM of the pipeline process; native = VmHWM of the "
            "subscription's apply worker (shared buffers touched count too)."
        )
    finally:
        erp.stop()
        replica.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="100000,500000",
        help="comma-separated change counts (multiples of 100)",
    )
    parser.add_argument(
        "--million",
        action="store_true",
        help="also drain a 1,000,000-change backlog (ours) for memory",
    )
    parser.add_argument("--modes", default="backlog,concurrent")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    asyncio.run(run(sizes, args.million, set(args.modes.split(","))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
