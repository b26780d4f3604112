"""Settings: one TOML file read once into frozen, validated models.

Secrets never sit in the file: a DSN may name its password through an
environment variable (``dsn_env``), and every repr masks it. Errors name the
TOML key at fault and the fix.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from replicator.errors import ConfigError
from replicator.mapping.config import EntitySettings, SyncSettings, check_entities

_IDENT = r"^[a-z_][a-z0-9_]{0,62}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _mask(dsn: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)


class Database(_Frozen):
    """A PostgreSQL connection: ``dsn`` in the file or ``dsn_env`` naming a variable."""

    dsn: str | None = None
    dsn_env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Database:
        if not self.dsn and not self.dsn_env:
            raise ValueError("set dsn, or dsn_env naming an environment variable")
        return self

    def resolve(self) -> str:
        if self.dsn_env:
            value = os.environ.get(self.dsn_env)
            if not value:
                raise ConfigError(
                    f"environment variable {self.dsn_env!r} is empty; export it with "
                    "the database's connection string"
                )
            return value
        assert self.dsn is not None
        return self.dsn

    def __repr__(self) -> str:
        shown = _mask(self.dsn) if self.dsn else f"${self.dsn_env}"
        return f"Database({shown})"

    __str__ = __repr__


class ErpSettings(_Frozen):
    database: Database
    stream: str = Field("erp", pattern=_IDENT)
    publication: str = Field("replicator_pub", pattern=_IDENT)
    slot: str = Field("replicator_slot", pattern=_IDENT)
    tables: tuple[str, ...] = ()  # empty: every table (FOR ALL TABLES)
    create_publication: bool = True
    heartbeat_seconds: float = Field(10.0, gt=0)
    status_interval_seconds: float = Field(10.0, gt=0)
    origin: str = Field("replicator", pattern=_IDENT)  # our own write-backs


class SalesforceSettings(_Frozen):
    """The org: where to log in, who, and which objects to mirror."""

    login_url: str = "https://login.salesforce.com"
    grant: Literal["password", "refresh_token", "jwt", "client_credentials"] = (
        "password"
    )
    client_id: str
    client_secret_env: str | None = None
    username: str | None = None
    password_env: str | None = None  # the password with the security token appended
    refresh_token_env: str | None = None
    private_key_file: str | None = None  # for the JWT bearer flow
    api_version: str = Field("60.0", pattern=r"^\d+\.0$")
    objects: tuple[str, ...] = ("Account",)
    client_name: str = Field("replicator", pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    stream_prefix: str = Field("sf", pattern=_IDENT)
    long_poll_timeout_seconds: float = Field(110.0, gt=0)
    skew_seconds: float = Field(
        300.0, ge=0
    )  # margin for catch-up queries by SystemModstamp
    settle_ms: int = Field(50, ge=0)  # quiet time that ends a transaction's events

    def secret(self, env: str | None, what: str) -> str | None:
        if env is None:
            return None
        value = os.environ.get(env)
        if not value:
            raise ConfigError(
                f"environment variable {env!r} ({what}) is empty; export it"
            )
        return value


class ApplySettings(_Frozen):
    batch_changes: int = Field(20_000, ge=1, le=1_000_000)
    queue_chunks: int = Field(32, ge=1)


class DaemonSettings(_Frozen):
    """Lifecycle of ``replicator run``: shutdown deadline and the instance lock."""

    shutdown_seconds: float = Field(30.0, gt=0)  # drain deadline after SIGTERM/SIGINT
    lock: bool = True  # one active instance per config (advisory lock on the replica)
    lock_name: str | None = None  # default: derived from the configured streams
    lock_check_seconds: float = Field(2.0, gt=0)  # probe of the lock's connection
    on_lost_lock: Literal["standby", "exit"] = "standby"  # exit: code 3


class OpsSettings(_Frozen):
    """The operations endpoint, metrics sampling and state-change notices."""

    listen: str = Field("", pattern=r"^(\[[0-9a-fA-F:]+\]|[^:\s]*):\d{1,5}$|^$")
    sample_seconds: float = Field(2.0, gt=0)  # how often stats and the replica are read
    lag_budget_seconds: float = Field(60.0, gt=0)  # /readyz fails past it
    webhook_url_env: str | None = None  # variable holding the URL (it may hold a token)
    webhook_timeout_seconds: float = Field(5.0, gt=0)
    dead_letter_threshold: int = Field(1, ge=1)  # a notice when parked letters reach it
    # audit rows, checkpoint history and done outbox rows older than this are pruned
    audit_retention_days: float = Field(90.0, gt=0)


class Settings(_Frozen):
    replica: Database
    erp: ErpSettings | None = None
    salesforce: SalesforceSettings | None = None
    apply: ApplySettings = ApplySettings()
    daemon: DaemonSettings = DaemonSettings()
    ops: OpsSettings = OpsSettings()
    sync: SyncSettings = SyncSettings()
    entities: tuple[EntitySettings, ...] = ()

    @field_validator("entities")
    @classmethod
    def _entities_apart(
        cls, entities: tuple[EntitySettings, ...]
    ) -> tuple[EntitySettings, ...]:
        problems = check_entities(entities)
        if problems:
            raise PydanticCustomError("mapping", "; ".join(problems))
        return entities


def _describe(error: Mapping[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "mapping":  # the message names the key and the fix itself
        return f"{key}: {error['msg']}"
    if kind == "missing":
        return f"{key}: required key is missing; add it to the config file"
    if kind == "extra_forbidden":
        return f"{key}: unknown key; remove it or check its spelling"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def parse(data: dict[str, Any]) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(e) for e in exc.errors())) from None


def load(path: str | Path) -> Settings:
    """Read and validate the TOML file at ``path``."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"config file {str(path)!r} does not exist; pass --config "
            "with the path of a TOML file (see config/replicator.toml)"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"config file {str(path)!r} cannot be read: {exc.strerror}; pass the path "
            "of a readable TOML file"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not valid TOML: {exc}"
        ) from None
    return parse(data)
