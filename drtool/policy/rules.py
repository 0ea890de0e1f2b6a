"""3-2-1-1-0, decided per policy: which copies count and exactly why the others do not.

``assess(policy, cfg)`` is the static analysis (``drtool policy explain``).
``assess(policy, cfg, health=…)`` is the live one (``drtool status``): a copy then
counts only if it really holds a recovery point younger than the RPO, and the
"0 errors" rule needs a passing verification within the leg's frequency.
Pure: no I/O, time comes in through ``health``.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Mapping

from ..durations import format_duration
from .loader import Config
from .models import CephClusterLocation, LocationBase, Policy

RULES = ("3 copies", "2 media", "1 offsite", "1 immutable or offline", "0 errors")


@dataclass(frozen=True)
class LegHealth:
    """What the live inventory and the catalog say about one leg."""

    newest_point: datetime | None
    point_count: int
    last_verified: datetime | None  # newest passing verification at the declared level or deeper
    verified_level: str | None
    now: datetime
    rpo: timedelta
    verify_every: timedelta
    inventory_error: str | None = None
    immutability: str | None = None  # "verified" / "contradicted: …" when the store can tell
    last_failure: str | None = None  # the newest verification failed after the last passing one


    @property
    def fresh(self) -> bool:
        return self.newest_point is not None and self.now - self.newest_point <= self.rpo

    @property
    def verified(self) -> bool:
        if self.last_failure:
            return False
        return self.last_verified is not None and self.now - self.last_verified <= self.verify_every

    def age(self) -> timedelta | None:
        return None if self.newest_point is None else self.now - self.newest_point


@dataclass
class CopyAssessment:
    leg: str | None  # None: the production copy
    kind: str
    location: str
    media: str
    site: str
    failure_domain: str
    counts: bool
    reason: str
    immutable: bool = False
    offline: bool = False
    immutability: str = "declared"
    live: dict[str, Any] | None = None
    protection: list[dict[str, Any]] = field(default_factory=list)  # production only: parity over the source, live

    @property
    def label(self) -> str:
        return "production" if self.leg is None else f"{self.leg} → {self.location}"


@dataclass
class RuleResult:
    rule: str
    ok: bool | None  # None: cannot be decided statically
    satisfied_by: list[str]
    detail: str


@dataclass
class Assessment:
    policy: str
    live: bool
    copies: list[CopyAssessment] = field(default_factory=list)
    rules: list[RuleResult] = field(default_factory=list)

    @property
    def compliant(self) -> bool | None:
        if any(r.ok is False for r in self.rules):
            return False
        if any(r.ok is None for r in self.rules):
            return None
        return True

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["compliant"] = self.compliant
        return d


def _attrs(loc: LocationBase) -> dict[str, Any]:
    return {"media": loc.media, "site": loc.site, "failure_domain": loc.failure_domain, "immutable": loc.immutable, "offline": loc.offline}


def _content(leg: Any) -> str:
    """What an upload leg of a talos source carries: etcd unless it says machineconfig."""
    return (leg.upload.content if leg.upload is not None else None) or "etcd"


def _main_content(policy: Any) -> str:
    """What a talos policy's copies are copies of: the etcd data when any leg uploads it,
    else the machine config."""
    return "etcd" if any(_content(leg) == "etcd" for leg in policy.legs) else "machineconfig"


def _same_ceph_cluster(a: LocationBase, b: LocationBase) -> bool:
    """Two Ceph locations reached through the same ceph.conf are one cluster."""
    return (a is not b and isinstance(a, CephClusterLocation) and isinstance(b, CephClusterLocation)
            and os.path.normpath(a.conf) == os.path.normpath(b.conf))


def assess(policy: Policy, cfg: Config, health: Mapping[str, LegHealth] | None = None,
           facts: Mapping[str, tuple[bool, str]] | None = None) -> Assessment:
    """``facts``: location -> (immutable, how we know), read from stores that can tell
    (object stores: retention and lock). A fact replaces the declaration; a declaration
    the store contradicts is flagged and does not count."""
    live = health is not None
    src = cfg.locations[policy.source.location]
    out = Assessment(policy=policy.name, live=live)
    out.copies.append(
        CopyAssessment(
            leg=None, kind="source", location=policy.source.location, counts=True,
            reason=f"the production data on {policy.source.location}", **_attrs(src),
        )
    )
    counted_domains: dict[str, str] = {src.failure_domain: "the source"}
    for leg in policy.legs:
        name = leg.leg_name
        if leg.to is None:
            where, loc = policy.source.location, src
        else:
            where, loc = leg.to, cfg.locations[leg.to]
        c = CopyAssessment(leg=name, kind=leg.kind, location=where, counts=False, reason="", **_attrs(loc))
        if facts and where in facts:
            fact, how = facts[where]
            c.immutable = fact
            c.immutability = f"contradicted: declared immutable, but {how}" if loc.immutable and not fact else how
        h = health.get(name) if health else None
        if h is not None:
            c.live = {
                "newest_point": h.newest_point.isoformat() if h.newest_point else None,
                "age": format_duration(h.age()) if h.age() is not None else None,
                "points": h.point_count,
                "fresh": h.fresh,
                "last_verified": h.last_verified.isoformat() if h.last_verified else None,
                "verified_level": h.verified_level,
                "verified": h.verified,
                "inventory_error": h.inventory_error,
                "last_failure": h.last_failure,
            }
            if h.immutability:
                c.immutability = h.immutability
        if leg.kind == "snapshot" and isinstance(src, CephClusterLocation):
            c.reason = "a snapshot in the same Ceph cluster is a recovery point, not a copy: it is lost with the cluster"
        elif leg.kind == "snapshot":
            c.reason = "a snapshot on the source's own storage is a recovery point, not an independent copy"
        elif _same_ceph_cluster(src, loc):
            c.reason = (f"a replica in another pool of the same Ceph cluster ({loc.conf}) shares the source's failure domain "
                        "(the cluster), whatever failure_domain says: it counts once with the source")
        elif leg.kind == "parity":
            c.reason = "SnapRAID parity is protection, not a copy"
        elif getattr(src, "type", "") == "talos" and _content(leg) != _main_content(policy):
            c.reason = (f"it uploads the {_content(leg)}, not a copy of this policy's {_main_content(policy)} data: "
                        "give it a policy of its own to count its copies")
        elif loc.failure_domain in counted_domains:
            other = counted_domains[loc.failure_domain]
            if other == "the source":
                c.reason = f"same failure domain as the source ({loc.failure_domain!r}): it fails together with the production data"
            else:
                c.reason = f"same failure domain ({loc.failure_domain!r}) as {other}: counted once"
        elif live and h is not None and h.inventory_error:
            c.reason = f"its inventory could not be read: {h.inventory_error}"
        elif live and (h is None or h.newest_point is None):
            c.reason = "no recovery point exists at the location"
        elif live and h is not None and not h.fresh:
            c.reason = f"its newest point is {format_duration(h.age())} old, older than the RPO {policy.rpo}"
        else:
            c.counts = True
            c.reason = f"independent copy in failure domain {loc.failure_domain!r}"
            counted_domains[loc.failure_domain] = f"leg {name!r}"
        out.copies.append(c)

    counted = [c for c in out.copies if c.counts]
    extra = [c for c in counted if c.leg is not None]
    n = len(counted)
    out.rules.append(RuleResult(
        "3 copies", n >= 3, [c.label for c in counted],
        f"{n} cop{'y' if n == 1 else 'ies'} in distinct failure domains" + ("" if n >= 3 else f": add {3 - n} more copy leg(s) to other failure domains"),
    ))
    media = {}
    for c in counted:
        media.setdefault(c.media, c.label)
    out.rules.append(RuleResult(
        "2 media", len(media) >= 2, [f"{m}: {lbl}" for m, lbl in media.items()],
        f"media: {', '.join(sorted(media)) or 'none'}" + ("" if len(media) >= 2 else ": put a copy on a different medium"),
    ))
    offsite = [c for c in extra if c.site != src.site]
    out.rules.append(RuleResult(
        "1 offsite", bool(offsite), [f"{c.label} (site {c.site})" for c in offsite],
        (f"{len(offsite)} copy(ies) away from site {src.site!r}" if offsite else f"every counted copy is at site {src.site!r}: add a copy at another site"),
    ))
    immut = [c for c in counted if (c.immutable or c.offline) and not c.immutability.startswith("contradicted")]
    contradicted = [c for c in out.copies if c.immutability.startswith("contradicted")]  # flagged even when not counted
    detail = (
        ", ".join(f"{c.label}: {'immutable' if c.immutable else 'offline'} ({c.immutability})" for c in immut)
        if immut else "no counted copy is immutable or offline: add one (object lock, append-only, or an offline medium)"
    )
    if contradicted:
        detail += "; " + ", ".join(f"{c.label} claims immutable but {c.immutability}" for c in contradicted)
    out.rules.append(RuleResult("1 immutable or offline", bool(immut), [c.label for c in immut], detail))

    if not live:
        out.rules.append(RuleResult("0 errors", None, [], "checked live by `drtool status`: every counted copy needs a point younger than the RPO and a passing verification within its frequency"))
    else:
        problems = []
        good = []
        for c in extra:
            leg = policy.leg(c.leg)  # type: ignore[arg-type]
            h = health.get(c.leg) if health else None  # type: ignore[arg-type]
            if h is not None and h.last_failure:
                problems.append(f"{c.label}: the latest verification failed: {h.last_failure}")
            elif h is None or not h.verified:
                last = "never" if h is None or h.last_verified is None else f"{format_duration(h.now - h.last_verified)} ago"
                every = format_duration(h.verify_every) if h is not None else leg.verify.every
                problems.append(f"{c.label}: no passing {leg.verify.level} verification within {every} (last: {last})")
            else:
                good.append(c.label)
        # a copy that should count but is stale or unreadable is an error too
        for c in out.copies:
            if c.leg is not None and not c.counts and c.live is not None and (c.live.get("inventory_error") or not c.live.get("fresh")) and c.kind in ("backup", "replicate", "upload"):
                if "failure domain" not in c.reason:
                    problems.append(f"{c.label}: {c.reason}")
        out.rules.append(RuleResult("0 errors", not problems, good, "; ".join(problems) if problems else "every counted copy is fresh and verified"))
    return out
