"""Apply the ERP change stream to the replica: mirrors and checkpoint in one transaction.

Changes are collapsed to their net effect per key and written set-based
(``store.mirror``). A replica transaction spans one or more whole source
transactions; its last statement stores the checkpoint (the end LSN of the
last source transaction it covers), and only after it committed is that LSN
confirmed to the ERP. Anything the source re-sends below the checkpoint is
skipped, so the effect on the replica is exactly once.

Messages that change the shape of what follows (a new column, a truncate)
first flush the pending changes into the open replica transaction, so the
order of the source is kept without splitting any source transaction.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import logging
import operator
import pickle
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, cast

import asyncpg

from replicator.errors import InvariantError
from replicator.sources.erp.catalog import Catalog, ColumnInfo, EnumType
from replicator.sources.erp.pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    TypeMessage,
    Update,
    lsn_to_str,
)
from replicator.store import checkpoints
from replicator.store.checkpoints import Checkpoint
from replicator.store.mirror import MirrorStore, MirrorTable, TableChanges, mirror_name
from replicator.unified import SyncEngine

logger = logging.getLogger(__name__)

HEARTBEAT_PREFIX = "replicator.heartbeat"


# Messages that carry a transaction id when sent inside a stream (protocol v2).
_STREAMABLE = frozenset(
    {Relation, TypeMessage, Insert, Update, Delete, Truncate, LogicalMessage}
)


def _array_labels(text: str) -> tuple[str, ...]:
    """Split an enum array's text (``{a,"b c"}``) into labels, well enough to spot new ones."""
    return tuple(
        part.strip().strip('"') for part in text.strip("{}").split(",") if part
    )


def _outside_stream(msg: Message) -> Message:
    """Return a spooled message as if it had been sent outside a stream."""
    if isinstance(msg, Relation):
        return dataclasses.replace(msg, xid=None)
    return cast(Any, msg)._replace(xid=None)  # type: ignore[no-any-return]


@dataclass(slots=True)
class Route:
    """How one source relation's tuples land in a mirror table."""

    table: MirrorTable
    positions: (
        tuple[int, ...] | None
    )  # mirror index -> relation index; None: same order
    key_positions: tuple[int, ...]  # relation indexes of the mirror key
    # (mirror index, enum type, is an array) of each enum column: labels added
    # with ALTER TYPE ... ADD VALUE come with no new Relation message (BUG-06)
    enums: tuple[tuple[int, EnumType, bool], ...] = ()
    key_of: Callable[[tuple[Any, ...]], tuple[Any, ...]] = field(init=False)

    def __post_init__(self) -> None:
        # A row's key is built once per change: a getter beats a generator.
        if len(self.key_positions) == 1:
            index = self.key_positions[0]
            self.key_of = lambda row: (row[index],)
        else:
            self.key_of = operator.itemgetter(*self.key_positions)


@dataclass(slots=True)
class SourceInfo:
    stream: str
    system_identifier: str
    timeline: int
    slot_name: str


class _Spool:
    """Messages of one streamed in-progress transaction, spilled to disk when large."""

    LIMIT = 20_000

    def __init__(self) -> None:
        self.memory: list[Message] = []
        self.file: IO[bytes] | None = None
        self.aborted: set[int] = set()

    def add(self, msg: Message) -> None:
        self.memory.append(msg)
        if len(self.memory) >= self.LIMIT:
            if self.file is None:
                self.file = tempfile.TemporaryFile(prefix="replicator-stream-")
            pickle.dump(self.memory, self.file, protocol=pickle.HIGHEST_PROTOCOL)
            self.memory = []

    def replay(self) -> Any:
        if self.file is not None:
            self.file.seek(0)
            while True:
                try:
                    chunk = pickle.load(self.file)
                except EOFError:
                    break
                yield from (
                    m for m in chunk if getattr(m, "xid", None) not in self.aborted
                )
            self.file.close()
        yield from (
            m for m in self.memory if getattr(m, "xid", None) not in self.aborted
        )


@dataclass(slots=True)
class ApplyStats:
    transactions: int = 0
    changes: int = 0
    skipped_transactions: int = 0
    batches: int = 0
    last_commit_time: float = 0.0
    origins: dict[str, int] = field(default_factory=dict)
    # for replicator.ops: row changes written per mirror table, and the time
    # from the source's commit to the replica's commit of recent batches
    by_table: dict[str, int] = field(default_factory=dict)
    latencies: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=1000)
    )


class ErpApplier:
    """Consume decoded ``pgoutput`` messages; commit mirrors and checkpoint together."""

    def __init__(
        self,
        store: MirrorStore,
        catalog: Catalog,
        source: SourceInfo,
        checkpoint_lsn: int,
        *,
        batch_changes: int = 20_000,
        confirm: Callable[[int], None] = lambda lsn: None,
        own_origin: str | None = None,
        sync: SyncEngine | None = None,
    ) -> None:
        self.store = store
        self.sync = sync
        self.catalog = catalog
        self.source = source
        self.checkpoint_lsn = checkpoint_lsn
        self.batch_changes = batch_changes
        self.confirm = confirm
        self.own_origin = own_origin
        self.stats = ApplyStats()
        self.tables: dict[str, MirrorTable] = {}
        self._routes: dict[int, Route] = {}
        self._pending: dict[str, TableChanges] = {}
        self._pending_rows = 0
        self._tx: asyncpg.transaction.Transaction | None = None
        self._uncommitted_end = 0
        self._uncommitted_changes = 0
        self._in_txn = False
        self._skip = False
        self._origin: str | None = None
        self._own_inserts: dict[str, set[str]] = {}
        # mapped table -> key text -> (source commit time, made by our sink)
        self._key_meta: dict[str, dict[str, tuple[float, bool]]] = {}
        self._spools: dict[int, _Spool] = {}
        self.idle_lsn = 0  # a position past every received change, when idle
        self._changes_at_begin = 0
        self._stream_xid = 0
        self._source_commit_time = 0.0  # of the latest transaction begun

    # -- state -----------------------------------------------------------------

    @property
    def in_transaction(self) -> bool:
        """True while a source transaction has begun but not committed."""
        return self._in_txn

    @property
    def has_uncommitted(self) -> bool:
        return self._uncommitted_end > 0

    # -- messages ----------------------------------------------------------------

    async def handle_chunk(self, items: list[tuple[int, Message]]) -> None:
        """Handle received messages in order; commit whenever a batch is full.

        Row changes outside a stream take a synchronous path: no coroutine
        per change unless a flush or an enum check is due.
        """
        put_row = self._put_row
        sync = self.sync
        for wal_start, msg in items:
            kind = type(msg)
            if (
                (kind is Insert or kind is Update or kind is Delete)
                and not self._skip
                and cast(Any, msg).xid is None
            ):
                mapped = sync is not None and self._mapped(msg)  # type: ignore[arg-type]
                if mapped:
                    await self._flush_if_repeated(msg)  # type: ignore[arg-type]
                route, values = put_row(msg)  # type: ignore[arg-type]
                if mapped:
                    self._note_mapped_row(route, msg)  # type: ignore[arg-type]
                if (
                    route.enums and values is not None
                ) or self._pending_rows >= self.batch_changes:
                    await self._after_row(route, values)
                continue
            await self.handle(wal_start, msg)
            if self.should_commit(input_idle=False):
                await self.commit()

    async def handle(self, wal_start: int, msg: Message) -> None:
        kind = type(msg)
        if kind in _STREAMABLE and msg.xid is not None:  # type: ignore[union-attr]
            # Keyed by the top-level transaction of the open stream: changes of
            # subtransactions carry their own xid.
            self._spools.setdefault(self._stream_xid, _Spool()).add(msg)
            return
        if kind is Insert or kind is Update or kind is Delete:
            if not self._skip:
                await self._row(msg)  # type: ignore[arg-type]
        elif kind is Begin:
            self._begin(msg.final_lsn)  # type: ignore[union-attr]
            self._source_commit_time = msg.commit_time.timestamp()  # type: ignore[union-attr]
        elif kind is Commit:
            self._commit(msg.end_lsn)  # type: ignore[union-attr]
        elif kind is Origin:
            self._origin = msg.name  # type: ignore[union-attr]
        elif kind is Relation:
            await self._relation(msg)  # type: ignore[arg-type]
        elif kind is Truncate:
            if not self._skip:
                await self._truncate(msg)  # type: ignore[arg-type]
        elif kind is LogicalMessage:
            self._logical_message(wal_start, msg)  # type: ignore[arg-type]
        elif kind is StreamCommit:
            await self._stream_commit(msg)  # type: ignore[arg-type]
        elif kind is StreamAbort:
            self._stream_abort(msg)  # type: ignore[arg-type]
        elif kind is StreamStart:
            self._stream_xid = cast(StreamStart, msg).xid
        elif kind in (StreamStop, TypeMessage):
            pass
        else:
            raise InvariantError(f"unhandled pgoutput message {msg!r}")

    def _begin(self, final_lsn: int) -> None:
        self._in_txn = True
        self._origin = None
        self._changes_at_begin = self._uncommitted_changes
        self._skip = final_lsn < self.checkpoint_lsn
        if self._skip:
            self.stats.skipped_transactions += 1
            logger.debug(
                "transaction already applied",
                extra={
                    "commit_lsn": lsn_to_str(final_lsn),
                    "checkpoint": lsn_to_str(self.checkpoint_lsn),
                },
            )

    def _commit(self, end_lsn: int) -> None:
        self._in_txn = False
        if self._skip:
            self._skip = False
            return
        self._uncommitted_end = end_lsn
        if self._uncommitted_changes == self._changes_at_begin:
            return  # nothing of ours changed: counted nowhere
        self.stats.transactions += 1
        if self._origin is not None:
            self.stats.origins[self._origin] = (
                self.stats.origins.get(self._origin, 0) + 1
            )

    def _logical_message(self, wal_start: int, msg: LogicalMessage) -> None:
        # A heartbeat (or any non-transactional message) outside a transaction
        # moves the confirmed position when nothing received is unapplied.
        if not msg.transactional and not self._in_txn:
            self.idle_lsn = max(self.idle_lsn, msg.lsn)

    async def _row(self, msg: Insert | Update | Delete) -> None:
        mapped = self.sync is not None and self._mapped(msg)
        if mapped:
            await self._flush_if_repeated(msg)
        route, values = self._put_row(msg)
        if mapped:
            self._note_mapped_row(route, msg)
        await self._after_row(route, values)

    def _mapped(self, msg: Insert | Update | Delete) -> bool:
        route = self._routes.get(msg.relation_oid)
        return (
            route is not None
            and self.sync is not None
            and self.sync.watches("erp", route.table.name)
        )

    async def _flush_if_repeated(self, msg: Insert | Update | Delete) -> None:
        """Apply a mapped table's pending rows first if ``msg`` changes one again.

        Resolution compares each row before and after a flush: two changes of
        one row in one flush would show as one, and a change that restores
        the value before the first (a user undoing our write) as none.
        """
        route = self._routes[msg.relation_oid]
        pending = self._pending.get(route.table.name)
        if pending is None or not pending.rows:
            return
        rows = [getattr(msg, "old", None), getattr(msg, "new", None)]
        if any(r is not None and route.key_of(r) in pending.rows for r in rows):
            await self.flush(only=route.table.name)

    def _note_mapped_row(self, route: Route, msg: Insert | Update | Delete) -> None:
        """Remember when, and by whom, a mapped row changed, for resolution.

        Each key gets its own transaction's commit time and origin. Rows our
        own sink inserted are linked when its write is marked: resolution
        must not take one coming back before then for a new ERP record (it
        would be created in Salesforce twice).
        """
        row = msg.old if type(msg) is Delete else cast(Insert | Update, msg).new
        if row is None:
            return
        key = "|".join(str(k) for k in route.key_of(row))
        ours = bool(self.own_origin) and self._origin == self.own_origin
        when = self._source_commit_time or time.time()
        self._key_meta.setdefault(route.table.name, {})[key] = (when, ours)
        own = self._own_inserts.setdefault(route.table.name, set())
        if type(msg) is Insert and ours:
            own.add(key)
        else:
            own.discard(key)

    async def _after_row(self, route: Route, values: tuple[Any, ...] | None) -> None:
        if route.enums and values is not None:
            await self._check_labels(route, values)
        if self._pending_rows >= self.batch_changes:
            await self.flush()

    def _put_row(
        self, msg: Insert | Update | Delete
    ) -> tuple[Route, tuple[Any, ...] | None]:
        """Add a row change to the pending changes; return its route and mirror values."""
        route = self._routes.get(msg.relation_oid)
        if route is None:
            raise InvariantError(f"change for unknown relation oid {msg.relation_oid}")
        changes = self._pending.get(route.table.name)
        if changes is None:
            changes = self._pending[route.table.name] = TableChanges(route.table)
        key_of = route.key_of
        values = None
        if type(msg) is Delete:
            changes.delete(key_of(msg.old))
        else:
            new = cast(Insert | Update, msg).new
            if type(msg) is Update and msg.old is not None:
                old_key = key_of(msg.old)
                if old_key != key_of(new):
                    changes.delete(old_key)  # the primary key changed: the row moves
                elif not msg.old_is_key_only:
                    # REPLICA IDENTITY FULL: the old row holds unchanged TOAST values
                    new = tuple(
                        o if v is UNCHANGED else v
                        for v, o in zip(new, msg.old, strict=True)
                    )
            values = (
                new
                if route.positions is None
                else tuple(new[i] for i in route.positions)
            )
            if type(msg) is Insert:
                changes.insert(key_of(new), values)
            else:
                changes.put(key_of(new), values)
        self._pending_rows += 1
        self._uncommitted_changes += 1
        return route, values

    async def _relation(self, rel: Relation) -> None:
        info = await self.catalog.table(rel.oid)
        if info is None:
            # Dropped since: mirror under its own name with what the message says.
            name, source, key = (
                mirror_name(rel.namespace, rel.name),
                rel.qualified_name,
                None,
            )
            by_name: dict[str, ColumnInfo] = {}
        else:
            name = mirror_name(info.root_schema, info.root_name)
            source = f"{info.root_schema}.{info.root_name}"
            key, by_name = info.key, info.columns
        columns = [
            by_name.get(c.name) or ColumnInfo(c.name, "text") for c in rel.columns
        ]
        if info is not None and info.oid != info.root_oid:
            # A partition's own column order may differ from its root's (ATTACH
            # PARTITION of an existing table): the mirror follows the root (BUG-03).
            order = {name: i for i, name in enumerate(by_name)}
            columns.sort(key=lambda c: order.get(c.name, len(order)))
        for col in columns:
            if col.enum is not None:
                await self.store.ensure_enum(col.enum)  # labels added since (BUG-06)
        table = self.tables.get(name) or await self.store.load_table(source)
        if table is None:
            if not key:
                key = tuple(c.name for c in rel.columns if c.is_key)
            await self._ensure_tx()
            table = await self.store.create_table(name, source, columns, key or ())
            logger.info("mirror table created", extra={"table": name, "source": source})
        elif (
            info is None
            or info.oid == info.root_oid
            or not ({c.name for c in columns} <= set(table.columns))
        ):
            if [(c.name, c.mirror_type) for c in columns] != list(
                zip(table.columns, table.types, strict=True)
            ):
                await self.flush(only=name)
                await self._ensure_tx()
                table = await self.store.evolve(table, columns)
                self._pending.pop(name, None)
        self.tables[name] = table
        self._reroute(table)
        names = [c.name for c in rel.columns]
        positions = tuple(names.index(c) if c in names else -1 for c in table.columns)
        if -1 in positions:
            raise InvariantError(f"relation {rel.qualified_name} lacks mirror columns")
        self._routes[rel.oid] = Route(
            table,
            None if positions == tuple(range(len(names))) else positions,
            tuple(names.index(k) for k in table.key),
            tuple(
                (table.columns.index(c.name), c.enum, c.mirror_type.endswith("[]"))
                for c in columns
                if c.enum is not None and c.name in table.columns
            ),
        )

    async def _check_labels(self, route: Route, values: tuple[Any, ...]) -> None:
        """Add enum labels the mirror lacks before a row that uses them is applied."""
        for index, enum, is_array in route.enums:
            value = values[index]
            if not isinstance(value, str):
                continue
            used = _array_labels(value) if is_array else (value,)
            if all(label in enum.labels for label in used):
                continue
            fresh = await self.catalog.enum_named(enum.schema, enum.name)
            if fresh is None or fresh.labels == enum.labels:
                continue  # nothing new at the source: let the replica judge the value
            await self.store.ensure_enum(fresh)
            logger.info(
                "enum labels refreshed from the source",
                extra={
                    "type": f"{enum.schema}.{enum.name}",
                    "labels": [lb for lb in fresh.labels if lb not in enum.labels],
                },
            )
            for other in self._routes.values():  # every route using the type
                other.enums = tuple(
                    (i, fresh if e == enum else e, a) for i, e, a in other.enums
                )

    def _reroute(self, table: MirrorTable) -> None:
        for route in self._routes.values():
            if route.table.name == table.name:
                route.table = table

    async def _truncate(self, msg: Truncate) -> None:
        tables = []
        for oid in msg.relation_oids:
            route = self._routes.get(oid)
            if route is not None and route.table not in tables:
                tables.append(route.table)
        await self._ensure_tx()
        for table in tables:
            self._pending.pop(table.name, None)
            await self.flush(only=table.name)
            await self.store.truncate(table)
        self._uncommitted_changes += 1
        logger.info(
            "mirror tables truncated",
            extra={"tables": [t.name for t in tables], "cascade": msg.cascade},
        )

    async def _stream_commit(self, msg: StreamCommit) -> None:
        spool = self._spools.pop(msg.xid, None)
        self._begin(msg.commit_lsn)
        self._source_commit_time = msg.commit_time.timestamp()
        if spool is not None:
            for inner in spool.replay():
                await self.handle(0, _outside_stream(inner))
        self._commit(msg.end_lsn)

    def _stream_abort(self, msg: StreamAbort) -> None:
        if msg.subxid == msg.xid:
            spool = self._spools.pop(msg.xid, None)
            if spool is not None and spool.file is not None:
                spool.file.close()
        elif msg.xid in self._spools:
            self._spools[msg.xid].aborted.add(msg.subxid)

    # -- replica transaction ----------------------------------------------------

    async def _ensure_tx(self) -> None:
        if self._tx is None:
            self._tx = self.store.conn.transaction()
            await self._tx.start()

    async def flush(self, only: str | None = None) -> None:
        """Write pending changes into the open replica transaction (no commit)."""
        names = [only] if only is not None else list(self._pending)
        if self.sync is not None and len(names) > 1:
            sync = self.sync
            names.sort(key=lambda name: sync.order_key("erp", name))
        for name in names:
            changes = self._pending.pop(name, None)
            if changes is None or not changes.rows:
                continue
            await self._ensure_tx()
            self.stats.by_table[name] = self.stats.by_table.get(name, 0) + len(
                changes.rows
            )
            if self.sync is not None and self.sync.watches("erp", name):
                await self._apply_mapped(name, changes)
            else:
                await self.store.apply(changes)
        if only is None:
            self._pending_rows = 0

    async def _apply_mapped(self, name: str, changes: TableChanges) -> None:
        """Apply a mapped table's changes and hand what they changed to resolution."""
        assert self.sync is not None
        conn = self.store.conn
        keys = list(changes.rows)
        before = await self.sync.snapshot(conn, changes.table, keys)
        await self.store.apply(changes)
        after = await self.sync.snapshot(conn, changes.table, keys)
        # each key at the commit time of the transaction that changed it
        meta = self._key_meta.pop(name, {})
        batch = self._source_commit_time or time.time()
        times = {
            key: dt.datetime.fromtimestamp(meta.get(key, (batch, False))[0], dt.UTC)
            for key in set(before) | set(after)
        }
        await self.sync.on_rows(
            conn,
            "erp",
            name,
            before,
            after,
            times,
            lsn_to_str(self._uncommitted_end or self.checkpoint_lsn),
            own_inserts=self._own_inserts.pop(name, set()),
            ours={key for key, (_, ours) in meta.items() if ours},
        )

    async def commit(self) -> bool:
        """Commit every whole source transaction received so far; confirm its LSN.

        Returns False when there was nothing to commit. Must be called only
        between source transactions.
        """
        if self._in_txn:
            raise InvariantError("commit requested inside a source transaction")
        if not self.has_uncommitted:
            return False
        await self.flush()
        await self._ensure_tx()
        end = self._uncommitted_end
        await checkpoints.save(
            self.store.conn,
            Checkpoint(
                self.source.stream,
                lsn_to_str(end),
                end,
                self.source.system_identifier,
                self.source.timeline,
                self.source.slot_name,
            ),
            reason="apply",
            changes=self._uncommitted_changes,
            # transactions with nothing published (empty streamed ones) only move
            # the position, like an idle advance: no history row (BUG-16)
            history=self._uncommitted_changes > 0,
        )
        assert self._tx is not None
        await self._tx.commit()
        self._tx = None
        self.checkpoint_lsn = end
        self.stats.changes += self._uncommitted_changes
        self.stats.batches += 1
        self.stats.last_commit_time = time.time()
        if self._source_commit_time:
            self.stats.latencies.append(
                self.stats.last_commit_time - self._source_commit_time
            )
        logger.debug(
            "batch applied",
            extra={"position": lsn_to_str(end), "changes": self._uncommitted_changes},
        )
        self._uncommitted_end = 0
        self._uncommitted_changes = 0
        self.confirm(end)
        return True

    async def rollback(self) -> None:
        if self._tx is not None:
            tx, self._tx = self._tx, None
            try:
                await tx.rollback()
            except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
                logger.debug("rollback failed", exc_info=True)

    async def advance_idle(self, lsn: int) -> bool:
        """Store and confirm ``lsn`` when nothing received is left unapplied.

        Keeps an idle or filtered publication from pinning WAL on the ERP
        (BUG-16); the checkpoint is stored first so the slot never gets
        ahead of what the replica knows.
        """
        if (
            self._in_txn
            or self.has_uncommitted
            or self._pending
            or lsn <= self.checkpoint_lsn
        ):
            return False
        async with self.store.conn.transaction():
            await checkpoints.save(
                self.store.conn,
                Checkpoint(
                    self.source.stream,
                    lsn_to_str(lsn),
                    lsn,
                    self.source.system_identifier,
                    self.source.timeline,
                    self.source.slot_name,
                    {"idle": True},
                ),
                reason="idle",
                history=False,
            )
        self.checkpoint_lsn = lsn
        self.confirm(lsn)
        return True

    def should_commit(self, input_idle: bool) -> bool:
        return (
            not self._in_txn
            and self.has_uncommitted
            and (input_idle or self._uncommitted_changes >= self.batch_changes)
        )
