"""Leg drivers: (leg kind, location type) -> the driver class, one line each."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..policy.models import Leg, Policy
from .base import LegDriver, LegOutcome
from .cephfs_legs import CephFsSnapshotLeg
from .parity import SnapraidParityLeg
from .rbd_legs import RbdReplicateLeg, RbdSnapshotLeg
from .restic_backup import ResticBackupLeg
from .upload import UploadLeg
from .zfs_legs import ZfsReplicateLeg, ZfsSnapshotLeg

if TYPE_CHECKING:
    from ..engine import Context

DRIVERS: dict[tuple[str, str], type[LegDriver]] = {
    ("backup", "restic"): ResticBackupLeg,
    ("snapshot", "zfs"): ZfsSnapshotLeg,  # keyed by the source's location type
    ("replicate", "zfs"): ZfsReplicateLeg,  # keyed by the target's location type
    ("parity", "snapraid"): SnapraidParityLeg,
    ("upload", "gcs"): UploadLeg,
    ("upload", "s3"): UploadLeg,
    ("snapshot", "ceph-rbd"): RbdSnapshotLeg,
    ("replicate", "ceph-rbd"): RbdReplicateLeg,
    ("snapshot", "cephfs"): CephFsSnapshotLeg,
}


def driver_for(ctx: "Context", policy: Policy, leg: Leg) -> LegDriver:
    where = leg.to or policy.source.location
    ltype = getattr(ctx.cfg.location(where), "type", "?")
    cls = DRIVERS.get((leg.kind, ltype))
    if cls is None:
        raise ConfigError(f"{policy.name}/{leg.leg_name}: {leg.kind} legs on {ltype} locations are not supported by this drtool version")
    return cls(ctx, policy, leg)


def supported(ctx: "Context", policy: Policy, leg: Leg) -> bool:
    where = leg.to or policy.source.location
    return (leg.kind, getattr(ctx.cfg.location(where), "type", "?")) in DRIVERS


__all__ = ["DRIVERS", "LegDriver", "LegOutcome", "driver_for", "supported"]
