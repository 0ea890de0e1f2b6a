"""A real zfs-fuse daemon for the test session, and throwaway pools on file vdevs.

zfs-fuse is one daemon per machine (fixed socket ``/var/run/zfs/zfs_socket``), so
``ZfsFuse.start()`` reuses a daemon that already answers ``zpool list`` (and then
never stops it); otherwise it starts ``zfs-fuse --no-daemon --no-kstat-mount -m 128``
as a plain process, waits until ``zpool list`` works, and ``stop()`` ends it
(SIGTERM, SIGKILL fallback; it takes ~4.5 s to exit) unless pools it did not make
remain (another test session is using the daemon).

``make_pool(prefix)`` creates a pool named ``<prefix>-dt<PID>-<random>`` on a
sparse file, ``cachefile=none`` (never remembered by the daemon), mounted under
this session's temp dir, so nothing lands in ``/``. ``stop()`` destroys every pool
it made and removes the temp dir. Pools left behind by a crashed session are
recognised by that name pattern and destroyed at start once their PID is dead.
"""
from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from services.common import alive, log_tail, stop_process

__all__ = ["ZfsFuse", "ZfsUnavailable"]

READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
CMD_TIMEOUT_S = 60.0
_OURS = re.compile(r"^.+-dt(\d+)-[0-9a-f]{6}$")  # <prefix>-dt<PID>-<random>


class ZfsUnavailable(RuntimeError):
    """zfs-fuse cannot run here (binaries, root or /dev/fuse missing, or it failed to start)."""



def _destroy_pool(name: str, check: bool = False) -> None:
    """``zpool destroy -f``, retried: zfs-fuse answers "pool is busy" for a moment
    after recent I/O on a mount."""
    deadline = time.monotonic() + 5.0
    while True:
        res = _cmd("zpool", "destroy", "-f", name, check=False)
        if res.returncode == 0 or "busy" not in res.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if check and res.returncode != 0:
        raise RuntimeError(f"zpool destroy -f {name} exited {res.returncode}: {res.stderr.strip()}")


def _cmd(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
    return res


class ZfsFuse:
    """The session's zfs-fuse daemon and the pools made through it."""

    def __init__(self) -> None:
        missing = [t for t in ("zfs-fuse", "zfs", "zpool") if shutil.which(t) is None]
        if missing:
            raise ZfsUnavailable(f"{', '.join(missing)} not on PATH (apt-get install zfs-fuse)")
        if os.geteuid() != 0:
            raise ZfsUnavailable("zfs-fuse needs root")
        if not os.path.exists("/dev/fuse"):
            raise ZfsUnavailable("/dev/fuse is missing")
        self.root: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.pools: list[str] = []
        self._log = None

    # -- lifecycle ----------------------------------------------------------- #

    @staticmethod
    def answering() -> bool:
        try:
            return _cmd("zpool", "list", "-H", "-o", "name", check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    @property
    def started_daemon(self) -> bool:
        return self.proc is not None

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "zfs-fuse.log"

    def log_tail(self, n: int = 20) -> str:
        return log_tail(self.log_path if self.root is not None else None, n)

    def start(self) -> ZfsFuse:
        self.root = Path(tempfile.mkdtemp(prefix="drtool-zfs-"))
        atexit.register(self.stop)
        try:
            if not self.answering():
                self._launch()
            self._destroy_leftovers()
            return self
        except BaseException:
            self.stop()
            raise

    def _launch(self) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["zfs-fuse", "--no-daemon", "--no-kstat-mount", "-m", "128"],
            cwd=self.root, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise ZfsUnavailable(f"zfs-fuse exited {code} at start: {self.log_tail()}")
            if self.answering():
                return
            time.sleep(0.05)
        self._stop_daemon()
        raise ZfsUnavailable(f"zfs-fuse did not answer `zpool list` within {READY_TIMEOUT_S}s: {self.log_tail()}")

    def _destroy_leftovers(self) -> None:
        """Pools named like ours whose creating process is dead (a crashed session)."""
        for name in _cmd("zpool", "list", "-H", "-o", "name").stdout.split():
            m = _OURS.match(name)
            if m and not alive(int(m.group(1))):
                _destroy_pool(name)

    def stop(self) -> None:
        """Destroy our pools, stop the daemon if we started it and nobody else uses it,
        remove the temp dir. Idempotent."""
        atexit.unregister(self.stop)
        if self.root is None:
            return
        try:
            for pool in reversed(self.pools):
                _destroy_pool(pool)
            self.pools.clear()
            if self.proc is not None:
                names = _cmd("zpool", "list", "-H", "-o", "name", check=False).stdout.split()
                if any(self._someone_elses(n) for n in names):  # leave the shared daemon running
                    self.proc = None
                else:
                    self._stop_daemon()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    @staticmethod
    def _someone_elses(pool: str) -> bool:
        """True for a pool another live session (or a person) uses. Pools of this
        process that would not go, and those of dead sessions, vanish with the
        daemon (``cachefile=none``)."""
        m = _OURS.match(pool)
        return m is None or (int(m.group(1)) != os.getpid() and alive(int(m.group(1))))

    def _stop_daemon(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, STOP_TIMEOUT_S)

    def __enter__(self) -> ZfsFuse:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- pools --------------------------------------------------------------- #

    def mountpoint(self, pool: str) -> Path:
        """Where ``pool`` is mounted; ``pool/ds`` mounts at ``mountpoint(pool) / "ds"``."""
        assert self.root is not None
        return self.root / "mnt" / pool

    def make_pool(self, name_prefix: str = "drtooltest", size_mb: int = 128) -> str:
        """Create a pool on a sparse file vdev; returns its unique name."""
        assert self.root is not None, "start() first"
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name_prefix):
            raise ValueError(f"bad pool name prefix {name_prefix!r}")
        name = f"{name_prefix}-dt{os.getpid()}-{secrets.token_hex(3)}"
        vdev = self.root / "vdev" / f"{name}.img"
        vdev.parent.mkdir(parents=True, exist_ok=True)
        with open(vdev, "wb") as f:
            f.truncate(size_mb * 1024 * 1024)
        self.mountpoint(name).parent.mkdir(parents=True, exist_ok=True)
        _cmd("zpool", "create", "-o", "cachefile=none", "-m", str(self.mountpoint(name)), name, str(vdev))
        self.pools.append(name)
        return name

    def destroy_pool(self, name: str) -> None:
        _destroy_pool(name, check=True)
        if name in self.pools:
            self.pools.remove(name)
