"""Typed aiohttp application keys of the emulator, shared by all its parts.

Kept apart from ``app`` so that ``rest``, ``oauth``, ``query`` and
``streaming`` can import them without importing the app factory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from replicator.emulator.app import EmulatorConfig
    from replicator.emulator.faults import Faults
    from replicator.emulator.oauth import TokenStore
    from replicator.emulator.rest import ApiUsage
    from replicator.emulator.schema import OrgSchema
    from replicator.emulator.state import OrgState

__all__ = [
    "CONFIG_KEY",
    "FAULTS_KEY",
    "SCHEMA_KEY",
    "STATE_KEY",
    "TOKENS_KEY",
    "USAGE_KEY",
]

CONFIG_KEY: web.AppKey[EmulatorConfig] = web.AppKey("emulator.config")
STATE_KEY: web.AppKey[OrgState] = web.AppKey("emulator.state")
SCHEMA_KEY: web.AppKey[OrgSchema] = web.AppKey("emulator.schema")
TOKENS_KEY: web.AppKey[TokenStore] = web.AppKey("emulator.tokens")
FAULTS_KEY: web.AppKey[Faults] = web.AppKey("emulator.faults")
USAGE_KEY: web.AppKey[ApiUsage] = web.AppKey("emulator.api_usage")
