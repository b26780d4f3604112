"""``replicator check``: verify every prerequisite against the configured systems.

One line per item, ``PASS`` or ``FAIL`` and, for a failure, the fix. Checks
only read (the Salesforce one subscribes to each CDC channel and disconnects);
nothing is created. Exit status 1 when any item fails.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from replicator import config as config_module
from replicator.config import ErpSettings, SalesforceSettings, Settings
from replicator.errors import ReplicatorError
from replicator.sources.erp.snapshot import SESSION_SETTINGS
from replicator.store.tables import MIRROR_SCHEMAS, SCHEMA

logger = logging.getLogger(__name__)

_LIMITS_FLOOR = 0.10  # fail when less than this share of a daily limit remains


@dataclass(frozen=True, slots=True)
class Item:
    name: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        status = "PASS" if self.ok else "FAIL"
        return f"{status}  {self.name}" + (f": {self.detail}" if self.detail else "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", required=True, help="path of the TOML config file"
    )


def run(args: argparse.Namespace) -> int:
    settings = config_module.load(args.config)
    items = asyncio.run(check(settings))
    for item in items:
        print(item.line())
    failed = sum(not i.ok for i in items)
    print(f"check: {len(items)} items, {failed} failed")
    return 1 if failed else 0


async def check(settings: Settings) -> list[Item]:
    """Run every check the config calls for; return the items in order."""
    items = await _replica_items(settings)
    if settings.erp is not None:
        items += await _erp_items(settings.erp)
    if settings.salesforce is not None:
        items += await _sf_items(settings.salesforce)
    if settings.entities:
        items += await _mapping_items(settings)
    return items


async def _connect(dsn: str, name: str) -> tuple[asyncpg.Connection | None, Item]:
    try:
        conn = await asyncpg.connect(dsn, server_settings=SESSION_SETTINGS, timeout=10)
    except (
        OSError,
        TimeoutError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    ) as exc:
        return None, Item(
            f"{name} reachable",
            False,
            f"{exc}; check the DSN, the server and the network",
        )
    return conn, Item(f"{name} reachable", True)


# -- replica -------------------------------------------------------------------


async def _replica_items(settings: Settings) -> list[Item]:
    conn, reached = await _connect(settings.replica.resolve(), "replica")
    if conn is None:
        return [reached]
    items = [reached]
    try:
        user = await conn.fetchval("SELECT current_user")
        can_create = await conn.fetchval(
            "SELECT has_database_privilege(current_user, current_database(), 'CREATE')"
        )
        for schema in (SCHEMA, *MIRROR_SCHEMAS):
            row = await conn.fetchrow(
                "SELECT has_schema_privilege(current_user, n.oid, 'CREATE') "
                "AS can_write FROM pg_namespace n WHERE nspname = $1",
                schema,
            )
            if row is None:
                items.append(
                    Item(
                        f"replica schema {schema}",
                        bool(can_create),
                        "missing, created on first start"
                        if can_create
                        else f"missing, and role {user!r} may not create it; run "
                        f'GRANT CREATE ON DATABASE <db> TO "{user}"',
                    )
                )
            else:
                items.append(
                    Item(
                        f"replica schema {schema}",
                        bool(row["can_write"]),
                        ""
                        if row["can_write"]
                        else f"role {user!r} may not write it; run GRANT ALL ON "
                        f'SCHEMA {schema} TO "{user}"',
                    )
                )
        bi = await conn.fetch(
            "SELECT rolname FROM pg_roles r WHERE NOT rolsuper AND "
            "has_schema_privilege(r.oid, 'erp', 'USAGE') AND r.rolname <> current_user "
            "AND EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'erp') "
            "AND rolname NOT LIKE 'pg\\_%'"
        )
        names = ", ".join(r[0] for r in bi)
        items.append(
            Item(
                "replica BI role",
                True,
                names or "none yet; create one with `replicator bi-role`",
            )
        )
    finally:
        await conn.close()
    return items


# -- ERP -----------------------------------------------------------------------


async def _erp_items(cfg: ErpSettings) -> list[Item]:
    conn, reached = await _connect(cfg.database.resolve(), "ERP")
    if conn is None:
        return [reached]
    try:
        return [reached, *[await probe(conn, cfg) for probe in _ERP_PROBES]]
    finally:
        await conn.close()


async def _wal_level(conn: asyncpg.Connection, cfg: ErpSettings) -> Item:
    level = await conn.fetchval("SHOW wal_level")
    return Item(
        "ERP wal_level",
        level == "logical",
        f"is {level!r}"
        if level == "logical"
        else f"is {level!r}; ALTER SYSTEM SET wal_level = logical and restart",
    )


async def _replication(conn: asyncpg.Connection, cfg: ErpSettings) -> Item:
    row = await conn.fetchrow(
        "SELECT current_user AS name, rolreplication OR rolsuper AS ok FROM pg_roles "
        "WHERE rolname = current_user"
    )
    return Item(
        "ERP replication privilege",
        bool(row["ok"]),
        ""
        if row["ok"]
        else f'role {row["name"]!r} lacks REPLICATION; run ALTER ROLE "{row["name"]}" '
        "REPLICATION as a superuser",
    )


async def _publication(conn: asyncpg.Connection, cfg: ErpSettings) -> Item:
    name = f"ERP publication {cfg.publication}"
    if await conn.fetchval(
        "SELECT 1 FROM pg_publication WHERE pubname = $1", cfg.publication
    ):
        return Item(name, True, "exists")
    superuser = await conn.fetchval(
        "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
    )
    if cfg.create_publication and (superuser or cfg.tables):
        return Item(name, True, "missing, created on first start")
    return Item(
        name,
        False,
        "missing; run CREATE PUBLICATION "
        f"{cfg.publication} FOR ALL TABLES as a superuser (or list erp.tables)",
    )


async def _slot(conn: asyncpg.Connection, cfg: ErpSettings) -> Item:
    name = f"ERP slot {cfg.slot}"
    row = await conn.fetchrow(
        "SELECT active, active_pid, wal_status, plugin FROM pg_replication_slots "
        "WHERE slot_name = $1",
        cfg.slot,
    )
    if row is None:
        return Item(name, True, "missing, created with a snapshot on first start")
    if row["plugin"] != "pgoutput":
        return Item(
            name, False, f"uses plugin {row['plugin']!r}; drop it or set erp.slot"
        )
    if row["wal_status"] == "lost":
        return Item(
            name,
            False,
            "lost (WAL removed past max_slot_wal_keep_size); the "
            "daemon drops it and resyncs every table on its next start",
        )
    state = f"active (pid {row['active_pid']})" if row["active"] else "inactive"
    return Item(name, True, f"{state}, wal_status {row['wal_status']}")


async def _identity(conn: asyncpg.Connection, cfg: ErpSettings) -> Item:
    from replicator.sources.erp.catalog import (
        Catalog,
        candidate_tables,
        tables_without_identity,
    )

    if await conn.fetchval(
        "SELECT 1 FROM pg_publication WHERE pubname = $1", cfg.publication
    ):
        oids = await Catalog(conn).publication_tables(cfg.publication)
    else:
        oids = await candidate_tables(conn, cfg.tables)
    bad = await tables_without_identity(conn, oids)
    return Item(
        "ERP tables have a key",
        not bad,
        f"{len(oids)} tables"
        if not bad
        else f"{', '.join(bad)} have no primary key or replica identity index; add "
        "one, or ALTER TABLE ... REPLICA IDENTITY USING INDEX <unique index>",
    )


_ERP_PROBES: tuple[
    Callable[[asyncpg.Connection, ErpSettings], Awaitable[Item]], ...
] = (_wal_level, _replication, _publication, _slot, _identity)


# -- mapped entities -----------------------------------------------------------


async def _mapping_items(settings: Settings) -> list[Item]:
    """The mapping against both live schemas: one failed item per problem."""
    from replicator.mapping.startup import mapping_problems

    name = "mapping against the live schemas"
    try:
        problems = await mapping_problems(settings)
    except ReplicatorError as exc:
        return [Item(name, False, f"schemas not read: {exc}")]
    if problems:
        return [Item(name, False, problem) for problem in problems]
    fields = sum(len(e.fields) for e in settings.entities)
    return [Item(name, True, f"{len(settings.entities)} entities, {fields} fields")]


# -- Salesforce ----------------------------------------------------------------


async def _sf_items(cfg: SalesforceSettings) -> list[Item]:
    import aiohttp

    from replicator.sources.salesforce.rest import RestClient
    from replicator.sources.salesforce.source import build_authenticator

    auth = build_authenticator(cfg)
    try:
        await auth.login()
    except ReplicatorError as exc:
        return [Item("Salesforce login", False, str(exc))]
    items = [Item("Salesforce login", True, auth.instance_url)]
    async with aiohttp.ClientSession() as http:
        rest = RestClient(
            auth, http, api_version=cfg.api_version, client_name=cfg.client_name
        )
        items += await _cdc_items(cfg, auth, http, rest)
        items.append(await _limits(rest))
    return items


async def _cdc_items(
    cfg: SalesforceSettings, auth: Any, http: Any, rest: Any
) -> list[Item]:
    from replicator.sources.salesforce.applier import channel_for

    items = []
    cometd = f"{auth.instance_url}/cometd/{cfg.api_version}"
    reply = await _bayeux(
        http,
        cometd,
        auth,
        {
            "channel": "/meta/handshake",
            "version": "1.0",
            "supportedConnectionTypes": ["long-polling"],
        },
    )
    client = reply.get("clientId")
    for obj in cfg.objects:
        name = f"Salesforce CDC for {obj}"
        try:
            await rest.describe(obj)
        except ReplicatorError as exc:
            items.append(
                Item(name, False, f"describe failed: {exc}; check salesforce.objects")
            )
            continue
        if not client:
            items.append(
                Item(name, False, f"streaming handshake refused: {reply.get('error')}")
            )
            continue
        channel = channel_for(obj)
        answer = await _bayeux(
            http,
            cometd,
            auth,
            {"channel": "/meta/subscribe", "clientId": client, "subscription": channel},
        )
        ok = bool(answer.get("successful"))
        items.append(
            Item(
                name,
                ok,
                channel
                if ok
                else f"{channel} refused ({answer.get('error')}); select {obj} in "
                "Setup > Change Data Capture",
            )
        )
    if client:
        await _bayeux(
            http, cometd, auth, {"channel": "/meta/disconnect", "clientId": client}
        )
    return items


async def _bayeux(
    http: Any, url: str, auth: Any, message: dict[str, Any]
) -> dict[str, Any]:
    async with http.post(url, json=[message], headers=auth.header()) as resp:
        try:
            body = await resp.json(content_type=None)
        except ValueError:
            return {"successful": False, "error": f"HTTP {resp.status}"}
    if isinstance(body, list) and body and isinstance(body[0], dict):
        return dict(body[0])
    return {"successful": False, "error": f"HTTP {resp.status}"}


async def _limits(rest: Any) -> Item:
    try:
        limits = await rest.request("GET", "/limits")
    except ReplicatorError as exc:
        return Item("Salesforce API limits", False, f"cannot read /limits: {exc}")
    low = []
    for key in ("DailyApiRequests", "DailyBulkApiBatches"):
        entry = limits.get(key) or {}
        maximum, remaining = entry.get("Max"), entry.get("Remaining")
        if maximum and remaining is not None and remaining < maximum * _LIMITS_FLOOR:
            low.append(f"{key} {remaining}/{maximum}")
    api = limits.get("DailyApiRequests") or {}
    return Item(
        "Salesforce API limits",
        not low,
        f"DailyApiRequests {api.get('Remaining')}/{api.get('Max')} remaining"
        if not low
        else f"nearly spent: {', '.join(low)}; wait for the daily "
        "reset or raise the org's limits",
    )
