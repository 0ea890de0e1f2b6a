"""Tests for drtool.policy.retention: hand-checked examples plus property tests.

The property tests compare plan_prune against a brute-force reference written
independently below (group by bucket, sort buckets, take the first N, pick the
newest point of each) and check the safety invariants.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drtool.policy.retention import (
    Decision,
    PrunePlan,
    RetentionRules,
    plan_prune,
)

UTC = timezone.utc
RULE_FIELDS = tuple(f.name for f in dataclasses.fields(RetentionRules))
BUCKET_LABELS = {
    "keep_hourly": "hourly ",
    "keep_daily": "daily ",
    "keep_weekly": "weekly ",
    "keep_monthly": "monthly ",
    "keep_yearly": "yearly ",
}


@dataclass(frozen=True)
class P:
    id: str
    time: datetime


def at(s: str, tz: tzinfo = UTC) -> datetime:
    return datetime.fromisoformat(s).replace(tzinfo=tz)


def kept_ids(plan: PrunePlan) -> set[str]:
    return {d.point_id for d in plan.keep}


def removed_ids(plan: PrunePlan) -> set[str]:
    return {d.point_id for d in plan.remove}


def by_id(plan: PrunePlan) -> dict[str, Decision]:
    return {d.point_id: d for d in plan.decisions}


FAR_FUTURE = at("2100-01-01T00:00:00")

# --------------------------------------------------------------------------
# Hand-checked examples
# --------------------------------------------------------------------------


def test_hourly_points_three_days_keep_daily_2_keep_last_3() -> None:
    start = at("2026-03-01T00:00:00")
    points = [P(f"h{i:02d}", start + timedelta(hours=i)) for i in range(72)]
    plan = plan_prune(points, RetentionRules(keep_last=3, keep_daily=2), {}, FAR_FUTURE)

    assert kept_ids(plan) == {"h71", "h70", "h69", "h47"}
    d = by_id(plan)
    assert d["h71"].reasons == ("last #1", "daily 2026-03-03", "newest point")
    assert d["h70"].reasons == ("last #2",)
    assert d["h69"].reasons == ("last #3",)
    assert d["h47"].reasons == ("daily 2026-03-02",)  # 2026-03-02 23:00
    assert d["h00"].reasons == ("matched no keep rule",)
    assert len(plan.remove) == 68
    # newest first
    assert [x.point_id for x in plan.decisions[:3]] == ["h71", "h70", "h69"]


def test_weekly_across_iso_year_boundary() -> None:
    # One point per day at noon, Mon 2026-12-21 .. Wed 2027-01-06.
    # ISO weeks: 12-21..12-27 = 2026-W52, 12-28..01-03 = 2026-W53, 01-04.. = 2027-W01.
    points = [
        P(f"d{(date(2026, 12, 21) + timedelta(days=i)).isoformat()}",
          at("2026-12-21T12:00:00") + timedelta(days=i))
        for i in range(17)
    ]
    plan = plan_prune(points, RetentionRules(keep_weekly=3), {}, FAR_FUTURE)
    d = by_id(plan)
    assert kept_ids(plan) == {"d2027-01-06", "d2027-01-03", "d2026-12-27"}
    assert d["d2027-01-06"].reasons == ("weekly 2027-W01", "newest point")
    # 2027-01-01 .. 01-03 belong to ISO year 2026; the Sunday is the newest of W53.
    assert d["d2027-01-03"].reasons == ("weekly 2026-W53",)
    assert d["d2026-12-27"].reasons == ("weekly 2026-W52",)
    assert not d["d2027-01-01"].keep

    # Calendar years, by contrast, split at Jan 1.
    plan_y = plan_prune(points, RetentionRules(keep_yearly=2), {}, FAR_FUTURE)
    assert kept_ids(plan_y) == {"d2027-01-06", "d2026-12-31"}
    assert by_id(plan_y)["d2026-12-31"].reasons == ("yearly 2026",)


def test_tz_changes_day_bucket() -> None:
    points = [
        P("a", at("2026-06-01T20:00:00")),  # Berlin: 06-01 22:00
        P("b", at("2026-06-01T23:30:00")),  # Berlin: 06-02 01:30
        P("c", at("2026-06-02T01:00:00")),  # Berlin: 06-02 03:00
    ]
    rules = RetentionRules(keep_daily=2)

    utc_plan = plan_prune(points, rules, {}, FAR_FUTURE)
    assert kept_ids(utc_plan) == {"c", "b"}
    assert by_id(utc_plan)["b"].reasons == ("daily 2026-06-01",)

    berlin_plan = plan_prune(points, rules, {}, FAR_FUTURE, tz=ZoneInfo("Europe/Berlin"))
    assert kept_ids(berlin_plan) == {"c", "a"}
    assert by_id(berlin_plan)["c"].reasons == ("daily 2026-06-02", "newest point")
    assert by_id(berlin_plan)["a"].reasons == ("daily 2026-06-01",)


def test_input_offsets_do_not_matter_only_instants() -> None:
    tokyo = timezone(timedelta(hours=9))
    # Same instants as the tz test above, written with a +09:00 offset.
    points = [
        P("a", at("2026-06-02T05:00:00", tokyo)),
        P("b", at("2026-06-02T08:30:00", tokyo)),
        P("c", at("2026-06-02T10:00:00", tokyo)),
    ]
    plan = plan_prune(points, RetentionRules(keep_daily=2), {}, FAR_FUTURE)
    assert kept_ids(plan) == {"c", "b"}  # bucketed in UTC, not in the input offset


def test_dst_fall_back_hour_is_one_bucket() -> None:
    ny = ZoneInfo("America/New_York")
    # 2026-11-01 01:30 happens twice in New York (EDT, then EST).
    first = datetime(2026, 11, 1, 1, 30, tzinfo=ny, fold=0)  # 05:30 UTC
    second = datetime(2026, 11, 1, 1, 30, tzinfo=ny, fold=1)  # 06:30 UTC
    points = [P("edt", first), P("est", second), P("before", at("2026-11-01T04:50:00"))]
    plan = plan_prune(points, RetentionRules(keep_hourly=2), {}, FAR_FUTURE, tz=ny)
    # Hour buckets in New York: 01:00 (edt, est) and 00:00 (before).
    assert kept_ids(plan) == {"est", "before"}
    assert by_id(plan)["est"].reasons == ("hourly 2026-11-01 01:00", "newest point")
    # In UTC they are three different hours.
    assert kept_ids(plan_prune(points, RetentionRules(keep_hourly=2), {}, FAR_FUTURE)) == {
        "est",
        "edt",
    }


def test_gaps_do_not_consume_counts() -> None:
    days = ["2026-01-01", "2026-01-02", "2026-01-20", "2026-02-15"]
    points = [P(d, at(f"{d}T10:00:00")) for d in days]
    plan = plan_prune(points, RetentionRules(keep_daily=3), {}, FAR_FUTURE)
    assert kept_ids(plan) == {"2026-02-15", "2026-01-20", "2026-01-02"}


def test_multiple_points_per_bucket_keeps_newest_in_bucket() -> None:
    points = [
        P("jan-early", at("2026-01-03T00:00:00")),
        P("jan-late", at("2026-01-30T00:00:00")),
        P("feb", at("2026-02-10T00:00:00")),
        P("dec", at("2025-12-24T00:00:00")),
    ]
    plan = plan_prune(points, RetentionRules(keep_monthly=2, keep_yearly=2), {}, FAR_FUTURE)
    d = by_id(plan)
    assert kept_ids(plan) == {"feb", "jan-late", "dec"}
    assert d["feb"].reasons == ("monthly 2026-02", "yearly 2026", "newest point")
    assert d["jan-late"].reasons == ("monthly 2026-01",)
    assert d["dec"].reasons == ("yearly 2025",)


def test_always_keep_newest_pins_and_future() -> None:
    now = at("2026-05-10T12:00:00")
    points = [
        P("future", at("2026-05-11T00:00:00")),
        P("newest-real", at("2026-05-10T11:00:00")),
        P("older", at("2026-05-10T10:00:00")),
        P("verified", at("2026-04-01T00:00:00")),
        P("base", at("2026-03-01T00:00:00")),
        P("junk", at("2026-02-01T00:00:00")),
    ]
    pins = {
        "verified": "last verified point",
        "base": "replication base",
        "not-there": "held",  # unknown ids are ignored
    }
    plan = plan_prune(points, RetentionRules(keep_last=1), pins, now)
    d = by_id(plan)
    assert kept_ids(plan) == {"future", "newest-real", "verified", "base"}
    # The future point is kept but does not take the keep_last slot.
    assert d["future"].reasons == ("newest point", "newer than now (clock skew?)")
    assert d["newest-real"].reasons == ("last #1",)
    assert d["verified"].reasons == ("pinned: last verified point",)
    assert d["base"].reasons == ("pinned: replication base",)
    assert d["junk"].reasons == ("matched no keep rule",)
    assert "not-there" not in d


def test_future_check_uses_instants_across_dst_fold() -> None:
    ny = ZoneInfo("America/New_York")
    # p is at 01:50 EDT (05:50 UTC); now is 01:10 EST (06:10 UTC), i.e. *later*,
    # although its wall-clock reading is earlier.
    p_time = datetime(2026, 11, 1, 1, 50, tzinfo=ny, fold=0)
    now = datetime(2026, 11, 1, 1, 10, tzinfo=ny, fold=1)
    older = P("older", at("2026-10-31T00:00:00"))
    plan = plan_prune([P("p", p_time), older], RetentionRules(keep_last=1), {}, now)
    assert by_id(plan)["p"].reasons == ("last #1", "newest point")
    assert not by_id(plan)["older"].keep


def test_point_exactly_at_now_is_not_future() -> None:
    now = at("2026-05-10T12:00:00")
    points = [P("now", now), P("old", now - timedelta(days=1))]
    plan = plan_prune(points, RetentionRules(keep_last=1), {}, now)
    assert by_id(plan)["now"].reasons == ("last #1", "newest point")
    assert kept_ids(plan) == {"now"}


def test_pinned_point_also_lists_rule_reasons() -> None:
    points = [P("x", at("2026-11-27T08:00:00")), P("y", at("2026-11-26T08:00:00"))]
    plan = plan_prune(points, RetentionRules(keep_daily=2), {"y": "held"}, FAR_FUTURE)
    assert by_id(plan)["y"].reasons == ("daily 2026-11-26", "pinned: held")


@pytest.mark.parametrize(
    "rules",
    [RetentionRules(), RetentionRules(keep_last=0, keep_daily=0, keep_yearly=None)],
)
def test_empty_retention_keeps_everything(rules: RetentionRules) -> None:
    assert rules.is_empty()
    points = [P(f"p{i}", at("2020-01-01T00:00:00") + timedelta(days=40 * i)) for i in range(20)]
    plan = plan_prune(points, rules, {"p3": "held"}, FAR_FUTURE)
    assert not plan.remove
    assert all(d.reasons[0] == "no retention rules: keep all" for d in plan.decisions)
    assert by_id(plan)["p3"].reasons == ("no retention rules: keep all", "pinned: held")


def test_zero_means_rule_off() -> None:
    points = [P(f"p{i}", at("2026-01-01T00:00:00") + timedelta(days=i)) for i in range(5)]
    plan = plan_prune(points, RetentionRules(keep_last=1, keep_daily=0), {}, FAR_FUTURE)
    assert kept_ids(plan) == {"p4"}


def test_is_empty() -> None:
    assert RetentionRules().is_empty()
    assert RetentionRules(keep_daily=0).is_empty()
    assert not RetentionRules(keep_yearly=1).is_empty()


def test_rules_from_model_dump_shape() -> None:
    dumped = {name: None for name in RULE_FIELDS} | {"keep_daily": 7}
    assert RetentionRules(**dumped) == RetentionRules(keep_daily=7)


def test_no_points() -> None:
    plan = plan_prune([], RetentionRules(keep_last=3), {"a": "held"}, FAR_FUTURE)
    assert plan.decisions == ()
    assert plan.to_dict()["decisions"] == []


def test_tie_break_by_id_is_deterministic() -> None:
    t = at("2026-01-01T00:00:00")
    points = [P("b", t), P("a", t), P("c", t)]
    for order in (points, points[::-1]):
        plan = plan_prune(order, RetentionRules(keep_daily=1), {}, FAR_FUTURE)
        assert [d.point_id for d in plan.decisions] == ["a", "b", "c"]
        assert kept_ids(plan) == {"a"}


def test_to_dict_is_json_serialisable() -> None:
    points = [P("a", at("2026-11-27T08:00:00")), P("b", at("2026-11-26T08:00:00"))]
    plan = plan_prune(points, RetentionRules(keep_last=1), {}, FAR_FUTURE)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["keep"] == ["a"]
    assert data["remove"] == ["b"]
    assert data["decisions"][0] == {
        "point_id": "a",
        "time": "2026-11-27T08:00:00+00:00",
        "keep": True,
        "reasons": ["last #1", "newest point"],
    }


def test_docs_worked_example() -> None:
    """The table in docs/retention.md; keep the two in sync."""
    points = [
        P(i, at(t))
        for i, t in [
            ("a", "2026-11-29T09:00:00"),
            ("b", "2026-11-28T10:00:00"),
            ("c", "2026-11-28T06:00:00"),
            ("d", "2026-11-27T22:00:00"),
            ("e", "2026-11-27T08:00:00"),
            ("f", "2026-11-25T23:00:00"),
            ("g", "2026-11-20T12:00:00"),
            ("h", "2026-11-13T12:00:00"),
            ("i", "2026-11-01T12:00:00"),
        ]
    ]
    rules = RetentionRules(keep_last=2, keep_daily=3, keep_weekly=2)
    pins = {"i": "last verified point", "zz": "held"}
    now = at("2026-11-28T12:00:00")
    plan = plan_prune(points, rules, pins, now)
    assert [(d.point_id, d.keep, d.reasons) for d in plan.decisions] == [
        ("a", True, ("newest point", "newer than now (clock skew?)")),
        ("b", True, ("last #1", "daily 2026-11-28", "weekly 2026-W48")),
        ("c", True, ("last #2",)),
        ("d", True, ("daily 2026-11-27",)),
        ("e", False, ("matched no keep rule",)),
        ("f", True, ("daily 2026-11-25",)),
        ("g", True, ("weekly 2026-W47",)),
        ("h", False, ("matched no keep rule",)),
        ("i", True, ("pinned: last verified point",)),
    ]
    la = plan_prune(points, rules, pins, now, tz=ZoneInfo("America/Los_Angeles"))
    assert by_id(la)["c"].reasons == ("last #2", "daily 2026-11-27")
    assert removed_ids(la) == {"d", "e", "h"}


# --- errors ------------------------------------------------------------------


def test_duplicate_ids_rejected() -> None:
    points = [P("a", at("2026-01-01T00:00:00")), P("a", at("2026-01-02T00:00:00"))]
    with pytest.raises(ValueError, match="duplicate"):
        plan_prune(points, RetentionRules(keep_last=1), {}, FAR_FUTURE)


def test_naive_point_time_rejected() -> None:
    with pytest.raises(ValueError, match="naive"):
        plan_prune([P("a", datetime(2026, 1, 1))], RetentionRules(keep_last=1), {}, FAR_FUTURE)


def test_naive_now_rejected() -> None:
    with pytest.raises(ValueError, match="naive"):
        plan_prune([], RetentionRules(keep_last=1), {}, datetime(2026, 1, 1))


@pytest.mark.parametrize("name", RULE_FIELDS)
def test_negative_counts_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="negative"):
        RetentionRules(**{name: -1})


def test_negative_count_smuggled_past_constructor_rejected() -> None:
    rules = RetentionRules(keep_last=1)
    object.__setattr__(rules, "keep_daily", -2)
    with pytest.raises(ValueError, match="negative"):
        plan_prune([], rules, {}, FAR_FUTURE)


def test_non_int_counts_rejected() -> None:
    with pytest.raises(TypeError):
        RetentionRules(keep_last=True)
    with pytest.raises(TypeError):
        RetentionRules(keep_last=1.5)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Independent brute-force reference
# --------------------------------------------------------------------------

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(t: datetime) -> int:
    """Microseconds since the epoch: an instant, whatever tzinfo/fold t carries."""
    return (t - _EPOCH) // timedelta(microseconds=1)


def _after(a: datetime, b: datetime) -> bool:
    return _micros(a) > _micros(b)


def _order(p: P) -> tuple[int, str]:
    """Smaller is 'newer first': newest instant, then smallest id."""
    return (-_micros(p.time), p.id)


def _hour_key(t: datetime) -> Hashable:
    return t.replace(minute=0, second=0, microsecond=0, tzinfo=None, fold=0)


def _week_key(t: datetime) -> Hashable:
    # The Monday that starts the ISO week identifies it and sorts correctly.
    return t.date() - timedelta(days=t.weekday())


REFERENCE_BUCKETS: dict[str, Callable[[datetime], Hashable]] = {
    "keep_hourly": _hour_key,
    "keep_daily": lambda t: t.date(),
    "keep_weekly": _week_key,
    "keep_monthly": lambda t: (t.year, t.month),
    "keep_yearly": lambda t: t.year,
}


def reference(
    points: list[P], rules: RetentionRules, pins: dict[str, str], now: datetime, tz: tzinfo
) -> tuple[set[str], dict[str, set[str]]]:
    """Return (keep set, per-rule keep sets)."""
    ids = {p.id for p in points}
    if all(not getattr(rules, name) for name in RULE_FIELDS):
        return ids, {}

    keep: set[str] = set()
    per_rule: dict[str, set[str]] = {}
    if points:
        keep.add(min(points, key=_order).id)
    keep |= ids & set(pins)
    keep |= {p.id for p in points if _after(p.time, now)}

    countable = [p for p in points if not _after(p.time, now)]
    per_rule["keep_last"] = {p.id for p in sorted(countable, key=_order)[: rules.keep_last or 0]}
    for name, key_of in REFERENCE_BUCKETS.items():
        groups: dict[Hashable, list[P]] = defaultdict(list)
        for p in countable:
            groups[key_of(p.time.astimezone(tz))].append(p)
        newest_buckets = sorted(groups, reverse=True)[: getattr(rules, name) or 0]
        per_rule[name] = {min(groups[b], key=_order).id for b in newest_buckets}
    for s in per_rule.values():
        keep |= s
    return keep, per_rule


# --------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------

PLAN_TZS: list[tzinfo] = [
    UTC,
    timezone(timedelta(hours=5, minutes=30)),
    timezone(timedelta(hours=-8)),
    timezone(timedelta(hours=13, minutes=45)),
    ZoneInfo("America/New_York"),
    ZoneInfo("Europe/Berlin"),
    ZoneInfo("Australia/Lord_Howe"),  # 30-minute DST shift
]
# Offsets the input timestamps are expressed in (must not affect the result).
# Zones with DST matter: aware datetimes sharing a ZoneInfo compare by wall
# clock (fold ignored), which a naive implementation would misorder.
INPUT_TZS: list[tzinfo] = [
    UTC,
    timezone(timedelta(hours=-3)),
    ZoneInfo("Asia/Tokyo"),
    ZoneInfo("America/New_York"),
    ZoneInfo("Europe/Berlin"),
]

# Spreads around a cluster centre, in seconds: same instant, same minute, hour,
# day, week, couple of months.
SPREADS = [0, 60, 3600, 86400, 7 * 86400, 60 * 86400]

LO = datetime(2023, 1, 1)
HI = datetime(2027, 12, 31)

pin_reasons = st.sampled_from(["held", "last verified point", "replication base"])


SPAN_SECONDS = int((HI - LO).total_seconds())
N_CENTRES = 5


def _decode_point(pid: str, packed: int, centres: list[datetime]) -> P:
    """Unpack one integer into (centre, spread, offset within spread, input tz).

    Drawing one integer per point instead of a tuple keeps generation cheap
    enough for the whole file to run in a few seconds.
    """
    packed, c = divmod(packed, N_CENTRES)
    packed, s = divmod(packed, len(SPREADS))
    packed, z = divmod(packed, len(INPUT_TZS))
    frac = (packed % 2001 - 1000) / 1000  # -1.0 .. 1.0
    offset = round(SPREADS[s] * frac)
    t = centres[c] + timedelta(seconds=offset)
    return P(pid, t.astimezone(INPUT_TZS[z]))


# Moments where New York / Berlin clocks fall back (the wall-clock hour repeats)
# or spring forward, plus ISO-year and calendar-year edges.  Clustering points
# here exercises fold handling and the week/year buckets.
EDGES = [
    at("2024-11-03T06:00:00"),  # New York fall-back
    at("2025-10-26T01:00:00"),  # Berlin fall-back
    at("2026-03-08T07:00:00"),  # New York spring-forward
    at("2026-12-28T00:00:00"),  # Monday of 2026-W53
    at("2027-01-01T00:00:00"),
]
_centre = st.one_of(
    st.integers(0, SPAN_SECONDS).map(lambda x: LO.replace(tzinfo=UTC) + timedelta(seconds=x)),
    st.sampled_from(EDGES),
)


@st.composite
def point_lists(draw: st.DrawFn, max_size: int = 40) -> list[P]:
    centres = draw(st.lists(_centre, min_size=N_CENTRES, max_size=N_CENTRES))
    packed = draw(st.lists(st.integers(0, 10**9), max_size=max_size))
    # Ids are a shuffled pool so id order (the tie-breaker) is unrelated to time.
    ids = draw(st.permutations([f"p{i:02d}" for i in range(len(packed))]))
    return [_decode_point(pid, v, centres) for pid, v in zip(ids, packed)]


counts = st.one_of(st.none(), st.integers(0, 6), st.integers(7, 60))
rule_sets = st.builds(RetentionRules, **{name: counts for name in RULE_FIELDS})
nonempty_rule_sets = rule_sets.filter(lambda r: not r.is_empty())
empty_rule_sets = st.builds(
    RetentionRules, **{name: st.sampled_from([None, 0]) for name in RULE_FIELDS}
)


@st.composite
def scenarios(
    draw: st.DrawFn, rules: st.SearchStrategy[RetentionRules] = rule_sets
) -> tuple[list[P], RetentionRules, dict[str, str], datetime, tzinfo]:
    points = draw(point_lists())
    chosen_rules = draw(rules)
    pinned = draw(st.lists(st.sampled_from([p.id for p in points]), max_size=4)) if points else []
    pins = {pid: draw(pin_reasons) for pid in pinned}
    if draw(st.booleans()):
        pins["no-such-point"] = "held"
    # Usually after every point; sometimes inside the range so future points exist.
    choice = draw(st.integers(0, 5))
    if choice == 0:
        now = LO.replace(tzinfo=UTC) + timedelta(seconds=draw(st.integers(0, SPAN_SECONDS)))
        now = now.astimezone(draw(st.sampled_from(INPUT_TZS)))
    elif choice == 1 and points:
        # Right among the points, so some are "in the future".
        anchor = draw(st.sampled_from(points)).time
        now = anchor + timedelta(seconds=draw(st.integers(-3600, 3600)))
        # Often in the anchor's own zone: same-tzinfo comparisons are wall-clock.
        now = now.astimezone(draw(st.sampled_from([anchor.tzinfo, *INPUT_TZS])))
    else:
        now = datetime(2030, 1, 1, tzinfo=UTC)
    tz = draw(st.sampled_from(PLAN_TZS))
    return points, chosen_rules, pins, now, tz


PROPS = settings(deadline=None, max_examples=250)

# --------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------


@PROPS
@given(scenarios())
def test_never_removes_newest_pinned_or_future(sc) -> None:
    points, rules, pins, now, tz = sc
    plan = plan_prune(points, rules, pins, now, tz=tz)
    removed = removed_ids(plan)
    if points:
        newest = min(points, key=_order)
        assert newest.id not in removed
        assert "newest point" in by_id(plan)[newest.id].reasons
    for p in points:
        if p.id in pins:
            assert p.id not in removed
            assert f"pinned: {pins[p.id]}" in by_id(plan)[p.id].reasons
        if _after(p.time, now):
            assert p.id not in removed
            assert "newer than now (clock skew?)" in by_id(plan)[p.id].reasons


@PROPS
@given(scenarios())
def test_idempotent(sc) -> None:
    points, rules, pins, now, tz = sc
    first = plan_prune(points, rules, pins, now, tz=tz)
    survivors = [p for p in points if p.id in kept_ids(first)]
    second = plan_prune(survivors, rules, pins, now, tz=tz)
    assert second.remove == ()
    # Stronger: every survivor is kept for exactly the same reasons.
    assert second.decisions == first.keep


@PROPS
@given(scenarios())
def test_matches_reference(sc) -> None:
    points, rules, pins, now, tz = sc
    plan = plan_prune(points, rules, pins, now, tz=tz)
    expected_keep, per_rule = reference(points, rules, pins, now, tz)
    assert kept_ids(plan) == expected_keep
    if per_rule:
        got_last = {d.point_id for d in plan.decisions if any(r.startswith("last #") for r in d.reasons)}
        assert got_last == per_rule["keep_last"]
        for name, prefix in BUCKET_LABELS.items():
            got = {d.point_id for d in plan.decisions if any(r.startswith(prefix) for r in d.reasons)}
            assert got == per_rule[name], name


@PROPS
@given(scenarios(rules=empty_rule_sets))
def test_empty_retention_removes_nothing(sc) -> None:
    points, rules, pins, now, tz = sc
    plan = plan_prune(points, rules, pins, now, tz=tz)
    assert plan.remove == ()
    assert len(plan.keep) == len(points)


@PROPS
@given(scenarios(rules=nonempty_rule_sets), st.sampled_from(RULE_FIELDS), st.integers(1, 10))
def test_monotone_in_counts(sc, field: str, extra: int) -> None:
    # Only for non-empty policies: going from "no rules" (keep everything) to one
    # rule necessarily keeps less; that is the safety default, not a violation.
    points, rules, pins, now, tz = sc
    bigger = dataclasses.replace(rules, **{field: (getattr(rules, field) or 0) + extra})
    small = kept_ids(plan_prune(points, rules, pins, now, tz=tz))
    large = kept_ids(plan_prune(points, bigger, pins, now, tz=tz))
    assert small <= large


@PROPS
@given(scenarios())
def test_decisions_partition_input_and_have_reasons(sc) -> None:
    points, rules, pins, now, tz = sc
    plan = plan_prune(points, rules, pins, now, tz=tz)
    ids = [d.point_id for d in plan.decisions]
    assert sorted(ids) == sorted(p.id for p in points)
    keep, remove = kept_ids(plan), removed_ids(plan)
    assert keep.isdisjoint(remove)
    assert keep | remove == set(ids)
    for d in plan.decisions:
        assert d.reasons
        assert all(isinstance(r, str) and r for r in d.reasons)
        if not d.keep:
            assert d.reasons == ("matched no keep rule",)
    # newest first, ties by id
    order = [_order(P(d.point_id, d.time)) for d in plan.decisions]
    assert order == sorted(order)
    json.dumps(plan.to_dict())


@PROPS
@given(scenarios(), st.randoms(use_true_random=False))
def test_independent_of_input_order(sc, rnd) -> None:
    points, rules, pins, now, tz = sc
    shuffled = list(points)
    rnd.shuffle(shuffled)
    assert plan_prune(shuffled, rules, pins, now, tz=tz) == plan_prune(points, rules, pins, now, tz=tz)
