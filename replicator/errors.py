"""The exception tree of the replicator.

::

    ReplicatorError
    ├── ConfigError              bad or missing settings; start-up stops
    ├── SourceError
    │   ├── ErpError             the ERP database or its replication stream
    │   └── SalesforceError      the org, its REST API or its streaming API
    │       ├── SalesforceAuthError          credentials refused (not retriable)
    │       ├── SalesforceConnectionError    the org could not be reached
    │       ├── SalesforceStreamError        a streaming session failed or stalled
    │       │   └── SalesforceSubscribeError a channel refused (not retriable)
    │       └── ReplayOutOfWindowError       stored replay id no longer retained
    ├── StoreError               the replica database
    │   └── LostLockError        the instance lock's session ended (exit code 3)
    ├── SinkError                a write-back to a source failed
    ├── ApplyError               one event cannot be applied; it is dead-lettered
    └── InvariantError           a state that must never happen

Each class says with ``retriable`` whether the supervisor should restart the
component with backoff (True) or stop (False). Third-party exceptions are
translated where the library is called and never travel further in.
"""

from __future__ import annotations

from asyncio import CancelledError
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


class SalesforceAuthError(SalesforceError):
    """The token endpoint refused the credentials; an operator must fix them."""

    retriable = False


class SalesforceConnectionError(SalesforceError, ConnectionError):
    """The org could not be reached, or a connection to it dropped."""


class SalesforceStreamError(SalesforceError):
    """A Streaming API session failed, was lost or stalled; it is reopened."""


class SalesforceSubscribeError(SalesforceStreamError):
    """A channel refused the subscription (unknown channel, no access)."""

    retriable = False


class ReplayOutOfWindowError(SalesforceError):
    """A stored replay id is outside the retention window: a gap to heal.

    Not retriable as is: subscribing again with the same id fails again, and
    falling back to -1 or -2 silently loses or re-applies events (BUG-18). The
    caller catches up the channel's objects, then subscribes with -1.
    """

    retriable = False

    def __init__(self, channel: str, replay_id: int) -> None:
        super().__init__(
            f"replay id {replay_id} of channel {channel!r} is outside the "
            "retention window; catch up the channel's objects, then subscribe "
            "with -1"
        )
        self.channel = channel
        self.replay_id = replay_id

    def __reduce__(self) -> tuple[type[ReplayOutOfWindowError], tuple[str, int]]:
        return (type(self), (self.channel, self.replay_id))


class StoreError(ReplicatorError):
    """The replica database failed."""

    retriable = True


class StoreConnectionError(StoreError, ConnectionError):
    """The replica could not be reached or the connection dropped."""


class LostLockError(StoreError):
    """The instance lock was lost; another instance may be active now."""

    retriable = False


class SinkError(ReplicatorError):
    """A write-back to a source system failed."""

    retriable = True


class ApplyError(ReplicatorError):
    """One event cannot be applied; it goes to the dead-letter table."""


class InvariantError(ReplicatorError):
    """A state that must never happen; the component stops."""


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Return the first exception of a task group that is not a cancellation."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        if not isinstance(exc, CancelledError):
            return exc
    return group.exceptions[0]
