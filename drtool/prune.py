"""Prune: apply a leg's retention through the one planner, to drtool's own points only.

Pinned, whatever the rules say: the newest point, the last verified point, and
whatever the backend pins (held snapshots, replication bases).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from .engine import Context
from .errors import DrtoolError, LockHeld
from .locks import leg_lock
from .phases import RunPhase
from .policy.models import Leg, Policy
from .policy.retention import PrunePlan, RetentionRules, plan_prune


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
    blocked: list[str] = field(default_factory=list)  # the store's retention or lock refused: kept, not a failure
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "plan"}
        d["plan"] = self.plan.to_dict() if self.plan else None
        return d


def prune_leg(ctx: Context, policy: Policy, leg: Leg, *, dry_run: bool) -> PruneResult:
    from .legs import driver_for

    name = leg.leg_name
    out = PruneResult(policy.name, name, leg.to or policy.source.location, None, dry_run, False, "")
    now = ctx.now()
    try:
        driver = driver_for(ctx, policy, leg)
        with (nullcontext() if dry_run else leg_lock(ctx.state_dir, policy.name, name)):
            points = driver.points()  # only points drtool made for this policy and leg
            pins = driver.pins(points)
            verified = ctx.catalog.last_successful_verified_point(driver.location, policy=policy.name)
            if verified:
                pins.setdefault(verified, "last verified point")
            plan = plan_prune(points, RetentionRules(**leg.retention.model_dump()), pins, now)
            out.plan = plan
            ids = [d.point_id for d in plan.remove]
            if dry_run:
                out.ok, out.message = True, f"would remove {len(ids)} of {len(points)} point(s)"
                return out
            run = ctx.catalog.start_run("prune", policy=policy.name, leg=name, leg_kind=leg.kind, location=driver.location, now=now)
            blocked: list[str] = []
            try:
                if ids:
                    with ctx.ui.task(f"{policy.name}/{name}: remove {len(ids)} point(s) from {driver.location}"):
                        blocked = driver.delete(ids) or []
                ctx.catalog.finish_run(run, RunPhase.succeeded, now=ctx.now(), command_log=driver.commands(),
                                       warnings=[f"{b}: kept, under the store's retention or lock" for b in blocked],
                                       detail={"plan": plan.to_dict(), "blocked": blocked})
            except DrtoolError as exc:
                ctx.catalog.finish_run(run, RunPhase.failed, now=ctx.now(), errors=[str(exc)], command_log=driver.commands(), detail={"plan": plan.to_dict()})
                raise
            out.removed, out.blocked = [i for i in ids if i not in blocked], blocked
            out.ok, out.message = True, f"removed {len(out.removed)} of {len(points)} point(s)" + (
                f"; {len(blocked)} blocked by the store's retention or lock (kept)" if blocked else "")
    except LockHeld as exc:
        out.ok, out.skipped, out.message = True, True, str(exc)
    except DrtoolError as exc:
        out.ok, out.message = False, str(exc)
    return out
