"""The Salesforce authenticator against the emulator's token endpoint, over loopback.

Each grant the replicator supports logs in; refusals are non-retriable errors
whose message names the fix and never a secret.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from replicator.emulator.app import EmulatorConfig
from replicator.emulator.keys import TOKENS_KEY
from replicator.errors import (
    ConfigError,
    InvariantError,
    SalesforceAuthError,
    SalesforceConnectionError,
)
from replicator.sources.salesforce.auth import Authenticator, Credentials
from tests.fixtures.emulator import Served, ServeEmulator

pytestmark = pytest.mark.integration


@pytest.fixture
async def org(serve_emulator: ServeEmulator) -> AsyncIterator[Served]:
    async with serve_emulator(EmulatorConfig()) as served:
        yield served


def _password(org: Served, **overrides: Any) -> Credentials:
    config = org.config
    fields: dict[str, Any] = {
        "login_url": org.url,
        "client_id": config.client_id,
        "client_secret": config.client_secret,
        "username": config.username,
        "password": config.password + config.security_token,
        "grant": "password",
        **overrides,
    }
    return Credentials(**fields)


def _private_key_pem() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


async def test_password_grant_returns_session_and_bearer_header(org: Served) -> None:
    auth = Authenticator(_password(org))

    session = await auth.login()

    assert session.instance_url == org.url
    assert auth.header() == {"Authorization": f"Bearer {session.access_token}"}
    assert org.app[TOKENS_KEY].validate(session.access_token) is not None
    assert session.access_token not in repr(session)
    assert session.access_token not in repr(auth)


async def test_login_twice_reuses_the_session(org: Served) -> None:
    auth = Authenticator(_password(org))

    first = await auth.login()
    second = await auth.login()

    assert first is second
    assert auth.token_requests == 1


async def test_refresh_logs_in_again_unless_another_caller_already_did(
    org: Served,
) -> None:
    """The REST and streaming clients share one authenticator: a refresh for a
    token that was already replaced returns the new session without a request."""
    auth = Authenticator(_password(org))
    old = await auth.login()

    new = await auth.refresh(stale_token=old.access_token)
    again = await auth.refresh(stale_token=old.access_token)

    assert new.access_token != old.access_token
    assert again is new
    assert auth.token_requests == 2


async def test_refresh_token_grant(org: Served) -> None:
    user = org.state.find_user(org.config.username)
    assert user is not None
    refresh_token = org.app[TOKENS_KEY].issue_refresh_token(
        user["Id"], user["Username"], org.config.client_id
    )
    credentials = Credentials(
        login_url=org.url,
        client_id=org.config.client_id,
        client_secret=org.config.client_secret,
        refresh_token=refresh_token,
        grant="refresh_token",
    )

    session = await Authenticator(credentials).login()

    assert org.app[TOKENS_KEY].validate(session.access_token) is not None


async def test_jwt_bearer_grant_sends_a_signed_rs256_assertion(org: Served) -> None:
    key = _private_key_pem()
    credentials = Credentials(
        login_url=org.url,
        client_id=org.config.client_id,
        username=org.config.username,
        private_key_pem=key,
        grant="jwt",
    )

    session = await Authenticator(credentials).login()

    assert org.app[TOKENS_KEY].validate(session.access_token) is not None
    (request,) = org.faults.matching("POST", "/services/oauth2/token")
    assert request.body["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert set(request.body) == {"grant_type", "assertion"}


def test_jwt_assertion_claims_and_signature_verify_with_the_public_key() -> None:
    pem = _private_key_pem()
    credentials = Credentials(
        login_url="https://login.salesforce.com",
        client_id="3MVGconsumer",
        username="integration@example.com",
        private_key_pem=pem,
        grant="jwt",
    )
    private = serialization.load_pem_private_key(pem.encode(), password=None)

    assertion = Authenticator(credentials)._assertion()

    claims = jwt.decode(
        assertion,
        private.public_key(),  # type: ignore[arg-type]
        algorithms=["RS256"],
        audience="https://login.salesforce.com",
    )
    assert claims["iss"] == "3MVGconsumer"
    assert claims["sub"] == "integration@example.com"
    assert jwt.get_unverified_header(assertion)["alg"] == "RS256"


@pytest.mark.parametrize(
    ("login_url", "audience"),
    [
        ("https://login.salesforce.com", "https://login.salesforce.com"),
        ("https://test.salesforce.com", "https://test.salesforce.com"),
        ("https://acme.my.salesforce.com", "https://login.salesforce.com"),
        ("https://acme--uat.sandbox.my.salesforce.com", "https://test.salesforce.com"),
        ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
    ],
)
def test_jwt_audience_follows_the_login_host(login_url: str, audience: str) -> None:
    credentials = Credentials(
        login_url=login_url,
        client_id="c",
        username="u",
        private_key_pem="k",
        grant="jwt",
    )

    assert credentials.audience == audience


async def test_wrong_password_is_a_clear_non_retriable_error(org: Served) -> None:
    secret = "wrong-password-XYZ123"
    auth = Authenticator(_password(org, password=secret))

    with pytest.raises(SalesforceAuthError) as refused:
        await auth.login()

    message = str(refused.value)
    assert not refused.value.retriable
    assert "invalid_grant" in message
    assert "security token" in message  # names the fix
    assert secret not in message
    assert org.config.client_secret not in message


async def test_wrong_client_secret_names_the_consumer_secret(org: Served) -> None:
    auth = Authenticator(_password(org, client_secret="not-the-secret"))

    with pytest.raises(SalesforceAuthError) as refused:
        await auth.login()

    assert "consumer secret" in str(refused.value)
    assert "not-the-secret" not in str(refused.value)


async def test_revoked_refresh_token_says_to_authorise_again(org: Served) -> None:
    token = "5AepRevokedRefreshToken"
    credentials = Credentials(
        login_url=org.url,
        client_id=org.config.client_id,
        refresh_token=token,
        grant="refresh_token",
    )

    with pytest.raises(SalesforceAuthError) as refused:
        await Authenticator(credentials).login()

    assert "authorise the connected app again" in str(refused.value)
    assert token not in str(refused.value)


async def test_unknown_jwt_user_says_to_preauthorise(org: Served) -> None:
    credentials = Credentials(
        login_url=org.url,
        client_id=org.config.client_id,
        username="nobody@example.invalid",
        private_key_pem=_private_key_pem(),
        grant="jwt",
    )

    with pytest.raises(SalesforceAuthError) as refused:
        await Authenticator(credentials).login()

    assert "pre-authorise" in str(refused.value)


async def test_garbage_private_key_is_a_clear_error(org: Served) -> None:
    credentials = Credentials(
        login_url=org.url,
        client_id=org.config.client_id,
        username=org.config.username,
        private_key_pem="-----BEGIN PRIVATE KEY-----\nnot a key\n",
        grant="jwt",
    )

    with pytest.raises(SalesforceAuthError, match="private_key_pem"):
        await Authenticator(credentials).login()


async def test_unreachable_token_endpoint_is_retriable(org: Served) -> None:
    auth = Authenticator(_password(org, login_url="http://127.0.0.1:9"))

    with pytest.raises(SalesforceConnectionError) as failed:
        await auth.login()

    assert failed.value.retriable


def test_missing_fields_for_a_grant_name_them() -> None:
    with pytest.raises(ConfigError, match="refresh_token"):
        Credentials(login_url="https://x", client_id="c", grant="refresh_token")


def test_credentials_repr_hides_secrets() -> None:
    credentials = Credentials(
        login_url="https://login.salesforce.com",
        client_id="c",
        client_secret="s3cret",
        username="u",
        password="pw-and-token",
    )

    assert "s3cret" not in repr(credentials)
    assert "pw-and-token" not in repr(credentials)


def test_header_before_login_is_an_invariant_error() -> None:
    auth = Authenticator(
        Credentials(login_url="https://x", client_id="c", username="u", password="p")
    )

    with pytest.raises(InvariantError):
        auth.header()
