"""Drain the outbox: claim pending rows, write them through a sink, mark them.

A round claims up to ``batch`` pending rows of one target in id order with
``FOR UPDATE SKIP LOCKED`` and keeps that replica transaction open across the
sink call, so a second worker or a standby skips them and can never write
them at the same time. The marks commit with the claim: a crash between a
write and its mark rolls the claim back and the next round repeats the write,
which is idempotent (Salesforce upsert by external id or update by Id, ERP
upsert by key). At least once, never lost.

Rows of one record keep their order: a row whose record has an earlier
pending row not claimed in this round (another worker holds it, or it waits
for its retry) stays for a later round, and rows of one record claimed
together are coalesced into one write. Outcomes: ``done`` with the target's
answer (``on_done`` runs in the marking transaction, to store a new link);
``retry`` keeps the row pending with ``attempts`` + 1 and ``last_error``, the
row waits a growing delay and the target pauses with a capped backoff
(REQUEST_LIMIT_EXCEEDED pauses writes, it never re-authenticates: BUG-31);
``failed`` marks the row and parks it in ``replicator.dead_letters`` with the
record and the error (BUG-30). An empty outbox is waited on, not polled: a
``NOTIFY replicator_outbox`` committed with the outbox rows or ``wake()``
starts the next round, with a long fallback timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import orjson

from replicator.backoff import Backoff
from replicator.errors import SinkError
from replicator.sinks.erp import ErpSink, ErpWrite
from replicator.sinks.salesforce import SalesforceSink, SfWrite, WriteResult

__all__ = ["OUTBOX_CHANNEL", "NotReady", "OnDone", "OutboxRow", "OutboxWorker"]

logger = logging.getLogger(__name__)

OUTBOX_CHANNEL = "replicator_outbox"
# A row whose write waits for another record (an order line for its order's
# Salesforce Id) is looked at again after this long; it costs no attempt.
_WAIT_SECONDS = 0.5


class NotReady(Exception):
    """Raised by a resolver: the write needs a record not yet written; try later."""


_W = TypeVar("_W", SfWrite, ErpWrite)

_CLAIM = """
SELECT id, entity, target, target_key, operation, fields::text AS fields,
       cause::text AS cause, attempts
FROM replicator.outbox
WHERE status = 'pending' AND target = $1 AND id <> ALL($2::bigint[])
ORDER BY id
LIMIT $3
FOR UPDATE SKIP LOCKED
"""
# Records of the claimed rows that have an earlier pending row this round
# does not hold: writing the later row first would reorder the record.
_BLOCKED = """
SELECT DISTINCT o.entity, o.target_key
FROM replicator.outbox o
JOIN unnest($3::text[], $4::text[]) AS k(entity, target_key)
  ON o.entity = k.entity AND o.target_key = k.target_key
WHERE o.status = 'pending' AND o.target = $1 AND o.id < $2
  AND o.id <> ALL($5::bigint[])
"""
_MARK_DONE = """
UPDATE replicator.outbox
SET status = 'done', attempts = attempts + 1, answer = $2::text::jsonb,
    last_error = NULL, done_at = now()
WHERE id = $1
"""
_MARK_RETRY = """
UPDATE replicator.outbox
SET attempts = attempts + 1, answer = $2::text::jsonb, last_error = $3
WHERE id = $1
"""
_MARK_FAILED = """
UPDATE replicator.outbox
SET status = 'failed', attempts = attempts + 1, answer = $2::text::jsonb,
    last_error = $3, done_at = now()
WHERE id = $1
"""
_DEAD_LETTER = """
INSERT INTO replicator.dead_letters (stream, entity, source_key, position, reason,
                                     payload)
VALUES ($1, $2, $3, $4, $5, $6::text::jsonb)
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One claimed ``replicator.outbox`` row."""

    id: int
    entity: str
    target: str  # erp, salesforce
    target_key: str
    operation: str  # upsert, delete
    fields: dict[str, Any]
    cause: dict[str, Any] | None
    attempts: int

    @classmethod
    def from_record(cls, record: Any) -> OutboxRow:
        cause = record["cause"]
        return cls(
            id=int(record["id"]),
            entity=str(record["entity"]),
            target=str(record["target"]),
            target_key=str(record["target_key"]),
            operation=str(record["operation"]),
            fields=dict(orjson.loads(record["fields"])),
            cause=None if cause is None else dict(orjson.loads(cause)),
            attempts=int(record["attempts"]),
        )


# Runs in the transaction that marks the row done, on the replica connection.
OnDone = Callable[[Any, OutboxRow, WriteResult], Awaitable[None]]


@dataclass(slots=True)
class _Group:
    """Rows of one record written as one write."""

    rows: list[OutboxRow]
    write: Any = None


@dataclass(slots=True)
class _Target:
    name: str
    write: Callable[[list[Any]], Awaitable[list[WriteResult]]]
    resolve: Callable[[OutboxRow], Any]
    backoff: Backoff
    paused_until: float = 0.0
    # When the last sink call answered: rows retried in one round share
    # their next try, so they are claimed together again.
    answered_at: float = 0.0
    deferred: dict[int, float] = field(default_factory=dict)  # row id -> not before


class OutboxWorker:
    """Write pending outbox rows to Salesforce and the ERP and mark them."""

    def __init__(
        self,
        replica_conn: asyncpg.Connection,
        *,
        salesforce: SalesforceSink | None,
        erp: ErpSink | None,
        resolve_sf: Callable[[OutboxRow], SfWrite | Awaitable[SfWrite]],
        resolve_erp: Callable[[OutboxRow], ErpWrite | Awaitable[ErpWrite]],
        batch: int = 200,
        on_done: OnDone | None = None,
        after_round: Callable[[], Awaitable[Any]] | None = None,
        retry_initial: float = 1.0,
        retry_cap: float = 300.0,
        idle_timeout: float = 60.0,
        channel: str | None = OUTBOX_CHANNEL,
    ) -> None:
        self.conn = replica_conn
        self.batch = batch
        self.on_done = on_done
        self.after_round = after_round
        self.idle_timeout = idle_timeout
        self.channel = channel
        self.retry_initial = retry_initial
        self.retry_cap = retry_cap
        self.targets: list[_Target] = []
        if salesforce is not None:
            self._add("salesforce", salesforce.write, resolve_sf)
        if erp is not None:
            self._add("erp", erp.write, resolve_erp)
        self._wake: asyncio.Event | None = None

    def _add(self, name: str, write: Any, resolve: Any) -> None:
        backoff = Backoff(initial=self.retry_initial, cap=self.retry_cap)
        self.targets.append(_Target(name, write, resolve, backoff))

    def wake(self) -> None:
        """Start the next round now (call after committing outbox rows)."""
        if self._wake is not None:
            self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Drain rounds until ``stop`` is set; wait for work when there is none."""
        self._wake = asyncio.Event()
        if self.channel:
            await self.conn.add_listener(self.channel, self._notified)
        logger.info("outbox worker started", extra={"targets": self._names()})
        try:
            while not stop.is_set():
                self._wake.clear()
                if await self.drain_once():
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._idle_wait()):
                        await _wait_either(stop, self._wake)
        finally:
            if self.channel and not self.conn.is_closed():
                await self.conn.remove_listener(self.channel, self._notified)
            logger.info("outbox worker stopped", extra={"targets": self._names()})

    async def drain_once(self) -> int:
        """Run one round per target that is not paused; return the rows written."""
        written = 0
        for target in self.targets:
            if _now() < target.paused_until:
                continue
            try:
                written += await self._round(target)
            except SinkError as exc:
                if not exc.retriable:
                    raise
                self._pause(target, str(exc))
        return written

    def _names(self) -> list[str]:
        return [t.name for t in self.targets]

    def _notified(self, *args: object) -> None:
        self.wake()

    def _idle_wait(self) -> float:
        now = _now()
        wake_at = [t.paused_until for t in self.targets if t.paused_until > now]
        wake_at += [at for t in self.targets for at in t.deferred.values()]
        if not wake_at:
            return self.idle_timeout
        return max(0.0, min(self.idle_timeout, min(wake_at) - now))

    def _pause(self, target: _Target, error: str) -> None:
        delay = target.backoff.next_delay()
        target.paused_until = _now() + delay
        logger.warning(
            "outbox target paused",
            extra={"target": target.name, "error": error, "retry_in": round(delay, 2)},
        )

    # -- one round -----------------------------------------------------------

    async def _round(self, target: _Target) -> int:
        now = _now()
        target.deferred = {i: t for i, t in target.deferred.items() if t > now}
        async with self.conn.transaction():
            rows = await self._claim(target)
            if not rows:
                return 0
            groups = _coalesce(rows)
            writes = [g for g in groups if await self._resolve(target, g)]
            results = await target.write([g.write for g in writes]) if writes else []
            target.answered_at = _now()
            retried = await self._mark(target, groups, results)
        if retried:
            self._pause(target, retried)
        else:
            target.backoff.reset()
        if self.after_round is not None:
            await self.after_round()  # outside the claim: its locks are gone
        return sum(len(g.rows) for g in groups)

    async def _claim(self, target: _Target) -> list[OutboxRow]:
        records = await self.conn.fetch(
            _CLAIM, target.name, list(target.deferred), self.batch
        )
        rows = [OutboxRow.from_record(r) for r in records]
        if not rows:
            return rows
        blocked = await self.conn.fetch(
            _BLOCKED,
            target.name,
            rows[-1].id,
            [r.entity for r in rows],
            [r.target_key for r in rows],
            [r.id for r in rows],
        )
        held = {(b["entity"], b["target_key"]) for b in blocked}
        return [r for r in rows if (r.entity, r.target_key) not in held]

    async def _resolve(self, target: _Target, group: _Group) -> bool:
        writes = []
        for row in group.rows:
            # The resolver is the caller's code: whatever it raises fails
            # this record only, with the error, and the round goes on.
            try:
                write = target.resolve(row)
                writes.append(await write if inspect.isawaitable(write) else write)
            except NotReady as exc:
                group.write = WriteResult(
                    row.id, "wait", {"error": "WAITING", "message": str(exc)}
                )
                return False
            except Exception as exc:
                group.write = WriteResult(
                    row.id, "failed", {"error": "RESOLVE", "message": repr(exc)}
                )
                return False
        group.write = _merge_all(writes)
        return True

    async def _mark(
        self, target: _Target, groups: list[_Group], results: list[WriteResult]
    ) -> str:
        by_id = {r.outbox_id: r for r in results}
        retried = ""
        for group in groups:
            if isinstance(group.write, WriteResult):
                result = group.write
            else:
                result = by_id.get(group.write.outbox_id) or WriteResult(
                    group.write.outbox_id,
                    "retry",
                    {"error": "NO_ANSWER", "message": "the sink gave no result"},
                )
            if result.outcome == "retry":
                retried = _error_text(result.answer)
            await self._mark_group(target, group, result)
        return retried

    async def _mark_group(
        self, target: _Target, group: _Group, result: WriteResult
    ) -> None:
        answer = orjson.dumps(result.answer, default=str).decode()
        ids = [r.id for r in group.rows]
        last = group.rows[-1]
        if result.outcome == "wait":
            for i in ids:
                target.deferred[i] = _now() + _WAIT_SECONDS
            return
        if result.outcome == "done":
            await self.conn.executemany(_MARK_DONE, [(i, answer) for i in ids])
            if self.on_done is not None:
                for row in group.rows:
                    await self.on_done(
                        self.conn, row, dataclasses.replace(result, outbox_id=row.id)
                    )
            return
        error = _error_text(result.answer)
        extra = {
            "target": target.name,
            "entity": last.entity,
            "key": last.target_key,
            "outbox_ids": ids,
            "error": error,
        }
        if result.outcome == "retry":
            await self.conn.executemany(_MARK_RETRY, [(i, answer, error) for i in ids])
            delay = min(self.retry_cap, self.retry_initial * 2 ** (last.attempts + 1))
            for i in ids:
                target.deferred[i] = target.answered_at + delay
            logger.warning("outbox write will be retried", extra=extra)
            return
        await self.conn.executemany(_MARK_FAILED, [(i, answer, error) for i in ids])
        await self.conn.executemany(
            _DEAD_LETTER,
            [
                (
                    f"outbox:{target.name}",
                    row.entity,
                    row.target_key,
                    str(row.id),
                    error,
                    orjson.dumps(
                        {
                            "outbox_id": row.id,
                            "operation": row.operation,
                            "record": row.fields,
                            "error": result.answer,
                        },
                        default=str,
                    ).decode(),
                )
                for row in group.rows
            ],
        )
        logger.error("outbox write failed, dead-lettered", extra=extra)


def _coalesce(rows: list[OutboxRow]) -> list[_Group]:
    """Group rows by record in id order; a record's rows after a delete wait."""
    groups: dict[tuple[str, str], _Group] = {}
    closed: set[tuple[str, str]] = set()
    for row in rows:
        key = (row.entity, row.target_key)
        if key in closed:
            continue
        group = groups.get(key)
        if group is None:
            groups[key] = _Group([row])
        elif group.rows[-1].operation == "delete" and row.operation != "delete":
            closed.add(key)  # an upsert after a delete: a later round
        else:
            group.rows.append(row)
    return list(groups.values())


def _merge_all(writes: Sequence[_W]) -> _W:
    merged = writes[0]
    for later in writes[1:]:
        if later.operation == "delete":
            merged = later
        else:
            merged = dataclasses.replace(
                later, fields={**merged.fields, **later.fields}
            )
    return merged


def _error_text(answer: dict[str, Any]) -> str:
    errors = answer.get("errors")
    if isinstance(errors, list) and errors:
        return "; ".join(
            f"{e.get('statusCode', e.get('errorCode', '?'))}: {e.get('message', '')}"
            for e in errors
            if isinstance(e, dict)
        )
    if "error" in answer:
        return f"{answer['error']}: {answer.get('message', '')}"
    return orjson.dumps(answer, default=str).decode()[:500]


def _now() -> float:
    return asyncio.get_running_loop().time()


async def _wait_either(a: asyncio.Event, b: asyncio.Event) -> None:
    """Return when either event is set."""
    waiters = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
