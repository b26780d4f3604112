"""``replicator status``: each stream's state, position, lag and rates.

The daemon need not run: everything comes from the replica's ``replicator``
schema (checkpoints, their history, dead letters) and the instance lock's
holder; the ERP's WAL position is read too when the ERP is reachable, to show
how many bytes the stream is behind. A table on a terminal, JSON with
``--json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from typing import Any

import asyncpg
import orjson

from replicator import config as config_module
from replicator.config import Settings
from replicator.errors import StoreConnectionError
from replicator.lock import holder_query, lock_identity, lock_key

_RATE_WINDOW = dt.timedelta(minutes=5)
_COLUMNS = (
    "stream",
    "state",
    "position",
    "lag_s",
    "behind_bytes",
    "last_event",
    "events_per_s",
    "dead_letters",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", required=True, help="path of the TOML config file"
    )
    parser.add_argument(
        "--json", action="store_true", help="print JSON instead of a table"
    )


def run(args: argparse.Namespace) -> int:
    settings = config_module.load(args.config)
    report = asyncio.run(collect(settings))
    if args.json:
        sys.stdout.write(
            orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n"
        )
    else:
        sys.stdout.write(render_table(report))
    return 0


async def collect(settings: Settings) -> dict[str, Any]:
    """Read the status of every stream of ``settings`` from the replica."""
    try:
        conn = await asyncpg.connect(settings.replica.resolve())
    except (OSError, asyncpg.PostgresError) as exc:
        raise StoreConnectionError(f"cannot connect to the replica: {exc}") from exc
    try:
        return await _collect(conn, settings)
    finally:
        await conn.close()


async def _collect(conn: asyncpg.Connection, settings: Settings) -> dict[str, Any]:
    identity = lock_identity(settings)
    holder = await conn.fetchval(holder_query(), lock_key(identity))
    daemon = "running" if holder is not None else "not running"
    if not await conn.fetchval(
        "SELECT to_regclass('replicator.checkpoints') IS NOT NULL"
    ):
        return {"daemon": daemon, "lock": identity, "streams": []}
    rows = await conn.fetch(
        "SELECT c.stream, c.position, c.lsn, c.details, c.updated_at, "
        "  (SELECT coalesce(sum(h.changes), 0) FROM replicator.checkpoint_history h "
        "   WHERE h.stream = c.stream AND h.recorded_at > now() - $1::interval) "
        "  AS recent, "
        "  (SELECT max(h.recorded_at) FROM replicator.checkpoint_history h "
        "   WHERE h.stream = c.stream AND h.changes > 0) AS last_applied, "
        "  (SELECT count(*) FROM replicator.dead_letters d "
        "   WHERE d.stream = c.stream AND d.status = 'parked') AS dead_letters, "
        "  now() AS now "
        "FROM replicator.checkpoints c ORDER BY c.stream",
        _RATE_WINDOW,
    )
    erp_lsn = await _erp_lsn(settings)
    streams = [_stream(row, settings, erp_lsn, daemon) for row in rows]
    return {"daemon": daemon, "lock": identity, "streams": streams}


def _stream(
    row: asyncpg.Record, settings: Settings, erp_lsn: int | None, daemon: str
) -> dict[str, Any]:
    details = orjson.loads(row["details"]) if row["details"] else {}
    now: dt.datetime = row["now"]
    last_event: dt.datetime | None = row["last_applied"]
    lag: float | None = None
    behind: int | None = None
    if details.get("commit_ms"):
        last_event = dt.datetime.fromtimestamp(details["commit_ms"] / 1000, tz=dt.UTC)
    is_erp = settings.erp is not None and row["stream"] == settings.erp.stream
    if is_erp and erp_lsn is not None and row["lsn"] is not None:
        behind = max(0, erp_lsn - row["lsn"])
        lag = 0.0 if behind == 0 else None
    if lag is None and last_event is not None and not is_erp:
        lag = round((now - last_event).total_seconds(), 3)
    state = "streaming" if daemon == "running" else "stopped"
    return {
        "stream": row["stream"],
        "state": state,
        "position": row["position"],
        "lag_seconds": lag,
        "behind_bytes": behind,
        "last_event_at": last_event.isoformat() if last_event else None,
        "checkpoint_at": row["updated_at"].isoformat(),
        "events_per_second": round(
            int(row["recent"]) / _RATE_WINDOW.total_seconds(), 3
        ),
        "dead_letters": int(row["dead_letters"]),
    }


async def _erp_lsn(settings: Settings) -> int | None:
    if settings.erp is None:
        return None
    try:
        async with asyncio.timeout(5):
            conn = await asyncpg.connect(settings.erp.database.resolve())
            try:
                text = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
            finally:
                await conn.close()
    except (OSError, TimeoutError, asyncpg.PostgresError):
        return None
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def render_table(report: dict[str, Any]) -> str:
    """Render ``report`` as a fixed-width table for a terminal."""
    rows = [
        [
            s["stream"],
            s["state"],
            s["position"],
            "-" if s["lag_seconds"] is None else f"{s['lag_seconds']:.1f}",
            "-" if s["behind_bytes"] is None else str(s["behind_bytes"]),
            (s["last_event_at"] or "-")[:19],
            f"{s['events_per_second']:.2f}",
            str(s["dead_letters"]),
        ]
        for s in report["streams"]
    ]
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(_COLUMNS)]
    lines = [f"daemon: {report['daemon']} (lock {report['lock']})"]
    lines.append("  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths, strict=True)))
    lines += [
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows
    ]
    if not rows:
        lines.append("no stream has a checkpoint yet")
    return "\n".join(lines) + "\n"
