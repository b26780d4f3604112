"""Change event payloads built from record changes, against the reference shapes.

The expected shapes are the example messages in ``reference/sf-events/``; the
volatile header parts (commit number, transaction key) are compared by form.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from replicator.emulator import cdc
from replicator.emulator.schema import FieldSchema, ObjectSchema, OrgSchema
from replicator.emulator.state import RecordChange

EVENTS_DIR = Path("/work/shared/reference/sf-events")
USER = "005Hs00000Bq7xAIAR"
EDITOR = "005Hs00000Bq9TiIAJ"
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
REST_T0 = "2026-01-02T03:04:05.000+0000"
ADDRESS_PARTS = ("Street", "City", "State", "PostalCode", "Country")


def _address(prefix: str, compound: str) -> list[FieldSchema]:
    parts = [
        FieldSchema(prefix + part, "string", compound_field_name=compound)
        for part in ADDRESS_PARTS
    ]
    return [*parts, FieldSchema(compound, "address", createable=False)]


def _system() -> list[FieldSchema]:
    return [
        FieldSchema("Id", "id"),
        FieldSchema("OwnerId", "reference"),
        FieldSchema("IsDeleted", "boolean"),
        FieldSchema("CreatedDate", "datetime"),
        FieldSchema("CreatedById", "reference"),
        FieldSchema("LastModifiedDate", "datetime"),
        FieldSchema("LastModifiedById", "reference"),
        FieldSchema("SystemModstamp", "datetime"),
    ]


def _object(name: str, prefix: str, fields: list[FieldSchema]) -> ObjectSchema:
    obj = ObjectSchema(name, prefix, custom=name.endswith("__c"))
    obj.fields = {f.name: f for f in [*_system(), *fields]}
    return obj


def _name_parts() -> list[FieldSchema]:
    return [
        FieldSchema("Salutation", "picklist", compound_field_name="Name"),
        FieldSchema("FirstName", "string", compound_field_name="Name"),
        FieldSchema("LastName", "string", compound_field_name="Name"),
        FieldSchema("Name", "string", createable=False),
    ]


@pytest.fixture(scope="module")
def org() -> OrgSchema:
    account = _object(
        "Account",
        "001",
        [
            FieldSchema("Name", "string"),
            FieldSchema("Type", "picklist"),
            *_address("Billing", "BillingAddress"),
            FieldSchema("Phone", "phone"),
            FieldSchema("Description", "textarea", length=32000),
            FieldSchema("CleanStatus", "picklist"),
            FieldSchema("Score__c", "double", calculated=True),
            FieldSchema("AnnualRevenue", "currency"),
        ],
    )
    contact = _object(
        "Contact",
        "003",
        [
            *_name_parts(),
            FieldSchema("AccountId", "reference"),
            FieldSchema("Title", "string"),
            FieldSchema("Phone", "phone"),
            FieldSchema("Email", "email"),
        ],
    )
    lead = _object(
        "Lead",
        "00Q",
        [*_name_parts(), FieldSchema("Company", "string"), *_address("", "Address")],
    )
    custom = _object(
        "Distributor__c",
        "a02",
        [
            FieldSchema("Name", "string"),
            FieldSchema("Loc__Latitude__s", "double", compound_field_name="Loc__c"),
            FieldSchema("Loc__Longitude__s", "double", compound_field_name="Loc__c"),
            FieldSchema("Loc__c", "location"),
        ],
    )
    hidden = _object("Task", "00T", [FieldSchema("Subject", "string")])
    hidden.cdc_enabled = False
    return OrgSchema({o.name: o for o in (account, contact, lead, custom, hidden)})


def _record(record_id: str, **values: Any) -> dict[str, Any]:
    base = {
        "Id": record_id,
        "OwnerId": USER,
        "IsDeleted": False,
        "CreatedDate": REST_T0,
        "CreatedById": USER,
        "LastModifiedDate": REST_T0,
        "LastModifiedById": USER,
        "SystemModstamp": REST_T0,
    }
    return base | values


def _change(
    change_type: str,
    record_id: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    object_name: str = "Account",
) -> RecordChange:
    return RecordChange(object_name, record_id, change_type, before, after, T0)


def _build(
    org: OrgSchema, changes: list[RecordChange], **kwargs: Any
) -> list[dict[str, Any]]:
    options = cdc.BuildOptions(api_version="62.0", **kwargs)
    events = cdc.build_events(
        changes,
        org,
        origin=kwargs.pop("origin", "acme-sync"),
        user_id=USER,
        commit_number=11640258965714,
        options=options,
    )
    return [event.payload for event in events]


def _example(name: str) -> dict[str, Any]:
    return json.loads((EVENTS_DIR / name).read_text())["data"]["payload"]


def _header_shape(header: dict[str, Any]) -> dict[str, type]:
    return {key: type(value) for key, value in header.items()}


def test_create_has_non_null_fields_nested_address_and_header_like_reference(
    org: OrgSchema,
) -> None:
    after = _record(
        "001Hs00001QmTvWIAV",
        Name="Northwind Example Traders",
        Type="Customer - Direct",
        Phone="(555) 010-0100",
        CleanStatus="Pending",
        BillingStreet="100 Example Way",
        BillingCity="Springfield",
        BillingState="OR",
        BillingPostalCode="97477",
        BillingCountry="United States",
        Description=None,
        Score__c=3.0,
    )

    (payload,) = _build(org, [_change("CREATE", after["Id"], None, after)])

    expected = _example("create-account.json")
    header = payload.pop("ChangeEventHeader")
    expected_header = expected.pop("ChangeEventHeader")
    assert payload == expected
    assert _header_shape(header) == _header_shape(expected_header)
    assert header["changeOrigin"] == "com/salesforce/api/rest/62.0;client=acme-sync"
    assert header["commitTimestamp"] == 1767323045000
    assert header["changedFields"] == []
    assert header["recordIds"] == ["001Hs00001QmTvWIAV"]
    assert re.fullmatch(
        r"[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}", header["transactionKey"]
    )


def test_update_of_address_components_lists_dotted_names_and_last_modified(
    org: OrgSchema,
) -> None:
    before = _record(
        "001Hs00001QmTvWIAV",
        Name="N",
        BillingStreet="100 Example Way",
        BillingCity="Springfield",
        BillingState="OR",
    )
    after = before | {
        "BillingStreet": "200 Sample Avenue, Suite 4",
        "BillingCity": "Eugene",
        "LastModifiedDate": "2026-01-02T05:01:30.000+0000",
        "SystemModstamp": "2026-01-02T05:01:30.000+0000",
    }

    (payload,) = _build(org, [_change("UPDATE", after["Id"], before, after)])

    expected = _example("update-account-billingaddress.json")
    header = payload.pop("ChangeEventHeader")
    assert payload == {k: v for k, v in expected.items() if k != "ChangeEventHeader"}
    assert header["changedFields"] == expected["ChangeEventHeader"]["changedFields"]
    assert header["changeType"] == "UPDATE"


def test_update_to_null_sends_explicit_null_and_no_nulled_fields_header(
    org: OrgSchema,
) -> None:
    before = _record(
        "003Hs00000ZkLp2IAF", LastName="Doe", Title="Buyer", Phone="555-0100"
    )
    after = before | {
        "Title": "VP Operations",
        "Phone": None,
        "LastModifiedDate": "2026-01-02T03:10:41.000+0000",
        "LastModifiedById": EDITOR,
    }

    (payload,) = _build(org, [_change("UPDATE", after["Id"], before, after, "Contact")])

    expected = _example("update-contact-nulled.json")
    header = payload.pop("ChangeEventHeader")
    assert payload == {k: v for k, v in expected.items() if k != "ChangeEventHeader"}
    assert header["changedFields"] == expected["ChangeEventHeader"]["changedFields"]
    assert "nulledFields" not in header
    assert "diffFields" not in header


def test_update_of_long_text_sends_diff_with_hash_of_new_value(org: OrgSchema) -> None:
    old = "".join(
        f"Line {n} of the account notes, padded for length.\n" for n in range(40)
    )
    new = old.replace("Line 3 of", "Line three of")
    before = _record("001Hs00001QmTvWIAV", Name="N", Description=old)
    after = before | {"Description": new}

    (payload,) = _build(org, [_change("UPDATE", after["Id"], before, after)])

    diff = payload["Description"]["diff"]
    digest = hashlib.sha256(new.encode()).hexdigest()
    assert diff.startswith(f"--- \n+++ {digest}\n@@ -4 +4 @@\n")
    assert "-Line 3 of" in diff
    assert "+Line three of" in diff
    assert payload["ChangeEventHeader"]["changedFields"] == [
        "Description",
        "LastModifiedDate",
    ]
    assert set(_example("update-description-diff.json")["Description"]) == {"diff"}


def test_short_text_change_is_sent_whole(org: OrgSchema) -> None:
    before = _record("001Hs00001QmTvWIAV", Name="N", Description="short")
    after = before | {"Description": "still short"}

    (payload,) = _build(org, [_change("UPDATE", after["Id"], before, after)])

    assert payload["Description"] == "still short"


def test_delete_of_two_records_in_one_transaction_is_one_event(org: OrgSchema) -> None:
    first = _record("001Hs00001QmTvXIAV", Name="A")
    second = _record("001Hs00001QmU0cIAF", Name="B")

    payloads = _build(
        org,
        [
            _change("DELETE", first["Id"], first, None),
            _change("DELETE", second["Id"], second, None),
        ],
    )

    expected = _example("delete-accounts-merged.json")
    assert len(payloads) == 1
    assert set(payloads[0]) == set(expected) == {"ChangeEventHeader"}
    assert payloads[0]["ChangeEventHeader"]["recordIds"] == [first["Id"], second["Id"]]
    assert payloads[0]["ChangeEventHeader"]["changeType"] == "DELETE"


def test_same_values_set_on_several_records_share_one_event(org: OrgSchema) -> None:
    """A composite update that sets the same values on three records."""
    changes = []
    for record_id in ("001Hs00001QmTvWIAV", "001Hs00001QmTvXIAV", "001Hs00001QmU0cIAF"):
        before = _record(record_id, Name=record_id, Type="Prospect")
        changes.append(
            _change("UPDATE", record_id, before, before | {"Type": "Customer"})
        )
    different = _record("001Hs00001QmV3bIAF", Name="x", Type="Other")
    changes.append(
        _change("UPDATE", different["Id"], different, different | {"Type": "Partner"})
    )

    payloads = _build(org, changes)

    assert [len(p["ChangeEventHeader"]["recordIds"]) for p in payloads] == [3, 1]
    assert [p["ChangeEventHeader"]["sequenceNumber"] for p in payloads] == [1, 2]


def test_undelete_carries_all_fields_with_nested_name(org: OrgSchema) -> None:
    record = _record(
        "00QHs00000d3RfKMAU",
        Salutation="Ms.",
        FirstName="Riley",
        LastName="Sample",
        Name="Riley Sample",
        Company="Example Widgets Ltd",
        Street=None,
    )

    (payload,) = _build(
        org,
        [
            _change(
                "UNDELETE", record["Id"], record | {"IsDeleted": True}, record, "Lead"
            )
        ],
    )

    assert payload["Name"] == {
        "Salutation": "Ms.",
        "FirstName": "Riley",
        "LastName": "Sample",
    }
    assert payload["Company"] == "Example Widgets Ltd"
    assert "Address" not in payload
    assert payload["ChangeEventHeader"]["changeType"] == "UNDELETE"
    assert _header_shape(payload["ChangeEventHeader"]) == _header_shape(
        _example("undelete-lead.json")["ChangeEventHeader"]
    )


def test_system_and_formula_fields_never_in_body(org: OrgSchema) -> None:
    before = _record("001Hs00001QmTvWIAV", Name="A", Score__c=1.0)
    after = before | {
        "Name": "B",
        "Score__c": 2.0,
        "SystemModstamp": "2026-01-02T03:04:06.000+0000",
        "IsDeleted": False,
    }

    created, updated = _build(
        org,
        [
            _change(
                "CREATE",
                "001Hs00001QmTvXIAV",
                None,
                _record("001Hs00001QmTvXIAV", Name="C", Score__c=9.0),
            ),
            _change("UPDATE", after["Id"], before, after),
        ],
    )

    for payload in (created, updated):
        assert not {"IsDeleted", "SystemModstamp", "Score__c", "Id"} & set(payload)
    assert updated["ChangeEventHeader"]["changedFields"] == ["Name", "LastModifiedDate"]


def test_datetimes_use_z_and_milliseconds(org: OrgSchema) -> None:
    after = _record("001Hs00001QmTvWIAV", Name="A")

    (payload,) = _build(org, [_change("CREATE", after["Id"], None, after)])

    assert payload["CreatedDate"] == "2026-01-02T03:04:05.000Z"


def test_gap_events_carry_header_only_with_empty_origin(org: OrgSchema) -> None:
    before = _record("001Hs00001QmTvWIAV", Name="A")
    after = before | {"Name": "B"}
    gapped = {"001Hs00001QmTvWIAV"}

    (payload,) = _build(
        org,
        [_change("UPDATE", after["Id"], before, after)],
        gap=lambda obj, rid: rid in gapped,
    )

    expected = _example("gap-update-event.json")["ChangeEventHeader"]
    header = payload.pop("ChangeEventHeader")
    assert payload == {}
    assert header["changeType"] == "GAP_UPDATE"
    assert header["changeOrigin"] == ""
    assert header["changedFields"] == []
    assert header["sequenceNumber"] == 1
    assert header["transactionKey"].startswith("0Mc")
    assert len(header["transactionKey"]) == len(expected["transactionKey"])


def test_event_over_size_limit_becomes_gap(org: OrgSchema) -> None:
    after = _record("001Hs00001QmTvWIAV", Name="A" * 2000)

    (payload,) = _build(
        org, [_change("CREATE", after["Id"], None, after)], max_event_bytes=1000
    )

    assert payload["ChangeEventHeader"]["changeType"] == "GAP_CREATE"
    assert set(payload) == {"ChangeEventHeader"}


def test_transaction_over_threshold_ends_with_one_overflow_per_object(
    org: OrgSchema,
) -> None:
    changes = [
        _change(
            "CREATE",
            f"001Hs00001QmTv{n}IAV",
            None,
            _record(f"001Hs00001QmTv{n}IAV", Name=str(n)),
        )
        for n in range(5)
    ]
    changes += [
        _change(
            "CREATE",
            f"003Hs00000ZkLp{n}IAF",
            None,
            _record(f"003Hs00000ZkLp{n}IAF", LastName="x"),
            "Contact",
        )
        for n in range(3)
    ]

    payloads = _build(org, changes, overflow_threshold=4)

    headers = [p["ChangeEventHeader"] for p in payloads]
    assert [h["changeType"] for h in headers] == ["CREATE"] * 4 + ["GAP_OVERFLOW"] * 2
    assert [h["entityName"] for h in headers[4:]] == ["Account", "Contact"]
    assert headers[4]["recordIds"] == [cdc.OVERFLOW_RECORD_ID]
    assert [h["sequenceNumber"] for h in headers] == [1, 2, 3, 4, 5, 6]
    assert set(payloads[5]) == {"ChangeEventHeader"}


def test_update_counts_each_changed_field_toward_overflow(org: OrgSchema) -> None:
    before = _record("001Hs00001QmTvWIAV", Name="A", Phone="1", Type="x")
    after = before | {"Name": "B", "Phone": "2", "Type": "y"}
    other = _record("001Hs00001QmTvXIAV", Name="C")

    payloads = _build(
        org,
        [
            _change("UPDATE", after["Id"], before, after),
            _change("UPDATE", other["Id"], other, other | {"Name": "D"}),
        ],
        overflow_threshold=3,
    )

    assert [p["ChangeEventHeader"]["changeType"] for p in payloads] == [
        "UPDATE",
        "GAP_OVERFLOW",
    ]


def test_two_writes_to_one_record_collapse_into_first_type_with_final_values(
    org: OrgSchema,
) -> None:
    """An automation's change in the same transaction joins the API write's event."""
    created = _record("001Hs00001QmTvWIAV", Name="A")
    flowed = created | {"Type": "Customer"}

    (payload,) = _build(
        org,
        [
            _change("CREATE", created["Id"], None, created),
            _change("UPDATE", created["Id"], created, flowed),
        ],
    )

    assert payload["ChangeEventHeader"]["changeType"] == "CREATE"
    assert payload["Type"] == "Customer"


def test_objects_without_cdc_produce_no_events(org: OrgSchema) -> None:
    task = _record("00THs00000abcdeIAA", Subject="Call")

    assert _build(org, [_change("CREATE", task["Id"], None, task, "Task")]) == []


def test_custom_object_channel_and_geolocation_compound(org: OrgSchema) -> None:
    record = _record(
        "a02Hs0000179WYrIAM", Name="D", Loc__Latitude__s=1.5, Loc__Longitude__s=2.5
    )

    (payload,) = _build(
        org, [_change("CREATE", record["Id"], None, record, "Distributor__c")]
    )

    assert cdc.channel_for("Distributor__c") == "/data/Distributor__ChangeEvent"
    assert cdc.channel_for("Account") == "/data/AccountChangeEvent"
    assert payload["Loc__c"] == {"Latitude": 1.5, "Longitude": 2.5}
    assert payload["ChangeEventHeader"]["entityName"] == "Distributor__c"


def test_origin_without_client_and_schema_id_shape(org: OrgSchema) -> None:
    account = org.get("Account")
    assert account is not None

    assert cdc.change_origin("62.0", None) == "com/salesforce/api/rest/62.0"
    assert cdc.change_origin("60.0", "ERPSync") == (
        "com/salesforce/api/rest/60.0;client=ERPSync"
    )
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cdc.schema_id(account))
