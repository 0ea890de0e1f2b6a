"""Run one policy leg: lock → check source → backend op → record.

Also the shared pieces the other commands use: the ``Context``, run records and
the inventory. Verification is in ``verify.py``, prune in ``prune.py``, restore
in ``restore.py``. A failing leg records its error and never deletes anything.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .backends import repository_for
from .backends.base import RecoveryPoint, Repository
from .errors import DrtoolError, LockHeld
from .exec import pid_alive
from .locks import leg_lock
from .phases import RunPhase
from .policy.loader import Config
from .policy.models import Leg, Policy
from .secrets import mask
from .ui import UI

if TYPE_CHECKING:
    from .catalog import Catalog

log = logging.getLogger("drtool.engine")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


_background = threading.local()  # .thread: set in threads whose wait for the catalog must not hurry its warm-up


class _Background:
    """A thread's CPU priority, lowered while its work can wait (Linux keeps a nice value
    per thread) and raised back once someone waits for it. Raising it needs the right
    to (root, or RLIMIT_NICE); without it the thread finishes at the low priority."""

    LOW = 19

    def __init__(self) -> None:
        self._tid: int | None = None
        self._nice = 0
        self._mutex = threading.Lock()

    def start(self) -> None:
        """In the thread: drop to the lowest priority."""
        if not sys.platform.startswith("linux"):  # elsewhere a thread id is no PRIO_PROCESS target
            return
        try:
            tid = threading.get_native_id()
            self._nice = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, max(self._nice, self.LOW))
        except (AttributeError, OSError):  # not Linux-like: it just runs at the process's priority
            return
        with self._mutex:
            self._tid = tid

    def hurry(self) -> None:
        """From a thread that waits for the work: back to the priority it started with."""
        with self._mutex:
            if self._tid is None or self._tid == threading.get_native_id():
                return
            tid, self._tid = self._tid, None
        try:
            os.setpriority(os.PRIO_PROCESS, tid, self._nice)
        except OSError:  # EPERM/EACCES: no right to raise it; ESRCH: it just ended
            pass

    def done(self) -> None:
        with self._mutex:
            self._tid = None


@dataclass
class Context:
    """What a command works with. The catalog opens on first use: importing SQLAlchemy
    and checking the schema take ~0.6 s, which ``run_leg`` spends while restic is
    already reading the source."""

    cfg: Config
    state_dir: Path
    ui: UI
    clock: Callable[[], datetime] = utcnow
    repo_factory: Callable[[str, Any], Repository] = repository_for
    catalog_url: str | None = None
    force: bool = False  # `drtool run --force`: allow a leg to overwrite a diverged target (zfs receive -F)
    force_sync: bool = False  # `drtool run --force-sync`: a parity leg syncs past its deletion/update thresholds
    _catalog: "Catalog | None" = None
    _backends: dict[str, Any] = field(default_factory=dict)
    _catalog_lock: threading.RLock = field(default_factory=threading.RLock)  # reap_orphan_runs re-enters
    _warming: "_Background | None" = None
    _warm_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def catalog(self) -> "Catalog":
        if self._catalog is None and self._warming is not None and not getattr(_background, "thread", False):
            self._warming.hurry()  # work waits for it now: it must not wait for idle cores any more
        with self._catalog_lock:
            if self._catalog is None:
                from .catalog import Catalog

                catalog = Catalog.open(self.catalog_url)
                self._catalog = catalog
                try:
                    reap_orphan_runs(self)
                except BaseException:
                    self._catalog = None
                    raise
        return self._catalog

    def warm_catalog(self) -> None:
        """Open the catalog in a background thread (importing SQLAlchemy and opening the
        database take ~0.5 s of CPU) while a tool works. Call it when the caller is about
        to wait for that tool: the import holds the GIL, so beside Python work of our own
        it only takes turns with it. The thread runs at the lowest CPU priority until
        something waits for the catalog, so it takes idle cycles instead of the tool's
        (a restic restore left a third of two cores idle, and lost 0.2 s when the import
        competed for them). A failure here is raised again by the first real use."""
        with self._warm_lock:
            if self._warming is not None or self._catalog is not None:
                return
            warming = self._warming = _Background()

        def warm() -> None:
            _background.thread = True
            warming.start()
            try:
                self.catalog
            except Exception:  # noqa: BLE001 - reported by the first real use
                pass
            finally:
                warming.done()

        threading.Thread(target=warm, name="catalog-warmup", daemon=True).start()

    def now(self) -> datetime:
        return self.clock()

    def backend(self, key: str, factory: Callable[[], Any]) -> Any:
        """One backend object per key for the whole command (command logs, cached features)."""
        if key not in self._backends:
            self._backends[key] = factory()
        return self._backends[key]

    def repo(self, location: str) -> Repository:
        return self.backend(f"repo:{location}", lambda: self.repo_factory(location, self.cfg.location(location)))


@dataclass
class LegResult:
    policy: str
    leg: str
    kind: str
    location: str | None
    phase: str
    message: str
    point: str | None = None
    bytes_processed: int | None = None
    duration_s: float | None = None
    warnings: list[str] = field(default_factory=list)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- run


def reap_orphan_runs(ctx: Context) -> int:
    """Runs left 'running' by a drtool on this host that died (SIGKILL, power loss)
    are closed as failed, so history never shows a run that is still going."""
    import socket

    host = socket.gethostname()
    n = 0
    for run in ctx.catalog.runs(limit=200):
        if run.phase == RunPhase.running.value and run.host == host and run.pid != os.getpid() and not pid_alive(run.pid):
            ctx.catalog.finish_run(run, RunPhase.failed, now=ctx.now(), errors=[f"interrupted: drtool process {run.pid} died before the run finished"])
            log.warning("run %s (%s/%s) was interrupted: PID %s died; recorded as failed", run.uuid[:8], run.policy, run.leg, run.pid)
            n += 1
    return n


class _RunRecord:
    """One catalog run, recorded without holding up the work: ``start()`` writes the
    "running" record from a background thread (the catalog may still be opening), so
    the backend's tool starts at once; ``finish()`` waits for that record, then closes
    it with the true start time."""

    def __init__(self, ctx: Context, kind: str, policy: Policy, leg: Leg, started: datetime) -> None:
        self.ctx, self.kind, self.policy, self.leg, self.started = ctx, kind, policy, leg, started
        self.run: Any = None
        self._starter: threading.Thread | None = None

    def _create(self) -> None:
        _background.thread = True
        try:
            self._create_now()
        except Exception:  # noqa: BLE001 - finish() records the run itself, or raises there
            log.debug("could not record the start of the run yet", exc_info=True)

    def start(self) -> None:
        """The backend's tool is working: open the catalog meanwhile (at idle priority,
        see ``Context.warm_catalog``) and write the "running" record."""
        if self.run is None and self._starter is None:
            self.ctx.warm_catalog()
            self._starter = threading.Thread(target=self._create, name="run-record", daemon=True)
            self._starter.start()

    def finish(self, phase: RunPhase, **kw: Any) -> None:
        catalog = self.ctx.catalog  # waited for here, in the caller's thread: that hurries its warm-up
        if self._starter is not None:
            self._starter.join()
        if self.run is None:
            self._create_now()
        catalog.finish_run(self.run, phase, now=self.ctx.now(), **kw)

    def _create_now(self) -> None:
        self.run = self.ctx.catalog.start_run(self.kind, policy=self.policy.name, leg=self.leg.leg_name, leg_kind=self.leg.kind,
                                              location=self.leg.to, now=self.started)


def run_leg(ctx: Context, policy: Policy, leg: Leg, *, dry_run: bool = False) -> LegResult:
    from .legs import driver_for

    name = leg.leg_name
    res = LegResult(policy.name, name, leg.kind, leg.to, "pending", "", dry_run=dry_run)
    try:
        driver = driver_for(ctx, policy, leg)
        if dry_run:
            res.phase, res.message = "planned", driver.describe()
            return res
    except DrtoolError as exc:
        res.phase, res.message = RunPhase.failed.value, str(exc)
        return res

    started = ctx.now()
    rec = _RunRecord(ctx, "leg", policy, leg, started)
    try:
        with leg_lock(ctx.state_dir, policy.name, name):
            out = driver.run(rec)
    except LockHeld as exc:  # our leg lock, or the backend's held by a live process
        rec.finish(RunPhase.skipped, warnings=[str(exc)], command_log=driver.commands())
        res.phase, res.message = RunPhase.skipped.value, str(exc)
        return res
    except DrtoolError as exc:
        rec.finish(RunPhase.failed, errors=[str(exc)], command_log=driver.commands(), detail=exc.detail)
        res.phase, res.message = RunPhase.failed.value, str(exc)
        return res
    except Exception as exc:  # internal error: still record the run as failed
        rec.finish(RunPhase.failed, errors=[mask(f"internal error: {type(exc).__name__}: {exc}")], command_log=driver.commands())
        raise
    except BaseException:  # SIGINT/SIGTERM: stop the children (restic removes its lock), record, re-raise
        from . import exec as ex

        ex.terminate_all()
        rec.finish(RunPhase.failed, errors=["interrupted by a signal; nothing was deleted"], command_log=driver.commands())
        raise
    phase = RunPhase.partially_failed if out.errors else RunPhase.succeeded
    rec.finish(phase, bytes_processed=out.bytes_processed, recovery_point=out.point.id, warnings=out.warnings,
               errors=out.errors, command_log=driver.commands(), detail=out.detail)
    res.phase = phase.value
    res.point, res.bytes_processed, res.warnings, res.message = out.point.id, out.bytes_processed, out.warnings, out.message
    res.duration_s = (ctx.now() - started).total_seconds()
    return res


def _point_row(p: RecoveryPoint) -> dict[str, Any]:
    return {"point_id": p.id, "policy": p.policy, "leg": p.leg, "time": p.time, "size_bytes": p.size_bytes, "checksum": p.checksum,
            "meta": {**p.meta, "paths": list(p.paths)}}


# --------------------------------------------------------------------------- inventory


def inventory(ctx: Context, location: str | None = None) -> dict[str, dict[str, Any]]:
    """Read recovery points from the real systems and refresh the catalog cache.

    A location is listed through the legs that keep points there."""
    from .legs import driver_for, supported

    drivers: dict[str, Any] = {}
    for pol in ctx.cfg.policies.values():
        for leg in pol.legs:
            where = leg.to or pol.source.location
            if (location is None or where == location) and where not in drivers and supported(ctx, pol, leg):
                drivers[where] = driver_for(ctx, pol, leg)
    if location is not None:
        ctx.cfg.location(location)  # unknown names are a usage error
    out: dict[str, dict[str, Any]] = {}
    for name, driver in drivers.items():
        try:
            points = driver.location_points()
            ctx.catalog.upsert_points(name, [_point_row(p) for p in points], now=ctx.now())
            out[name] = {"points": points, "error": None}
        except DrtoolError as exc:
            out[name] = {"points": [], "error": str(exc)}
    return out
