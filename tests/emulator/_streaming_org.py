"""A small served org with only the parts the streaming tests need.

Builds state, token store and the streaming routes from a hand-made schema,
so the CometD tests do not depend on the standard objects or seed data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web

from replicator.emulator.keys import CONFIG_KEY, SCHEMA_KEY, STATE_KEY, TOKENS_KEY
from replicator.emulator.oauth import TokenStore
from replicator.emulator.schema import FieldSchema, ObjectSchema, OrgSchema
from replicator.emulator.state import OrgState
from replicator.emulator.streaming import STREAMING_KEY, Streaming, setup_streaming

USER_ID = "005000000000001AAA"


@dataclasses.dataclass(frozen=True)
class StreamingConfig:
    """The fields of the core's ``EmulatorConfig`` that streaming reads."""

    data_dir: Path | None = None
    api_version: str = "60.0"
    replay_retention_seconds: float = 72 * 3600.0
    long_poll_timeout_seconds: float = 2.0


def _fields(*fields: FieldSchema) -> dict[str, FieldSchema]:
    system = [
        FieldSchema("Id", "id", createable=False, updateable=False),
        FieldSchema("OwnerId", "reference", reference_to=("User",)),
        FieldSchema("IsDeleted", "boolean", createable=False, updateable=False),
        FieldSchema("CreatedDate", "datetime", createable=False, updateable=False),
        FieldSchema("CreatedById", "reference", createable=False, updateable=False),
        FieldSchema("LastModifiedDate", "datetime", createable=False, updateable=False),
        FieldSchema(
            "LastModifiedById", "reference", createable=False, updateable=False
        ),
        FieldSchema("SystemModstamp", "datetime", createable=False, updateable=False),
    ]
    return {f.name: f for f in [*system, *fields]}


def small_schema() -> OrgSchema:
    account = ObjectSchema("Account", "001")
    account.fields = _fields(
        FieldSchema("Name", "string", length=255, nillable=False),
        FieldSchema("Phone", "phone", length=40),
        FieldSchema("Rating", "picklist", length=40),
        FieldSchema("BillingStreet", "textarea", compound_field_name="BillingAddress"),
        FieldSchema(
            "BillingCity", "string", length=40, compound_field_name="BillingAddress"
        ),
        FieldSchema("BillingAddress", "address", createable=False, updateable=False),
    )
    contact = ObjectSchema("Contact", "003")
    contact.fields = _fields(
        FieldSchema("FirstName", "string", length=40, compound_field_name="Name"),
        FieldSchema("LastName", "string", length=80, compound_field_name="Name"),
        FieldSchema("Name", "string", createable=False, updateable=False),
        FieldSchema("Email", "email", length=80),
    )
    note = ObjectSchema("Note__c", "a01", custom=True, cdc_enabled=False)
    note.fields = _fields(FieldSchema("Name", "string", length=80))
    return OrgSchema({o.name: o for o in (account, contact, note)})


@dataclasses.dataclass
class ServedOrg:
    url: str
    port: int
    app: web.Application
    runner: web.AppRunner
    state: OrgState
    tokens: TokenStore
    streaming: Streaming

    def token(self) -> str:
        return self.tokens.issue(USER_ID, "admin@example.invalid", "test").access_token

    def write(self, object_name: str, values: dict[str, Any], **kwargs: Any) -> str:
        with self.state.transaction(user_id=USER_ID, **kwargs) as tx:
            return tx.create(object_name, values)

    def update(self, record_id: str, values: dict[str, Any], **kwargs: Any) -> None:
        with self.state.transaction(user_id=USER_ID, **kwargs) as tx:
            tx.update(None, record_id, values)


def build_app(config: StreamingConfig) -> web.Application:
    schema = small_schema()
    state = OrgState(schema, data_dir=config.data_dir)
    app = web.Application()
    app[CONFIG_KEY] = config  # type: ignore[assignment]
    app[SCHEMA_KEY] = schema
    app[STATE_KEY] = state
    app[TOKENS_KEY] = TokenStore(state.org_id, 3600.0)
    setup_streaming(app)

    async def close_state(app: web.Application) -> None:
        state.close()

    app.on_cleanup.append(close_state)
    return app


@asynccontextmanager
async def serve_org(
    config: StreamingConfig | None = None, port: int = 0
) -> AsyncIterator[ServedOrg]:
    """Serve a small org on 127.0.0.1 until the block ends."""
    app = build_app(config or StreamingConfig())
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = runner.addresses[0][1]
    try:
        yield ServedOrg(
            f"http://127.0.0.1:{bound}",
            bound,
            app,
            runner,
            app[STATE_KEY],
            app[TOKENS_KEY],
            app[STREAMING_KEY],
        )
    finally:
        await runner.cleanup()
