"""``replicator emulator``: serve the local Salesforce org until interrupted.

By default the org is the E-Bikes sample org shipped in the package (its
objects metadata and sample data, see ``orgs/ebikes/LICENSE``), held in
memory unless ``--data-dir`` names a folder to keep it in.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import logging
from pathlib import Path

from aiohttp import web

from replicator.emulator.app import EmulatorConfig, create_app

__all__ = ["add_arguments", "run"]

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8443, help="port (default 8443)")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="keep the org in this folder across restarts (default: in memory)",
    )
    parser.add_argument(
        "--seed-ebikes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load the E-Bikes sample objects and data (default: on)",
    )
    parser.add_argument(
        "--metadata-dir",
        type=Path,
        action="append",
        default=[],
        help="an SFDX 'objects' folder to load (repeatable)",
    )
    parser.add_argument(
        "--data-plan",
        type=Path,
        action="append",
        default=[],
        help="an sObject Tree data plan to seed (repeatable)",
    )
    parser.add_argument(
        "--api-limit", type=int, default=100_000, help="daily API request budget"
    )
    parser.add_argument(
        "--token-ttl",
        type=float,
        default=7200.0,
        help="access token lifetime in seconds",
    )


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    base = EmulatorConfig.ebikes() if args.seed_ebikes else EmulatorConfig()
    return EmulatorConfig(
        host=args.host,
        port=args.port,
        data_dir=args.data_dir,
        token_ttl_seconds=args.token_ttl,
        daily_api_limit=args.api_limit,
        metadata_dirs=(*base.metadata_dirs, *args.metadata_dir),
        seed_plans=(*base.seed_plans, *args.data_plan),
        seed_standard=base.seed_standard,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    asyncio.run(_serve(config))
    return 0


async def _serve(config: EmulatorConfig) -> None:
    app = create_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        print(
            f"replicator emulator: cannot listen on {config.host}:{config.port}: "
            f"{exc.strerror}; choose another --port",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    url = f"http://{config.host}:{config.port}"
    print(
        f"Salesforce emulator at {url}\n"
        f"  token URL:      {url}/services/oauth2/token\n"
        f"  username:       {config.username}\n"
        f"  password:       {config.password}\n"
        f"  security token: {config.security_token}\n"
        f"  client id:      {config.client_id}\n"
        f"  client secret:  {config.client_secret}\n"
        "Press Ctrl-C to stop.",
        flush=True,
    )
    logger.info("emulator serving", extra={"url": url})
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
