"""The REST API under ``/services/data/``: versions, sObjects, describe, limits.

A middleware guards every versioned call: session check (401
``INVALID_SESSION_ID``), planned faults, the daily request budget (403
``REQUEST_LIMIT_EXCEEDED``) and the ``Sforce-Limit-Info`` header on every
response; routes other parts add under ``/services/data/vNN.N/`` (query,
queryAll) get the same treatment. One call is one transaction of the org
state; its origin is the ``client=`` of ``Sforce-Call-Options``.
Collections live in ``composite``; shapes follow reference §5.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from replicator.emulator.describe import (
    describe_global_entry,
    describe_object,
    record_url,
    render_record,
)
from replicator.emulator.keys import (
    CONFIG_KEY,
    FAULTS_KEY,
    SCHEMA_KEY,
    STATE_KEY,
    TOKENS_KEY,
    USAGE_KEY,
)
from replicator.emulator.oauth import Session
from replicator.emulator.schema import ObjectSchema
from replicator.emulator.values import ApiError

__all__ = [
    "SESSION_KEY",
    "ApiUsage",
    "call_origin",
    "current_session",
    "error_response",
    "json_response",
    "middleware",
    "parse_call_options",
    "read_json",
    "request_version",
    "setup_rest",
    "supported_versions",
]

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SESSION_KEY: web.RequestKey[Session] = web.RequestKey("emulator.session")
_VERSIONED = re.compile(r"/services/data/v(\d+\.\d)(?:/|$)")
_FIRST_VERSION = 31
_SEASONS = ("Spring", "Summer", "Winter")


class ApiUsage:
    """The org's daily API request budget (no daily reset: restart for that)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self) -> bool:
        """Count one request; ``False`` when the budget is spent."""
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def header(self) -> str:
        return f"api-usage={self.used}/{self.limit}"


# -- helpers other parts use ---------------------------------------------------


def json_response(body: Any, status: int = 200) -> web.Response:
    """Return JSON as Salesforce does (``application/json;charset=UTF-8``)."""
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        headers={"Content-Type": "application/json;charset=UTF-8"},
    )


def error_response(exc: ApiError) -> web.Response:
    """Return Salesforce's error array for one ``ApiError``."""
    if exc.status == 300:
        return json_response(list(exc.matches), 300)
    return json_response([exc.body()], exc.status)


def current_session(request: web.Request) -> Session:
    """Return the session the middleware validated for this request."""
    return request[SESSION_KEY]


def parse_call_options(header: str | None) -> dict[str, str]:
    """Parse ``Sforce-Call-Options``: ``;``-separated now, ``,`` in older docs."""
    options: dict[str, str] = {}
    for part in re.split(r"[;,]", header or ""):
        key, sep, value = part.strip().partition("=")
        if sep:
            options[key.strip()] = value.strip()
    return options


def call_origin(request: web.Request) -> str | None:
    """Return the ``client=`` value of ``Sforce-Call-Options``, if any."""
    return parse_call_options(request.headers.get("Sforce-Call-Options")).get("client")


def request_version(request: web.Request) -> str:
    """Return the API version of a versioned path, e.g. ``"60.0"``."""
    match = _VERSIONED.match(request.path)
    return match.group(1) if match else request.app[CONFIG_KEY].api_version


def supported_versions(latest: str) -> list[dict[str, str]]:
    """List versions 31.0 up to ``latest`` with their release labels."""
    last = int(float(latest))
    versions = []
    for number in range(_FIRST_VERSION, last + 1):
        # 60.0 is Spring '24; three releases a year, Winter named for the next.
        offset = number - 60
        season = _SEASONS[offset % 3]
        year = 24 + offset // 3 + (1 if season == "Winter" else 0)
        versions.append(
            {
                "label": f"{season} '{year:02d}",
                "url": f"/services/data/v{number}.0",
                "version": f"{number}.0",
            }
        )
    return versions


async def read_json(request: web.Request) -> Any:
    """Parse a JSON request body or raise Salesforce's ``JSON_PARSER_ERROR``."""
    raw = await request.read()
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as exc:
        raise ApiError(
            400, "JSON_PARSER_ERROR", f"Unexpected character: {exc.msg}"
        ) from None


async def read_object(request: web.Request) -> dict[str, Any]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise ApiError(
            400,
            "JSON_PARSER_ERROR",
            "Cannot deserialize instance of sObject from a non-object value",
        )
    return body


def user_transaction(request: web.Request) -> Any:
    """Open the org transaction of this call, as its user and origin."""
    return request.app[STATE_KEY].transaction(
        origin=call_origin(request), user_id=current_session(request).user_id
    )


# -- middleware ------------------------------------------------------------------


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate, inject faults, count usage and add ``Sforce-Limit-Info``."""
    match = _VERSIONED.match(request.path)
    if match is None:
        return await handler(request)
    app = request.app
    usage = app[USAGE_KEY]
    latency = app[FAULTS_KEY].latency_seconds
    if latency > 0:
        await asyncio.sleep(latency)
    try:
        response = await _guarded(request, handler, match.group(1))
    except ApiError as exc:
        response = error_response(exc)
    response.headers["Sforce-Limit-Info"] = usage.header()
    return response


async def _guarded(
    request: web.Request, handler: Handler, version: str
) -> web.StreamResponse:
    app = request.app
    header = request.headers.get("Authorization")
    session = app[TOKENS_KEY].validate(header)
    if session is None:
        if (
            header
            and len(header.split()) > 1
            and header.split()[0].lower()
            not in (
                "bearer",
                "oauth",
            )
        ):
            raise ApiError(401, "INVALID_AUTH_HEADER", "INVALID_HEADER_TYPE")
        raise ApiError(401, "INVALID_SESSION_ID", "Session expired or invalid")
    request[SESSION_KEY] = session
    if not app[USAGE_KEY].charge():
        raise ApiError(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.")
    failure = app[FAULTS_KEY].take_failure(request.method, request.path)
    if failure is not None:
        logger.info(
            "rest fault injected",
            extra={"error": failure.error_code, "path": request.path},
        )
        raise failure
    if version not in {
        v["version"] for v in supported_versions(app[CONFIG_KEY].api_version)
    }:
        raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")
    try:
        return await handler(request)
    except web.HTTPNotFound:
        raise ApiError(
            404, "NOT_FOUND", "The requested resource does not exist"
        ) from None
    except web.HTTPMethodNotAllowed as exc:
        raise ApiError(
            405,
            "METHOD_NOT_ALLOWED",
            f"HTTP Method '{request.method}' not allowed. Allowed are "
            f"{', '.join(sorted(exc.allowed_methods))}",
        ) from None


# -- handlers ----------------------------------------------------------------------


async def versions(request: web.Request) -> web.Response:
    return json_response(supported_versions(request.app[CONFIG_KEY].api_version))


async def resources(request: web.Request) -> web.Response:
    base = f"/services/data/v{request_version(request)}"
    names = ("sobjects", "query", "queryAll", "composite", "limits", "search")
    return json_response({name: f"{base}/{name}" for name in names})


async def limits(request: web.Request) -> web.Response:
    usage = request.app[USAGE_KEY]

    def pair(maximum: int, remaining: int) -> dict[str, int]:
        return {"Max": maximum, "Remaining": remaining}

    return json_response(
        {
            "DailyApiRequests": pair(usage.limit, usage.limit - usage.used),
            "DailyBulkV2QueryFileStorageMB": pair(976562, 976562),
            "DailyBulkV2QueryJobs": pair(10000, 10000),
            "DailyDeliveredPlatformEvents": pair(10000, 10000),
            "DataStorageMB": pair(1024, 1024),
        }
    )


async def describe_global(request: web.Request) -> web.Response:
    version = request_version(request)
    schema = request.app[SCHEMA_KEY]
    return json_response(
        {
            "encoding": "UTF-8",
            "maxBatchSize": 200,
            "sobjects": [
                describe_global_entry(obj, version) for obj in schema.objects.values()
            ],
        }
    )


def _object(request: web.Request) -> ObjectSchema:
    return request.app[STATE_KEY].object(request.match_info["sobject"])


async def basic_info(request: web.Request) -> web.Response:
    obj = _object(request)
    return json_response(
        {
            "objectDescribe": describe_global_entry(obj, request_version(request)),
            "recentItems": [],
        }
    )


async def describe(request: web.Request) -> web.Response:
    obj = _object(request)
    schema = request.app[SCHEMA_KEY]
    return json_response(describe_object(schema, obj, request_version(request)))


async def create(request: web.Request) -> web.Response:
    obj = _object(request)
    body = await read_object(request)
    body.pop("attributes", None)
    with user_transaction(request) as tx:
        record_id = tx.create(obj.name, body)
    return json_response({"id": record_id, "success": True, "errors": []}, 201)


def _record_or_external(request: web.Request) -> tuple[ObjectSchema, str]:
    """Return the object and the 18-character id named by the path.

    A segment that is not an id of this object is read as an external-id
    field name, as Salesforce does (reference §5.2).
    """
    obj = _object(request)
    segment = request.match_info["record_id"]
    state = request.app[STATE_KEY]
    record = state.get(segment, include_deleted=True)
    if record is None or not record["Id"].startswith(obj.key_prefix):
        if _looks_like_id(segment, obj):
            raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")
        state.external_id_field(obj, segment)  # raises NOT_FOUND for non-fields
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "PATCH", "DELETE"])
    return obj, record["Id"]


def _looks_like_id(segment: str, obj: ObjectSchema) -> bool:
    from replicator.emulator import ids

    return ids.is_valid_id(segment) and segment.startswith(obj.key_prefix)


def _fields_param(request: web.Request, obj: ObjectSchema) -> list[str] | None:
    raw = request.query.get("fields")
    if not raw:
        return None
    names = []
    lowered = {name.lower(): name for name in obj.fields}
    for item in raw.split(","):
        name = lowered.get(item.strip().lower())
        if name is None:
            raise ApiError(
                400,
                "INVALID_FIELD",
                f"No such column '{item.strip()}' on entity '{obj.name}'. If you are "
                "attempting to use a custom field, be sure to append the '__c' after "
                "the custom field name. Please reference your WSDL or the describe "
                "call for the appropriate names.",
            )
        names.append(name)
    return names


async def retrieve(request: web.Request) -> web.Response:
    obj, record_id = _record_or_external(request)
    record = request.app[STATE_KEY].get(record_id)
    if record is None:  # in the recycle bin: reference §5.2 [UNCONFIRMED]
        raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")
    fields = _fields_param(request, obj)
    return json_response(render_record(obj, record, request_version(request), fields))


async def update(request: web.Request) -> web.Response:
    obj, record_id = _record_or_external(request)
    body = await read_object(request)
    body.pop("attributes", None)
    with user_transaction(request) as tx:
        tx.update(obj.name, record_id, body)
    return web.Response(status=204)


async def delete(request: web.Request) -> web.Response:
    obj, record_id = _record_or_external(request)
    with user_transaction(request) as tx:
        tx.delete(obj.name, record_id)
    return web.Response(status=204)


async def by_external_id(request: web.Request) -> web.Response:
    """GET, PATCH (upsert) and DELETE on ``/sobjects/<Type>/<Field>/<value>``."""
    obj = _object(request)
    state = request.app[STATE_KEY]
    field_name = state.external_id_field(obj, request.match_info["field"])
    value = request.match_info["value"]
    version = request_version(request)
    if request.method == "PATCH":
        return await _upsert(request, obj, field_name, value)
    matches = state.match_external_id(obj.name, field_name, value)
    if len(matches) > 1:
        raise ApiError(
            300,
            "MULTIPLE_CHOICES",
            "",
            matches=tuple(record_url(version, obj.name, m) for m in matches),
        )
    if not matches:
        raise ApiError(404, "NOT_FOUND", "The requested resource does not exist")
    if request.method == "DELETE":
        with user_transaction(request) as tx:
            tx.delete(obj.name, matches[0])
        return web.Response(status=204)
    record = state.get(matches[0])
    assert record is not None
    fields = _fields_param(request, obj)
    return json_response(render_record(obj, record, version, fields))


async def _upsert(
    request: web.Request, obj: ObjectSchema, field_name: str, value: str
) -> web.Response:
    body = await read_object(request)
    body.pop("attributes", None)
    if "Id" in body or "id" in body:
        raise ApiError(
            400,
            "INVALID_FIELD",
            "The Id field should not be specified in the sobject data.",
        )
    if field_name in body and str(body.pop(field_name)) != value:
        raise ApiError(
            400,
            "INVALID_FIELD",
            f"Cannot specify {field_name} in the sobject data when upserting by it.",
        )
    version = request_version(request)
    try:
        with user_transaction(request) as tx:
            record_id, created = tx.upsert(obj.name, field_name, value, body)
    except ApiError as exc:
        if exc.status == 300:
            exc.matches = tuple(record_url(version, obj.name, m) for m in exc.matches)
        raise
    result = {"id": record_id, "success": True, "errors": [], "created": created}
    if float(version) < 46.0:
        result.pop("created")
        if not created:
            return web.Response(status=204)
    return json_response(result, 201 if created else 200)


DATA_ROUTE = "/services/data/v{version:\\d+\\.\\d}"


def setup_rest(app: web.Application) -> None:
    """Add the REST routes to ``app`` (collections: ``composite``)."""
    router = app.router
    data = DATA_ROUTE
    sobject = data + "/sobjects/{sobject}"
    router.add_get("/services/data", versions)
    router.add_get("/services/data/", versions)
    router.add_get(data, resources)
    router.add_get(data + "/", resources)
    router.add_get(data + "/limits", limits)
    router.add_get(data + "/limits/", limits)
    router.add_get(data + "/sobjects", describe_global)
    router.add_get(data + "/sobjects/", describe_global)
    router.add_get(sobject, basic_info)
    router.add_get(sobject + "/", basic_info)
    router.add_post(sobject, create)
    router.add_post(sobject + "/", create)
    router.add_get(sobject + "/describe", describe)
    router.add_get(sobject + "/describe/", describe)
    router.add_get(sobject + "/{record_id}", retrieve)
    router.add_patch(sobject + "/{record_id}", update)
    router.add_delete(sobject + "/{record_id}", delete)
    for method in ("GET", "PATCH", "DELETE"):
        router.add_route(method, sobject + "/{field}/{value}", by_external_id)
