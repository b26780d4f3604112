"""Apply Salesforce change events to the ``sf`` mirror, checkpoints in the same transaction.

A mirror row carries its record's ``system_modstamp``; an event whose commit
time is not newer than it is already reflected and is skipped. That one guard
makes the initial load, replays from -2, re-deliveries after a re-handshake
and the overlap of a catch-up with the live stream all safe to apply.

Rows are never hard-deleted: a DELETE sets ``is_deleted`` as queryAll shows it.
GAP_ events and diffs that do not fit the stored copy re-read the record over
REST; GAP_OVERFLOW catches the object up by SystemModstamp.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from replicator.sources.erp.pgoutput import UNCHANGED
from replicator.sources.salesforce.cdc import DiffMismatch, RecordChange, apply_diff
from replicator.errors import ConfigError
from replicator.sources.salesforce.rest import RestClient, SalesforceRestError
from replicator.sources.salesforce.schema import ObjectShape, shape_of, to_text
from replicator.store import checkpoints
from replicator.store.checkpoints import Checkpoint
from replicator.store.mirror import MirrorStore, MirrorTable, TableChanges, quote_ident
from replicator.unified import SyncEngine

logger = logging.getLogger(__name__)

SF_SCHEMA = "sf"
_SOQL_IDS = (
    200  # ids per "WHERE Id IN (...)": with a field list, well under 8 kB of URL
)


def channel_for(object_name: str) -> str:
    """The CDC channel of one object (custom objects drop ``__c``)."""
    if object_name.endswith("__c"):
        return f"/data/{object_name[:-3]}__ChangeEvent"
    return f"/data/{object_name}ChangeEvent"


def soql_datetime(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class SfStats:
    events: int = 0
    applied: int = 0
    skipped: int = 0
    refetched: int = 0
    dead_letters: int = 0
    catch_ups: int = 0
    batches: int = 0
    by_origin: dict[str, int] = field(default_factory=dict)
    # for replicator.ops: events received and applied per object, and the time
    # from the org's commit to the replica's commit of recent batches
    received_by_object: dict[str, int] = field(default_factory=dict)
    applied_by_object: dict[str, int] = field(default_factory=dict)
    latencies: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=1000)
    )
    last_latency: float = 0.0


@dataclass
class _ObjectState:
    shape: ObjectShape
    table: MirrorTable
    channel: str


class SfApplier:
    """Mirror Salesforce objects into schema ``sf`` of the replica."""

    def __init__(
        self,
        store: MirrorStore,
        rest: RestClient,
        *,
        stream_prefix: str = "sf",
        skew: dt.timedelta = dt.timedelta(minutes=5),
        sync: SyncEngine | None = None,
    ) -> None:
        self.store = store
        self.sync = sync
        self.rest = rest
        self.stream_prefix = stream_prefix
        self.skew = skew
        self.objects: dict[str, _ObjectState] = {}
        self.stats = SfStats()

    def stream_name(self, channel: str) -> str:
        return f"{self.stream_prefix}:{channel}"

    # -- schema ------------------------------------------------------------------

    async def prepare(self, object_name: str) -> _ObjectState:
        """Describe the object; create its mirror or add the fields describe gained."""
        try:
            described = await self.rest.describe(object_name)
        except SalesforceRestError as exc:
            if exc.status == 404 or exc.code in ("NOT_FOUND", "INVALID_TYPE"):
                raise ConfigError(
                    f"salesforce.objects: {object_name!r} is not an object of this org "
                    f"({exc.code}); fix the name in [salesforce] objects"
                ) from exc
            raise
        shape = shape_of(described)
        columns = shape.columns()
        table = await self.store.load_table(shape.object_name)
        if table is None:
            table = await self.store.create_table(
                shape.table, shape.object_name, columns, ("id",)
            )
            logger.info(
                "mirror table created",
                extra={"object": object_name, "table": f"sf.{shape.table}"},
            )
        elif [c.name for c in columns] != table.columns or [
            c.mirror_type for c in columns
        ] != table.types:
            table = await self.store.evolve(table, columns)
        state = _ObjectState(shape, table, channel_for(shape.object_name))
        self.objects[shape.object_name] = state
        return state

    # -- loads -------------------------------------------------------------------

    def _select(self, shape: ObjectShape) -> str:
        return (
            "SELECT "
            + ", ".join(f.api_name for f in shape.fields)
            + f" FROM {shape.object_name}"
        )

    def _full_row(self, shape: ObjectShape, record: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(to_text(record.get(f.api_name)) for f in shape.fields)

    async def load(self, object_name: str) -> int:
        """Copy every record into a shadow table and swap it in, checkpoint "-2" alongside."""
        state = self.objects[object_name]
        shape, conn = state.shape, self.store.conn
        shadow = f"_shadow_{shape.table}"
        count = 0
        async with conn.transaction():
            await conn.execute(f"DROP TABLE IF EXISTS sf.{quote_ident(shadow)}")
            shadow_table = await self.store.create_table(
                shape.table,
                shape.object_name,
                shape.columns(),
                ("id",),
                table_name=shadow,
            )
            shadow_table.name = shadow
            changes = TableChanges(shadow_table)
            async for record in self.rest.query(self._select(shape)):
                changes.put((record["Id"],), self._full_row(shape, record))
                count += 1
                if len(changes.rows) >= 2000:
                    await self.store.apply(changes)
                    changes = TableChanges(shadow_table)
                    logger.info(
                        "initial load progress",
                        extra={"object": object_name, "records": count},
                    )
            await self.store.apply(changes)
            await conn.execute(f"DROP TABLE IF EXISTS {state.table.qualified}")
            await conn.execute(
                f"ALTER TABLE sf.{quote_ident(shadow)} RENAME TO "
                f"{quote_ident(shape.table)}"
            )
            await conn.execute(
                f"ALTER INDEX IF EXISTS sf.{quote_ident(shadow + '_pkey')} "
                f"RENAME TO {quote_ident(shape.table + '_pkey')}"
            )
            state.table.version += 1  # new staging layout for the swapped table
            await checkpoints.save(
                conn,
                Checkpoint(
                    self.stream_name(state.channel),
                    "-2",
                    None,
                    details={
                        "loaded_at": dt.datetime.now(dt.UTC).isoformat(),
                        "records": count,
                    },
                ),
                reason="initial load",
                changes=count,
            )
        logger.info(
            "initial load done", extra={"object": object_name, "records": count}
        )
        return count

    async def catch_up(
        self, object_name: str, since: dt.datetime | None, *, reason: str
    ) -> int:
        """Re-read records changed since ``since`` (deleted ones too) into the mirror."""
        state = self.objects[object_name]
        soql = self._select(state.shape)
        if since is not None:
            soql += f" WHERE SystemModstamp > {soql_datetime(since - self.skew)}"
        records = [r async for r in self.rest.query(soql, include_deleted=True)]
        async with self.store.conn.transaction():
            applied = await self._upsert_records(state, records)
            await self.store.conn.execute(
                "INSERT INTO replicator.checkpoint_history (stream, position, reason, changes) "
                "VALUES ($1, $2, $3, $4)",
                self.stream_name(state.channel),
                "catch-up",
                reason,
                applied,
            )
        self.stats.catch_ups += 1
        logger.warning(
            "object caught up over REST",
            extra={
                "object": object_name,
                "since": since.isoformat() if since else None,
                "records": len(records),
                "applied": applied,
                "reason": reason,
            },
        )
        return applied

    async def reread(self, object_name: str, ids: set[str]) -> None:
        """Make the mirror equal to the org for ``ids`` (a dead letter retried)."""
        state = self.objects[object_name]
        async with self.store.conn.transaction():
            before = await self._mapped_rows(state, ids)
            await self._refetch(state, ids)
            await self._resolve_rows(state, ids, before, {}, "reread")

    async def _upsert_records(
        self, state: _ObjectState, records: list[dict[str, Any]]
    ) -> int:
        """Write full records unless the mirror already holds a newer version.

        Records read over REST (catch-up after downtime or a GAP_OVERFLOW)
        are changes like any event: a mapped object's go to resolution too.
        """
        stored = await self._modstamps(state, [r["Id"] for r in records])
        changes = TableChanges(state.table)
        times: dict[str, dt.datetime] = {}
        for record in records:
            modstamp = _parse_sf_time(record.get("SystemModstamp"))
            current = stored.get(record["Id"])
            if current is not None and modstamp is not None and modstamp < current:
                continue
            changes.put((record["Id"],), self._full_row(state.shape, record))
            if modstamp is not None:
                times[record["Id"]] = modstamp
        ids = {str(key[0]) for key in changes.rows}
        before = await self._mapped_rows(state, ids)
        await self.store.apply(changes)
        await self._resolve_rows(state, ids, before, times, "catch-up")
        return len(changes.rows)

    async def _mapped_rows(
        self, state: _ObjectState, ids: Iterable[str]
    ) -> dict[str, dict[str, Any]] | None:
        """The mirror rows of ``ids`` before a change, if the object is mapped."""
        if self.sync is None or not self.sync.watches(
            "salesforce", state.shape.object_name
        ):
            return None
        return await self.sync.snapshot(
            self.store.conn, state.table, [(i,) for i in ids]
        )

    async def _resolve_rows(
        self,
        state: _ObjectState,
        ids: Iterable[str],
        before: dict[str, dict[str, Any]] | None,
        times: dict[str, dt.datetime],
        position: str,
    ) -> None:
        if before is None or self.sync is None:
            return
        after = await self.sync.snapshot(
            self.store.conn, state.table, [(i,) for i in ids]
        )
        await self.sync.on_rows(
            self.store.conn,
            "salesforce",
            state.shape.object_name,
            before,
            after,
            times,
            position,
        )

    async def _modstamps(
        self, state: _ObjectState, ids: Iterable[str]
    ) -> dict[str, dt.datetime]:
        rows = await self.store.conn.fetch(
            f"SELECT id, system_modstamp FROM {state.table.qualified} WHERE id = ANY($1::text[])",
            list(ids),
        )
        return {r[0]: r[1] for r in rows if r[1] is not None}

    # -- events --------------------------------------------------------------------

    async def apply(self, changes: list[RecordChange]) -> None:
        """Apply one batch of events in one replica transaction with its checkpoints."""
        ordered = _transaction_order(changes)
        by_object: dict[str, list[RecordChange]] = {}
        for change in ordered:
            by_object.setdefault(change.object_name, []).append(change)
        positions: dict[str, RecordChange] = {}
        groups = list(by_object.items())
        if self.sync is not None:
            sync = self.sync
            groups.sort(key=lambda item: sync.order_key("salesforce", item[0]))
        async with self.store.conn.transaction():
            for object_name, group in groups:
                state = self.objects.get(object_name)
                if state is None:
                    for change in group:
                        await self.dead_letter(
                            change, f"object {object_name!r} is not mirrored"
                        )
                    continue
                mapped = self.sync is not None and self.sync.watches(
                    "salesforce", object_name
                )
                for wave in _waves(group) if mapped else [group]:
                    await self._apply_object(state, wave)
            for change in ordered:
                last = positions.get(change.channel)
                if last is None or change.replay_id >= last.replay_id:
                    positions[change.channel] = change
            for channel, change in positions.items():
                await checkpoints.save(
                    self.store.conn,
                    Checkpoint(
                        self.stream_name(channel),
                        str(change.replay_id),
                        change.replay_id,
                        details={
                            "commit_ms": int(change.commit_time.timestamp() * 1000),
                            "object": change.object_name,
                        },
                    ),
                    reason="apply",
                    changes=len(changes),
                )
        self.stats.batches += 1
        newest = max(change.commit_time for change in changes)
        self.stats.last_latency = max(0.0, time.time() - newest.timestamp())
        self.stats.latencies.append(self.stats.last_latency)

    async def _apply_object(
        self, state: _ObjectState, group: list[RecordChange]
    ) -> None:
        known = state.shape.by_api
        if any(
            name not in known
            for change in group
            for name in (*change.fields, *change.diffs)
        ):
            # A field added to the org after start: describe again and evolve
            # the mirror in this transaction, rather than dead-letter the change.
            logger.info(
                "event names fields the mirror lacks, describing the object again",
                extra={"object": state.shape.object_name},
            )
            had_columns = set(state.table.columns)
            state = await self.prepare(state.shape.object_name)
            if set(state.table.columns) - had_columns:
                # Records no event touches hold values (defaults) for the new
                # fields too: read the object once more.
                await self.catch_up(
                    state.shape.object_name, None, reason="fields added to the org"
                )
        shape, table = state.shape, state.table
        columns = {f.api_name: i for i, f in enumerate(shape.fields)}
        mapped = self.sync is not None and self.sync.watches(
            "salesforce", shape.object_name
        )
        before = (
            await self.sync.snapshot(
                self.store.conn, table, [(c.record_id,) for c in group]
            )
            if mapped and self.sync is not None
            else {}
        )
        stored = await self._modstamps(state, {c.record_id for c in group})
        changes = TableChanges(table)
        refetch: set[str] = set()
        refresh: set[str] = set()
        overflow: RecordChange | None = None
        modstamp_col = columns.get("SystemModstamp")
        deleted_col = columns.get("IsDeleted")
        received, applied = self.stats.received_by_object, self.stats.applied_by_object
        received[shape.object_name] = received.get(shape.object_name, 0) + len(group)
        for change in group:
            self.stats.events += 1
            if change.client:
                self.stats.by_origin[change.client] = (
                    self.stats.by_origin.get(change.client, 0) + 1
                )
            if change.change_type == "GAP_OVERFLOW":
                overflow = change
                continue
            if change.is_gap:
                logger.info(
                    "gap event, re-reading the record over REST",
                    extra={
                        "object": shape.object_name,
                        "change_type": change.change_type,
                        "key": change.record_id,
                        "replay_id": change.replay_id,
                    },
                )
            if change.is_gap or change.change_type == "DELETE":
                # A DELETE carries no values, yet the org changed LastModifiedDate
                # and more: read the record from the recycle bin (queryAll).
                refetch.add(change.record_id)
                continue
            current = stored.get(change.record_id)
            if current is not None and change.commit_time <= current:
                self.stats.skipped += 1
                continue
            if current is None and change.change_type in ("UPDATE", "DELETE"):
                refetch.add(
                    change.record_id
                )  # the mirror lacks the record: read it whole
                continue
            unknown = [f for f in change.fields if f not in columns]
            if unknown:
                await self.dead_letter(
                    change,
                    f"unknown field(s) {', '.join(unknown)} on "
                    f"{shape.object_name}; the mirror cannot hold them",
                )
                continue
            row: list[Any] = (
                [None] * len(shape.fields)
                if change.change_type in ("CREATE", "UNDELETE")
                else [UNCHANGED] * len(shape.fields)
            )
            row[columns["Id"]] = change.record_id
            for api_name, value in change.fields.items():
                row[columns[api_name]] = to_text(value)
            if change.diffs:
                if not await self._apply_diffs(state, change, row, columns, changes):
                    refetch.add(change.record_id)
                    continue
            if modstamp_col is not None:
                row[modstamp_col] = change.commit_time.isoformat()
            if deleted_col is not None:
                row[deleted_col] = "true" if change.change_type == "DELETE" else "false"
            changes.put((change.record_id,), tuple(row))
            stored[change.record_id] = change.commit_time
            self.stats.applied += 1
            applied[shape.object_name] = applied.get(shape.object_name, 0) + 1
            # Only a change to a formula's inputs (or a compound's parts) can
            # move a derived value: the others need no REST round trip.
            if change.change_type != "DELETE" and shape.needs_refresh(
                change.change_type, (*change.fields, *change.diffs)
            ):
                refresh.add(change.record_id)
        await self.store.apply(changes)
        if refetch:
            await self._refetch(state, refetch)
        if refresh - refetch:
            await self._refresh_calculated(state, refresh - refetch)
        if overflow is not None:
            await self.catch_up(
                shape.object_name, overflow.commit_time, reason="GAP_OVERFLOW"
            )
        if mapped and self.sync is not None:
            await self._resolve(state, group, before)

    async def _resolve(
        self,
        state: _ObjectState,
        group: list[RecordChange],
        before: dict[str, dict[str, Any]],
    ) -> None:
        """Hand what this batch changed in a mapped object's mirror to resolution."""
        assert self.sync is not None
        after = await self.sync.snapshot(
            self.store.conn, state.table, [(c.record_id,) for c in group]
        )
        # a mapped object's batch holds one event per record (_waves)
        times = {change.record_id: change.commit_time for change in group}
        client = self.sync.client_name
        position = str(max(c.replay_id for c in group))
        await self.sync.on_rows(
            self.store.conn,
            "salesforce",
            state.shape.object_name,
            before,
            after,
            times,
            position,
            ours={c.record_id for c in group if c.client == client},
        )

    async def _apply_diffs(
        self,
        state: _ObjectState,
        change: RecordChange,
        row: list[Any],
        columns: dict[str, int],
        pending: TableChanges,
    ) -> bool:
        for api_name, diff in change.diffs.items():
            if api_name not in columns:
                return False
            index = columns[api_name]
            old = await self._current_value(state, change.record_id, index, pending)
            try:
                row[index] = apply_diff(old, diff)
            except DiffMismatch as exc:
                logger.warning(
                    "diff does not fit the stored value, re-reading the record",
                    extra={
                        "object": state.shape.object_name,
                        "key": change.record_id,
                        "field": api_name,
                        "reason": str(exc),
                    },
                )
                return False
        return True

    async def _current_value(
        self, state: _ObjectState, record_id: str, index: int, pending: TableChanges
    ) -> str | None:
        queued = pending.rows.get((record_id,))
        if queued is not None and queued[1] and queued[1][index] is not UNCHANGED:
            value = queued[1][index]
            return value if isinstance(value, str) else None
        column = state.table.columns[index]
        result: str | None = await self.store.conn.fetchval(
            f"SELECT {quote_ident(column)}::text FROM {state.table.qualified} WHERE id = $1",
            record_id,
        )
        return result

    async def _refetch(self, state: _ObjectState, ids: set[str]) -> None:
        """Make the mirror equal to the org for ``ids`` (GAP_ events, bad diffs)."""
        records: list[dict[str, Any]] = []
        id_list = sorted(ids)
        for i in range(0, len(id_list), _SOQL_IDS):
            quoted = ", ".join(f"'{rid}'" for rid in id_list[i : i + _SOQL_IDS])
            soql = f"{self._select(state.shape)} WHERE Id IN ({quoted})"
            records += [r async for r in self.rest.query(soql, include_deleted=True)]
        found = {r["Id"] for r in records}
        changes = TableChanges(state.table)
        for record in records:
            changes.put((record["Id"],), self._full_row(state.shape, record))
        columns = {f.api_name: i for i, f in enumerate(state.shape.fields)}
        for gone in ids - found:  # hard-deleted: mark, keep the row
            row: list[Any] = [UNCHANGED] * len(state.shape.fields)
            row[columns["Id"]] = gone
            if "IsDeleted" in columns:
                row[columns["IsDeleted"]] = "true"
            changes.put((gone,), tuple(row))
        await self.store.apply(changes)
        self.stats.refetched += len(ids)

    async def _refresh_calculated(self, state: _ObjectState, ids: set[str]) -> None:
        """Formula fields change without events: re-read them for touched records."""
        calculated = state.shape.calculated
        fields = ["Id", *(f.api_name for f in calculated)]
        columns = {f.api_name: i for i, f in enumerate(state.shape.fields)}
        id_list = sorted(ids)
        changes = TableChanges(state.table)
        for i in range(0, len(id_list), _SOQL_IDS):
            quoted = ", ".join(f"'{rid}'" for rid in id_list[i : i + _SOQL_IDS])
            soql = f"SELECT {', '.join(fields)} FROM {state.shape.object_name} WHERE Id IN ({quoted})"
            async for record in self.rest.query(soql, include_deleted=True):
                row: list[Any] = [UNCHANGED] * len(state.shape.fields)
                row[columns["Id"]] = record["Id"]
                for f in calculated:
                    row[columns[f.api_name]] = to_text(record.get(f.api_name))
                changes.put((record["Id"],), tuple(row))
        await self.store.apply(changes)

    async def dead_letter(
        self,
        change: RecordChange | None,
        reason: str,
        *,
        raw: Any = None,
        channel: str = "",
        entity: str = "",
    ) -> None:
        self.stats.dead_letters += 1
        payload = (
            raw
            if raw is not None
            else (
                {
                    "object": change.object_name,
                    "id": change.record_id,
                    "type": change.change_type,
                    "fields": dict(change.fields),
                    "replay_id": change.replay_id,
                }
                if change
                else None
            )
        )
        await self.store.conn.execute(
            "INSERT INTO replicator.dead_letters (stream, entity, source_key, position, "
            "reason, payload) VALUES ($1, $2, $3, $4, $5, $6)",
            self.stream_name(change.channel if change else channel),
            change.object_name if change else entity,
            change.record_id if change else None,
            str(change.replay_id) if change else None,
            reason,
            orjson.dumps(payload, default=str).decode()
            if payload is not None
            else None,
        )
        logger.warning(
            "event dead-lettered",
            extra={
                "object": change.object_name if change else entity,
                "key": change.record_id if change else None,
                "reason": reason,
            },
        )


def _transaction_order(changes: list[RecordChange]) -> list[RecordChange]:
    """Order transactions by commit time, then arrival; sequenceNumber within one.

    Channels are delivered independently, so one channel's events may arrive
    far ahead of another's: arrival order alone could put a later transaction
    on a record before an earlier one, whose change the modstamp guard would
    then drop as stale. Commit time keeps each record's changes in order.
    """
    first_seen: dict[str, int] = {}
    keyed = []
    for i, change in enumerate(changes):
        key = change.transaction_key or f"#{i}"
        first = first_seen.setdefault(key, i)
        keyed.append((change.commit_time, first, change.sequence, change.replay_id, i))
    return [changes[k[4]] for k in sorted(keyed)]


def _parse_sf_time(value: Any) -> dt.datetime | None:
    if not value:
        return None
    text = str(value).replace("Z", "+00:00")
    if text[-5] in "+-" and text[-3] != ":":
        text = text[:-2] + ":" + text[-2:]
    return dt.datetime.fromisoformat(text)


def _waves(group: list[RecordChange]) -> list[list[RecordChange]]:
    """Split a batch so that each part changes a record at most once, in order.

    Resolution compares each record before and after a part: two events of
    one record in one part would show as one, and an edit that restores the
    value before the first (a user undoing our write) as none.
    """
    waves: list[list[RecordChange]] = []
    seen: dict[str, int] = {}
    for change in group:
        index = seen.get(change.record_id, 0)
        seen[change.record_id] = index + 1
        if index == len(waves):
            waves.append([])
        waves[index].append(change)
    return waves
