"""Ceph RBD snapshot and replicate legs.

Ownership: RBD snapshots carry no user properties, so drtool's are named
``drtool-<policy>-<leg>-<UTC time>``; a leg lists and prunes only names with its own
prefix, never anyone else's snapshot. Protected snapshots (someone's clone parent)
and the replication base are pinned: prune never removes them.

Replication sends the newest snapshot of the policy's snapshot leg with ``rbd
export-diff --from-snap <base> | rbd import-diff`` (full the first time; the target
image is created), where the base is the newest snapshot both sides have. The replica
keeps its own history, pruned by its own retention; the newest common snapshot is the
base on both sides, so prune cannot break the chain.
"""
from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from ..backends.base import RecoveryPoint
from ..backends.ceph_rbd import CephConn, RbdCli, RbdError, RbdNotFound, RbdSnap, keyring_path
from ..errors import BackendError, ConfigError, SourceError, UsageError
from .base import LegDriver, LegOutcome
from .naming import name_time, owned_name, snap_prefix

log = logging.getLogger("drtool.rbd")


def _time(s: RbdSnap, prefix: str) -> datetime:
    return name_time(s.name, prefix, s.timestamp)


class _RbdLeg(LegDriver):
    levels: tuple[str, ...] = ("integrity", "sample")

    def _loc(self, name: str) -> Any:
        loc = self.ctx.cfg.location(name)
        if getattr(loc, "type", "") != "ceph-rbd":
            raise ConfigError(f"location {name} is not a ceph-rbd location")
        return loc

    def _cli(self, name: str) -> RbdCli:
        loc = self._loc(name)
        return self.ctx.backend(f"rbd:{name}", lambda: RbdCli(CephConn(conf=loc.conf, keyring=keyring_path(loc, name), client_id=loc.client_id)))

    @property
    def image(self) -> str:
        assert self.policy.source.image
        return self.policy.source.image

    @property
    def snapshot_leg(self) -> str:
        legs = [leg.leg_name for leg in self.policy.legs if leg.kind == "snapshot"]
        if not legs:
            raise UsageError(f"{self.policy.name}: a replicate leg sends the policy's own snapshots: add a snapshot leg")
        return legs[0]

    def _points(self, location: str, pool: str, image: str, prefix: str) -> list[RecoveryPoint]:
        try:
            snaps = self._cli(location).list_snaps(pool, image)
        except RbdNotFound:
            return []
        out = [RecoveryPoint(id=f"{pool}/{image}@{s.name}", time=_time(s, prefix), location=location, policy=self.policy.name,
                             leg=self.leg.leg_name, size_bytes=s.size, meta={"protected": s.protected, "snap_id": s.id})
               for s in snaps if s.name.startswith(prefix)]
        return sorted(out, key=lambda p: p.time)

    def _delete(self, location: str, point_ids: list[str], owned: set[str]) -> None:
        cli = self._cli(location)
        for pid in point_ids:
            if pid not in owned:
                raise BackendError(f"refusing to remove {pid}: not a snapshot drtool made for {self.policy.name}/{self.leg.leg_name}")
            spec, snap = pid.split("@", 1)
            pool, image = spec.split("/", 1)
            cli.snap_remove(pool, image, snap)

    def commands(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for name in {self.policy.source.location, *([self.leg.to] if self.leg.to else [])}:
            cli = self._cli(name)
            out.extend(cli.commands)
            cli.commands.clear()
        return out

    @staticmethod
    def _clone_restore(cli: RbdCli, point: RecoveryPoint, pool: str, image: str, snap: str, target: tuple[str, str],
                       where: str) -> LegOutcome:
        """Clone ``pool/image@snap`` into the new image ``target`` (flattened) and prove it
        hashes like the snapshot."""
        new_pool, new_image = target
        cli.clone(pool, image, snap, new_pool, new_image, flatten=True)
        want, _ = cli.export_hash(pool, image, snap)
        got, n = cli.export_hash(new_pool, new_image, None)
        mismatches = [] if want == got else [f"{new_pool}/{new_image} hashes {got[:12]}…, the snapshot {want[:12]}…"]
        return LegOutcome(point=point, bytes_processed=n, detail={"image": f"{new_pool}/{new_image}", "mismatches": mismatches},
                          message=f"cloned {point.id} into {where}{new_pool}/{new_image} (flattened)"
                                  + ("; SHA-256 matches the snapshot" if not mismatches else ""))

    def _hash_check(self, level: str, a: tuple[RbdCli, str, str, str], b: tuple[RbdCli, str, str, str] | None) -> dict[str, Any]:
        """integrity: stream the whole snapshot(s) through SHA-256 (and compare the two sides);
        sample: hash 16 random 1 MiB extents on both sides."""
        cli, pool, image, snap = a
        if level == "sample":
            size = next(s.size for s in cli.list_snaps(pool, image) if s.name == snap)
            extent = 1 << 20
            rng = random.Random()
            offsets = sorted({rng.randrange(0, max(1, size - extent)) for _ in range(16)})
            mine = cli.extent_hashes(pool, image, snap, offsets, extent)
            if b is None:
                return {"level": "sample", "ok": True, "message": f"{pool}/{image}@{snap}: {len(mine)} random extents read back"}
            theirs = b[0].extent_hashes(b[1], b[2], b[3], offsets, extent)
            bad = [o for o in offsets if mine.get(o) != theirs.get(o)]
            msg = (f"{len(bad)} of {len(offsets)} random 1 MiB extents differ between {pool}/{image}@{snap} and the replica"
                   if bad else f"{len(offsets)} random 1 MiB extents of {pool}/{image}@{snap} match the replica's")
            return {"level": "sample", "ok": not bad, "message": msg}
        digest, n = cli.export_hash(pool, image, snap)
        if b is None:
            return {"level": "integrity", "ok": True, "message": f"{pool}/{image}@{snap} exports whole: {n} bytes, SHA-256 {digest[:12]}…",
                    "sha256": digest}
        other, m = b[0].export_hash(b[1], b[2], b[3])
        ok = digest == other and n == m
        msg = (f"{pool}/{image}@{snap} and {b[1]}/{b[2]}@{b[3]} hash the same ({n} bytes, SHA-256 {digest[:12]}…)" if ok else
               f"{pool}/{image}@{snap} ({digest[:12]}…, {n} B) differs from the replica {b[1]}/{b[2]}@{b[3]} ({other[:12]}…, {m} B)")
        return {"level": "integrity", "ok": ok, "message": msg}


class RbdSnapshotLeg(_RbdLeg):
    """snapshot legs: ``rbd snap create`` of the source image, in its own pool."""

    @property
    def pool(self) -> str:
        return self._loc(self.policy.source.location).pool

    def _name(self) -> str:
        return owned_name(self.policy.name, self.leg.leg_name, self.ctx.now())

    def describe(self) -> str:
        return f"would snapshot {self.pool}/{self.image} as {self._name()}"

    def run(self, rec: Any) -> LegOutcome:
        cli = self._cli(self.policy.source.location)
        rec.start()
        name = self._name()
        try:
            snap = cli.snap_create(self.pool, self.image, name)
        except RbdNotFound:
            raise SourceError(f"source image {self.pool}/{self.image} does not exist") from None
        point = RecoveryPoint(id=f"{self.pool}/{self.image}@{name}", time=_time(snap, snap_prefix(self.policy.name, self.leg.leg_name)),
                              location=self.location, policy=self.policy.name, leg=self.leg.leg_name, size_bytes=snap.size)
        return LegOutcome(point=point, message=f"snapshot {point.id} ({snap.size} bytes provisioned)", detail={"snapshot": point.id})

    def points(self) -> list[RecoveryPoint]:
        return self._points(self.location, self.pool, self.image, snap_prefix(self.policy.name, self.leg.leg_name))

    def delete(self, point_ids: list[str]) -> None:
        self._delete(self.location, point_ids, {p.id for p in self.points()})

    def pins(self, points: list[RecoveryPoint]) -> dict[str, str]:
        pinned = {p.id: "protected (a clone's parent)" for p in points if p.meta.get("protected")}
        for leg in self.policy.legs:  # the newest snapshot each replica shares with us is its next base
            if leg.kind == "replicate":
                from . import driver_for

                base = driver_for(self.ctx, self.policy, leg).base_snapshot()  # type: ignore[attr-defined]
                if base:
                    pinned[f"{self.pool}/{self.image}@{base}"] = f"the replication base of {leg.leg_name}"
        return pinned

    def check(self, level: str, points: list[RecoveryPoint]) -> dict[str, Any]:
        snap = points[-1].id.split("@", 1)[1]
        return self._hash_check(level, (self._cli(self.location), self.pool, self.image, snap), None)

    def restore_preflight(self, target: str | None, *, force: bool = False, rollback: bool = False) -> None:
        if rollback:
            if target not in (None, f"{self.pool}/{self.image}", self.image):
                raise UsageError(f"--rollback acts on {self.pool}/{self.image} in place: drop --target")
            return
        if not target:
            raise UsageError(f"restoring an RBD snapshot clones it into a new image: --target <pool>/<new-image> (or a name in {self.pool})")
        pool, image = _split(target, self.pool)
        if self._cli(self.location).image_exists(pool, image):
            raise UsageError(f"{pool}/{image} already exists: choose a new image name (a restore never overwrites)")

    def restore(self, point: RecoveryPoint, target: str | None, *, include: tuple[str, ...] = (), force: bool = False,
                rollback: bool = False, destroy_newer: bool = False) -> LegOutcome:
        """Clone (protect → clone → flatten) into a new image and prove it hashes like the snapshot;
        or roll the image back in place (guarded by --rollback)."""
        self.restore_preflight(target, rollback=rollback)
        cli = self._cli(self.location)
        snap = point.id.split("@", 1)[1]
        if rollback:
            cli.rollback(self.pool, self.image, snap)
            return LegOutcome(point=point, message=f"rolled {self.pool}/{self.image} back to {snap}", detail={"rollback": True})
        return self._clone_restore(cli, point, self.pool, self.image, snap, _split(target, self.pool), "")  # type: ignore[arg-type]


class RbdReplicateLeg(_RbdLeg):
    """replicate legs: ``rbd export-diff | rbd import-diff`` into an image in the target pool."""

    @property
    def src_pool(self) -> str:
        return self._loc(self.policy.source.location).pool

    @property
    def dst_pool(self) -> str:
        return self._loc(self.leg.to).pool  # type: ignore[arg-type]

    @property
    def dst_image(self) -> str:
        return self.leg.dataset or self.image

    def _source_snaps(self) -> list[RbdSnap]:
        prefix = snap_prefix(self.policy.name, self.snapshot_leg)
        try:
            snaps = self._cli(self.policy.source.location).list_snaps(self.src_pool, self.image)
        except RbdNotFound:
            raise SourceError(f"source image {self.src_pool}/{self.image} does not exist") from None
        return [s for s in snaps if s.name.startswith(prefix)]

    def _target_snaps(self) -> list[RbdSnap]:
        try:
            return self._cli(self.leg.to).list_snaps(self.dst_pool, self.dst_image)  # type: ignore[arg-type]
        except RbdNotFound:
            return []

    def _target_names(self) -> set[str]:
        return {s.name for s in self._target_snaps()}

    def base_snapshot(self) -> str | None:
        """The newest drtool snapshot both sides have: the next incremental's base. None
        when there is none, or the source image is gone; a cluster that cannot be read
        raises (prune then stops rather than lose the base's pin)."""
        on_target = self._target_names()
        try:
            common = [s.name for s in self._source_snaps() if s.name in on_target]
        except SourceError:
            return None
        return common[-1] if common else None

    def describe(self) -> str:
        try:
            base = self.base_snapshot()
            how = f"incremental from {base}" if base else "full"
        except RbdError as e:
            how = f"base unknown: {e}"
        return f"would send the newest snapshot of {self.src_pool}/{self.image} to {self.leg.to}:{self.dst_pool}/{self.dst_image} ({how})"

    def run(self, rec: Any) -> LegOutcome:
        with ThreadPoolExecutor(2, thread_name_prefix="rbd-list") as pool:  # both sides at once: each rbd call connects to a cluster
            src_all = pool.submit(self._cli(self.policy.source.location).list_snaps, self.src_pool, self.image)
            dst_all = pool.submit(self._target_snaps)
            try:
                src_listed = src_all.result()
            except RbdNotFound:
                raise SourceError(f"source image {self.src_pool}/{self.image} does not exist") from None
            dst_listed = dst_all.result()
        prefix = snap_prefix(self.policy.name, self.snapshot_leg)
        snaps = [s for s in src_listed if s.name.startswith(prefix)]
        if not snaps:
            raise SourceError(f"{self.src_pool}/{self.image} has no snapshot of {self.policy.name}/{self.snapshot_leg} yet: run the snapshot leg first")
        newest = snaps[-1]
        on_target = {s.name for s in dst_listed}
        if newest.name in on_target:
            raise UsageError(f"{self.dst_pool}/{self.dst_image} already has {newest.name}: take a new snapshot first")
        common = [s.name for s in snaps if s.name in on_target]
        base = common[-1] if common else None
        if on_target and base is None:
            raise BackendError(f"{self.leg.to}:{self.dst_pool}/{self.dst_image} exists but shares no drtool snapshot with the source: "
                               "it is not this policy's replica, or its base was removed; remove or rename it to start a full replica")
        src, dst = self._cli(self.policy.source.location), self._cli(self.leg.to)  # type: ignore[arg-type]
        rec.start()
        with self.ctx.ui.task(f"{self.policy.name}/{self.leg.leg_name}: {'incremental' if base else 'full'} → {self.leg.to}") as task:
            sent = src.replicate(self.src_pool, self.image, newest.name, dst, self.dst_pool, self.dst_image, from_snap=base,
                                 force=self.ctx.force, progress=lambda p: task.update(completed=p.get("bytes", 0)),
                                 src_snaps=src_listed, dst_snaps=dst_listed if on_target else None)
        point = RecoveryPoint(id=f"{self.dst_pool}/{self.dst_image}@{newest.name}",
                              time=_time(newest, snap_prefix(self.policy.name, self.snapshot_leg)), location=self.leg.to,  # type: ignore[arg-type]
                              policy=self.policy.name, leg=self.leg.leg_name, size_bytes=newest.size)
        return LegOutcome(point=point, bytes_processed=sent,
                          message=f"sent {newest.name} to {self.leg.to}:{self.dst_pool}/{self.dst_image} "
                                  f"({'incremental from ' + base if base else 'full'}, {sent} bytes)",
                          detail={"base": base, "bytes": sent})

    def points(self) -> list[RecoveryPoint]:
        return self._points(self.leg.to, self.dst_pool, self.dst_image, snap_prefix(self.policy.name, self.snapshot_leg))  # type: ignore[arg-type]

    def delete(self, point_ids: list[str]) -> None:
        self._delete(self.leg.to, point_ids, {p.id for p in self.points()})  # type: ignore[arg-type]

    def pins(self, points: list[RecoveryPoint]) -> dict[str, str]:
        pinned = {p.id: "protected (a clone's parent)" for p in points if p.meta.get("protected")}
        base = self.base_snapshot()
        if base:
            pinned[f"{self.dst_pool}/{self.dst_image}@{base}"] = "the replication base (the newest snapshot both sides share)"
        return pinned

    def check(self, level: str, points: list[RecoveryPoint]) -> dict[str, Any]:
        """The newest replica snapshot against the same snapshot on the source (when it still exists)."""
        snap = points[-1].id.split("@", 1)[1]
        mine = (self._cli(self.leg.to), self.dst_pool, self.dst_image, snap)  # type: ignore[arg-type]
        try:
            source = {s.name for s in self._source_snaps()}
        except SourceError:  # the source image is gone (the disaster): the replica is checked alone
            source = set()
        other = (self._cli(self.policy.source.location), self.src_pool, self.image, snap) if snap in source else None
        out = self._hash_check(level, mine, other)
        if other is None:
            out["message"] += " (the source no longer has this snapshot: checked on the replica alone)"
        return out

    def restore_preflight(self, target: str | None, *, force: bool = False, rollback: bool = False) -> None:
        if rollback or not target:
            raise UsageError(f"a replica restores by cloning into a new image in {self.leg.to}: --target <pool>/<new-image>")
        pool, image = _split(target, self.dst_pool)
        if self._cli(self.leg.to).image_exists(pool, image):  # type: ignore[arg-type]
            raise UsageError(f"{pool}/{image} already exists: choose a new image name (a restore never overwrites)")

    def restore(self, point: RecoveryPoint, target: str | None, *, include: tuple[str, ...] = (), force: bool = False,
                rollback: bool = False, destroy_newer: bool = False) -> LegOutcome:
        self.restore_preflight(target, rollback=rollback)
        cli = self._cli(self.leg.to)  # type: ignore[arg-type]
        snap = point.id.split("@", 1)[1]
        return self._clone_restore(cli, point, self.dst_pool, self.dst_image, snap, _split(target, self.dst_pool),  # type: ignore[arg-type]
                                   f"{self.leg.to}:")


def _split(target: str, default_pool: str) -> tuple[str, str]:
    pool, _, image = target.rpartition("/")
    return (pool or default_pool), image
