"""The ERP source end to end against a real PostgreSQL with wal_level=logical."""

from __future__ import annotations

import pytest

from tests.fixtures.pg import NORTHWIND, ErpCase, assert_mirrored, replicate, table_text

pytestmark = pytest.mark.integration

NORTHWIND_TABLES = [
    "categories",
    "customer_customer_demo",
    "customer_demographics",
    "customers",
    "employees",
    "employee_territories",
    "order_details",
    "orders",
    "products",
    "region",
    "shippers",
    "suppliers",
    "territories",
    "us_states",
]


async def test_northwind_snapshot_then_stream_matches_the_erp(
    erp_case: ErpCase, connect
) -> None:
    """The initial copy and the changes after it reach every mirror, row for row."""
    erp = await connect(erp_case.erp_dsn)
    await erp.execute(NORTHWIND.read_text())
    await replicate(erp_case)

    await erp.execute(
        "UPDATE products SET unit_price = unit_price * 1.1, "
        "units_in_stock = units_in_stock - 1 WHERE product_id % 3 = 0"
    )
    await erp.execute(
        "INSERT INTO orders (order_id, customer_id, employee_id, order_date, "
        "ship_city) VALUES (20001, 'ALFKI', 1, '2024-06-04', 'Berlin')"
    )
    await erp.execute("INSERT INTO order_details VALUES (20001, 11, 14.5, 3, 0)")
    await erp.execute(
        "UPDATE customers SET address = 'Obere Str. 58' WHERE customer_id = 'ALFKI'"
    )
    await erp.execute("DELETE FROM order_details WHERE order_id = 10249")
    stats = await replicate(erp_case)

    for table in NORTHWIND_TABLES:
        await assert_mirrored(erp_case, table)
    assert stats.transactions == 5
    assert (
        await erp.fetchval("SELECT count(*) FROM order_details WHERE order_id = 10249")
        == 0
    )


async def test_types_are_exact_against_postgres_rendering(
    erp_case: ErpCase, connect
) -> None:
    erp = await connect(erp_case.erp_dsn)
    await erp.execute("""
        CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
        CREATE DOMAIN positive_int AS integer CHECK (VALUE > 0);
        CREATE TABLE everything (
            id int PRIMARY KEY, n numeric(20, 6), n_free numeric, m money,
            tz timestamptz, ts timestamp, d date, t time, tt timetz, iv interval,
            b bool, by bytea, u uuid, j json, jb jsonb, arr int[], tarr text[],
            e mood, earr mood[], dom positive_int, txt text, vc varchar(10),
            f8 float8, f4 real, bi bigint, sm smallint, ch char(3), ip inet
        );
    """)
    await replicate(erp_case)
    await erp.execute(r"""
        INSERT INTO everything VALUES
        (1, 12345678901234.123456, 'NaN', '-92233720368547758.08',
         '2024-01-15 09:00:00.123456+05:30', '2024-03-10 02:30:00', '2024-02-29',
         '23:59:59.999999', '10:00+02', '1 mon 2 days 03:04:05.678', true,
         '\x00ff5c0a', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a": [1, 2.50]}',
         '{"b": {"c": null}}', '{1,NULL,3}', '{"a,b","c\"d",""}', 'happy',
         '{sad,happy}', 7, E'tab\there\nnewline \\ backslash Zoë 😀', '', 0.1,
         3.4028235e38, -9223372036854775808, -32768, 'ab', '10.0.0.1/8'),
        (2, NULL, 0.1234567890123456789, '$1,234,567.89', NULL, NULL, NULL, NULL,
         NULL, '-00:00:00.000001', false, '', NULL, NULL, 'null', '{}', NULL,
         NULL, NULL, NULL, NULL, NULL, 'Infinity', '-Infinity', 0, 0, NULL, NULL),
        (3, 99999999999999.999999, 9007199254740993, NULL, 'infinity', '-infinity', NULL, NULL,
         NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
         NULL, NULL, 'NaN', NULL, NULL, NULL, NULL, NULL);
    """)

    await replicate(erp_case)

    assert await assert_mirrored(erp_case, "everything") == 3
    replica = await connect(erp_case.replica_dsn)
    types = dict(
        await replica.fetch(
            "SELECT column_name, format_type(a.atttypid, a.atttypmod) FROM "
            "information_schema.columns c JOIN pg_attribute a ON a.attname = c.column_name "
            "AND a.attrelid = 'erp.everything'::regclass WHERE table_schema = 'erp' "
            "AND table_name = 'everything'"
        )
    )
    assert types["n"] == "numeric(20,6)"
    assert types["m"] == "money"
    assert types["tz"] == "timestamp with time zone"
    assert types["e"] == "erp.mood"
    assert types["dom"] == "integer"
    assert await replica.fetchval("SELECT txt IS NULL FROM erp.everything WHERE id = 2")
    assert await replica.fetchval("SELECT vc = '' FROM erp.everything WHERE id = 1")


async def test_unchanged_toast_value_never_blanks_the_mirror(
    erp_case: ErpCase, connect
) -> None:
    """BUG-01: a TOASTed column left out of an UPDATE keeps its value, with either identity."""
    erp = await connect(erp_case.erp_dsn)
    await erp.execute("""
        CREATE TABLE customer (customer_code text PRIMARY KEY, name text, phone text,
                               notes text);
        ALTER TABLE customer ALTER COLUMN notes SET STORAGE EXTERNAL;
        INSERT INTO customer VALUES ('C-1001', 'Acme Tools', '555-0100',
                                     repeat('Preferred carrier: Northwind. ', 400));
    """)
    await replicate(erp_case)

    await erp.execute(
        "UPDATE customer SET phone = '555-0199' WHERE customer_code = 'C-1001'"
    )
    await replicate(erp_case)
    replica = await connect(erp_case.replica_dsn)
    mid = await replica.fetchrow("SELECT phone, length(notes) AS n FROM erp.customer")
    await erp.execute("ALTER TABLE customer REPLICA IDENTITY FULL")
    await erp.execute(
        "UPDATE customer SET name = 'Acme Tools Ltd' WHERE customer_code = 'C-1001'"
    )
    await replicate(erp_case)

    assert (mid["phone"], mid["n"]) == ("555-0199", 12000)
    row = await replica.fetchrow(
        "SELECT name, phone, length(notes) AS n, md5(notes) AS h "
        "FROM erp.customer WHERE customer_code = 'C-1001'"
    )
    source_hash = await erp.fetchval("SELECT md5(notes) FROM customer")
    assert (row["name"], row["phone"], row["n"], row["h"]) == (
        "Acme Tools Ltd",
        "555-0199",
        12000,
        source_hash,
    )


async def test_toast_unchanged_within_one_batch_after_insert_uses_inserted_value(
    erp_case: ErpCase, connect
) -> None:
    """An insert and a later partial update of one key in one batch collapse to the full row."""
    erp = await connect(erp_case.erp_dsn)
    await erp.execute(
        "CREATE TABLE doc (id int PRIMARY KEY, title text, body text);"
        "ALTER TABLE doc ALTER COLUMN body SET STORAGE EXTERNAL;"
    )
    await replicate(erp_case)

    await erp.execute("INSERT INTO doc VALUES (1, 'a', repeat('x', 9000))")
    await erp.execute("UPDATE doc SET title = 'b' WHERE id = 1")
    await erp.execute("UPDATE doc SET title = 'c' WHERE id = 1")
    await replicate(erp_case)

    assert await assert_mirrored(erp_case, "doc") == 1


async def test_primary_key_change_moves_the_row(erp_case: ErpCase, connect) -> None:
    erp = await connect(erp_case.erp_dsn)
    await erp.execute(
        "CREATE TABLE item (sku text PRIMARY KEY, qty int);"
        "INSERT INTO item VALUES ('A', 1), ('B', 2);"
    )
    await replicate(erp_case)

    await erp.execute("UPDATE item SET sku = 'A2', qty = 10 WHERE sku = 'A'")
    await erp.execute("UPDATE item SET sku = 'A' WHERE sku = 'B'")
    await replicate(erp_case)

    assert await table_text(erp_case.replica_dsn, "erp.item") == ["(A,2)", "(A2,10)"]
    await assert_mirrored(erp_case, "item")


async def test_truncate_cascade_empties_every_listed_mirror(
    erp_case: ErpCase, connect
) -> None:
    """BUG-04: one Truncate message names both tables; later inserts still arrive."""
    erp = await connect(erp_case.erp_dsn)
    await erp.execute("""
        CREATE TABLE price_list (sku text PRIMARY KEY, price numeric(10,2));
        CREATE TABLE price_list_note (id int PRIMARY KEY,
                                      sku text REFERENCES price_list(sku), note text);
        INSERT INTO price_list VALUES ('SKU-1', 10.00), ('SKU-2', 20.00);
        INSERT INTO price_list_note VALUES (1, 'SKU-1', 'seasonal');
    """)
    await replicate(erp_case)

    await erp.execute(
        "BEGIN; TRUNCATE price_list CASCADE; "
        "INSERT INTO price_list VALUES ('SKU-9', 12.50); COMMIT;"
    )
    await erp.execute("INSERT INTO price_list VALUES ('SKU-10', 3.00)")
    last_commit = await erp.fetchval("SELECT pg_current_wal_lsn()")
    await replicate(erp_case)

    assert await table_text(erp_case.replica_dsn, "erp.price_list") == [
        "(SKU-10,3.00)",
        "(SKU-9,12.50)",
    ]
    assert await table_text(erp_case.replica_dsn, "erp.price_list_note") == []
    confirmed = await erp.fetchval(
        "SELECT confirmed_flush_lsn >= $1::pg_lsn FROM pg_replication_slots "
        "WHERE slot_name = $2",
        last_commit,
        erp_case.slot,
    )
    assert confirmed is True


async def test_columns_added_and_dropped_mid_stream_evolve_the_mirror(
    erp_case: ErpCase, connect
) -> None:
    """BUG-05: existing rows get the new column's default; values of new columns arrive."""
    erp = await connect(erp_case.erp_dsn)
    await erp.execute("""
        CREATE TABLE customer (customer_code text PRIMARY KEY, name text, phone text,
                               obsolete text);
        INSERT INTO customer VALUES ('C-1001', 'Acme', '1', 'x'), ('C-1002', 'Birch', '2', 'y'),
                                    ('C-1003', 'Cobalt', '3', 'z');
    """)
    await replicate(erp_case)

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
    await erp.execute("ALTER TABLE customer DROP COLUMN obsolete")
    await erp.execute("UPDATE customer SET phone = '22' WHERE customer_code = 'C-1002'")
    await replicate(erp_case)

    rows = await table_text(
        erp_case.replica_dsn,
        "(SELECT customer_code, segment, payment_terms_days FROM erp.customer)",
    )
    assert rows == [
        "(C-1001,retail,45)",
        "(C-1002,retail,)",
        "(C-1003,retail,)",
        "(C-1004,wholesale,)",
    ]
    await assert_mirrored(erp_case, "customer")


async def test_enum_label_added_mid_stream_is_applied_in_order(
    erp_case: ErpCase, connect
) -> None:
    """BUG-06: ADD VALUE sends no Relation message; the mirror's enum gains the label."""
    erp = await connect(erp_case.erp_dsn)
    await erp.execute("""
        CREATE TYPE order_status AS ENUM ('open', 'shipped');
        CREATE TABLE fulfilment (order_no int PRIMARY KEY, status order_status NOT NULL);
        INSERT INTO fulfilment VALUES (1, 'open'), (2, 'open');
    """)
    await replicate(erp_case)

    await erp.execute("ALTER TYPE order_status ADD VALUE 'on_hold'")
    await erp.execute("UPDATE fulfilment SET status = 'on_hold' WHERE order_no = 1")
    await erp.execute("UPDATE fulfilment SET status = 'shipped' WHERE order_no = 2")
    await replicate(erp_case)

    assert await table_text(erp_case.replica_dsn, "erp.fulfilment") == [
        "(1,on_hold)",
        "(2,shipped)",
    ]


async def test_transaction_under_a_replication_origin_is_recognised(
    erp_case: ErpCase, connect
) -> None:
    erp = await connect(erp_case.erp_dsn)
    await erp.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
    await replicate(erp_case)

    # origins are cluster-wide: another test may have created this one
    await erp.execute(
        "SELECT pg_replication_origin_create('replicator') WHERE NOT EXISTS "
        "(SELECT 1 FROM pg_replication_origin WHERE roname = 'replicator')"
    )
    await erp.execute("SELECT pg_replication_origin_session_setup('replicator')")
    await erp.execute("INSERT INTO t VALUES (1, 'ours')")
    await erp.execute("SELECT pg_replication_origin_session_reset()")
    await erp.execute("INSERT INTO t VALUES (2, 'theirs')")
    stats = await replicate(erp_case)

    assert stats.origins == {"replicator": 1}
    assert stats.transactions == 2
    await assert_mirrored(erp_case, "t")


async def test_large_streamed_transactions_commit_abort_and_subabort(
    erp_case: ErpCase, connect
) -> None:
    """Protocol v2 streams big in-progress transactions; aborted parts never land."""
    erp = await connect(erp_case.erp_dsn)
    await erp.execute("CREATE TABLE big (id int PRIMARY KEY, pad text)")
    small_memory = erp_case.erp_dsn + "?options=-c%20logical_decoding_work_mem%3D64kB"
    await replicate(erp_case, database={"dsn": small_memory})

    await erp.execute(
        "INSERT INTO big SELECT g, repeat('p', 200) FROM generate_series(1, 5000) g"
    )
    await erp.execute(
        "BEGIN; INSERT INTO big SELECT g, 'gone' FROM generate_series(5001, 9000) g;"
        " ROLLBACK;"
    )
    await erp.execute("""
        BEGIN;
        INSERT INTO big SELECT g, 'kept' FROM generate_series(10001, 13000) g;
        SAVEPOINT s1;
        INSERT INTO big SELECT g, 'sub-aborted' FROM generate_series(20001, 23000) g;
        ROLLBACK TO SAVEPOINT s1;
        UPDATE big SET pad = 'updated' WHERE id <= 2500;
        COMMIT;
    """)
    stats = await replicate(erp_case, database={"dsn": small_memory})

    assert await assert_mirrored(erp_case, "big") == 8000
    assert stats.transactions == 2


async def test_table_without_key_stops_start_up_before_any_publication_exists(
    erp_case: ErpCase, connect
) -> None:
    """A publication of a keyless table would break the ERP's own UPDATEs on it."""
    import asyncio

    from replicator.errors import ErpSetupError
    from replicator.sources.erp.source import ErpPipeline

    erp = await connect(erp_case.erp_dsn)
    await erp.execute(
        "CREATE TABLE nokey (a int, b text); INSERT INTO nokey VALUES (1, 'x')"
    )

    with pytest.raises(
        ErpSetupError, match=r"nokey.*leave them out with \[erp\] tables"
    ):
        await ErpPipeline(erp_case.settings()).run_once(asyncio.Event())
    publications = await erp.fetchval(
        "SELECT count(*) FROM pg_publication WHERE pubname = $1", erp_case.publication
    )
    updated = await erp.execute("UPDATE nokey SET b = 'y'")

    assert publications == 0
    assert updated == "UPDATE 1"
