"""The emulator fixtures live in ``tests/fixtures/emulator.py`` (a plugin for every test)."""
