"""sObject Collections: ``/composite/sobjects`` create, update, upsert, delete, get.

Up to 200 records a call, one org transaction per call. Results come back
in input order with HTTP 200 even when records fail; errors use
``statusCode`` (not ``errorCode``). With ``allOrNone`` a single failure
rolls every record back and the others report
``ALL_OR_NONE_OPERATION_ROLLED_BACK`` (reference §5.6).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from replicator.emulator import ids, rest
from replicator.emulator.describe import render_record
from replicator.emulator.keys import STATE_KEY
from replicator.emulator.state import Transaction
from replicator.emulator.values import ApiError

__all__ = ["MAX_RECORDS", "setup_composite"]

MAX_RECORDS = 200
_ROLLED_BACK = {
    "statusCode": "ALL_OR_NONE_OPERATION_ROLLED_BACK",
    "message": "Record rolled back because not all records were valid and the "
    "request was using AllOrNone header",
    "fields": [],
}

# One record's operation: returns its success result or raises ApiError.
Operation = Callable[[Transaction, Any], dict[str, Any]]


class _RollBack(Exception):
    """Leaves the transaction block so that allOrNone undoes every record."""


def _run(
    request: web.Request,
    items: list[Any],
    all_or_none: bool,
    operation: Operation,
    failure_id: Callable[[Any], str | None],
) -> web.Response:
    if len(items) > MAX_RECORDS:
        raise ApiError(
            400,
            "EXCEEDED_ID_LIMIT",
            f"record limit reached. cannot submit more than {MAX_RECORDS} records "
            "into this call",
        )
    results: list[dict[str, Any]] = []
    failed = False
    try:
        with rest.user_transaction(request) as tx:
            for item in items:
                try:
                    results.append(operation(tx, item))
                except ApiError as exc:
                    failed = True
                    result: dict[str, Any] = {
                        "success": False,
                        "errors": [exc.collection_body()],
                    }
                    item_id = failure_id(item)
                    if item_id is not None:
                        result = {"id": item_id, **result}
                    results.append(result)
            if failed and all_or_none:
                raise _RollBack
    except _RollBack:
        results = [
            r
            if not r["success"]
            else {"id": None, "success": False, "errors": [dict(_ROLLED_BACK)]}
            for r in results
        ]
    return rest.json_response(results)


def _records(body: Any) -> tuple[list[Any], bool]:
    if not isinstance(body, dict) or not isinstance(body.get("records"), list):
        raise ApiError(
            400, "JSON_PARSER_ERROR", "Cannot deserialize the request: records required"
        )
    return body["records"], bool(body.get("allOrNone", False))


def _type_of(item: Any) -> str:
    if not isinstance(item, dict):
        raise ApiError(400, "JSON_PARSER_ERROR", "Each record must be a JSON object")
    attributes = item.get("attributes")
    if not isinstance(attributes, dict) or not attributes.get("type"):
        raise ApiError(
            400, "INVALID_TYPE", "Must specify a type in attributes", fields=()
        )
    return str(attributes["type"])


def _values(item: dict[str, Any], *drop: str) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k != "attributes" and k not in drop}


async def create(request: web.Request) -> web.Response:
    records, all_or_none = _records(await rest.read_json(request))

    def operation(tx: Transaction, item: Any) -> dict[str, Any]:
        object_name = _type_of(item)
        if "id" in item or "Id" in item:
            raise ApiError(
                400,
                "INVALID_FIELD",
                "cannot specify Id in an insert call",
                fields=("Id",),
            )
        record_id = tx.create(object_name, _values(item))
        return {"id": record_id, "success": True, "errors": []}

    return _run(request, records, all_or_none, operation, lambda item: None)


def _given_id(item: Any) -> str | None:
    if isinstance(item, dict):
        value = item.get("id", item.get("Id"))
        return str(value) if value is not None else None
    return None


async def update(request: web.Request) -> web.Response:
    records, all_or_none = _records(await rest.read_json(request))

    def operation(tx: Transaction, item: Any) -> dict[str, Any]:
        object_name = _type_of(item)
        record_id = _given_id(item)
        if record_id is None:
            raise ApiError(
                400, "MISSING_ARGUMENT", "Id not specified in an update call", fields=()
            )
        tx.update(object_name, record_id, _values(item, "id", "Id"))
        return {"id": ids.normalize_id(record_id), "success": True, "errors": []}

    return _run(request, records, all_or_none, operation, _given_id)


async def delete(request: web.Request) -> web.Response:
    raw = request.query.get("ids", "")
    record_ids = [part for part in raw.split(",") if part]
    all_or_none = request.query.get("allOrNone", "false").lower() == "true"

    def operation(tx: Transaction, record_id: Any) -> dict[str, Any]:
        tx.delete(None, str(record_id))
        return {"id": ids.normalize_id(record_id), "success": True, "errors": []}

    return _run(request, record_ids, all_or_none, operation, str)


async def upsert(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    obj = state.object(request.match_info["sobject"])
    field_name = state.external_id_field(obj, request.match_info["field"])
    records, all_or_none = _records(await rest.read_json(request))

    def operation(tx: Transaction, item: Any) -> dict[str, Any]:
        object_name = _type_of(item)
        if state.object(object_name) is not obj:
            raise ApiError(
                400, "INVALID_TYPE", f"Record type must be {obj.name}", fields=()
            )
        value = item.get(field_name)
        if value in (None, ""):
            raise ApiError(
                400,
                "MISSING_ARGUMENT",
                f"{field_name} not specified",
                fields=(field_name,),
            )
        matches = state.match_external_id(obj.name, field_name, str(value))
        if len(matches) > 1:
            raise ApiError(
                300,
                "DUPLICATE_EXTERNAL_ID",
                f"{field_name}: more than one record found for external id field: "
                f"{matches}",
                fields=(field_name,),
            )
        record_id, created = tx.upsert(
            obj.name, field_name, str(value), _values(item, field_name)
        )
        return {"id": record_id, "success": True, "errors": [], "created": created}

    return _run(request, records, all_or_none, operation, lambda item: None)


async def retrieve(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    obj = state.object(request.match_info["sobject"])
    if request.method == "POST":
        body = await rest.read_json(request) or {}
        record_ids = list(body.get("ids", []))
        fields_raw = ",".join(body.get("fields", []))
    else:
        record_ids = [p for p in request.query.get("ids", "").split(",") if p]
        fields_raw = request.query.get("fields", "")
    if not fields_raw:
        raise ApiError(400, "MISSING_ARGUMENT", "fields parameter is required")
    lowered = {name.lower(): name for name in obj.fields}
    fields = []
    for item in fields_raw.split(","):
        if item.strip().lower() not in lowered:
            raise ApiError(
                400, "INVALID_FIELD", f"No such column '{item}' on entity '{obj.name}'"
            )
        fields.append(lowered[item.strip().lower()])
    out: list[Any] = []
    version = rest.request_version(request)
    for record_id in record_ids:
        if not ids.is_valid_id(record_id):
            raise ApiError(400, "MALFORMED_ID", f"malformed id {record_id}")
        record = state.get(record_id)
        if record is None or not record["Id"].startswith(obj.key_prefix):
            out.append(None)
        else:
            out.append(render_record(obj, record, version, fields))
    return rest.json_response(out)


def setup_composite(app: web.Application, data: str) -> None:
    """Add the collection routes under the versioned base ``data``."""
    base = data + "/composite/sobjects"
    router = app.router
    router.add_post(base, create)
    router.add_patch(base, update)
    router.add_delete(base, delete)
    router.add_get(base + "/{sobject}", retrieve)
    router.add_post(base + "/{sobject}", retrieve)
    router.add_patch(base + "/{sobject}/{field}", upsert)
