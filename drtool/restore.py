"""Restore a recovery point into a target directory, and prove what came back.

The target must be empty (or new) unless ``force``: a restore never overwrites
data by accident. When the point has a manifest recorded at backup time, every
restored file it names is compared with its backup-time BLAKE3.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import manifest
from .backends.base import RecoveryPoint
from .engine import Context, _commands
from .legs.restic_backup import manifest_of
from .errors import DrtoolError, UsageError
from .phases import RunPhase
from .policy.models import Leg, Policy


@dataclass
class RestoreResult:
    policy: str
    leg: str
    point: str
    point_time: str
    target: str
    dry_run: bool
    ok: bool
    message: str
    duration_s: float | None = None
    checked: int = 0
    mismatches: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_point(ctx: Context, policy: Policy, leg: Leg, selector: str) -> RecoveryPoint:
    """``latest``, ``latest-verified``, or a snapshot id / unique id prefix."""
    from .legs import driver_for

    points = driver_for(ctx, policy, leg).points()
    if not points:
        raise DrtoolError(f"no recovery point of {policy.name}/{leg.leg_name} exists in {leg.to}")
    if selector == "latest":
        return points[-1]
    if selector == "latest-verified":
        pid = ctx.catalog.last_successful_verified_point(leg.to, policy=policy.name)  # type: ignore[arg-type]
        match = [p for p in points if p.id == pid]
        if not match:
            raise DrtoolError(f"no verified point of {policy.name}/{leg.leg_name} still exists in {leg.to}: run `drtool verify` first")
        return match[0]
    match = [p for p in points if p.id.startswith(selector)]
    if len(match) != 1:
        raise UsageError(f"point {selector!r} matches {len(match)} points of {policy.name}/{leg.leg_name}: use latest, latest-verified or a longer id")
    return match[0]


def restore_point(ctx: Context, policy: Policy, leg: Leg, *, selector: str, target: str, include: tuple[str, ...] = (),
                  dry_run: bool = False, force: bool = False) -> RestoreResult:
    if leg.kind != "backup":
        raise UsageError(f"{leg.kind} legs cannot be restored by this drtool version")
    tgt = Path(target).absolute()
    if tgt.exists() and any(tgt.iterdir()) and not force:
        raise UsageError(f"restore target {tgt} is not empty: choose an empty directory, or pass --force to restore over it")
    point = resolve_point(ctx, policy, leg, selector)
    res = RestoreResult(policy.name, leg.leg_name, point.id, point.time.isoformat(), str(tgt), dry_run, False, "")
    if dry_run:
        res.ok = True
        res.message = f"would restore {point.id[:8]} ({point.time:%Y-%m-%d %H:%M}Z, {', '.join(point.paths)}) into {tgt}" + (
            f", only {', '.join(include)}" if include else "")
        return res
    repo = ctx.repo(leg.to)  # type: ignore[arg-type]
    run = ctx.catalog.start_run("restore", policy=policy.name, leg=leg.leg_name, leg_kind=leg.kind, location=leg.to, now=ctx.now())
    t0 = time.monotonic()
    try:
        tgt.mkdir(parents=True, exist_ok=True)
        with ctx.ui.task(f"restore {point.id[:8]} → {tgt}"):
            repo.restore(point.id, str(tgt), include=include)
        res.duration_s = round(time.monotonic() - t0, 3)
        entries = manifest_of(ctx, policy.name, leg.leg_name, point.id)
        for e in entries:
            if include and not any(e["path"] == i or e["path"].startswith(i.rstrip("/") + "/") for i in include):
                continue
            restored = tgt / e["path"].lstrip("/")
            res.checked += 1
            if not restored.is_file():
                res.mismatches.append(f"{e['path']}: missing")
            elif manifest.hash_file(str(restored)) != e["blake3"]:
                res.mismatches.append(f"{e['path']}: BLAKE3 differs from the backup-time hash")
        res.ok = not res.mismatches
        proof = f"; {res.checked} file(s) checked against backup-time BLAKE3" if res.checked else "; no backup-time manifest for this point"
        res.message = f"restored {point.id[:8]} into {tgt} in {res.duration_s:.1f}s" + proof + (
            f": {len(res.mismatches)} mismatch(es): {'; '.join(res.mismatches[:5])}" if res.mismatches else "")
        ctx.catalog.finish_run(run, RunPhase.succeeded if res.ok else RunPhase.failed, now=ctx.now(), recovery_point=point.id,
                               command_log=_commands(repo), errors=res.mismatches[:50],
                               detail={"target": str(tgt), "include": list(include), "checked": res.checked, "duration_s": res.duration_s})
    except DrtoolError as exc:
        ctx.catalog.finish_run(run, RunPhase.failed, now=ctx.now(), errors=[str(exc)], command_log=_commands(repo))
        raise
    return res
