"""Drive a PostgreSQL streaming replication connection from the event loop.

asyncpg cannot open a replication connection, so this module uses psycopg2's
replication cursor in non-blocking mode: the socket is watched with
``loop.add_reader`` and ``read_message()`` drains what arrived. Blocking calls
(connect, slot creation) run in a worker thread while nothing else touches the
connection.

Acknowledgement rules (see ``reference/performance.md`` and BUG-15):

* the flush position sent to the server only ever comes from ``confirm()``,
  called after the replica committed the changes up to that position;
* psycopg2 moves the flush position to a keepalive's WAL end only when the
  last data message received was already confirmed, so an idle stream still
  advances while a received but unapplied transaction pins it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

from replicator.errors import ErpConnectionError, ErpError, ErpSetupError
from replicator.sources.erp.pgoutput import Decoder, Message, lsn_to_str

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SystemInfo:
    """What IDENTIFY_SYSTEM reports: recorded with every checkpoint."""

    system_identifier: str
    timeline: int
    xlogpos: int
    dbname: str


@dataclass(frozen=True, slots=True)
class NewSlot:
    """A slot just created, with the snapshot exported at its consistent point."""

    name: str
    consistent_lsn: int
    snapshot_name: str


def _parse_lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


_RENDERING = (
    "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres "
    "-c lc_monetary=C -c extra_float_digits=3"
)


def _session_options(dsn: str) -> str:
    """Keep the DSN's own ``options`` and add the fixed rendering settings after them."""
    own = psycopg2.extensions.parse_dsn(dsn).get("options", "")
    return f"{own} {_RENDERING}".strip()


def _translate(exc: psycopg2.Error, action: str) -> ErpError:
    if isinstance(exc, psycopg2.errors.ObjectInUse):
        return ErpSetupError(
            f"replication slot is in use by another process ({exc.pgerror or exc}); "
            "stop the other consumer or set erp.slot to another name"
        )
    if isinstance(exc, psycopg2.errors.InsufficientPrivilege):
        return ErpSetupError(
            f"the ERP user may not {action}: {str(exc).strip()}; grant it with "
            "ALTER ROLE <user> REPLICATION (or use a superuser)"
        )
    if isinstance(exc, psycopg2.OperationalError | psycopg2.InterfaceError):
        return ErpConnectionError(
            f"ERP connection failed while trying to {action}: {str(exc).strip()}"
        )
    return ErpError(f"ERP error while trying to {action}: {str(exc).strip()}")


class ReplicationStream:
    """One replication connection: identify, create a slot, stream, confirm."""

    def __init__(self, dsn: str, *, status_interval: float = 10.0) -> None:
        self._dsn = dsn
        self._status_interval = status_interval
        self._conn: Any = None
        self._cursor: Any = None
        self._confirmed = 0
        self._last_feedback = 0.0
        self.server_version = 0

    async def open(self) -> SystemInfo:
        """Connect in replication mode and identify the system."""
        try:
            self._conn = await asyncio.to_thread(
                psycopg2.connect,
                self._dsn,
                connection_factory=psycopg2.extras.LogicalReplicationConnection,
                # Render values independently of the role's or server's settings:
                # timestamptz with an offset in UTC, money without a locale's
                # separators, intervals in the postgres style (BUG-08, BUG-10).
                options=_session_options(self._dsn),
            )
        except psycopg2.Error as exc:
            raise _translate(exc, "open a replication connection") from exc
        self.server_version = self._conn.server_version
        self._cursor = self._conn.cursor()
        try:
            self._cursor.execute("IDENTIFY_SYSTEM")
            sysid, timeline, xlogpos, dbname = self._cursor.fetchone()
        except psycopg2.Error as exc:
            raise _translate(exc, "identify the system") from exc
        return SystemInfo(str(sysid), int(timeline), _parse_lsn(xlogpos), dbname)

    async def create_slot(self, name: str) -> NewSlot:
        """Create a logical slot for pgoutput, exporting a snapshot at its start.

        The snapshot stays valid until this connection runs its next command,
        so the initial copy must finish before ``stream()`` is called.
        """
        if self.server_version >= 150000:
            command = f"CREATE_REPLICATION_SLOT \"{name}\" LOGICAL pgoutput (SNAPSHOT 'export')"
        else:
            command = (
                f'CREATE_REPLICATION_SLOT "{name}" LOGICAL pgoutput EXPORT_SNAPSHOT'
            )

        def create() -> tuple[Any, ...]:
            self._cursor.execute(command)
            return tuple(self._cursor.fetchone())

        try:
            _, consistent, snapshot, _ = await asyncio.to_thread(create)
        except psycopg2.Error as exc:
            raise _translate(exc, f"create replication slot {name!r}") from exc
        logger.info(
            "replication slot created",
            extra={"slot": name, "consistent_lsn": consistent},
        )
        return NewSlot(name, _parse_lsn(consistent), snapshot)

    async def stream(
        self, slot: str, publication: str, start_lsn: int, *, chunk: int = 2000
    ) -> AsyncIterator[list[tuple[int, Message]] | int]:
        """Yield lists of ``(wal_start, message)`` as they arrive.

        A list is yielded when the socket has nothing more to read or when it
        holds ``chunk`` messages; the consumer's pace is the backpressure.
        When the socket runs dry, the server's WAL end is yielded as an int:
        every change before it has been yielded already.
        """
        options = {"proto_version": "1", "publication_names": publication}
        if self.server_version >= 140000:
            options |= {"proto_version": "2", "streaming": "on", "messages": "true"}
        self._confirmed = max(self._confirmed, start_lsn)
        try:
            self._cursor.start_replication(
                slot_name=slot,
                decode=False,
                start_lsn=start_lsn,
                options=options,
                status_interval=max(1, round(self._status_interval)),
            )
        except psycopg2.Error as exc:
            raise _translate(exc, f"start replication from slot {slot!r}") from exc
        logger.info(
            "replication started",
            extra={"slot": slot, "start_lsn": lsn_to_str(start_lsn)},
        )
        decoder = Decoder()
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        fd = self._conn.fileno()
        loop.add_reader(fd, readable.set)
        try:
            while True:
                batch: list[tuple[int, Message]] = []
                try:
                    while len(batch) < chunk:
                        msg = self._cursor.read_message()
                        if msg is None:
                            break
                        batch.append((msg.data_start, decoder.decode(msg.payload)))
                except psycopg2.Error as exc:
                    raise _translate(exc, "read the replication stream") from exc
                self._maybe_send_status()
                if batch:
                    yield batch
                    continue
                yield self.wal_end
                readable.clear()
                try:
                    async with asyncio.timeout(self._status_interval / 2):
                        await readable.wait()
                except TimeoutError:
                    pass
        finally:
            loop.remove_reader(fd)

    @property
    def wal_end(self) -> int:
        """The server's WAL end from the latest message or keepalive."""
        return int(self._cursor.wal_end) if self._cursor is not None else 0

    @property
    def confirmed_lsn(self) -> int:
        return self._confirmed

    def confirm(self, lsn: int) -> None:
        """Report ``lsn`` as flushed; call only after the replica committed it."""
        if lsn <= self._confirmed:
            return
        self._confirmed = lsn
        self._send_status(force=True)

    def _maybe_send_status(self) -> None:
        if time.monotonic() - self._last_feedback >= self._status_interval:
            self._send_status(force=True)

    def _send_status(self, *, force: bool) -> None:
        try:
            self._cursor.send_feedback(
                write_lsn=self._confirmed,
                flush_lsn=self._confirmed,
                apply_lsn=self._confirmed,
                force=force,
            )
        except psycopg2.Error as exc:
            raise _translate(exc, "send a standby status update") from exc
        self._last_feedback = time.monotonic()

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.close()
            except psycopg2.Error:
                logger.debug("replication connection close failed", exc_info=True)
