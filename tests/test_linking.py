"""Linking records both systems hold: at switch-on, live, and by an operator's choice.

Against real PostgreSQL and the emulator. Expected values are read from the
systems themselves (the ERP with asyncpg, Salesforce over REST) before the
replicator starts, never from the replica it writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import asyncpg
import pytest

from replicator.cli import main
from replicator.config import Settings, parse
from replicator.emulator.app import EmulatorConfig
from replicator.linking import link_all
from replicator.sinks.runner import run_outbox
from replicator.sources.erp.source import ErpPipeline
from replicator.sources.salesforce.source import SalesforcePipeline
from replicator.unified import sync_engine
from tests.fixtures.emulator import Served
from tests.fixtures.pg import ErpCase
from tests.test_mapping_startup import to_toml
from tests.test_sf_source import Org, org_client
from tests.test_sync import syncing, until

pytestmark = pytest.mark.integration

CUSTOMER_DDL = """
CREATE TABLE customer (
    customer_code text PRIMARY KEY,
    company_name text NOT NULL,
    phone text,
    city text,
    state text,
    postal_code text,
    sf_id varchar(18)
);
"""
ACCOUNT_FIELDS = (
    "Id, Name, Phone, BillingCity, BillingState, BillingPostalCode, "
    "ERP_Customer_Code__c"
)


def config_data(case: ErpCase, served: Served) -> dict[str, Any]:
    """The customer entity: Salesforce owns the name, ERP wins ties otherwise."""
    return {
        "replica": {"dsn": case.replica_dsn},
        "erp": {
            "database": {"dsn": case.erp_dsn},
            "slot": case.slot,
            "publication": case.publication,
            "heartbeat_seconds": 0.2,
            "status_interval_seconds": 0.5,
        },
        "salesforce": {
            "login_url": served.url,
            "client_id": served.config.client_id,
            "client_secret_env": "REPLICATOR_TEST_SF_SECRET",
            "username": served.config.username,
            "password_env": "REPLICATOR_TEST_SF_PASSWORD",
            "objects": ["Account"],
            "long_poll_timeout_seconds": 2,
            "skew_seconds": 5,
            "client_name": "ERPSync",
        },
        "ops": {"listen": ""},
        "sync": {"tie_window_seconds": 0.001},
        "entities": [
            {
                "name": "customer",
                "salesforce": "Account",
                "erp": "public.customer",
                "external_id": "ERP_Customer_Code__c",
                "erp_sf_id_column": "sf_id",
                "erp_new_key": "code(name)",
                "delete_policy": "mark",
                "fields": [
                    {
                        "name": "name",
                        "salesforce": "Name",
                        "erp": "company_name",
                        "owner": "salesforce",
                    },
                    {"name": "phone", "salesforce": "Phone", "erp": "phone"},
                    {"name": "city", "salesforce": "BillingCity", "erp": "city"},
                    {
                        "name": "state",
                        "salesforce": "BillingState",
                        "erp": "state",
                        "transform": "us_state",
                    },
                    {
                        "name": "postal_code",
                        "salesforce": "BillingPostalCode",
                        "erp": "postal_code",
                    },
                ],
                "match": [
                    {
                        "fields": ["name", "postal_code"],
                        "normalize": {"name": "company"},
                    },
                    {"fields": ["phone"]},
                ],
            }
        ],
    }


@pytest.fixture(autouse=True)
def _sf_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    config = EmulatorConfig()
    monkeypatch.setenv("REPLICATOR_TEST_SF_SECRET", config.client_secret)
    monkeypatch.setenv(
        "REPLICATOR_TEST_SF_PASSWORD", config.password + config.security_token
    )


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """`main` logs to the stdout of its test; no other test may write there."""
    logger = logging.getLogger("replicator")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:] = []
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@contextlib.asynccontextmanager
async def started(
    case: ErpCase, served: Served, tmp_path: Path
) -> AsyncIterator[tuple[Settings, Path]]:
    """Both pipelines and the outbox running; the settings and their TOML file."""
    data = config_data(case, served)
    config = tmp_path / "replicator.toml"
    config.write_text(to_toml(data))
    settings = parse(data)
    async with syncing(settings):
        yield settings, config


async def accounts(org: Org, where: str = "") -> list[dict[str, Any]]:
    soql = f"SELECT {ACCOUNT_FIELDS} FROM Account {where}".strip()
    body = await org.call("GET", "/query?q=" + quote_plus(soql))
    return list(body["records"])


async def account(org: Org, account_id: str) -> dict[str, Any]:
    (found,) = await accounts(org, f"WHERE Id = '{account_id}'")
    return found


async def erp_rows(erp: asyncpg.Connection) -> dict[str, asyncpg.Record]:
    rows = await erp.fetch("SELECT * FROM customer ORDER BY customer_code")
    return {r["customer_code"]: r for r in rows}


async def cli(*argv: str) -> int:
    """Run ``replicator`` in-process, off the event loop (it runs its own)."""
    return await asyncio.to_thread(main, list(argv))


def json_array(out: str) -> Any:
    """The indented JSON array a command printed, among the log lines on stdout."""
    lines = out.splitlines()
    start = lines.index("[")
    return json.loads("\n".join(lines[start : lines.index("]", start) + 1]))


async def linked_pass_done(replica: asyncpg.Connection) -> Any:
    return await replica.fetchval(
        "SELECT details FROM replicator.sync_entities WHERE entity = 'customer'"
    )


async def outbox_drained(replica: asyncpg.Connection) -> bool:
    pending = await replica.fetchval(
        "SELECT count(*) FROM replicator.outbox WHERE status = 'pending'"
    )
    return bool(pending == 0)


async def test_switch_on_links_overlapping_records_and_holds_ambiguous_ones(
    erp_case: ErpCase,
    serve_emulator: Any,
    f0_config: EmulatorConfig,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Customers both systems hold are linked by name and postal code, not copied;
    one ERP row matching two accounts waits for `replicator matches`, and the
    operator's choice links it or creates it."""
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(CUSTOMER_DDL)
    await erp.execute(
        "INSERT INTO customer (customer_code, company_name, phone, city, state, "
        "postal_code) VALUES "
        "('A-1', 'ACME TOOLS INC.', '555-0177', 'PORTSMOUTH', 'New Hampshire', "
        "' 03801'), "
        "('B-1', 'birch supply', '555-0250', 'Keene', 'New Hampshire', '03431'), "
        "('C-2', 'Casco Bay Outfitters, Inc.', '207-555-0300', 'Portland', "
        "'Maine', '04101'), "
        "('Z-1', 'Zephyr Wheels', '603-555-0123', 'Nashua', 'New Hampshire', "
        "'03060')"
    )
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        birch_llc = await org.create(
            "Account", Name="Birch Supply LLC", BillingPostalCode="03431",
            BillingCity="Keene", BillingState="NH", Phone="603-555-0999",
        )  # fmt: skip
        casco_co = await org.create(
            "Account", Name="Casco Bay Outfitters Co", BillingPostalCode="04101",
            BillingCity="Portland", BillingState="ME",
        )  # fmt: skip
        before = {a["Name"]: a for a in await accounts(org)}
        acme_erp = (await erp_rows(erp))["A-1"]
        acme, birch, casco = (
            before[n]["Id"]
            for n in ("Acme Tools", "Birch Supply", "Casco Bay Outfitters")
        )

        async with started(erp_case, served, tmp_path) as (_, config):
            replica = await asyncpg.connect(erp_case.replica_dsn)
            report = json.loads(await until(lambda: linked_pass_done(replica)))
            await until(lambda: outbox_drained(replica))
            failed = await replica.fetch(
                "SELECT target, target_key, fields::text, answer::text "
                "FROM replicator.outbox WHERE status = 'failed'"
            )
            assert failed == [], [dict(r) for r in failed]
            zephyr = await until(
                lambda: accounts(org, "WHERE ERP_Customer_Code__c = 'Z-1'")
            )
            switched_on = await erp_rows(erp)
            acme_sf = await account(org, acme)
            reviews = {
                r["record_key"]: r
                for r in await replica.fetch(
                    "SELECT id, side, record_key, status, candidates::text AS c "
                    "FROM unified.match_review"
                )
            }
            held_in_sf = await accounts(
                org, "WHERE ERP_Customer_Code__c IN ('B-1', 'C-2')"
            )
            unified_acme = await replica.fetchrow(
                "SELECT sf_id, erp_key FROM unified.customer WHERE erp_key = 'A-1'"
            )

            # the operator looks, then links Birch and creates Casco's ERP row
            listed = await cli("matches", "-c", str(config))
            listing = capsys.readouterr().out
            as_json = await cli("matches", "list", "--json", "-c", str(config))
            listing_json = json_array(capsys.readouterr().out)
            linked = await cli(
                "matches", "link", str(reviews["B-1"]["id"]), birch, "-c", str(config)
            )
            created = await cli(
                "matches", "create", str(reviews["C-2"]["id"]), "-c", str(config)
            )
            decided_out = capsys.readouterr().out
            casco_created = await until(
                lambda: accounts(org, "WHERE ERP_Customer_Code__c = 'C-2'")
            )
            await until(lambda: outbox_drained(replica))
            await until(lambda: _erp_has(erp, birch_llc, casco, casco_co))
            after_links = await replica.fetch(
                "SELECT erp_key, sf_id FROM unified.customer "
                "WHERE erp_key IN ('B-1', 'C-2') ORDER BY erp_key"
            )
            decided = await replica.fetch(
                "SELECT record_key, status, chosen, decided_by "
                "FROM unified.match_review ORDER BY id"
            )
            audited = await replica.fetch(
                "SELECT detail->>'action' AS action FROM replicator.audit "
                "WHERE kind = 'operator' AND subject = 'matches' ORDER BY id"
            )
            final_erp = await erp_rows(erp)
            final_accounts = await accounts(org)
            await replica.close()
    await erp.close()

    # switch-on: Acme linked, not copied, each field by its rule
    assert (report["by_link"], report["by_match"], report["to_review"]) == (0, 1, 2)
    assert tuple(unified_acme) == (acme, "A-1")
    assert sum(a["Name"].lower().startswith("acme") for a in final_accounts) == 1
    assert switched_on["A-1"]["company_name"] == before["Acme Tools"]["Name"]
    assert acme_sf["Phone"] == acme_erp["phone"]  # not owned: ERP precedence
    assert acme_sf["BillingCity"] == acme_erp["city"]
    assert switched_on["A-1"]["sf_id"] == acme
    assert acme_sf["ERP_Customer_Code__c"] == "A-1"  # the link, in both systems
    # no partner: created on the other side
    assert zephyr[0]["Name"] == "Zephyr Wheels"
    erp_names = {r["company_name"] for r in switched_on.values()}
    assert {"Green Mountain Cycles", "Hike n Co.", "Alpine Treckers"} <= erp_names
    # ambiguous: held, nothing created for the record or its candidates
    assert {k: (r["side"], r["status"]) for k, r in reviews.items()} == {
        "B-1": ("erp", "open"),
        "C-2": ("erp", "open"),
    }
    assert sorted(c["key"] for c in json.loads(reviews["B-1"]["c"])) == sorted(
        [birch, birch_llc]
    )
    assert not erp_names & {"Birch Supply", "Birch Supply LLC", "Casco Bay Outfitters"}
    assert held_in_sf == []
    # the listing shows each review, its key fields and candidates
    assert (listed, as_json) == (0, 0)
    assert f"review {reviews['B-1']['id']}  customer  erp B-1  open" in listing
    assert "rule 0 (name, postal_code)" in listing
    assert f"candidate  salesforce {birch_llc}  name='Birch Supply LLC'" in listing
    assert "record     name='birch supply', postal_code='03431'" in listing
    assert {r["record_key"] for r in listing_json} == {"B-1", "C-2"}
    # the operator's choices
    assert (linked, created) == (0, 0)
    assert f"customer: erp B-1 linked to salesforce {birch}" in decided_out
    assert "customer: erp C-2 will be created in salesforce" in decided_out
    assert [tuple(r) for r in after_links] == [
        ("B-1", birch),
        ("C-2", casco_created[0]["Id"]),
    ]
    assert [(r["record_key"], r["status"], r["chosen"]) for r in decided] == [
        ("B-1", "linked", birch),
        ("C-2", "created", None),
    ]
    assert all(r["decided_by"].startswith("operator:") for r in decided)
    assert [a["action"] for a in audited] == ["link", "create"]
    # candidates left unchosen became records of their own
    assert final_erp["B-1"]["sf_id"] == birch
    erp_by_sf = {r["sf_id"]: r for r in final_erp.values() if r["sf_id"]}
    assert {birch_llc, casco, casco_co} <= set(erp_by_sf)
    assert len(final_accounts) == len(before) + 2  # Zephyr Wheels and C-2 only


async def _erp_has(erp: asyncpg.Connection, *sf_ids: str) -> bool:
    found = await erp.fetchval(
        "SELECT count(*) FROM customer WHERE sf_id = ANY($1::text[])", list(sf_ids)
    )
    return bool(found == len(sf_ids))


@contextlib.asynccontextmanager
async def sources_only(settings: Settings) -> AsyncIterator[asyncio.Event]:
    """Both pipelines, no outbox worker: writes queue up as when Salesforce is down."""
    stop = asyncio.Event()
    erp, sf = ErpPipeline(settings), SalesforcePipeline(settings)
    tasks = [asyncio.create_task(erp.run(stop)), asyncio.create_task(sf.run(stop))]
    async with asyncio.timeout(30):
        await erp.ready.wait()
        await sf.ready.wait()
    try:
        yield stop
    finally:
        stop.set()
        async with asyncio.timeout(20):
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task


async def unified_row(replica: asyncpg.Connection, erp_key: str) -> Any:
    return await replica.fetchrow(
        "SELECT unified_id, sf_id, erp_key, name, phone, city, state "
        "FROM unified.customer WHERE erp_key = $1",
        erp_key,
    )


async def test_live_account_matching_an_erp_customer_by_phone_is_linked(
    erp_case: ErpCase,
    serve_emulator: Any,
    f0_config: EmulatorConfig,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An account entered while the ERP customer's copy is still queued for
    Salesforce is linked to it by phone digits: the queued create becomes an
    update of that account, no ERP row is added. One matching two customers
    waits for review, and creates nothing."""
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(CUSTOMER_DDL)
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        data = config_data(erp_case, served)
        config = tmp_path / "replicator.toml"
        config.write_text(to_toml(data))
        settings = parse(data)
        seeded = len(await accounts(org))
        async with sources_only(settings) as stop:
            replica = await asyncpg.connect(erp_case.replica_dsn)
            engine = await sync_engine(settings, replica)
            assert engine is not None
            await link_all(engine, replica)
            await erp.execute(
                "INSERT INTO customer (customer_code, company_name, phone, city, "
                "state, postal_code) VALUES "
                "('L-1', 'Lakeside Bikes', '(603) 555-0142', 'Concord', "
                "'New Hampshire', '03301'), "
                "('L-2', 'Harbor Cycle Works', '603-555-0777', 'Dover', "
                "'New Hampshire', '03820'), "
                "('L-3', 'Harbor Cycle Works East', '603.555.0777', 'Dover', "
                "'New Hampshire', '03820')"
            )
            await until(
                lambda: replica.fetchval(
                    "SELECT count(*) = 3 FROM unified.customer "
                    "WHERE erp_key IN ('L-1', 'L-2', 'L-3')"
                )
            )
            lakeside = await org.create(
                "Account", Name="Lakeside Bikes & Repair", Phone="603 555 0142",
                BillingCity="Concord", BillingState="NH",
            )  # fmt: skip
            harbor = await org.create(
                "Account", Name="Harbor Cycles", Phone="6035550777",
                BillingCity="Dover", BillingState="NH",
            )  # fmt: skip
            linked = await until(
                lambda: replica.fetchrow(
                    "SELECT sf_id, erp_key FROM unified.customer WHERE sf_id = $1",
                    lakeside,
                )
            )
            review = await until(
                lambda: replica.fetchrow(
                    "SELECT id, side, record_key, status, candidates::text AS c "
                    "FROM unified.match_review WHERE record_key = $1",
                    harbor,
                )
            )

            # Salesforce is back: the queued writes go out
            outbox = asyncio.create_task(run_outbox(settings, stop))
            await until(lambda: outbox_drained(replica))
            await until(lambda: unified_row(replica, "L-1"))
            await asyncio.sleep(2)  # echoes of the writes come back
            await until(lambda: outbox_drained(replica))
            rows = await erp_rows(erp)
            in_sf = await accounts(org)
            final = await unified_row(replica, "L-1")
            lakeside_sf = await account(org, lakeside)

            # the operator: wrong id, wrong key, a candidate linked meanwhile
            wrong_id = await cli("matches", "link", "999999", "L-2", "-c", str(config))
            wrong_id_err = capsys.readouterr().err
            wrong_key = await cli(
                "matches", "link", str(review["id"]), "L-9", "-c", str(config)
            )
            wrong_key_err = capsys.readouterr().err
            taken = await cli(
                "matches", "link", str(review["id"]), "L-2", "-c", str(config)
            )
            taken_err = capsys.readouterr().err
            still_open = await replica.fetchval(
                "SELECT status FROM unified.match_review WHERE id = $1", review["id"]
            )
            created = await cli(
                "matches", "create", str(review["id"]), "-c", str(config)
            )
            harbor_erp = await until(
                lambda: erp.fetchrow("SELECT * FROM customer WHERE sf_id = $1", harbor)
            )
            stop.set()
            await outbox
            await replica.close()
    await erp.close()

    # linked, not copied: the account's values win (the later edit)
    assert tuple(linked) == (lakeside, "L-1")
    assert final["sf_id"] == lakeside
    assert len(rows) == seeded + 3  # the org's accounts and L-1..L-3: no new row
    assert rows["L-1"]["sf_id"] == lakeside
    assert (rows["L-1"]["company_name"], rows["L-1"]["phone"]) == (
        lakeside_sf["Name"],
        lakeside_sf["Phone"],
    )
    assert (lakeside_sf["Name"], lakeside_sf["Phone"]) == (
        "Lakeside Bikes & Repair",
        "603 555 0142",
    )
    assert lakeside_sf["ERP_Customer_Code__c"] == "L-1"
    # a field the account left empty keeps the ERP's value, on both sides
    assert rows["L-1"]["postal_code"] == lakeside_sf["BillingPostalCode"] == "03301"
    digits = ["".join(c for c in a["Phone"] or "" if c.isdigit()) for a in in_sf]
    assert digits.count("6035550142") == 1
    # two candidates: held for review, nothing created for the account
    assert (review["side"], review["status"]) == ("salesforce", "open")
    assert sorted(c["key"] for c in json.loads(review["c"])) == ["L-2", "L-3"]
    assert harbor not in {r["sf_id"] for r in rows.values()}
    assert "Harbor Cycles" not in {r["company_name"] for r in rows.values()}
    # errors are one line each; a candidate that got its own account since
    # the review opened is not taken from it
    assert (wrong_id, wrong_key, taken) == (1, 1, 1)
    assert wrong_id_err.strip().splitlines() == [
        "replicator: no open match review with id 999999; see `replicator matches`"
    ]
    assert "'L-9' is not a candidate of review" in wrong_key_err
    assert "candidates: L-2, L-3" in wrong_key_err
    assert len(taken_err.strip().splitlines()) == 1
    assert "erp L-2 was linked to salesforce" in taken_err
    assert still_open == "open"
    assert created == 0
    assert harbor_erp["company_name"] == "Harbor Cycles"


async def test_switch_on_pairs_records_that_name_each_other(
    erp_case: ErpCase, serve_emulator: Any, f0_config: EmulatorConfig, tmp_path: Path
) -> None:
    """An account whose external id names an ERP row, and an ERP row whose
    Salesforce Id column names an account, are paired by that link even when
    no match rule would pair them."""
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(CUSTOMER_DDL)
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        before = {a["Name"]: a for a in await accounts(org)}
        casco = before["Casco Bay Outfitters"]["Id"]
        green = before["Green Mountain Cycles"]["Id"]
        await org.update("Account", casco, ERP_Customer_Code__c="K-77")
        await erp.execute(
            "INSERT INTO customer (customer_code, company_name, phone, city, state, "
            "postal_code, sf_id) VALUES "
            "('K-77', 'CBO Trading', '207-555-0199', 'Portland', 'Maine', "
            "'04101', NULL), "
            "('K-78', 'GMC Wholesale', NULL, 'Burlington', 'Vermont', '05401', $1)",
            green,
        )
        erp_before = await erp_rows(erp)

        async with started(erp_case, served, tmp_path):
            replica = await asyncpg.connect(erp_case.replica_dsn)
            report = json.loads(await until(lambda: linked_pass_done(replica)))
            await until(lambda: outbox_drained(replica))
            await until(lambda: _erp_named(erp, "K-77", "Casco Bay Outfitters"))
            pairs = await replica.fetch(
                "SELECT erp_key, sf_id FROM unified.customer "
                "WHERE erp_key IN ('K-77', 'K-78') ORDER BY erp_key"
            )
            reviews = await replica.fetchval(
                "SELECT count(*) FROM unified.match_review"
            )
            await replica.close()
            rows = await erp_rows(erp)
            after = await accounts(org)
            casco_sf = await account(org, casco)
            green_sf = await account(org, green)
    await erp.close()

    assert report["by_link"] == 2
    assert [tuple(p) for p in pairs] == [("K-77", casco), ("K-78", green)]
    assert reviews == 0
    assert len(after) == len(before)  # no account created for K-77 or K-78
    assert casco not in {r["sf_id"] for k, r in rows.items() if k != "K-77"}
    assert green not in {r["sf_id"] for k, r in rows.items() if k != "K-78"}
    assert len(rows) == len(before) - 2 + 2  # the other accounts, K-77, K-78
    # Salesforce owns the name; the ERP wins the ties of the other fields
    assert rows["K-78"]["company_name"] == "Green Mountain Cycles"
    assert casco_sf["Phone"] == erp_before["K-77"]["phone"]
    assert green_sf["Phone"] == before["Green Mountain Cycles"]["Phone"]
    assert rows["K-78"]["phone"] == green_sf["Phone"]  # the ERP had none
    assert rows["K-77"]["sf_id"] == casco


async def _erp_named(erp: asyncpg.Connection, key: str, name: str) -> bool:
    found = await erp.fetchval(
        "SELECT company_name FROM customer WHERE customer_code = $1", key
    )
    return bool(found == name)
