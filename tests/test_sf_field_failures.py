"""Salesforce-side field failures (shared/cases/field-failures.md BUG-18 .. BUG-34).

Each test plays one case against the emulator over loopback HTTP and a real
replica, with F0's Account fields and B0's three customers created in the
org over REST (the org assigns the ids; C-1001 etc. are their customer
codes). Expected values come from the case text, from the org over REST or
from PostgreSQL. Write-back parts of BUG-30, 31, 33 and 34 belong to the
two-way sync and are not here; the source's side of them is.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from replicator.config import Settings, parse
from replicator.emulator import cdc
from replicator.emulator.app import EmulatorConfig
from replicator.emulator.keys import SCHEMA_KEY
from replicator.emulator.schema import FieldSchema
from replicator.emulator.streaming import STREAMING_KEY
from replicator.sources.salesforce.source import SalesforcePipeline
from tests.fixtures.emulator import Served, ServeEmulator
from tests.fixtures.pg import ErpCase
from tests.test_sf_source import Org, eventually_mirrored, org_client, running

pytestmark = pytest.mark.integration

ACCOUNTS = "/data/AccountChangeEvent"
NOTES = "Preferred carrier: Northwind. " * 400  # 12,000 characters

# B0 (field-failures.md, "Baseline state B0"), as the org holds it.
B0 = {
    "C-1001": {
        "Name": "Acme Tools",
        "Phone": "555-0100",
        "Industry": "Machinery",
        "Rating": "Warm",
        "Credit_Limit__c": 2500.00,
        "BillingStreet": "12 Harbor Rd",
        "BillingCity": "Portsmouth",
        "BillingState": "NH",
        "BillingPostalCode": "03801",
        "BillingCountry": "US",
        "Description": NOTES,
        "Attributes__c": '{"tier": "silver"}',
    },
    "C-1002": {
        "Name": "Birch Supply",
        "Phone": "555-0200",
        "Industry": "Lumber",
        "Rating": "Cold",
        "Credit_Limit__c": 750.00,
        "BillingStreet": "4 Mill St",
        "BillingCity": "Keene",
        "BillingState": "NH",
        "BillingPostalCode": "03431",
        "BillingCountry": "US",
        "Description": "short text",
    },
    "C-1003": {
        "Name": "Cobalt Works",
        "Phone": "555-0300",
        "Industry": "Metals",
        "Rating": "Warm",
        "Credit_Limit__c": 1200.00,
        "BillingStreet": "9 Forge Ln",
        "BillingCity": "Nashua",
        "BillingState": "NH",
        "BillingPostalCode": "03060",
        "BillingCountry": "US",
        "Description": "short text",
    },
}


@pytest.fixture(autouse=True)
def _sf_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    config = EmulatorConfig()
    monkeypatch.setenv("REPLICATOR_TEST_SF_SECRET", config.client_secret)
    monkeypatch.setenv(
        "REPLICATOR_TEST_SF_PASSWORD", config.password + config.security_token
    )


def settings_for(
    case: ErpCase, served: Served, objects: list[str] | None = None, **extra: Any
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
                "objects": objects or ["Account"],
                "long_poll_timeout_seconds": 2,
                "skew_seconds": 5,
                **extra,
            },
        }
    )


async def seed_b0(org: Org) -> dict[str, str]:
    """Create B0's three accounts; return customer code -> Account id."""
    return {
        code: await org.create("Account", ERP_Customer_Code__c=code, **fields)
        for code, fields in B0.items()
    }


async def until(condition: Any, seconds: float = 15) -> None:
    """Await ``condition()`` (sync or async) until it is true."""
    async with asyncio.timeout(seconds):
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.1)


async def fetchval(case: ErpCase, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(case.replica_dsn)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def fetchrow(case: ErpCase, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(case.replica_dsn)
    try:
        return await conn.fetchrow(query, *args)
    finally:
        await conn.close()


async def stored_replay_id(case: ErpCase, channel: str = ACCOUNTS) -> int | None:
    value = await fetchval(
        case,
        "SELECT position FROM replicator.checkpoints WHERE stream = $1",
        f"sf:{channel}",
    )
    return None if value is None else int(value)


@contextlib.asynccontextmanager
async def subscribes(
    served: Served, channel: str = ACCOUNTS
) -> AsyncIterator[list[Any]]:
    """Record the ``ext.replay`` id of every subscribe to ``channel``, refused or not."""
    server = served.app[STREAMING_KEY].server
    original = server._subscribe
    seen: list[Any] = []

    def subscribe(message: dict[str, Any], session: Any, ctx: Any) -> dict[str, Any]:
        if message.get("subscription") == channel:
            replay = (message.get("ext") or {}).get("replay") or {}
            seen.append(replay.get(channel))
        return original(message, session, ctx)

    server._subscribe = subscribe  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        server._subscribe = original  # type: ignore[method-assign]


def as_user(served: Served) -> Any:
    user = served.state.find_user(served.config.username)
    assert user is not None
    return served.state.transaction(user_id=str(user["Id"]))


@pytest.fixture
def f0_logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="replicator")
    return caplog


# -- BUG-18 -----------------------------------------------------------------------


async def test_bug18_stale_replay_id_reconciles_the_gap_and_resubscribes_with_all_events(
    erp_case: ErpCase,
    serve_emulator: ServeEmulator,
    f0_config: EmulatorConfig,
    f0_logged: pytest.LogCaptureFixture,
) -> None:
    """A stored id past retention: one ERROR naming channel and id, -2 (never -1),
    the object reconciled from the last applied commit, the new event applied."""
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        ids = await seed_b0(org)
        c2101 = await org.create(
            "Account", Name="Dale Lumber", ERP_Customer_Code__c="C-2101"
        )
        settings = settings_for(erp_case, served)
        async with running(settings):
            await eventually_mirrored(settings)
        # The stored checkpoint is 4711, last applied at 2024-06-01T09:00:00Z.
        await fetchval(
            erp_case,
            "UPDATE replicator.checkpoints SET position = '4711', "
            "details = '{\"commit_ms\": 1717232400000}' WHERE stream = $1",
            f"sf:{ACCOUNTS}",
        )
        await org.update("Account", ids["C-1001"], Phone="555-0777")
        await org.delete("Account", c2101)
        f0_logged.clear()

        async with subscribes(served) as sent, running(settings):
            await org.update("Account", ids["C-1002"], Rating="Hot")
            await eventually_mirrored(settings)
        last = served.app[STREAMING_KEY].log.last_id

    phone = await fetchval(
        erp_case, "SELECT phone FROM sf.account WHERE id = $1", ids["C-1001"]
    )
    deleted = await fetchval(
        erp_case, "SELECT is_deleted FROM sf.account WHERE id = $1", c2101
    )
    rating = await fetchval(
        erp_case, "SELECT rating FROM sf.account WHERE id = $1", ids["C-1002"]
    )
    errors = [
        r
        for r in f0_logged.records
        if r.levelno >= logging.ERROR
        and "4711" in str(r.__dict__)
        and ACCOUNTS in str(r.__dict__)
        and "lost" in r.getMessage()
    ]
    assert (phone, deleted, rating) == ("555-0777", True, "Hot")
    assert len(errors) == 1
    assert "retention" in errors[0].getMessage()
    assert sent.count(4711) == 1
    assert sent[sent.index(4711) + 1] == -2
    assert -1 not in sent
    assert await stored_replay_id(erp_case) == last


# -- BUG-19 -----------------------------------------------------------------------


async def test_bug19_unknown_client_resubscribes_from_the_last_applied_id(
    erp_case: ErpCase,
    serve_emulator: ServeEmulator,
    f0_config: EmulatorConfig,
    f0_logged: pytest.LogCaptureFixture,
) -> None:
    """After ``403::Unknown client`` the resubscribe carries the last applied
    id (105), not the start id or -1; redelivered 104 and 105 write nothing."""
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        ids = await seed_b0(org)
        acme = ids["C-1001"]
        settings = settings_for(erp_case, served)
        async with running(settings):
            await eventually_mirrored(settings)
        start = await stored_replay_id(erp_case)
        async with subscribes(served) as sent, running(settings) as pipeline:
            replay: dict[str, int] = {}
            for n in range(101, 106):
                await org.update("Account", acme, Phone=f"555-0{n}")
                replay[f"555-0{n}"] = served.app[STREAMING_KEY].log.last_id
            await until(lambda: pipeline.stats.applied >= 5)
            applied_105 = await stored_replay_id(erp_case)
            served.app[STREAMING_KEY].faults.forget_clients()
            await org.update("Account", acme, Phone="555-0106")
            await until(lambda: pipeline.stats.applied >= 6)

        # At-least-once: the org sends 104 and 105 again (a lagging checkpoint).
        await _count_account_writes(erp_case)
        await fetchval(
            erp_case,
            "UPDATE replicator.checkpoints SET position = $2 WHERE stream = $1",
            f"sf:{ACCOUNTS}",
            str(replay["555-0103"]),
        )
        async with running(settings) as again:
            await until(lambda: again.stats.events >= 3)
            await eventually_mirrored(settings)
            skipped = again.stats.skipped

    phone = await fetchval(erp_case, "SELECT phone FROM sf.account WHERE id = $1", acme)
    rewrites = await fetchval(erp_case, "SELECT count(*) FROM account_writes")
    assert sent == [start, applied_105]
    assert applied_105 == replay["555-0105"]
    assert phone == "555-0106"
    assert skipped == 3  # 104, 105, 106 again
    assert rewrites == 0


async def _count_account_writes(case: ErpCase) -> None:
    """Record every row written to ``sf.account`` from now on."""
    conn = await asyncpg.connect(case.replica_dsn)
    try:
        await conn.execute("""
            CREATE TABLE account_writes (n bigserial, op text, id text);
            CREATE FUNCTION note_account_write() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO account_writes (op, id) VALUES (TG_OP, NEW.id); RETURN NEW; END $$;
            CREATE TRIGGER note_writes AFTER INSERT OR UPDATE ON sf.account
                FOR EACH ROW EXECUTE FUNCTION note_account_write();
        """)
    finally:
        await conn.close()


async def test_bug19_variant_b_resubscribe_past_retention_takes_the_bug18_path(
    erp_case: ErpCase,
    serve_emulator: ServeEmulator,
    f0_logged: pytest.LogCaptureFixture,
) -> None:
    """The session is lost and comes back only after the last applied id left
    the retention window: the resubscribe is refused as invalid, and the source
    reconciles over REST and resubscribes with -2; it never sits idle."""
    config = EmulatorConfig.ebikes(
        long_poll_timeout_seconds=2.0, replay_retention_seconds=1.5
    )
    async with serve_emulator(config) as served, org_client(served) as org:
        acme = await org.create("Account", Name="Acme Tools", Phone="555-0100")
        settings = settings_for(erp_case, served)
        faults = served.app[STREAMING_KEY].faults
        async with subscribes(served) as sent, running(settings) as pipeline:
            await org.update("Account", acme, Phone="555-0105")
            await until(lambda: pipeline.stats.applied >= 1)
            applied = await stored_replay_id(erp_case)
            faults.deny_handshakes("403::Organization concurrent user limit exceeded")
            faults.forget_clients()
            await org.update("Account", acme, Phone="555-0106")
            await asyncio.sleep(2.0)  # 105 and 106 leave the retention window
            faults.deny_handshakes(None)
            await until(lambda: -2 in sent)
            await eventually_mirrored(settings)

    phone = await fetchval(erp_case, "SELECT phone FROM sf.account WHERE id = $1", acme)
    assert phone == "555-0106"
    assert sent[-2:] == [applied, -2]
    assert any(
        r.levelno >= logging.ERROR and "retention" in r.getMessage()
        for r in f0_logged.records
    )


# -- BUG-20 -----------------------------------------------------------------------


@pytest.mark.slow
async def test_bug20_denied_handshakes_back_off_then_resume_from_the_stored_id(
    erp_case: ErpCase,
    serve_emulator: ServeEmulator,
    f0_logged: pytest.LogCaptureFixture,
) -> None:
    """Handshakes refused for the concurrent-user limit: gaps start at >= 1 s and
    never shrink; after recovery the stored id is resubscribed and 101 applied."""
    config = EmulatorConfig.ebikes(long_poll_timeout_seconds=2.0)
    async with serve_emulator(config) as served, org_client(served) as org:
        acme = await org.create("Account", Name="Acme Tools")
        settings = settings_for(erp_case, served)
        streaming = served.app[STREAMING_KEY]
        async with subscribes(served) as sent, running(settings) as pipeline:
            await eventually_mirrored(settings)
            stored = await stored_replay_id(erp_case)
            streaming.faults.deny_handshakes(
                "403::Organization concurrent user limit exceeded"
            )
            streaming.faults.forget_clients()
            times = await _handshake_times(streaming.server, seconds=8.0)
            streaming.faults.deny_handshakes(None)
            await org.update("Account", acme, Rating="Hot")  # "replay 101"
            await until(lambda: pipeline.stats.applied >= 1, seconds=20)

    rating = await fetchval(
        erp_case, "SELECT rating FROM sf.account WHERE id = $1", acme
    )
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 2 <= len(times) <= 5, times
    assert gaps[0] >= 1.0
    assert all(later >= earlier * 0.95 for earlier, later in itertools.pairwise(gaps))
    assert sent[-1] == stored
    assert rating == "Hot"
    assert any(
        r.levelno >= logging.ERROR and "concurrent user limit" in r.getMessage()
        for r in f0_logged.records
    )


async def _handshake_times(server: Any, *, seconds: float) -> list[float]:
    loop = asyncio.get_running_loop()
    start, seen, times = loop.time(), server.handshakes, []
    while loop.time() - start < seconds:
        await asyncio.sleep(0.02)
        if server.handshakes > seen:
            times.extend([loop.time()] * (server.handshakes - seen))
            seen = server.handshakes
    return times


# -- BUG-22 -----------------------------------------------------------------------


async def test_bug22_event_interrupted_before_commit_is_delivered_again_and_applied(
    erp_case: ErpCase,
    serve_emulator: ServeEmulator,
    f0_config: EmulatorConfig,
    f0_logged: pytest.LogCaptureFixture,
) -> None:
    """The replica rejects the write of 301, then the engine is killed: the
    checkpoint stays at 300, the restart subscribes from 300 and applies 301."""
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        ids = await seed_b0(org)
        acme = ids["C-1001"]
        settings = settings_for(erp_case, served)
        async with running(settings):
            await eventually_mirrored(settings)
        at_300 = await stored_replay_id(erp_case)
        conn = await asyncpg.connect(erp_case.replica_dsn)
        await conn.execute("""
            CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'replica refuses writes'; END $$;
            CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON sf.account
                FOR EACH ROW EXECUTE FUNCTION refuse();
        """)

        pipeline = SalesforcePipeline(settings)
        task = asyncio.create_task(pipeline.run(asyncio.Event()))
        await org.update("Account", acme, Phone="555-0301")
        await until(
            lambda: any(
                "replica refuses writes" in r.getMessage()
                or "replica refuses writes" in str(r.__dict__)
                for r in f0_logged.records
            )
        )
        task.cancel()  # the engine dies before any commit
        with contextlib.suppress(asyncio.CancelledError):
            await task
        after_kill = await stored_replay_id(erp_case)
        await conn.execute("DROP TRIGGER refuse ON sf.account")
        await conn.close()
        async with subscribes(served) as sent, running(settings) as again:
            # applied from the event, or from the catch-up that precedes a
            # stream which never applied an event since the load
            await until(lambda: again.stats.events >= 1)
        replay_301 = served.app[STREAMING_KEY].log.last_id

    phone = await fetchval(erp_case, "SELECT phone FROM sf.account WHERE id = $1", acme)
    assert after_kill == at_300
    assert sent == [at_300]
    assert phone == "555-0301"
    assert await stored_replay_id(erp_case) == replay_301


# -- BUG-23 -----------------------------------------------------------------------


async def test_bug23_gap_events_reread_the_records_and_null_nothing(
    erp_case: ErpCase,
    serve_emulator: ServeEmulator,
    f0_config: EmulatorConfig,
    f0_logged: pytest.LogCaptureFixture,
) -> None:
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        ids = await seed_b0(org)
        acme, cobalt = ids["C-1001"], ids["C-1003"]
        settings = settings_for(erp_case, served)
        async with running(settings):
            await eventually_mirrored(settings)
            served.app[STREAMING_KEY].faults.gap_for([acme, cobalt])
            served.faults.requests.clear()
            await org.update("Account", acme, Phone="555-0402")
            await org.delete("Account", cobalt)
            await eventually_mirrored(settings)
        in_org = await org.call("GET", f"/sobjects/Account/{acme}")
        events = events_of(served, ACCOUNTS)
    fetches = [
        r
        for r in served.faults.requests
        if r.path.endswith(("/query", "/queryAll"))
        and r.headers.get("Sforce-Call-Options") == "client=replicator"
    ]

    row = await fetchrow(
        erp_case,
        "SELECT phone, name, industry, rating, description, "
        "attributes__c, billing_city, system_modstamp FROM sf.account "
        "WHERE id = $1",
        acme,
    )
    deleted = await fetchval(
        erp_case, "SELECT is_deleted FROM sf.account WHERE id = $1", cobalt
    )
    gap_types = {e["ChangeEventHeader"]["changeType"] for e in events[-2:]}
    assert gap_types == {"GAP_UPDATE", "GAP_DELETE"}
    assert row["phone"] == "555-0402"
    assert (row["name"], row["industry"], row["rating"], row["billing_city"]) == (
        "Acme Tools",
        "Machinery",
        "Warm",
        "Portsmouth",
    )
    assert len(row["description"]) == 12_000
    assert row["attributes__c"] == '{"tier": "silver"}'
    assert row["system_modstamp"] == _sf_time(in_org["SystemModstamp"])
    assert deleted is True
    fetched = " ".join(r.query.get("q", "") for r in fetches)
    assert acme in fetched and cobalt in fetched
    for gap_type, record in (("GAP_UPDATE", acme), ("GAP_DELETE", cobalt)):
        assert any(
            r.levelno == logging.INFO
            and gap_type in str(r.__dict__)
            and record in str(r.__dict__)
            for r in f0_logged.records
        ), gap_type


def events_of(served: Served, *channels: str) -> list[dict[str, Any]]:
    """The ``payload`` of every retained event of ``channels``, in replay order."""
    log = served.app[STREAMING_KEY].log
    stored = [e for c in channels for e in log.read_after(0, c, 100_000)[0]]
    return [orjson.loads(e.payload) for e in sorted(stored, key=lambda e: e.replay_id)]


def _sf_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z")


# -- BUG-26 -----------------------------------------------------------------------


async def test_bug26_explicit_null_clears_absent_fields_stay(
    erp_case: ErpCase,
    serve_emulator: ServeEmulator,
    f0_config: EmulatorConfig,
) -> None:
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        ids = await seed_b0(org)
        acme = ids["C-1001"]
        settings = settings_for(erp_case, served)
        async with running(settings):
            await eventually_mirrored(settings)
            await org.update("Account", acme, Phone=None)  # replay 651
            bakery = await org.create(
                "Account",
                Name="Elm Street Bakery",
                ERP_Customer_Code__c="C-5001",
                Industry="Food",
            )
            await eventually_mirrored(settings)
        events = events_of(served, ACCOUNTS)
    update, create = events[-2], events[-1]
    writes = [
        r
        for r in served.faults.requests
        if r.method in ("POST", "PATCH", "DELETE")
        and "/sobjects" in r.path
        and "client=replicator" in r.headers.get("Sforce-Call-Options", "")
    ]

    row = await fetchrow(
        erp_case, "SELECT phone, industry, name FROM sf.account WHERE id = $1", acme
    )
    new = await fetchrow(
        erp_case,
        "SELECT name, industry, phone, billing_street, "
        "billing_city, billing_state, billing_postal_code, billing_country, "
        "erp_customer_code__c FROM sf.account WHERE id = $1",
        bakery,
    )
    assert update["Phone"] is None and "Industry" not in update and "Name" not in update
    assert "Phone" not in create and "BillingAddress" not in create
    assert tuple(row) == (None, "Machinery", "Acme Tools")
    assert tuple(new) == (
        "Elm Street Bakery",
        "Food",
        None,
        None,
        None,
        None,
        None,
        None,
        "C-5001",
    )
    assert writes == []


# -- BUG-27 -----------------------------------------------------------------------


async def test_bug27_one_event_for_many_records_changes_every_record(
    erp_case: ErpCase,
    serve_emulator: ServeEmulator,
    f0_config: EmulatorConfig,
) -> None:
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        batch = [
            await org.create(
                "Account",
                Name=f"Mass {code}",
                Industry="Machinery",
                ERP_Customer_Code__c=code,
            )
            for code in ("C-3001", "C-3002", "C-3003")
        ]
        doomed = [
            await org.create("Account", Name=f"Gone {code}", ERP_Customer_Code__c=code)
            for code in ("C-3101", "C-3102")
        ]
        settings = settings_for(erp_case, served)
        async with running(settings):
            await eventually_mirrored(settings)
            await org.call(
                "PATCH",
                "/composite/sobjects",
                {
                    "allOrNone": True,
                    "records": [
                        {
                            "attributes": {"type": "Account"},
                            "id": i,
                            "Industry": "Apparel",
                        }
                        for i in batch
                    ],
                },
            )
            await org.call(
                "DELETE", f"/composite/sobjects?ids={','.join(doomed)}&allOrNone=true"
            )
            await eventually_mirrored(settings)
        events = events_of(served, ACCOUNTS)

    industries = await _values(erp_case, "industry", batch)
    deleted = await _values(erp_case, "is_deleted", doomed)
    headers = [e["ChangeEventHeader"] for e in events[-2:]]
    assert [(h["changeType"], sorted(h["recordIds"])) for h in headers] == [
        ("UPDATE", sorted(batch)),
        ("DELETE", sorted(doomed)),
    ]
    assert industries == ["Apparel"] * 3
    assert deleted == [True, True]


async def _values(case: ErpCase, column: str, ids: list[str]) -> list[Any]:
    conn = await asyncpg.connect(case.replica_dsn)
    try:
        rows = await conn.fetch(
            f"SELECT id, {column} FROM sf.account WHERE id = ANY($1::text[])", ids
        )
    finally:
        await conn.close()
    by_id = {r[0]: r[1] for r in rows}
    return [by_id.get(i) for i in ids]


# -- BUG-28 -----------------------------------------------------------------------


@contextlib.contextmanager
def reordered(served: Served, order: list[str]) -> Iterator[None]:
    """Publish each transaction's events in ``order`` of object names."""
    publisher = served.app[STREAMING_KEY].publisher
    original = publisher.publish

    def publish(events: list[cdc.ChangeEvent]) -> None:
        rank = {name: i for i, name in enumerate(order)}
        original(sorted(events, key=lambda e: rank.get(e.entity, len(order))))

    publisher.publish = publish  # type: ignore[method-assign]
    try:
        yield
    finally:
        publisher.publish = original  # type: ignore[method-assign]


async def test_bug28_lead_conversion_out_of_order_applies_in_sequence_in_one_transaction(
    erp_case: ErpCase,
    serve_emulator: ServeEmulator,
    f0_config: EmulatorConfig,
) -> None:
    """The Contact (seq 3) arrives before its Account (seq 2) on another channel:
    both land in one replica transaction, the Account first."""
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        lead = await org.create(
            "Lead", LastName="Lindqvist", FirstName="Maja", Company="Fjord Outfitters"
        )
        settings = settings_for(erp_case, served, ["Account", "Contact"])
        async with running(settings):
            await eventually_mirrored(settings)
            await _log_writes(erp_case)
            with (
                reordered(served, ["Lead", "Contact", "Account", "Opportunity"]),
                as_user(served) as tx,
            ):
                tx.update("Lead", lead, {"Status": "Closed - Converted"})
                account = tx.create(
                    "Account",
                    {"Name": "Fjord Outfitters", "ERP_Customer_Code__c": "C-6001"},
                )
                contact = tx.create(
                    "Contact",
                    {
                        "FirstName": "Maja",
                        "LastName": "Lindqvist",
                        "AccountId": account,
                    },
                )
                tx.create(
                    "Opportunity",
                    {
                        "Name": "Fjord",
                        "AccountId": account,
                        "StageName": "Prospecting",
                        "CloseDate": "2024-06-30",
                    },
                )
            await eventually_mirrored(settings)
        delivered = [
            e["ChangeEventHeader"]
            for e in events_of(
                served,
                "/data/LeadChangeEvent",
                "/data/ContactChangeEvent",
                ACCOUNTS,
                "/data/OpportunityChangeEvent",
            )
        ]

    conn = await asyncpg.connect(erp_case.replica_dsn)
    acc = await conn.fetchrow(
        "SELECT xmin::text::bigint AS tx, name, erp_customer_code__c "
        "FROM sf.account WHERE id = $1",
        account,
    )
    con = await conn.fetchrow(
        "SELECT xmin::text::bigint AS tx, account_id, first_name, "
        "last_name FROM sf.contact WHERE id = $1",
        contact,
    )
    order = [
        r[0]
        for r in await conn.fetch(
            "SELECT tbl FROM mirror_writes WHERE id = ANY($1::text[]) AND op = 'INSERT' "
            "ORDER BY n",
            [account, contact],
        )
    ]
    await conn.close()
    tail = [(h["entityName"], h["sequenceNumber"]) for h in delivered[-4:]]
    assert tail == [("Lead", 1), ("Contact", 3), ("Account", 2), ("Opportunity", 4)]
    assert (acc["name"], acc["erp_customer_code__c"]) == ("Fjord Outfitters", "C-6001")
    assert (con["account_id"], con["first_name"], con["last_name"]) == (
        account,
        "Maja",
        "Lindqvist",
    )
    assert acc["tx"] == con["tx"]
    assert order[:2] == ["account", "contact"]


async def _log_writes(case: ErpCase) -> None:
    conn = await asyncpg.connect(case.replica_dsn)
    try:
        await conn.execute("""
            CREATE TABLE mirror_writes (n bigserial, tbl text, op text, id text);
            CREATE FUNCTION note_write() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN INSERT INTO mirror_writes (tbl, op, id) VALUES (TG_TABLE_NAME, TG_OP, NEW.id);
                  RETURN NEW; END $$;
            CREATE TRIGGER note_writes AFTER INSERT OR UPDATE ON sf.account
                FOR EACH ROW EXECUTE FUNCTION note_write();
            CREATE TRIGGER note_writes AFTER INSERT OR UPDATE ON sf.contact
                FOR EACH ROW EXECUTE FUNCTION note_write();
        """)
    finally:
        await conn.close()


# -- BUG-30 / BUG-31 / BUG-33: the source's reads -----------------------------------


@pytest.mark.parametrize(
    "error", ["REQUEST_LIMIT_EXCEEDED", "SERVICE_UNAVAILABLE", "UNABLE_TO_LOCK_ROW"]
)
async def test_bug31_refusals_during_a_gap_reread_back_off_and_never_reauthenticate(
    erp_case: ErpCase,
    serve_emulator: ServeEmulator,
    f0_config: EmulatorConfig,
    f0_logged: pytest.LogCaptureFixture,
    error: str,
) -> None:
    """A GAP_UPDATE's re-read meets REQUEST_LIMIT_EXCEEDED (403), 503 or a row
    lock: retried with growing gaps, zero token requests, a WARNING naming the
    code, and the mirror converges; CometD keeps delivering meanwhile."""
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        ids = await seed_b0(org)
        acme, birch = ids["C-1001"], ids["C-1002"]
        settings = settings_for(erp_case, served)
        async with running(settings) as pipeline:
            await eventually_mirrored(settings)
            served.app[STREAMING_KEY].faults.gap_for([acme])
            served.faults.requests.clear()
            served.faults.fail_next(3, error, path_contains="/query")
            await org.update("Account", acme, Phone="555-2002")
            await until(lambda: pipeline.stats.refetched >= 1, seconds=20)
            log = list(served.faults.requests)  # before verify_sf logs in
            await org.update("Account", birch, Rating="Hot")  # "replay 151"
            await eventually_mirrored(settings)

    token_requests = [r for r in log if r.path.endswith("/oauth2/token")]
    rereads = [
        r.time
        for r in log
        if r.path.endswith(("/query", "/queryAll")) and acme in r.query.get("q", "")
    ]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(rereads)]
    phone = await fetchval(erp_case, "SELECT phone FROM sf.account WHERE id = $1", acme)
    rating = await fetchval(
        erp_case, "SELECT rating FROM sf.account WHERE id = $1", birch
    )
    assert token_requests == []
    assert len(rereads) == 4  # three refusals, then the answer
    assert gaps[0] >= 0.1
    assert gaps[-1] > gaps[0]
    assert (phone, rating) == ("555-2002", "Hot")
    code = "SERVER_UNAVAILABLE" if error == "SERVICE_UNAVAILABLE" else error
    assert any(
        r.levelno == logging.WARNING and code in str(r.__dict__)
        for r in f0_logged.records
    )


# -- BUG-34: the source's side ------------------------------------------------------


_DELIVERY_OBJECT = """<?xml version="1.0" encoding="UTF-8"?>
<CustomObject xmlns="http://soap.sforce.com/2006/04/metadata">
    <label>Delivery</label><pluralLabel>Deliveries</pluralLabel>
    <nameField><label>Delivery Name</label><type>Text</type></nameField>
    <deploymentStatus>Deployed</deploymentStatus><sharingModel>ReadWrite</sharingModel>
</CustomObject>
"""
_FIELD = """<?xml version="1.0" encoding="UTF-8"?>
<CustomField xmlns="http://soap.sforce.com/2006/04/metadata">{body}</CustomField>
"""
DELIVERY_FIELDS = {
    "ERP_Delivery_Id__c": "<fullName>ERP_Delivery_Id__c</fullName><label>ERP Delivery Id"
    "</label><type>Text</type><length>20</length><externalId>true</externalId>",
    "Promised_Date__c": "<fullName>Promised_Date__c</fullName><label>Promised Date"
    "</label><type>Date</type>",
    "Shipped_At__c": "<fullName>Shipped_At__c</fullName><label>Shipped At</label>"
    "<type>DateTime</type>",
}


@pytest.fixture
def delivery_config(tmp_path: Path, account_metadata_dir: Path) -> EmulatorConfig:
    folder = tmp_path / "delivery" / "objects" / "Delivery__c"
    (folder / "fields").mkdir(parents=True)
    (folder / "Delivery__c.object-meta.xml").write_text(_DELIVERY_OBJECT)
    for name, body in DELIVERY_FIELDS.items():
        (folder / "fields" / f"{name}.field-meta.xml").write_text(
            _FIELD.format(body=body)
        )
    return EmulatorConfig.ebikes(
        metadata_dirs=(
            *EmulatorConfig.ebikes().metadata_dirs,
            account_metadata_dir,
            tmp_path / "delivery" / "objects",
        ),
        long_poll_timeout_seconds=2.0,
    )


@pytest.mark.parametrize("zone", ["Asia/Kolkata", "America/Los_Angeles"])
async def test_bug34_dates_and_datetimes_are_exact_whatever_the_host_zone(
    erp_case: ErpCase,
    serve_emulator: ServeEmulator,
    delivery_config: EmulatorConfig,
    monkeypatch: pytest.MonkeyPatch,
    zone: str,
) -> None:
    """The engine host and the replica's default zone are far from UTC: a Date
    stays the calendar date and a DateTime the same instant, loaded or streamed."""
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    admin = await asyncpg.connect(erp_case.replica_dsn)
    await admin.execute(
        f"ALTER DATABASE {admin._params.database} SET timezone = '{zone}'"
    )
    await admin.close()
    try:
        async with serve_emulator(delivery_config) as served, org_client(served) as org:
            loaded = await org.create(
                "Delivery__c",
                Name="D-1",
                ERP_Delivery_Id__c="1",
                Promised_Date__c="2024-03-31",
                Shipped_At__c="2024-03-10T07:30:00.000Z",
            )
            settings = settings_for(erp_case, served, ["Delivery__c"])
            async with running(settings):
                await eventually_mirrored(settings)
                before = await _delivery(erp_case, loaded)
                await org.update(
                    "Delivery__c",
                    loaded,
                    Promised_Date__c="2024-04-01",
                    Shipped_At__c="2024-03-10T08:00:00.000Z",
                )
                await eventually_mirrored(settings)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    after = await _delivery(erp_case, loaded)

    assert before == (
        dt.date(2024, 3, 31),
        dt.datetime(2024, 3, 10, 7, 30, tzinfo=dt.UTC),
    )
    assert after == (dt.date(2024, 4, 1), dt.datetime(2024, 3, 10, 8, 0, tzinfo=dt.UTC))


async def _delivery(case: ErpCase, record: str) -> tuple[Any, Any]:
    row = await fetchrow(
        case,
        "SELECT promised_date__c, shipped_at__c FROM sf.delivery__c WHERE id = $1",
        record,
    )
    return row[0], row[1]


# -- issue items: formulas, new fields, dead letters ---------------------------------


FORMULA = (
    "<fullName>Score__c</fullName><label>Score</label><type>Number</type>"
    "<formula>AnnualRevenue / 1000</formula><formulaReturnType>Number"
    "</formulaReturnType><precision>18</precision><scale>2</scale>"
)


async def test_formula_field_is_reread_when_an_event_touches_the_record(
    erp_case: ErpCase,
    serve_emulator: ServeEmulator,
    f0_config: EmulatorConfig,
    account_metadata_dir: Path,
) -> None:
    """Formula values never come in change events. The emulator does not
    evaluate formulas: a system write in the same transaction plays the
    formula engine, and the mirror must follow the org over REST."""
    (
        account_metadata_dir / "Account" / "fields" / "Score__c.field-meta.xml"
    ).write_text(_FIELD.format(body=FORMULA))
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        acme = await org.create("Account", Name="Acme Tools")
        settings = settings_for(erp_case, served)
        async with running(settings):
            await eventually_mirrored(settings)
            with as_user(served) as tx:
                tx.update(
                    "Account",
                    acme,
                    {"AnnualRevenue": 250000, "Score__c": 250},
                    system=True,
                )
            await eventually_mirrored(settings)
        event = events_of(served, ACCOUNTS)

    score = await fetchval(
        erp_case, "SELECT score__c FROM sf.account WHERE id = $1", acme
    )
    assert "Score__c" not in event[-1]
    assert score == 250


async def test_field_added_to_the_org_after_start_evolves_the_mirror(
    erp_case: ErpCase,
    serve_emulator: ServeEmulator,
    f0_config: EmulatorConfig,
) -> None:
    """An event names a field the mirror lacks: describe again, add the column,
    apply the change; nothing is dead-lettered."""
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        acme = await org.create("Account", Name="Acme Tools")
        settings = settings_for(erp_case, served)
        async with running(settings) as pipeline:
            await eventually_mirrored(settings)
            account = served.app[SCHEMA_KEY].objects["Account"]
            account.fields["Region__c"] = FieldSchema(
                "Region__c", "string", label="Region", length=40
            )
            await org.update("Account", acme, Region__c="North East", Phone="555-0999")
            await until(lambda: pipeline.stats.events >= 1)
            await eventually_mirrored(settings)

    row = await fetchrow(
        erp_case, "SELECT region__c, phone FROM sf.account WHERE id = $1", acme
    )
    letters = await fetchval(erp_case, "SELECT count(*) FROM replicator.dead_letters")
    assert tuple(row) == ("North East", "555-0999")
    assert letters == 0


async def test_malformed_and_unmirrored_events_are_dead_lettered_and_the_stream_goes_on(
    erp_case: ErpCase,
    serve_emulator: ServeEmulator,
    f0_config: EmulatorConfig,
) -> None:
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        acme = await org.create("Account", Name="Acme Tools")
        settings = settings_for(erp_case, served)
        publisher = served.app[STREAMING_KEY].publisher
        header = {
            "entityName": "Account",
            "recordIds": [acme],
            "changeType": "UPDATE",
            "changeOrigin": "",
            "transactionKey": "0004a7f2-1b3c-9d8e-7f60-5a4b3c2d1e0f",
            "sequenceNumber": 1,
            "commitNumber": 1,
            "commitUser": "005000000000001AAA",
            "changedFields": ["Phone"],
        }
        malformed = {
            "ChangeEventHeader": {
                k: v for k, v in header.items() if k != "commitTimestamp"
            },
            "Phone": "555-1",
        }
        lead = {
            "ChangeEventHeader": {
                **header,
                "entityName": "Lead",
                "recordIds": ["00Q000000000001AAA"],
                "commitTimestamp": int(time.time() * 1000),
            },
            "Company": "Elsewhere",
        }
        async with running(settings):
            await eventually_mirrored(settings)
            publisher.publish([cdc.ChangeEvent("Account", "Sch3maIdA1", malformed)])
            publisher.publish([_OnChannel("Lead", "Sch3maIdA1", lead, ACCOUNTS)])
            await org.update("Account", acme, Phone="555-0123")
            await eventually_mirrored(settings)

    conn = await asyncpg.connect(erp_case.replica_dsn)
    letters = await conn.fetch(
        "SELECT stream, entity, source_key, reason, payload "
        "FROM replicator.dead_letters ORDER BY id"
    )
    phone = await conn.fetchval("SELECT phone FROM sf.account WHERE id = $1", acme)
    await conn.close()
    assert phone == "555-0123"
    assert len(letters) == 2
    assert "commitTimestamp" in letters[0]["reason"]
    assert '"555-1"' in letters[0]["payload"]
    assert letters[1]["entity"] == "Lead"
    assert "not mirrored" in letters[1]["reason"]
    assert "Elsewhere" in letters[1]["payload"]
    assert {r["stream"] for r in letters} == {f"sf:{ACCOUNTS}"}


@dataclasses.dataclass(frozen=True)
class _OnChannel:
    """A change event published on another object's channel (a custom channel)."""

    entity: str
    schema: str
    payload: dict[str, Any]
    channel: str
