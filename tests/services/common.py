"""Helpers shared by the test services: free ports, process liveness, log tails."""
from __future__ import annotations

import socket
from pathlib import Path

from drtool.exec import pid_alive as alive

__all__ = ["alive", "free_port", "log_tail"]


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
