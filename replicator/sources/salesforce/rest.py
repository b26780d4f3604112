"""A small Salesforce REST client: describe, SOQL with paging, retrieve, writes.

Errors are translated here (``reference/salesforce.md`` section 5.7): an
expired session re-authenticates once; REQUEST_LIMIT_EXCEEDED, UNABLE_TO_LOCK_ROW
and 5xx answers are retried with backoff; anything else raises
``SalesforceRestError`` with Salesforce's own code and message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol
from urllib.parse import quote

import aiohttp
import orjson

from replicator.backoff import Backoff
from replicator.errors import SalesforceError

logger = logging.getLogger(__name__)

_RETRY_CODES = frozenset(
    {"REQUEST_LIMIT_EXCEEDED", "UNABLE_TO_LOCK_ROW", "SERVER_UNAVAILABLE"}
)


class AuthLike(Protocol):
    """What the REST client needs of ``auth.Authenticator``."""

    async def login(self) -> Any: ...

    async def refresh(self) -> Any: ...

    def header(self) -> dict[str, str]: ...

    @property
    def instance_url(self) -> str: ...


class SalesforceRestError(SalesforceError):
    """Salesforce answered an error; ``code`` is its errorCode."""

    retriable = False

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message} (HTTP {status})")
        self.status = status
        self.code = code
        self.message = message


class SalesforceBusyError(SalesforceRestError):
    """A passing refusal: limits, row locks, unavailability. Retried with backoff."""

    retriable = True


def _error_of(status: int, body: Any) -> SalesforceRestError:
    code, message = f"HTTP_{status}", str(body)[:300]
    if isinstance(body, list) and body and isinstance(body[0], dict):
        code = str(body[0].get("errorCode", code))
        message = str(body[0].get("message", message))
    elif isinstance(body, dict) and "error" in body:
        code, message = str(body["error"]), str(body.get("error_description", ""))
    cls = (
        SalesforceBusyError
        if (code in _RETRY_CODES or status >= 500)
        else SalesforceRestError
    )
    return cls(status, code, message)


class RestClient:
    """REST calls against one org through one aiohttp session."""

    def __init__(
        self,
        auth: AuthLike,
        session: aiohttp.ClientSession,
        *,
        api_version: str = "60.0",
        client_name: str | None = None,
        attempts: int = 6,
    ) -> None:
        self.auth = auth
        self.http = session
        self.api_version = api_version
        self.client_name = client_name
        self.attempts = attempts
        self.calls = 0

    @property
    def base(self) -> str:
        return f"{self.auth.instance_url}/services/data/v{self.api_version}"

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """Send one call; return its decoded JSON body (None for 204)."""
        url = (
            path
            if path.startswith("http")
            else (
                f"{self.auth.instance_url}{path}"
                if path.startswith("/services")
                else f"{self.base}{path}"
            )
        )
        backoff = Backoff(initial=0.2, cap=10)
        reauthenticated = False
        # A refreshed session repeats the call once more: it is no attempt.
        attempt = 0
        while attempt < self.attempts:
            attempt += 1
            headers = {**self.auth.header(), "Accept": "application/json"}
            if self.client_name:
                headers["Sforce-Call-Options"] = f"client={self.client_name}"
            data = None
            if json is not None:
                headers["Content-Type"] = "application/json"
                data = orjson.dumps(json)
            try:
                async with self.http.request(
                    method, url, data=data, params=params, headers=headers
                ) as resp:
                    self.calls += 1
                    raw = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                error: SalesforceError = SalesforceBusyError(0, "CONNECTION", str(exc))
            else:
                body = orjson.loads(raw) if raw else None
                if status < 300 or status == 300:
                    return body
                error = _error_of(status, body)
                if status == 401 and not reauthenticated:
                    reauthenticated = True
                    await self.auth.refresh()
                    attempt -= 1
                    continue
            if not error.retriable or attempt == self.attempts:
                raise error
            delay = backoff.next_delay()
            logger.warning(
                "salesforce call refused, retrying",
                extra={
                    "method": method,
                    "path": path.split("?")[0],
                    "error": str(error),
                    "attempt": attempt,
                    "retry_in": round(delay, 2),
                },
            )
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def describe(self, object_name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "GET", f"/sobjects/{object_name}/describe"
        )
        return result

    async def describe_global(self) -> list[dict[str, Any]]:
        body = await self.request("GET", "/sobjects")
        return list(body["sobjects"])

    async def query(
        self, soql: str, *, include_deleted: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield every record of ``soql``, following ``nextRecordsUrl``."""
        resource = "/queryAll" if include_deleted else "/query"
        body = await self.request("GET", resource, params={"q": soql})
        while True:
            for record in body["records"]:
                yield record
            next_url = body.get("nextRecordsUrl")
            if body.get("done", True) or not next_url:
                return
            body = await self.request("GET", next_url)

    async def retrieve(
        self, object_name: str, record_id: str, fields: list[str] | None = None
    ) -> dict[str, Any] | None:
        """Return the record, or None when it does not exist or is deleted."""
        params = {"fields": ",".join(fields)} if fields else None
        try:
            result: dict[str, Any] = await self.request(
                "GET", f"/sobjects/{object_name}/{quote(record_id)}", params=params
            )
            return result
        except SalesforceRestError as exc:
            if exc.status == 404 or exc.code in ("NOT_FOUND", "ENTITY_IS_DELETED"):
                return None
            raise
