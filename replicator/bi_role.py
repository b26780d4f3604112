"""``replicator bi-role``: a read-only role for BI tools on the mirror schemas only.

The role gets USAGE and SELECT on ``sf``, ``erp`` and ``unified``, and default
privileges so tables the replicator creates there later are readable too;
nothing on ``replicator`` (checkpoints, dead letters) and no write anywhere.
Its password comes from an environment variable, never from the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re

import asyncpg

from replicator import config as config_module
from replicator.config import Settings
from replicator.errors import ConfigError, StoreError
from replicator.store.admin import replica_connection
from replicator.store.mirror import quote_ident
from replicator.store.tables import MIRROR_SCHEMAS, SCHEMA

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", required=True, help="path of the TOML config file"
    )
    parser.add_argument("--name", required=True, help="the role to create or update")
    parser.add_argument(
        "--password-env",
        metavar="VAR",
        help="environment variable holding its password (else NOLOGIN)",
    )


def run(args: argparse.Namespace) -> int:
    settings = config_module.load(args.config)
    password = None
    if args.password_env:
        password = os.environ.get(args.password_env)
        if not password:
            raise ConfigError(
                f"environment variable {args.password_env!r} is empty; "
                "export the BI role's password in it"
            )
    asyncio.run(create_bi_role(settings, args.name, password))
    print(f"bi-role: {args.name} may read {', '.join(MIRROR_SCHEMAS)} and nothing else")
    return 0


def grant_statements(name: str, owner: str) -> list[str]:
    """The grants of ``name``: read the mirror schemas now and later, nothing more."""
    role = quote_ident(name)
    out = [
        f"REVOKE ALL ON SCHEMA {SCHEMA} FROM {role}",
        f"REVOKE ALL ON ALL TABLES IN SCHEMA {SCHEMA} FROM {role}",
    ]
    for schema in MIRROR_SCHEMAS:
        out += [
            f"CREATE SCHEMA IF NOT EXISTS {schema}",
            f"GRANT USAGE ON SCHEMA {schema} TO {role}",
            f"GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}",
            # Tables the replicator's role creates later: mirrors, shadows swapped in.
            f"ALTER DEFAULT PRIVILEGES FOR ROLE {quote_ident(owner)} IN SCHEMA {schema} "
            f"GRANT SELECT ON TABLES TO {role}",
        ]
    return out


async def create_bi_role(settings: Settings, name: str, password: str | None) -> None:
    """Create (or update) role ``name`` with read access to the mirror schemas only."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$-]{0,62}", name):
        raise ConfigError(
            f"--name {name!r} is not a plain role name; use letters, digits, _"
        )
    async with replica_connection(settings.replica.resolve()) as conn:
        owner = await conn.fetchval("SELECT current_user")
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", name)
        # The password is sent as a literal quoted by the server's quote_literal.
        login = "NOLOGIN"
        if password is not None:
            login = "LOGIN PASSWORD " + await conn.fetchval(
                "SELECT quote_literal($1)", password
            )
        verb = "ALTER" if exists else "CREATE"
        try:
            async with conn.transaction():
                await conn.execute(
                    f"{verb} ROLE {quote_ident(name)} {login} NOSUPERUSER "
                    "NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
                )
                database = await conn.fetchval("SELECT current_database()")
                await conn.execute(
                    f"GRANT CONNECT ON DATABASE {quote_ident(database)} "
                    f"TO {quote_ident(name)}"
                )
                for statement in grant_statements(name, owner):
                    await conn.execute(statement)
        except asyncpg.InsufficientPrivilegeError as exc:
            raise StoreError(
                f"the replica refused to create role {name!r}: {exc}; run "
                "bi-role with a replica DSN whose role has CREATEROLE"
            ) from exc
    logger.info("bi role ready", extra={"role": name, "schemas": list(MIRROR_SCHEMAS)})
