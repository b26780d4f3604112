"""The OAuth token endpoint (reference §1): grants, response fields, error bodies."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import time
from typing import Any

import aiohttp
import orjson
import pytest
import requests
from simple_salesforce import Salesforce

from replicator.emulator.app import EmulatorConfig
from replicator.emulator.oauth import TokenStore, token_from_header
from tests.fixtures.emulator import Served, ServeEmulator


async def _token_call(
    served: Served, form: dict[str, str] | None = None, **kw: Any
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(served.url + "/services/oauth2/token", data=form, **kw) as response,
    ):
        return response.status, await response.json()


def _password_form(config: EmulatorConfig, **overrides: str) -> dict[str, str]:
    return {
        "grant_type": "password",
        "client_id": config.client_id,
        "client_secret": config.client_secret,
        "username": config.username,
        "password": config.password + config.security_token,
        **overrides,
    }


def _jwt(claims: dict[str, Any]) -> str:
    def part(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(obj)).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2lnbmF0dXJl"


async def test_password_grant_returns_salesforce_fields(emulator: Served) -> None:
    status, body = await _token_call(emulator, _password_form(emulator.config))

    assert status == 200
    assert set(body) == {
        "access_token",
        "instance_url",
        "id",
        "token_type",
        "issued_at",
        "signature",
    }
    org_id = emulator.state.org_id
    assert body["access_token"].startswith(org_id[:15] + "!")
    assert body["instance_url"] == emulator.url
    assert body["id"].startswith(f"{emulator.url}/id/{org_id}/005")
    assert body["token_type"] == "Bearer"
    assert body["issued_at"].isdigit() and len(body["issued_at"]) == 13
    expected = hmac.new(
        emulator.config.client_secret.encode(),
        (body["id"] + body["issued_at"]).encode(),
        hashlib.sha256,
    ).digest()
    assert base64.b64decode(body["signature"]) == expected
    assert "refresh_token" not in body


@pytest.mark.parametrize(
    ("overrides", "error", "description"),
    [
        ({"password": "wrong"}, "invalid_grant", "authentication failure"),
        ({"username": "nobody@example.com"}, "invalid_grant", "authentication failure"),
        ({"client_id": "unknown"}, "invalid_client_id", "client identifier invalid"),
        ({"client_secret": "wrong"}, "invalid_client", "invalid client credentials"),
        ({"grant_type": "magic"}, "unsupported_grant_type", "grant type not supported"),
    ],
)
async def test_refused_token_requests_use_the_oauth_error_body(
    emulator: Served, overrides: dict[str, str], error: str, description: str
) -> None:
    status, body = await _token_call(
        emulator, _password_form(emulator.config, **overrides)
    )

    assert status == 400
    assert body == {"error": error, "error_description": description}


async def test_password_without_security_token_fails(emulator: Served) -> None:
    form = _password_form(emulator.config, password=emulator.config.password)

    status, body = await _token_call(emulator, form)

    assert (status, body["error"]) == (400, "invalid_grant")


async def test_json_body_is_an_unsupported_grant(emulator: Served) -> None:
    status, body = await _token_call(emulator, json=_password_form(emulator.config))

    assert status == 400
    assert body == {
        "error": "unsupported_grant_type",
        "error_description": "grant type not supported",
    }


async def test_client_credentials_with_basic_auth(emulator: Served) -> None:
    config = emulator.config
    basic = base64.b64encode(f"{config.client_id}:{config.client_secret}".encode())

    status, body = await _token_call(
        emulator,
        {"grant_type": "client_credentials"},
        headers={"Authorization": "Basic " + basic.decode()},
    )

    assert status == 200
    assert body["token_type"] == "Bearer"
    assert "scope" in body


async def test_refresh_token_grant_and_expired_refresh_token(
    emulator: Served,
) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            emulator.url + "/__emulator__/oauth/refresh_token", json={}
        ) as response,
    ):
        refresh = (await response.json())["refresh_token"]
    form = {
        "grant_type": "refresh_token",
        "client_id": emulator.config.client_id,
        "refresh_token": refresh,
    }

    ok_status, ok_body = await _token_call(emulator, form)
    bad_status, bad_body = await _token_call(emulator, {**form, "refresh_token": "x"})

    assert ok_status == 200 and "access_token" in ok_body
    assert (bad_status, bad_body) == (
        400,
        {"error": "invalid_grant", "error_description": "expired access/refresh token"},
    )


@pytest.mark.parametrize(
    ("changes", "error", "description"),
    [
        ({}, None, None),
        ({"iss": "other"}, "invalid_client_id", "client identifier invalid"),
        (
            {"sub": "ghost@example.com"},
            "invalid_grant",
            "user hasn't approved this consumer",
        ),
        ({"exp": 1}, "invalid_grant", "expired authorization code"),
        ({"aud": "https://example.com"}, "invalid_grant", "audience is invalid"),
    ],
)
async def test_jwt_bearer_grant(
    emulator: Served,
    changes: dict[str, Any],
    error: str | None,
    description: str | None,
) -> None:
    claims = {
        "iss": emulator.config.client_id,
        "sub": emulator.config.username,
        "aud": "https://login.salesforce.com",
        "exp": int(time.time()) + 300,
        **changes,
    }
    form = {
        "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "assertion": _jwt(claims),
    }

    status, body = await _token_call(emulator, form)

    if error is None:
        assert status == 200 and body["access_token"]
    else:
        assert (status, body) == (
            400,
            {"error": error, "error_description": description},
        )


@pytest.mark.parametrize("scheme", ["Bearer {}", "OAuth {}", "{}"])
async def test_rest_accepts_every_authorization_form(
    emulator: Served, scheme: str
) -> None:
    token = await emulator.token()

    async with (
        aiohttp.ClientSession() as http,
        http.get(
            emulator.url + "/services/data/v60.0/limits",
            headers={"Authorization": scheme.format(token)},
        ) as response,
    ):
        assert response.status == 200


async def test_expired_token_gives_invalid_session_id(
    serve_emulator: ServeEmulator,
) -> None:
    config = EmulatorConfig.ebikes(token_ttl_seconds=0.05)
    async with serve_emulator(config) as served:
        token = await served.token()
        await asyncio.sleep(0.1)

        async with (
            aiohttp.ClientSession() as http,
            http.get(
                served.url + "/services/data/v60.0/sobjects",
                headers={"Authorization": f"Bearer {token}"},
            ) as response,
        ):
            status, body = response.status, await response.json()

    assert status == 401
    assert body == [
        {"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}
    ]


async def test_control_api_expires_all_tokens(emulator: Served) -> None:
    token = await emulator.token()

    async with aiohttp.ClientSession() as http:
        async with http.post(emulator.url + "/__emulator__/tokens/expire") as r:
            assert (await r.json()) == {"expired": 1}
        async with http.get(
            emulator.url + "/services/data/v60.0/limits",
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            assert response.status == 401


async def test_malformed_authorization_header(emulator: Served) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            emulator.url + "/services/data/v60.0/limits",
            headers={"Authorization": "Basic abc"},
        ) as response,
    ):
        status, body = response.status, await response.json()

    assert status == 401
    assert body == [
        {"message": "INVALID_HEADER_TYPE", "errorCode": "INVALID_AUTH_HEADER"}
    ]


class _Loopback(requests.adapters.HTTPAdapter):
    """Send simple-salesforce's https login and REST calls to the http emulator."""

    def __init__(self, base: str) -> None:
        super().__init__()
        self.base = base

    def send(self, request: requests.PreparedRequest, **kw: Any) -> Any:  # type: ignore[override]
        url = request.url or ""
        path = url.split("/", 3)[3] if url.count("/") >= 3 else ""
        request.url = f"{self.base}/{path}"
        return super().send(request, **kw)


async def test_simple_salesforce_logs_in_with_the_password_flow(
    emulator: Served,
) -> None:
    config = emulator.config
    session = requests.Session()
    session.mount("https://", _Loopback(emulator.url))

    def login() -> Any:
        sf = Salesforce(
            username=config.username,
            # with security_token set simple-salesforce uses SOAP login instead
            password=config.password + config.security_token,
            consumer_key=config.client_id,
            consumer_secret=config.client_secret,
            session=session,
            version="60.0",
        )
        return sf.Account.describe()["keyPrefix"]

    assert await asyncio.to_thread(login) == "001"


def test_token_from_header_forms() -> None:
    assert token_from_header("Bearer abc") == "abc"
    assert token_from_header("OAuth abc") == "abc"
    assert token_from_header("abc") == "abc"
    assert token_from_header("Basic abc") is None
    assert token_from_header(None) is None


def test_keep_alive_pushes_expiry() -> None:
    store = TokenStore("00DDn0000000001MAA", ttl_seconds=60)
    session = store.issue("005Dn0000000001IAA", "a@example.com", "cid")

    store.keep_alive(session.access_token)

    assert store.validate(session.access_token) is not None
    assert store.revoke(session.access_token)
    assert store.validate(session.access_token) is None
