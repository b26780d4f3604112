"""Two-way sync: write-back throughput, round trips, and the cost of resolution.

Two throwaway clusters on loopback (the ERP and the replica), the emulator in
a child process with an otherwise empty org (Account plus an
``ERP_Customer_Code__c`` external id), and the real daemon
(``python -m replicator run``) in another, with one entity mapped like
``tests/test_sync.py``: an ERP ``customer`` table linked to Account, name,
phone, city and state (``us_state``) both ways, production defaults otherwise
(tie window 1 s, outbox batches of 200, Salesforce settle 50 ms). Phases:

- link: N customers inserted in the ERP are created in the org by the
  daemon (upsert by external id); every later phase works on these N
  linked records.
- to_sf: N ERP updates in a burst (``--tx-rows`` rows a transaction, the
  session committing asynchronously so the disk does not pace the burst);
  the time from the first edit until the last resulting outbox row is done,
  then every value is checked in the org by SOQL.
- to_erp: N edits made in the org through sObject Collections (200 a call,
  as another API client); the time until the last outbox row is done, every
  value checked in the ERP.
- round_trip: single paced edits alternating ERP and org, each on its own
  record, from the edit until the target shows the value (ERP polled by
  SELECT, the org by REST GET of the record) every ``--poll-ms``.
- peers: the daemon stopped, a bare client writes N values straight to each
  target the way the sinks do (collections of 200; a transaction a row).
- resolution: the ERP pipeline alone, in this process, drains the same
  backlog of ERP updates (each row once, 100 rows a transaction) three
  ways, each from its own slot and replica database: no entity (mirror
  upsert only), the entity mapped (resolution, conflict log and outbox in
  the same replica transaction, records linked beforehand), and mapped with
  ``--history`` finished write-backs to the ERP already in the outbox
  (heartbeat and status every 0.5 s so that each run ends once caught up;
  the time is from streaming to the last commit). The floor is an asyncpg
  ``executemany`` UPDATE of the same rows' new values into the mirror.
  Mirrors are checksummed against the ERP.

After link, to_sf and to_erp the bench waits until the echoes of the
daemon's writes have come back into the mirrors and counts the outbox rows
each phase caused: one per edit and target, none for an echo. CPU seconds
are the daemon's and the emulator's own (``/proc``). ``--statements`` loads
``pg_stat_statements`` into the replica and prints, per phase, how many
statements the daemon ran there and which took the server's time.

Usage: python bench/sync_writeback.py [--records 1000] [--round-trips 200]
       [--resolve-changes 3000] [--history 3000] [--tx-rows 1] [--statements]
       [--phases link,to_sf,to_erp,round_trip,resolution]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replicator.emulator.app import EmulatorConfig
from replicator.pgserver import TempPostgres, free_port

ROOT = Path(__file__).resolve().parents[1]
SECRET_ENV = "REPLICATOR_BENCH_SF_SECRET"
PASSWORD_ENV = "REPLICATOR_BENCH_SF_PASSWORD"
API = "/services/data/v60.0"
PUBLICATION = "bench_sync_pub"
CHECKSUM = (
    "SELECT count(*), coalesce(sum(hashtextextended("
    "concat_ws('|', customer_code, name, phone, billing_city, billing_state), 0)), 0)"
    "::text FROM {table}"
)
CUSTOMER_DDL = """
CREATE TABLE customer (customer_code text PRIMARY KEY, name text NOT NULL, phone text,
                       billing_city text, billing_state text);
"""
STATES = ("New Hampshire", "Vermont", "Maine", "Oregon", "Texas", "Ohio")
CITIES = ("Keene", "Burlington", "Portland", "Austin", "Akron", "Salem")
EXTERNAL_ID_XML = """<?xml version="1.0" encoding="UTF-8"?>
<CustomField xmlns="http://soap.sforce.com/2006/04/metadata">
<fullName>ERP_Customer_Code__c</fullName><label>ERP Customer Code</label>
<type>Text</type><length>20</length><externalId>true</externalId><unique>true</unique>
</CustomField>
"""
ENTITY: dict[str, Any] = {
    "name": "customer",
    "salesforce": "Account",
    "erp": "public.customer",
    "external_id": "ERP_Customer_Code__c",
    "erp_new_key": "code(name)",  # a key for records created in the org (none here)
    "direction": "both",
    "delete_policy": "mark",
    "fields": [
        {"name": "name", "salesforce": "Name", "erp": "name"},
        {"name": "phone", "salesforce": "Phone", "erp": "phone"},
        {"name": "city", "salesforce": "BillingCity", "erp": "billing_city"},
        {
            "name": "state",
            "salesforce": "BillingState",
            "erp": "billing_state",
            "transform": "us_state",
        },
    ],
}


def code(i: int) -> str:
    return f"C-{i:06d}"


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile by nearest rank (p99 of 200 values: the 198th)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def until(
    check: Callable[[], Awaitable[Any]], what: str, limit: float, every: float = 0.02
) -> Any:
    """Poll ``check`` until it returns something true; fail after ``limit`` s."""
    deadline = time.monotonic() + limit
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise SystemExit(f"timed out after {limit:.0f}s waiting for {what} (last {last!r})")


# -- the emulator child and a REST client ------------------------------------------


def _serve(config: EmulatorConfig, ready: Any) -> None:
    from aiohttp import web

    from replicator.emulator.app import create_app

    async def main() -> None:
        runner = web.AppRunner(create_app(config))
        await runner.setup()
        await web.TCPSite(runner, config.host, config.port).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


class Org:
    """REST calls as another API client of the org (no ``Sforce-Call-Options``)."""

    def __init__(self, url: str, http: aiohttp.ClientSession) -> None:
        self.url = url
        self.http = http
        self.headers: dict[str, str] = {}

    async def login(self, config: EmulatorConfig) -> None:
        form = {
            "grant_type": "password",
            "client_id": config.client_id,
            "client_secret": config.client_secret,
            "username": config.username,
            "password": config.password + config.security_token,
        }
        async with self.http.post(
            self.url + "/services/oauth2/token", data=form
        ) as resp:
            body = await resp.json()
        self.headers = {"Authorization": f"Bearer {body['access_token']}"}

    async def call(
        self, method: str, path: str, body: Any = None, params: Any = None
    ) -> Any:
        async with self.http.request(
            method, self.url + path, json=body, params=params, headers=self.headers
        ) as resp:
            text = await resp.text()
            if resp.status >= 300:
                raise SystemExit(
                    f"{method} {path} answered {resp.status}: {text[:300]}"
                )
            return await resp.json() if text else None

    async def query(self, soql: str) -> list[dict[str, Any]]:
        body = await self.call("GET", API + "/query", params={"q": soql})
        records: list[dict[str, Any]] = body["records"]
        while body.get("nextRecordsUrl"):
            body = await self.call("GET", body["nextRecordsUrl"])
            records += body["records"]
        return records

    async def phone(self, record_id: str) -> str | None:
        record = await self.call(
            "GET", f"{API}/sobjects/Account/{record_id}", params={"fields": "Phone"}
        )
        return record.get("Phone")  # type: ignore[no-any-return]

    async def update_collection(self, changes: list[tuple[str, str]]) -> None:
        """Set Phone on each (Id, phone), 200 records a call, none may fail."""
        for i in range(0, len(changes), 200):
            records = [
                {"attributes": {"type": "Account"}, "id": rid, "Phone": phone}
                for rid, phone in changes[i : i + 200]
            ]
            answer = await self.call(
                "PATCH",
                API + "/composite/sobjects",
                {"allOrNone": False, "records": records},
            )
            failed = [a for a in answer if not a.get("success")]
            if failed:
                raise SystemExit(f"collection update refused: {failed[:2]}")


# -- the daemon ---------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def daemon_toml(erp_dsn: str, replica_dsn: str, sf_url: str, ops_port: int) -> str:
    config = EmulatorConfig()
    sections: dict[str, dict[str, Any]] = {
        "replica": {"dsn": replica_dsn},
        "erp": {"publication": PUBLICATION, "slot": "bench_sync_slot"},
        "erp.database": {"dsn": erp_dsn},
        "salesforce": {
            "login_url": sf_url,
            "client_id": config.client_id,
            "client_secret_env": SECRET_ENV,
            "username": config.username,
            "password_env": PASSWORD_ENV,
            "objects": ["Account"],
        },
        "ops": {"listen": f"127.0.0.1:{ops_port}", "sample_seconds": 0.5},
    }
    lines = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in keys.items()]
    lines.append("[[entities]]")
    lines += [f"{k} = {_toml(v)}" for k, v in ENTITY.items() if k != "fields"]
    for mapped in ENTITY["fields"]:
        lines.append("[[entities.fields]]")
        lines += [f"{k} = {_toml(v)}" for k, v in mapped.items()]
    return "\n".join(lines) + "\n"


class Daemon:
    """``python -m replicator run`` in a child process, logging to a file."""

    def __init__(self, config_text: str, workdir: Path, ops_port: int) -> None:
        self.path = workdir / "replicator.toml"
        self.path.write_text(config_text)
        self.log = workdir / "daemon.log"
        self.ops_port = ops_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _spawn(self, *extra: str) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as log:
            return subprocess.Popen(
                [
                    sys.executable,
                    *("-m", "replicator", "--log-format", "text"),
                    *("run", "-c", str(self.path), *extra),
                ],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def initialise(self, replica: asyncpg.Connection) -> None:
        """Create the schema, then snapshot and load once with --until-caught-up.

        The measured daemon then starts from its checkpoints. At commit
        56e1c6c the outbox worker also needed it: it read
        ``replicator.mirror_tables`` once, beside the pipelines that create
        it (missing: the daemon stopped; empty: every ERP write-back failed).
        """

        from replicator.store.tables import create_schema

        await create_schema(replica)
        first = self._spawn("--until-caught-up")
        code = await asyncio.to_thread(first.wait, 300)
        if code != 0:
            raise SystemExit(f"daemon --until-caught-up exited {code}; see {self.log}")

    async def start(self, http: aiohttp.ClientSession) -> None:
        self.proc = self._spawn()

        async def ready() -> bool:
            self.check()
            with contextlib.suppress(aiohttp.ClientError):
                url = f"http://127.0.0.1:{self.ops_port}/readyz"
                async with http.get(url) as resp:
                    return resp.status == 200
            return False

        await until(ready, "the daemon's /readyz", 90, every=0.1)

    def check(self) -> None:
        """Stop the bench if the daemon has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise SystemExit(f"daemon exited {self.proc.returncode}; see {self.log}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- the two-way phases ----------------------------------------------------------------


@dataclass
class Phase:
    name: str
    edits: int
    edit_seconds: float  # how long making the edits took
    resolved_seconds: float  # first edit -> every outbox row committed
    seconds: float  # first edit -> last outbox row done
    cpu: dict[str, float]  # daemon, emulator: until the last row was done
    writes: dict[str, int] = field(default_factory=dict)  # rows caused, by target

    @property
    def rate(self) -> float:
        return self.edits / self.seconds


_TOP_STATEMENTS = """
SELECT calls, total_exec_time AS ms,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 80) AS query
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND query NOT LIKE '/* bench */%' AND query NOT LIKE '%pg_stat_statements%'
ORDER BY total_exec_time DESC
"""


@dataclass
class Trips:
    to_sf: list[float] = field(default_factory=list)  # ms
    to_erp: list[float] = field(default_factory=list)


class TwoWay:
    """Drive edits on both sides of a running daemon and watch them land."""

    def __init__(
        self,
        erp: asyncpg.Connection,
        replica: asyncpg.Connection,
        org: Org,
        daemon: Daemon,
        emulator_pid: int,
        args: argparse.Namespace,
    ) -> None:
        self.erp, self.replica, self.org = erp, replica, org
        self.daemon = daemon
        self.pids = {"daemon": daemon.pid, "emulator": emulator_pid}
        self.n = args.records
        self.args = args
        self.sf_ids: dict[str, str] = {}  # customer code -> Account Id

    async def _until(
        self,
        check: Callable[[], Awaitable[Any]],
        what: str,
        limit: float,
        every: float = 0.02,
    ) -> Any:
        async def checked() -> Any:
            self.daemon.check()
            return await check()

        return await until(checked, what, limit, every)

    def _cpu(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    async def _measure(
        self, name: str, target: str, edit: Callable[[], Awaitable[None]]
    ) -> Phase:
        """Make the edits; wait until N outbox rows to ``target`` are done."""
        mark = await self.replica.fetchval(
            "/* bench */ SELECT coalesce(max(id), 0) FROM replicator.outbox"
        )
        await self._reset_statements()
        cpu = self._cpu()
        resolved = 0.0
        start = time.time()
        await edit()
        edited = time.time()

        async def drained() -> float | None:
            nonlocal resolved
            row = await self.replica.fetchrow(
                "/* bench */ SELECT count(*) AS rows, "
                "count(*) FILTER (WHERE status <> 'done') "
                "AS open, extract(epoch FROM max(done_at))::float8 AS last "
                "FROM replicator.outbox WHERE id > $1 AND target = $2",
                mark,
                target,
            )
            if not resolved and row["rows"] >= self.n:
                resolved = time.time()
            return row["last"] if resolved and row["open"] == 0 else None

        last = await self._until(drained, f"the {name} write-backs", 900)
        used = {k: v - cpu[k] for k, v in self._cpu().items()}
        # resolved is seen by polling, the last done_at stamped by the server
        resolved = min(resolved, last)
        phase = Phase(
            name, self.n, edited - start, resolved - start, last - start, used
        )
        phase.writes = {"mark": mark}
        return phase

    async def _reset_statements(self) -> None:
        if self.args.statements:
            await self.replica.execute("SELECT pg_stat_statements_reset()")

    async def _print_statements(self, what: str, edits: int) -> None:
        """The daemon's replica statements since the reset, by total time."""
        if not self.args.statements:
            return
        rows = await self.replica.fetch(_TOP_STATEMENTS)
        calls = sum(r["calls"] for r in rows)
        print(
            f"{what}: the replica ran {calls:,} statements of the daemon, "
            f"{calls / edits:.1f} an edit; by server time:"
        )
        for r in rows[:8]:
            print(
                f"  {r['calls']:>7,} calls {r['ms']:>8,.0f} ms "
                f"{r['ms'] / r['calls']:>6.3f} ms each  {r['query']}"
            )

    async def _settle(self, phase: Phase, prefix: str) -> None:
        """Wait for the echoes in both mirrors; count the outbox rows caused."""
        mark = phase.writes["mark"]

        async def settled() -> bool:
            counts = await self.replica.fetchrow(
                "/* bench */ SELECT "
                "(SELECT count(*) FROM sf.account WHERE phone LIKE $1), "
                "(SELECT count(*) FROM erp.customer WHERE phone LIKE $1), "
                "(SELECT count(*) FROM replicator.outbox WHERE id > $2 "
                "AND status <> 'done')",
                prefix + "%",
                mark,
            )
            return tuple(counts) == (self.n, self.n, 0)

        await self._until(settled, "the echoes to settle", 300, every=0.1)
        await asyncio.sleep(1.0)  # a late echo would add an outbox row: count it
        rows = await self.replica.fetch(
            "/* bench */ SELECT target, count(*) FROM replicator.outbox "
            "WHERE id > $1 GROUP BY 1",
            mark,
        )
        phase.writes = {"salesforce": 0, "erp": 0, **{r[0]: r[1] for r in rows}}
        await self._print_statements(phase.name, phase.edits)

    async def link(self) -> Phase:
        """Insert N customers in the ERP; the daemon creates them in the org."""
        rows = [
            (code(i), f"Customer {i}", f"L-{i:06d}", CITIES[i % 6], STATES[i % 6])
            for i in range(self.n)
        ]

        async def insert() -> None:
            for i in range(0, self.n, 100):
                async with self.erp.transaction():
                    await self.erp.executemany(
                        "INSERT INTO customer VALUES ($1, $2, $3, $4, $5)",
                        rows[i : i + 100],
                    )

        phase = await self._measure("link", "salesforce", insert)
        await self._settle(phase, "L-")
        linked = await self.replica.fetch(
            "/* bench */ SELECT erp_key, sf_id FROM unified.customer "
            "WHERE sf_id IS NOT NULL"
        )
        self.sf_ids = {r["erp_key"]: r["sf_id"] for r in linked}
        if len(self.sf_ids) != self.n:
            raise SystemExit(f"only {len(self.sf_ids)} of {self.n} records linked")
        return phase

    async def to_sf(self) -> Phase:
        """N ERP updates in a burst; every value checked in the org."""
        values = [(f"E-{i:06d}", code(i)) for i in range(self.n)]
        step = self.args.tx_rows

        async def burst() -> None:
            # One session commits one transaction after another: without waiting
            # for each WAL flush, so the burst is not paced by the disk's fsync.
            await self.erp.execute("SET synchronous_commit = off")
            for i in range(0, self.n, step):
                async with self.erp.transaction():
                    await self.erp.executemany(
                        "UPDATE customer SET phone = $1 WHERE customer_code = $2",
                        values[i : i + step],
                    )
            await self.erp.execute("RESET synchronous_commit")

        phase = await self._measure("to_sf", "salesforce", burst)
        seen = await self.org.query(
            "SELECT ERP_Customer_Code__c, Phone FROM Account WHERE Phone LIKE 'E-%'"
        )
        got = {r["ERP_Customer_Code__c"]: r["Phone"] for r in seen}
        if got != {c: p for p, c in values}:
            raise SystemExit(f"org differs: {len(got)} of {self.n} accounts match")
        await self._settle(phase, "E-")
        return phase

    async def to_erp(self) -> Phase:
        """N edits in the org through sObject Collections; checked in the ERP."""
        changes = [(self.sf_ids[code(i)], f"S-{i:06d}") for i in range(self.n)]
        phase = await self._measure(
            "to_erp", "erp", lambda: self.org.update_collection(changes)
        )
        rows = await self.erp.fetch(
            "SELECT customer_code, phone FROM customer WHERE phone LIKE 'S-%'"
        )
        if {r[0]: r[1] for r in rows} != {code(i): f"S-{i:06d}" for i in range(self.n)}:
            raise SystemExit(f"ERP differs: {len(rows)} of {self.n} rows match")
        await self._settle(phase, "S-")
        return phase

    async def round_trips(self) -> tuple[Trips, dict[str, float], float]:
        """Single paced edits, alternating sides, each on a record of its own."""
        await self._reset_statements()
        trips, cpu = Trips(), self._cpu()
        poll, gap = self.args.poll_ms / 1000, self.args.gap_ms / 1000
        began = time.monotonic()
        for i in range(self.args.round_trips):
            erp_code = code((2 * i) % self.n)
            value = f"RE-{i:06d}"
            sf_id = self.sf_ids[erp_code]
            t0 = time.perf_counter()
            await self.erp.execute(
                "UPDATE customer SET phone = $1 WHERE customer_code = $2",
                value,
                erp_code,
            )
            shown = functools.partial(self._sf_is, sf_id, value)
            await self._until(shown, "a round trip", 60, poll)
            trips.to_sf.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(gap)

            sf_code = code((2 * i + 1) % self.n)
            value = f"RS-{i:06d}"
            t0 = time.perf_counter()
            await self.org.call(
                "PATCH",
                f"{API}/sobjects/Account/{self.sf_ids[sf_code]}",
                {"Phone": value},
            )
            landed = functools.partial(self._erp_is, sf_code, value)
            await self._until(landed, "a round trip", 60, poll)
            trips.to_erp.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(gap)
        used = {k: v - cpu[k] for k, v in self._cpu().items()}
        await self._print_statements("round_trip", 2 * self.args.round_trips)
        return trips, used, time.monotonic() - began

    async def peers(self) -> list[tuple[str, float]]:
        """Write N values straight to each target, the daemon stopped: the floors."""
        self.daemon.stop()
        changes = [(self.sf_ids[code(i)], f"P-{i:06d}") for i in range(self.n)]
        start = time.perf_counter()
        await self.org.update_collection(changes)
        to_sf = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(self.n):  # as the ERP sink writes: a transaction a row
            async with self.erp.transaction():
                await self.erp.execute(
                    "UPDATE customer SET phone = $1 WHERE customer_code = $2",
                    f"P-{i:06d}",
                    code(i),
                )
        to_erp = time.perf_counter() - start
        return [
            ("bare client to the org, collections of 200", to_sf),
            ("bare client to the ERP, a transaction a row", to_erp),
        ]

    async def _sf_is(self, record_id: str, value: str) -> bool:
        return await self.org.phone(record_id) == value

    async def _erp_is(self, erp_code: str, value: str) -> bool:
        phone = await self.erp.fetchval(
            "SELECT phone FROM customer WHERE customer_code = $1", erp_code
        )
        return bool(phone == value)


# -- resolution against a plain upsert ------------------------------------------------


@dataclass
class Drain:
    name: str
    changes: int
    seconds: float
    cpu: float
    outbox: int = 0
    conflicts: int = 0

    @property
    def rate(self) -> float:
        return self.changes / self.seconds


class StampedEvent(asyncio.Event):
    """An event that remembers when it was first set."""

    at = 0.0

    def set(self) -> None:
        if not self.at:
            self.at = time.time()
        super().set()


def resolve_settings(erp_dsn: str, replica_dsn: str, slot: str, mapped: bool) -> Any:
    from replicator.config import parse

    return parse(
        {
            "replica": {"dsn": replica_dsn},
            "erp": {
                "database": {"dsn": erp_dsn},
                "slot": slot,
                "publication": "bench_resolve_pub",
                "heartbeat_seconds": 0.5,
                "status_interval_seconds": 0.5,
            },
            "entities": [ENTITY] if mapped else [],
        }
    )


async def drain(settings: Any) -> tuple[float, int, float]:
    """Run the ERP pipeline until caught up: (seconds from ready to last commit,
    changes, CPU seconds of this process)."""
    from replicator.sources.erp.source import ErpPipeline

    pipeline = ErpPipeline(settings)
    pipeline.ready = ready = StampedEvent()
    cpu = os.times()
    stats = await pipeline.run(asyncio.Event(), until_caught_up=True)
    now = os.times()
    used = now.user + now.system - cpu.user - cpu.system
    return stats.last_commit_time - ready.at, stats.changes, used


_LINK = """
INSERT INTO unified.customer (unified_id, sf_id, erp_key, name, phone, city, state,
                              versions)
SELECT 'erp:' || customer_code, '001BENCH' || lpad(row_number() OVER ()::text, 10, '0'),
       customer_code, name, phone, billing_city, billing_state,
       jsonb_build_object('name', v, 'phone', v, 'city', v, 'state', v)
FROM erp.customer,
     jsonb_build_object(
         't', (extract(epoch FROM now() - interval '1 hour') * 1000)::bigint,
         's', 'erp', 'p', '0/1') AS v
"""
_HISTORY = """
INSERT INTO replicator.outbox (entity, target, target_key, operation, fields, cause,
                               status, attempts, created_at, done_at)
SELECT 'customer', 'erp', k, 'upsert', '{"phone": "old"}',
       jsonb_build_object('unified_id', 'erp:' || k, 'source', 'salesforce',
                          'unified', jsonb_build_object('phone', 'old')),
       'done', 1, now() - interval '1 hour', now() - interval '1 hour'
FROM (SELECT 'C-' || lpad((g % $2)::text, 6, '0') AS k
      FROM generate_series(0, $1 - 1) AS g) AS keys
"""


async def mark_echoed(conn: asyncpg.Connection) -> None:
    """Record that the echo of every finished write-back came back."""
    if await conn.fetchval("SELECT to_regclass('replicator.outbox_echoes')"):
        await conn.execute(
            "INSERT INTO replicator.outbox_echoes (outbox_id, field) "
            "SELECT id, 'phone' FROM replicator.outbox WHERE status = 'done'"
        )
    else:  # the marks' older place
        await conn.execute(
            "UPDATE replicator.outbox SET echoed = '{\"phone\": true}' "
            "WHERE status = 'done'"
        )


async def resolution(
    erp_pg: TempPostgres, replica_pg: TempPostgres, changes: int, history: int
) -> tuple[list[Drain], Drain]:
    """Drain one ERP backlog with and without the entity; executemany as the floor."""
    runs = [("mirror upsert only", False, 0), ("mapped: resolution + outbox", True, 0)]
    if history:
        runs.append((f"mapped, outbox holding {history:,} done to ERP", True, history))
    admin = await asyncpg.connect(erp_pg.dsn())
    await admin.execute("CREATE DATABASE resolve")
    await admin.close()
    erp_dsn = erp_pg.dsn("resolve")
    erp = await asyncpg.connect(erp_dsn)
    await erp.execute(CUSTOMER_DDL)
    await erp.execute(
        "INSERT INTO customer SELECT 'C-' || lpad(g::text, 6, '0'), 'Customer ' || g, "
        "'L-' || g, 'Keene', 'New Hampshire' FROM generate_series(0, $1 - 1) g",
        changes,
    )
    await erp.execute("CREATE PUBLICATION bench_resolve_pub FOR TABLE customer")
    replica_admin = await asyncpg.connect(replica_pg.dsn())
    prepared = []
    for i, (name, mapped, extra) in enumerate(runs):
        await replica_admin.execute(f"CREATE DATABASE resolve_{i}")
        settings = resolve_settings(
            erp_dsn, replica_pg.dsn(f"resolve_{i}"), f"resolve_{i}", mapped
        )
        await drain(settings)  # slot, snapshot; no change to apply yet
        conn = await asyncpg.connect(replica_pg.dsn(f"resolve_{i}"))
        if mapped:
            await conn.execute(_LINK)
            await conn.execute(_HISTORY, extra, changes)
            await mark_echoed(conn)
            if await conn.fetchval("SELECT to_regclass('replicator.sync_entities')"):
                # the initial linking pass counts as done: these rows are linked
                await conn.execute(
                    "INSERT INTO replicator.sync_entities (entity, linked_at) "
                    "VALUES ('customer', now()) ON CONFLICT DO NOTHING"
                )
        await conn.close()
        prepared.append((name, settings))
    await replica_admin.close()

    # The backlog: every row updated once, two mapped fields, 100 rows a transaction.
    codes = [code(i) for i in range(changes)]
    for i in range(0, changes, 100):
        await erp.execute(
            "UPDATE customer SET phone = 'W-' || customer_code, billing_city = 'Akron' "
            "WHERE customer_code = ANY($1::text[])",
            codes[i : i + 100],
        )
    expected = await erp.fetchrow(CHECKSUM.format(table="customer"))
    new_values = await erp.fetch(
        "SELECT customer_code, phone, billing_city FROM customer"
    )
    await erp.close()

    drains = []
    for i, (name, settings) in enumerate(prepared):
        seconds, applied, cpu = await drain(settings)
        conn = await asyncpg.connect(replica_pg.dsn(f"resolve_{i}"))
        got = await conn.fetchrow(CHECKSUM.format(table="erp.customer"))
        written = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM replicator.outbox WHERE status = 'pending'),"
            " (SELECT count(*) FROM replicator.conflicts)"
        )
        await conn.close()
        if tuple(got) != tuple(expected):
            raise SystemExit(f"{name}: mirror {tuple(got)} != ERP {tuple(expected)}")
        drains.append(Drain(name, applied, seconds, cpu, *written))
        print(f"resolution {name}: {applied / seconds:,.0f} changes/s", flush=True)

    # The floor: the same rows' new values written by key, one transaction.
    conn = await asyncpg.connect(replica_pg.dsn("resolve_0"))
    before = os.times()
    start = time.perf_counter()
    async with conn.transaction():
        await conn.executemany(
            "UPDATE erp.customer SET phone = $2, billing_city = $3 "
            "WHERE customer_code = $1",
            [tuple(r) for r in new_values],
        )
    seconds = time.perf_counter() - start
    now = os.times()
    await conn.close()
    floor = Drain(
        "asyncpg executemany UPDATE",
        changes,
        seconds,
        max(0.0, now.user + now.system - before.user - before.system),
    )
    return drains, floor


# -- the report ----------------------------------------------------------------------


def print_report(
    args: argparse.Namespace,
    phases: list[Phase],
    trips: tuple[Trips, dict[str, float], float] | None,
    resolved: tuple[list[Drain], Drain] | None,
    load: tuple[float, float],
    peers: list[tuple[str, float]],
) -> None:
    print()
    print(
        f"two-way sync write-back, {dt.date.today()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, load average {load[0]:.1f} at the "
        f"start, {load[1]:.1f} at the end"
    )
    if phases:
        print_phases(args, phases, peers)
    if trips:
        print_trips(args, *trips)
    if resolved:
        print_resolution(*resolved)


def print_phases(
    args: argparse.Namespace, phases: list[Phase], peers: list[tuple[str, float]]
) -> None:
    print()
    print(
        f"write-back throughput, {args.records:,} linked customers; the ERP burst "
        f"{args.tx_rows} row(s) a transaction, the org's edits 200 a collection"
    )
    print(
        f"{'phase':7} {'edits':>6} {'edit s':>7} {'resolved s':>10} {'done s':>7} "
        f"{'records/s':>9} {'to SF':>6} {'to ERP':>6} {'daemon cpu':>10} "
        f"{'emulator cpu':>12}"
    )
    for p in phases:
        print(
            f"{p.name:7} {p.edits:>6,} {p.edit_seconds:>7.2f} "
            f"{p.resolved_seconds:>10.2f} {p.seconds:>7.2f} {p.rate:>9,.0f} "
            f"{p.writes['salesforce']:>6,} {p.writes['erp']:>6,} "
            f"{p.cpu['daemon']:>9.1f}s {p.cpu['emulator']:>11.1f}s"
        )
    for name, seconds in peers:
        print(
            f"peer: {name}, daemon stopped: {args.records / seconds:,.0f} "
            f"records/s ({seconds:.2f} s)"
        )
    print(
        "edit s: making the edits; resolved s: first edit -> every outbox row "
        "committed; done s: -> the last one written and marked done (records/s "
        "is edits / done s), values then checked in the target; to SF, to ERP: "
        "outbox rows the phase caused, echoes included; cpu until done"
    )


def print_trips(
    args: argparse.Namespace, t: Trips, cpu: dict[str, float], wall: float
) -> None:
    print()
    print(
        f"round trip, {len(t.to_sf)} paced edits each way, {args.gap_ms} ms "
        f"apart, target polled every {args.poll_ms:g} ms "
        f"({wall:.0f} s, daemon cpu {cpu['daemon']:.1f} s, "
        f"emulator cpu {cpu['emulator']:.1f} s)"
    )
    print(f"{'direction':10} {'median ms':>10} {'p99 ms':>8} {'max ms':>8}")
    for name, values in (("ERP -> SF", t.to_sf), ("SF -> ERP", t.to_erp)):
        print(
            f"{name:10} {statistics.median(values):>10.0f} "
            f"{pct(values, 0.99):>8.0f} {max(values):>8.0f}"
        )


def print_resolution(drains: list[Drain], floor: Drain) -> None:
    plain = drains[0]
    print()
    print(
        f"resolution cost: the ERP pipeline drains a backlog of {plain.changes:,} "
        "ERP updates (each row once, 2 mapped fields, 100 rows a transaction)"
    )
    print(
        f"{'path':42} {'changes/s':>9} {'seconds':>8} {'cpu s':>6} "
        f"{'vs plain':>8} {'outbox':>7} {'conflicts':>9}"
    )
    for d in [*drains, floor]:
        print(
            f"{d.name:42} {d.rate:>9,.0f} {d.seconds:>8.2f} {d.cpu:>6.1f} "
            f"{d.rate / plain.rate:>8.2f} {d.outbox:>7,} {d.conflicts:>9,}"
        )
    print(
        f"cost of resolution: {plain.rate / drains[1].rate:.1f}x the time of the "
        f"plain upsert (mapped / plain {drains[1].rate / plain.rate:.3f}); "
        "mirrors checksummed equal to the ERP; cpu: this process"
    )


# -- main ------------------------------------------------------------------------------


def _start_emulator(config: EmulatorConfig) -> multiprocessing.Process:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=_serve, args=(config, ready), daemon=True)
    process.start()
    if not ready.wait(60):
        process.kill()
        raise SystemExit("emulator did not start")
    return process  # type: ignore[return-value]


@contextlib.asynccontextmanager
async def two_way_system(
    args: argparse.Namespace, erp_pg: TempPostgres, replica_pg: TempPostgres
) -> AsyncIterator[TwoWay]:
    workdir = Path(tempfile.mkdtemp(prefix="replicator-bench-sync-"))
    fields = workdir / "objects" / "Account" / "fields"
    fields.mkdir(parents=True)
    (fields / "ERP_Customer_Code__c.field-meta.xml").write_text(EXTERNAL_ID_XML)
    config = EmulatorConfig(
        port=free_port(),
        metadata_dirs=(workdir / "objects",),
        daily_api_limit=100_000_000,
    )
    os.environ[SECRET_ENV] = config.client_secret
    os.environ[PASSWORD_ENV] = config.password + config.security_token
    emulator = _start_emulator(config)
    url = f"http://127.0.0.1:{config.port}"
    erp = await asyncpg.connect(erp_pg.dsn())
    await erp.execute(CUSTOMER_DDL)
    replica = await asyncpg.connect(replica_pg.dsn())
    if args.statements:
        await replica.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    ops_port = free_port()
    daemon = Daemon(
        daemon_toml(erp_pg.dsn(), replica_pg.dsn(), url, ops_port), workdir, ops_port
    )
    ok = False
    try:
        async with aiohttp.ClientSession() as http:
            await daemon.initialise(replica)
            await daemon.start(http)
            org = Org(url, http)
            await org.login(config)
            assert emulator.pid is not None
            yield TwoWay(erp, replica, org, daemon, emulator.pid, args)
            ok = True
    finally:
        daemon.stop()
        emulator.kill()
        emulator.join()
        await erp.close()
        await replica.close()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"daemon log kept: {workdir / 'daemon.log'}", file=sys.stderr)


async def run(args: argparse.Namespace) -> None:
    phases_wanted = set(args.phases.split(","))
    phases: list[Phase] = []
    trips = resolved = None
    peers: list[tuple[str, float]] = []
    load = os.getloadavg()[0]
    replica_settings = (
        {"shared_preload_libraries": "pg_stat_statements"} if args.statements else {}
    )
    with TempPostgres() as erp_pg, TempPostgres(replica_settings) as replica_pg:
        if phases_wanted - {"resolution"}:
            async with two_way_system(args, erp_pg, replica_pg) as sync:
                phase = await sync.link()  # every other phase needs the links
                phases.append(phase)
                print(f"link: {phase.rate:,.0f} records/s", flush=True)
                for name, step in (("to_sf", sync.to_sf), ("to_erp", sync.to_erp)):
                    if name in phases_wanted:
                        phase = await step()
                        phases.append(phase)
                        print(f"{name}: {phase.rate:,.0f} records/s", flush=True)
                if "round_trip" in phases_wanted:
                    trips = await sync.round_trips()
                    to_sf, to_erp = trips[0].to_sf, trips[0].to_erp
                    print(
                        f"round trips: median ERP->SF {statistics.median(to_sf):.0f} "
                        f"ms, SF->ERP {statistics.median(to_erp):.0f} ms",
                        flush=True,
                    )
                peers = await sync.peers()
        if "resolution" in phases_wanted:
            resolved = await resolution(
                erp_pg, replica_pg, args.resolve_changes, args.history
            )
    load_end = os.getloadavg()[0]
    print_report(args, phases, trips, resolved, (load, load_end), peers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000, help="linked customers")
    parser.add_argument("--round-trips", type=int, default=200, help="each way")
    parser.add_argument("--gap-ms", type=int, default=100, help="pause after a trip")
    parser.add_argument("--poll-ms", type=float, default=5, help="target polling")
    parser.add_argument("--tx-rows", type=int, default=1, help="ERP burst rows a tx")
    parser.add_argument("--resolve-changes", type=int, default=3000)
    parser.add_argument(
        "--history", type=int, default=3000, help="done ERP write-backs (0: skip)"
    )
    parser.add_argument("--phases", default="link,to_sf,to_erp,round_trip,resolution")
    parser.add_argument(
        "--statements",
        action="store_true",
        help="print the daemon's replica statements per phase (pg_stat_statements)",
    )
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(args))
    else:
        uvloop.run(run(args))  # as the daemon runs
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
