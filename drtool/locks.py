"""One host-local file lock per (policy, leg), so two runs never overlap.

flock(2) is released by the kernel when the holder dies, so a crashed or
SIGKILLed drtool never blocks the next run.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from .errors import LockHeld


@contextlib.contextmanager
def leg_lock(state_dir: str | os.PathLike, policy: str, leg: str) -> Iterator[Path]:
    d = Path(state_dir) / "locks"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{policy}--{leg}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 64, 0).decode().strip()
            raise LockHeld(f"policy {policy} leg {leg} is already running" + (f" (PID {holder})" if holder else "") + ": skipped") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield path
    finally:
        os.close(fd)
