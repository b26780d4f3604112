"""``replicator run``: the long-running daemon and its lifecycle.

Start-up: serve the ops endpoint (``/healthz`` answers from the first
moment), then take the instance lock on the replica; while another instance
holds it this one is a standby. Once active, every configured pipeline runs
in one task group beside the lock's watchdog.

Shutdown in two steps: SIGTERM or SIGINT sets the stop event, the pipelines
drain, commit and acknowledge, then return; past ``daemon.shutdown_seconds``
the tasks still running are cancelled, each named in a warning. A second
SIGINT exits at once: nothing is lost, since every checkpoint commits with
the data it covers and an uncommitted replica transaction is rolled back.

Losing the lock (its session ended or stopped answering) cancels the
pipelines at once, since a standby may already be active. Then, with
``daemon.on_lost_lock = "standby"`` (the default), this instance goes back
to waiting for the lock; with ``"exit"`` it exits with code 3.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from replicator import config as config_module
from replicator.backoff import Backoff
from replicator.config import Settings
from replicator.errors import ConfigError, LostLockError, StoreError, first_error
from replicator.lock import InstanceLock, lock_identity
from replicator.ops import Collector, Metrics, Notifier, OpsServer, OpsState
from replicator.sources.erp.source import ErpPipeline

logger = logging.getLogger(__name__)

# a pipeline: its task's name, the object (stats, ready) and how to run it
_Pipeline = tuple[str, Any, Callable[[], Coroutine[Any, Any, Any]]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", required=True, help="path of the TOML config file"
    )
    parser.add_argument(
        "--until-caught-up",
        action="store_true",
        help="stop once every source is caught up (for scripts and tests)",
    )


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


class Daemon:
    """The ops side (state, metrics, endpoint, notices) and the instance's lifecycle."""

    def __init__(
        self, settings: Settings, stop: asyncio.Event, *, until_caught_up: bool = False
    ) -> None:
        self.settings = settings
        self.stop = stop
        self.until_caught_up = until_caught_up
        url_env = settings.ops.webhook_url_env
        self.notifier = Notifier(
            os.environ.get(url_env) if url_env else None,
            timeout=settings.ops.webhook_timeout_seconds,
        )
        self.state = OpsState(
            lag_budget=settings.ops.lag_budget_seconds, notify=self.notifier.notify
        )
        self.metrics = Metrics()
        self.collector = Collector(settings, self.state, self.metrics)
        self.ops_port: int | None = None

    async def serve(self) -> None:
        """Run until ``stop`` is set (or, with ``until_caught_up``, until caught up)."""
        stop = self.stop
        logger.info("daemon started", extra={"pid": os.getpid()})
        try:
            async with contextlib.AsyncExitStack() as stack:
                if self.settings.ops.listen:
                    server = OpsServer(
                        self.settings.ops.listen, self.state, self.metrics
                    )
                    self.ops_port = (await stack.enter_async_context(server)).port
                await self._serve_with_helpers(stop)
        except BaseExceptionGroup as group:
            # A source that stops start-up raises one clear error: hand the CLI
            # that error, not the task group's traceback (DESIGN: clear errors).
            raise first_error(group) from None
        logger.info("daemon stopped")

    async def _serve_with_helpers(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            helpers = [
                tg.create_task(self.notifier.serve(), name="ops:webhook"),
                tg.create_task(self.collector.run(), name="ops:collector"),
            ]
            try:
                await self._run_instance(stop)
            finally:
                self.collector.mark_stopped()
                self.metrics.active.set(0)
                # the last notices (streams stopped) get a short grace period
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await self.notifier.drain()
                for task in helpers:
                    task.cancel()

    async def _run_instance(self, stop: asyncio.Event) -> None:
        if not self.settings.daemon.lock:
            self.state.set_role("active")
            await self._run_active(stop, None)
            return
        identity = lock_identity(self.settings)
        backoff = Backoff(initial=1.0)
        while not stop.is_set():
            try:
                if await self._hold_lock(identity, stop):
                    return
            except LostLockError:
                raise
            except StoreError as exc:
                await _retry_later(stop, backoff, exc)
                continue
            backoff.reset()

    async def _hold_lock(self, identity: str, stop: asyncio.Event) -> bool:
        """Wait for the lock, then run; return True when done, False to wait again."""
        settings = self.settings.daemon
        async with InstanceLock(
            self.settings.replica.resolve(),
            identity,
            check_seconds=settings.lock_check_seconds,
        ) as lock:
            self.state.set_role("standby")
            if not await _until_stopped(lock.acquire(), stop):
                return True
            logger.info("instance lock acquired", extra={"lock": identity})
            self.state.set_role("active")
            if not await self._run_active(stop, lock):
                return True
        self.state.set_role("standby")
        if settings.on_lost_lock == "exit":
            raise LostLockError(
                "the instance lock's session on the replica ended; streams stopped so "
                'that a standby can take over (daemon.on_lost_lock = "exit")'
            )
        return False

    async def _run_active(self, stop: asyncio.Event, lock: InstanceLock | None) -> bool:
        """Run the pipelines until stopped or done; return True if the lock was lost."""
        self.metrics.active.set(1)
        pipelines = self._pipelines()
        if not pipelines:
            raise ConfigError(
                "the config names no source; add an [erp] or a [salesforce] section"
            )
        # the mapping against both live schemas, before any stream starts
        from replicator.mapping.startup import check_when_reachable

        await check_when_reachable(self.settings, stop)
        if stop.is_set():
            return False
        async with asyncio.TaskGroup() as tg:
            tasks = {
                key: tg.create_task(run(), name=name)
                for key, (name, _, run) in pipelines.items()
            }
            self.collector.pipelines = {key: p for key, (_, p, _) in pipelines.items()}
            self.collector.running = tasks
            extra = self._helpers(tg, pipelines, stop)
            waits = {
                tg.create_task(stop.wait(), name="daemon:stop"),
                tg.create_task(asyncio.wait(tasks.values()), name="daemon:done"),
            }
            if lock is not None:
                extra.append(tg.create_task(lock.watch(), name="daemon:lock"))
                waits.add(tg.create_task(lock.lost.wait(), name="daemon:lost"))
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            lost = lock is not None and lock.lost.is_set()
            if lost:
                logger.error(
                    "instance lock lost, stopping every stream now",
                    extra={"lock": lock.identity if lock else None},
                )
                for task in tasks.values():
                    task.cancel()
            elif stop.is_set():
                await self._drain(list(tasks.values()))
            for task in (*waits, *extra):
                task.cancel()
        self.metrics.active.set(0)
        return lost

    def _pipelines(self) -> dict[str, _Pipeline]:
        settings, stop_event = self.settings, self.stop
        out: dict[str, _Pipeline] = {}
        if settings.erp is not None:
            erp = ErpPipeline(settings)
            out["erp"] = (
                f"source:erp:{settings.erp.slot}",
                erp,
                lambda: erp.run(stop_event, until_caught_up=self.until_caught_up),
            )
        if settings.salesforce is not None:
            from replicator.sources.salesforce.source import SalesforcePipeline

            sf = SalesforcePipeline(settings)
            out["salesforce"] = ("source:salesforce", sf, lambda: sf.run(stop_event))
        return out

    def _helpers(
        self, tg: asyncio.TaskGroup, pipelines: dict[str, Any], stop: asyncio.Event
    ) -> list[asyncio.Task[Any]]:
        helpers = [
            tg.create_task(_prune_forever(self.settings, stop), name="ops:prune")
        ]
        if self.settings.entities:
            # write-backs are idempotent: cancelling mid-write repeats it later
            from replicator.sinks.runner import run_outbox

            helpers.append(
                tg.create_task(run_outbox(self.settings, stop), name="sink:outbox")
            )
        if self.until_caught_up and "salesforce" in pipelines:
            sf = pipelines["salesforce"][1]
            helpers.append(
                tg.create_task(
                    _stop_when_quiet(sf, stop), name="source:salesforce:quiet"
                )
            )
        return helpers

    async def _drain(self, tasks: list[asyncio.Task[Any]]) -> None:
        deadline = self.settings.daemon.shutdown_seconds
        _, pending = await asyncio.wait(tasks, timeout=deadline)
        for task in pending:
            logger.warning(
                "task did not stop within the shutdown deadline, cancelling",
                extra={"task": task.get_name(), "deadline_seconds": deadline},
            )
            task.cancel()


async def serve(
    settings: Settings, stop: asyncio.Event, *, until_caught_up: bool
) -> None:
    """Run every configured source until ``stop`` is set."""
    await Daemon(settings, stop, until_caught_up=until_caught_up).serve()


async def _until_stopped(work: Awaitable[None], stop: asyncio.Event) -> bool:
    """Run ``work`` unless ``stop`` is set first; return whether it finished."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        return False
    task.result()
    return True


async def _retry_later(stop: asyncio.Event, backoff: Backoff, exc: StoreError) -> None:
    delay = backoff.next_delay()
    logger.error(
        "instance lock unavailable, retrying",
        extra={
            "error": str(exc),
            "retry_in": round(delay, 2),
            "attempt": backoff.attempt,
        },
    )
    await _wait_or_stop(stop, delay)


async def _wait_or_stop(stop: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay):
            await stop.wait()


async def _prune_forever(settings: Settings, stop: asyncio.Event) -> None:
    """Prune the audit trail hourly (the first time a minute after start)."""
    import datetime as dt

    import asyncpg

    from replicator.store import audit

    retention = dt.timedelta(days=settings.ops.audit_retention_days)
    delay = 60.0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await stop.wait()
        if stop.is_set():
            return
        delay = 3600.0
        try:
            conn = await asyncpg.connect(settings.replica.resolve())
            try:
                await audit.prune(conn, retention)
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError) as exc:
            logger.warning("audit trail not pruned", extra={"error": str(exc)})


async def _stop_when_quiet(
    pipeline: Any, stop: asyncio.Event, quiet: float = 6.0
) -> None:
    """For --until-caught-up: stop once the org's stream has been quiet for a while.

    Long enough for a catch-up over REST and the events behind it on a loaded
    machine (3 s stopped runs of the recovery tests before their last events).
    """
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
