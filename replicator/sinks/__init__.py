"""Sinks: idempotent write-backs from the outbox to Salesforce and to the ERP."""

from __future__ import annotations

__all__: list[str] = []
