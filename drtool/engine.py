"""Run one policy leg: lock → check source → backend op → record → (verify).

Each function returns a result object and records a Run in the catalog; a
failing leg records its error and never deletes anything.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from contextlib import nullcontext
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from . import manifest
from .backends import REPOSITORIES, repository_for
from .backends.base import RecoveryPoint, Repository
from .phases import RunPhase
from .durations import format_duration
from .errors import DrtoolError, LockHeld, SourceError
from .locks import leg_lock
from .policy.loader import Config
from .policy.models import VERIFY_LEVELS, Leg, Policy
from .policy.retention import PrunePlan, RetentionRules, plan_prune
from .secrets import mask
from .ui import UI

if TYPE_CHECKING:
    from .catalog import Catalog

log = logging.getLogger("drtool.engine")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


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
    _catalog: "Catalog | None" = None
    _repos: dict[str, Repository] = field(default_factory=dict)

    @property
    def catalog(self) -> "Catalog":
        if self._catalog is None:
            from .catalog import Catalog

            self._catalog = Catalog.open(self.catalog_url)
            reap_orphan_runs(self)
        return self._catalog

    def now(self) -> datetime:
        return self.clock()

    def repo(self, location: str) -> Repository:
        if location not in self._repos:
            self._repos[location] = self.repo_factory(location, self.cfg.location(location))
        return self._repos[location]


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


@dataclass
class VerifyResult:
    policy: str
    leg: str
    location: str
    level: str
    ok: bool
    message: str
    point: str | None = None
    skipped: bool = False
    checks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _commands(repo: Repository) -> list[dict[str, Any]]:
    cmds = getattr(repo, "commands", None)
    if cmds is None:
        return []
    out = list(cmds)
    cmds.clear()
    return out


# --------------------------------------------------------------------------- run


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def reap_orphan_runs(ctx: Context) -> int:
    """Runs left 'running' by a drtool on this host that died (SIGKILL, power loss)
    are closed as failed, so history never shows a run that is still going."""
    import socket

    host = socket.gethostname()
    n = 0
    for run in ctx.catalog.runs(limit=200):
        if run.phase == RunPhase.running.value and run.host == host and run.pid != os.getpid() and not _pid_alive(run.pid):
            ctx.catalog.finish_run(run, RunPhase.failed, now=ctx.now(), errors=[f"interrupted: drtool process {run.pid} died before the run finished"])
            log.warning("run %s (%s/%s) was interrupted: PID %s died; recorded as failed", run.uuid[:8], run.policy, run.leg, run.pid)
            n += 1
    return n


class _RunRecord:
    """One catalog run, created on first need: ``run_leg`` starts restic before the
    catalog is open, and records the run (with its true start time) meanwhile."""

    def __init__(self, ctx: Context, kind: str, policy: Policy, leg: Leg, started: datetime) -> None:
        self.ctx, self.kind, self.policy, self.leg, self.started = ctx, kind, policy, leg, started
        self.run: Any = None

    def start(self) -> Any:
        if self.run is None:
            self.run = self.ctx.catalog.start_run(self.kind, policy=self.policy.name, leg=self.leg.leg_name, leg_kind=self.leg.kind,
                                                  location=self.leg.to, now=self.started)
        return self.run

    def finish(self, phase: RunPhase, **kw: Any) -> None:
        self.ctx.catalog.finish_run(self.start(), phase, now=self.ctx.now(), **kw)


def run_leg(ctx: Context, policy: Policy, leg: Leg, *, dry_run: bool = False) -> LegResult:
    name = leg.leg_name
    res = LegResult(policy.name, name, leg.kind, leg.to, "pending", "", dry_run=dry_run)
    if leg.kind != "backup":
        res.phase, res.message = RunPhase.failed.value, f"{leg.kind} legs are not implemented in this drtool version"
        return res
    paths = policy.source.paths
    if dry_run:
        try:
            manifest.check_source(paths)
            res.phase = "planned"
            res.message = f"would back up {', '.join(paths)} to {leg.to} ({ctx.cfg.location(leg.to).repository})"  # type: ignore[arg-type,attr-defined]
        except SourceError as exc:
            res.phase, res.message = RunPhase.failed.value, str(exc)
        return res

    started = ctx.now()
    rec = _RunRecord(ctx, "leg", policy, leg, started)
    repo = ctx.repo(leg.to)  # type: ignore[arg-type]
    try:
        with leg_lock(ctx.state_dir, policy.name, name):
            out, sample = _backup(ctx, policy, leg, repo, rec)
    except LockHeld as exc:  # our leg lock, or restic's held by a live process
        rec.finish(RunPhase.skipped, warnings=[str(exc)], command_log=_commands(repo))
        res.phase, res.message = RunPhase.skipped.value, str(exc)
        return res
    except DrtoolError as exc:
        rec.finish(RunPhase.failed, errors=[str(exc)], command_log=_commands(repo))
        res.phase, res.message = RunPhase.failed.value, str(exc)
        return res
    except Exception as exc:  # internal error: still record the run as failed
        rec.finish(RunPhase.failed, errors=[mask(f"internal error: {type(exc).__name__}: {exc}")], command_log=_commands(repo))
        raise
    except BaseException:  # SIGINT/SIGTERM: stop restic (it removes its lock), record, re-raise
        from . import exec as ex

        ex.terminate_all()
        rec.finish(RunPhase.failed, errors=["interrupted by a signal; nothing was deleted"], command_log=_commands(repo))
        raise
    kept = manifest.still_valid(sample)
    warnings = list(out.warnings)
    if len(kept) < len(sample):
        warnings.append(f"{len(sample) - len(kept)} sampled file(s) changed during the backup and were left out of the manifest")
    detail = {"paths": paths, "files": out.files, "bytes_added": out.bytes_added, "manifest": [e.to_dict() for e in kept]}
    rec.finish(RunPhase.succeeded, bytes_processed=out.bytes_processed, recovery_point=out.point.id, warnings=warnings,
               command_log=_commands(repo), detail=detail)
    res.phase = RunPhase.succeeded.value
    res.point, res.bytes_processed, res.warnings = out.point.id, out.bytes_processed, warnings
    res.message = f"snapshot {out.point.id[:8]} of {out.files} files, {out.bytes_processed} bytes ({out.bytes_added} new)"
    res.duration_s = (ctx.now() - started).total_seconds()
    return res


def _backup(ctx: Context, policy: Policy, leg: Leg, repo: Repository, rec: _RunRecord) -> tuple[Any, list[manifest.Entry]]:
    paths = policy.source.paths
    manifest.check_source(paths)
    repo.ensure_ready(create=getattr(ctx.cfg.location(leg.to), "init", False))  # type: ignore[arg-type]
    with ctx.ui.task(f"{policy.name}/{leg.leg_name}: backup → {leg.to}") as task, ThreadPoolExecutor(1, thread_name_prefix="backup") as pool:
        def progress(msg: dict[str, Any]) -> None:
            task.update(completed=msg.get("bytes_done", 0), total=msg.get("total_bytes"))

        backup = pool.submit(repo.backup, paths, policy=policy.name, leg=leg.leg_name, excludes=leg.exclude, progress=progress)
        # While restic reads the source: hash a sample of files for the manifest (each
        # is re-checked unchanged after the backup), and open the catalog to record the run.
        sample = manifest.sample(paths, leg.verify.sample_files)
        rec.start()
        return backup.result(), sample


def _point_row(p: RecoveryPoint) -> dict[str, Any]:
    return {"point_id": p.id, "policy": p.policy, "leg": p.leg, "time": p.time, "size_bytes": p.size_bytes, "checksum": p.checksum,
            "meta": {**p.meta, "paths": list(p.paths)}}


# --------------------------------------------------------------------------- inventory


def inventory(ctx: Context, location: str | None = None) -> dict[str, dict[str, Any]]:
    """Read recovery points from the real systems and refresh the catalog cache."""
    names = [location] if location else [n for n, loc in ctx.cfg.locations.items() if getattr(loc, "type", None) in REPOSITORIES]
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        ctx.cfg.location(name)
        try:
            repo = ctx.repo(name)
            points = repo.list_points()
            ctx.catalog.upsert_points(name, [_point_row(p) for p in points], now=ctx.now())
            out[name] = {"points": points, "error": None}
        except DrtoolError as exc:
            out[name] = {"points": [], "error": str(exc)}
    return out


# --------------------------------------------------------------------------- verify


def _level_index(level: str) -> int:
    return VERIFY_LEVELS.index(level)


def verify_leg(ctx: Context, policy: Policy, leg: Leg, *, level: str | None = None) -> VerifyResult:
    level = level or leg.verify.level
    name = leg.leg_name
    res = VerifyResult(policy.name, name, leg.to or policy.source.location, level, False, "")
    if leg.kind != "backup":
        res.message, res.skipped = f"{leg.kind} legs cannot be verified by this drtool version", True
        return res
    started = ctx.now()
    run = ctx.catalog.start_run("verify", policy=policy.name, leg=name, leg_kind=leg.kind, location=leg.to, now=started)
    repo = ctx.repo(leg.to)  # type: ignore[arg-type]
    point: RecoveryPoint | None = None
    try:
        listing = repo.list_points()
        ctx.catalog.upsert_points(leg.to, [_point_row(p) for p in listing], now=ctx.now())  # type: ignore[arg-type]
        points = [p for p in listing if p.policy == policy.name and p.leg == name]
        if not points:
            raise DrtoolError(f"no recovery point of {policy.name}/{name} exists in {leg.to}")
        point = points[-1]
        res.point = point.id
        age = ctx.now() - point.time
        fresh = age <= policy.rpo_td
        res.checks.append({"level": "exists", "ok": fresh, "message": f"newest point {point.id[:8]} is {format_duration(age)} old (RPO {policy.rpo})" + ("" if fresh else ": older than the RPO")})
        if _level_index(level) >= _level_index("integrity"):
            chk = repo.check(read_data_percent=leg.verify.read_data_percent)
            res.checks.append({"level": "integrity", "ok": chk.ok, "message": chk.message, "detail": chk.detail})
        if _level_index(level) >= _level_index("sample"):
            res.checks.append(_verify_sample(ctx, policy, leg, repo, points, full=level == "full"))
        failed = [c for c in res.checks if not c["ok"]]
        res.ok = not failed
        res.message = "; ".join(c["message"] for c in (failed or res.checks))
        phase = RunPhase.succeeded if res.ok else RunPhase.failed
        ctx.catalog.finish_run(run, phase, now=ctx.now(), command_log=_commands(repo), errors=[c["message"] for c in failed],
                               detail={"level": level, "checks": res.checks}, recovery_point=point.id)
    except LockHeld as exc:
        ctx.catalog.finish_run(run, RunPhase.skipped, now=ctx.now(), warnings=[str(exc)], command_log=_commands(repo))
        res.message, res.skipped = str(exc), True
        return res
    except DrtoolError as exc:
        res.ok, res.message = False, str(exc)
        ctx.catalog.finish_run(run, RunPhase.failed, now=ctx.now(), errors=[str(exc)], command_log=_commands(repo))
    ctx.catalog.record_verification(
        run=run, policy=policy.name, leg=name, location=leg.to, point_id=point.id if point else "-", level=level, ok=res.ok,
        started_at=started, ended_at=ctx.now(), detail={"checks": res.checks}, message=res.message,
    )
    return res


def _manifest_for(ctx: Context, policy: Policy, leg: Leg, points: list[RecoveryPoint]) -> tuple[RecoveryPoint, list[dict[str, Any]]] | None:
    """The newest point that still exists and has a manifest recorded at backup time."""
    by_id = {p.id: p for p in points}
    for run in ctx.catalog.runs(policy=policy.name, kind="leg", limit=200):
        if run.leg == leg.leg_name and run.phase == RunPhase.succeeded.value and run.recovery_point in by_id:
            entries = (run.detail or {}).get("manifest") or []
            if entries:
                return by_id[run.recovery_point], entries
    return None


def _verify_sample(ctx: Context, policy: Policy, leg: Leg, repo: Repository, points: list[RecoveryPoint], *, full: bool) -> dict[str, Any]:
    level = "full" if full else "sample"
    found = _manifest_for(ctx, policy, leg, points)
    if found is None:
        return {"level": level, "ok": False, "message": f"no backup of {policy.name}/{leg.leg_name} recorded a manifest in this catalog: run a backup with drtool first"}
    point, entries = found
    if full:
        chosen = entries
    else:
        chosen = random.Random().sample(entries, min(leg.verify.sample_files, len(entries)))
    mismatches: list[str] = []
    scratch = Path(tempfile.mkdtemp(prefix="drtool-verify-", dir=ctx.state_dir))
    try:
        if full:
            with ctx.ui.task(f"{policy.name}/{leg.leg_name}: full restore of {point.id[:8]}"):
                repo.restore(point.id, str(scratch), verify=True)
            for e in chosen:
                restored = scratch / e["path"].lstrip("/")
                if not restored.is_file():
                    mismatches.append(f"{e['path']}: missing from the restore")
                elif manifest.hash_file(str(restored)) != e["blake3"]:
                    mismatches.append(f"{e['path']}: BLAKE3 differs from the backup-time hash")
        else:
            import blake3

            for e in chosen:
                h = blake3.blake3()
                try:
                    repo.read_file(point.id, e["path"], h.update)
                except DrtoolError as exc:
                    mismatches.append(f"{e['path']}: could not be restored: {exc}")
                    continue
                if h.hexdigest() != e["blake3"]:
                    mismatches.append(f"{e['path']}: BLAKE3 differs from the backup-time hash")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ok = not mismatches
    msg = (f"{level}: {len(chosen)} file(s) restored from {point.id[:8]} match their backup-time BLAKE3"
           if ok else f"{level}: {len(mismatches)} of {len(chosen)} file(s) from {point.id[:8]} do not match: " + "; ".join(mismatches[:5]))
    return {"level": level, "ok": ok, "message": msg, "point": point.id, "files": len(chosen), "mismatches": mismatches[:50]}


def verify_due(ctx: Context, policy: Policy, leg: Leg) -> bool:
    last = ctx.catalog.last_verification(policy.name, leg.leg_name, level_at_least=leg.verify.level)
    return last is None or ctx.now() - last.ended_at > leg.verify.every_td


# --------------------------------------------------------------------------- prune


@dataclass
class PruneResult:
    policy: str
    leg: str
    location: str
    plan: PrunePlan | None
    dry_run: bool
    ok: bool
    message: str
    removed: list[str] = field(default_factory=list)
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "plan"}
        d["plan"] = self.plan.to_dict() if self.plan else None
        return d


def prune_leg(ctx: Context, policy: Policy, leg: Leg, *, dry_run: bool) -> PruneResult:
    name = leg.leg_name
    out = PruneResult(policy.name, name, leg.to or policy.source.location, None, dry_run, False, "")
    if leg.kind != "backup":
        out.ok, out.message = True, f"{leg.kind} legs have nothing to prune in this drtool version"
        return out
    repo = ctx.repo(leg.to)  # type: ignore[arg-type]
    now = ctx.now()
    try:
        with (nullcontext() if dry_run else leg_lock(ctx.state_dir, policy.name, name)):
            # only points drtool made for this policy and leg are ever candidates
            points = [p for p in repo.list_points(policy=policy.name, leg=name) if p.meta.get("owned", True)]
            pins: dict[str, str] = {}
            verified = ctx.catalog.last_successful_verified_point(leg.to, policy=policy.name)  # type: ignore[arg-type]
            if verified:
                pins[verified] = "last verified point"
            rules = RetentionRules(**leg.retention.model_dump())
            plan = plan_prune(points, rules, pins, now)
            out.plan = plan
            ids = [d.point_id for d in plan.remove]
            if dry_run:
                out.ok, out.message = True, f"would remove {len(ids)} of {len(points)} point(s)"
                return out
            run = ctx.catalog.start_run("prune", policy=policy.name, leg=name, leg_kind=leg.kind, location=leg.to, now=now)
            try:
                if ids:
                    with ctx.ui.task(f"{policy.name}/{name}: forget {len(ids)} point(s) in {leg.to}"):
                        repo.forget(ids)
                ctx.catalog.finish_run(run, RunPhase.succeeded, now=ctx.now(), command_log=_commands(repo), detail={"plan": plan.to_dict()})
            except DrtoolError as exc:
                ctx.catalog.finish_run(run, RunPhase.failed, now=ctx.now(), errors=[str(exc)], command_log=_commands(repo), detail={"plan": plan.to_dict()})
                raise
            out.removed = ids
            out.ok, out.message = True, f"removed {len(ids)} of {len(points)} point(s)"
    except LockHeld as exc:
        out.ok, out.skipped, out.message = True, True, str(exc)
    except DrtoolError as exc:
        out.ok, out.message = False, str(exc)
    return out
