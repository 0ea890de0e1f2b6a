"""Verification levels (cumulative: each includes the ones before it).

exists: the leg's newest point is listed and younger than the RPO.
integrity: the store's own deep check (restic check --read-data-subset).
sample: restore a random sample of the files hashed at backup time and compare BLAKE3.
full: restore the whole point into scratch (restic --verify) and compare every recorded hash.
"""
from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import manifest
from .backends.base import RecoveryPoint, Repository
from .durations import format_duration
from .engine import Context, _commands, _point_row
from .errors import DrtoolError, LockHeld
from .phases import RunPhase
from .policy.models import VERIFY_LEVELS, Leg, Policy


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
