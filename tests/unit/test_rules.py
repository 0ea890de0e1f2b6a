"""3-2-1-1-0: which copies count, and exactly why each other one does not."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from drtool.policy.loader import Config
from drtool.policy.models import FilesystemLocation, Policy, ResticLocation
from drtool.policy.rules import LegHealth, assess

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)


def _restic(domain: str, media: str = "hdd", site: str = "home", **kw) -> ResticLocation:
    return ResticLocation(type="restic", repository=f"/r/{domain}", password={"env": "X"}, media=media, site=site, failure_domain=domain, **kw)


def _cfg(legs: list[dict], **locations) -> tuple[Config, Policy]:
    cfg = Config()
    cfg.locations["nas"] = FilesystemLocation(type="filesystem", media="hdd", site="home", failure_domain="nas01")
    cfg.locations.update(locations)
    pol = Policy(name="p", source={"location": "nas", "path": "/d"}, rpo="24h", rto="4h",
                 legs=[{"schedule": "@daily", **leg} for leg in legs])
    cfg.policies["p"] = pol
    return cfg, pol


def _rule(a, name):
    return next(r for r in a.rules if r.rule == name)


def test_full_321_static():
    cfg, pol = _cfg(
        [{"kind": "backup", "to": "usb"}, {"kind": "backup", "to": "cloud"}],
        usb=_restic("usb-disk", media="ssd"), cloud=_restic("gcp", media="cloud-object", site="gcp-us", immutable=True),
    )
    a = assess(pol, cfg)
    assert [c.counts for c in a.copies] == [True, True, True]
    assert _rule(a, "3 copies").ok and _rule(a, "2 media").ok and _rule(a, "1 offsite").ok
    assert _rule(a, "1 immutable or offline").ok
    assert "declared" in _rule(a, "1 immutable or offline").detail
    assert _rule(a, "0 errors").ok is None and a.compliant is None


def test_why_copies_do_not_count():
    cfg, pol = _cfg(
        [
            {"kind": "snapshot"},
            {"kind": "parity"},
            {"kind": "backup", "to": "same-box"},
            {"kind": "backup", "to": "usb1"},
            {"kind": "backup", "to": "usb2"},
        ],
        **{"same-box": _restic("nas01"), "usb1": _restic("usb"), "usb2": _restic("usb")},
    )
    a = assess(pol, cfg)
    why = {c.leg: (c.counts, c.reason) for c in a.copies if c.leg}
    assert why["snapshot"] == (False, "a snapshot on the source's own storage is a recovery point, not an independent copy")
    assert why["parity"] == (False, "SnapRAID parity is protection, not a copy")
    assert why["backup-same-box"][0] is False and "same failure domain as the source ('nas01')" in why["backup-same-box"][1]
    assert why["backup-usb1"][0] is True
    assert why["backup-usb2"][0] is False and "as leg 'backup-usb1': counted once" in why["backup-usb2"][1]
    assert _rule(a, "3 copies").ok is False and "add 1 more" in _rule(a, "3 copies").detail
    assert _rule(a, "2 media").ok is False  # everything is hdd
    assert _rule(a, "1 offsite").ok is False and "site 'home'" in _rule(a, "1 offsite").detail
    assert _rule(a, "1 immutable or offline").ok is False
    assert a.compliant is False


def _health(newest_age: timedelta | None, verified_age: timedelta | None, **kw) -> LegHealth:
    return LegHealth(
        newest_point=None if newest_age is None else NOW - newest_age, point_count=0 if newest_age is None else 3,
        last_verified=None if verified_age is None else NOW - verified_age, verified_level="integrity" if verified_age else None,
        now=NOW, rpo=timedelta(hours=24), verify_every=timedelta(days=7), **kw,
    )


def test_live_copy_counts_only_when_fresh_and_zero_errors_needs_verification():
    cfg, pol = _cfg(
        [{"kind": "backup", "to": "usb"}, {"kind": "backup", "to": "friend"}],
        usb=_restic("usb", media="ssd"), friend=_restic("friend", site="away", offline=True),
    )
    good = {"backup-usb": _health(timedelta(hours=1), timedelta(days=1)), "backup-friend": _health(timedelta(hours=2), timedelta(days=2))}
    a = assess(pol, cfg, good)
    assert a.compliant is True, a.to_dict()

    stale = dict(good, **{"backup-friend": _health(timedelta(hours=30), timedelta(days=2))})
    a = assess(pol, cfg, stale)
    friend = next(c for c in a.copies if c.leg == "backup-friend")
    assert not friend.counts and "older than the RPO 24h" in friend.reason
    assert _rule(a, "3 copies").ok is False and _rule(a, "1 offsite").ok is False
    assert _rule(a, "0 errors").ok is False and "backup-friend" in _rule(a, "0 errors").detail

    unverified = dict(good, **{"backup-usb": _health(timedelta(hours=1), timedelta(days=8))})
    a = assess(pol, cfg, unverified)
    assert _rule(a, "3 copies").ok is True
    assert _rule(a, "0 errors").ok is False
    assert _rule(a, "0 errors").detail == "backup-usb → usb: no passing exists verification within 7d (last: 8d ago)"
    assert a.compliant is False

    missing = dict(good, **{"backup-usb": _health(None, None)})
    a = assess(pol, cfg, missing)
    usb = next(c for c in a.copies if c.leg == "backup-usb")
    assert not usb.counts and usb.reason == "no recovery point exists at the location"

    broken = dict(good, **{"backup-usb": _health(None, None, inventory_error="wrong password")})
    a = assess(pol, cfg, broken)
    usb = next(c for c in a.copies if c.leg == "backup-usb")
    assert not usb.counts and "wrong password" in usb.reason and a.compliant is False


def test_contradicted_immutability_does_not_count():
    cfg, pol = _cfg(
        [{"kind": "backup", "to": "usb"}, {"kind": "backup", "to": "cloud"}],
        usb=_restic("usb", media="ssd"), cloud=_restic("gcp", media="cloud-object", site="gcp", immutable=True),
    )
    h = {
        "backup-usb": _health(timedelta(hours=1), timedelta(hours=1)),
        "backup-cloud": _health(timedelta(hours=1), timedelta(hours=1), immutability="contradicted: the bucket has no retention policy"),
    }
    a = assess(pol, cfg, h)
    r = _rule(a, "1 immutable or offline")
    assert r.ok is False and "claims immutable but contradicted" in r.detail


def test_ceph_snapshots_and_same_cluster_replicas_are_not_copies():
    """Two pools (or an RBD pool and a CephFS) behind one ceph.conf are one cluster: its
    snapshots are recovery points, and a replica there does not count, whatever the
    declared failure_domain; a second cluster (another conf) counts."""
    from drtool.policy.models import CephFsLocation, CephRbdLocation

    def rbd(pool: str, conf: str, domain: str) -> CephRbdLocation:
        return CephRbdLocation(type="ceph-rbd", pool=pool, conf=conf, media="nvme", site="home", failure_domain=domain)

    cfg = Config()
    cfg.locations.update(ceph=rbd("kube", "/etc/ceph/ceph.conf", "ceph-a"), other_pool=rbd("backup", "/etc/ceph//ceph.conf", "ceph-b"),
                         other_cluster=rbd("backup", "/etc/ceph/backup.conf", "ceph-c"))
    pol = Policy(name="vol", source={"location": "ceph", "image": "img"}, rpo="1h", rto="1h",
                 legs=[{"schedule": "@hourly", "kind": "snapshot"}, {"schedule": "@hourly", "kind": "replicate", "to": "other_pool"},
                       {"schedule": "@hourly", "kind": "replicate", "to": "other_cluster"}])
    cfg.policies["vol"] = pol
    why = {c.leg: (c.counts, c.reason) for c in assess(pol, cfg).copies if c.leg}
    assert why["snapshot"] == (False, "a snapshot in the same Ceph cluster is a recovery point, not a copy: it is lost with the cluster")
    assert why["replicate-other_pool"][0] is False and "same Ceph cluster (/etc/ceph//ceph.conf)" in why["replicate-other_pool"][1]
    assert why["replicate-other_cluster"] == (True, "independent copy in failure domain 'ceph-c'")

    cfg.locations["fs"] = CephFsLocation(type="cephfs", path="/shares", media="nvme", site="home", failure_domain="ceph-a")
    pol2 = Policy(name="share", source={"location": "fs"}, rpo="1h", rto="1h", legs=[{"schedule": "@hourly", "kind": "snapshot"}])
    cfg.policies["share"] = pol2
    assert "same Ceph cluster" in next(c.reason for c in assess(pol2, cfg).copies if c.leg == "snapshot")
