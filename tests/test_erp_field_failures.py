"""Field-failure cases BUG-01 … BUG-17 (PostgreSQL side) against real PostgreSQL.

Each test runs a case of ``cases/field-failures.md`` with the case's own input
and expected values, on the fixture F0 where the case uses it. The Salesforce
side of each case (PATCH bodies, upserts) belongs to the two-way work and is
not asserted here; everything about the replica, the slot and the logs is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.fixtures.erp_daemon import (
    Daemon,
    PausablePostgres,
    checkpoint_lsn,
    current_lsn,
    fetchval,
    lsn_at_least,
    running_pipeline,
    slot_row,
    wait_caught_up,
    wait_for,
    write_config,
)
from tests.fixtures.pg import ErpCase, assert_mirrored, replicate, table_text

pytestmark = pytest.mark.integration

# Fixture F0 with baseline B0 (cases/field-failures.md); the replica's sf_id
# column belongs to the unified layer and is not part of the mirror.
F0_CUSTOMER = """
CREATE TABLE customer (
  customer_code text PRIMARY KEY, name text NOT NULL, phone text, industry text,
  rating text, credit_limit numeric(12,2), billing_street text, billing_city text,
  billing_state text, billing_postal text, billing_country text, notes text,
  attributes jsonb, sf_account_ref text, updated_at timestamp);
ALTER TABLE customer ALTER COLUMN notes SET STORAGE EXTERNAL;
INSERT INTO customer VALUES
  ('C-1001', 'Acme Tools', '555-0100', 'Machinery', 'Warm', 2500.00, '12 Harbor Rd',
   'Portsmouth', 'NH', '03801', 'US', repeat('Preferred carrier: Northwind. ', 400),
   '{"tier": "silver"}', NULL, NULL),
  ('C-1002', 'Birch Supply', '555-0200', 'Lumber', 'Cold', 750.00, '4 Mill St',
   'Keene', 'NH', '03431', 'US', 'short text', NULL, NULL, NULL),
  ('C-1003', 'Cobalt Works', '555-0300', 'Metals', 'Warm', 1200.00, '9 Forge Ln',
   'Nashua', 'NH', '03060', 'US', 'short text', NULL, NULL, NULL);
"""


def problems(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every WARNING or worse the engine logged."""
    return [
        f"{r.levelname} {r.getMessage()} {getattr(r, 'error', '')}"
        for r in caplog.records
        if r.name.startswith("replicator") and r.levelno >= logging.WARNING
    ]


async def set_role_default(conn: asyncpg.Connection, setting: str, value: str) -> None:
    """Give the connecting role a default for ``setting`` in this database only."""
    db = await conn.fetchval("SELECT current_database()")
    await conn.execute(
        f"ALTER ROLE CURRENT_USER IN DATABASE \"{db}\" SET {setting} = '{value}'"
    )


async def install_write_audit(
    replica: asyncpg.Connection, table: str, key: str, column: str
) -> None:
    """Record every write to ``erp.table`` in the replica (key, op, a column's text)."""
    await replica.execute(f"""
        CREATE TABLE public.audit_{table} (n bigserial, k text, op text, v text);
        CREATE FUNCTION public.audit_{table}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          INSERT INTO public.audit_{table} (k, op, v)
          VALUES (NEW.{key}::text, TG_OP, NEW.{column}::text);
          RETURN NULL;
        END $$;
        CREATE TRIGGER audit AFTER INSERT OR UPDATE ON erp.{table}
          FOR EACH ROW EXECUTE FUNCTION public.audit_{table}();
    """)


# -- BUG-01 -------------------------------------------------------------------


async def test_unchanged_toast_notes_never_blank_the_mirror_in_one_stream(
    erp_case: ErpCase, connect, caplog: pytest.LogCaptureFixture
) -> None:
    """BUG-01: both updates leave notes as 'u'; no write to the mirror ever blanks it.

    Both updates and the identity change reach one running engine, so the
    partial-row path with and without the old full row is taken in one stream.
    """
    caplog.set_level(logging.INFO, logger="replicator")
    erp = await connect(erp_case.erp_dsn)
    await erp.execute(F0_CUSTOMER)
    await replicate(erp_case)
    replica = await connect(erp_case.replica_dsn)
    await install_write_audit(replica, "customer", "customer_code", "notes")
    source_md5 = await erp.fetchval(
        "SELECT md5(notes) FROM customer WHERE customer_code = 'C-1001'"
    )

    async with running_pipeline(erp_case):
        await erp.execute(
            "UPDATE customer SET phone = '555-0199' WHERE customer_code = 'C-1001'"
        )
        await erp.execute("ALTER TABLE customer REPLICA IDENTITY FULL")
        await erp.execute(
            "UPDATE customer SET name = 'Acme Tools Ltd' WHERE customer_code = 'C-1001'"
        )
        await wait_caught_up(erp_case.erp_dsn, erp_case.replica_dsn)

    row = await replica.fetchrow(
        "SELECT phone, name, length(notes) AS n, md5(notes) AS h FROM erp.customer "
        "WHERE customer_code = 'C-1001'"
    )
    assert dict(row) == {
        "phone": "555-0199",
        "name": "Acme Tools Ltd",
        "n": 12000,
        "h": source_md5,
    }
    history = await replica.fetch(
        "SELECT op, v FROM public.audit_customer WHERE k = 'C-1001' ORDER BY n"
    )
    assert len(history) >= 1
    assert all(h["v"] is not None and len(h["v"]) == 12000 for h in history)
    assert (
        await replica.fetchval(
            "SELECT count(*) FROM public.audit_customer WHERE k <> 'C-1001'"
        )
        == 0
    )
    await assert_mirrored(erp_case, "customer")
    assert problems(caplog) == []


# -- BUG-03 -------------------------------------------------------------------

SALES_ORDER = """
CREATE TABLE sales_order (
  order_no int, order_date date NOT NULL, customer_code text, amount numeric(12,2),
  PRIMARY KEY (order_no, order_date)) PARTITION BY RANGE (order_date);
CREATE TABLE sales_order_2024q1 PARTITION OF sales_order
  FOR VALUES FROM ('2024-01-01') TO ('2024-04-01');
CREATE TABLE sales_order_2024q2 PARTITION OF sales_order
  FOR VALUES FROM ('2024-04-01') TO ('2024-07-01');
"""


@pytest.mark.parametrize("via_root", [False, True], ids=["leaf_mode", "root_mode"])
async def test_partitioned_table_lands_in_one_root_mirror_in_both_publish_modes(
    erp_case: ErpCase, connect, caplog: pytest.LogCaptureFixture, via_root: bool
) -> None:
    """BUG-03: leaf relations, a partition created later and a cross-partition move
    all land in the root's mirror; no mirror is created per leaf."""
    caplog.set_level(logging.INFO, logger="replicator")
    erp = await connect(erp_case.erp_dsn)
    await erp.execute(SALES_ORDER)
    await erp.execute(
        f"CREATE PUBLICATION {erp_case.publication} FOR ALL TABLES "
        f"WITH (publish_via_partition_root = {str(via_root).lower()})"
    )
    await replicate(erp_case)

    async with running_pipeline(erp_case):
        await erp.execute(
            "INSERT INTO sales_order VALUES (7, '2024-03-30', 'C-1001', 120.00)"
        )
        await erp.execute(
            "UPDATE sales_order SET order_date = '2024-04-02' WHERE order_no = 7"
        )
        await erp.execute(
            "CREATE TABLE sales_order_2024q3 PARTITION OF sales_order "
            "FOR VALUES FROM ('2024-07-01') TO ('2024-10-01')"
        )
        await erp.execute(
            "INSERT INTO sales_order VALUES (8, '2024-07-15', 'C-1001', 99.50)"
        )
        await wait_caught_up(erp_case.erp_dsn, erp_case.replica_dsn)

    assert await table_text(erp_case.replica_dsn, "erp.sales_order") == [
        "(7,2024-04-02,C-1001,120.00)",
        "(8,2024-07-15,C-1001,99.50)",
    ]
    replica = await connect(erp_case.replica_dsn)
    assert (
        await replica.fetchval(
            "SELECT count(*) FROM erp.sales_order WHERE order_date = '2024-03-30'"
        )
        == 0
    )
    assert [
        r[0]
        for r in await replica.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'erp' "
            "ORDER BY 1"
        )
    ] == ["sales_order"]
    assert [
        r[0]
        for r in await replica.fetch(
            "SELECT mirror_table FROM replicator.mirror_tables"
        )
    ] == ["sales_order"]
    assert problems(caplog) == []


async def test_partitioned_table_created_mid_stream_mirrors_in_root_column_order(
    erp_case: ErpCase, connect
) -> None:
    """BUG-03, partitions created later: a table partitioned after start-up, with a
    partition whose own column order differs from the root's, is mirrored with the
    root's columns and order (leaf mode sends the leaf's relation first)."""
    erp = await connect(erp_case.erp_dsn)
    await erp.execute(
        f"CREATE PUBLICATION {erp_case.publication} FOR ALL TABLES "
        "WITH (publish_via_partition_root = false)"
    )
    await replicate(erp_case)

    async with running_pipeline(erp_case):
        await erp.execute("""
            CREATE TABLE sales_order (
              order_no int, order_date date NOT NULL, customer_code text,
              amount numeric(12,2), PRIMARY KEY (order_no, order_date))
              PARTITION BY RANGE (order_date);
            CREATE TABLE sales_order_old (amount numeric(12,2), customer_code text,
                                          order_date date NOT NULL, order_no int NOT NULL);
            ALTER TABLE sales_order ATTACH PARTITION sales_order_old
              FOR VALUES FROM ('2020-01-01') TO ('2024-01-01');
            INSERT INTO sales_order VALUES (5, '2023-05-01', 'C-1002', 10.00);
        """)
        await wait_caught_up(erp_case.erp_dsn, erp_case.replica_dsn)

    assert await table_text(erp_case.replica_dsn, "erp.sales_order") == [
        "(5,2023-05-01,C-1002,10.00)"
    ]
    await assert_mirrored(erp_case, "sales_order")


# -- BUG-04 -------------------------------------------------------------------


async def test_truncate_cascade_keeps_engine_running_and_slot_advancing(
    erp_case: ErpCase, connect, caplog: pytest.LogCaptureFixture
) -> None:
    """BUG-04: on a running engine the slot reaches the last commit within two
    status intervals, and an INFO names both truncated tables."""
    caplog.set_level(logging.INFO, logger="replicator")
    status_interval = 1.0
    erp = await connect(erp_case.erp_dsn)
    await erp.execute("""
        CREATE TABLE price_list (sku text PRIMARY KEY, price numeric(10,2));
        CREATE TABLE price_list_note (id int PRIMARY KEY,
                                      sku text REFERENCES price_list(sku), note text);
        INSERT INTO price_list VALUES ('SKU-1', 10.00), ('SKU-2', 20.00);
        INSERT INTO price_list_note VALUES (1, 'SKU-1', 'seasonal');
    """)
    await replicate(erp_case)

    async with running_pipeline(erp_case, status_interval_seconds=status_interval) as p:
        await erp.execute(
            "BEGIN; TRUNCATE price_list CASCADE; "
            "INSERT INTO price_list VALUES ('SKU-9', 12.50); COMMIT;"
        )
        await erp.execute("INSERT INTO price_list VALUES ('SKU-10', 3.00)")
        last_commit = await current_lsn(erp_case.erp_dsn)
        committed_at = time.monotonic()

        async def slot_at_commit() -> bool:
            row = await slot_row(erp_case.erp_dsn, erp_case.slot)
            return await lsn_at_least(erp_case.erp_dsn, row["confirmed"], last_commit)

        await wait_for(slot_at_commit, timeout=10, interval=0.05, what="slot progress")
        took = time.monotonic() - committed_at
        still_running = p.ready.is_set()

    assert took <= 2 * status_interval
    assert still_running
    assert await table_text(erp_case.replica_dsn, "erp.price_list") == [
        "(SKU-10,3.00)",
        "(SKU-9,12.50)",
    ]
    assert await table_text(erp_case.replica_dsn, "erp.price_list_note") == []
    truncates = [
        r
        for r in caplog.records
        if "truncat" in r.getMessage() and r.levelno >= logging.INFO
    ]
    assert any(
        {"price_list", "price_list_note"} <= set(getattr(r, "tables", ()))
        for r in truncates
    )
    assert problems(caplog) == []


# -- BUG-05 -------------------------------------------------------------------


async def test_columns_added_while_streaming_evolve_a_cached_relation(
    erp_case: ErpCase, connect, caplog: pytest.LogCaptureFixture
) -> None:
    """BUG-05 outcome A on a running engine that already holds customer's old
    Relation: existing rows get the DEFAULT, the new values arrive."""
    caplog.set_level(logging.INFO, logger="replicator")
    erp = await connect(erp_case.erp_dsn)
    await erp.execute(F0_CUSTOMER)
    await replicate(erp_case)

    async with running_pipeline(erp_case):
        await erp.execute(
            "UPDATE customer SET rating = 'Hot' WHERE customer_code = 'C-1003'"
        )
        await wait_caught_up(erp_case.erp_dsn, erp_case.replica_dsn)
        await erp.execute(
            "ALTER TABLE customer ADD COLUMN segment text NOT NULL DEFAULT 'retail'"
        )
        await erp.execute("ALTER TABLE customer ADD COLUMN payment_terms_days int")
        await erp.execute(
            "UPDATE customer SET payment_terms_days = 45 WHERE customer_code = 'C-1001'"
        )
        await erp.execute(
            "INSERT INTO customer (customer_code, name, phone, segment) "
            "VALUES ('C-1004', 'Dune Logistics', '555-0400', 'wholesale')"
        )
        await wait_caught_up(erp_case.erp_dsn, erp_case.replica_dsn)

    assert await table_text(
        erp_case.replica_dsn,
        "(SELECT customer_code, segment, payment_terms_days FROM erp.customer)",
    ) == [
        "(C-1001,retail,45)",
        "(C-1002,retail,)",
        "(C-1003,retail,)",
        "(C-1004,wholesale,)",
    ]
    await assert_mirrored(erp_case, "customer")
    assert problems(caplog) == []


# -- BUG-06 -------------------------------------------------------------------


async def test_enum_label_added_while_streaming_is_applied_in_order_without_error(
    erp_case: ErpCase, connect, caplog: pytest.LogCaptureFixture
) -> None:
    """BUG-06 on a running engine: ADD VALUE sends no new Relation, yet the mirror's
    enum gains the label and both updates land, in order, with no error."""
    caplog.set_level(logging.INFO, logger="replicator")
    erp = await connect(erp_case.erp_dsn)
    await erp.execute("""
        CREATE TYPE order_status AS ENUM ('open', 'shipped');
        CREATE TABLE fulfilment (order_no int PRIMARY KEY, status order_status NOT NULL);
        INSERT INTO fulfilment VALUES (1, 'open'), (2, 'open');
    """)
    await replicate(erp_case)

    async with running_pipeline(erp_case):
        await erp.execute("INSERT INTO fulfilment VALUES (3, 'shipped')")
        await wait_caught_up(erp_case.erp_dsn, erp_case.replica_dsn)
        await erp.execute("ALTER TYPE order_status ADD VALUE 'on_hold'")
        await erp.execute("UPDATE fulfilment SET status = 'on_hold' WHERE order_no = 1")
        await erp.execute("UPDATE fulfilment SET status = 'shipped' WHERE order_no = 2")
        await wait_caught_up(erp_case.erp_dsn, erp_case.replica_dsn)

    assert await table_text(erp_case.replica_dsn, "erp.fulfilment") == [
        "(1,on_hold)",
        "(2,shipped)",
        "(3,shipped)",
    ]
    assert problems(caplog) == []


# -- BUG-08 -------------------------------------------------------------------


def _other_monetary_locale() -> str:
    """An installed locale whose money format differs from C's ('$1,234.56')."""
    installed = {name.lower().replace("utf-8", "utf8") for name in _locales()}
    for name in ("de_DE.UTF-8", "fr_FR.UTF-8", "en_IN.UTF-8", "en_US.UTF-8"):
        if name.lower().replace("utf-8", "utf8") in installed:
            return name
    return "C.UTF-8"


def _locales() -> list[str]:
    import subprocess

    out = subprocess.run(["locale", "-a"], capture_output=True, text=True, check=False)
    return out.stdout.split()


@pytest.mark.parametrize(
    "lc_monetary",
    [None, _other_monetary_locale()],
    ids=["server_default", "role_default"],
)
async def test_money_is_exact_whatever_the_sessions_lc_monetary(
    erp_case: ErpCase,
    connect,
    caplog: pytest.LogCaptureFixture,
    lc_monetary: str | None,
) -> None:
    """BUG-08: money stays exact through the snapshot and the stream, also when
    the ERP role's own lc_monetary would render it with other symbols."""
    caplog.set_level(logging.INFO, logger="replicator")
    erp = await connect(erp_case.erp_dsn)
    if lc_monetary is not None:
        await set_role_default(erp, "lc_monetary", lc_monetary)
        plain = await connect(erp_case.erp_dsn)
        assert await plain.fetchval("SHOW lc_monetary") == lc_monetary
    await erp.execute("""
        CREATE TABLE customer_balance (customer_code text PRIMARY KEY, balance money);
        INSERT INTO customer_balance VALUES ('C-1002', '-92233720368547758.08');
        INSERT INTO customer_balance VALUES ('C-1003', NULL);
    """)
    await replicate(erp_case)

    await erp.execute("INSERT INTO customer_balance VALUES ('C-1001', 1234567.89)")
    await replicate(erp_case)
    replica = await connect(erp_case.replica_dsn)
    before_update = await replica.fetchval(
        "SELECT balance::numeric::text FROM erp.customer_balance "
        "WHERE customer_code = 'C-1001'"
    )
    await erp.execute(
        "UPDATE customer_balance SET balance = '-0.01' WHERE customer_code = 'C-1001'"
    )
    await replicate(erp_case)

    assert before_update == "1234567.89"
    rows = await replica.fetch(
        "SELECT customer_code, balance::numeric::text AS b "
        "FROM erp.customer_balance ORDER BY 1"
    )
    assert [tuple(r) for r in rows] == [
        ("C-1001", "-0.01"),
        ("C-1002", "-92233720368547758.08"),
        ("C-1003", None),
    ]
    assert problems(caplog) == []


# -- BUG-09 -------------------------------------------------------------------


async def test_numeric_nan_and_high_precision_stay_exact_and_slot_advances(
    erp_case: ErpCase, connect, caplog: pytest.LogCaptureFixture
) -> None:
    """BUG-09 (replica side): NaN is stored as NaN, 19 fractional digits and a
    2^53+1 integer are exact, and the engine neither loops nor stalls the slot."""
    caplog.set_level(logging.INFO, logger="replicator")
    erp = await connect(erp_case.erp_dsn)
    await erp.execute(
        "CREATE TABLE item_cost (sku text PRIMARY KEY, unit_cost numeric, "
        "std_cost numeric(20,0))"
    )
    await replicate(erp_case)

    await erp.execute("INSERT INTO item_cost VALUES ('SKU-1', 'NaN', 9007199254740993)")
    await erp.execute(
        "INSERT INTO item_cost VALUES ('SKU-2', 0.1234567890123456789, 1)"
    )
    stats_nan = await replicate(erp_case)
    before_update = await table_text(erp_case.replica_dsn, "erp.item_cost")
    await erp.execute("UPDATE item_cost SET unit_cost = 2.50 WHERE sku = 'SKU-1'")
    last_commit = await current_lsn(erp_case.erp_dsn)
    await replicate(erp_case)

    assert before_update == [
        "(SKU-1,NaN,9007199254740993)",
        "(SKU-2,0.1234567890123456789,1)",
    ]
    assert stats_nan.transactions == 2
    assert await table_text(erp_case.replica_dsn, "erp.item_cost") == [
        "(SKU-1,2.50,9007199254740993)",
        "(SKU-2,0.1234567890123456789,1)",
    ]
    confirmed = (await slot_row(erp_case.erp_dsn, erp_case.slot))["confirmed"]
    assert await lsn_at_least(erp_case.erp_dsn, confirmed, last_commit)
    assert problems(caplog) == []


# -- BUG-10 -------------------------------------------------------------------


@pytest.fixture
def engine_in_kolkata() -> Iterator[None]:
    """Run the engine (this process) with TZ=Asia/Kolkata, restored afterwards."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "Asia/Kolkata"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


@pytest.mark.parametrize("session_zone", ["utc", "role_default", "dsn_options"])
async def test_timestamptz_instant_and_wall_clock_timestamp_survive_any_time_zone(
    erp_case: ErpCase, connect, engine_in_kolkata: None, session_zone: str
) -> None:
    """BUG-10: the walsender's TimeZone (UTC, or America/Chicago from the role or
    the DSN) and the host's TZ=Asia/Kolkata shift neither the instant nor the
    wall-clock text, through the snapshot (id 2) and the stream (id 1)."""
    assert time.strftime("%z", time.localtime(0)) == "+0530"
    erp = await connect(erp_case.erp_dsn)
    erp_settings = {}
    if session_zone == "role_default":
        await set_role_default(erp, "TimeZone", "America/Chicago")
        plain = await connect(erp_case.erp_dsn)
        assert await plain.fetchval("SHOW TimeZone") == "America/Chicago"
    elif session_zone == "dsn_options":
        dsn = erp_case.erp_dsn + "?options=-c%20TimeZone%3DAmerica/Chicago"
        erp_settings = {"database": {"dsn": dsn}}
    await erp.execute("""
        CREATE TABLE shipment (id int PRIMARY KEY, shipped_at timestamptz,
                               dock_local timestamp);
        INSERT INTO shipment VALUES (2, '2024-01-15 09:00:00+05:30', '2024-03-10 02:30:00');
    """)
    await replicate(erp_case, **erp_settings)

    await erp.execute(
        "INSERT INTO shipment VALUES "
        "(1, '2024-01-15 09:00:00+05:30', '2024-03-10 02:30:00')"
    )
    await replicate(erp_case, **erp_settings)

    replica = await connect(erp_case.replica_dsn)
    await replica.execute("SET TimeZone = 'UTC'")
    rows = await replica.fetch(
        "SELECT id, shipped_at::text AS s, dock_local::text AS d "
        "FROM erp.shipment ORDER BY id"
    )
    assert [tuple(r) for r in rows] == [
        (1, "2024-01-15 03:30:00+00", "2024-03-10 02:30:00"),
        (2, "2024-01-15 03:30:00+00", "2024-03-10 02:30:00"),
    ]


# -- BUG-12 -------------------------------------------------------------------


async def test_interval_keeps_months_days_and_microseconds(
    erp_case: ErpCase, connect
) -> None:
    """BUG-12: interval text is exact, also when the ERP role renders intervals in
    ISO 8601 and dates as SQL/DMY by default."""
    erp = await connect(erp_case.erp_dsn)
    await set_role_default(erp, "IntervalStyle", "iso_8601")
    await set_role_default(erp, "DateStyle", "SQL, DMY")
    await erp.execute(
        "CREATE TABLE contract (id int PRIMARY KEY, start_date date, term interval)"
    )
    await erp.execute(
        "INSERT INTO contract VALUES (3, '2024-01-31', '1 mon 2 days 03:04:05.678')"
    )
    await replicate(erp_case)

    await erp.execute(
        "INSERT INTO contract VALUES (1, '2024-01-31', '1 mon 2 days 03:04:05.678')"
    )
    await erp.execute(
        "INSERT INTO contract VALUES (2, '2024-01-31', '-00:00:00.000001')"
    )
    await replicate(erp_case)

    replica = await connect(erp_case.replica_dsn)
    await replica.execute("SET IntervalStyle = 'postgres'; SET DateStyle = 'ISO'")
    rows = await replica.fetch(
        "SELECT id, term::text AS t, (start_date + term)::text AS d "
        "FROM erp.contract ORDER BY id"
    )
    assert [(r["id"], r["t"]) for r in rows] == [
        (1, "1 mon 2 days 03:04:05.678"),
        (2, "-00:00:00.000001"),
        (3, "1 mon 2 days 03:04:05.678"),
    ]
    assert rows[0]["d"] == "2024-03-02 03:04:05.678"
    assert await table_text(
        erp_case.replica_dsn, "(SELECT id, start_date + term FROM erp.contract)"
    ) == await table_text(
        erp_case.erp_dsn, "(SELECT id, start_date + term FROM contract)"
    )
    await assert_mirrored(erp_case, "contract")


# -- BUG-15 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def replica_server() -> Iterator[PausablePostgres]:
    """A replica server of its own, so a test can stop it without harming others."""
    server = PausablePostgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
async def test_replica_down_never_acknowledges_the_unapplied_transaction(
    erp_case: ErpCase, connect, replica_server: PausablePostgres, tmp_path: Path
) -> None:
    """BUG-15: while the replica is down the slot stays before the transaction's
    begin through several keepalives, the engine logs ERRORs and backs off; after
    kill -9 and a restart the row is applied exactly once."""
    erp = await connect(erp_case.erp_dsn)
    await erp.execute(F0_CUSTOMER)
    replica_db = f"replica_{uuid.uuid4().hex[:8]}"
    admin = await connect(replica_server.dsn())
    await admin.execute(f"CREATE DATABASE {replica_db}")
    replica_dsn = replica_server.dsn(replica_db)
    config = write_config(
        tmp_path / "replicator.toml",
        replica_dsn=replica_dsn,
        erp_dsn=erp_case.erp_dsn,
        slot=erp_case.slot,
        publication=erp_case.publication,
    )
    daemon = Daemon(config, tmp_path)
    try:
        daemon.start()
        await wait_for(
            lambda: checkpoint_lsn(replica_dsn), timeout=30, what="initial snapshot"
        )
        await wait_caught_up(erp_case.erp_dsn, replica_dsn)
        replica = await asyncpg.connect(replica_dsn)
        await install_write_audit(replica, "customer", "customer_code", "name")
        await replica.close()
        await admin.close()

        replica_server.pause()
        begin_lsn = await current_lsn(erp_case.erp_dsn)
        await erp.execute(
            "INSERT INTO customer (customer_code, name, phone) "
            "VALUES ('C-2001', 'Delta Freight', '555-0401')"
        )
        end_lsn = await current_lsn(erp_case.erp_dsn)
        confirmed_seen = []
        watch_until = time.monotonic() + 6 * 0.5 + 2  # well past 3 status intervals
        while time.monotonic() < watch_until:
            confirmed_seen.append(
                (await slot_row(erp_case.erp_dsn, erp_case.slot))["confirmed"]
            )
            await asyncio.sleep(0.1)
        daemon.kill()
        replica_server.resume()
        daemon.start(until_caught_up=True)
        exit_code = await daemon.wait(60)
    finally:
        daemon.close()
        if not _is_up(replica_server):
            replica_server.resume()

    for confirmed in confirmed_seen:
        assert await lsn_at_least(erp_case.erp_dsn, begin_lsn, confirmed)
        assert not await lsn_at_least(erp_case.erp_dsn, confirmed, end_lsn)
    retries = [
        r for r in daemon.records(1) if r["level"] == "error" and "retry_in" in r
    ]
    assert len(retries) >= 2
    delays = [r["retry_in"] for r in retries[:3]]
    assert delays == sorted(delays) and delays[0] < delays[-1]
    assert exit_code == 0
    replica = await connect(replica_dsn)
    row = await replica.fetchrow(
        "SELECT name, phone FROM erp.customer WHERE customer_code = 'C-2001'"
    )
    assert tuple(row) == ("Delta Freight", "555-0401")
    assert (
        await replica.fetchval(
            "SELECT count(*) FROM public.audit_customer WHERE k = 'C-2001'"
        )
        == 1
    )
    assert [r for r in daemon.records(2) if r["level"] in ("error", "critical")] == []


def _is_up(server: PausablePostgres) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", server.port)) == 0


# -- BUG-16 -------------------------------------------------------------------

NOISE = (
    "INSERT INTO audit_noise (payload) "
    "SELECT repeat('x', 1000) FROM generate_series(1, 100000)"
)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["unpublished_table", "other_database"])
async def test_idle_publication_slot_follows_wal_written_elsewhere(
    erp_case: ErpCase, connect, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """BUG-16: ~100 MB of WAL that the publication does not cover (another table,
    another database) do not pin the slot, and the heartbeat writes no data."""
    caplog.set_level(logging.INFO, logger="replicator")
    erp = await connect(erp_case.erp_dsn)
    await erp.execute(F0_CUSTOMER)
    await erp.execute(f"CREATE PUBLICATION {erp_case.publication} FOR TABLE customer")
    await replicate(erp_case)
    replica = await connect(erp_case.replica_dsn)
    noise_db = f"noise_{uuid.uuid4().hex[:8]}"
    if where == "other_database":
        await erp.execute(f"CREATE DATABASE {noise_db}")
        noise = await connect(erp_case.server.dsn(noise_db))
    else:
        noise = erp
    await noise.execute(
        "CREATE TABLE audit_noise (id bigserial PRIMARY KEY, payload text)"
    )

    try:
        async with running_pipeline(erp_case):
            await wait_caught_up(erp_case.erp_dsn, erp_case.replica_dsn)
            history_before = await replica.fetchval(
                "SELECT count(*) FROM replicator.checkpoint_history"
            )
            restart_before = (await slot_row(erp_case.erp_dsn, erp_case.slot))[
                "restart"
            ]
            await noise.execute(NOISE)
            burst_at = time.monotonic()

            async def slot_follows() -> bool:
                row = await slot_row(erp_case.erp_dsn, erp_case.slot)
                lag = await fetchval(
                    erp_case.erp_dsn,
                    "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)",
                    row["confirmed"],
                )
                return lag < 16 * 1024 * 1024 and not await lsn_at_least(
                    erp_case.erp_dsn, restart_before, row["restart"]
                )

            await wait_for(slot_follows, timeout=60, interval=0.5, what="slot progress")
            took = time.monotonic() - burst_at
    finally:
        if where == "other_database":
            await noise.close()
            await erp.execute(f"DROP DATABASE {noise_db} WITH (FORCE)")

    assert took < 60
    assert (
        await replica.fetchval("SELECT count(*) FROM replicator.checkpoint_history")
        == history_before
    )
    assert [
        r[0]
        for r in await replica.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'erp'"
        )
    ] == ["customer"]
    await assert_mirrored(erp_case, "customer")
    assert problems(caplog) == []


# -- BUG-17 -------------------------------------------------------------------

SLOW_SHADOW = """
CREATE FUNCTION public.slow_copy() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_TABLE_NAME LIKE '\\_shadow\\_%' THEN PERFORM pg_sleep(2); END IF;
  RETURN NULL;
END $$;
CREATE FUNCTION public.slow_shadow() RETURNS event_trigger LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
    IF r.object_type = 'table' AND r.object_identity LIKE 'erp._shadow_%' THEN
      EXECUTE format('CREATE TRIGGER slow_copy AFTER INSERT ON %s FOR EACH STATEMENT '
                     'EXECUTE FUNCTION public.slow_copy()', r.object_identity);
    END IF;
  END LOOP;
END $$;
CREATE EVENT TRIGGER slow_shadow ON ddl_command_end WHEN TAG IN ('CREATE TABLE')
  EXECUTE FUNCTION public.slow_shadow();
"""


@pytest.mark.slow
async def test_changes_during_the_initial_load_are_applied_exactly_once(
    erp_case: ErpCase, connect, caplog: pytest.LogCaptureFixture
) -> None:
    """BUG-17: statements committed after the slot exists but before the snapshot
    is stored reach the replica through the stream, none missed or doubled."""
    caplog.set_level(logging.INFO, logger="replicator")
    erp = await connect(erp_case.erp_dsn)
    await erp.execute("""
        CREATE TABLE stock (sku text PRIMARY KEY, on_hand int);
        INSERT INTO stock SELECT 'SKU-' || g, g FROM generate_series(1, 200000) g;
    """)
    replica = await connect(erp_case.replica_dsn)
    await replica.execute(SLOW_SHADOW)

    load = asyncio.create_task(replicate(erp_case, timeout=120))
    await wait_for(
        lambda: slot_row(erp_case.erp_dsn, erp_case.slot),
        timeout=30,
        interval=0.02,
        what="the engine's slot",
    )
    await erp.execute("INSERT INTO stock VALUES ('SKU-NEW-1', 5)")
    await erp.execute(
        "UPDATE stock SET on_hand = -1 WHERE sku IN ('SKU-1', 'SKU-199999')"
    )
    await erp.execute("DELETE FROM stock WHERE sku = 'SKU-100000'")
    snapshot_stored_before = await checkpoint_lsn(erp_case.replica_dsn)
    stats = await load

    assert snapshot_stored_before is None  # the overlap was real
    assert await replica.fetchval("SELECT count(*) FROM erp.stock") == 200_000
    assert await assert_mirrored(erp_case, "stock") == 200_000
    values = dict(
        await replica.fetch(
            "SELECT sku, on_hand FROM erp.stock WHERE sku IN "
            "('SKU-NEW-1', 'SKU-1', 'SKU-199999', 'SKU-100000')"
        )
    )
    assert values == {"SKU-NEW-1": 5, "SKU-1": -1, "SKU-199999": -1}
    assert stats.transactions == 3
    assert problems(caplog) == []
