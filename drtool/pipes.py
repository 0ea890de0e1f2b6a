"""The one pipe relay for tool-to-tool streams (``zfs send | zfs receive``, ``rbd
export-diff | rbd import-diff``): each side runs through ``exec.run`` in its own
thread on an OS pipe, and the caller's thread moves the bytes between the two pipes
(splice(2): they stay in the kernel), counting them for progress. When the reader
dies the relay stops (EPIPE ends the writer, as in a shell pipeline); when the writer
ends, the reader gets EOF."""
from __future__ import annotations

import contextlib
import fcntl
import os
import select
import threading
import time
from typing import Any, Callable

CHUNK = 1 << 20
ProgressFn = Callable[[dict[str, Any]], None]


def pipe() -> tuple[int, int]:
    """An OS pipe with 1 MiB buffers where the kernel allows (fewer wake-ups per MB)."""
    r, w = os.pipe()
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, CHUNK)
    return r, w


def side(box: dict[str, Any], key: str, fd: int, fn: Callable[[], Any], *, name: str = "pipe") -> threading.Thread:
    """Run one side of a pipeline in a thread: ``box[key]`` gets its result (or the
    exception, for the caller to re-raise); our copy of its pipe end closes when it ends."""
    def run() -> None:
        try:
            box[key] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller's thread
            box[key] = e
        finally:
            os.close(fd)

    thread = threading.Thread(target=run, name=f"{name}-{key}", daemon=True)
    thread.start()
    return thread


def relay(src: int, dst: int, producer: threading.Thread, progress: ProgressFn | None, start: float) -> tuple[int, bool]:
    """Move pipe to pipe until EOF -> (bytes, False), or until the reader of ``dst`` is
    gone -> (bytes, True). Also stops once the producer's command has ended while the
    pipe stays open (a daemon, such as zfs-fuse's, may hold the write end)."""
    sent, last = 0, start
    while True:
        if not select.select([src], [], [], 1.0)[0]:
            if not producer.is_alive():
                return sent, False
            continue
        try:
            n = move(src, dst)
        except BrokenPipeError:
            return sent, True
        if not n:
            return sent, False
        sent += n
        if progress and (now := time.monotonic()) - last >= 0.5:
            last = now
            report(progress, sent, now - start)


def move(src: int, dst: int) -> int:
    """Move up to 1 MiB from pipe to pipe: in the kernel (splice(2)) where Python has it."""
    if hasattr(os, "splice"):
        return os.splice(src, dst, CHUNK)
    view = memoryview(chunk := os.read(src, CHUNK))
    while view:
        view = view[os.write(dst, view):]
    return len(chunk)


def report(progress: ProgressFn | None, sent: int, elapsed: float) -> None:
    """Call ``progress`` with {bytes, elapsed_s, bytes_per_s}; a failing callback never breaks a stream."""
    if progress is None:
        return
    try:
        progress({"bytes": sent, "elapsed_s": elapsed, "bytes_per_s": sent / elapsed if elapsed > 0 else 0.0})
    except Exception:  # noqa: BLE001
        pass
