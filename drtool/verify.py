"""Verification levels (cumulative: each includes the ones before it).

exists: the leg's newest point is listed and younger than the RPO (every driver).
integrity, sample, full: the driver's own checks (restic: check --read-data-subset,
sampled restores against backup-time BLAKE3, a full restore with --verify).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .backends.base import RecoveryPoint
from .durations import format_duration
from .engine import Context, _point_row
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


def verify_leg(ctx: Context, policy: Policy, leg: Leg, *, level: str | None = None) -> VerifyResult:
    from .legs import driver_for

    requested = level or leg.verify.level
    name = leg.leg_name
    res = VerifyResult(policy.name, name, leg.to or policy.source.location, requested, False, "")
    try:
        driver = driver_for(ctx, policy, leg)
    except DrtoolError as exc:
        res.message, res.skipped = str(exc), True
        return res
    # Record only what was really done: a level the driver lacks is capped to its deepest one.
    level = max((lv for lv in ("exists", *driver.levels) if VERIFY_LEVELS.index(lv) <= VERIFY_LEVELS.index(requested)),
                key=VERIFY_LEVELS.index)
    res.level = level
    started = ctx.now()
    run = ctx.catalog.start_run("verify", policy=policy.name, leg=name, leg_kind=leg.kind, location=driver.location, now=started)
    point: RecoveryPoint | None = None
    try:
        listing = driver.location_points()
        ctx.catalog.upsert_points(driver.location, [_point_row(p) for p in listing], now=ctx.now())
        points = [p for p in listing if p.policy == policy.name and p.leg == name]
        if not points:
            raise DrtoolError(f"no recovery point of {policy.name}/{name} exists in {driver.location}")
        point = points[-1]
        res.point = point.id
        own = driver.exists_check(points)
        if own is not None:
            res.checks.append(own)
        else:
            age = ctx.now() - point.time
            fresh = age <= policy.rpo_td
            res.checks.append({"level": "exists", "ok": fresh, "message": f"newest point {point.id[:24]} is {format_duration(age)} old "
                               f"(RPO {policy.rpo})" + ("" if fresh else ": older than the RPO")})
        for lv in VERIFY_LEVELS[1: VERIFY_LEVELS.index(level) + 1]:
            if lv in driver.levels:
                res.checks.append(driver.check(lv, points))
        failed = [c for c in res.checks if not c["ok"]]
        res.ok = not failed
        res.message = "; ".join(c["message"] for c in (failed or res.checks))
        if level != requested:
            res.message += f" ({leg.kind} legs on {driver.location} have no {requested} level: verified at {level})"
        ctx.catalog.finish_run(run, RunPhase.succeeded if res.ok else RunPhase.failed, now=ctx.now(), command_log=driver.commands(),
                               errors=[c["message"] for c in failed], detail={"level": level, "checks": res.checks}, recovery_point=point.id)
    except LockHeld as exc:
        ctx.catalog.finish_run(run, RunPhase.skipped, now=ctx.now(), warnings=[str(exc)], command_log=driver.commands())
        res.message, res.skipped = str(exc), True
        return res
    except DrtoolError as exc:
        res.ok, res.message = False, str(exc)
        ctx.catalog.finish_run(run, RunPhase.failed, now=ctx.now(), errors=[str(exc)], command_log=driver.commands())
    ctx.catalog.record_verification(
        run=run, policy=policy.name, leg=name, location=driver.location, point_id=point.id if point else "-", level=level, ok=res.ok,
        started_at=started, ended_at=ctx.now(), detail={"checks": res.checks}, message=res.message,
    )
    return res


def verify_due(ctx: Context, policy: Policy, leg: Leg) -> bool:
    last = ctx.catalog.last_verification(policy.name, leg.leg_name, level_at_least=leg.verify.level)
    return last is None or ctx.now() - last.ended_at > leg.verify.every_td
