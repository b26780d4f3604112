"""``replicator verify``: compare every replicated table with its source, row by row.

Both sides render rows as text in the same session settings, ordered by the
mirror's key, and are compared in key order with bounded memory (server-side
cursors), so the check is PostgreSQL's own view of the data on both sides.
Mapped entities (``[[entities]]``) are checked by ``verify_unified``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import ClassVar

import asyncpg
import orjson

from replicator import config as config_module
from replicator.config import Settings
from replicator.errors import StoreConnectionError
from replicator.sources.erp.snapshot import SESSION_SETTINGS
from replicator.store.mirror import MIRROR_SCHEMA, quote_ident

logger = logging.getLogger(__name__)


@dataclass
class TableReport:
    table: str
    source_rows: int = 0
    mirror_rows: int = 0
    missing: list[str] = field(default_factory=list)  # in the source, not the mirror
    extra: list[str] = field(default_factory=list)  # in the mirror, not the source
    different: list[tuple[str, str]] = field(default_factory=list)
    mismatches: int = 0
    kind: ClassVar[str] = "table"

    @property
    def ok(self) -> bool:
        return self.mismatches == 0

    def summary(self, width: int) -> str:
        """One line: the table, its row counts and whether it matches."""
        status = "ok" if self.ok else f"DIFFERS ({self.mismatches} rows)"
        return (
            f"  {self.table:<{width}}  {self.source_rows:>7} source rows  "
            f"{self.mirror_rows:>7} mirror rows  {status}"
        )

    def details(self) -> list[str]:
        """The sampled differences, one printed line each."""
        lines = [f"      missing in mirror: {row}" for row in self.missing]
        lines += [f"      only in mirror:    {row}" for row in self.extra]
        for src, dst in self.different:
            lines += [f"      source: {src}", f"      mirror: {dst}"]
        return lines


async def _rows(conn: asyncpg.Connection, query: str) -> AsyncIterator[tuple[str, str]]:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        async for record in conn.cursor(query, prefetch=2000):
            yield record[0], record[1]


async def compare_table(
    erp: asyncpg.Connection,
    replica: asyncpg.Connection,
    source: str,
    mirror: str,
    columns: list[str],
    key: list[str],
    *,
    sample: int = 5,
) -> TableReport:
    cols = ", ".join(quote_ident(c) for c in columns)
    keys = ", ".join(quote_ident(k) for k in key)
    schema, _, name = source.partition(".")
    src = f"{quote_ident(schema)}.{quote_ident(name)}"
    dst = f"{MIRROR_SCHEMA}.{quote_ident(mirror)}"
    template = (
        "SELECT ROW({keys})::text, ROW({cols})::text FROM {table} ORDER BY {keys}"
    )
    report = TableReport(f"erp.{mirror}")
    # The mirror side is held as key -> digest of the row: bounded by the key
    # count, and independent of how either server orders keys.
    mirrored: dict[str, bytes] = {}
    async for key_text, row in _rows(
        replica, template.format(keys=keys, cols=cols, table=dst)
    ):
        mirrored[key_text] = hashlib.blake2b(row.encode(), digest_size=16).digest()
    report.mirror_rows = len(mirrored)
    async for key_text, row in _rows(
        erp, template.format(keys=keys, cols=cols, table=src)
    ):
        report.source_rows += 1
        digest = mirrored.pop(key_text, None)
        if digest is None:
            report.mismatches += 1
            _note(report.missing, row, sample)
        elif digest != hashlib.blake2b(row.encode(), digest_size=16).digest():
            report.mismatches += 1
            if len(report.different) < sample:
                found = await replica.fetchval(
                    f"SELECT ROW({cols})::text FROM {dst} WHERE ROW({keys})::text = $1",
                    key_text,
                )
                report.different.append((row, found))
    for key_text in mirrored:
        report.mismatches += 1
        _note(report.extra, key_text, sample)
    return report


def _note(bucket: list[str], row: str, sample: int) -> None:
    if len(bucket) < sample:
        bucket.append(row)


async def verify_erp(settings: Settings) -> list[TableReport]:
    """Compare each table of the ERP stream with its mirror."""
    assert settings.erp is not None
    erp = await asyncpg.connect(
        settings.erp.database.resolve(), server_settings=SESSION_SETTINGS
    )
    replica = await asyncpg.connect(
        settings.replica.resolve(), server_settings=SESSION_SETTINGS
    )
    try:
        rows = await replica.fetch(
            "SELECT source_table, mirror_table, columns, key_columns FROM "
            "replicator.mirror_tables WHERE stream = $1 ORDER BY mirror_table",
            settings.erp.stream,
        )
        reports = []
        for row in rows:
            columns = [c[0] for c in orjson.loads(row["columns"])]
            key = orjson.loads(row["key_columns"])
            reports.append(
                await compare_table(
                    erp, replica, row["source_table"], row["mirror_table"], columns, key
                )
            )
        return reports
    finally:
        await erp.close()
        await replica.close()


def print_reports(reports: list[TableReport]) -> bool:
    """Print each report and a summary line; return whether everything matched."""
    width = max((len(r.table) for r in reports), default=5)
    for r in reports:
        print(r.summary(width))
        for line in r.details():
            print(line)
    ok = all(r.ok for r in reports)
    entities = sum(r.kind == "entity" for r in reports)
    counted = f"{len(reports) - entities} tables" + (
        f", {entities} entities" if entities else ""
    )
    print(
        f"verify: {counted}, {sum(not r.ok for r in reports)} with differences "
        f"-> {'OK' if ok else 'FAILED'}"
    )
    return ok


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", required=True, help="path of the TOML config file"
    )


def run(args: argparse.Namespace) -> int:
    settings = config_module.load(args.config)

    async def every() -> list[TableReport]:
        # imported here: the CLI imports this module to build its parser
        from replicator.verify_unified import verify_entities

        reports = await verify_erp(settings) if settings.erp else []
        reports += await verify_sf(settings) if settings.salesforce else []
        return reports + list(await verify_entities(settings))

    try:
        reports = asyncio.run(every())
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StoreConnectionError(
            f"cannot compare: a database refused or could not be reached: {exc}; "
            "check the DSNs in the config and that the servers run"
        ) from exc
    return 0 if print_reports(reports) else 1


async def verify_sf(settings: Settings, *, sample: int = 5) -> list[TableReport]:
    """Compare each mirrored Salesforce object with the org, read over REST now.

    The org's records are cast by the replica into the mirror's column types
    (a temporary copy of the table), then both sides are compared with EXCEPT.
    Records in the recycle bin are compared with the mirror's ``is_deleted`` rows.
    """
    import aiohttp

    from replicator.sources.salesforce.rest import RestClient
    from replicator.sources.salesforce.schema import shape_of, to_text
    from replicator.sources.salesforce.source import build_authenticator

    cfg = settings.salesforce
    assert cfg is not None
    auth = build_authenticator(cfg)
    replica = await asyncpg.connect(
        settings.replica.resolve(), server_settings=SESSION_SETTINGS
    )
    reports = []
    try:
        async with aiohttp.ClientSession() as http:
            await auth.login()
            rest = RestClient(auth, http, api_version=cfg.api_version)
            for obj in cfg.objects:
                shape = shape_of(await rest.describe(obj))
                table = f"sf.{quote_ident(shape.table)}"
                mirrored = {
                    r[0]
                    for r in await replica.fetch(
                        "SELECT column_name FROM information_schema.columns "
                        "WHERE table_schema = 'sf' AND table_name = $1",
                        shape.table,
                    )
                }
                lacking = [f.api_name for f in shape.fields if f.column not in mirrored]
                fields = [f for f in shape.fields if f.column in mirrored]
                cols = ", ".join(quote_ident(f.column) for f in fields)
                casts = ", ".join(
                    f"${i + 1}::text::{f.type}" for i, f in enumerate(fields)
                )
                soql = (
                    "SELECT " + ", ".join(f.api_name for f in fields) + f" FROM {obj}"
                )
                rows = [
                    tuple(to_text(r.get(f.api_name)) for f in fields)
                    async for r in rest.query(soql, include_deleted=True)
                ]
                async with replica.transaction():
                    await replica.execute(
                        f"CREATE TEMP TABLE _org (LIKE {table}) ON COMMIT DROP"
                    )
                    await replica.executemany(
                        f"INSERT INTO _org ({cols}) VALUES ({casts})", rows
                    )
                    report = TableReport(
                        f"sf.{shape.table}",
                        len(rows),
                        await replica.fetchval(f"SELECT count(*) FROM {table}"),
                    )
                    missing = await replica.fetch(
                        f"SELECT ROW({cols})::text FROM _org EXCEPT "
                        f"SELECT ROW({cols})::text FROM {table}"
                    )
                    extra = await replica.fetch(
                        f"SELECT ROW({cols})::text FROM {table} EXCEPT "
                        f"SELECT ROW({cols})::text FROM _org"
                    )
                report.mismatches = len(missing) + len(extra) + len(lacking)
                report.missing = [f"column for field {name}" for name in lacking][
                    :sample
                ]
                report.missing += [r[0] for r in missing[:sample]]
                report.extra = [r[0] for r in extra[:sample]]
                reports.append(report)
    finally:
        await replica.close()
    return reports
