"""The pgoutput decoder, on messages built byte by byte from the protocol documentation."""

from __future__ import annotations

import datetime as dt
import struct

import pytest

from replicator.sources.erp.pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    DecodeError,
    Decoder,
    Delete,
    Insert,
    LogicalMessage,
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
    str_to_lsn,
)

T0 = dt.datetime(2024, 6, 4, 12, 0, tzinfo=dt.UTC)
T0_MICROS = int(
    (T0 - dt.datetime(2000, 1, 1, tzinfo=dt.UTC)).total_seconds() * 1_000_000
)


def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def tuple_data(*values: object) -> bytes:
    out = struct.pack("!h", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is UNCHANGED:
            out += b"u"
        elif isinstance(value, bytes):
            out += b"b" + struct.pack("!i", len(value)) + value
        else:
            raw = str(value).encode()
            out += b"t" + struct.pack("!i", len(raw)) + raw
    return out


def test_lsn_text_round_trips() -> None:
    assert lsn_to_str(0x16B374D848) == "16/B374D848"
    assert str_to_lsn("16/B374D848") == 0x16B374D848
    assert str_to_lsn(lsn_to_str(0)) == 0


def test_begin_and_commit_carry_lsns_and_utc_times() -> None:
    decoder = Decoder()

    begin = decoder.decode(b"B" + struct.pack("!QqI", 0x1234, T0_MICROS, 77))
    commit = decoder.decode(
        b"C" + struct.pack("!BQQq", 0, 0x1234, 0x1260, T0_MICROS + 5)
    )

    assert begin == Begin(0x1234, T0, 77)
    assert commit == Commit(0, 0x1234, 0x1260, T0 + dt.timedelta(microseconds=5))


def test_origin_names_the_replication_origin() -> None:
    msg = Decoder().decode(b"O" + struct.pack("!Q", 99) + cstr("replicator"))

    assert msg == Origin(99, "replicator")


def test_relation_lists_columns_with_key_flags_and_types() -> None:
    body = struct.pack("!I", 16384) + cstr("public") + cstr("customer") + b"d"
    body += struct.pack("!h", 2)
    body += b"\x01" + cstr("code") + struct.pack("!Ii", 25, -1)
    body += b"\x00" + cstr("credit") + struct.pack("!Ii", 1700, (12 << 16 | 2) + 4)

    rel = Decoder().decode(b"R" + body)

    assert isinstance(rel, Relation)
    assert (rel.namespace, rel.name, rel.replica_identity) == (
        "public",
        "customer",
        "d",
    )
    assert [c.name for c in rel.columns] == ["code", "credit"]
    assert rel.key_indexes == (0,)
    assert rel.columns[1].type_oid == 1700


def test_relation_in_pg_catalog_has_empty_namespace_rendered_as_pg_catalog() -> None:
    body = struct.pack("!I", 1) + cstr("") + cstr("t") + b"f" + struct.pack("!h", 0)

    rel = Decoder().decode(b"R" + body)

    assert isinstance(rel, Relation)
    assert rel.namespace == "pg_catalog"


def test_type_message() -> None:
    msg = Decoder().decode(
        b"Y" + struct.pack("!I", 5000) + cstr("public") + cstr("mood")
    )

    assert msg == TypeMessage(5000, "public", "mood", None)


def test_insert_keeps_null_empty_text_and_unicode_apart() -> None:
    payload = b"I" + struct.pack("!I", 7) + b"N" + tuple_data(None, "", "Zoë 😀", "0")

    msg = Decoder().decode(payload)

    assert msg == Insert(7, (None, "", "Zoë 😀", "0"), None)


def test_update_with_unchanged_toast_column_marks_it_unchanged_not_null() -> None:
    payload = b"U" + struct.pack("!I", 7) + b"N" + tuple_data("C-1001", UNCHANGED, None)

    msg = Decoder().decode(payload)

    assert isinstance(msg, Update)
    assert msg.new == ("C-1001", UNCHANGED, None)
    assert msg.new[1] is not None
    assert msg.old is None


def test_update_with_old_key_and_with_old_full_row() -> None:
    key_update = b"U" + struct.pack("!I", 7) + b"K" + tuple_data("a", None)
    key_update += b"N" + tuple_data("b", "x")
    full_update = b"U" + struct.pack("!I", 7) + b"O" + tuple_data("a", "long")
    full_update += b"N" + tuple_data("a", UNCHANGED)

    by_key = Decoder().decode(key_update)
    by_row = Decoder().decode(full_update)

    assert by_key == Update(7, ("a", None), True, ("b", "x"), None)
    assert by_row == Update(7, ("a", "long"), False, ("a", UNCHANGED), None)


def test_delete_with_key_and_binary_value() -> None:
    payload = b"D" + struct.pack("!I", 9) + b"K" + tuple_data("k", b"\x00\xff")

    msg = Decoder().decode(payload)

    assert msg == Delete(9, ("k", b"\x00\xff"), True, None)


def test_truncate_lists_every_relation_and_its_options() -> None:
    payload = b"T" + struct.pack("!iB", 2, 3) + struct.pack("!II", 10, 11)

    msg = Decoder().decode(payload)

    assert msg == Truncate((10, 11), True, True, None)


def test_logical_message() -> None:
    payload = b"M" + b"\x00" + struct.pack("!Q", 500) + cstr("replicator.heartbeat")
    payload += struct.pack("!i", 2) + b"hi"

    msg = Decoder().decode(payload)

    assert msg == LogicalMessage(False, 500, "replicator.heartbeat", b"hi", None)


def test_messages_inside_a_stream_carry_the_transaction_id() -> None:
    decoder = Decoder()

    start = decoder.decode(b"S" + struct.pack("!IB", 900, 1))
    insert = decoder.decode(b"I" + struct.pack("!II", 900, 7) + b"N" + tuple_data("1"))
    stop = decoder.decode(b"E")
    after = decoder.decode(b"I" + struct.pack("!I", 7) + b"N" + tuple_data("2"))

    assert start == StreamStart(900, True)
    assert insert == Insert(7, ("1",), 900)
    assert stop == StreamStop()
    assert after == Insert(7, ("2",), None)


def test_stream_commit_and_abort() -> None:
    decoder = Decoder()

    commit = decoder.decode(b"c" + struct.pack("!IBQQq", 900, 0, 10, 20, T0_MICROS))
    abort = decoder.decode(b"A" + struct.pack("!II", 900, 901))

    assert commit == StreamCommit(900, 0, 10, 20, T0)
    assert abort == StreamAbort(900, 901)


@pytest.mark.parametrize(
    "payload",
    [
        b"Z",
        b"I" + struct.pack("!I", 7) + b"X",
        b"I" + struct.pack("!I", 7) + b"N" + struct.pack("!h", 1) + b"q",
        b"B\x00\x01",
    ],
)
def test_malformed_messages_raise_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        Decoder().decode(payload)
