"""Helpers of the operator commands: replica connections, tables on a terminal, prompts.

The commands themselves (checkpoints, dlq, conflicts, resync, check, bi-role)
live in their own modules; this one only holds what three of them share.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

from replicator.errors import StoreConnectionError, StoreError
from replicator.sources.erp.snapshot import SESSION_SETTINGS


@contextlib.asynccontextmanager
async def replica_connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """Connect to the replica; translate refusals into store errors that name the fix."""
    try:
        conn = await asyncpg.connect(dsn, server_settings=SESSION_SETTINGS)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StoreConnectionError(
            f"cannot connect to the replica: {exc}; check "
            "replica.dsn and that the server is up"
        ) from exc
    try:
        yield conn
    except asyncpg.UndefinedTableError as exc:
        raise StoreError(
            f"the replica has no replicator schema yet ({exc}); run "
            "`replicator run` once to create it"
        ) from exc
    finally:
        await conn.close()


def render(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    return str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print ``rows`` under ``headers`` in aligned columns, one line each."""
    cells = [[render(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    if not rows:
        print("(none)")


def confirm(question: str, *, assume_yes: bool) -> bool:
    """Ask ``question`` on the terminal; no answer (or no terminal) means no."""
    if assume_yes:
        return True
    print(question + " [y/N] ", end="", flush=True)
    try:
        answer = sys.stdin.readline()
    except (OSError, ValueError):
        return False
    return answer.strip().lower() in ("y", "yes")
