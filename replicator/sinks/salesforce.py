"""Write outbox rows to Salesforce through sObject Collections, 200 records a call.

Linked records (a Salesforce Id is known) are updated by Id; new ones are
upserted by the entity's external id, so a retry after a lost answer can never
create a duplicate (BUG-33). Every call carries ``Sforce-Call-Options:
client=<name>`` so its change events come back with our ``changeOrigin``.
A collection answers HTTP 200 even when records failed (BUG-30): each record's
result decides its row: done, retried later (UNABLE_TO_LOCK_ROW), or failed
with the error (validation, deleted entity), which the worker dead-letters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from replicator.sources.salesforce.rest import RestClient

logger = logging.getLogger(__name__)

BATCH = 200
_RETRY_STATUS = frozenset({"UNABLE_TO_LOCK_ROW", "REQUEST_LIMIT_EXCEEDED", "SERVER_UNAVAILABLE"})


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
    outbox_id: int
    outcome: str  # done, retry, failed
    answer: dict[str, Any]
    record_id: str | None = None
    created: bool = False


def _outcome(result: dict[str, Any]) -> str:
    if result.get("success"):
        return "done"
    codes = {str(e.get("statusCode", "")) for e in result.get("errors", [])}
    return "retry" if codes & _RETRY_STATUS else "failed"


class SalesforceSink:
    """Apply batches of writes to one org."""

    def __init__(self, rest: RestClient) -> None:
        self.rest = rest

    async def write(self, writes: Sequence[SfWrite]) -> list[WriteResult]:
        results: list[WriteResult] = []
        groups: dict[tuple[str, str, str | None], list[SfWrite]] = {}
        for w in writes:
            mode = "delete" if w.operation == "delete" else ("update" if w.record_id else "upsert")
            groups.setdefault((mode, w.object_name, None if mode != "upsert" else
                               w.external_id_field), []).append(w)
        for (mode, obj, ext_field), group in groups.items():
            for i in range(0, len(group), BATCH):
                chunk = group[i:i + BATCH]
                results += await self._call(mode, obj, ext_field, chunk)
        return results

    async def _call(self, mode: str, obj: str, ext_field: str | None,
                    chunk: list[SfWrite]) -> list[WriteResult]:
        if mode == "delete":
            ids = ",".join(w.record_id or "" for w in chunk)
            answer = await self.rest.request(
                "DELETE", "/composite/sobjects", params={"ids": ids, "allOrNone": "false"})
        else:
            records = []
            for w in chunk:
                record: dict[str, Any] = {"attributes": {"type": obj}, **w.fields}
                if mode == "update":
                    record["id"] = w.record_id
                records.append(record)
            path = "/composite/sobjects" + (f"/{obj}/{ext_field}" if mode == "upsert" else "")
            answer = await self.rest.request(
                "PATCH", path, json={"allOrNone": False, "records": records})
        out = []
        for w, result in zip(chunk, answer, strict=True):
            outcome = _outcome(result)
            out.append(WriteResult(w.outbox_id, outcome, result, result.get("id") or w.record_id,
                                   bool(result.get("created"))))
            if outcome != "done":
                logger.warning("salesforce write refused", extra={
                    "object": obj, "key": w.record_id, "outbox_id": w.outbox_id,
                    "errors": result.get("errors"), "outcome": outcome})
        return out
