"""Test configuration: fixtures come from the plugins in ``tests/fixtures``."""

from __future__ import annotations

pytest_plugins = ["tests.fixtures.pg", "tests.fixtures.emulator"]
