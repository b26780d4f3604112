"""The operations endpoint: ``/healthz``, ``/readyz`` and ``/metrics`` (aiohttp).

``/healthz`` answers 200 while the event loop runs, standby or active;
``/readyz`` answers 200 only on the active instance with every stream
streaming within its lag budget, 503 with the reasons otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from replicator.ops.metrics import Metrics
from replicator.ops.state import OpsState

logger = logging.getLogger(__name__)

STATE_KEY = web.AppKey("state", OpsState)
METRICS_KEY = web.AppKey("metrics", Metrics)


async def _healthz(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    return web.json_response({"status": "alive", "role": state.role})


async def _readyz(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    ready, reasons = state.readiness()
    body: dict[str, Any] = {
        "ready": ready,
        "role": state.role,
        "reasons": reasons,
        "streams": {name: s.as_dict() for name, s in sorted(state.streams.items())},
    }
    return web.json_response(body, status=200 if ready else 503)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS_KEY].registry)
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def create_app(state: OpsState, metrics: Metrics) -> web.Application:
    app = web.Application()
    app[STATE_KEY] = state
    app[METRICS_KEY] = metrics
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)
    return app


def parse_listen(listen: str) -> tuple[str, int]:
    """Split ``host:port`` (``[::1]:9108`` for IPv6) into its parts."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


class OpsServer:
    """Serve the endpoints on ``listen`` in the block; ``port`` is the bound one."""

    def __init__(self, listen: str, state: OpsState, metrics: Metrics) -> None:
        self.host, self.port_wanted = parse_listen(listen)
        self.port: int | None = self.port_wanted
        self._runner = web.AppRunner(create_app(state, metrics), access_log=None)

    async def __aenter__(self) -> OpsServer:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port_wanted)
        try:
            await site.start()
        except OSError as exc:
            error = exc.strerror
        else:
            error = None
        if error is not None:
            # Replication matters more than its endpoint: go on without it, loudly
            # (a scrape then finds the target down and ReplicatorDown fires).
            await self._runner.cleanup()
            self.port = None
            logger.error(
                "ops endpoint unavailable: cannot listen; choose another ops.listen",
                extra={"host": self.host, "port": self.port_wanted, "error": error},
            )
            return self
        for address in self._runner.addresses:
            self.port = int(address[1])
            break
        logger.info(
            "ops server listening", extra={"host": self.host, "port": self.port}
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self.port is not None:
            await self._runner.cleanup()
