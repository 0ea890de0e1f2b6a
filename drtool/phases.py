"""Run phases (DESIGN.md): pending → running → succeeded | partially_failed | failed,
plus skipped (lock held). Kept apart from the catalog so that code which only
needs the names does not import SQLAlchemy."""
from __future__ import annotations

from enum import Enum


class RunPhase(str, Enum):
    pending = "pending"
    running = "running"
    succeeded = "succeeded"
    partially_failed = "partially_failed"
    failed = "failed"
    skipped = "skipped"

    def __str__(self) -> str:  # "succeeded", not "RunPhase.succeeded"
        return self.value

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_PHASES


TERMINAL_PHASES = frozenset({RunPhase.succeeded, RunPhase.partially_failed, RunPhase.failed, RunPhase.skipped})
