"""A throwaway PostgreSQL server for tests, run as a plain local process.

``PostgresServer.start()`` runs ``initdb`` into a fresh temp dir and starts
``postgres`` listening on 127.0.0.1 only (free port, unix socket inside the
temp dir), waits until psycopg can connect, and ``stop()`` shuts it down with
``pg_ctl stop -m fast`` and removes the temp dir.  As root (initdb refuses to
run as root) every server command runs as user ``postgres`` via ``runuser``.

The server is tuned for tests, not durability (fsync off, cluster on tmpfs
``/dev/shm`` when there is one: CREATE DATABASE drops from ~0.1-0.4 s on disk
to ~0.02 s): start it once per test session and hand out a fresh database per
test with :meth:`PostgresServer.create_database`.
"""
from __future__ import annotations

import atexit
import glob
import os
import pwd
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from services.common import LoggedService, alive, free_port

__all__ = ["PostgresServer", "PostgresUnavailable", "find_bindir"]

READY_TIMEOUT_S = 20.0
SERVICE_USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot run here (binaries, psycopg or the service user missing)."""


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` that has initdb, pg_ctl and postgres."""
    def major(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return -1.0

    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True):
        if all(os.access(Path(cand) / exe, os.X_OK) for exe in ("initdb", "pg_ctl", "postgres")):
            return Path(cand)
    return None


def _scratch_parent() -> str | None:
    """Where the cluster's temp dir goes: tmpfs ``/dev/shm`` if usable, else the default."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return None




class PostgresServer(LoggedService):
    """One PostgreSQL cluster in a temp dir; see the module docstring."""

    LOG_NAME = "postgres.log"

    def __init__(self, bindir: Path | None = None) -> None:
        bindir = bindir or find_bindir()
        if bindir is None:
            raise PostgresUnavailable("no /usr/lib/postgresql/*/bin with initdb, pg_ctl and postgres")
        try:
            import psycopg  # noqa: F401
        except ImportError as e:
            raise PostgresUnavailable(f"psycopg is not installed ({e}); pip install -e '.[test]'") from e
        self.bindir = bindir
        self._as_root = os.geteuid() == 0
        if self._as_root:
            try:
                pwd.getpwnam(SERVICE_USER)
            except KeyError as e:
                raise PostgresUnavailable(f"running as root but there is no {SERVICE_USER!r} user") from e
        self.port: int | None = None

    # -- paths / commands ---------------------------------------------------- #

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    def _cmd(self, exe: str, *args: str) -> list[str]:
        argv = [str(self.bindir / exe), *args]
        if self._as_root:
            return ["runuser", "-u", SERVICE_USER, "--", *argv]
        return argv

    def log_tail(self, n: int = 30) -> str:
        return super().log_tail(n)

    # -- lifecycle ----------------------------------------------------------- #

    def start(self) -> PostgresServer:
        self.root = Path(tempfile.mkdtemp(prefix="drtool-pg-", dir=_scratch_parent()))
        atexit.register(self.stop)
        try:
            if self._as_root:
                pw = pwd.getpwnam(SERVICE_USER)
                os.chown(self.root, pw.pw_uid, pw.pw_gid)
            subprocess.run(
                self._cmd("initdb", "-D", str(self.data_dir), "-U", "postgres", "-A", "trust",
                          "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"),
                cwd=self.root, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                check=True, timeout=120,
            )
            for _ in range(3):  # the free port can be taken before postgres binds it
                if self._launch():
                    return self
                if "could not bind" not in self.log_tail(20):
                    break
            raise RuntimeError(f"PostgreSQL did not become ready on 127.0.0.1:{self.port}\n{self.log_tail()}")
        except subprocess.CalledProcessError as e:
            self.stop()
            raise RuntimeError(f"initdb failed (exit {e.returncode}):\n{e.stdout}\n{e.stderr}") from e
        except BaseException:
            self.stop()
            raise

    def _launch(self) -> bool:
        """Start postgres on a fresh free port; True once it accepts connections."""
        self._reap()
        self.port = free_port()
        self._popen(self._cmd(
            "postgres", "-D", str(self.data_dir),
            "-h", "127.0.0.1", "-p", str(self.port), "-k", str(self.root),
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=100", "-c", "logging_collector=off",
        ))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:  # we are the parent: poll() reaps, no zombie doubt
                return False
            try:
                self.connect(connect_timeout=2).close()
                return True
            except Exception:
                time.sleep(0.05)
        return False

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError, AssertionError):
            return None

    def _reap(self) -> None:
        """Make sure no postgres of ours is left running (after a failed launch)."""
        pid = self._postmaster_pid()
        if pid is not None and alive(pid):
            self._pg_ctl_stop()
            if alive(pid):
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown; children follow
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None

    def _pg_ctl_stop(self) -> None:
        subprocess.run(
            self._cmd("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "20"),
            cwd=self.root, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
        )

    def _stop_proc(self) -> None:
        """``pg_ctl stop -m fast``, then make sure nothing of ours is left."""
        if self.root is None:
            return
        if self.proc is not None and self.proc.poll() is None:
            self._pg_ctl_stop()
        self._reap()

    # -- use ----------------------------------------------------------------- #

    def connect(self, dbname: str = "postgres", **kw):
        """A psycopg connection (autocommit) as the superuser ``postgres``."""
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres",
                               dbname=dbname, autocommit=True, **kw)

    def url(self, dbname: str = "postgres") -> str:
        """SQLAlchemy URL of ``dbname`` on this server."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (random name by default); return its SQLAlchemy URL."""
        name = name or f"t_{uuid.uuid4().hex[:16]}"
        with self.connect() as conn:
            # FILE_COPY (PostgreSQL 15+) copies template1's files instead of
            # WAL-logging every block: faster for a tiny template without fsync.
            strategy = " STRATEGY FILE_COPY" if conn.info.server_version >= 150000 else ""
            conn.execute(f'CREATE DATABASE "{name}"{strategy}')
        return self.url(name)

    def drop_database(self, name_or_url: str) -> None:
        """Drop a database, disconnecting any sessions still on it."""
        name = name_or_url.rsplit("/", 1)[-1]
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
