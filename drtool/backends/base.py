"""Backend Protocols and the data they exchange.

A backend is one module implementing one or more small Protocols; the registry
in ``drtool/backends/__init__.py`` maps a location type to its factory, one line
per backend (STYLE #3). The conformance suite for each Protocol lives in
``tests/conformance/`` and runs against every backend that claims it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RecoveryPoint:
    """One restorable thing at a location, as read from the real system."""

    id: str
    time: datetime  # aware, UTC
    location: str
    policy: str | None = None
    leg: str | None = None
    size_bytes: int | None = None
    paths: tuple[str, ...] = ()
    checksum: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "time": self.time.isoformat(),
            "location": self.location,
            "policy": self.policy,
            "leg": self.leg,
            "size_bytes": self.size_bytes,
            "paths": list(self.paths),
            "checksum": self.checksum,
            "meta": self.meta,
        }


@dataclass
class BackupResult:
    point: RecoveryPoint
    bytes_processed: int | None
    bytes_added: int | None
    files: int | None
    warnings: list[str] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class CheckResult:
    ok: bool
    level: str
    message: str
    detail: dict[str, Any] = field(default_factory=dict)
    commands: list[dict[str, Any]] = field(default_factory=list)


@runtime_checkable
class Repository(Protocol):
    """A store of recovery points made by copying files into it (restic, …)."""

    name: str

    def ensure_ready(self, *, create: bool) -> None:
        """Check the repository is reachable and unlocked; initialise it when ``create``."""

    def backup(self, paths: list[str], *, policy: str, leg: str, excludes: Iterable[str] = (), progress: ProgressFn | None = None) -> BackupResult: ...

    def list_points(self, *, policy: str | None = None, leg: str | None = None) -> list[RecoveryPoint]: ...

    def check(self, *, read_data_percent: float) -> CheckResult: ...

    def restore(self, point_id: str, target: str, *, include: Iterable[str] = (), verify: bool = False, progress: ProgressFn | None = None) -> None: ...

    def read_file(self, point_id: str, path: str, on_chunk: Callable[[bytes], None]) -> None:
        """Stream one file of a point to ``on_chunk`` (for sample verification)."""

    def forget(self, point_ids: list[str]) -> None:
        """Delete these points and reclaim their space. Only ever given drtool-owned ids."""
