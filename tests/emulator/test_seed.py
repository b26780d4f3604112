"""Seeding from sObject Tree files and data plans, with @references."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from replicator.emulator.app import EmulatorConfig, build_schema
from replicator.emulator.seed import SeedError, ensure_user, load_tree, seed_org
from replicator.emulator.state import OrgState


def _org(config: EmulatorConfig, data_dir: Path | None = None) -> OrgState:
    state = OrgState(build_schema(config), data_dir=data_dir)
    seed_org(state, config)
    return state


def test_ebikes_plan_loads_with_references_resolved() -> None:
    state = _org(EmulatorConfig.ebikes(seed_standard=False))

    accounts = {r["Name"]: r for r in state.records("Account")}
    [case] = list(state.records("Case"))
    items = list(state.records("Order_Item__c"))

    assert accounts["Alpine Treckers"]["BillingState"] == "NY"
    assert case["AccountId"] == accounts["Alpine Treckers"]["Id"]
    assert case["CaseNumber"] == "00001029"
    assert items and all(
        i["Order__c"].startswith(state.schema.objects["Order__c"].key_prefix)
        for i in items
    )
    assert all(state.get(i["Product__c"]) is not None for i in items)


def test_standard_seed_has_us_addresses_with_state_codes() -> None:
    state = _org(EmulatorConfig(seed_standard=True))

    accounts = {r["Name"]: r for r in state.records("Account")}
    [dana] = [c for c in state.records("Contact") if c["LastName"] == "Whitfield"]

    assert accounts["Acme Tools"]["BillingState"] == "NH"
    assert accounts["Acme Tools"]["BillingCountry"] == "US"
    assert dana["AccountId"] == accounts["Acme Tools"]["Id"]
    assert len(list(state.records("PricebookEntry"))) == 2


def test_seed_runs_once_for_a_persisted_org(tmp_path: Path) -> None:
    config = EmulatorConfig.ebikes()
    first = _org(config, tmp_path)
    count = len(list(first.records("Account")))
    first.close()

    second = _org(config, tmp_path)

    assert len(list(second.records("Account"))) == count
    second.close()


def test_unresolved_reference_names_the_file(tmp_path: Path) -> None:
    tree = tmp_path / "Cases.json"
    tree.write_bytes(
        orjson.dumps(
            {
                "records": [
                    {
                        "attributes": {"type": "Case", "referenceId": "C1"},
                        "AccountId": "@Nope",
                    }
                ]
            }
        )
    )
    state = OrgState(build_schema(EmulatorConfig()))
    user = ensure_user(state, "a@example.com")

    with (
        pytest.raises(SeedError, match="unresolved reference '@Nope'"),
        state.transaction(user_id=user) as tx,
    ):
        load_tree(tx, state, tree, {})
