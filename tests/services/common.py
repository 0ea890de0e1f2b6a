"""Helpers shared by the test services: free ports, process liveness, log tails, and
``LoggedService``, the lifecycle every process-based service shares."""
from __future__ import annotations

import atexit
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from drtool.exec import pid_alive as alive

__all__ = ["LoggedService", "alive", "free_port", "log_tail", "stop_process"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path | None, n: int = 20) -> str:
    try:
        assert path is not None
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except (OSError, AssertionError):
        return "(no log)"


def stop_process(proc: subprocess.Popen | None, timeout: float, sig: int = signal.SIGTERM) -> None:
    """``sig`` (SIGTERM), SIGKILL after ``timeout``, then wait until /proc says it is gone."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)


class LoggedService:
    """One server process living in its own temp dir ``root``, its output in
    ``root/LOG_NAME``. Subclasses set ``root`` in ``start()`` and start the process with
    ``_popen``; ``stop()`` is idempotent: it ends the process (``_stop_proc``, which a
    subclass may override), closes the log and removes the dir."""

    LOG_NAME = "service.log"
    STOP_TIMEOUT_S = 10.0
    STOP_SIGNAL = signal.SIGTERM
    root: Path | None = None
    proc: subprocess.Popen | None = None
    _log: Any = None

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "start() first"
        return self.root / self.LOG_NAME

    def log_tail(self, n: int = 20) -> str:
        return log_tail(self.log_path if self.root is not None else None, n)

    def _popen(self, argv: list[str], **kw: Any) -> subprocess.Popen:
        """Start ``argv`` in ``root``, output appended to the log, in its own session."""
        if self._log is not None:
            self._log.close()
        self._log = open(self.log_path, "ab")
        kw.setdefault("cwd", self.root)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, **kw)
        return self.proc

    def _stop_proc(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, self.STOP_TIMEOUT_S, self.STOP_SIGNAL)

    def stop(self) -> None:
        atexit.unregister(self.stop)
        try:
            self._stop_proc()
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def __enter__(self) -> Any:
        return self.start()  # type: ignore[attr-defined]

    def __exit__(self, *exc: object) -> None:
        self.stop()
