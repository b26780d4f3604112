"""The org state: validation errors, transactions, listeners, automations, SQLite."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from replicator.emulator.metadata import load_metadata
from replicator.emulator.schema import FieldSchema
from replicator.emulator.seed import ensure_user
from replicator.emulator.standard import standard_schema
from replicator.emulator.state import ApiError, OrgState, RecordChange
from replicator.emulator.values import coerce_value, format_datetime, parse_datetime


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[list[RecordChange], str | None, str]] = []

    def on_transaction(
        self, changes: list[RecordChange], *, origin: str | None, user_id: str
    ) -> None:
        self.calls.append((changes, origin, user_id))


def _state(account_metadata_dir: Path, data_dir: Path | None = None) -> OrgState:
    schema = standard_schema()
    load_metadata(account_metadata_dir, schema)
    return OrgState(schema, data_dir=data_dir)


@pytest.fixture
def state(account_metadata_dir: Path) -> OrgState:
    return _state(account_metadata_dir)


@pytest.fixture
def user_id(state: OrgState) -> str:
    return ensure_user(state, "admin@example.com")


def _error(state: OrgState, user_id: str, values: Mapping[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as info, state.transaction(user_id=user_id) as tx:
        tx.create("Account", values)
    return info.value


def test_create_sets_system_fields_and_owner(state: OrgState, user_id: str) -> None:
    with state.transaction(user_id=user_id) as tx:
        record_id = tx.create("Account", {"Name": "Acme Tools"})

    record = state.get(record_id)
    assert record is not None
    assert record["IsDeleted"] is False
    assert record["OwnerId"] == record["CreatedById"] == user_id
    assert (
        record["CreatedDate"] == record["LastModifiedDate"] == record["SystemModstamp"]
    )
    assert record["CreatedDate"].endswith("+0000")


@pytest.mark.parametrize(
    ("values", "code", "message", "fields"),
    [
        ({}, "REQUIRED_FIELD_MISSING", "Required fields are missing: [Name]", ["Name"]),
        (
            {"Name": "x" * 256},
            "STRING_TOO_LONG",
            "Account Name: data value too large: " + "x" * 256 + " (max length=255)",
            ["Name"],
        ),
        (
            {"Name": "A", "Credit_Limit__c": 12345678901},
            "NUMBER_OUTSIDE_VALID_RANGE",
            "Credit Limit: value outside of valid range on numeric field: 12345678901",
            ["Credit_Limit__c"],
        ),
        (
            {"Name": "A", "Nope__c": 1},
            "INVALID_FIELD",
            "No such column 'Nope__c' on sobject of type Account",
            [],
        ),
        (
            {"Name": "A", "CreatedDate": "2024-06-04T12:00:00.000+0000"},
            "INVALID_FIELD_FOR_INSERT_UPDATE",
            "Unable to create/update fields: CreatedDate. Please check the security "
            "settings of this field and verify that it is read/write for your "
            "profile or permission set.",
            ["CreatedDate"],
        ),
        (
            {"Name": "A", "ParentId": "not-an-id"},
            "MALFORMED_ID",
            "Parent Account ID: id value of incorrect type: not-an-id",
            ["ParentId"],
        ),
        (
            {"Name": "A", "BillingGeocodeAccuracy": "Galaxy"},
            "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
            "Billing Geocode Accuracy: bad value for restricted picklist field: Galaxy",
            ["BillingGeocodeAccuracy"],
        ),
        (
            {"Id": "001Dn0000000001IAA", "Name": "A"},
            "INVALID_FIELD",
            "The Id field should not be specified in the sobject data.",
            None,
        ),
    ],
)
def test_create_refuses_bad_values_with_salesforce_errors(
    state: OrgState,
    user_id: str,
    values: dict[str, Any],
    code: str,
    message: str,
    fields: list[str] | None,
) -> None:
    error = _error(state, user_id, values)

    assert error.status == 400
    assert error.body() == (
        {"message": message, "errorCode": code}
        | ({} if fields is None else {"fields": fields})
    )


def test_reference_to_a_record_of_another_type_is_malformed(
    state: OrgState, user_id: str
) -> None:
    error = _error(state, user_id, {"Name": "A", "ParentId": user_id})

    assert error.error_code == "MALFORMED_ID"


def test_unique_external_id_duplicates_are_refused(
    state: OrgState, user_id: str
) -> None:
    with state.transaction(user_id=user_id) as tx:
        first = tx.create("Account", {"Name": "A", "ERP_Customer_Code__c": "C-1001"})

    error = _error(state, user_id, {"Name": "B", "ERP_Customer_Code__c": "c-1001"})

    assert error.error_code == "DUPLICATE_VALUE"
    assert error.message == (
        "duplicate value found: ERP_Customer_Code__c duplicates value on record "
        f"with id: {first}"
    )


def test_failed_transaction_rolls_back_every_write(
    state: OrgState, user_id: str
) -> None:
    recorder = Recorder()
    state.add_listener(recorder)

    with pytest.raises(ApiError), state.transaction(user_id=user_id) as tx:
        tx.create("Account", {"Name": "kept?"})
        tx.create("Account", {})

    assert list(state.records("Account")) == []
    assert recorder.calls == []


def test_listener_gets_one_call_per_transaction_with_flat_values(
    state: OrgState, user_id: str
) -> None:
    recorder = Recorder()
    state.add_listener(recorder)

    with state.transaction(origin="replicator", user_id=user_id) as tx:
        a = tx.create("Account", {"Name": "A", "BillingCity": "Keene"})
        tx.update("Account", a, {"BillingCity": "Nashua"})
        tx.delete("Account", a)

    [(changes, origin, who)] = recorder.calls
    assert (origin, who) == ("replicator", user_id)
    assert [c.change_type for c in changes] == ["CREATE", "UPDATE", "DELETE"]
    create, update, delete = changes
    assert create.before is None and create.after is not None
    assert create.after["BillingCity"] == "Keene"
    assert "BillingAddress" not in create.after
    assert update.before is not None and update.before["BillingCity"] == "Keene"
    assert update.after is not None and update.after["BillingCity"] == "Nashua"
    assert delete.after is None
    assert len({c.commit_time for c in changes}) == 1


def test_undelete_restores_from_the_recycle_bin(state: OrgState, user_id: str) -> None:
    with state.transaction(user_id=user_id) as tx:
        a = tx.create("Account", {"Name": "A"})
    with state.transaction(user_id=user_id) as tx:
        tx.delete(None, a)
    recorder = Recorder()
    state.add_listener(recorder)

    with state.transaction(user_id=user_id) as tx:
        tx.undelete(None, a)

    assert state.get(a) is not None
    [change] = recorder.calls[0][0]
    assert change.change_type == "UNDELETE"
    assert change.before is not None and change.before["IsDeleted"] is True


def test_deleted_record_refuses_update_and_second_delete(
    state: OrgState, user_id: str
) -> None:
    with state.transaction(user_id=user_id) as tx:
        a = tx.create("Account", {"Name": "A"})
        tx.delete(None, a)

    for operation in ("update", "delete"):
        with pytest.raises(ApiError) as info, state.transaction(user_id=user_id) as tx:
            if operation == "update":
                tx.update(None, a, {"Name": "B"})
            else:
                tx.delete(None, a)
        assert info.value.body() == {
            "message": "entity is deleted",
            "errorCode": "ENTITY_IS_DELETED",
            "fields": [],
        }
        assert info.value.status == 404


def test_automation_adds_fields_within_the_same_change(
    state: OrgState, user_id: str
) -> None:
    def stamp_rating(
        change_type: str, before: Mapping[str, Any] | None, after: Mapping[str, Any]
    ) -> Mapping[str, Any] | None:
        return {"Rating": "Hot"} if after.get("Industry") == "Energy" else None

    remove = state.add_automation("Account", stamp_rating)
    recorder = Recorder()
    state.add_listener(recorder)

    with state.transaction(user_id=user_id) as tx:
        a = tx.create("Account", {"Name": "A", "Industry": "Energy"})
    remove()
    with state.transaction(user_id=user_id) as tx:
        b = tx.create("Account", {"Name": "B", "Industry": "Energy"})

    assert state.get(a)["Rating"] == "Hot"  # type: ignore[index]
    assert state.get(b)["Rating"] is None  # type: ignore[index]
    [change] = recorder.calls[0][0]
    assert change.after is not None and change.after["Rating"] == "Hot"


def test_contact_name_is_the_compound_of_its_parts(
    state: OrgState, user_id: str
) -> None:
    with state.transaction(user_id=user_id) as tx:
        c = tx.create("Contact", {"FirstName": "Dana", "LastName": "Whitfield"})

    assert state.get(c)["Name"] == "Dana Whitfield"  # type: ignore[index]


def test_records_survive_a_restart(account_metadata_dir: Path, tmp_path: Path) -> None:
    first = _state(account_metadata_dir, tmp_path / "org")
    user = ensure_user(first, "admin@example.com")
    with first.transaction(user_id=user) as tx:
        a = tx.create("Account", {"Name": "Persisted"})
    first.close()

    second = _state(account_metadata_dir, tmp_path / "org")
    with second.transaction(user_id=user) as tx:
        b = tx.create("Account", {"Name": "Next"})

    assert second.get(a)["Name"] == "Persisted"  # type: ignore[index]
    assert b != a
    assert second.org_id == first.org_id
    second.close()


def test_commit_times_strictly_increase_with_a_frozen_clock(
    account_metadata_dir: Path,
) -> None:
    frozen = datetime(2024, 6, 4, 12, 0, tzinfo=UTC)
    schema = standard_schema()
    state = OrgState(schema, clock=lambda: frozen)
    user = ensure_user(state, "a@example.com")

    with state.transaction(user_id=user) as tx:
        a = tx.create("Account", {"Name": "A"})
    with state.transaction(user_id=user) as tx:
        tx.update(None, a, {"Name": "B"})

    record = state.get(a)
    assert record is not None
    assert record["CreatedDate"] < record["SystemModstamp"]


def test_wire_datetime_format_round_trips() -> None:
    moment = datetime(2024, 6, 4, 12, 0, tzinfo=UTC)

    text = format_datetime(moment)

    assert text == "2024-06-04T12:00:00.000+0000"
    assert parse_datetime(text) == moment
    assert parse_datetime("2024-06-04T12:00:00Z") == moment


@pytest.mark.parametrize(
    ("field", "value", "stored"),
    [
        (FieldSchema("D", "date"), "2024-06-04", "2024-06-04"),
        (
            FieldSchema("T", "datetime"),
            "2024-06-04T14:00:00+02:00",
            "2024-06-04T12:00:00.000+0000",
        ),
        (FieldSchema("B", "boolean"), None, False),
        (FieldSchema("S", "string", length=5), "", None),
        (FieldSchema("N", "currency", precision=6, scale=2), 12.345, 12.35),
        (FieldSchema("I", "int", precision=8), "42", 42),
    ],
)
def test_coerce_value_stores_canonical_forms(
    field: FieldSchema, value: Any, stored: Any
) -> None:
    assert coerce_value(field, value) == stored


def test_non_numeric_value_for_a_number_is_a_parser_error() -> None:
    with pytest.raises(ApiError) as info:
        coerce_value(FieldSchema("N", "double", precision=5), "abc")

    assert info.value.error_code == "JSON_PARSER_ERROR"
