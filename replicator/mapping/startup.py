"""Read both live schemas and check the entity mappings against them at start-up.

The I/O around the pure ``schema_check.check_mapping``: the Salesforce
describe of every mapped object, the ERP catalog of every mapped table the
stream carries, and the ERP's ``us_states`` lookup for transforms. Problems
stop start-up as one ``ConfigError`` holding one line each; an unreachable
system is a retriable source error, so the daemon waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import aiohttp
import asyncpg

from replicator.backoff import retry_until_stopped
from replicator.config import ErpSettings, SalesforceSettings, Settings
from replicator.errors import ConfigError, ErpConnectionError, ErpError
from replicator.mapping.config import EntitySettings
from replicator.mapping.schema_check import check_mapping
from replicator.mapping.transforms import TransformContext
from replicator.sources.erp.catalog import Catalog, TableInfo
from replicator.sources.erp.source import _connect as erp_connect
from replicator.sources.salesforce.rest import RestClient, SalesforceRestError

__all__ = [
    "check_schemas",
    "check_when_reachable",
    "mapping_problems",
    "read_describes",
    "read_erp",
]

# The stream carries a table when the publication holds it or, without
# publish_via_partition_root, one of its partitions.
_PUBLISHED_SQL = """
SELECT EXISTS (
    SELECT 1 FROM unnest($2::oid[]) AS p(oid)
    WHERE p.oid = $1 OR pg_partition_root(p.oid) = $1
)
"""
_TABLE_SQL = (
    "SELECT oid::int FROM pg_class "
    "WHERE oid = to_regclass($1) AND relkind IN ('r', 'p')"
)
_US_STATES_SQL = (
    "SELECT state_name, state_abbr FROM us_states "
    "WHERE state_name IS NOT NULL AND state_abbr IS NOT NULL"
)


async def check_when_reachable(settings: Settings, stop: asyncio.Event) -> None:
    """Check the mapping once both systems answer; return early if ``stop`` is set.

    Raises:
        ConfigError: one line per problem of the mapping.
    """
    if settings.entities:
        await retry_until_stopped(
            "mapping schema check", lambda: check_schemas(settings), stop
        )


async def check_schemas(settings: Settings) -> None:
    """Raise ``ConfigError`` with one line per problem of the mapping, if any."""
    problems = await mapping_problems(settings)
    if problems:
        count = f"{len(problems)} problem" + ("s" if len(problems) > 1 else "")
        raise ConfigError(
            f"the mapping does not fit the live schemas ({count}); fix each line "
            "below:\n" + "\n".join(problems)
        )


async def mapping_problems(settings: Settings) -> list[str]:
    """Read both schemas and return one line per problem of the mapping."""
    entities = settings.entities
    if not entities:
        return []
    erp, salesforce = settings.erp, settings.salesforce
    if erp is None or salesforce is None:
        return _missing_sections(settings)
    describes = await read_describes(salesforce, entities)
    tables, context = await read_erp(erp, entities)
    return _unstreamed_objects(entities, salesforce) + check_mapping(
        entities, describes, tables, context
    )


def _missing_sections(settings: Settings) -> list[str]:
    return [
        f"[[entities]] maps Salesforce objects onto ERP tables, but the config has "
        f"no [{name}] section; add one, or remove [[entities]]"
        for name, section in (
            ("erp", settings.erp),
            ("salesforce", settings.salesforce),
        )
        if section is None
    ]


def _unstreamed_objects(
    entities: tuple[EntitySettings, ...], cfg: SalesforceSettings
) -> list[str]:
    streamed = {name.lower() for name in cfg.objects}
    return [
        f"entity {entity.name!r} (entities[{index}]): salesforce = "
        f"{entity.salesforce!r} is not in [salesforce] objects, so its changes "
        "are never read; add it there"
        for index, entity in enumerate(entities)
        if entity.salesforce.lower() not in streamed
    ]


async def read_describes(
    cfg: SalesforceSettings, entities: tuple[EntitySettings, ...]
) -> dict[str, dict[str, Any]]:
    """Describe every mapped object; an object the org lacks is left out."""
    from replicator.sources.salesforce.source import build_authenticator

    auth = build_authenticator(cfg)
    await auth.login()
    describes: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession() as http:
        rest = RestClient(auth, http, api_version=cfg.api_version)
        for name in dict.fromkeys(e.salesforce for e in entities):
            try:
                describes[name] = await rest.describe(name)
            except SalesforceRestError as exc:
                if exc.status != 404 and exc.code != "NOT_FOUND":
                    raise
    return describes


async def read_erp(
    cfg: ErpSettings, entities: tuple[EntitySettings, ...]
) -> tuple[dict[str, TableInfo], TransformContext]:
    """Return the mapped tables the stream carries, and the transforms' lookups."""
    conn = await erp_connect(cfg.database.resolve(), "ERP")
    try:
        published = await _published_oids(conn, cfg)
        catalog = Catalog(conn)
        tables: dict[str, TableInfo] = {}
        for name in dict.fromkeys(e.erp for e in entities):
            oid = await conn.fetchval(_TABLE_SQL, name)
            if oid is None or not await _is_carried(conn, oid, published):
                continue
            info = await catalog.table(oid)
            if info is not None:
                tables[name] = info
        context = TransformContext(us_states=await _us_states(conn))
    except (OSError, asyncpg.InterfaceError) as exc:
        raise ErpConnectionError(f"cannot read the ERP catalog: {exc}") from exc
    except asyncpg.PostgresError as exc:
        raise ErpError(f"cannot read the ERP catalog: {exc}") from exc
    finally:
        await conn.close()
    return tables, context


async def _published_oids(
    conn: asyncpg.Connection, cfg: ErpSettings
) -> list[int] | None:
    """The tables the stream will carry; None for every table (FOR ALL TABLES)."""
    if await conn.fetchval(
        "SELECT 1 FROM pg_publication WHERE pubname = $1", cfg.publication
    ):
        return await Catalog(conn).publication_tables(cfg.publication)
    if not cfg.tables:
        return None
    rows = await conn.fetch(
        "SELECT to_regclass(t)::oid::int FROM unnest($1::text[]) AS t",
        list(cfg.tables),
    )
    return [r[0] for r in rows if r[0] is not None]


async def _is_carried(
    conn: asyncpg.Connection, oid: int, published: list[int] | None
) -> bool:
    if published is None:
        return True
    return bool(await conn.fetchval(_PUBLISHED_SQL, oid, published))


async def _us_states(conn: asyncpg.Connection) -> Mapping[str, str] | None:
    """The ERP's ``us_states`` (state name -> code), if it has that table."""
    if await conn.fetchval("SELECT to_regclass('us_states')") is None:
        return None
    try:
        rows = await conn.fetch(_US_STATES_SQL)
    except (asyncpg.UndefinedColumnError, asyncpg.InsufficientPrivilegeError):
        # another table of that name, or not ours to read: the built-in table
        return None
    return {str(r["state_name"]): str(r["state_abbr"]) for r in rows} or None
