"""Change-data-capture replication between Salesforce and a PostgreSQL ERP."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
