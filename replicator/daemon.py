"""``replicator run``: the long-running daemon and its lifecycle.

Signal handlers only set a stop event; the pipelines drain, commit and
acknowledge, then return. A second SIGINT exits at once: nothing is lost,
since every checkpoint commits with the data it covers.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from replicator import config as config_module
from replicator.config import Settings
from replicator.sources.erp.source import ErpPipeline

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="path of the TOML config file")
    parser.add_argument(
        "--until-caught-up", action="store_true",
        help="stop once every source is caught up (for scripts and tests)")


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM/SIGINT set ``stop``; a second SIGINT exits the process at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            logger.warning("second interrupt, exiting now")
            os._exit(130)
        logger.info("stop requested", extra={"signal": signal.Signals(signum).name})
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


async def serve(settings: Settings, stop: asyncio.Event, *, until_caught_up: bool) -> None:
    """Run every configured source until ``stop`` is set."""
    logger.info("daemon started", extra={"pid": os.getpid()})
    async with asyncio.TaskGroup() as tg:
        if settings.erp is not None:
            erp = ErpPipeline(settings)
            tg.create_task(erp.run(stop, until_caught_up=until_caught_up),
                           name=f"source:erp:{settings.erp.slot}")
        if settings.salesforce is not None:
            from replicator.sources.salesforce.source import SalesforcePipeline

            sf = SalesforcePipeline(settings)
            tg.create_task(sf.run(stop), name="source:salesforce")
            if until_caught_up:
                tg.create_task(_stop_when_quiet(sf, stop), name="source:salesforce:quiet")
    logger.info("daemon stopped")


async def _stop_when_quiet(pipeline: Any, stop: asyncio.Event, quiet: float = 3.0) -> None:
    """For --until-caught-up: stop once the org's stream has been quiet for a while."""
    await pipeline.ready.wait()
    last = -1
    while not stop.is_set():
        await asyncio.sleep(quiet)
        seen = pipeline.stats.events if pipeline.stats else 0
        if seen == last:
            stop.set()
        last = seen


def run_loop(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main`` on uvloop where available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is not built for Windows
        asyncio.run(main())
        return
    if sys.version_info >= (3, 12):  # pragma: no cover
        uvloop.run(main())
    else:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        asyncio.run(main())


def run(args: argparse.Namespace) -> int:
    settings = config_module.load(args.config)

    async def main() -> None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        await serve(settings, stop, until_caught_up=args.until_caught_up)

    run_loop(main)
    return 0
