"""Decode ``pgoutput`` messages (logical replication protocol versions 1 and 2).

I/O-free: bytes in, typed messages out. Column values stay as the text the
server rendered (``pgoutput`` sends the type's output function text), so the
replica can cast them itself and no precision is lost on the way. A column the
server did not send because its TOASTed value is unchanged is ``UNCHANGED``,
never ``None``.

Message layouts follow "Logical Replication Message Formats" in the
PostgreSQL documentation (chapter 55.9). In protocol version 2, messages sent
between Stream Start and Stream Stop carry the transaction id first; the
decoder tracks that state itself.
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Final, NamedTuple, cast

from replicator.errors import ErpError

PG_EPOCH: Final = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


class _Unchanged(Enum):
    UNCHANGED = "unchanged-toast"

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged.UNCHANGED
Value = str | bytes | None | _Unchanged
Tuple = tuple[Value, ...]

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_I64 = struct.Struct("!q")
_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")
_STREAM_COMMIT = struct.Struct("!IBQQq")


def lsn_to_str(lsn: int) -> str:
    """Render an LSN the way PostgreSQL does (``16/B374D848``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def str_to_lsn(text: str) -> int:
    """Parse ``16/B374D848`` into an integer LSN."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def pg_time(micros: int) -> dt.datetime:
    """Convert microseconds since 2000-01-01 UTC into an aware datetime."""
    return PG_EPOCH + dt.timedelta(microseconds=micros)


class DecodeError(ErpError):
    """A ``pgoutput`` message could not be decoded."""

    retriable = False


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    namespace: str
    name: str
    replica_identity: str  # d default, n nothing, f full, i index
    columns: tuple[Column, ...]
    xid: int | None = None

    @property
    def key_indexes(self) -> tuple[int, ...]:
        return tuple(i for i, col in enumerate(self.columns) if col.is_key)

    @property
    def qualified_name(self) -> str:
        return f"{self.namespace}.{self.name}"


class Begin(NamedTuple):
    final_lsn: int
    commit_time: dt.datetime
    xid: int


class Commit(NamedTuple):
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: dt.datetime


class Origin(NamedTuple):
    commit_lsn: int
    name: str


class TypeMessage(NamedTuple):
    oid: int
    namespace: str
    name: str
    xid: int | None


class Insert(NamedTuple):
    relation_oid: int
    new: Tuple
    xid: int | None


class Update(NamedTuple):
    relation_oid: int
    old: Tuple | None  # the old key ('K') or the old full row ('O'), if sent
    old_is_key_only: bool
    new: Tuple
    xid: int | None


class Delete(NamedTuple):
    relation_oid: int
    old: Tuple
    old_is_key_only: bool
    xid: int | None


class Truncate(NamedTuple):
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool
    xid: int | None


class LogicalMessage(NamedTuple):
    transactional: bool
    lsn: int
    prefix: str
    content: bytes
    xid: int | None


class StreamStart(NamedTuple):
    xid: int
    first_segment: bool


class StreamStop(NamedTuple):
    pass


class StreamCommit(NamedTuple):
    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: dt.datetime


class StreamAbort(NamedTuple):
    xid: int
    subxid: int


Message = (
    Begin
    | Commit
    | Origin
    | Relation
    | TypeMessage
    | Insert
    | Update
    | Delete
    | Truncate
    | LogicalMessage
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
)


_new_tuple = tuple.__new__


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(b"\0", pos)
    return buf[pos:end].decode(), end + 1


def decode_tuple(buf: bytes, pos: int) -> tuple[Tuple, int]:
    """Decode TupleData at ``pos``; return the values and the next position."""
    (ncols,) = _I16.unpack_from(buf, pos)
    pos += 2
    values: list[Value] = []
    append = values.append
    for _ in range(ncols):
        kind = buf[pos]
        pos += 1
        if kind == 0x74:  # 't' text
            (length,) = _I32.unpack_from(buf, pos)
            pos += 4
            append(buf[pos : pos + length].decode())
            pos += length
        elif kind == 0x6E:  # 'n' null
            append(None)
        elif kind == 0x75:  # 'u' unchanged TOAST datum: no bytes were sent
            append(UNCHANGED)
        elif kind == 0x62:  # 'b' binary (only with the binary option)
            (length,) = _I32.unpack_from(buf, pos)
            pos += 4
            append(bytes(buf[pos : pos + length]))
            pos += length
        else:
            raise DecodeError(f"unknown tuple column kind {chr(kind)!r} at {pos - 1}")
    return tuple(values), pos


class Decoder:
    """Turn raw ``pgoutput`` payloads into messages, one call per payload."""

    def __init__(self) -> None:
        self.in_stream = False

    def decode(self, buf: bytes) -> Message:
        handler = _HANDLERS.get(buf[0]) if buf else None
        if handler is None:
            raise DecodeError(f"unknown pgoutput message type {buf[0:1]!r}")
        try:
            return cast(Message, handler(self, buf))
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(
                f"malformed pgoutput {buf[0:1]!r} message: {exc}"
            ) from exc

    def _xid(self, buf: bytes) -> tuple[int | None, int]:
        if self.in_stream:
            return _U32.unpack_from(buf, 1)[0], 5
        return None, 1

    def _begin(self, buf: bytes) -> Begin:
        final_lsn, ts, xid = _BEGIN.unpack_from(buf, 1)
        return Begin(final_lsn, pg_time(ts), xid)

    def _commit(self, buf: bytes) -> Commit:
        flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(buf, 1)
        return Commit(flags, commit_lsn, end_lsn, pg_time(ts))

    def _origin(self, buf: bytes) -> Origin:
        (lsn,) = _U64.unpack_from(buf, 1)
        name, _ = _cstring(buf, 9)
        return Origin(lsn, name)

    def _relation(self, buf: bytes) -> Relation:
        xid, pos = self._xid(buf)
        (oid,) = _U32.unpack_from(buf, pos)
        namespace, pos = _cstring(buf, pos + 4)
        name, pos = _cstring(buf, pos)
        identity = chr(buf[pos])
        (ncols,) = _I16.unpack_from(buf, pos + 1)
        pos += 3
        columns = []
        for _ in range(ncols):
            flags = buf[pos]
            colname, pos = _cstring(buf, pos + 1)
            type_oid, typmod = struct.unpack_from("!Ii", buf, pos)
            pos += 8
            columns.append(Column(colname, type_oid, typmod, bool(flags & 1)))
        return Relation(
            oid, namespace or "pg_catalog", name, identity, tuple(columns), xid
        )

    def _type(self, buf: bytes) -> TypeMessage:
        xid, pos = self._xid(buf)
        (oid,) = _U32.unpack_from(buf, pos)
        namespace, pos = _cstring(buf, pos + 4)
        name, _ = _cstring(buf, pos)
        return TypeMessage(oid, namespace, name, xid)

    # Row messages are most of a stream: they skip the NamedTuple constructor
    # (a Python-level function) and build the tuple directly.

    def _insert(self, buf: bytes) -> Insert:
        xid, pos = self._xid(buf) if self.in_stream else (None, 1)
        (oid,) = _U32.unpack_from(buf, pos)
        if buf[pos + 4] != 0x4E:  # 'N'
            raise DecodeError("insert without a new tuple")
        new, _ = decode_tuple(buf, pos + 5)
        return _new_tuple(Insert, (oid, new, xid))

    def _update(self, buf: bytes) -> Update:
        xid, pos = self._xid(buf) if self.in_stream else (None, 1)
        (oid,) = _U32.unpack_from(buf, pos)
        pos += 4
        old: Tuple | None = None
        key_only = False
        marker = buf[pos]
        if marker in (0x4B, 0x4F):  # 'K' old key, 'O' old full row
            key_only = marker == 0x4B
            old, pos = decode_tuple(buf, pos + 1)
            marker = buf[pos]
        if marker != 0x4E:
            raise DecodeError("update without a new tuple")
        new, _ = decode_tuple(buf, pos + 1)
        return _new_tuple(Update, (oid, old, key_only, new, xid))

    def _delete(self, buf: bytes) -> Delete:
        xid, pos = self._xid(buf) if self.in_stream else (None, 1)
        (oid,) = _U32.unpack_from(buf, pos)
        marker = buf[pos + 4]
        if marker not in (0x4B, 0x4F):
            raise DecodeError("delete without an old key or row")
        old, _ = decode_tuple(buf, pos + 5)
        return _new_tuple(Delete, (oid, old, marker == 0x4B, xid))

    def _truncate(self, buf: bytes) -> Truncate:
        xid, pos = self._xid(buf)
        (nrels,) = _I32.unpack_from(buf, pos)
        options = buf[pos + 4]
        oids = struct.unpack_from(f"!{nrels}I", buf, pos + 5)
        return Truncate(tuple(oids), bool(options & 1), bool(options & 2), xid)

    def _message(self, buf: bytes) -> LogicalMessage:
        xid, pos = self._xid(buf)
        flags = buf[pos]
        (lsn,) = _U64.unpack_from(buf, pos + 1)
        prefix, pos = _cstring(buf, pos + 9)
        (length,) = _I32.unpack_from(buf, pos)
        content = bytes(buf[pos + 4 : pos + 4 + length])
        return LogicalMessage(bool(flags & 1), lsn, prefix, content, xid)

    def _stream_start(self, buf: bytes) -> StreamStart:
        (xid,) = _U32.unpack_from(buf, 1)
        self.in_stream = True
        return StreamStart(xid, bool(buf[5]))

    def _stream_stop(self, buf: bytes) -> StreamStop:
        self.in_stream = False
        return StreamStop()

    def _stream_commit(self, buf: bytes) -> StreamCommit:
        xid, flags, commit_lsn, end_lsn, ts = _STREAM_COMMIT.unpack_from(buf, 1)
        return StreamCommit(xid, flags, commit_lsn, end_lsn, pg_time(ts))

    def _stream_abort(self, buf: bytes) -> StreamAbort:
        xid, subxid = struct.unpack_from("!II", buf, 1)
        return StreamAbort(xid, subxid)


_HANDLERS = {
    ord("B"): Decoder._begin,
    ord("C"): Decoder._commit,
    ord("O"): Decoder._origin,
    ord("R"): Decoder._relation,
    ord("Y"): Decoder._type,
    ord("I"): Decoder._insert,
    ord("U"): Decoder._update,
    ord("D"): Decoder._delete,
    ord("T"): Decoder._truncate,
    ord("M"): Decoder._message,
    ord("S"): Decoder._stream_start,
    ord("E"): Decoder._stream_stop,
    ord("c"): Decoder._stream_commit,
    ord("A"): Decoder._stream_abort,
}
