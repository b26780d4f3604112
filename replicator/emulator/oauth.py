"""The OAuth 2.0 token endpoint and the store of access tokens it hands out.

``POST /services/oauth2/token`` answers the password, refresh_token,
client_credentials and JWT bearer grants with Salesforce's response fields
and error bodies (reference §1). ``TokenStore.validate`` accepts the
``Authorization`` forms clients send: ``Bearer <t>``, ``OAuth <t>`` and a bare
``<t>`` (§1.5); REST and CometD both use it through ``TOKENS_KEY``.
JWT assertions are checked for ``iss``, ``sub``, ``aud`` and ``exp``; their
RS256 signature is not verified.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

from replicator.emulator.keys import CONFIG_KEY, STATE_KEY, TOKENS_KEY

__all__ = ["OAuthError", "Session", "TokenStore", "setup_oauth"]

logger = logging.getLogger(__name__)

_JSON = "application/json;charset=UTF-8"
_AUDIENCES = ("https://login.salesforce.com", "https://test.salesforce.com")


@dataclass(frozen=True, slots=True)
class Session:
    """One access token and whom it belongs to."""

    access_token: str
    user_id: str
    username: str
    org_id: str
    client_id: str
    issued_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class _RefreshGrant:
    user_id: str
    username: str
    client_id: str


class OAuthError(Exception):
    """A token request refused with Salesforce's ``error`` and description."""

    def __init__(self, error: str, description: str, status: int = 400) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status


class TokenStore:
    """Access and refresh tokens of one org; tokens expire after ``ttl``."""

    def __init__(
        self,
        org_id: str,
        ttl_seconds: float,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.org_id = org_id
        self.ttl = timedelta(seconds=ttl_seconds)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._sessions: dict[str, Session] = {}
        self._refresh: dict[str, _RefreshGrant] = {}

    def issue(self, user_id: str, username: str, client_id: str) -> Session:
        """Create an access token: the 15-character org id, ``!``, random text."""
        now = self._clock()
        token = f"{self.org_id[:15]}!{secrets.token_urlsafe(72)}"
        session = Session(
            access_token=token,
            user_id=user_id,
            username=username,
            org_id=self.org_id,
            client_id=client_id,
            issued_at=now,
            expires_at=now + self.ttl,
        )
        self._sessions[token] = session
        return session

    def issue_refresh_token(self, user_id: str, username: str, client_id: str) -> str:
        """Create a refresh token, as a web-server or user-agent flow would."""
        token = f"5Aep{secrets.token_urlsafe(60)}"
        self._refresh[token] = _RefreshGrant(user_id, username, client_id)
        return token

    def redeem_refresh_token(self, token: str, client_id: str) -> Session | None:
        grant = self._refresh.get(token)
        if grant is None or grant.client_id != client_id:
            return None
        return self.issue(grant.user_id, grant.username, grant.client_id)

    def validate(self, header_value: str | None) -> Session | None:
        """Return the live session named by an ``Authorization`` value, if any."""
        token = token_from_header(header_value)
        if token is None:
            return None
        session = self._sessions.get(token)
        if session is None:
            return None
        if self._clock() >= session.expires_at:
            del self._sessions[token]
            return None
        return session

    def keep_alive(self, token: str) -> None:
        """Push a session's expiry forward (an active CometD long poll)."""
        session = self._sessions.get(token)
        if session is not None:
            self._sessions[token] = _replace_expiry(session, self._clock() + self.ttl)

    def revoke(self, token: str) -> bool:
        """Forget an access or refresh token; tell whether it existed."""
        return (
            self._sessions.pop(token, None) is not None
            or self._refresh.pop(token, None) is not None
        )

    def expire_all(self) -> int:
        """Invalidate every access token (refresh tokens survive)."""
        count = len(self._sessions)
        self._sessions.clear()
        logger.info("access tokens expired", extra={"count": count})
        return count


def token_from_header(header_value: str | None) -> str | None:
    """Return the token of ``Bearer X``, ``OAuth X`` or a bare ``X``."""
    if not header_value:
        return None
    parts = header_value.strip().split()
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2 and parts[0].lower() in ("bearer", "oauth"):
        return parts[1]
    return None


def _replace_expiry(session: Session, expires_at: datetime) -> Session:
    return Session(
        access_token=session.access_token,
        user_id=session.user_id,
        username=session.username,
        org_id=session.org_id,
        client_id=session.client_id,
        issued_at=session.issued_at,
        expires_at=expires_at,
    )


# -- the token endpoint -----------------------------------------------------


async def token_endpoint(request: web.Request) -> web.Response:
    """``POST /services/oauth2/token``."""
    try:
        if request.content_type != "application/x-www-form-urlencoded":
            raise OAuthError("unsupported_grant_type", "grant type not supported")
        form = {k: str(v) for k, v in (await request.post()).items()}
        _basic_credentials(request, form)
        body = _grant(request, form)
    except OAuthError as exc:
        logger.info(
            "token request refused",
            extra={"error": exc.error, "description": exc.description},
        )
        return _json({"error": exc.error, "error_description": exc.description}, 400)
    return _json(body, 200)


async def revoke_endpoint(request: web.Request) -> web.Response:
    """``POST /services/oauth2/revoke``: forget an access or refresh token."""
    form = await request.post()
    token = str(form.get("token") or request.query.get("token") or "")
    if not request.app[TOKENS_KEY].revoke(token):
        return _json(
            {
                "error": "unsupported_token_type",
                "error_description": "this token type is not supported",
            },
            400,
        )
    return web.Response(status=200)


def _grant(request: web.Request, form: dict[str, str]) -> dict[str, Any]:
    grant_type = form.get("grant_type", "")
    if grant_type == "password":
        return _password_grant(request, form)
    if grant_type == "refresh_token":
        return _refresh_grant(request, form)
    if grant_type == "client_credentials":
        _check_client(request, form, secret_required=True)
        return _respond(request, _integration_user(request), form["client_id"], True)
    if grant_type == "urn:ietf:params:oauth:grant-type:jwt-bearer":
        return _jwt_grant(request, form)
    raise OAuthError("unsupported_grant_type", "grant type not supported")


def _basic_credentials(request: web.Request, form: dict[str, str]) -> None:
    # Client credentials may come as HTTP Basic auth instead of form fields.
    header = request.headers.get("Authorization", "")
    if not header.lower().startswith("basic "):
        return
    try:
        decoded = base64.b64decode(header[6:].strip()).decode()
    except (binascii.Error, UnicodeDecodeError):
        raise OAuthError("invalid_client", "invalid client credentials") from None
    client_id, _, secret = decoded.partition(":")
    form.setdefault("client_id", client_id)
    form.setdefault("client_secret", secret)


def _check_client(
    request: web.Request, form: dict[str, str], *, secret_required: bool
) -> None:
    config = request.app[CONFIG_KEY]
    if form.get("client_id") != config.client_id:
        raise OAuthError("invalid_client_id", "client identifier invalid")
    secret = form.get("client_secret")
    if (secret is not None or secret_required) and not hmac.compare_digest(
        secret or "", config.client_secret
    ):
        raise OAuthError("invalid_client", "invalid client credentials")


def _password_grant(request: web.Request, form: dict[str, str]) -> dict[str, Any]:
    _check_client(request, form, secret_required=False)
    config = request.app[CONFIG_KEY]
    expected = config.password + config.security_token
    user = request.app[STATE_KEY].find_user(form.get("username", ""))
    if user is None or not hmac.compare_digest(form.get("password", ""), expected):
        raise OAuthError("invalid_grant", "authentication failure")
    return _respond(request, user, form["client_id"], False)


def _refresh_grant(request: web.Request, form: dict[str, str]) -> dict[str, Any]:
    _check_client(request, form, secret_required=False)
    tokens = request.app[TOKENS_KEY]
    session = tokens.redeem_refresh_token(
        form.get("refresh_token", ""), form["client_id"]
    )
    if session is None:
        raise OAuthError("invalid_grant", "expired access/refresh token")
    return _body(request, session, with_scope=True)


def _jwt_grant(request: web.Request, form: dict[str, str]) -> dict[str, Any]:
    claims = _jwt_claims(form.get("assertion", ""))
    config = request.app[CONFIG_KEY]
    if claims.get("iss") != config.client_id:
        raise OAuthError("invalid_client_id", "client identifier invalid")
    audiences = (*_AUDIENCES, str(request.url.origin()))
    if str(claims.get("aud", "")).rstrip("/") not in audiences:
        raise OAuthError("invalid_grant", "audience is invalid")
    expires = claims.get("exp")
    if not isinstance(expires, int | float) or expires < datetime.now(UTC).timestamp():
        raise OAuthError("invalid_grant", "expired authorization code")
    user = request.app[STATE_KEY].find_user(str(claims.get("sub", "")))
    if user is None:
        raise OAuthError("invalid_grant", "user hasn't approved this consumer")
    return _respond(request, user, config.client_id, False)


def _jwt_claims(assertion: str) -> dict[str, Any]:
    parts = assertion.split(".")
    if len(parts) != 3:
        raise OAuthError("invalid_grant", "invalid assertion")
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = orjson.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, orjson.JSONDecodeError, ValueError):
        raise OAuthError("invalid_grant", "invalid assertion") from None
    if not isinstance(claims, dict):
        raise OAuthError("invalid_grant", "invalid assertion")
    return claims


def _integration_user(request: web.Request) -> Any:
    config = request.app[CONFIG_KEY]
    user = request.app[STATE_KEY].find_user(config.username)
    if user is None:
        raise OAuthError("invalid_grant", "authentication failure")
    return user


def _respond(
    request: web.Request, user: Any, client_id: str, with_scope: bool
) -> dict[str, Any]:
    session = request.app[TOKENS_KEY].issue(user["Id"], user["Username"], client_id)
    logger.info("token issued", extra={"user_id": user["Id"], "client_id": client_id})
    return _body(request, session, with_scope=with_scope)


def _body(
    request: web.Request, session: Session, *, with_scope: bool
) -> dict[str, Any]:
    instance_url = str(request.url.origin())
    identity = f"{instance_url}/id/{session.org_id}/{session.user_id}"
    issued_at = str(int(session.issued_at.timestamp() * 1000))
    secret = request.app[CONFIG_KEY].client_secret.encode()
    digest = hmac.new(secret, (identity + issued_at).encode(), hashlib.sha256)
    body: dict[str, Any] = {
        "access_token": session.access_token,
        "instance_url": instance_url,
        "id": identity,
        "token_type": "Bearer",
        "issued_at": issued_at,
        "signature": base64.b64encode(digest.digest()).decode(),
    }
    if with_scope:
        body["scope"] = "api id"
    return body


def _json(body: Any, status: int) -> web.Response:
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type="application/json",
        charset="UTF-8",
    )


def setup_oauth(app: web.Application) -> None:
    """Add the token and revoke endpoints to ``app``."""
    app.router.add_post("/services/oauth2/token", token_endpoint)
    app.router.add_post("/services/oauth2/revoke", revoke_endpoint)
