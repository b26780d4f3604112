"""One active instance per config: a session advisory lock on the replica.

The key is derived from the config's identity (its streams: the ERP stream and
slot, the Salesforce stream prefix), so two daemons started with the same
config, or with configs that share a stream, exclude each other. The instance
that cannot take the lock waits as a standby: it blocks on
``pg_advisory_lock`` in the server, which grants the lock the moment the
holder's session ends (a clean exit, a crash, SIGKILL), so the take-over
needs no polling.

The lock lives as long as its connection. ``InstanceLock.lost`` is set when
that connection drops or stops answering a periodic probe; the daemon then
stops streaming at once, since another instance may already hold the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os

import asyncpg

from replicator.config import Settings
from replicator.errors import ConfigError, StoreConnectionError, StoreError

logger = logging.getLogger(__name__)

_CONNECTION_ERRORS = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)


def lock_identity(settings: Settings) -> str:
    """Return the text that names this config's streams; the lock key hashes it."""
    if settings.daemon.lock_name:
        return f"replicator:{settings.daemon.lock_name}"
    parts = []
    if settings.erp is not None:
        parts.append(f"erp={settings.erp.stream}/{settings.erp.slot}")
    if settings.salesforce is not None:
        parts.append(f"sf={settings.salesforce.stream_prefix}")
    return "replicator:" + ",".join(parts)


def lock_key(identity: str) -> int:
    """Map ``identity`` to a signed 64-bit advisory lock key, stable across runs."""
    digest = hashlib.blake2b(identity.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class InstanceLock:
    """Hold the instance lock of a config on the replica; detect its loss.

    ``async with InstanceLock(...)`` connects and returns without the lock;
    ``acquire()`` waits for it (logging once that this instance is a
    standby); ``watch()`` runs while the lock is held and returns when it is
    lost.
    """

    def __init__(self, dsn: str, identity: str, *, check_seconds: float = 2.0) -> None:
        self.dsn = dsn
        self.identity = identity
        self.key = lock_key(identity)
        self.check_seconds = check_seconds
        self.lost = asyncio.Event()
        self._conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> InstanceLock:
        try:
            self._conn = await asyncpg.connect(
                self.dsn, server_settings={"application_name": "replicator lock"}
            )
        except asyncpg.ClientConfigurationError as exc:
            raise ConfigError(
                f"the replica DSN is not valid: {exc}; fix its value"
            ) from exc
        except (
            asyncpg.InvalidPasswordError,
            asyncpg.InvalidAuthorizationSpecificationError,
            asyncpg.InvalidCatalogNameError,
        ) as exc:
            raise ConfigError(
                f"the replica refused the connection: {exc}; fix the user, password "
                "or database in the replica DSN"
            ) from exc
        except (*_CONNECTION_ERRORS, asyncpg.TooManyConnectionsError) as exc:
            raise StoreConnectionError(
                f"cannot connect to the replica for the instance lock: {exc}"
            ) from exc
        except asyncpg.PostgresError as exc:
            raise StoreError(
                f"replica refused the instance lock's connection: {exc}"
            ) from exc
        self._conn.add_termination_listener(lambda conn: self.lost.set())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # Closing the session releases the lock; a connection interrupted
        # mid-query is terminated rather than reused.
        try:
            async with asyncio.timeout(5):
                await conn.close()
        except (TimeoutError, *_CONNECTION_ERRORS, asyncpg.PostgresError):
            conn.terminate()

    async def acquire(self) -> None:
        """Return once this session holds the lock; wait as a standby meanwhile."""
        conn = self._require()
        try:
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.key):
                return
            holder = await conn.fetchval(holder_query(), self.key)
            logger.info(
                "standby: another instance holds the lock, waiting",
                extra={
                    "lock": self.identity,
                    "holder_backend_pid": holder,
                    "pid": os.getpid(),
                },
            )
            await conn.execute("SELECT pg_advisory_lock($1)", self.key)
        except _CONNECTION_ERRORS as exc:
            raise StoreConnectionError(f"instance lock connection lost: {exc}") from exc
        except asyncpg.PostgresError as exc:
            raise StoreError(f"cannot take the instance lock: {exc}") from exc

    async def watch(self) -> None:
        """Return when the lock's connection is lost (probed every few seconds)."""
        conn = self._require()
        while not self.lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.check_seconds):
                    await self.lost.wait()
            if self.lost.is_set():
                break
            try:
                async with asyncio.timeout(max(self.check_seconds, 1.0) * 2):
                    await conn.fetchval("SELECT 1")
            except (TimeoutError, *_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                logger.debug("instance lock probe failed", extra={"error": str(exc)})
                self.lost.set()
        conn.terminate()

    def _require(self) -> asyncpg.Connection:
        if self._conn is None:
            raise StoreConnectionError("the instance lock has no connection")
        return self._conn


def holder_query() -> str:
    """Return SQL giving the pid holding lock ``$1`` in this database, if any."""
    return (
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
        "AND classid = (($1::bigint >> 32) & 4294967295)::oid "
        "AND objid = ($1::bigint & 4294967295)::oid AND objsubid = 1 "
        "AND database = (SELECT oid FROM pg_database "
        "WHERE datname = current_database())"
    )
