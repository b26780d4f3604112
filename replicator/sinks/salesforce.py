"""Write outbox rows to Salesforce through sObject Collections, 200 records a call.

Linked records (a Salesforce Id is known) are updated by Id; new ones are
upserted by the entity's external id, so a retry after a lost answer can never
create a duplicate (BUG-33). Every call carries ``Sforce-Call-Options:
client=<name>`` (set on the ``RestClient``) so its change events come back with
our ``changeOrigin``. A collection answers HTTP 200 even when records failed
(BUG-30): each record's result decides its row: done, retried later
(UNABLE_TO_LOCK_ROW), or failed with the error (validation, deleted entity),
which the worker dead-letters. A refusal of the whole call (REQUEST_LIMIT_EXCEEDED,
5xx, a lost connection) makes every record of that call a retry, never an
auth failure (BUG-31). Dates go out as calendar dates and datetimes as UTC
instants, whatever the host's time zone (BUG-34).

The ``RestClient`` given to the sink should be built with ``attempts=1``: the
outbox worker's backoff between rounds is then the only retry loop, so an org
out of API calls is not hammered (BUG-31).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from urllib.parse import quote

from replicator.sources.salesforce.rest import RestClient, SalesforceRestError

__all__ = ["BATCH", "SalesforceSink", "SfWrite", "WriteResult", "to_json_value"]

logger = logging.getLogger(__name__)

BATCH = 200  # sObject Collections accept at most 200 records a call
_RETRY_STATUS = frozenset(
    {"UNABLE_TO_LOCK_ROW", "REQUEST_LIMIT_EXCEEDED", "SERVER_UNAVAILABLE"}
)
# A delete that finds the record already gone has done its job: a repeated
# delete after a crash must not be dead-lettered.
_GONE = frozenset({"ENTITY_IS_DELETED", "NOT_FOUND", "INVALID_ID_FIELD"})


@dataclass(frozen=True, slots=True)
class SfWrite:
    """One outbox row bound for Salesforce."""

    outbox_id: int
    object_name: str
    record_id: str | None  # the Salesforce Id when linked
    external_id_field: str | None
    operation: str  # upsert, delete
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class WriteResult:
    """What a target answered for one write: ``done``, ``retry`` or ``failed``."""

    outbox_id: int
    outcome: str  # done, retry, failed
    answer: dict[str, Any]
    record_id: str | None = None
    created: bool = False


def to_json_value(value: Any) -> Any:
    """Return ``value`` as Salesforce expects it in a JSON body.

    A date is a calendar date with no time part; a datetime must carry its
    zone and goes out as a UTC instant with ``Z``; a naive datetime is refused
    rather than read in the host's zone (BUG-34).
    """
    if isinstance(value, dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()!r} has no time zone")
        utc = value.astimezone(dt.UTC)
        return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, Decimal):
        as_float = float(value)
        return as_float if Decimal(repr(as_float)) == value else str(value)
    return value


def _error(code: str, message: str) -> dict[str, Any]:
    return {"success": False, "errors": [{"statusCode": code, "message": message}]}


def _outcome(result: dict[str, Any], *, delete: bool) -> str:
    if result.get("success"):
        return "done"
    codes = {str(e.get("statusCode", "")) for e in result.get("errors") or []}
    if delete and codes and codes <= _GONE:
        return "done"
    return "retry" if codes & _RETRY_STATUS else "failed"


def _mode(write: SfWrite) -> str:
    if write.operation == "delete":
        return "delete" if write.record_id else "delete_external"
    return "update" if write.record_id else "upsert"


class SalesforceSink:
    """Apply batches of writes to one org."""

    def __init__(self, rest: RestClient) -> None:
        self.rest = rest

    async def write(self, writes: Sequence[SfWrite]) -> list[WriteResult]:
        """Write ``writes``; return one result per write, in no particular order.

        Writes of one record must not share a batch (the worker coalesces
        them): a collection may not name the same record twice.
        """
        results: list[WriteResult] = []
        groups: dict[tuple[str, str, str | None], list[SfWrite]] = {}
        for w in writes:
            mode = _mode(w)
            ext = w.external_id_field if mode in ("upsert", "delete_external") else None
            groups.setdefault((mode, w.object_name, ext), []).append(w)
        for (mode, obj, ext_field), group in groups.items():
            if mode == "delete_external":
                for w in group:
                    results.append(await self._delete_external(w))
                continue
            for i in range(0, len(group), BATCH):
                chunk = group[i : i + BATCH]
                results += await self._call(mode, obj, ext_field, chunk)
        return results

    async def _call(
        self, mode: str, obj: str, ext_field: str | None, chunk: list[SfWrite]
    ) -> list[WriteResult]:
        # Values are checked before anything is sent: a bad value fails its
        # own record only.
        refused: list[WriteResult] = []
        sendable: list[SfWrite] = []
        records: list[dict[str, Any]] = []
        for w in chunk:
            try:
                record = {k: to_json_value(v) for k, v in w.fields.items()}
            except ValueError as exc:
                answer = _error("INVALID_VALUE", str(exc))
                refused.append(WriteResult(w.outbox_id, "failed", answer))
                continue
            record["attributes"] = {"type": obj}
            if mode == "update":
                record["id"] = w.record_id
            sendable.append(w)
            records.append(record)
        if not sendable:
            return refused

        try:
            answers = await self._send(mode, obj, ext_field, sendable, records)
        except SalesforceRestError as exc:
            return refused + self._whole_call_failed(sendable, exc)

        out = []
        for w, result in zip(sendable, answers, strict=True):
            record_id = result.get("id") or w.record_id
            outcome = _outcome(result, delete=mode == "delete")
            created = bool(result.get("created"))
            out.append(WriteResult(w.outbox_id, outcome, result, record_id, created))
        return refused + out

    async def _send(
        self,
        mode: str,
        obj: str,
        ext_field: str | None,
        chunk: list[SfWrite],
        records: list[dict[str, Any]],
    ) -> list[dict[str, Any]]:
        if mode == "delete":
            ids = ",".join(w.record_id or "" for w in chunk)
            params = {"ids": ids, "allOrNone": "false"}
            answer = await self.rest.request(
                "DELETE", "/composite/sobjects", params=params
            )
        else:
            path = "/composite/sobjects"
            if mode == "upsert":
                path += f"/{obj}/{ext_field}"
            body = {"allOrNone": False, "records": records}
            answer = await self.rest.request("PATCH", path, json=body)
        if not isinstance(answer, list) or len(answer) != len(chunk):
            raise SalesforceRestError(
                200, "UNEXPECTED_ANSWER", f"collection answered {str(answer)[:200]!r}"
            )
        return answer

    def _whole_call_failed(
        self, chunk: list[SfWrite], exc: SalesforceRestError
    ) -> list[WriteResult]:
        outcome = "retry" if exc.retriable else "failed"
        answer = {**_error(exc.code, exc.message), "httpStatus": exc.status}
        logger.warning(
            "salesforce call refused",
            extra={"records": len(chunk), "error": exc.code, "outcome": outcome},
        )
        return [WriteResult(w.outbox_id, outcome, answer, w.record_id) for w in chunk]

    async def _delete_external(self, w: SfWrite) -> WriteResult:
        value = w.fields.get(w.external_id_field or "")
        if not w.external_id_field or value in (None, ""):
            answer = _error("MISSING_ARGUMENT", "a delete needs an Id or external id")
            return WriteResult(w.outbox_id, "failed", answer)
        path = (
            f"/sobjects/{w.object_name}/{w.external_id_field}/"
            f"{quote(str(value), safe='')}"
        )
        try:
            await self.rest.request("DELETE", path)
        except SalesforceRestError as exc:
            if exc.code in _GONE or exc.status == 404:
                return WriteResult(w.outbox_id, "done", {"success": True, "gone": True})
            return self._whole_call_failed([w], exc)[0]
        return WriteResult(w.outbox_id, "done", {"success": True})
