"""Salesforce to replica throughput: the pipeline against a bare streaming subscriber.

The emulator runs in a child process on 127.0.0.1 with an in-memory org. A
deterministic workload of Account, Contact and Opportunity creates and updates
(1 to 200 records a transaction) is written through the org's state, so every
change event is a real committed transaction. Two consumers drain the same
events, each in its own child process so its CPU and peak RSS (VmHWM) are its
own:

- bare: the production ``SalesforceStream`` wrapper (aiosfstream-ng) on the
  three CDC channels, events discarded;
- pipeline: ``SalesforcePipeline`` into schema ``sf`` of a throwaway replica
  (``TempPostgres``), checkpoints committed with the rows.

Backlog: the workload is committed first; bare replays it with -2, the
pipeline resumes from the checkpoint its initial load stored (-2). Live: the
consumer is subscribed, then the emulator writes a fresh workload of the same
shape at ``--live-rate`` events/s (0: as fast as it can). The pipeline is done
when every channel's checkpoint holds the channel's last replay id; the main
process polls the checkpoints every 5 ms, which also samples lag: a
transaction is applied at the first poll where each channel it touched has a
checkpoint commit time at or past its own. After each pipeline run the mirror
is compared with the org (``verify_sf``) and the checkpoints with the log.

Usage: python bench/sf_throughput.py [--events 100000] [--live-rate 0]
       [--modes backlog,live]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replicator.emulator.app import EmulatorConfig
from replicator.pgserver import TempPostgres, free_port

OBJECTS = ("Account", "Contact", "Opportunity")
CHANNELS = {o: f"/data/{o}ChangeEvent" for o in OBJECTS}
SECRET_ENV = "REPLICATOR_BENCH_SF_SECRET"
PASSWORD_ENV = "REPLICATOR_BENCH_SF_PASSWORD"
LONG_POLL = 10.0
POLL = 0.005

# Transaction sizes (records): mostly single-record UI and API saves, some
# small batches, and bulk/composite saves of 200.
TX_SIZES = (1, 1, 1, 1, 2, 3, 5, 10, 25, 50, 200, 200)
OBJECT_WEIGHTS = (0.40, 0.35, 0.25)
CREATE_SHARE = 0.15
CITIES = ("Portland", "Austin", "Keene", "Lyon", "Osaka", "Leeds", "Quito", "Perth")
INDUSTRIES = ("Banking", "Energy", "Education", "Healthcare", "Insurance", "Retail")
STAGES = (
    "Prospecting",
    "Qualification",
    "Needs Analysis",
    "Proposal/Price Quote",
    "Negotiation/Review",
    "Closed Won",
    "Closed Lost",
)
TITLES = ("Buyer", "CFO", "Engineer", "Analyst", "Director", "Owner")


def rss_kb(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in kB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line[:5]] = int(line.split()[1])
    return out


# -- the emulator child ----------------------------------------------------------


class Workload:
    """Realistic creates and updates through ``OrgState.transaction``."""

    def __init__(self, state: Any, user_id: str, seed: int) -> None:
        self.state = state
        self.user_id = user_id
        self.rng = random.Random(seed)
        self.ids: dict[str, list[str]] = {o: [] for o in OBJECTS}
        self.n = 0

    def values(self, obj: str, create: bool) -> dict[str, Any]:
        rng, n = self.rng, self.n
        self.n += 1
        if obj == "Account":
            if create:
                return {
                    "Name": f"Account {n}",
                    "Industry": rng.choice(INDUSTRIES),
                    "BillingCity": rng.choice(CITIES),
                    "Phone": f"555-{n:07d}",
                    "AnnualRevenue": round(rng.uniform(1e4, 1e8), 2),
                    "NumberOfEmployees": rng.randint(1, 50_000),
                }
            pick = {
                "Phone": f"555-{n:07d}",
                "Rating": rng.choice(("Hot", "Warm", "Cold")),
                "Industry": rng.choice(INDUSTRIES),
                "BillingCity": rng.choice(CITIES),
                "AnnualRevenue": round(rng.uniform(1e4, 1e8), 2),
                "NumberOfEmployees": rng.randint(1, 50_000),
                "Description": f"account note {n}",
            }
        elif obj == "Contact":
            accounts = self.ids["Account"]
            if create:
                return {
                    "LastName": f"Last{n}",
                    "FirstName": f"First{n % 997}",
                    "Email": f"c{n}@example.com",
                    "Title": rng.choice(TITLES),
                    "AccountId": rng.choice(accounts) if accounts else None,
                }
            pick = {
                "Title": rng.choice(TITLES),
                "Email": f"c{n}@example.com",
                "Phone": f"555-{n:07d}",
                "MailingCity": rng.choice(CITIES),
                "FirstName": f"First{n % 991}",
                "Department": f"Dept {n % 13}",
            }
        else:
            if create:
                accounts = self.ids["Account"]
                return {
                    "Name": f"Deal {n}",
                    "StageName": rng.choice(STAGES),
                    "CloseDate": f"2027-{n % 12 + 1:02d}-15",
                    "Amount": round(rng.uniform(1e3, 1e6), 2),
                    "AccountId": rng.choice(accounts) if accounts else None,
                }
            pick = {
                "StageName": rng.choice(STAGES),
                "Amount": round(rng.uniform(1e3, 1e6), 2),
                "Probability": rng.randint(0, 100),
                "NextStep": f"call {n}",
                "CloseDate": f"2027-{n % 12 + 1:02d}-{n % 28 + 1:02d}",
            }
        names = rng.sample(sorted(pick), rng.randint(1, 3))
        return {k: pick[k] for k in names}

    def transaction(self, size: int) -> list[str]:
        """Write one transaction of ``size`` records; return the objects touched."""
        touched: set[str] = set()
        used: set[str] = set()
        with self.state.transaction(origin="bench", user_id=self.user_id) as tx:
            for _ in range(size):
                obj = self.rng.choices(OBJECTS, OBJECT_WEIGHTS)[0]
                pool = self.ids[obj]
                if len(pool) < 20 or self.rng.random() < CREATE_SHARE:
                    pool.append(tx.create(obj, self.values(obj, True)))
                else:
                    record_id = self.rng.choice(pool)
                    if record_id in used:
                        continue  # one event per record and transaction
                    used.add(record_id)
                    tx.update(obj, record_id, self.values(obj, False))
                touched.add(obj)
        return sorted(touched)


def _serve(config: EmulatorConfig, ready: Any) -> None:
    from aiohttp import web

    from replicator.emulator.app import create_app
    from replicator.emulator.keys import STATE_KEY
    from replicator.emulator.streaming import STREAMING_KEY

    app = create_app(config)
    state = app[STATE_KEY]
    user = state.find_user(config.username)
    assert user is not None
    seeds = iter(range(1, 1000))

    async def workload(request: web.Request) -> web.Response:
        """Body {"events": N, "rate": R}; answers with per-transaction commits."""
        body = await request.json()
        target, rate = int(body["events"]), float(body.get("rate", 0))
        work = Workload(state, str(user["Id"]), next(seeds))
        log = app[STREAMING_KEY].log
        first = log.last_id
        txs: list[tuple[int, list[str]]] = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        while log.last_id - first < target:
            left = target - (log.last_id - first)
            touched = work.transaction(min(work.rng.choice(TX_SIZES), left))
            commit_ms = int(state._last_commit.timestamp() * 1000)
            txs.append((commit_ms, touched))
            if rate > 0:
                delay = started + (log.last_id - first) / rate - loop.time()
                await asyncio.sleep(max(0.0, delay))
            else:
                await asyncio.sleep(0)
        seconds = loop.time() - started
        return web.json_response(
            {
                "transactions": txs,
                "seconds": seconds,
                "events": log.last_id - first,
                "last": _channel_tails(log),
            }
        )

    async def tails(request: web.Request) -> web.Response:
        return web.json_response({"last": _channel_tails(app[STREAMING_KEY].log)})

    app.router.add_post("/__bench__/workload", workload)
    app.router.add_get("/__bench__/tails", tails)

    async def main() -> None:
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, config.host, config.port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def _channel_tails(log: Any) -> dict[str, list[int]]:
    """Return each channel's last replay id and event count."""
    out = {}
    for channel in CHANNELS.values():
        events, _ = log.read_after(0, channel, 10**9)
        out[channel] = [events[-1].replay_id if events else 0, len(events)]
    return out


# -- consumer children -----------------------------------------------------------


def _settings(url: str, replica_dsn: str) -> Any:
    from replicator.config import parse

    config = EmulatorConfig()
    return parse(
        {
            "replica": {"dsn": replica_dsn},
            "salesforce": {
                "login_url": url,
                "client_id": config.client_id,
                "client_secret_env": SECRET_ENV,
                "username": config.username,
                "password_env": PASSWORD_ENV,
                "objects": list(OBJECTS),
                "long_poll_timeout_seconds": LONG_POLL,
            },
        }
    )


def _pipeline_child(url: str, dsn: str, ready: Any, stop: Any, out: Any) -> None:
    from replicator.sources.salesforce.source import SalesforcePipeline

    async def main() -> dict[str, Any]:
        pipeline = SalesforcePipeline(_settings(url, dsn))
        stopping = asyncio.Event()
        started, cpu = time.time(), os.times()
        task = asyncio.create_task(pipeline.run(stopping))
        while not pipeline.ready.is_set():
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        ready.set()
        await asyncio.to_thread(stop.wait)
        stopping.set()
        await task
        now = os.times()
        stats = pipeline.stats
        return {
            "started": started,
            "cpu": now.user + now.system - cpu.user - cpu.system,
            "peak_rss_kb": rss_kb()["VmHWM"],
            "stats": {
                k: getattr(stats, k)
                for k in (
                    "events",
                    "applied",
                    "skipped",
                    "refetched",
                    "dead_letters",
                    "catch_ups",
                    "batches",
                )
            },
        }

    out.put(asyncio.run(main()))


def _bare_child(url: str, replay: int, ready: Any, targets_in: Any, out: Any) -> None:
    from replicator.sources.salesforce.source import build_authenticator
    from replicator.sources.salesforce.streaming import SalesforceStream

    async def main() -> dict[str, Any]:
        cfg = _settings(url, "postgresql://unused").salesforce
        auth = build_authenticator(cfg)
        started, cpu = time.time(), os.times()
        await auth.login()
        stream = SalesforceStream(
            auth,
            list(CHANNELS.values()),
            lambda channel: None if replay == -1 else replay,
            api_version=cfg.api_version,
            long_poll_timeout=LONG_POLL,
        )
        seen: dict[str, tuple[int, float]] = {}
        targets: dict[str, int] = {}
        finished = asyncio.Event()
        count = 0

        def reached() -> bool:
            return bool(targets) and all(
                seen.get(c, (0, 0.0))[0] >= t for c, t in targets.items()
            )

        async def consume() -> None:
            nonlocal count
            async for event in stream:
                count += 1
                seen[event.channel] = (event.replay_id, time.time())
                if event.replay_id >= targets.get(event.channel, 1 << 62) and reached():
                    finished.set()

        async with stream:
            ready.set()
            reader = asyncio.create_task(consume())
            targets.update(await asyncio.to_thread(targets_in.get))
            if reached():
                finished.set()
            await finished.wait()
            reader.cancel()
        now = os.times()
        return {
            "started": started,
            "done": max(seen[c][1] for c in targets),
            "events": count,
            "cpu": now.user + now.system - cpu.user - cpu.system,
            "peak_rss_kb": rss_kb()["VmHWM"],
        }

    out.put(asyncio.run(main()))


# -- the main process -------------------------------------------------------------


@dataclass
class Run:
    name: str
    mode: str
    events: int
    seconds: float
    peak_rss_kb: int
    cpu: float
    lags: list[float] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds


class Bench:
    def __init__(self, url: str, replica: TempPostgres) -> None:
        self.url = url
        self.dsn = replica.dsn()
        self.ctx = multiprocessing.get_context("spawn")
        self.http: aiohttp.ClientSession

    async def workload(self, events: int, rate: float = 0.0) -> dict[str, Any]:
        async with self.http.post(
            f"{self.url}/__bench__/workload",
            json={"events": events, "rate": rate},
            timeout=aiohttp.ClientTimeout(total=3600),
        ) as r:
            r.raise_for_status()
            return await r.json()  # type: ignore[no-any-return]

    async def tails(self) -> dict[str, int]:
        async with self.http.get(f"{self.url}/__bench__/tails") as r:
            return {c: v[0] for c, v in (await r.json())["last"].items() if v[1]}

    def start_pipeline(self) -> tuple[Any, Any, Any, Any]:
        ready, stop, out = self.ctx.Event(), self.ctx.Event(), self.ctx.Queue()
        proc = self.ctx.Process(
            target=_pipeline_child,
            args=(self.url, self.dsn, ready, stop, out),
            daemon=True,
        )
        proc.start()
        return proc, ready, stop, out

    async def wait_set(self, event: Any, proc: Any, limit: float = 120) -> None:
        deadline = time.monotonic() + limit
        while not event.is_set():
            if not proc.is_alive() or time.monotonic() > deadline:
                raise SystemExit("consumer child did not get ready")
            await asyncio.sleep(0.01)

    async def watch(
        self, targets: dict[str, int], proc: Any, limit: float = 1800
    ) -> tuple[float, list[tuple[float, dict[str, int]]]]:
        """Poll the checkpoints until they reach ``targets``; return time, samples."""
        conn = await asyncpg.connect(self.dsn)
        samples: list[tuple[float, dict[str, int]]] = []
        deadline = time.monotonic() + limit
        try:
            while time.monotonic() < deadline:
                rows = await conn.fetch(
                    "SELECT stream, position, (details->>'commit_ms')::bigint "
                    "FROM replicator.checkpoints WHERE stream LIKE 'sf:/data/%'"
                )
                now = time.time()
                ms = {r[0][3:]: r[2] or 0 for r in rows}
                samples.append((now, ms))
                pos = {r[0][3:]: int(r[1]) for r in rows}
                if all(pos.get(c, -1) >= t for c, t in targets.items()):
                    return now, samples
                if not proc.is_alive():
                    raise SystemExit("pipeline child died")
                await asyncio.sleep(POLL)
        finally:
            await conn.close()
        raise SystemExit(f"pipeline did not reach {targets} in {limit}s")

    async def verify(self, targets: dict[str, int]) -> str:
        from replicator.verify import verify_sf

        reports = await verify_sf(_settings(self.url, self.dsn))
        bad = [r for r in reports if not r.ok]
        if bad:
            raise SystemExit(
                "VERIFY FAILED: "
                + "; ".join(
                    f"{r.table}: {r.mismatches} rows differ, missing {r.missing[:2]} "
                    f"extra {r.extra[:2]}"
                    for r in bad
                )
            )
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(
                "SELECT stream, position FROM replicator.checkpoints "
                "WHERE stream LIKE 'sf:/data/%'"
            )
        finally:
            await conn.close()
        stored = {r[0][3:]: int(r[1]) for r in rows}
        if any(stored.get(c) != t for c, t in targets.items()):
            raise SystemExit(
                f"VERIFY FAILED: checkpoints {stored} != log tails {targets}"
            )
        return ", ".join(f"{r.table} {r.mirror_rows}" for r in reports)

    async def pipeline_run(self, mode: str, events: int, rate: float) -> Run:
        """Backlog: resume from the stored -2. Live: load while subscribed."""
        proc, ready, stop, out = self.start_pipeline()
        txs: list[Any] = []
        try:
            if mode == "backlog":
                targets = await self.tails()
                await self.wait_set(ready, proc)
                done, samples = await self.watch(targets, proc)
                produced = events
            else:
                await self.wait_set(ready, proc)
                start = time.time()
                load = await self.workload(events, rate)
                targets = {c: v[0] for c, v in load["last"].items() if v[1]}
                done, samples = await self.watch(targets, proc)
                txs, produced = load["transactions"], load["events"]
            stop.set()
            report = await asyncio.to_thread(out.get, True, 120)
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        begin = report["started"] if mode == "backlog" else start
        run = Run(
            "pipeline",
            mode,
            produced,
            done - begin,
            report["peak_rss_kb"],
            report["cpu"],
            detail=report["stats"],
        )
        run.lags = _lags(txs, samples)
        run.detail["verified"] = await self.verify(targets)
        return run

    async def bare_run(self, mode: str, events: int, rate: float) -> Run:
        """Backlog: replay with -2. Live: subscribe with -1, then load."""
        ready, targets_in, out = self.ctx.Event(), self.ctx.Queue(), self.ctx.Queue()
        replay = -2 if mode == "backlog" else -1
        proc = self.ctx.Process(
            target=_bare_child,
            args=(self.url, replay, ready, targets_in, out),
            daemon=True,
        )
        proc.start()
        try:
            if mode == "backlog":
                targets_in.put(await self.tails())
                produced = events
            await self.wait_set(ready, proc)
            if mode == "live":
                start = time.time()
                load = await self.workload(events, rate)
                targets_in.put({c: v[0] for c, v in load["last"].items() if v[1]})
                produced = load["events"]
            report = await asyncio.to_thread(out.get, True, 1800)
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        begin = report["started"] if mode == "backlog" else start
        if report["events"] < produced:
            raise SystemExit(f"bare subscriber got {report['events']} of {produced}")
        return Run(
            "bare",
            mode,
            produced,
            report["done"] - begin,
            report["peak_rss_kb"],
            report["cpu"],
        )


def _lags(txs: list[Any], samples: list[tuple[float, dict[str, int]]]) -> list[float]:
    """Seconds from each transaction's commit to the poll that saw it applied."""
    lags = []
    i = 0
    for commit_ms, objects in txs:
        channels = [CHANNELS[o] for o in objects]
        while i < len(samples) and not all(
            samples[i][1].get(c, 0) >= commit_ms for c in channels
        ):
            i += 1
        if i == len(samples):
            break
        lags.append(samples[i][0] - commit_ms / 1000)
    return lags


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def print_table(runs: dict[tuple[str, str], Run]) -> None:
    print()
    print(
        f"{'mode':8} {'consumer':9} {'events':>8} {'seconds':>8} {'events/s':>9} "
        f"{'cpu s':>6} {'cpu us/ev':>9} {'peak RSS':>9} {'lag p50/p95/max (s)':>22}"
    )
    for (mode, name), run in runs.items():
        lag = (
            f"{statistics.median(run.lags):.3f} / {_pct(run.lags, 0.95):.3f} / "
            f"{max(run.lags):.3f}"
            if run.lags
            else "-"
        )
        print(
            f"{mode:8} {name:9} {run.events:>8,} {run.seconds:>8.2f} {run.rate:>9,.0f} "
            f"{run.cpu:>6.1f} {run.cpu / run.events * 1e6:>9.0f} "
            f"{run.peak_rss_kb / 1024:>7.1f}MB {lag:>22}"
        )
    print()
    for mode in ("backlog", "live"):
        bare, ours = runs.get((mode, "bare")), runs.get((mode, "pipeline"))
        if bare and ours:
            verdict = "meets" if ours.rate / bare.rate >= 0.8 else "BELOW"
            print(
                f"{mode:8} pipeline/bare {ours.rate / bare.rate:5.2f}x "
                f"({verdict} the 0.8 target)"
            )
    for (mode, name), run in runs.items():
        if name == "pipeline":
            stats = {k: v for k, v in run.detail.items() if k != "verified"}
            print(f"{mode:8} pipeline stats {stats}")
            print(
                f"{mode:8} verified: org == mirror ({run.detail['verified']} rows); "
                "checkpoints == last replay ids"
            )


def _start_emulator(config: EmulatorConfig) -> Any:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=_serve, args=(config, ready), daemon=True)
    process.start()
    if not ready.wait(60):
        process.kill()
        raise SystemExit("emulator did not start")
    return process


async def run(args: argparse.Namespace, url: str, replica: TempPostgres) -> None:
    bench = Bench(url, replica)
    modes = set(args.modes.split(","))
    runs: dict[tuple[str, str], Run] = {}
    async with aiohttp.ClientSession() as bench.http:
        # The initial load stores checkpoint -2 before any event exists.
        proc, ready, stop, out = bench.start_pipeline()
        await bench.wait_set(ready, proc)
        stop.set()
        await asyncio.to_thread(out.get, True, 60)
        proc.join(30)

        if "backlog" in modes:
            load = await bench.workload(args.events)
            print(
                f"backlog: {load['events']:,} events in {len(load['transactions']):,} "
                f"transactions written in {load['seconds']:.1f}s",
                flush=True,
            )
            for name in ("bare", "pipeline"):
                if name == "bare":
                    result = await bench.bare_run("backlog", load["events"], 0)
                else:
                    result = await bench.pipeline_run("backlog", load["events"], 0)
                runs[("backlog", name)] = result
                print(f"backlog {name}: {result.rate:,.0f} events/s", flush=True)
        if "live" in modes:
            result = await bench.pipeline_run("live", args.events, args.live_rate)
            runs[("live", "pipeline")] = result
            print(f"live pipeline: {result.rate:,.0f} events/s", flush=True)
            result = await bench.bare_run("live", args.events, args.live_rate)
            runs[("live", "bare")] = result
            print(f"live bare: {result.rate:,.0f} events/s", flush=True)
    order = [(m, n) for m in ("backlog", "live") for n in ("bare", "pipeline")]
    print_table({k: runs[k] for k in order if k in runs})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument(
        "--live-rate",
        type=float,
        default=0.0,
        help="live workload events/s (0: as fast as the emulator writes)",
    )
    parser.add_argument("--modes", default="backlog,live")
    args = parser.parse_args(argv)

    config = EmulatorConfig(
        port=free_port(),
        long_poll_timeout_seconds=LONG_POLL,
        daily_api_limit=10_000_000,
    )
    os.environ[SECRET_ENV] = config.client_secret
    os.environ[PASSWORD_ENV] = config.password + config.security_token
    emulator = _start_emulator(config)
    try:
        with TempPostgres() as replica:
            asyncio.run(run(args, f"http://127.0.0.1:{config.port}", replica))
    finally:
        emulator.kill()
        emulator.join()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
