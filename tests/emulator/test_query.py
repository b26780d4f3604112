"""The query resources over real HTTP, read by simple-salesforce and by aiohttp.

The org is assembled from the core's parts (standard schema, state, tokens,
REST middleware) and served on 127.0.0.1, port 0. Expected results come from
the records the tests inserted, filtered in plain Python.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import web
from aiohttp.test_utils import TestServer
from simple_salesforce.api import Salesforce

from replicator.emulator import faults, oauth, query, rest
from replicator.emulator.keys import (
    CONFIG_KEY,
    FAULTS_KEY,
    SCHEMA_KEY,
    STATE_KEY,
    TOKENS_KEY,
    USAGE_KEY,
)
from replicator.emulator.standard import standard_schema
from replicator.emulator.state import OrgState

VERSION = "60.0"
USER_ID = "005Dn000000000001AAA"
INDUSTRIES = ("Energy", "Media", None)


@dataclass(frozen=True, slots=True)
class _Config:
    """The one setting the REST middleware reads."""

    api_version: str = VERSION


class _HttpsToHttp(requests.adapters.HTTPAdapter):
    """simple-salesforce always builds https URLs; the loopback server is http."""

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> Any:  # type: ignore[override]
        request.url = (request.url or "").replace("https://", "http://", 1)
        return super().send(request, **kwargs)


@dataclass(slots=True)
class Org:
    base: str  # http://127.0.0.1:port
    token: str
    app: web.Application
    accounts: list[dict[str, Any]]  # as inserted, with Id and deleted flag

    def salesforce(self) -> Salesforce:
        session = requests.Session()
        host = self.base.removeprefix("http://")
        session.mount(f"https://{host}", _HttpsToHttp())
        return Salesforce(
            instance_url=f"https://{host}",
            session_id=self.token,
            version=VERSION,
            session=session,
        )

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **extra}


def _seed(state: OrgState, count: int) -> list[dict[str, Any]]:
    accounts: list[dict[str, Any]] = []
    with state.transaction(user_id=USER_ID) as tx:
        for number in range(count):
            values: dict[str, Any] = {
                "Name": f"Account {number:04d}",
                "Industry": INDUSTRIES[number % 3],
                "NumberOfEmployees": number,
                "BillingCity": "Lyon" if number % 2 else None,
            }
            record_id = tx.create("Account", values)
            accounts.append({**values, "Id": record_id, "IsDeleted": False})
    with state.transaction(user_id=USER_ID) as tx:
        for account in accounts[::10]:
            tx.delete("Account", account["Id"])
            account["IsDeleted"] = True
    return accounts


@pytest.fixture
async def org() -> AsyncIterator[Org]:
    schema = standard_schema()
    state = OrgState(schema)
    accounts = _seed(state, 2450)
    app = web.Application(middlewares=[rest.middleware])
    app[CONFIG_KEY] = _Config()  # type: ignore[misc]
    app[SCHEMA_KEY] = schema
    app[STATE_KEY] = state
    app[TOKENS_KEY] = oauth.TokenStore(state.org_id, 3600.0)
    app[FAULTS_KEY] = faults.Faults()
    app[USAGE_KEY] = rest.ApiUsage(100_000)
    query.setup_query(app)
    session = app[TOKENS_KEY].issue(USER_ID, "admin@example.test", "test-client")
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield Org(
            f"http://127.0.0.1:{server.port}", session.access_token, app, accounts
        )
    finally:
        await server.close()
        state.close()


def _live(org: Org) -> list[dict[str, Any]]:
    return [a for a in org.accounts if not a["IsDeleted"]]


async def test_simple_salesforce_query_returns_first_batch_and_next_url(
    org: Org,
) -> None:
    sf = org.salesforce()

    result = await asyncio.to_thread(sf.query, "SELECT Id, Name FROM Account")

    live = _live(org)
    assert result["totalSize"] == len(live)
    assert result["done"] is False
    assert len(result["records"]) == query.DEFAULT_BATCH_SIZE
    assert result["nextRecordsUrl"].startswith(f"/services/data/v{VERSION}/query/01g")
    assert result["nextRecordsUrl"].endswith(f"-{query.DEFAULT_BATCH_SIZE}")
    first = result["records"][0]
    assert first["attributes"] == {
        "type": "Account",
        "url": f"/services/data/v{VERSION}/sobjects/Account/{live[0]['Id']}",
    }
    assert (first["Id"], first["Name"]) == (live[0]["Id"], live[0]["Name"])


async def test_simple_salesforce_query_all_pages_through_every_record(
    org: Org,
) -> None:
    sf = org.salesforce()

    result = await asyncio.to_thread(
        sf.query_all, "SELECT Id FROM Account ORDER BY Name DESC"
    )

    expected = sorted(_live(org), key=lambda a: a["Name"], reverse=True)
    assert result["totalSize"] == len(expected)
    assert [r["Id"] for r in result["records"]] == [a["Id"] for a in expected]


async def test_query_all_with_include_deleted_returns_the_recycle_bin(
    org: Org,
) -> None:
    sf = org.salesforce()

    every = await asyncio.to_thread(
        sf.query_all, "SELECT Id, IsDeleted FROM Account", include_deleted=True
    )
    binned = await asyncio.to_thread(
        sf.query_all,
        "SELECT Id FROM Account WHERE IsDeleted = true",
        include_deleted=True,
    )

    assert [r["Id"] for r in every["records"]] == [a["Id"] for a in org.accounts]
    assert [r["Id"] for r in binned["records"]] == [
        a["Id"] for a in org.accounts if a["IsDeleted"]
    ]
    assert [r["IsDeleted"] for r in every["records"]] == [
        a["IsDeleted"] for a in org.accounts
    ]


async def test_filters_and_compound_address_over_http(org: Org) -> None:
    sf = org.salesforce()

    result = await asyncio.to_thread(
        sf.query_all,
        "SELECT Name, BillingAddress FROM Account "
        "WHERE Industry IN ('energy', 'media') AND NumberOfEmployees < 40",
    )

    expected = [
        a
        for a in _live(org)
        if a["Industry"] in ("Energy", "Media") and a["NumberOfEmployees"] < 40
    ]
    assert [r["Name"] for r in result["records"]] == [a["Name"] for a in expected]
    for row, account in zip(result["records"], expected, strict=True):
        city = account["BillingCity"]
        assert (row["BillingAddress"] or {}).get("city") == city


async def test_where_on_ids_matches_15_and_18_character_ids_and_other_filters(
    org: Org,
) -> None:
    """A WHERE on Id is served by look-up; every other condition still applies."""
    sf = org.salesforce()
    live = _live(org)
    deleted = next(a for a in org.accounts if a["IsDeleted"])
    picked = [live[0], live[1], live[2], deleted]
    ids = [
        picked[0]["Id"][:15],
        picked[1]["Id"],
        picked[2]["Id"],
        deleted["Id"],
        "003Dn0000000001AAA",
    ]
    quoted = ", ".join(f"'{i}'" for i in ids)

    by_ids = await asyncio.to_thread(
        sf.query_all, f"SELECT Id FROM Account WHERE Id IN ({quoted})"
    )
    narrowed = await asyncio.to_thread(
        sf.query_all,
        f"SELECT Id FROM Account WHERE Id IN ({quoted}) "
        f"AND Name != '{picked[1]['Name']}'",
    )
    single = await asyncio.to_thread(
        sf.query_all, f"SELECT Id FROM Account WHERE Id = '{picked[2]['Id']}'"
    )

    assert sorted(r["Id"] for r in by_ids["records"]) == sorted(
        a["Id"] for a in picked[:3]
    )
    assert sorted(r["Id"] for r in narrowed["records"]) == sorted(
        [picked[0]["Id"], picked[2]["Id"]]
    )
    assert [r["Id"] for r in single["records"]] == [picked[2]["Id"]]


async def test_count_query_has_total_and_no_records(org: Org) -> None:
    sf = org.salesforce()

    result = await asyncio.to_thread(
        sf.query, "SELECT COUNT() FROM Account WHERE Industry = null"
    )

    expected = sum(1 for a in _live(org) if a["Industry"] is None)
    assert result == {"totalSize": expected, "done": True, "records": []}


async def test_batch_size_header_is_honoured_within_200_to_2000(org: Org) -> None:
    url = f"{org.base}/services/data/v{VERSION}/query"
    params = {"q": "SELECT Id FROM Account"}

    async with aiohttp.ClientSession() as http:
        sizes = []
        for asked in ("batchSize=500", "batchSize=50", "batchSize=9000"):
            headers = org.headers(**{"Sforce-Query-Options": asked})
            async with http.get(url, params=params, headers=headers) as response:
                sizes.append(len((await response.json())["records"]))
        next_url = None
        headers = org.headers(**{"Sforce-Query-Options": "batchSize=1000"})
        async with http.get(url, params=params, headers=headers) as response:
            next_url = (await response.json())["nextRecordsUrl"]
        async with http.get(org.base + next_url, headers=org.headers()) as response:
            second = await response.json()

    assert sizes == [500, 200, 2000]
    assert [r["Id"] for r in second["records"]] == [
        a["Id"] for a in _live(org)[1000:2000]
    ]
    assert second["nextRecordsUrl"].endswith("-2000")


async def test_soql_errors_come_back_as_salesforce_error_arrays(org: Org) -> None:
    url = f"{org.base}/services/data/v{VERSION}/query"
    cases = {
        "SELECT Id FROM Widget": "INVALID_TYPE",
        "SELECT Id, FullName FROM Account": "INVALID_FIELD",
        "SELECT Id FORM Account": "MALFORMED_QUERY",
    }

    async with aiohttp.ClientSession() as http:
        answers = {}
        for text in cases:
            async with http.get(url, params={"q": text}, headers=org.headers()) as r:
                answers[text] = (r.status, await r.json())
        async with http.get(url, headers=org.headers()) as response:
            missing = (response.status, await response.json())
        bad_locator = f"{url}/01gDn0000000001AAA-2000"
        async with http.get(bad_locator, headers=org.headers()) as response:
            locator = (response.status, await response.json())

    for text, code in cases.items():
        status, body = answers[text]
        assert status == 400
        assert body[0]["errorCode"] == code
    assert answers["SELECT Id FROM Widget"][1][0]["message"].endswith(
        "sObject type 'Widget' is not supported. If you are attempting to use a "
        "custom object, be sure to append the '__c' after the entity name. Please "
        "reference your WSDL or the describe call for the appropriate names."
    )
    assert missing == (
        400,
        [
            {
                "message": "A query string has to be specified",
                "errorCode": "MALFORMED_QUERY",
            }
        ],
    )
    assert locator[0] == 400
    assert locator[1][0]["errorCode"] == "INVALID_QUERY_LOCATOR"


async def test_expired_token_gets_401_and_calls_are_counted(org: Org) -> None:
    url = f"{org.base}/services/data/v{VERSION}/query"
    params = {"q": "SELECT Id FROM Account LIMIT 1"}
    usage = org.app[USAGE_KEY]
    before = usage.used

    async with aiohttp.ClientSession() as http:
        async with http.get(url, params=params, headers=org.headers()) as response:
            ok_status = response.status
            limit_info = response.headers["Sforce-Limit-Info"]
        org.app[TOKENS_KEY].expire_all()
        async with http.get(url, params=params, headers=org.headers()) as response:
            expired = (response.status, await response.json())

    assert ok_status == 200
    assert usage.used == before + 1
    assert limit_info == f"api-usage={before + 1}/{usage.limit}"
    assert expired == (
        401,
        [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}],
    )
