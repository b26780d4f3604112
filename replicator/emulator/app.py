"""The emulator's aiohttp application factory and its configuration.

``create_app`` builds the org (standard objects, SFDX metadata, seed data),
then mounts OAuth, REST, the fault-control API and, when present, the SOQL
query endpoints and the Streaming API. Parts find each other through the
typed keys of ``keys``, re-exported here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from replicator.emulator import composite, faults, oauth, rest
from replicator.emulator.keys import (
    CONFIG_KEY,
    FAULTS_KEY,
    SCHEMA_KEY,
    STATE_KEY,
    TOKENS_KEY,
    USAGE_KEY,
)
from replicator.emulator.metadata import load_metadata
from replicator.emulator.schema import OrgSchema
from replicator.emulator.seed import ensure_user, seed_org
from replicator.emulator.standard import standard_schema
from replicator.emulator.state import OrgState

__all__ = [
    "CONFIG_KEY",
    "EBIKES_DIR",
    "FAULTS_KEY",
    "SCHEMA_KEY",
    "STATE_KEY",
    "TOKENS_KEY",
    "USAGE_KEY",
    "EmulatorConfig",
    "build_schema",
    "create_app",
]

logger = logging.getLogger(__name__)

EBIKES_DIR = Path(__file__).parent / "orgs" / "ebikes"


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """Everything the emulator needs to know; defaults give the demo org."""

    host: str = "127.0.0.1"
    port: int = 0
    data_dir: Path | None = None  # None: the org lives in memory only
    token_ttl_seconds: float = 7200.0
    daily_api_limit: int = 100_000
    api_version: str = "60.0"
    username: str = "admin@replicator.demo"
    password: str = field(default="replicator-demo", repr=False)
    security_token: str = field(default="EMULATORTOKEN0000000", repr=False)
    client_id: str = "3MVG9replicator.emulator.consumer.key"
    client_secret: str = field(default="emulator-consumer-secret", repr=False)
    metadata_dirs: tuple[Path, ...] = ()  # SFDX "objects" folders
    seed_plans: tuple[Path, ...] = ()  # sample-data-plan.json files
    seed_standard: bool = False  # add a few standard accounts, contacts, products
    cdc_enabled_objects: frozenset[str] | None = None  # None: every object
    replay_retention_seconds: float = 72 * 3600.0
    long_poll_timeout_seconds: float = 110.0

    @classmethod
    def ebikes(cls, **overrides: object) -> EmulatorConfig:
        """Return the config of the E-Bikes demo org shipped in the package."""
        settings: dict[str, object] = {
            "metadata_dirs": (EBIKES_DIR / "objects",),
            "seed_plans": (EBIKES_DIR / "data" / "sample-data-plan.json",),
            "seed_standard": True,
            **overrides,
        }
        return cls(**settings)  # type: ignore[arg-type]


def build_schema(config: EmulatorConfig) -> OrgSchema:
    """Return the standard objects plus the configured SFDX metadata."""
    schema = standard_schema()
    for directory in config.metadata_dirs:
        load_metadata(Path(directory), schema)
    for obj in schema.objects.values():
        obj.cdc_enabled = (
            config.cdc_enabled_objects is None or obj.name in config.cdc_enabled_objects
        )
    return schema


def create_app(config: EmulatorConfig) -> web.Application:
    """Build the emulated org and the web application that serves it."""
    schema = build_schema(config)
    state = OrgState(schema, data_dir=config.data_dir)
    ensure_user(state, config.username)
    seed_org(state, config)

    app = web.Application(middlewares=[faults.request_log_middleware, rest.middleware])
    app[CONFIG_KEY] = config
    app[SCHEMA_KEY] = schema
    app[STATE_KEY] = state
    app[TOKENS_KEY] = oauth.TokenStore(state.org_id, config.token_ttl_seconds)
    app[FAULTS_KEY] = faults.Faults()
    app[USAGE_KEY] = rest.ApiUsage(config.daily_api_limit)

    oauth.setup_oauth(app)
    rest.setup_rest(app)
    composite.setup_composite(app, rest.DATA_ROUTE)
    faults.setup_control(app)
    _setup_optional(app)

    async def close_state(app: web.Application) -> None:
        app[STATE_KEY].close()

    app.on_cleanup.append(close_state)
    logger.info(
        "emulator app created",
        extra={"objects": len(schema.objects), "data_dir": str(config.data_dir)},
    )
    return app


def _setup_optional(app: web.Application) -> None:
    """Mount the query endpoints and the Streaming API."""
    from replicator.emulator import query, streaming

    query.setup_query(app)
    streaming.setup_streaming(app)
