"""Initial copy of the ERP tables from the snapshot a new slot exported.

Each table is copied into a shadow table in the replica, and all shadows are
swapped in with the checkpoint at the slot's consistent point in one replica
transaction, so the stream continues exactly where the snapshot ends (BUG-17)
and a live mirror is never emptied while BI reads it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import asyncpg

from replicator.sources.erp.catalog import Catalog, TableInfo
from replicator.store.mirror import (
    MIRROR_SCHEMA,
    MirrorStore,
    MirrorTable,
    mirror_name,
    quote_ident,
)

logger = logging.getLogger(__name__)

# Both sides render and parse text the same way, whatever their own defaults.
SESSION_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO",
    "IntervalStyle": "postgres",
    "lc_monetary": "C",
    "extra_float_digits": "3",
}


async def _pipe(
    erp: asyncpg.Connection,
    query: str,
    replica: asyncpg.Connection,
    target: str,
    columns: list[str],
) -> None:
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=32)

    async def produce() -> None:
        try:
            await erp.copy_from_query(query, output=queue.put, format="text")
        finally:
            await queue.put(None)

    async def chunks() -> AsyncIterator[bytes]:
        while (chunk := await queue.get()) is not None:
            yield chunk

    async with asyncio.TaskGroup() as tg:
        tg.create_task(produce(), name=f"snapshot:read:{target}")
        await replica.copy_to_table(
            target,
            source=chunks(),
            columns=columns,
            schema_name=MIRROR_SCHEMA,
            format="text",
        )


async def copy_tables(
    erp: asyncpg.Connection,
    snapshot_name: str,
    tables: list[TableInfo],
    store: MirrorStore,
) -> dict[str, MirrorTable]:
    """Copy ``tables`` as of ``snapshot_name`` into shadow tables; return their shapes.

    Must run inside a replica transaction that the caller commits with the
    checkpoint; the shadows replace the mirrors in that same transaction.
    """
    loaded: dict[str, MirrorTable] = {}
    async with erp.transaction(isolation="repeatable_read", readonly=True):
        await erp.execute(f"SET TRANSACTION SNAPSHOT '{snapshot_name}'")
        for info in tables:
            name = mirror_name(info.root_schema, info.root_name)
            shadow = f"_shadow_{name}"
            started = time.monotonic()
            await store.conn.execute(
                f"DROP TABLE IF EXISTS {MIRROR_SCHEMA}.{quote_ident(shadow)}"
            )
            columns = list(info.columns.values())
            table = await store.create_table(
                name,
                f"{info.root_schema}.{info.root_name}",
                columns,
                info.key,
                table_name=shadow,
            )
            col_list = ", ".join(quote_ident(c.name) for c in columns)
            source = f"{quote_ident(info.root_schema)}.{quote_ident(info.root_name)}"
            await _pipe(
                erp,
                f"SELECT {col_list} FROM {source}",
                store.conn,
                shadow,
                [c.name for c in columns],
            )
            await store.conn.execute(f"DROP TABLE IF EXISTS {table.qualified}")
            await store.conn.execute(
                f"ALTER TABLE {MIRROR_SCHEMA}.{quote_ident(shadow)} "
                f"RENAME TO {quote_ident(name)}"
            )
            await store.conn.execute(
                f"ALTER INDEX IF EXISTS {MIRROR_SCHEMA}.{quote_ident(shadow + '_pkey')} "
                f"RENAME TO {quote_ident(name + '_pkey')}"
            )
            rows = await store.conn.fetchval(f"SELECT count(*) FROM {table.qualified}")
            logger.info(
                "table snapshot copied",
                extra={
                    "table": name,
                    "rows": rows,
                    "seconds": round(time.monotonic() - started, 2),
                },
            )
            loaded[name] = table
    return loaded


async def published_tables(catalog: Catalog, publication: str) -> list[TableInfo]:
    """Return each published root table once (partitions fold into their root)."""
    seen: dict[int, TableInfo] = {}
    for oid in await catalog.publication_tables(publication):
        info = await catalog.table(oid)
        if info is not None and info.root_oid not in seen:
            root = (
                info
                if info.oid == info.root_oid
                else await catalog.table(info.root_oid)
            )
            if root is not None:
                seen[info.root_oid] = root
    return list(seen.values())
