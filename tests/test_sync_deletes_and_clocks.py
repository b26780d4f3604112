"""Deletes per policy and a skewed Salesforce clock, end to end with both systems."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import asyncpg
import pytest

from replicator.config import Settings, parse
from replicator.emulator.app import EmulatorConfig
from tests.fixtures.emulator import Served
from tests.fixtures.pg import ErpCase
from tests.test_sf_source import Org, org_client
from tests.test_sync import (  # _sf_secrets: the org's secrets in the environment
    CUSTOMER_DDL,
    _sf_secrets,  # noqa: F401
    account_by_code,
    sync_settings,
    syncing,
    until,
)

pytestmark = pytest.mark.integration


def settings_with(case: ErpCase, served: Served, **entity: Any) -> Settings:
    data = sync_settings(case, served).model_dump(by_alias=True)
    data["sync"].update(entity.pop("sync", {}))
    data["entities"][0].update(entity)
    return parse(data)


async def _created(erp: asyncpg.Connection, org: Org, code: str) -> dict[str, Any]:
    await erp.execute(
        "INSERT INTO customer VALUES ($1, $2, '555-0100', 'Keene', 'New Hampshire')",
        code,
        f"Customer {code}",
    )
    created: dict[str, Any] = await until(lambda: account_by_code(org, code))
    return created


async def test_erp_delete_propagates_and_salesforce_delete_only_marks(
    erp_case: ErpCase, serve_emulator: Any, f0_config: EmulatorConfig
) -> None:
    """propagate: the ERP's delete removes the account; mark: Salesforce's delete
    flags the unified row and leaves the ERP row (the ERP owns existence)."""
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(CUSTOMER_DDL)
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        settings = settings_with(
            erp_case, served, delete_policy="propagate", owner="erp"
        )
        async with syncing(settings):
            gone = await _created(erp, org, "C-21")
            kept = await _created(erp, org, "C-22")
            await erp.execute("DELETE FROM customer WHERE customer_code = 'C-21'")
            await until(lambda: _absent(org, "C-21"))
            await org.delete("Account", kept["Id"])
            replica = await asyncpg.connect(erp_case.replica_dsn)
            marked = await until(
                lambda: replica.fetchrow(
                    "SELECT deleted_by FROM unified.customer "
                    "WHERE erp_key = 'C-22' AND deleted_at IS NOT NULL"
                )
            )
            deletes = await replica.fetch(
                "SELECT target, target_key FROM replicator.outbox "
                "WHERE operation = 'delete'"
            )
            await replica.close()
            erp_row = await erp.fetchval(
                "SELECT name FROM customer WHERE customer_code = 'C-22'"
            )
    await erp.close()

    assert await _queried_all(served, gone["Id"]) is True  # in the recycle bin
    assert marked["deleted_by"] == "salesforce"
    assert erp_row == "Customer C-22"  # never deleted from the ERP
    assert [(d["target"], d["target_key"]) for d in deletes] == [
        ("salesforce", gone["Id"])
    ]


async def _absent(org: Org, code: str) -> bool:
    return await account_by_code(org, code) is None


async def _queried_all(served: Served, record_id: str) -> Any:
    record = served.state.get(record_id, include_deleted=True)
    return record.get("IsDeleted") if record else None


async def test_skewed_salesforce_clock_decides_by_the_documented_rule(
    erp_case: ErpCase, serve_emulator: Any, f0_config: EmulatorConfig
) -> None:
    """Salesforce's clock runs 3 s behind; the tie window is 1 s.

    Edits further apart than skew + window keep their true order (the later
    Salesforce edit wins); closer ones are decided by the stamped times, here
    against the true order (the ERP edit stamped later wins), and the loser
    is logged and overwritten on its own side.
    """
    erp = await asyncpg.connect(erp_case.erp_dsn)
    await erp.execute(CUSTOMER_DDL)
    async with serve_emulator(f0_config) as served, org_client(served) as org:
        skew = dt.timedelta(seconds=3)
        served.state._clock = lambda: dt.datetime.now(dt.UTC) - skew
        settings = settings_with(erp_case, served, sync={"tie_window_seconds": 1})
        async with syncing(settings):
            far = await _created(erp, org, "C-31")
            near = await _created(erp, org, "C-32")
            await erp.execute(
                "UPDATE customer SET phone = '555-1111' WHERE customer_code = 'C-31'"
            )
            await erp.execute(
                "UPDATE customer SET phone = '555-3333' WHERE customer_code = 'C-32'"
            )
            await asyncio.sleep(2.0)  # closer than skew + window
            await org.update("Account", near["Id"], Phone="555-4444")
            await asyncio.sleep(2.7)  # 4.7 s after the ERP edit of C-31
            await org.update("Account", far["Id"], Phone="555-2222")
            far_erp = await until(lambda: _erp_phone(erp, "C-31", "555-2222"))
            near_sf = await until(lambda: _sf_phone(org, "C-32", "555-3333"))
            replica = await asyncpg.connect(erp_case.replica_dsn)
            logged = await until(
                lambda: replica.fetch(
                    "SELECT entity_key, discarded_value, discarded_source, "
                    "kept_value FROM replicator.conflicts WHERE field = 'phone' "
                    "AND discarded_value IN ('555-1111', '555-4444') "
                    "ORDER BY discarded_value"
                )
            )
            unified = await replica.fetch(
                "SELECT erp_key, phone FROM unified.customer "
                "WHERE erp_key IN ('C-31', 'C-32') ORDER BY erp_key"
            )
            await replica.close()
            near_erp = await erp.fetchval(
                "SELECT phone FROM customer WHERE customer_code = 'C-32'"
            )
    await erp.close()

    assert far_erp and near_sf
    assert near_erp == "555-3333"
    assert [tuple(r) for r in unified] == [("C-31", "555-2222"), ("C-32", "555-3333")]
    assert [
        (r["discarded_value"], r["discarded_source"], r["kept_value"]) for r in logged
    ] == [("555-1111", "erp", "555-2222"), ("555-4444", "salesforce", "555-3333")]


async def _erp_phone(erp: asyncpg.Connection, code: str, phone: str) -> bool:
    found = await erp.fetchval(
        "SELECT phone FROM customer WHERE customer_code = $1", code
    )
    return bool(found == phone)


async def _sf_phone(org: Org, code: str, phone: str) -> bool:
    record = await account_by_code(org, code)
    return record is not None and record["Phone"] == phone
