"""Helpers shared by the test services: free ports, process liveness, log tails."""
from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

from drtool.exec import pid_alive as alive

__all__ = ["alive", "free_port", "log_tail", "stop_process"]


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


def stop_process(proc: subprocess.Popen | None, timeout: float) -> None:
    """SIGTERM, SIGKILL after ``timeout``, then wait until /proc says it is gone."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    deadline = time.monotonic() + timeout
    while alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
