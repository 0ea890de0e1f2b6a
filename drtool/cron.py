"""croniter, imported without the process it starts at import time.

croniter asks ``platform.architecture()`` whether the interpreter is 32-bit when it is
imported, and that runs ``file -b`` on the interpreter: a fork, plus a read of the
magic database (several MB from a cold page cache) at the start of every drtool
command. The pointer size, which croniter also checks, answers the same question.
"""
from __future__ import annotations

import platform
import struct


def _architecture(*_a: object, **_k: object) -> tuple[str, str]:
    return f"{struct.calcsize('P') * 8}bit", "ELF"


_saved = platform.architecture
platform.architecture = _architecture  # type: ignore[assignment]  # only while croniter's module body runs
try:
    from croniter import croniter
finally:
    platform.architecture = _saved  # type: ignore[assignment]

__all__ = ["croniter"]
