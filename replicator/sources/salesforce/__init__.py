"""The Salesforce source: Change Data Capture over CometD, REST for loads and gaps."""

from __future__ import annotations

__all__: list[str] = []
