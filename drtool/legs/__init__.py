"""Leg drivers: (leg kind, location type) -> the driver class, one line each."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import ConfigError
from ..policy.models import Leg, Policy
from .base import LegDriver, LegOutcome

if TYPE_CHECKING:
    from ..engine import Context

# "module:Class" in this package, imported when a policy uses it: a run loads only its own legs' code
DRIVERS: dict[tuple[str, str], str] = {
    ("backup", "restic"): "restic_backup:ResticBackupLeg",
    ("snapshot", "zfs"): "zfs_legs:ZfsSnapshotLeg",  # keyed by the source's location type
    ("replicate", "zfs"): "zfs_legs:ZfsReplicateLeg",  # keyed by the target's location type
    ("parity", "snapraid"): "parity:SnapraidParityLeg",
    ("upload", "gcs"): "upload:UploadLeg",
    ("upload", "s3"): "upload:UploadLeg",
    ("snapshot", "ceph-rbd"): "rbd_legs:RbdSnapshotLeg",
    ("replicate", "ceph-rbd"): "rbd_legs:RbdReplicateLeg",
    ("snapshot", "cephfs"): "cephfs_legs:CephFsSnapshotLeg",
}


def driver_class(kind: str, location_type: str) -> type[LegDriver] | None:
    """The driver class for a leg kind on a location type (its module imported now), or None."""
    spec = DRIVERS.get((kind, location_type))
    if spec is None:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def driver_for(ctx: "Context", policy: Policy, leg: Leg) -> LegDriver:
    where = leg.to or policy.source.location
    ltype = getattr(ctx.cfg.location(where), "type", "?")
    cls = driver_class(leg.kind, ltype)
    if cls is None:
        raise ConfigError(f"{policy.name}/{leg.leg_name}: {leg.kind} legs on {ltype} locations are not supported by this drtool version")
    return cls(ctx, policy, leg)


def supported(ctx: "Context", policy: Policy, leg: Leg) -> bool:
    where = leg.to or policy.source.location
    return (leg.kind, getattr(ctx.cfg.location(where), "type", "?")) in DRIVERS


__all__ = ["DRIVERS", "LegDriver", "LegOutcome", "driver_class", "driver_for", "supported"]
