"""The retention planner: decide which recovery points to keep and which to remove.

This module is the single place where drtool turns a retention policy into a
prune plan.  :func:`plan_prune` is a pure function: it performs no I/O, never
reads the clock (``now`` is a parameter) and is deterministic for a given input.

Semantics (see ``docs/retention.md`` for the long version):

* Points are ordered newest first; equal timestamps are ordered by id.
* ``keep_last`` N keeps the N newest points.
* ``keep_hourly`` / ``keep_daily`` / ``keep_weekly`` / ``keep_monthly`` /
  ``keep_yearly`` N keep the newest point of each of the N most recent
  calendar buckets (hour, day, ISO week, month, year, evaluated in ``tz``)
  that actually contain points.  Empty buckets do not consume the count.
  This is the bucket counting of ``restic forget``.
* Always kept: the newest point, every pinned point, every point whose time
  is after ``now``.  Points after ``now`` are kept but do not take part in
  the rule counting, so a point with a skewed clock cannot push a legitimate
  point out of a ``keep_*`` slot.
* An empty policy (every count ``None`` or 0) keeps everything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timezone, tzinfo
from typing import Any, Protocol

__all__ = [
    "RetentionRules",
    "PointRef",
    "Decision",
    "PrunePlan",
    "plan_prune",
    "REASON_NO_RULES",
    "REASON_NO_MATCH",
    "REASON_NEWEST",
    "REASON_FUTURE",
    "PIN_PREFIX",
]

REASON_NO_RULES = "no retention rules: keep all"
REASON_NO_MATCH = "matched no keep rule"
REASON_NEWEST = "newest point"
REASON_FUTURE = "newer than now (clock skew?)"
PIN_PREFIX = "pinned: "


@dataclass(frozen=True)
class RetentionRules:
    """How many points to keep per rule.  ``None`` or 0 switches a rule off.

    The pydantic policy model converts into this with
    ``RetentionRules(**model.model_dump())``.
    """

    keep_last: int | None = None
    keep_hourly: int | None = None
    keep_daily: int | None = None
    keep_weekly: int | None = None
    keep_monthly: int | None = None
    keep_yearly: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            # bool is an int subclass; True/False as a count is almost surely a bug.
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{f.name} must be an int or None, got {value!r}")
            if value < 0:
                raise ValueError(f"{f.name} must not be negative, got {value}")

    def is_empty(self) -> bool:
        """True when every rule is off (``None`` or 0): such a policy deletes nothing."""
        return not any(getattr(self, f.name) for f in fields(self))


class PointRef(Protocol):
    """Anything with an ``id`` and a timezone-aware ``time`` can be planned over."""

    @property
    def id(self) -> str: ...

    @property
    def time(self) -> datetime: ...


@dataclass(frozen=True)
class Decision:
    point_id: str
    time: datetime
    keep: bool
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "point_id": self.point_id,
            "time": self.time.isoformat(),
            "keep": self.keep,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class PrunePlan:
    decisions: tuple[Decision, ...]  # newest first

    @property
    def keep(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if d.keep)

    @property
    def remove(self) -> tuple[Decision, ...]:
        return tuple(d for d in self.decisions if not d.keep)

    def to_dict(self) -> dict[str, Any]:
        keep = self.keep
        remove = self.remove
        return {
            "decisions": [d.to_dict() for d in self.decisions],
            "keep": [d.point_id for d in keep],
            "remove": [d.point_id for d in remove],
            "keep_count": len(keep),
            "remove_count": len(remove),
        }


# --- buckets -----------------------------------------------------------------

# Each bucket function maps a datetime already converted to the planning tz to
# a hashable key plus a human-readable label used in the reasons.
_BucketFn = Callable[[datetime], tuple[tuple[int, ...], str]]


def _hour(t: datetime) -> tuple[tuple[int, ...], str]:
    return (t.year, t.month, t.day, t.hour), f"{t.year:04d}-{t.month:02d}-{t.day:02d} {t.hour:02d}:00"


def _day(t: datetime) -> tuple[tuple[int, ...], str]:
    return (t.year, t.month, t.day), f"{t.year:04d}-{t.month:02d}-{t.day:02d}"


def _week(t: datetime) -> tuple[tuple[int, ...], str]:
    iso = t.isocalendar()
    return (iso.year, iso.week), f"{iso.year:04d}-W{iso.week:02d}"


def _month(t: datetime) -> tuple[tuple[int, ...], str]:
    return (t.year, t.month), f"{t.year:04d}-{t.month:02d}"


def _year(t: datetime) -> tuple[tuple[int, ...], str]:
    return (t.year,), f"{t.year:04d}"


# Order here is the order reasons are listed in a Decision.
_BUCKET_RULES: tuple[tuple[str, str, _BucketFn], ...] = (
    ("keep_hourly", "hourly", _hour),
    ("keep_daily", "daily", _day),
    ("keep_weekly", "weekly", _week),
    ("keep_monthly", "monthly", _month),
    ("keep_yearly", "yearly", _year),
)


def _require_aware(value: datetime, what: str) -> None:
    if not isinstance(value, datetime):
        raise TypeError(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{what} is a naive datetime; timezone-aware datetimes are required")


# --- planner -----------------------------------------------------------------


def plan_prune(
    points: Iterable[PointRef],
    retention: RetentionRules,
    pins: Mapping[str, str],
    now: datetime,
    *,
    tz: tzinfo = timezone.utc,
) -> PrunePlan:
    """Decide, for every point, whether to keep or remove it, and why.

    ``pins`` maps point id -> why it is pinned; pins for unknown ids are ignored.
    Raises ``ValueError`` on duplicate ids, naive datetimes or negative counts.
    """
    _require_aware(now, "now")
    # Re-validate: a RetentionRules built with object.__setattr__ or a subclass
    # must not slip a negative count through.
    RetentionRules(**{f.name: getattr(retention, f.name) for f in fields(RetentionRules)})

    pts = list(points)
    # All ordering and "after now" checks use UTC instants.  Comparing aware
    # datetimes that share a tzinfo object compares wall-clock times and
    # ignores ``fold``, which misorders points around a DST fall-back.
    instant: dict[str, datetime] = {}
    for p in pts:
        _require_aware(p.time, f"time of point {p.id!r}")
        if p.id in instant:
            raise ValueError(f"duplicate point id {p.id!r}")
        instant[p.id] = p.time.astimezone(timezone.utc)
    now_utc = now.astimezone(timezone.utc)
    future = {pid for pid, t in instant.items() if t > now_utc}

    # Newest first; ties broken by id (ascending) for determinism.  Python's
    # sort is stable, so sort by the secondary key first.
    pts.sort(key=lambda p: p.id)
    pts.sort(key=lambda p: instant[p.id], reverse=True)

    reasons: dict[str, list[str]] = {p.id: [] for p in pts}

    if retention.is_empty():
        for p in pts:
            reasons[p.id].append(REASON_NO_RULES)
    else:
        # Points from the future are kept unconditionally (below) and take no
        # part in counting, so clock skew cannot displace real points.
        countable = [p for p in pts if p.id not in future]

        keep_last = retention.keep_last or 0
        for rank, p in enumerate(countable[:keep_last], start=1):
            reasons[p.id].append(f"last #{rank}")

        for field_name, label, bucket_of in _BUCKET_RULES:
            limit = getattr(retention, field_name) or 0
            if limit == 0:
                continue
            # Walking newest -> oldest, the first point seen in a bucket is that
            # bucket's newest point.  "Bucket not used yet" equals restic's
            # "bucket differs from the last kept one" whenever bucket labels
            # never go backwards in time (true for UTC, fixed offsets and
            # real-world DST), and stays idempotent even if they do.
            used: set[tuple[int, ...]] = set()
            for p in countable:
                if len(used) >= limit:
                    break
                key, text = bucket_of(instant[p.id].astimezone(tz))
                if key in used:
                    continue
                used.add(key)
                reasons[p.id].append(f"{label} {text}")

    if pts:
        reasons[pts[0].id].append(REASON_NEWEST)
    for p in pts:
        why = pins.get(p.id)
        if why is not None:
            reasons[p.id].append(f"{PIN_PREFIX}{why}")
        if p.id in future:
            reasons[p.id].append(REASON_FUTURE)

    decisions = []
    for p in pts:
        r = reasons[p.id]
        keep = bool(r)
        decisions.append(
            Decision(
                point_id=p.id,
                time=p.time,
                keep=keep,
                reasons=tuple(r) if keep else (REASON_NO_MATCH,),
            )
        )
    return PrunePlan(decisions=tuple(decisions))
