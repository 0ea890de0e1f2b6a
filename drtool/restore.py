"""Restore a recovery point, and prove what came back.

The driver does the work: restic restores into an empty directory and checks
every file of the backup-time manifest; ZFS clones a snapshot into a new
dataset, rolls back (guarded), or receives a replica snapshot back. Every
restore is recorded as a run with its duration.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

from .backends.base import RecoveryPoint
from .engine import Context
from .errors import DrtoolError, UsageError
from .phases import RunPhase
from .policy.models import Leg, Policy


@dataclass
class RestoreResult:
    policy: str
    leg: str
    point: str
    point_time: str
    target: str | None
    dry_run: bool
    ok: bool
    message: str
    duration_s: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    recovery_point: RecoveryPoint | None = field(default=None, repr=False)  # the point itself (not in to_dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "recovery_point"}


def resolve_point(ctx: Context, policy: Policy, leg: Leg, selector: str) -> RecoveryPoint:
    """``latest``, ``latest-verified``, ``random``, or a point id / unique id prefix (or snapshot name)."""
    from .legs import driver_for

    driver = driver_for(ctx, policy, leg)
    # ``latest`` and an id may come from the driver's fast path (restore_points); ``random``
    # and ``latest-verified`` choose among every point, and an id the fast path does not
    # know is looked for in the full listing too
    points = driver.restore_points() if selector not in ("random", "latest-verified") else driver.points()
    if selector not in ("latest", "random", "latest-verified") and not _matching(points, selector):
        points = driver.points()
    if not points:
        raise DrtoolError(f"no recovery point of {policy.name}/{leg.leg_name} exists in {driver.location}")
    if selector == "latest":
        return points[-1]
    if selector == "random":  # drills: any point must restore, not only the newest
        import random

        return random.Random().choice(points)
    if selector == "latest-verified":
        pid = ctx.catalog.last_successful_verified_point(driver.location, policy=policy.name)
        match = [p for p in points if p.id == pid]
        if not match:
            raise DrtoolError(f"no verified point of {policy.name}/{leg.leg_name} still exists in {driver.location}: run `drtool verify` first")
        return match[0]
    match = _matching(points, selector)
    if len(match) != 1:
        raise UsageError(f"point {selector!r} matches {len(match)} points of {policy.name}/{leg.leg_name}: use latest, latest-verified or a longer id")
    return match[0]


def _matching(points: list[RecoveryPoint], selector: str) -> list[RecoveryPoint]:
    return [p for p in points if p.id.startswith(selector) or p.id.split("@", 1)[-1] == selector]


def restore_point(ctx: Context, policy: Policy, leg: Leg, *, selector: str, target: str | None, include: tuple[str, ...] = (),
                  dry_run: bool = False, force: bool = False, rollback: bool = False, destroy_newer: bool = False) -> RestoreResult:
    """Restore the point ``selector`` picks ("latest": the backend may pick it as it restores)."""
    from .legs import driver_for

    driver = driver_for(ctx, policy, leg)
    driver.restore_preflight(target, force=force, rollback=rollback)

    def record(now: Any) -> Any:
        return ctx.catalog.start_run("restore", policy=policy.name, leg=leg.leg_name, leg_kind=leg.kind, location=driver.location, now=now)

    def result(p: RecoveryPoint) -> RestoreResult:
        return RestoreResult(policy.name, leg.leg_name, p.id, p.time.isoformat(), target, dry_run, False, "", recovery_point=p)

    if selector == "latest" and not dry_run and not rollback:
        # the backend picks the newest point as it restores: the catalog (only needed for the
        # point's manifest and the run record) opens meanwhile
        started, t0 = ctx.now(), time.monotonic()
        try:
            with ctx.ui.task(f"restore the latest point of {policy.name}/{leg.leg_name}" + (f" → {target}" if target else "")):
                got = driver.restore_latest(target, include=include, force=force)
        except (DrtoolError, NotImplementedError) as exc:
            _failed(ctx, record(started), driver, exc)
        if got is not None:
            return _finish(ctx, record(started), driver, result(got[0]), got[1], t0)
    point = resolve_point(ctx, policy, leg, selector)
    res = result(point)
    if dry_run:
        planned = driver.restore_plan(point, target, include)
        if planned is not None:
            res.ok, (res.message, res.detail) = True, planned
            return res
        how = "roll back to" if rollback else "restore"
        res.ok, res.message = True, f"would {how} {point.id} ({point.time:%Y-%m-%d %H:%M}Z)" + (f" into {target}" if target else "") + (
            f", only {', '.join(include)}" if include else "")
        return res
    run = record(ctx.now())
    t0 = time.monotonic()
    try:
        with ctx.ui.task(f"restore {point.id[:40]}" + (f" → {target}" if target else "")):
            out = driver.restore(point, target, include=include, force=force, rollback=rollback, destroy_newer=destroy_newer)
    except (DrtoolError, NotImplementedError) as exc:
        _failed(ctx, run, driver, exc)
    return _finish(ctx, run, driver, res, out, t0)


def _failed(ctx: Context, run: Any, driver: Any, exc: Exception) -> NoReturn:
    ctx.catalog.finish_run(run, RunPhase.failed, now=ctx.now(), errors=[str(exc)], command_log=driver.commands())
    if isinstance(exc, NotImplementedError):
        raise UsageError(str(exc)) from None
    raise exc


def _finish(ctx: Context, run: Any, driver: Any, res: RestoreResult, out: Any, t0: float) -> RestoreResult:
    res.duration_s = round(time.monotonic() - t0, 3)
    mismatches = out.detail.get("mismatches") or []
    res.ok = not mismatches
    res.message = f"{out.message} in {res.duration_s:.1f}s"
    res.detail = out.detail
    ctx.catalog.finish_run(run, RunPhase.succeeded if res.ok else RunPhase.failed, now=ctx.now(), recovery_point=res.point,
                           command_log=driver.commands(), errors=[str(m) for m in mismatches[:50]],
                           detail={**out.detail, "target": res.target, "duration_s": res.duration_s})
    return res
