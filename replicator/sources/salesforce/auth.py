"""OAuth 2.0 against a Salesforce org: one ``Authenticator`` per org, shared.

The password, refresh-token, client-credentials and JWT bearer grants post a
form to ``<login_url>/services/oauth2/token`` (reference/salesforce.md §1).
The REST client and the streaming client share one ``Authenticator``; a
``refresh`` that finds the session already replaced by another caller returns
the new one instead of logging in again. Token endpoint refusals become
``SalesforceAuthError`` (not retriable, the message names the fix and never a
secret); network failures and 5xx answers become ``SalesforceConnectionError``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import jwt

from replicator.errors import (
    ConfigError,
    InvariantError,
    SalesforceAuthError,
    SalesforceConnectionError,
)

__all__ = ["Authenticator", "Credentials", "Grant", "Session"]

logger = logging.getLogger(__name__)

Grant = Literal["password", "refresh_token", "jwt", "client_credentials"]

TOKEN_PATH = "/services/oauth2/token"
_JWT_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Salesforce refuses assertions valid for more than three minutes
# (remoteaccess_oauth_jwt_flow).
_JWT_LIFETIME_SECONDS = 180
_REQUIRED: dict[str, tuple[str, ...]] = {
    "password": ("username", "password"),
    "refresh_token": ("refresh_token",),
    "jwt": ("username", "private_key_pem"),
    "client_credentials": ("client_secret",),
}


@dataclass(frozen=True, slots=True)
class Credentials:
    """What one org's connected app and integration user log in with.

    ``password`` is the user's password followed by its security token, with
    no separator (Salesforce's username-password flow). ``jwt_audience``
    defaults to ``https://test.salesforce.com`` for sandbox login hosts,
    ``https://login.salesforce.com`` for other Salesforce hosts, and to
    ``login_url`` itself elsewhere (the emulator).
    """

    login_url: str
    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    private_key_pem: str | None = field(default=None, repr=False)
    grant: Grant = "password"
    jwt_audience: str | None = None

    def __post_init__(self) -> None:
        if self.grant not in _REQUIRED:
            raise ConfigError(
                f"unknown Salesforce grant {self.grant!r}; use one of "
                f"{', '.join(sorted(_REQUIRED))}"
            )
        missing = [name for name in _REQUIRED[self.grant] if not getattr(self, name)]
        if missing:
            raise ConfigError(
                f"the {self.grant} grant needs {', '.join(missing)}; set them in "
                "the Salesforce credentials"
            )
        if not self.login_url.startswith(("https://", "http://")):
            raise ConfigError(
                f"login_url {self.login_url!r} is not an http(s) URL; use e.g. "
                "https://login.salesforce.com or the org's My Domain URL"
            )

    @property
    def token_url(self) -> str:
        return self.login_url.rstrip("/") + TOKEN_PATH

    @property
    def audience(self) -> str:
        if self.jwt_audience:
            return self.jwt_audience
        host = urlsplit(self.login_url).hostname or ""
        if host == "test.salesforce.com" or ".sandbox." in host:
            return "https://test.salesforce.com"
        if host.endswith(".salesforce.com"):
            return "https://login.salesforce.com"
        return self.login_url.rstrip("/")

    def secrets(self) -> tuple[str, ...]:
        """Return the secret values, to keep them out of any message."""
        values = (self.client_secret, self.password, self.refresh_token)
        return tuple(v for v in values if v)


@dataclass(frozen=True, slots=True)
class Session:
    """One access token and the instance it is valid for."""

    access_token: str
    instance_url: str
    issued_at: datetime
    identity_url: str | None = None

    def __repr__(self) -> str:
        return (
            f"Session(access_token='***', instance_url={self.instance_url!r}, "
            f"issued_at={self.issued_at.isoformat()!r})"
        )


class Authenticator:
    """Log in to one org and hand the session to the REST and streaming clients.

    ``http`` is used for token requests when given; otherwise each request
    opens and closes its own aiohttp session (token requests are rare).
    """

    def __init__(
        self,
        credentials: Credentials,
        *,
        http: aiohttp.ClientSession | None = None,
        request_timeout: float = 30.0,
    ) -> None:
        self.credentials = credentials
        self._http = http
        self._request_timeout = request_timeout
        self._session: Session | None = None
        self._lock = asyncio.Lock()
        #: Token requests sent, for metrics and tests.
        self.token_requests = 0

    def __repr__(self) -> str:
        return (
            f"Authenticator(login_url={self.credentials.login_url!r}, "
            f"grant={self.credentials.grant!r}, session={self._session!r})"
        )

    @property
    def current(self) -> Session | None:
        """The last session obtained, or None before the first login."""
        return self._session

    @property
    def token_url(self) -> str:
        return self.credentials.token_url

    @property
    def instance_url(self) -> str:
        return self._require().instance_url

    def header(self) -> dict[str, str]:
        """Return the ``Authorization`` header of the current session."""
        return {"Authorization": f"Bearer {self._require().access_token}"}

    async def login(self) -> Session:
        """Return the current session, logging in first if there is none."""
        async with self._lock:
            if self._session is None:
                self._session = await self._request_token()
            return self._session

    async def refresh(self, *, stale_token: str | None = None) -> Session:
        """Log in again and return the new session.

        With ``stale_token`` (the token a caller saw refused), a session that
        another caller has already replaced is returned without a request.
        """
        async with self._lock:
            current = self._session
            if (
                current is not None
                and stale_token is not None
                and current.access_token != stale_token
            ):
                return current
            self._session = await self._request_token()
            return self._session

    def _require(self) -> Session:
        if self._session is None:
            raise InvariantError("no Salesforce session yet; call login() first")
        return self._session

    async def _request_token(self) -> Session:
        form = self._form()
        self.token_requests += 1
        try:
            status, body = await self._post(form)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SalesforceConnectionError(
                f"token endpoint {self.token_url!r} unreachable: "
                f"{self._scrub(str(exc) or type(exc).__name__)}"
            ) from exc
        if status == 200 and isinstance(body, dict) and body.get("access_token"):
            session = _session_of(body)
            logger.info(
                "salesforce login",
                extra={
                    "grant": self.credentials.grant,
                    "instance_url": session.instance_url,
                },
            )
            return session
        raise self._refusal(status, body)

    async def _post(self, form: dict[str, str]) -> tuple[int, Any]:
        async with asyncio.timeout(self._request_timeout):
            if self._http is not None:
                return await _post_form(self._http, self.token_url, form)
            async with aiohttp.ClientSession() as http:
                return await _post_form(http, self.token_url, form)

    def _form(self) -> dict[str, str]:
        creds = self.credentials
        form = {"client_id": creds.client_id}
        if creds.client_secret:
            form["client_secret"] = creds.client_secret
        if creds.grant == "password":
            assert creds.username is not None
            assert creds.password is not None
            form.update(
                grant_type="password", username=creds.username, password=creds.password
            )
        elif creds.grant == "refresh_token":
            assert creds.refresh_token is not None
            form.update(grant_type="refresh_token", refresh_token=creds.refresh_token)
        elif creds.grant == "client_credentials":
            form["grant_type"] = "client_credentials"
        else:
            form = {"grant_type": _JWT_GRANT_TYPE, "assertion": self._assertion()}
        return form

    def _assertion(self) -> str:
        """Return the RS256-signed JWT of the bearer flow (iss, sub, aud, exp)."""
        creds = self.credentials
        claims = {
            "iss": creds.client_id,
            "sub": creds.username,
            "aud": creds.audience,
            "exp": int(time.time()) + _JWT_LIFETIME_SECONDS,
        }
        assert creds.private_key_pem is not None
        try:
            return jwt.encode(claims, creds.private_key_pem, algorithm="RS256")
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise SalesforceAuthError(
                "private_key_pem is not a usable RSA private key in PEM form; give "
                "the key whose certificate is uploaded to the connected app"
            ) from exc

    def _refusal(self, status: int, body: Any) -> Exception:
        error, description = "", ""
        if isinstance(body, dict):
            error = str(body.get("error", ""))
            description = str(body.get("error_description", ""))
        if status == 404:
            return SalesforceAuthError(
                f"no token endpoint at {self.token_url!r} (HTTP 404); set login_url "
                "to https://login.salesforce.com, https://test.salesforce.com or "
                "the org's My Domain URL"
            )
        if status >= 500 or status in (408, 429) or not error:
            return SalesforceConnectionError(
                f"token endpoint {self.token_url!r} answered HTTP {status}; "
                "retrying later"
            )
        grant = self.credentials.grant
        message = (
            f"salesforce refused the {grant} grant for "
            f"{self.credentials.username or self.credentials.client_id!r} at "
            f"{self.token_url!r}: {error} ({description}); "
            f"{_fix_for(grant, error, description)}"
        )
        return SalesforceAuthError(self._scrub(message))

    def _scrub(self, text: str) -> str:
        for secret in self.credentials.secrets():
            text = text.replace(secret, "***")
        return text


async def _post_form(
    http: aiohttp.ClientSession,
    url: str,
    form: dict[str, str],
) -> tuple[int, Any]:
    async with http.post(
        url, data=form, headers={"Accept": "application/json"}
    ) as response:
        try:
            body = await response.json(content_type=None)
        except ValueError:
            body = None
        return response.status, body


def _session_of(body: dict[str, Any]) -> Session:
    issued_at = datetime.now(UTC)
    raw = body.get("issued_at")
    if isinstance(raw, str) and raw.isdigit():
        issued_at = datetime.fromtimestamp(int(raw) / 1000, UTC)
    return Session(
        access_token=str(body["access_token"]),
        instance_url=str(body.get("instance_url", "")).rstrip("/"),
        issued_at=issued_at,
        identity_url=body.get("id"),
    )


def _fix_for(grant: str, error: str, description: str) -> str:
    """Return what an operator should do about a refusal (reference §1.4)."""
    if error == "invalid_client_id":
        return "set client_id to the connected app's consumer key"
    if error == "invalid_client":
        return "set client_secret to the connected app's consumer secret"
    if error == "invalid_app_access":
        return "have an admin approve the user for the connected app"
    if error == "unsupported_grant_type":
        return (
            f"this login URL does not accept the {grant} grant; the "
            "client_credentials grant needs the org's My Domain URL as login_url"
        )
    if error == "invalid_grant" and "approved" in description:
        return (
            "pre-authorise the user for the connected app (admin approved users "
            "are pre-authorized, plus a permission set or profile)"
        )
    if error == "invalid_grant":
        return {
            "password": (
                "check the username, and that password is the user's password "
                "followed by its current security token"
            ),
            "refresh_token": (
                "the refresh token was revoked or expired; authorise the "
                "connected app again and store the new refresh token"
            ),
            "jwt": (
                "check the username, the audience (login or test), and that the "
                "connected app holds the certificate of this private key"
            ),
        }.get(grant, "check the connected app's settings")
    return "check the connected app and the integration user"
