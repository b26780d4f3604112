"""Write-back: the outbox worker and its sinks against the emulator and real PostgreSQL.

Salesforce side: the emulator served on loopback, its request log and change
events. ERP side: a throwaway ERP database with a pgoutput slot whose changes
show the replication origin of each of the sink's transactions.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from replicator.emulator.app import EmulatorConfig
from replicator.emulator.cdc import ALL_CHANGES_CHANNEL
from replicator.emulator.streaming import STREAMING_KEY
from replicator.emulator.values import ApiError
from replicator.sinks.erp import ErpSink, ErpWrite
from replicator.sinks.salesforce import SalesforceSink, SfWrite, to_json_value
from replicator.sinks.worker import OUTBOX_CHANNEL, OutboxRow, OutboxWorker
from replicator.sources.erp.pgoutput import Begin, Decoder, Origin
from replicator.sources.salesforce.auth import Authenticator, Credentials
from replicator.sources.salesforce.rest import RestClient
from replicator.store.tables import create_schema
from tests.fixtures.emulator import Served, ServeEmulator
from tests.fixtures.pg import ErpCase

pytestmark = pytest.mark.integration

CLIENT = "replicator"
EXT = "ERP_Customer_Code__c"
UPSERT_PATH = "/composite/sobjects/Account/ERP_Customer_Code__c"

_DATE_FIELDS = {
    "Promised_Date__c": "<fullName>Promised_Date__c</fullName><label>Promised Date"
    "</label><type>Date</type>",
    "Shipped_At__c": "<fullName>Shipped_At__c</fullName><label>Shipped At</label>"
    "<type>DateTime</type>",
}
_FIELD_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<CustomField xmlns="http://soap.sforce.com/2006/04/metadata">\n{body}\n'
    "</CustomField>\n"
)


# -- Salesforce fixtures -----------------------------------------------------------


@dataclass
class Org:
    """The served emulator, a REST client into it and a replica with an outbox."""

    served: Served
    rest: RestClient
    http: aiohttp.ClientSession
    replica: asyncpg.Connection
    replica_dsn: str
    links: dict[int, str]

    def account_id(self, code: str) -> str:
        (record_id,) = self.served.state.match_external_id("Account", EXT, code)
        return str(record_id)

    def account(self, code: str) -> dict[str, Any]:
        record = self.served.state.get(self.account_id(code))
        assert record is not None
        return dict(record)

    def create_accounts(self, codes: list[str]) -> list[str]:
        state = self.served.state
        user = state.find_user(self.served.config.username)
        assert user is not None
        with state.transaction(user_id=str(user["Id"])) as tx:
            return [tx.create("Account", {"Name": c, EXT: c}) for c in codes]

    def worker(self, sink: SalesforceSink | None = None, **kw: Any) -> OutboxWorker:
        async def on_done(conn: Any, row: OutboxRow, result: Any) -> None:
            if result.record_id:
                self.links[row.id] = result.record_id

        return OutboxWorker(
            self.replica,
            salesforce=sink or SalesforceSink(self.rest),
            erp=None,
            resolve_sf=resolve_sf,
            resolve_erp=_no_erp,
            on_done=on_done,
            **kw,
        )

    def calls(self, method: str = "PATCH", path: str = "/composite/sobjects") -> Any:
        return self.served.faults.matching(method, path)


def resolve_sf(row: OutboxRow) -> SfWrite:
    """Test mapping: a key starting with 001 is a Salesforce Id, else an ERP code."""
    if row.target_key.startswith("001"):
        return SfWrite(
            row.id, row.entity, row.target_key, EXT, row.operation, row.fields
        )
    fields = {**row.fields, EXT: row.target_key}
    return SfWrite(row.id, row.entity, None, EXT, row.operation, fields)


def _no_erp(row: OutboxRow) -> ErpWrite:
    raise AssertionError("no ERP in this test")


@pytest.fixture
def sink_org_config(account_metadata_dir: Any) -> EmulatorConfig:
    """F0's Account fields plus a Date and a DateTime field (BUG-34)."""
    fields = account_metadata_dir / "Account" / "fields"
    for name, body in _DATE_FIELDS.items():
        (fields / f"{name}.field-meta.xml").write_text(_FIELD_XML.format(body=body))
    return EmulatorConfig.ebikes(
        metadata_dirs=(*EmulatorConfig.ebikes().metadata_dirs, account_metadata_dir),
        long_poll_timeout_seconds=2.0,
    )


async def _replica(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await create_schema(conn)
    return conn


@pytest.fixture
async def org(
    serve_emulator: ServeEmulator, sink_org_config: EmulatorConfig, erp_case: ErpCase
) -> AsyncIterator[Org]:
    async with serve_emulator(sink_org_config) as served:
        config = served.config
        auth = Authenticator(
            Credentials(
                login_url=served.url,
                client_id=config.client_id,
                client_secret=config.client_secret,
                username=config.username,
                password=config.password + config.security_token,
            )
        )
        replica = await _replica(erp_case.replica_dsn)
        async with aiohttp.ClientSession(middlewares=(_lose_answers,)) as http:
            await auth.login()
            rest = RestClient(auth, http, client_name=CLIENT, attempts=1)
            try:
                yield Org(served, rest, http, replica, erp_case.replica_dsn, {})
            finally:
                await replica.close()


# Paths whose next answer is dropped after the emulator has committed the call:
# the connection closes without a reply (BUG-33).
_LOSE_NEXT: list[str] = []


async def _lose_answers(
    request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
) -> aiohttp.ClientResponse:
    response = await handler(request)
    path = request.url.path
    for fragment in list(_LOSE_NEXT):
        if fragment in path and request.method == "PATCH":
            _LOSE_NEXT.remove(fragment)
            response.close()
            raise aiohttp.ServerDisconnectedError()
    return response


@pytest.fixture(autouse=True)
def _reset_lost_answers() -> Iterator[None]:
    _LOSE_NEXT.clear()
    yield
    _LOSE_NEXT.clear()


async def enqueue(
    conn: asyncpg.Connection,
    target: str,
    rows: list[tuple[str, str, str, dict[str, Any]]],
) -> list[int]:
    """Insert outbox rows (entity, key, operation, fields) and return their ids."""
    ids = []
    async with conn.transaction():
        for entity, key, operation, fields in rows:
            ids.append(
                await conn.fetchval(
                    "INSERT INTO replicator.outbox (entity, target, target_key, "
                    "operation, fields) VALUES ($1, $2, $3, $4, $5::text::jsonb) "
                    "RETURNING id",
                    entity,
                    target,
                    key,
                    operation,
                    orjson.dumps(fields).decode(),
                )
            )
        await conn.execute(f"NOTIFY {OUTBOX_CHANNEL}")
    return ids


async def drain(worker: OutboxWorker) -> int:
    total = 0
    while written := await worker.drain_once():
        total += written
    return total


async def outbox(conn: asyncpg.Connection) -> dict[int, asyncpg.Record]:
    rows = await conn.fetch("SELECT * FROM replicator.outbox ORDER BY id")
    return {r["id"]: r for r in rows}


async def wait_until_settled(dsn: str, seconds: float = 20) -> None:
    """Return once no outbox row is pending (read on a connection of its own)."""
    conn = await asyncpg.connect(dsn)
    try:
        await _settled(conn, seconds)
    finally:
        await conn.close()


async def _settled(conn: asyncpg.Connection, seconds: float) -> None:
    async with asyncio.timeout(seconds):
        while True:
            pending = await conn.fetchval(
                "SELECT count(*) FROM replicator.outbox WHERE status = 'pending'"
            )
            if not pending:
                return
            await asyncio.sleep(0.05)


def last_replay_id(served: Served) -> int:
    return int(served.app[STREAMING_KEY].log.last_id)


def change_events(served: Served, after: int) -> list[dict[str, Any]]:
    log = served.app[STREAMING_KEY].log
    stored, _ = log.read_after(after, ALL_CHANGES_CHANNEL, 100_000)
    return [orjson.loads(e.payload) for e in stored]


# -- Salesforce ----------------------------------------------------------------------


async def test_batch_over_200_updates_by_id_and_upserts_by_external_id(
    org: Org,
) -> None:
    """440 rows: 210 updates by Id, 230 upserts (200 new); calls carry ≤ 200 records."""
    existing = [f"C-{n:04d}" for n in range(240)]
    ids = org.create_accounts(existing)
    updates = [
        ("Account", i, "upsert", {"Phone": f"555-{n}"}) for n, i in enumerate(ids[:210])
    ]
    upserts = [
        ("Account", c, "upsert", {"Name": f"{c} upserted"}) for c in existing[210:]
    ]
    upserts += [
        ("Account", f"N-{n:04d}", "upsert", {"Name": f"new {n}"}) for n in range(200)
    ]
    outbox_ids = await enqueue(org.replica, "salesforce", updates + upserts)
    org.served.faults.requests.clear()
    replay_id = last_replay_id(org.served)
    worker = org.worker(batch=500)

    written = await drain(worker)

    assert written == 440
    rows = await outbox(org.replica)
    assert {r["status"] for r in rows.values()} == {"done"}
    by_id = org.calls("PATCH", "/composite/sobjects")
    update_calls = [c for c in by_id if c.path.endswith("/composite/sobjects")]
    upsert_calls = [c for c in by_id if c.path.endswith(UPSERT_PATH)]
    assert [len(c.body["records"]) for c in update_calls] == [200, 10]
    assert [len(c.body["records"]) for c in upsert_calls] == [200, 30]
    assert all(
        c.headers["Sforce-Call-Options"] == f"client={CLIENT}"
        for c in org.served.faults.requests
    )
    assert org.account("C-0005")["Phone"] == "555-5"
    assert org.account("C-0230")["Name"] == "C-0230 upserted"
    new_id = org.account_id("N-0007")
    assert org.links[outbox_ids[210 + 30 + 7]] == new_id
    assert rows[outbox_ids[210 + 30 + 7]]["answer"] is not None
    headers = [e["ChangeEventHeader"] for e in change_events(org.served, replay_id)]
    ours = [
        h
        for h in headers
        if h["changeType"] in ("UPDATE", "CREATE")
        and set(h["recordIds"]) & {new_id, ids[5]}
    ]
    assert len(ours) >= 2
    assert all(h["changeOrigin"].endswith(f";client={CLIENT}") for h in ours)


async def test_collection_with_one_failed_record_dead_letters_only_that_row(
    org: Org, caplog: pytest.LogCaptureFixture
) -> None:
    """BUG-30: HTTP 200 with C-1002 refused by a validation rule; others are done."""
    org.create_accounts(["C-1001", "C-1002", "C-1003"])

    def phone_rule(change_type: str, before: Any, after: Any) -> None:
        phone = after.get("Phone")
        if phone and not any(ch.isdigit() for ch in phone):
            raise ApiError(
                400,
                "FIELD_CUSTOM_VALIDATION_EXCEPTION",
                "Phone must contain digits",
                fields=("Phone",),
            )

    org.served.state.add_automation("Account", phone_rule)
    ids = await enqueue(
        org.replica,
        "salesforce",
        [
            ("Account", "C-1001", "upsert", {"Phone": "555-1001"}),
            ("Account", "C-1002", "upsert", {"Phone": "not-a-number"}),
            ("Account", "C-1003", "upsert", {"Phone": "555-1003"}),
        ],
    )
    caplog.set_level(logging.WARNING, logger="replicator")

    await drain(org.worker())

    rows = await outbox(org.replica)
    assert [rows[i]["status"] for i in ids] == ["done", "failed", "done"]
    assert "FIELD_CUSTOM_VALIDATION_EXCEPTION" in rows[ids[1]]["last_error"]
    assert rows[ids[1]]["attempts"] == 1
    (letter,) = await org.replica.fetch("SELECT * FROM replicator.dead_letters")
    assert (letter["stream"], letter["entity"], letter["source_key"]) == (
        "outbox:salesforce",
        "Account",
        "C-1002",
    )
    payload = orjson.loads(letter["payload"])
    assert payload["record"] == {"Phone": "not-a-number"}
    assert (
        payload["error"]["errors"][0]["statusCode"]
        == "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    )
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert errors[0].key == "C-1002"  # type: ignore[attr-defined]
    assert "FIELD_CUSTOM_VALIDATION_EXCEPTION" in errors[0].error  # type: ignore[attr-defined]
    assert org.account("C-1001")["Phone"] == "555-1001"
    assert org.account("C-1002")["Phone"] is None
    assert org.account("C-1003")["Phone"] == "555-1003"
    assert len(org.calls()) == 1


async def test_request_limit_exceeded_backs_off_without_reauthenticating(
    org: Org, caplog: pytest.LogCaptureFixture
) -> None:
    """BUG-31: 403 REQUEST_LIMIT_EXCEEDED three times: no token request, growing
    waits between attempts, then both records written with the latest values."""
    org.create_accounts(["C-1001", "C-1002"])
    org.served.faults.requests.clear()
    org.served.faults.fail_next(3, "REQUEST_LIMIT_EXCEEDED")
    ids = await enqueue(
        org.replica,
        "salesforce",
        [
            ("Account", "C-1001", "upsert", {"Phone": "555-2001"}),
            ("Account", "C-1001", "upsert", {"Phone": "555-2002"}),
            ("Account", "C-1002", "upsert", {"Name": "Birch Supply Co"}),
        ],
    )
    caplog.set_level(logging.WARNING, logger="replicator")
    worker = org.worker(retry_initial=0.1, retry_cap=0.4)
    stop = asyncio.Event()

    async with asyncio.TaskGroup() as tg:
        tg.create_task(worker.run(stop))
        await wait_until_settled(org.replica_dsn)
        stop.set()

    rows = await outbox(org.replica)
    assert {rows[i]["status"] for i in ids} == {"done"}
    assert {rows[i]["attempts"] for i in ids} == {4}, [
        (r.method, r.path, r.time) for r in org.served.faults.requests
    ]
    assert org.served.faults.matching("POST", "/oauth2/token") == []
    patches = org.calls()
    assert len(patches) == 4
    gaps = [(b.time - a.time).total_seconds() for a, b in itertools.pairwise(patches)]
    assert all(gap >= 0.08 for gap in gaps), gaps
    assert gaps[2] > gaps[0], gaps
    assert org.account("C-1001")["Phone"] == "555-2002"
    assert org.account("C-1002")["Name"] == "Birch Supply Co"
    assert any(
        "REQUEST_LIMIT_EXCEEDED" in str(getattr(r, "error", ""))
        for r in caplog.records
        if r.levelno == logging.WARNING
    )


async def test_lost_answer_on_create_is_retried_as_upsert_without_duplicate(
    org: Org, caplog: pytest.LogCaptureFixture
) -> None:
    """BUG-33: the first upsert of C-8001 commits but its answer is lost; the
    retry answers created:false with the same Id; an update answers 200 too."""
    org.create_accounts(["C-1001"])
    _LOSE_NEXT.append(UPSERT_PATH)
    ids = await enqueue(
        org.replica,
        "salesforce",
        [
            ("Account", "C-8001", "upsert", {"Name": "Granite Labs"}),
            ("Account", "C-1001", "upsert", {"Phone": "555-3001"}),
        ],
    )
    caplog.set_level(logging.WARNING, logger="replicator")
    worker = org.worker(retry_initial=0.05, retry_cap=0.1)

    await drain(worker)
    await asyncio.sleep(0.3)
    await drain(worker)

    rows = await outbox(org.replica)
    assert [rows[i]["status"] for i in ids] == ["done", "done"]
    assert [rows[i]["attempts"] for i in ids] == [2, 2]
    assert org.served.state.match_external_id("Account", EXT, "C-8001") == [
        org.account_id("C-8001")
    ]
    assert org.links[ids[0]] == org.account_id("C-8001")
    answer = orjson.loads(rows[ids[0]]["answer"])
    assert (answer["success"], answer["created"]) == (True, False)
    assert org.served.faults.matching("POST", "/sobjects/Account") == []
    assert len(org.calls("PATCH", UPSERT_PATH)) == 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_crash_between_write_and_mark_repeats_the_write_once(org: Org) -> None:
    """A worker cancelled after the sink call and before the mark leaves its rows
    pending; the next worker repeats the upsert: one record, same values, done."""
    written = asyncio.Event()

    class StallAfterWrite(SalesforceSink):
        async def write(self, writes: Any) -> Any:
            results = await super().write(writes)
            written.set()
            await asyncio.Event().wait()
            return results

    ids = await enqueue(
        org.replica,
        "salesforce",
        [
            ("Account", "C-9001", "upsert", {"Name": "Crash Co", "Phone": "555-9001"}),
        ],
    )
    first = org.worker(StallAfterWrite(org.rest))
    task = asyncio.create_task(first.run(asyncio.Event()))
    await asyncio.wait_for(written.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    status = await org.replica.fetchval(
        "SELECT status FROM replicator.outbox WHERE id = $1", ids[0]
    )
    created_id = org.account_id("C-9001")

    await drain(org.worker())

    rows = await outbox(org.replica)
    assert status == "pending"
    assert rows[ids[0]]["status"] == "done"
    assert org.served.state.match_external_id("Account", EXT, "C-9001") == [created_id]
    assert org.account("C-9001")["Phone"] == "555-9001"
    assert orjson.loads(rows[ids[0]]["answer"])["created"] is False
    assert org.links[ids[0]] == created_id


@pytest.fixture
def kolkata() -> Iterator[None]:
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Kolkata"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


async def test_dates_and_datetimes_arrive_unshifted_in_any_host_zone(
    org: Org, kolkata: None
) -> None:
    """BUG-34: under TZ=Asia/Kolkata a date goes out as a date and a datetime as
    the same instant in UTC; a naive datetime is refused, never guessed."""
    org.create_accounts(["C-1001"])

    def resolve(row: OutboxRow) -> SfWrite:
        write = resolve_sf(row)
        fields = dict(write.fields)
        fields["Promised_Date__c"] = dt.date.fromisoformat(fields["Promised_Date__c"])
        fields["Shipped_At__c"] = dt.datetime.fromisoformat(fields["Shipped_At__c"])
        return SfWrite(
            write.outbox_id,
            write.object_name,
            write.record_id,
            write.external_id_field,
            write.operation,
            fields,
        )

    ids = await enqueue(
        org.replica,
        "salesforce",
        [
            (
                "Account",
                "C-1001",
                "upsert",
                {
                    "Promised_Date__c": "2024-03-31",
                    "Shipped_At__c": "2024-03-10T01:30:00-06:00",
                },
            ),
            (
                "Account",
                "C-1002",
                "upsert",
                {
                    "Promised_Date__c": "2024-03-31",
                    "Shipped_At__c": "2024-03-10T01:30:00",
                },
            ),
        ],
    )
    worker = org.worker()
    worker.targets[0].resolve = resolve

    await drain(worker)

    (call,) = org.calls("PATCH", UPSERT_PATH)
    (record,) = call.body["records"]
    assert record["Promised_Date__c"] == "2024-03-31"
    assert record["Shipped_At__c"] == "2024-03-10T07:30:00.000Z"
    account = org.account("C-1001")
    assert account["Promised_Date__c"] == "2024-03-31"
    assert account["Shipped_At__c"].startswith("2024-03-10T07:30:00.000")
    rows = await outbox(org.replica)
    assert [rows[i]["status"] for i in ids] == ["done", "failed"]
    assert "naive datetime" in rows[ids[1]]["last_error"]
    assert to_json_value(dt.date(2024, 3, 31)) == "2024-03-31"
    with pytest.raises(ValueError, match="naive"):
        to_json_value(dt.datetime(2024, 3, 10, 1, 30))


# -- ERP -------------------------------------------------------------------------------

ERP_SCHEMA = """
CREATE TABLE customers (
    id int PRIMARY KEY, name text NOT NULL, credit numeric(12,2) CHECK (credit >= 0),
    sf_id text UNIQUE);
CREATE TABLE orders (
    id int PRIMARY KEY, customer_id int NOT NULL REFERENCES customers,
    shipped date);
CREATE TABLE order_lines (
    order_id int REFERENCES orders, line int, qty int NOT NULL CHECK (qty > 0),
    PRIMARY KEY (order_id, line));
INSERT INTO customers VALUES (1, 'Acme', 10, NULL), (2, 'Birch', 20, NULL),
                             (3, 'Cedar', 30, NULL);
"""
ERP_KEYS = {"customers": ["id"], "orders": ["id"], "order_lines": ["order_id", "line"]}


def resolve_erp(row: OutboxRow) -> ErpWrite:
    """Test mapping: ``new:<sf id>`` keys are new customers linked by sf_id."""
    table = f"public.{row.entity}"
    if row.target_key.startswith("new:"):
        return ErpWrite(
            row.id,
            table,
            {},
            row.operation,
            row.fields,
            new_key="id",
            match={"sf_id": row.target_key[4:]},
        )
    key = dict(zip(ERP_KEYS[row.entity], row.target_key.split("|"), strict=True))
    return ErpWrite(row.id, table, key, row.operation, row.fields)


@dataclass
class Erp:
    conn: asyncpg.Connection
    replica: asyncpg.Connection
    replica_dsn: str
    slot: str
    publication: str
    links: dict[int, str]

    def worker(self) -> OutboxWorker:
        async def on_done(conn: Any, row: OutboxRow, result: Any) -> None:
            self.links[row.id] = result.record_id

        return OutboxWorker(
            self.replica,
            salesforce=None,
            erp=ErpSink(self.conn, "replicator"),
            resolve_sf=_no_sf,
            resolve_erp=resolve_erp,
            on_done=on_done,
        )

    async def transactions(self) -> list[list[str]]:
        """Each decoded transaction of the slot as its origin names (peeked)."""
        rows = await self.conn.fetch(
            "SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL, "
            "'proto_version', '1', 'publication_names', $2)",
            self.slot,
            self.publication,
        )
        decoder = Decoder()
        out: list[list[str]] = []
        for row in rows:
            message = decoder.decode(bytes(row["data"]))
            if isinstance(message, Begin):
                out.append([])
            elif isinstance(message, Origin):
                out[-1].append(message.name)
        return out


def _no_sf(row: OutboxRow) -> SfWrite:
    raise AssertionError("no Salesforce in this test")


@pytest.fixture
async def erp(erp_case: ErpCase) -> AsyncIterator[Erp]:
    conn = await asyncpg.connect(erp_case.erp_dsn)
    replica = await _replica(erp_case.replica_dsn)
    await conn.execute(ERP_SCHEMA)
    await conn.execute(f"CREATE PUBLICATION {erp_case.publication} FOR ALL TABLES")
    await conn.execute(
        "SELECT pg_create_logical_replication_slot($1, 'pgoutput')", erp_case.slot
    )
    sink_conn = await asyncpg.connect(erp_case.erp_dsn)
    await ErpSink(sink_conn, "replicator").setup()
    try:
        yield Erp(
            sink_conn,
            replica,
            erp_case.replica_dsn,
            erp_case.slot,
            erp_case.publication,
            {},
        )
    finally:
        await sink_conn.close()
        await conn.execute("SELECT pg_drop_replication_slot($1)", erp_case.slot)
        await conn.close()
        await replica.close()


async def test_erp_writes_in_fk_order_under_the_origin_with_one_refused(
    erp: Erp,
) -> None:
    """Lines enqueued before their order land after it; every applied write is a
    transaction carrying the origin; a CHECK violation fails alone."""
    ids = await enqueue(
        erp.replica,
        "erp",
        [
            ("order_lines", "10|1", "upsert", {"qty": "2"}),
            ("order_lines", "10|2", "upsert", {"qty": 5}),
            ("order_lines", "10|3", "upsert", {"qty": 0}),
            ("orders", "10", "upsert", {"customer_id": 2, "shipped": "2024-03-31"}),
            (
                "customers",
                "1",
                "upsert",
                {"name": "Acme Tools Intl", "credit": "12.50"},
            ),
            ("customers", "3", "delete", {}),
            ("customers", "new:001Dn00000Gr7nLIAR", "upsert", {"name": "Granite Labs"}),
        ],
    )

    await drain(erp.worker())

    rows = await outbox(erp.replica)
    assert [rows[i]["status"] for i in ids] == ["done"] * 2 + ["failed"] + ["done"] * 4
    assert "CheckViolation" in rows[ids[2]]["last_error"]
    (letter,) = await erp.replica.fetch("SELECT * FROM replicator.dead_letters")
    assert (letter["stream"], letter["source_key"]) == ("outbox:erp", "10|3")
    lines = await erp.conn.fetch(
        "SELECT order_id, line, qty FROM order_lines ORDER BY 2"
    )
    assert [tuple(r) for r in lines] == [(10, 1, 2), (10, 2, 5)]
    assert await erp.conn.fetchval("SELECT shipped FROM orders") == dt.date(2024, 3, 31)
    customers = await erp.conn.fetch(
        "SELECT id, name, credit, sf_id FROM customers ORDER BY id"
    )
    assert [tuple(r) for r in customers] == [
        (1, "Acme Tools Intl", 12.5, None),
        (2, "Birch", 20, None),
        (4, "Granite Labs", None, "001Dn00000Gr7nLIAR"),
    ]
    assert erp.links[ids[6]] == "4"
    assert await erp.transactions() == [["replicator"]] * 6


async def test_erp_new_row_repeated_after_a_crash_finds_its_generated_key(
    erp: Erp,
) -> None:
    """A "max+1" insert written again (its mark lost) matches the row it created by
    its link column and updates it: no second row, the same key."""
    write = [("customers", "new:001Dn00000Gr7nLIAR", "upsert", {"name": "Granite"})]
    first = await enqueue(erp.replica, "erp", write)
    await drain(erp.worker())
    await erp.replica.execute("UPDATE replicator.outbox SET status = 'pending'")

    await drain(erp.worker())

    rows = await outbox(erp.replica)
    assert rows[first[0]]["status"] == "done"
    assert orjson.loads(rows[first[0]]["answer"]) == {"key": "4", "created": False}
    assert (
        await erp.conn.fetchval(
            "SELECT count(*) FROM customers WHERE sf_id = '001Dn00000Gr7nLIAR'"
        )
        == 1
    )
    assert erp.links[first[0]] == "4"


async def test_rows_of_one_record_keep_their_order_across_rounds(erp: Erp) -> None:
    """A record's later row is not written while an earlier one waits (held by
    another worker's claim), and is written after it."""
    ids = await enqueue(
        erp.replica,
        "erp",
        [
            ("customers", "2", "upsert", {"name": "first"}),
            ("customers", "1", "upsert", {"name": "other"}),
            ("customers", "2", "upsert", {"name": "second"}),
        ],
    )
    other = await asyncpg.connect(erp.replica_dsn)
    try:
        tx = other.transaction()
        await tx.start()
        await other.execute(
            "SELECT 1 FROM replicator.outbox WHERE id = $1 FOR UPDATE", ids[0]
        )
        await erp.worker().drain_once()
        held = await outbox(erp.replica)
        await tx.rollback()
    finally:
        await other.close()

    await drain(erp.worker())

    assert [held[i]["status"] for i in ids] == ["pending", "done", "pending"]
    rows = await outbox(erp.replica)
    assert {rows[i]["status"] for i in ids} == {"done"}
    assert (
        await erp.conn.fetchval("SELECT name FROM customers WHERE id = 2") == "second"
    )


async def test_worker_run_wakes_on_notify_not_on_a_timer(erp: Erp) -> None:
    """With a one-hour idle timeout, a NOTIFY committed with new rows starts a round."""
    worker = OutboxWorker(
        erp.replica,
        salesforce=None,
        erp=ErpSink(erp.conn, "replicator"),
        resolve_sf=_no_sf,
        resolve_erp=resolve_erp,
        idle_timeout=3600,
    )
    stop = asyncio.Event()
    writer = await asyncpg.connect(erp.replica_dsn)
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(worker.run(stop))
            await asyncio.sleep(0.2)
            ids = await enqueue(
                writer, "erp", [("customers", "1", "upsert", {"name": "woken"})]
            )
            await wait_until_settled(erp.replica_dsn, 5)
            stop.set()
    finally:
        await writer.close()

    rows = await outbox(erp.replica)
    assert rows[ids[0]]["status"] == "done"
    assert await erp.conn.fetchval("SELECT name FROM customers WHERE id = 1") == "woken"
