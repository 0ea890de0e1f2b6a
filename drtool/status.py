"""Live 3-2-1-1-0 per policy, from the real inventory and the catalog."""
from __future__ import annotations

from .engine import Context
from .errors import DrtoolError
from .legs import driver_for, supported
from .policy.rules import Assessment, LegHealth, assess


def store_facts(ctx: Context, policy: str | None = None) -> dict[str, tuple[bool, str]]:
    """Immutability read from the object stores the selected policies upload to:
    location -> (immutable, how we know). A bucket that cannot be read proves nothing."""
    from .backends import OBJECT_STORES, object_store_for
    from .legs.upload import describe_retention

    facts: dict[str, tuple[bool, str]] = {}
    for pol in ctx.cfg.select(policy):
        for leg in pol.legs:
            loc = ctx.cfg.location(leg.to) if leg.to else None
            if loc is None or getattr(loc, "type", "") not in OBJECT_STORES or leg.to in facts:
                continue
            try:
                store = ctx.backend(f"store:{leg.to}", lambda: object_store_for(leg.to, loc))  # type: ignore[arg-type]
                facts[leg.to] = describe_retention(store.retention_state())  # type: ignore[index]
            except DrtoolError as exc:
                facts[leg.to] = (False, f"the bucket's retention could not be read: {exc}")  # type: ignore[index]
    return facts


def live_assessments(ctx: Context, policy: str | None = None) -> list[Assessment]:
    now = ctx.now()
    listings: dict[str, tuple[list, str | None]] = {}  # one listing per location
    out = []
    facts = store_facts(ctx, policy)
    for pol in ctx.cfg.select(policy):
        health: dict[str, LegHealth] = {}
        protection: list[dict] = []
        for leg in pol.legs:
            if not supported(ctx, pol, leg):
                continue
            driver = driver_for(ctx, pol, leg)
            if driver.location not in listings:
                try:
                    listings[driver.location] = (driver.location_points(), None)
                except DrtoolError as exc:
                    listings[driver.location] = ([], str(exc))
            points, error = listings[driver.location]
            mine = [p for p in points if p.policy == pol.name and p.leg == leg.leg_name]
            try:
                prot = driver.protection(mine)
            except DrtoolError as exc:
                prot = {"leg": leg.leg_name, "ok": False, "problems": [str(exc)]}
            if prot:
                protection.append(prot)
            last = ctx.catalog.last_verification(pol.name, leg.leg_name, level_at_least=leg.verify.level)
            latest = ctx.catalog.last_verification(pol.name, leg.leg_name)  # any level, any outcome
            failure = None
            if latest is not None and not latest.ok and (last is None or latest.ended_at > last.ended_at):
                failure = f"{latest.level} at {latest.ended_at:%Y-%m-%d %H:%M}Z: {latest.message}"
            health[leg.leg_name] = LegHealth(
                newest_point=max((p.time for p in mine), default=None),
                point_count=len(mine),
                last_verified=last.ended_at if last else None,
                verified_level=last.level if last else None,
                now=now,
                rpo=pol.rpo_td,
                verify_every=leg.verify.every_td,
                inventory_error=error,
                last_failure=failure,
            )
        a = assess(pol, ctx.cfg, health, facts)
        for c in a.copies:
            if c.leg is None:
                c.protection = protection
        out.append(a)
    return out
