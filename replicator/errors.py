"""The exception tree of the replicator.

::

    ReplicatorError
    ├── ConfigError              bad or missing settings; start-up stops
    ├── SourceError
    │   ├── ErpError             the ERP database or its replication stream
    │   └── SalesforceError      the org, its REST API or its streaming API
    ├── StoreError               the replica database
    ├── SinkError                a write-back to a source failed
    ├── ApplyError               one event cannot be applied; it is dead-lettered
    └── InvariantError           a state that must never happen

Each class says with ``retriable`` whether the supervisor should restart the
component with backoff (True) or stop (False). Third-party exceptions are
translated where the library is called and never travel further in.
"""

from __future__ import annotations

from typing import ClassVar


class ReplicatorError(Exception):
    """Root of every error the replicator raises on purpose."""

    retriable: ClassVar[bool] = False


class ConfigError(ReplicatorError):
    """Settings are missing or wrong; the message names the key and the fix."""


class SourceError(ReplicatorError):
    """A source system failed; usually passing."""

    retriable = True


class ErpError(SourceError):
    """The ERP database or its replication stream failed."""


class ErpSetupError(ErpError):
    """The ERP is not set up for logical replication; an operator must act."""

    retriable = False


class ErpConnectionError(ErpError, ConnectionError):
    """The ERP could not be reached or the connection dropped."""


class SalesforceError(SourceError):
    """The org, its REST API or its streaming API failed."""


class StoreError(ReplicatorError):
    """The replica database failed."""

    retriable = True


class StoreConnectionError(StoreError, ConnectionError):
    """The replica could not be reached or the connection dropped."""


class SinkError(ReplicatorError):
    """A write-back to a source system failed."""

    retriable = True


class ApplyError(ReplicatorError):
    """One event cannot be applied; it goes to the dead-letter table."""


class InvariantError(ReplicatorError):
    """A state that must never happen; the component stops."""
