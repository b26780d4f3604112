"""The REST query resources: ``query``, ``queryAll`` and their result cursors.

``GET /services/data/vXX.X/query?q=...`` parses and runs the SOQL with
``soql`` over the org state and answers ``{"totalSize", "done", "records"}``;
results beyond one batch stay in a cursor whose ``nextRecordsUrl``
(``/services/data/vXX.X/query/01g...-2000``) serves the next batch (reference
§5.5). Authentication, the API request budget and the rendering of
``ApiError`` are the REST middleware's business, as for every versioned route.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from replicator.emulator import ids, soql
from replicator.emulator.keys import SCHEMA_KEY, STATE_KEY
from replicator.emulator.rest import DATA_ROUTE, json_response, request_version
from replicator.emulator.soql_ast import And, Comparison, InList, StringValue
from replicator.emulator.values import ApiError

__all__ = [
    "CURSORS_KEY",
    "DEFAULT_BATCH_SIZE",
    "CursorStore",
    "batch_size",
    "setup_query",
]

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 2000
MIN_BATCH_SIZE = 200
CURSOR_PREFIX = "01g"  # query cursors (seen in real nextRecordsUrl values)
# Salesforce drops a cursor after 15 minutes without a fetch.
CURSOR_IDLE_SECONDS = 15 * 60.0

_BATCH_SIZE_RE = re.compile(r"(?:^|[;,\s])batchSize\s*=\s*(\d+)", re.IGNORECASE)
_LOCATOR_RE = re.compile(r"(01g[0-9A-Za-z]{15})-(\d+)")


@dataclass(slots=True)
class _Cursor:
    rows: list[dict[str, Any]]
    batch: int
    used_at: float


@dataclass(slots=True)
class CursorStore:
    """Open query cursors by their 18-character id, dropped after idling."""

    clock: Callable[[], float] = time.monotonic
    _cursors: dict[str, _Cursor] = field(default_factory=dict)
    _ids: ids.IdGenerator = field(default_factory=ids.IdGenerator)

    def open(self, rows: list[dict[str, Any]], batch: int) -> str:
        self._expire()
        cursor_id = self._ids.next_id(CURSOR_PREFIX)
        self._cursors[cursor_id] = _Cursor(rows, batch, self.clock())
        return cursor_id

    def get(self, cursor_id: str) -> _Cursor | None:
        self._expire()
        cursor = self._cursors.get(cursor_id)
        if cursor is not None:
            cursor.used_at = self.clock()
        return cursor

    def close(self, cursor_id: str) -> None:
        self._cursors.pop(cursor_id, None)

    def __len__(self) -> int:
        return len(self._cursors)

    def _expire(self) -> None:
        deadline = self.clock() - CURSOR_IDLE_SECONDS
        for cursor_id, cursor in list(self._cursors.items()):
            if cursor.used_at < deadline:
                del self._cursors[cursor_id]


CURSORS_KEY: web.AppKey[CursorStore] = web.AppKey("emulator.query_cursors")


def batch_size(header: str | None) -> int:
    """Read ``Sforce-Query-Options: batchSize=N``, kept within 200..2000."""
    if not header:
        return DEFAULT_BATCH_SIZE
    found = _BATCH_SIZE_RE.search(header)
    if found is None:
        return DEFAULT_BATCH_SIZE
    return max(MIN_BATCH_SIZE, min(DEFAULT_BATCH_SIZE, int(found.group(1))))


def _page(
    request: web.Request,
    cursor_id: str | None,
    rows: list[dict[str, Any]],
    start: int,
    batch: int,
) -> dict[str, Any]:
    """Build one response batch; ``done`` once no rows remain after it."""
    end = start + batch
    body: dict[str, Any] = {"totalSize": len(rows), "done": end >= len(rows)}
    if end < len(rows) and cursor_id is not None:
        body["nextRecordsUrl"] = (
            f"/services/data/v{request_version(request)}/query/{cursor_id}-{end}"
        )
    body["records"] = rows[start:end]
    return body


def _id_filter(condition: Any) -> list[str] | None:
    """The ids a WHERE clause is limited to (``Id = x``, ``Id IN (...)``), if any."""
    if isinstance(condition, And):
        for operand in condition.operands:
            found = _id_filter(operand)
            if found is not None:
                return found
        return None
    is_id = getattr(getattr(condition, "field", None), "path", None) == ("Id",)
    if not is_id:
        return None
    if isinstance(condition, Comparison) and condition.op == "=":
        values: tuple[Any, ...] = (condition.value,)
    elif isinstance(condition, InList) and not condition.negated:
        values = condition.values
    else:
        return None
    if not all(isinstance(v, StringValue) for v in values):
        return None
    return [str(v.value) for v in values]


def _candidates(
    query: Any, state: Any, obj: Any, include_deleted: bool
) -> Iterable[Mapping[str, Any]]:
    """The records the query can match: looked up by id when the WHERE names ids.

    The full WHERE clause is still evaluated on them; this only avoids a scan.
    """
    wanted = _id_filter(query.where)
    if wanted is None:
        records: Iterable[Mapping[str, Any]] = state.records(
            obj.name, include_deleted=include_deleted
        )
        return records
    found = []
    for record_id in dict.fromkeys(wanted):
        record = state.get(record_id, include_deleted=include_deleted)
        if record is not None and record_id[:3] == obj.key_prefix:
            found.append(record)
    return found


async def _run(request: web.Request, *, include_deleted: bool) -> web.Response:
    text = request.query.get("q")
    if not text:
        raise ApiError(400, "MALFORMED_QUERY", "A query string has to be specified")
    schema = request.app[SCHEMA_KEY]
    state = request.app[STATE_KEY]
    try:
        query = soql.parse(text)
        obj = soql.resolve_object(query, schema)
        rows = soql.execute(
            query,
            schema,
            _candidates(query, state, obj, include_deleted),
            include_deleted=include_deleted,
            api_version=request_version(request),
        )
    except soql.SoqlError as exc:
        logger.debug("query refused", extra={"code": exc.code})
        raise ApiError(400, exc.code, exc.message) from None
    if query.count:
        return json_response({"totalSize": len(rows), "done": True, "records": []})

    batch = batch_size(request.headers.get("Sforce-Query-Options"))
    cursors = request.app[CURSORS_KEY]
    cursor_id = cursors.open(rows, batch) if len(rows) > batch else None
    logger.debug(
        "query served",
        extra={"object": obj.name, "rows": len(rows), "cursor": cursor_id},
    )
    return json_response(_page(request, cursor_id, rows, 0, batch))


async def query_endpoint(request: web.Request) -> web.Response:
    """``GET /services/data/vXX.X/query?q=``: live records only."""
    return await _run(request, include_deleted=False)


async def query_all_endpoint(request: web.Request) -> web.Response:
    """``GET /services/data/vXX.X/queryAll?q=``: the recycle bin too."""
    return await _run(request, include_deleted=True)


async def more_endpoint(request: web.Request) -> web.Response:
    """``GET .../query/<cursor>-<offset>``: the batch that starts at ``offset``."""
    found = _LOCATOR_RE.fullmatch(request.match_info["locator"])
    cursors = request.app[CURSORS_KEY]
    cursor = cursors.get(found.group(1)) if found else None
    if found is None or cursor is None:
        raise ApiError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
    start = int(found.group(2))
    header = request.headers.get("Sforce-Query-Options")
    batch = batch_size(header) if header else cursor.batch
    # the cursor outlives its last batch until it idles out, as in Salesforce
    return json_response(_page(request, found.group(1), cursor.rows, start, batch))


def setup_query(app: web.Application) -> None:
    """Mount the query resources and their cursor store on the emulator app."""
    app[CURSORS_KEY] = CursorStore()
    base = DATA_ROUTE
    app.router.add_get(f"{base}/query", query_endpoint)
    app.router.add_get(f"{base}/query/", query_endpoint)
    app.router.add_get(f"{base}/queryAll", query_all_endpoint)
    app.router.add_get(f"{base}/queryAll/", query_all_endpoint)
    app.router.add_get(f"{base}/query/{{locator}}", more_endpoint)
    app.router.add_get(f"{base}/queryAll/{{locator}}", more_endpoint)
