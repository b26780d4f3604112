"""Test-side shims that let aiosfstream-ng talk to the emulator on Python 3.11.

What they fix is documented in ``reference/streaming-clients.md``:

- ``EmulatorClient`` builds the CometD URL from the token response's
  ``instance_url`` (the library hard-codes ``/cometd/45.0`` on that URL, which
  is kept as the default) and waits for reconnection without the ``loop=``
  argument that Python 3.10 removed from ``asyncio.wait_for``.
- ``EmulatorAuthenticator`` sends the password grant to the emulator's token
  endpoint and authenticates again when a failed re-authentication left no
  token, instead of wedging for ever.

These are for testing the server; the replicator's own client wrapper lives
in ``replicator.sources.salesforce``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiocometd_ng.constants import TransportState
from aiocometd_ng.typing import Headers, Payload
from aiosfstream_ng import Client, PasswordAuthenticator

__all__ = ["EmulatorAuthenticator", "EmulatorClient"]


class EmulatorAuthenticator(PasswordAuthenticator):
    """Username-password flow against ``<base_url>/services/oauth2/token``."""

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._emulator_token_url = base_url.rstrip("/") + "/services/oauth2/token"
        self.token_requests = 0

    @property
    def _token_url(self) -> str:
        return self._emulator_token_url

    async def authenticate(self) -> None:
        self.token_requests += 1
        await super().authenticate()

    async def outgoing(self, payload: Payload, headers: Headers) -> None:
        if self.access_token is None:
            await self.authenticate()
        await super().outgoing(payload, headers)


class EmulatorClient(Client):
    """``aiosfstream_ng.Client`` with a settable API version and no ``loop=``."""

    def __init__(
        self,
        authenticator: PasswordAuthenticator,
        *,
        api_version: str = "45.0",
        **kwargs: Any,
    ) -> None:
        super().__init__(authenticator, **kwargs)
        self.api_version = api_version

    def get_cometd_url(self, instance_url: str) -> str:  # type: ignore[override]
        return f"{instance_url.rstrip('/')}/cometd/{self.api_version}"

    # The name `timeout` is the library's; this overrides its method.
    async def _wait_connection_timeout(self, timeout: float) -> None:  # noqa: ASYNC109
        assert self._transport is not None
        while True:
            await self._transport.wait_for_state(TransportState.CONNECTING)
            try:
                async with asyncio.timeout(timeout):
                    await self._transport.wait_for_state(TransportState.CONNECTED)
            except TimeoutError:
                break
