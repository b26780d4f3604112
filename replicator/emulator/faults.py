"""REST-side fault injection and the request log, with their control API.

Tests make the next N REST calls fail with a chosen error, slow every call
down, expire all tokens, and read back what the emulator received (method,
path, headers without credentials, body). The JSON control API lives under
``/__emulator__/``; the same operations are methods of ``Faults``.
Streaming faults are the streaming part's business.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from replicator.emulator.keys import CONFIG_KEY, FAULTS_KEY, STATE_KEY, TOKENS_KEY
from replicator.emulator.values import ApiError

__all__ = ["FAULT_ERRORS", "Faults", "LoggedRequest", "setup_control"]

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# error name -> (HTTP status, errorCode, message); {id} is the record id of
# the path, when there is one.
FAULT_ERRORS: dict[str, tuple[int, str, str]] = {
    "REQUEST_LIMIT_EXCEEDED": (
        403,
        "REQUEST_LIMIT_EXCEEDED",
        "TotalRequests Limit exceeded.",
    ),
    "UNABLE_TO_LOCK_ROW": (
        400,
        "UNABLE_TO_LOCK_ROW",
        "unable to obtain exclusive access to this record or 1 records: {id}",
    ),
    "SERVICE_UNAVAILABLE": (503, "SERVER_UNAVAILABLE", "Service Unavailable"),
}
_SECRET_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
_SECRET_FORM_FIELDS = frozenset(
    {"password", "client_secret", "assertion", "refresh_token", "code", "token"}
)


@dataclass(frozen=True, slots=True)
class LoggedRequest:
    """One request as the emulator received it, credentials removed."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any  # parsed JSON, a form dict, text, or None
    time: datetime

    def as_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": self.headers,
            "body": self.body,
            "time": self.time.isoformat(),
        }


@dataclass(slots=True)
class _PlannedFailure:
    error: str
    remaining: int
    method: str | None
    path_contains: str | None


@dataclass(slots=True)
class Faults:
    """Planned REST failures, added latency, and the request log."""

    requests: list[LoggedRequest] = field(default_factory=list)
    latency_seconds: float = 0.0
    _planned: list[_PlannedFailure] = field(default_factory=list)

    def fail_next(
        self,
        count: int = 1,
        error: str = "UNABLE_TO_LOCK_ROW",
        *,
        method: str | None = None,
        path_contains: str | None = None,
    ) -> None:
        """Fail the next ``count`` REST calls that match with ``error``."""
        if error not in FAULT_ERRORS:
            raise ValueError(f"unknown fault {error!r}; known: {sorted(FAULT_ERRORS)}")
        self._planned.append(
            _PlannedFailure(error, count, method and method.upper(), path_contains)
        )

    def take_failure(self, method: str, path: str) -> ApiError | None:
        """Consume one planned failure matching this call, if any."""
        for planned in self._planned:
            if planned.method not in (None, method.upper()):
                continue
            if planned.path_contains and planned.path_contains not in path:
                continue
            planned.remaining -= 1
            if planned.remaining <= 0:
                self._planned.remove(planned)
            status, code, message = FAULT_ERRORS[planned.error]
            record_id = path.rstrip("/").rsplit("/", 1)[-1]
            fields = () if status == 400 else None
            return ApiError(status, code, message.format(id=record_id), fields=fields)
        return None

    def matching(
        self, method: str | None = None, path_contains: str | None = None
    ) -> list[LoggedRequest]:
        """Return logged requests by method and path fragment, oldest first."""
        return [
            r
            for r in self.requests
            if (method is None or r.method == method.upper())
            and (path_contains is None or path_contains in r.path)
        ]

    def reset(self) -> None:
        """Drop planned failures and latency (the log stays)."""
        self._planned.clear()
        self.latency_seconds = 0.0


@web.middleware
async def request_log_middleware(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    """Log every ``/services/`` request before anything else looks at it."""
    if request.path.startswith("/services/"):
        raw = await request.read()
        request.app[FAULTS_KEY].requests.append(
            LoggedRequest(
                method=request.method,
                path=request.path,
                query={str(k): v for k, v in request.query.items()},
                headers={
                    str(k): v
                    for k, v in request.headers.items()
                    if k.lower() not in _SECRET_HEADERS
                },
                body=_loggable_body(request.content_type, raw),
                time=datetime.now(UTC),
            )
        )
    return await handler(request)


def _loggable_body(content_type: str, raw: bytes) -> Any:
    if not raw:
        return None
    if content_type == "application/x-www-form-urlencoded":
        return {
            k: ("***" if k in _SECRET_FORM_FIELDS else v)
            for k, v in parse_qsl(raw.decode(errors="replace"))
        }
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")


# -- control API --------------------------------------------------------------


def _ok(body: Any = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body if body is not None else {"ok": True}),
        content_type="application/json",
    )


async def _json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise web.HTTPBadRequest(text="body must be a JSON object") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return body


async def _get_requests(request: web.Request) -> web.Response:
    found = request.app[FAULTS_KEY].matching(
        request.query.get("method"), request.query.get("path_contains")
    )
    return _ok([r.as_json() for r in found])


async def _clear_requests(request: web.Request) -> web.Response:
    request.app[FAULTS_KEY].requests.clear()
    return _ok()


async def _plan_failure(request: web.Request) -> web.Response:
    body = await _json_body(request)
    try:
        request.app[FAULTS_KEY].fail_next(
            int(body.get("count", 1)),
            str(body.get("error", "UNABLE_TO_LOCK_ROW")),
            method=body.get("method"),
            path_contains=body.get("path_contains"),
        )
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    logger.info("rest failure planned", extra={"fault": body})
    return _ok()


async def _set_latency(request: web.Request) -> web.Response:
    body = await _json_body(request)
    request.app[FAULTS_KEY].latency_seconds = float(body.get("seconds", 0.0))
    return _ok()


async def _reset(request: web.Request) -> web.Response:
    request.app[FAULTS_KEY].reset()
    return _ok()


async def _expire_tokens(request: web.Request) -> web.Response:
    return _ok({"expired": request.app[TOKENS_KEY].expire_all()})


async def _refresh_token(request: web.Request) -> web.Response:
    body = await _json_body(request)
    config = request.app[CONFIG_KEY]
    username = str(body.get("username", config.username))
    user = request.app[STATE_KEY].find_user(username)
    if user is None:
        raise web.HTTPNotFound(text=f"no user {username!r}")
    token = request.app[TOKENS_KEY].issue_refresh_token(
        user["Id"], user["Username"], config.client_id
    )
    return _ok({"refresh_token": token})


async def _undelete(request: web.Request) -> web.Response:
    # Salesforce's REST API has no undelete resource (SOAP undelete() and
    # Apex Database.undelete do it); the control API stands in for them.
    body = await _json_body(request)
    state = request.app[STATE_KEY]
    config = request.app[CONFIG_KEY]
    user = state.find_user(config.username)
    results = []
    with state.transaction(
        origin=body.get("origin"), user_id=user["Id"] if user else ""
    ) as tx:
        for record_id in body.get("ids", []):
            try:
                tx.undelete(None, str(record_id))
            except ApiError as exc:
                results.append(
                    {
                        "id": record_id,
                        "success": False,
                        "errors": [exc.collection_body()],
                    }
                )
            else:
                results.append({"id": record_id, "success": True, "errors": []})
    return _ok(results)


def setup_control(app: web.Application) -> None:
    """Mount the ``/__emulator__/`` control API."""
    router = app.router
    router.add_get("/__emulator__/requests", _get_requests)
    router.add_delete("/__emulator__/requests", _clear_requests)
    router.add_post("/__emulator__/faults/rest", _plan_failure)
    router.add_post("/__emulator__/faults/latency", _set_latency)
    router.add_delete("/__emulator__/faults", _reset)
    router.add_post("/__emulator__/tokens/expire", _expire_tokens)
    router.add_post("/__emulator__/oauth/refresh_token", _refresh_token)
    router.add_post("/__emulator__/records/undelete", _undelete)
