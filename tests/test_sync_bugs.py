"""Two-way sync against field failures BUG-38 and BUG-40, end to end.

F0's customer table (shared/cases/field-failures.md) in a real ERP database
and Account in the emulator, synced both ways. Salesforce writes are counted
from the emulator's request log (calls with our ``Sforce-Call-Options``
client); ERP writes by a trigger that logs every UPDATE of ``customer`` with
whether its session was tagged with a replication origin (only the sink's is).
The cases' five-minute watches become a quiet window once the sync is idle:
no pending outbox row, both streams caught up, no counter moving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from replicator.config import Settings, parse
from replicator.emulator.app import EmulatorConfig
from replicator.emulator.streaming import STREAMING_KEY
from tests.fixtures.emulator import Served, ServeEmulator
from tests.fixtures.pg import ErpCase
from tests.test_sf_source import Org, org_client
from tests.test_sync import syncing, until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CLIENT = "ERPSync"
QUIET_SECONDS = 3.0

# F0's customer, and a log of every UPDATE with whether our origin made it.
ERP_DDL = """
CREATE TABLE customer (
  customer_code text PRIMARY KEY, name text NOT NULL, phone text, industry text,
  rating text, credit_limit numeric(12,2), billing_street text, billing_city text,
  billing_state text, billing_postal text, billing_country text, notes text,
  attributes jsonb, sf_account_ref text, updated_at timestamp
);
CREATE TABLE customer_updates (
  id bigserial PRIMARY KEY, customer_code text NOT NULL, engine boolean NOT NULL,
  old jsonb NOT NULL, new jsonb NOT NULL
);
CREATE FUNCTION log_customer_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO customer_updates (customer_code, engine, old, new)
  VALUES (NEW.customer_code, pg_replication_origin_session_is_setup(),
          to_jsonb(OLD), to_jsonb(NEW));
  RETURN NULL;
END $$;
CREATE TRIGGER customer_updates AFTER UPDATE ON customer
  FOR EACH ROW EXECUTE FUNCTION log_customer_update();
"""

# B0's C-1001
B0_INSERT = """
INSERT INTO customer VALUES ('C-1001', 'Acme Tools', '555-0100', 'Machinery', 'Warm',
  2500.00, '12 Harbor Rd', 'Portsmouth', 'NH', '03801', 'US', 'short text',
  '{"tier": "silver"}', NULL, now()::timestamp)
"""


def bug_settings(case: ErpCase, served: Served) -> Settings:
    """F0's policies: industry owned by Salesforce, the rest last writer wins."""
    return parse(
        {
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
                "client_name": CLIENT,
            },
            "ops": {"listen": ""},
            "entities": [
                {
                    "name": "customer",
                    "salesforce": "Account",
                    "erp": "public.customer",
                    "external_id": "ERP_Customer_Code__c",
                    "direction": "both",
                    "delete_policy": "mark",
                    "fields": [
                        {"name": "name", "salesforce": "Name", "erp": "name"},
                        {"name": "phone", "salesforce": "Phone", "erp": "phone"},
                        {
                            "name": "industry",
                            "salesforce": "Industry",
                            "erp": "industry",
                            "owner": "salesforce",
                        },
                        {
                            "name": "attributes",
                            "salesforce": "Attributes__c",
                            "erp": "attributes",
                        },
                    ],
                }
            ],
        }
    )


@pytest.fixture(autouse=True)
def _sf_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    config = EmulatorConfig()
    monkeypatch.setenv("REPLICATOR_TEST_SF_SECRET", config.client_secret)
    monkeypatch.setenv(
        "REPLICATOR_TEST_SF_PASSWORD", config.password + config.security_token
    )


@dataclass
class Watch:
    """Counts what the engine wrote to either system, and tells when all is idle."""

    case: ErpCase
    served: Served
    erp: asyncpg.Connection
    replica: asyncpg.Connection

    def sf_writes(self) -> list[dict[str, Any]]:
        """Each record our client sent to Salesforce, oldest first (no Id, no type)."""
        records = []
        for request in self.served.faults.requests:
            ours = request.headers.get("Sforce-Call-Options") == f"client={CLIENT}"
            if request.method == "GET" or not ours:
                continue
            body = request.body if isinstance(request.body, dict) else {}
            for record in body.get("records", [body]):
                records.append(
                    {
                        k: v
                        for k, v in record.items()
                        if k not in ("attributes", "id", "Id")
                    }
                )
        return records

    async def erp_updates(self) -> list[asyncpg.Record]:
        """Every UPDATE of customer C-1001, oldest first."""
        return list(
            await self.erp.fetch(
                "SELECT engine, old, new FROM customer_updates "
                "WHERE customer_code = 'C-1001' ORDER BY id"
            )
        )

    async def engine_erp_updates(self) -> list[set[str]]:
        """The columns each engine UPDATE of C-1001 changed, oldest first."""
        out = []
        for row in await self.erp_updates():
            if row["engine"]:
                old, new = json.loads(row["old"]), json.loads(row["new"])
                out.append({k for k in new if new[k] != old.get(k)})
        return out

    async def _caught_up(self, wal: str) -> bool:
        pending = await self.replica.fetchval(
            "SELECT count(*) FROM replicator.outbox WHERE status = 'pending'"
        )
        replay = await self.replica.fetchval(
            "SELECT max(position::bigint) FROM replicator.checkpoints "
            "WHERE stream LIKE 'sf:%'"
        )
        flushed = await self.erp.fetchval(
            "SELECT confirmed_flush_lsn >= $2::text::pg_lsn "
            "FROM pg_replication_slots WHERE slot_name = $1",
            self.case.slot,
            wal,
        )
        last_event = self.served.app[STREAMING_KEY].log.last_id
        return pending == 0 and (replay or 0) >= last_event and bool(flushed)

    async def _counters(self) -> tuple[int, ...]:
        outbox = await self.replica.fetchval("SELECT count(*) FROM replicator.outbox")
        return (
            len(self.served.faults.requests),
            len(await self.erp_updates()),
            int(outbox),
            self.served.app[STREAMING_KEY].log.last_id,
        )

    async def idle(self) -> None:
        """Wait until caught up and nothing moved for ``QUIET_SECONDS``."""
        async with asyncio.timeout(60):
            while True:
                wal = await self.erp.fetchval("SELECT pg_current_wal_lsn()::text")
                if await self._caught_up(wal):
                    before = await self._counters()
                    await asyncio.sleep(QUIET_SECONDS)
                    if await self._counters() == before:
                        return
                await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def b0_synced(
    case: ErpCase, serve_emulator: ServeEmulator, f0_config: EmulatorConfig
) -> AsyncIterator[tuple[Watch, Org, str]]:
    """B0's C-1001 created in the ERP, synced to Salesforce, everything idle."""
    erp = await asyncpg.connect(case.erp_dsn)
    replica = None
    try:
        await erp.execute(ERP_DDL)
        async with (
            serve_emulator(f0_config) as served,
            org_client(served) as org,
            syncing(bug_settings(case, served)),
        ):
            await erp.execute(B0_INSERT)
            account = await until(lambda: account_of(org))
            # B0: Salesforce, which owns industry, holds the same value
            await org.update("Account", account["Id"], Industry="Machinery")
            await until(
                lambda: erp.fetchval(
                    "SELECT industry = 'Machinery' FROM customer "
                    "WHERE customer_code = 'C-1001'"
                )
            )
            replica = await asyncpg.connect(case.replica_dsn)
            watch = Watch(case, served, erp, replica)
            await watch.idle()
            yield watch, org, account["Id"]
    finally:
        await erp.close()
        if replica is not None:
            await replica.close()


async def account_of(org: Org) -> dict[str, Any] | None:
    body = await org.call(
        "GET",
        "/query?q="
        + (
            "SELECT Id, Name, Industry, Attributes__c FROM Account "
            "WHERE ERP_Customer_Code__c = 'C-1001'"
        ).replace(" ", "+"),
    )
    return body["records"][0] if body["records"] else None


async def test_bug_38_jsonb_normal_form_causes_no_write_back(
    erp_case: ErpCase, serve_emulator: ServeEmulator, f0_config: EmulatorConfig
) -> None:
    """BUG-38: jsonb stores a normal form (spacing, key order); the engine must
    compare JSON semantically, or every sync looks like a change."""
    gold = '{"tier":"gold","regions":["EU","US"]}'
    async with b0_synced(erp_case, serve_emulator, f0_config) as (watch, org, sf_id):
        # a Salesforce user sets the Long Text Area to compact JSON
        sf_mark, erp_mark = len(watch.sf_writes()), len(await watch.erp_updates())
        await org.update("Account", sf_id, Attributes__c=gold)
        await until(
            lambda: watch.erp.fetchval(
                "SELECT attributes = $1::jsonb FROM customer "
                "WHERE customer_code = 'C-1001'",
                gold,
            )
        )
        await watch.idle()
        erp_value = await watch.erp.fetchval(
            "SELECT attributes::text FROM customer WHERE customer_code = 'C-1001'"
        )
        mirror_value = await watch.replica.fetchval(
            "SELECT attributes::text FROM erp.customer WHERE customer_code = 'C-1001'"
        )
        unified_value = await watch.replica.fetchval(
            "SELECT attributes::text FROM unified.customer WHERE erp_key = 'C-1001'"
        )
        sf_after_gold = watch.sf_writes()[sf_mark:]
        erp_after_gold = (await watch.engine_erp_updates())[erp_mark:]

        # the ERP merges a key into the document
        sf_mark, erp_mark = len(watch.sf_writes()), len(await watch.erp_updates())
        await watch.erp.execute(
            'UPDATE customer SET attributes = attributes || \'{"tier":"platinum"}\' '
            "WHERE customer_code = 'C-1001'"
        )
        await until(lambda: _attributes_are(org, {"tier": "platinum"}))
        await watch.idle()
        sf_after_merge = watch.sf_writes()[sf_mark:]
        erp_after_merge = (await watch.engine_erp_updates())[erp_mark:]

    assert erp_value == '{"tier": "gold", "regions": ["EU", "US"]}'
    assert mirror_value == erp_value
    assert json.loads(unified_value) == json.loads(gold)
    assert sf_after_gold == []  # above all, no Attributes__c in normal form
    assert erp_after_gold == [{"attributes"}]  # one engine UPDATE of the row
    assert len(sf_after_merge) == 1, sf_after_merge
    assert set(sf_after_merge[0]) == {"Attributes__c"}
    assert json.loads(sf_after_merge[0]["Attributes__c"]) == {
        "tier": "platinum",
        "regions": ["EU", "US"],
    }
    assert erp_after_merge == []  # nothing came back to the ERP


async def _attributes_are(org: Org, expected: dict[str, Any]) -> bool:
    account = await account_of(org)
    text = account and account["Attributes__c"]
    if not isinstance(text, str):
        return False
    with contextlib.suppress(ValueError):
        value = json.loads(text)
        return isinstance(value, dict) and expected.items() <= value.items()
    return False


async def test_bug_40_write_back_to_the_erp_does_not_come_back(
    erp_case: ErpCase, serve_emulator: ServeEmulator, f0_config: EmulatorConfig
) -> None:
    """BUG-40: the engine's UPDATE of the ERP is decoded like any other; tagged
    with our origin, it must not go back to Salesforce, while a user's edit two
    seconds later on the same row must."""
    async with b0_synced(erp_case, serve_emulator, f0_config) as (watch, org, sf_id):
        sf_mark, erp_mark = len(watch.sf_writes()), len(await watch.erp_updates())

        await org.update("Account", sf_id, Industry="Robotics")
        await asyncio.sleep(2)
        await watch.erp.execute(
            "UPDATE customer SET name = 'Acme Tools Intl' "
            "WHERE customer_code = 'C-1001'"
        )
        await until(lambda: _named(org, "Acme Tools Intl"))
        await until(
            lambda: watch.erp.fetchval(
                "SELECT industry = 'Robotics' FROM customer "
                "WHERE customer_code = 'C-1001'"
            )
        )
        await watch.idle()

        erp_row = await watch.erp.fetchrow(
            "SELECT name, industry FROM customer WHERE customer_code = 'C-1001'"
        )
        mirror_row = await watch.replica.fetchrow(
            "SELECT name, industry FROM erp.customer WHERE customer_code = 'C-1001'"
        )
        unified_row = await watch.replica.fetchrow(
            "SELECT name, industry FROM unified.customer WHERE erp_key = 'C-1001'"
        )
        account = await account_of(org)
        sf_writes = watch.sf_writes()[sf_mark:]
        engine_updates = (await watch.engine_erp_updates())[erp_mark:]

    assert tuple(erp_row) == ("Acme Tools Intl", "Robotics")
    assert tuple(mirror_row) == ("Acme Tools Intl", "Robotics")
    assert tuple(unified_row) == ("Acme Tools Intl", "Robotics")
    assert account is not None
    assert (account["Name"], account["Industry"]) == ("Acme Tools Intl", "Robotics")
    assert engine_updates == [{"industry"}]  # one engine UPDATE, setting industry
    assert sf_writes == [{"Name": "Acme Tools Intl"}]  # no Industry, no echo


async def _named(org: Org, name: str) -> bool:
    account = await account_of(org)
    return bool(account and account["Name"] == name)
