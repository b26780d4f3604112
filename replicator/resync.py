"""``replicator resync TABLE|OBJECT``: reload one ERP table or one Salesforce object.

An ERP table is copied from a fresh snapshot into a shadow table that replaces
the mirror in one replica transaction, while the daemon keeps streaming: the
transaction first locks the mirror against writes (readers go on), so every
change the daemon applied is at or below the checkpoint it reads next, and
the snapshot, taken after that, holds all of them; the stream then applies
the changes after the checkpoint over the reloaded table. Replaying changes older than the copy converges: each insert
and update carries the whole row and applies as an upsert, deletes and
truncates act on keys, and the last change of each key wins. A Salesforce
object is loaded the same way (``SfApplier.load``), then caught up over REST
for what changed during the load, and its stored replay id is put back, so
the stream also replays what happened meanwhile (the modstamp guard skips
what the load already holds).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging

import asyncpg

from replicator import config as config_module
from replicator.config import Settings
from replicator.errors import ConfigError, ReplicatorError
from replicator.sources.erp.catalog import Catalog, TableInfo
from replicator.sources.erp.snapshot import SESSION_SETTINGS, copy_tables
from replicator.store import checkpoints
from replicator.store.admin import replica_connection
from replicator.store.mirror import MirrorStore, mirror_name, quote_ident
from replicator.store.tables import create_schema

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        metavar="TABLE|OBJECT",
        help="an ERP table (orders, sales.orders) or a Salesforce object (Account)",
    )
    parser.add_argument(
        "--config", "-c", required=True, help="path of the TOML config file"
    )


def run(args: argparse.Namespace) -> int:
    settings = config_module.load(args.config)
    return asyncio.run(resync(settings, args.target))


async def resync(settings: Settings, target: str) -> int:
    """Reload ``target``: a configured Salesforce object, else an ERP table."""
    sf = settings.salesforce
    if sf is not None and target.lower() in {o.lower() for o in sf.objects}:
        name = next(o for o in sf.objects if o.lower() == target.lower())
        records = await resync_object(settings, name)
        print(f"resync: Salesforce object {name}: {records} records loaded")
        return 0
    if settings.erp is None:
        raise ConfigError(
            f"{target!r} is not a configured Salesforce object and the config "
            "has no [erp] section; pass one of salesforce.objects"
        )
    table, rows = await resync_table(settings, target)
    print(
        f"resync: ERP table {table}: {rows} rows loaded; the stream applies the "
        "changes after the checkpoint over it"
    )
    return 0


async def _erp_connect(settings: Settings) -> asyncpg.Connection:
    assert settings.erp is not None
    try:
        return await asyncpg.connect(
            settings.erp.database.resolve(), server_settings=SESSION_SETTINGS
        )
    except (OSError, asyncpg.PostgresError) as exc:
        raise ReplicatorError(
            f"cannot connect to the ERP: {exc}; check erp.database"
        ) from exc


async def _table_info(erp: asyncpg.Connection, target: str) -> TableInfo:
    schema, _, name = target.rpartition(".")
    oid = await erp.fetchval(
        "SELECT c.oid::int FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
        schema or "public",
        name,
    )
    info = await Catalog(erp).table(oid) if oid is not None else None
    if info is None:
        raise ConfigError(
            f"the ERP has no table {target!r}; name it as schema.table "
            "(public. may be left out)"
        )
    if info.oid != info.root_oid:
        info = await Catalog(erp).table(info.root_oid)  # a partition reloads its root
        assert info is not None
    return info


async def resync_table(settings: Settings, target: str) -> tuple[str, int]:
    """Copy one ERP table from a fresh snapshot over its mirror; return its name and rows."""
    cfg = settings.erp
    assert cfg is not None
    erp = await _erp_connect(settings)
    exporter = await _erp_connect(settings)
    try:
        info = await _table_info(erp, target)
        async with replica_connection(settings.replica.resolve()) as replica:
            rows = await _copy_into_replica(replica, erp, exporter, info, cfg.stream)
    finally:
        await erp.close()
        await exporter.close()
    return mirror_name(info.root_schema, info.root_name), rows


async def _copy_into_replica(
    replica: asyncpg.Connection,
    erp: asyncpg.Connection,
    exporter: asyncpg.Connection,
    info: TableInfo,
    stream: str,
) -> int:
    name = mirror_name(info.root_schema, info.root_name)
    store = MirrorStore(replica, stream)
    async with replica.transaction():
        mirror = f"{quote_ident(store.schema)}.{quote_ident(name)}"
        if await replica.fetchval("SELECT to_regclass($1)", mirror) is not None:
            # the running daemon's writes to this mirror wait from here to commit
            await replica.execute(f"LOCK TABLE {mirror} IN EXCLUSIVE MODE")
        cp = await checkpoints.load(replica, stream)
        # The ERP snapshot is taken after the checkpoint was read: it holds
        # every change at or below it; the stream re-applies the later ones.
        async with exporter.transaction(isolation="repeatable_read", readonly=True):
            snapshot = await exporter.fetchval("SELECT pg_export_snapshot()")
            await copy_tables(erp, snapshot, [info], store)
        rows = int(
            await replica.fetchval(
                f"SELECT count(*) FROM {quote_ident(store.schema)}.{quote_ident(name)}"
            )
        )
        await replica.execute(
            "INSERT INTO replicator.checkpoint_history (stream, position, lsn, "
            "system_identifier, timeline, slot_name, reason, changes) "
            "VALUES ($1, $2, $3, $4, $5, $6, 'resync', $7)",
            stream,
            cp.position if cp else f"resync {name}",
            cp.lsn if cp else None,
            cp.system_identifier if cp else None,
            cp.timeline if cp else None,
            cp.slot_name if cp else None,
            rows,
        )
    logger.warning(
        "erp table resynced",
        extra={"table": name, "rows": rows, "position": cp.position if cp else None},
    )
    return rows


async def resync_object(settings: Settings, object_name: str) -> int:
    """Reload one Salesforce object; keep its replay id so the stream replays the rest."""
    import aiohttp

    from replicator.sources.salesforce.applier import SfApplier
    from replicator.sources.salesforce.rest import RestClient
    from replicator.sources.salesforce.source import build_authenticator

    cfg = settings.salesforce
    assert cfg is not None
    auth = build_authenticator(cfg)
    async with (
        replica_connection(settings.replica.resolve()) as replica,
        aiohttp.ClientSession() as http,
    ):
        await auth.login()
        await create_schema(replica)
        rest = RestClient(
            auth, http, api_version=cfg.api_version, client_name=cfg.client_name
        )
        applier = SfApplier(
            MirrorStore(replica, cfg.stream_prefix, schema="sf"),
            rest,
            stream_prefix=cfg.stream_prefix,
            skew=dt.timedelta(seconds=cfg.skew_seconds),
        )
        state = await applier.prepare(object_name)
        stream = applier.stream_name(state.channel)
        before = await checkpoints.load(replica, stream)
        started = dt.datetime.now(dt.UTC)
        records = await applier.load(state.shape.object_name)
        await applier.catch_up(state.shape.object_name, started, reason="resync")
        if before is not None:
            async with replica.transaction():
                await checkpoints.save(
                    replica, before, reason="resync", changes=records
                )
    logger.warning(
        "salesforce object resynced",
        extra={
            "object": object_name,
            "records": records,
            "position": before.position if before else "-2",
        },
    )
    return records
