"""The REST API (reference §5), checked with simple-salesforce and raw HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest
import requests
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceError

from replicator.emulator.app import EmulatorConfig
from replicator.emulator.ids import make_id
from replicator.emulator.state import RecordChange
from tests.fixtures.emulator import Served, ServeEmulator

V = "/services/data/v60.0"


class _HttpsToHttp(requests.adapters.HTTPAdapter):
    """simple-salesforce always builds https URLs; the loopback server is http."""

    def send(self, request: requests.PreparedRequest, **kw: Any) -> Any:  # type: ignore[override]
        request.url = (request.url or "").replace("https://", "http://", 1)
        return super().send(request, **kw)


async def _sf(served: Served, **kw: Any) -> Salesforce:
    token = await served.token()
    session = requests.Session()
    session.mount("https://", _HttpsToHttp())
    return Salesforce(
        instance_url=served.url.replace("http://", "https://"),
        session_id=token,
        session=session,
        version="60.0",
        **kw,
    )


@pytest.fixture
async def f0(
    serve_emulator: ServeEmulator, f0_config: EmulatorConfig
) -> AsyncIterator[Served]:
    async with serve_emulator(f0_config) as served:
        yield served


class Api:
    """Raw HTTP calls with a token, returning (status, headers, JSON body)."""

    def __init__(self, served: Served, token: str) -> None:
        self.served = served
        self.token = token

    async def call(
        self, method: str, path: str, body: Any = None, **headers: str
    ) -> tuple[int, Mapping[str, str], Any]:
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                method,
                self.served.url + path,
                json=body,
                headers={"Authorization": f"Bearer {self.token}", **headers},
            ) as response,
        ):
            text = await response.text()
            import orjson

            return (
                response.status,
                response.headers,
                orjson.loads(text) if text else None,
            )


@pytest.fixture
async def api(f0: Served) -> Api:
    return Api(f0, await f0.token())


# -- simple-salesforce ----------------------------------------------------------


async def test_crud_with_simple_salesforce(f0: Served) -> None:
    sf = await _sf(f0)

    def scenario() -> tuple[Any, ...]:
        created = sf.Account.create({"Name": "Acme Tools", "BillingState": "NH"})
        fetched = sf.Account.get(created["id"])
        status = sf.Account.update(created["id"], {"Phone": "555-0100"})
        phone = sf.Account.get(created["id"])["Phone"]
        deleted = sf.Account.delete(created["id"])
        return created, fetched, status, phone, deleted

    created, fetched, status, phone, deleted = await asyncio.to_thread(scenario)

    assert created["success"] is True and created["errors"] == []
    assert fetched["Name"] == "Acme Tools"
    assert fetched["BillingAddress"]["state"] == "NH"
    assert fetched["attributes"]["type"] == "Account"
    assert (status, phone, deleted) == (204, "555-0100", 204)


async def test_upsert_created_then_updated_with_simple_salesforce(f0: Served) -> None:
    sf = await _sf(f0)

    def scenario() -> tuple[Any, Any]:
        first = sf.Account.upsert("ERP_Customer_Code__c/C-1001", {"Name": "Acme"})
        second = sf.Account.upsert("ERP_Customer_Code__c/C-1001", {"Name": "Acme 2"})
        return first, second

    first, second = await asyncio.to_thread(scenario)

    assert first == 201
    assert second == 200
    [record] = [
        r for r in f0.state.records("Account") if r["ERP_Customer_Code__c"] == "C-1001"
    ]
    assert record["Name"] == "Acme 2"


async def test_describe_with_simple_salesforce(f0: Served) -> None:
    sf = await _sf(f0)

    account = await asyncio.to_thread(sf.Account.describe)
    order = await asyncio.to_thread(lambda: sf.Order__c.describe())
    sobjects = await asyncio.to_thread(sf.describe)

    fields = {f["name"]: f for f in account["fields"]}
    assert account["keyPrefix"] == "001"
    assert fields["BillingStreet"]["compoundFieldName"] == "BillingAddress"
    assert fields["BillingAddress"]["type"] == "address"
    assert fields["Description"]["type"] == "textarea"
    assert fields["Description"]["length"] == 32000
    assert fields["ERP_Customer_Code__c"]["externalId"] is True
    assert fields["Id"]["idLookup"] is True
    status = {f["name"]: f for f in order["fields"]}["Status__c"]
    assert status["restrictedPicklist"] is True
    assert [p["value"] for p in status["picklistValues"]][:2] == [
        "Draft",
        "Submitted to Manufacturing",
    ]
    account_ref = {f["name"]: f for f in order["fields"]}["Account__c"]
    assert account_ref["referenceTo"] == ["Account"]
    assert account_ref["relationshipName"] == "Account__r"
    names = {o["name"] for o in sobjects["sobjects"]}
    assert {"Account", "Contact", "Product__c", "Order__c"} <= names
    assert "Manufacturing_Event__e" not in names


async def test_collections_with_simple_salesforce(f0: Served) -> None:
    sf = await _sf(f0)

    def scenario() -> Any:
        return sf.restful(
            "composite/sobjects",
            method="POST",
            json={
                "allOrNone": False,
                "records": [
                    {"attributes": {"type": "Account"}, "Name": "A"},
                    {"attributes": {"type": "Account"}},
                ],
            },
        )

    results = await asyncio.to_thread(scenario)

    assert results[0]["success"] is True and results[0]["id"].startswith("001")
    assert results[1] == {
        "success": False,
        "errors": [
            {
                "statusCode": "REQUIRED_FIELD_MISSING",
                "message": "Required fields are missing: [Name]",
                "fields": ["Name"],
            }
        ],
    }


async def test_simple_salesforce_sees_error_bodies(f0: Served) -> None:
    sf = await _sf(f0)

    with pytest.raises(SalesforceError) as info:
        await asyncio.to_thread(sf.Account.create, {"Name": "x" * 300})

    assert info.value.content[0]["errorCode"] == "STRING_TOO_LONG"


# -- raw HTTP: every error string and status ------------------------------------


async def test_versions_list_needs_no_auth_and_has_no_limit_header(f0: Served) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f0.url + "/services/data/") as response,
    ):
        body = await response.json()
        headers = response.headers

    assert {
        "label": "Spring '24",
        "url": "/services/data/v60.0",
        "version": "60.0",
    } in body
    assert {
        "label": "Winter '24",
        "url": "/services/data/v59.0",
        "version": "59.0",
    } in body
    assert "Sforce-Limit-Info" not in headers


async def test_create_returns_201_and_limit_header(api: Api) -> None:
    status, headers, body = await api.call(
        "POST", f"{V}/sobjects/Account/", {"Name": "A"}
    )

    assert status == 201
    assert body == {"id": body["id"], "success": True, "errors": []}
    assert headers["Sforce-Limit-Info"] == "api-usage=1/100000"
    assert headers["Content-Type"] == "application/json;charset=UTF-8"


async def test_create_with_id_is_invalid_field(api: Api) -> None:
    status, _, body = await api.call(
        "POST", f"{V}/sobjects/Account/", {"Id": "001Dn0000000001IAA", "Name": "A"}
    )

    assert status == 400
    assert body == [
        {
            "message": "The Id field should not be specified in the sobject data.",
            "errorCode": "INVALID_FIELD",
        }
    ]


async def test_retrieve_with_fields_param(api: Api) -> None:
    _, _, created = await api.call(
        "POST", f"{V}/sobjects/Account/", {"Name": "A", "Phone": "1"}
    )

    status, _, body = await api.call(
        "GET", f"{V}/sobjects/Account/{created['id'][:15]}?fields=Name,phone"
    )

    assert status == 200
    assert body == {
        "attributes": {
            "type": "Account",
            "url": f"{V}/sobjects/Account/{created['id']}",
        },
        "Name": "A",
        "Phone": "1",
    }


async def test_deleted_record_errors(api: Api) -> None:
    _, _, created = await api.call("POST", f"{V}/sobjects/Account/", {"Name": "A"})
    path = f"{V}/sobjects/Account/{created['id']}"

    first = await api.call("DELETE", path)
    again = await api.call("DELETE", path)
    patch = await api.call("PATCH", path, {"Name": "B"})
    get = await api.call("GET", path)

    deleted = [
        {"message": "entity is deleted", "errorCode": "ENTITY_IS_DELETED", "fields": []}
    ]
    assert first[0] == 204
    assert (again[0], again[2]) == (404, deleted)
    assert (patch[0], patch[2]) == (404, deleted)
    assert (get[0], get[2]) == (
        404,
        [
            {
                "message": "The requested resource does not exist",
                "errorCode": "NOT_FOUND",
            }
        ],
    )


async def test_unknown_id_bogus_segment_and_unknown_object(api: Api) -> None:
    unknown = await api.call("GET", f"{V}/sobjects/Account/{make_id('001', 99999)}")
    bogus = await api.call("GET", f"{V}/sobjects/Account/BOGUS")
    widget = await api.call("GET", f"{V}/sobjects/Widget/describe")

    not_found = [
        {"message": "The requested resource does not exist", "errorCode": "NOT_FOUND"}
    ]
    assert (unknown[0], unknown[2]) == (404, not_found)
    assert (bogus[0], bogus[2]) == (
        404,
        [
            {
                "message": "Provided external ID field does not exist or is not "
                "accessible: BOGUS",
                "errorCode": "NOT_FOUND",
            }
        ],
    )
    assert (widget[0], widget[2]) == (404, not_found)


async def test_read_only_field_and_required_field_errors(api: Api) -> None:
    read_only = await api.call(
        "POST", f"{V}/sobjects/Account/", {"Name": "A", "IsDeleted": True}
    )
    required = await api.call("POST", f"{V}/sobjects/Contact/", {"FirstName": "A"})
    picklist = await api.call(
        "POST",
        f"{V}/sobjects/Opportunity/",
        {"Name": "O", "StageName": "Maybe", "CloseDate": "2026-08-31"},
    )

    assert read_only[0] == 400
    assert read_only[2][0]["errorCode"] == "INVALID_FIELD_FOR_INSERT_UPDATE"
    assert read_only[2][0]["fields"] == ["IsDeleted"]
    assert (required[0], required[2]) == (
        400,
        [
            {
                "message": "Required fields are missing: [LastName]",
                "errorCode": "REQUIRED_FIELD_MISSING",
                "fields": ["LastName"],
            }
        ],
    )
    assert picklist[2] == [
        {
            "message": "Stage: bad value for restricted picklist field: Maybe",
            "errorCode": "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
            "fields": ["StageName"],
        }
    ]


async def test_upsert_statuses(api: Api) -> None:
    path = f"{V}/sobjects/Account/ERP_Customer_Code__c/C-1001"

    created = await api.call("PATCH", path, {"Name": "Acme"})
    updated = await api.call("PATCH", path, {"Name": "Acme Tools"})
    old_api = await api.call(
        "PATCH", path.replace("v60.0", "v45.0"), {"Name": "Acme Tools Inc"}
    )
    bad_field = await api.call(
        "PATCH", f"{V}/sobjects/Account/Nope__c/1", {"Name": "A"}
    )

    assert created[0] == 201
    assert created[2] == {
        "id": created[2]["id"],
        "success": True,
        "errors": [],
        "created": True,
    }
    assert updated[0] == 200
    assert updated[2] == {
        "id": created[2]["id"],
        "success": True,
        "errors": [],
        "created": False,
    }
    assert (old_api[0], old_api[2]) == (204, None)
    assert bad_field[0] == 404
    assert bad_field[2][0]["errorCode"] == "NOT_FOUND"


async def test_upsert_with_several_matches_is_300(api: Api) -> None:
    for name in ("A", "B"):
        await api.call(
            "POST", f"{V}/sobjects/Account/", {"Name": name, "Legacy_Code__c": "L-1"}
        )

    status, _, body = await api.call(
        "PATCH", f"{V}/sobjects/Account/Legacy_Code__c/L-1", {"Name": "C"}
    )

    assert status == 300
    assert len(body) == 2
    assert all(url.startswith(f"{V}/sobjects/Account/001") for url in body)


async def test_collections_all_or_none_rolls_back(api: Api) -> None:
    status, _, body = await api.call(
        "POST",
        f"{V}/composite/sobjects",
        {
            "allOrNone": True,
            "records": [
                {"attributes": {"type": "Account"}, "Name": "ok"},
                {"attributes": {"type": "Account"}, "Name": "x" * 300},
            ],
        },
    )

    assert status == 200
    assert body[0] == {
        "id": None,
        "success": False,
        "errors": [
            {
                "statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
                "message": "Record rolled back because not all records were valid "
                "and the request was using AllOrNone header",
                "fields": [],
            }
        ],
    }
    assert body[1]["errors"][0]["statusCode"] == "STRING_TOO_LONG"
    assert not [r for r in api.served.state.records("Account") if r["Name"] == "ok"]


async def test_collections_update_delete_and_retrieve(api: Api) -> None:
    _, _, a = await api.call("POST", f"{V}/sobjects/Account/", {"Name": "A"})
    _, _, b = await api.call("POST", f"{V}/sobjects/Account/", {"Name": "B"})

    patched = await api.call(
        "PATCH",
        f"{V}/composite/sobjects",
        {
            "records": [
                {"attributes": {"type": "Account"}, "id": a["id"], "Phone": "1"},
                {"attributes": {"type": "Account"}, "id": b["id"], "Nope__c": 1},
            ]
        },
    )
    fetched = await api.call(
        "GET", f"{V}/composite/sobjects/Account?ids={a['id']},{b['id']}&fields=Phone"
    )
    malformed = await api.call(
        "GET", f"{V}/composite/sobjects/Account?ids=bad&fields=Phone"
    )
    deleted = await api.call(
        "DELETE", f"{V}/composite/sobjects?ids={a['id']},{a['id']}"
    )

    assert patched[0] == 200
    assert patched[2][0] == {"id": a["id"], "success": True, "errors": []}
    assert patched[2][1]["id"] == b["id"]
    assert patched[2][1]["errors"][0]["statusCode"] == "INVALID_FIELD"
    assert [r["Phone"] for r in fetched[2]] == ["1", None]
    assert (malformed[0], malformed[2]) == (
        400,
        [{"message": "malformed id bad", "errorCode": "MALFORMED_ID"}],
    )
    assert deleted[2][0]["success"] is True
    assert deleted[2][1]["errors"][0]["statusCode"] == "ENTITY_IS_DELETED"


async def test_collections_refuse_more_than_200_records(api: Api) -> None:
    records = [{"attributes": {"type": "Account"}, "Name": str(i)} for i in range(201)]

    status, _, body = await api.call(
        "POST", f"{V}/composite/sobjects", {"records": records}
    )

    assert status == 400
    assert body[0]["errorCode"] == "EXCEEDED_ID_LIMIT"


async def test_collection_upsert_reports_created(api: Api) -> None:
    records = [
        {"attributes": {"type": "Account"}, "ERP_Customer_Code__c": "C-1", "Name": "A"}
    ]
    path = f"{V}/composite/sobjects/Account/ERP_Customer_Code__c"

    first = await api.call("PATCH", path, {"records": records})
    second = await api.call("PATCH", path, {"records": records})

    assert first[2][0]["created"] is True
    assert second[2][0]["created"] is False
    assert second[2][0]["id"] == first[2][0]["id"]


async def test_daily_limit_runs_out_with_403(serve_emulator: ServeEmulator) -> None:
    async with serve_emulator(EmulatorConfig.ebikes(daily_api_limit=2)) as served:
        api = Api(served, await served.token())

        limits = await api.call("GET", f"{V}/limits")
        second = await api.call("GET", f"{V}/limits")
        third = await api.call("GET", f"{V}/limits")

    assert limits[2]["DailyApiRequests"] == {"Max": 2, "Remaining": 1}
    assert second[1]["Sforce-Limit-Info"] == "api-usage=2/2"
    assert (third[0], third[2]) == (
        403,
        [
            {
                "message": "TotalRequests Limit exceeded.",
                "errorCode": "REQUEST_LIMIT_EXCEEDED",
            }
        ],
    )


async def test_planned_faults_and_request_log(api: Api) -> None:
    """The field-failure cases count PATCHes received; faults fail the next N."""
    _, _, a = await api.call("POST", f"{V}/sobjects/Account/", {"Name": "A"})
    path = f"{V}/sobjects/Account/{a['id']}"
    async with aiohttp.ClientSession() as http:
        await http.post(
            api.served.url + "/__emulator__/faults/rest",
            json={"error": "UNABLE_TO_LOCK_ROW", "count": 1, "method": "PATCH"},
        )

    locked = await api.call("PATCH", path, {"Phone": "1"})
    ok = await api.call("PATCH", path, {"Phone": "2"})
    api.served.faults.fail_next(1, "SERVICE_UNAVAILABLE")
    unavailable = await api.call("GET", path)

    assert (locked[0], locked[2]) == (
        400,
        [
            {
                "message": "unable to obtain exclusive access to this record or 1 records: "
                f"{a['id']}",
                "errorCode": "UNABLE_TO_LOCK_ROW",
                "fields": [],
            }
        ],
    )
    assert ok[0] == 204
    assert unavailable[0] == 503
    patches = api.served.faults.matching("PATCH", "/sobjects/Account/")
    assert [p.body for p in patches] == [{"Phone": "1"}, {"Phone": "2"}]
    assert all("Authorization" not in p.headers for p in patches)
    async with (
        aiohttp.ClientSession() as http,
        http.get(api.served.url + "/__emulator__/requests?method=PATCH") as response,
    ):
        assert len(await response.json()) == 2


async def test_call_options_client_reaches_listeners(api: Api) -> None:
    seen: list[tuple[str | None, str]] = []

    class Listener:
        def on_transaction(
            self, changes: list[RecordChange], *, origin: str | None, user_id: str
        ) -> None:
            seen.append((origin, changes[0].change_type))

    api.served.state.add_listener(Listener())

    await api.call(
        "POST",
        f"{V}/sobjects/Account/",
        {"Name": "A"},
        **{"Sforce-Call-Options": "client=replicator; defaultNamespace=x"},
    )
    await api.call(
        "POST",
        f"{V}/sobjects/Account/",
        {"Name": "B"},
        **{"Sforce-Call-Options": "client=Old/100, defaultNamespace=x"},
    )

    assert seen == [("replicator", "CREATE"), ("Old/100", "CREATE")]


async def test_undelete_through_the_control_api(api: Api) -> None:
    _, _, a = await api.call("POST", f"{V}/sobjects/Account/", {"Name": "A"})
    await api.call("DELETE", f"{V}/sobjects/Account/{a['id']}")

    async with (
        aiohttp.ClientSession() as http,
        http.post(
            api.served.url + "/__emulator__/records/undelete", json={"ids": [a["id"]]}
        ) as response,
    ):
        results = await response.json()
    status, _, _ = await api.call("GET", f"{V}/sobjects/Account/{a['id']}")

    assert results == [{"id": a["id"], "success": True, "errors": []}]
    assert status == 200


async def test_unknown_version_is_not_found(api: Api) -> None:
    status, _, body = await api.call("GET", "/services/data/v99.0/limits")

    assert status == 404
    assert body[0]["errorCode"] == "NOT_FOUND"
