"""Fixtures that serve the emulator from its app factory on 127.0.0.1, port 0.

``serve_emulator(config)`` is an async context manager factory for tests
that need their own configuration; ``emulator`` serves the E-Bikes demo org
(fresh, in memory) and ``emulator_url`` is its base URL. ``Served.token()``
logs in with the password grant and returns an access token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from replicator.emulator.app import EmulatorConfig, create_app
from replicator.emulator.faults import Faults
from replicator.emulator.keys import FAULTS_KEY, STATE_KEY
from replicator.emulator.state import OrgState

ServeEmulator = Callable[[EmulatorConfig], AbstractAsyncContextManager["Served"]]


@dataclasses.dataclass(frozen=True)
class Served:
    """A running emulator: its base URL, app and config."""

    url: str
    app: web.Application
    config: EmulatorConfig

    @property
    def state(self) -> OrgState:
        return self.app[STATE_KEY]

    @property
    def faults(self) -> Faults:
        return self.app[FAULTS_KEY]

    async def login(self, **overrides: str) -> dict[str, Any]:
        """Run the password grant and return the token response body."""
        form = {
            "grant_type": "password",
            "client_id": self.config.client_id,
            "client_secret": self.config.client_secret,
            "username": self.config.username,
            "password": self.config.password + self.config.security_token,
            **overrides,
        }
        async with aiohttp.ClientSession() as http, http.post(
            self.url + "/services/oauth2/token", data=form
        ) as response:
            body: dict[str, Any] = await response.json()
            return body

    async def token(self) -> str:
        return str((await self.login())["access_token"])


@asynccontextmanager
async def _serve(config: EmulatorConfig) -> AsyncIterator[Served]:
    app = create_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Served(f"http://127.0.0.1:{port}", app, config)
    finally:
        await runner.cleanup()


@pytest.fixture
def serve_emulator() -> ServeEmulator:
    """Return a factory: ``async with serve_emulator(config) as served: ...``."""
    return _serve


@pytest.fixture
def emulator_config() -> EmulatorConfig:
    """The E-Bikes demo org, in memory, with a short long-poll timeout."""
    return EmulatorConfig.ebikes(long_poll_timeout_seconds=2.0)


@pytest.fixture
async def emulator(emulator_config: EmulatorConfig) -> AsyncIterator[Served]:
    async with _serve(emulator_config) as served:
        yield served


@pytest.fixture
def emulator_url(emulator: Served) -> str:
    return emulator.url


_FIELD_XML = """<?xml version="1.0" encoding="UTF-8"?>
<CustomField xmlns="http://soap.sforce.com/2006/04/metadata">
{body}
</CustomField>
"""

# Account fields of the field-failure fixture F0 (shared/cases/field-failures.md).
ACCOUNT_FIELDS = {
    "ERP_Customer_Code__c": "<fullName>ERP_Customer_Code__c</fullName><label>ERP "
    "Customer Code</label><type>Text</type><length>20</length>"
    "<externalId>true</externalId><unique>true</unique>",
    "Credit_Limit__c": "<fullName>Credit_Limit__c</fullName><label>Credit Limit"
    "</label><type>Currency</type><precision>12</precision><scale>2</scale>",
    "Attributes__c": "<fullName>Attributes__c</fullName><label>Attributes</label>"
    "<type>LongTextArea</type><length>131072</length><visibleLines>5</visibleLines>",
    "Legacy_Code__c": "<fullName>Legacy_Code__c</fullName><label>Legacy Code</label>"
    "<type>Text</type><length>20</length><externalId>true</externalId>",
}


@pytest.fixture
def account_metadata_dir(tmp_path: Any) -> Any:
    """An SFDX ``objects`` folder adding F0's custom fields to Account."""
    fields = tmp_path / "objects" / "Account" / "fields"
    fields.mkdir(parents=True)
    for name, body in ACCOUNT_FIELDS.items():
        (fields / f"{name}.field-meta.xml").write_text(_FIELD_XML.format(body=body))
    return tmp_path / "objects"


@pytest.fixture
def f0_config(account_metadata_dir: Any) -> EmulatorConfig:
    """The E-Bikes org plus F0's custom Account fields."""
    return EmulatorConfig.ebikes(
        metadata_dirs=(
            *EmulatorConfig.ebikes().metadata_dirs,
            account_metadata_dir,
        ),
        long_poll_timeout_seconds=2.0,
    )
