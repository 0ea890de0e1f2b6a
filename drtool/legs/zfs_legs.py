"""ZFS snapshot and replicate legs.

Ownership: drtool's snapshots are named ``drtool-<policy>-<UTC time>`` and carry
the user properties ``drtool:policy`` and ``drtool:leg`` set ON the snapshot (not
inherited), so listing for prune never returns anyone else's snapshot.

Replication sends the newest snapshot of the policy's snapshot leg, full the
first time and then ``-I`` from the last common snapshot (matched by guid), so
the replica keeps the history and prunes it by its own retention. After a
successful receive the new base is held on both sides (tag
``drtool-<policy>-<leg>``) and the previous base released: a held snapshot is
pinned by prune on both sides, so the chain cannot break.
"""
from __future__ import annotations

import logging
import random
import secrets
import time
from datetime import datetime
from typing import Any, Callable

from ..backends.base import RecoveryPoint
from ..backends.zfs import BUSY_RETRY_S, ZfsCli, ZfsDiverged, ZfsError, ZfsNotFound, ZfsSnapshot
from .. import exec as ex
from ..errors import BackendError, ConfigError, SourceError, UsageError
from ..policy.models import ZfsLocation
from .base import LegDriver, LegOutcome
from .naming import stamp

log = logging.getLogger("drtool.zfs")

PROP_POLICY = "drtool:policy"
PROP_LEG = "drtool:leg"
PROP_REPLICA_OF = "drtool:replica-of"


def snapshot_name(policy: str, when: datetime) -> str:
    return f"drtool-{policy}-{stamp(when)}"


def _point(s: ZfsSnapshot, location: str, policy: str | None, leg: str | None) -> RecoveryPoint:
    return RecoveryPoint(
        id=s.name, time=s.creation, location=location, policy=policy, leg=leg, size_bytes=s.referenced,
        meta={"guid": s.guid, "createtxg": s.createtxg, "userrefs": s.userrefs, "owned": True},
    )


def _owned(snaps: list[ZfsSnapshot], policy: str | None = None, leg: str | None = None) -> list[ZfsSnapshot]:
    out = [s for s in snaps if s.snap.startswith("drtool-") and PROP_POLICY in s.properties]
    if policy is not None:
        out = [s for s in out if s.properties.get(PROP_POLICY) == policy]
    if leg is not None:
        out = [s for s in out if s.properties.get(PROP_LEG) == leg]
    return sorted(out, key=lambda s: s.createtxg)


def choose_base(source_snaps: list[ZfsSnapshot], bookmarks: list[tuple[str, str]],
                target_snaps: list[ZfsSnapshot]) -> tuple[str | None, ZfsSnapshot | None]:
    """The incremental base: the newest source snapshot the target also has (same guid),
    else the newest bookmark of a snapshot the target has (OpenZFS: the snapshot itself
    may be gone). (base name, the target's snapshot of it); (None, None): full send."""
    on_target = {s.guid: s for s in target_snaps}
    common = [s for s in source_snaps if s.guid in on_target]
    if common:
        return common[-1].name, on_target[common[-1].guid]
    marks = [(name, on_target[guid]) for name, guid in bookmarks if guid in on_target]
    if marks:
        name, snap = max(marks, key=lambda m: m[1].createtxg)
        return name, snap
    return None, None


def bookmark_name(snapshot: ZfsSnapshot, leg: str) -> str:
    """``ds#<snapshot>.<leg>``: one replication-base bookmark per leg, named after its snapshot."""
    return f"{snapshot.dataset}#{snapshot.snap}.{leg}"


class _ZfsLeg(LegDriver):
    levels: tuple[str, ...] = ("integrity",)

    def _cli(self, location: str) -> ZfsCli:
        loc = self.ctx.cfg.location(location)
        if not isinstance(loc, ZfsLocation):
            raise ConfigError(f"location {location} is not a zfs location")
        return self.ctx.backend(f"zfs:{location}", lambda: ZfsCli(ssh=loc.ssh, ssh_options=loc.ssh_options,
                                                                  features_cache=self.ctx.state_dir / "zfs-features.json"))

    @property
    def source_dataset(self) -> str:
        assert self.policy.source.dataset
        return self.policy.source.dataset

    def _clis(self) -> list[ZfsCli]:
        return [self._cli(self.policy.source.location)]

    def commands(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for cli in {id(c): c for c in self._clis()}.values():
            out.extend(cli.commands)
            cli.commands.clear()
        return out

    def pins(self, points: list[RecoveryPoint]) -> dict[str, str]:
        return {p.id: f"held ({p.meta.get('userrefs')} hold(s)): a replication base or someone's hold"
                for p in points if (p.meta.get("userrefs") or 0) > 0}

    def _pool_check(self, cli: ZfsCli, dataset: str) -> dict[str, Any]:
        pool = dataset.split("/")[0]
        st = cli.pool_status(pool)
        scrub = st.last_scrub_end
        age = f"last scrub {scrub:%Y-%m-%d %H:%M}Z" if scrub else "never scrubbed"
        errors = st.scan_errors or 0
        ok = st.healthy and errors == 0
        msg = f"pool {pool}: {st.state}, {age}" + (f", scrub found {errors} error(s)" if errors else "") + (
            "" if st.healthy else f": {st.status or 'not healthy'}")
        return {"level": "integrity", "ok": ok, "message": msg, "pool": pool, "state": st.state,
                "last_scrub": scrub.isoformat() if scrub else None, "scrub_errors": errors}


class ZfsSnapshotLeg(_ZfsLeg):
    """snapshot legs: ``zfs snapshot [-r]`` of the source dataset, on its own pool."""

    def describe(self) -> str:
        rec = " recursively" if self.policy.source.recursive else ""
        return f"would snapshot {self.source_dataset}{rec} as {snapshot_name(self.policy.name, self.ctx.now())}"

    def run(self, rec: Any) -> LegOutcome:
        cli = self._cli(self.policy.source.location)
        ds = self.source_dataset
        rec.start()
        name = snapshot_name(self.policy.name, self.ctx.now())
        try:
            full = cli.snapshot(ds, name, recursive=self.policy.source.recursive,
                                properties={PROP_POLICY: self.policy.name, PROP_LEG: self.leg.leg_name})
        except ZfsNotFound:
            raise SourceError(f"source dataset {ds} does not exist (is the pool imported?)") from None
        snap = next((s for s in cli.list_snapshots(ds) if s.name == full), None)
        if snap is None:
            raise BackendError(f"zfs reported snapshot {full} made, but listing {ds} does not show it")
        return LegOutcome(point=_point(snap, self.location, self.policy.name, self.leg.leg_name),
                          message=f"snapshot {full} ({snap.referenced} bytes referenced)",
                          detail={"snapshot": full, "guid": snap.guid, "recursive": self.policy.source.recursive})

    def points(self) -> list[RecoveryPoint]:
        snaps = self._cli(self.location).list_snapshots(self.source_dataset)
        return [_point(s, self.location, self.policy.name, self.leg.leg_name) for s in _owned(snaps, self.policy.name, self.leg.leg_name)]

    def location_points(self) -> list[RecoveryPoint]:
        loc = self.ctx.cfg.location(self.location)
        snaps = self._cli(self.location).list_snapshots(loc.dataset, recursive=True)  # type: ignore[attr-defined]
        return [_point(s, self.location, s.properties.get(PROP_POLICY), s.properties.get(PROP_LEG)) for s in _owned(snaps)]

    def delete(self, point_ids: list[str]) -> None:
        cli = self._cli(self.location)
        owned = {p.id for p in self.points()}
        for pid in point_ids:
            if pid not in owned:  # belt and braces: prune only hands us owned ids
                raise BackendError(f"refusing to destroy {pid}: not a snapshot drtool made for {self.policy.name}/{self.leg.leg_name}")
            if self.policy.source.recursive:
                snap = pid.split("@", 1)[1]
                children = [s.name for s in cli.list_snapshots(self.source_dataset, recursive=True) if s.snap == snap and s.name != pid]
                for child in sorted(children, key=len, reverse=True):
                    cli.destroy_snapshot(child)
            cli.destroy_snapshot(pid)

    def check(self, level: str, points: list[RecoveryPoint]) -> dict[str, Any]:
        return self._pool_check(self._cli(self.location), self.source_dataset)

    def restore_preflight(self, target: str | None, *, force: bool = False, rollback: bool = False) -> None:
        if rollback and target not in (None, self.source_dataset):
            raise UsageError(f"--rollback acts on the source dataset {self.source_dataset} in place: drop --target")
        if not rollback:
            pool = self.source_dataset.split("/")[0]
            if not target or target.split("/")[0] != pool or "@" in target:
                raise UsageError(f"restoring a snapshot clones it into a new dataset on the same pool: --target {pool}/<new-name>")
            if self._cli(self.location).dataset_exists(target):
                raise UsageError(f"{target} already exists: choose a new dataset name (a restore never overwrites)")

    def restore(self, point: RecoveryPoint, target: str | None, *, include: tuple[str, ...] = (), force: bool = False,
                rollback: bool = False, destroy_newer: bool = False) -> LegOutcome:
        cli = self._cli(self.location)
        self.restore_preflight(target, rollback=rollback)
        if rollback:
            newer = [s.name for s in cli.list_snapshots(self.source_dataset) if s.createtxg > int(point.meta.get("createtxg", 0))]
            if newer and not destroy_newer:
                raise UsageError(f"rolling back to {point.id} would destroy {len(newer)} newer snapshot(s) "
                                 f"({', '.join(newer[:3])}{', …' if len(newer) > 3 else ''}): restore into a clone instead, "
                                 "or pass --destroy-newer")
            cli.rollback(point.id, destroy_newer=bool(newer))
            return LegOutcome(point=point, message=f"rolled {self.source_dataset} back to {point.id}" + (f", destroying {len(newer)} newer snapshot(s)" if newer else ""),
                              detail={"rollback": True, "destroyed": newer})
        cli.clone(point.id, target)  # type: ignore[arg-type]
        mountpoint = cli.get_property(target, "mountpoint")  # type: ignore[arg-type]
        return LegOutcome(point=point, message=f"cloned {point.id} to {target} (mounted at {mountpoint})",
                          detail={"dataset": target, "mountpoint": mountpoint, "origin": point.id})


class ZfsReplicateLeg(_ZfsLeg):
    """replicate legs: ``zfs send [-I base] | zfs receive`` into a replica dataset."""

    levels = ("integrity", "sample")

    @property
    def target_dataset(self) -> str:
        if self.leg.dataset:
            return self.leg.dataset
        root = self.ctx.cfg.location(self.leg.to).dataset  # type: ignore[arg-type,attr-defined]
        return f"{root}/{self.source_dataset.rsplit('/', 1)[-1]}"

    @property
    def hold_tag(self) -> str:
        return f"drtool-{self.policy.name}-{self.leg.leg_name}"

    def _clis(self) -> list[ZfsCli]:
        return [self._cli(self.policy.source.location), self._cli(self.leg.to)]  # type: ignore[arg-type]

    def _snapshot_leg(self) -> str:
        legs = [leg.leg_name for leg in self.policy.legs if leg.kind == "snapshot"]
        if not legs:
            raise ConfigError(f"{self.policy.name}/{self.leg.leg_name}: a replicate leg sends the policy's own snapshots: add a snapshot leg")
        return legs[0]

    def describe(self) -> str:
        return f"would replicate the newest snapshot of {self.source_dataset} to {self.target_dataset} on {self.leg.to}"

    def run(self, rec: Any) -> LegOutcome:
        src, dst = self._cli(self.policy.source.location), self._cli(self.leg.to)  # type: ignore[arg-type]
        ds, tds = self.source_dataset, self.target_dataset
        try:
            source_snaps = _owned(src.list_snapshots(ds), self.policy.name, self._snapshot_leg())
        except ZfsNotFound:
            raise SourceError(f"source dataset {ds} does not exist (is the pool imported?)") from None
        if not source_snaps:
            raise SourceError(f"{ds} has no snapshot of {self.policy.name}/{self._snapshot_leg()} to replicate yet: run the snapshot leg first")
        newest = source_snaps[-1]
        rec.start()
        resumed = self._resume(src, dst, tds, newest)
        try:
            target_snaps, exists = dst.list_snapshots(tds), True
        except ZfsNotFound:
            target_snaps, exists = [], False
        by_guid = {s.guid: s for s in target_snaps}
        base_name, base_on_target = choose_base(source_snaps, src.list_bookmarks(ds), target_snaps)
        common = [s for s in source_snaps if s.guid in by_guid]
        if newest.guid in by_guid:
            point = self._tag_and_hold(src, dst, newest, by_guid[newest.guid], previous=None)
            return LegOutcome(point=point, message=f"{tds} is up to date: {newest.snap} is already replicated" + resumed)
        force = self.ctx.force
        if exists and base_name is None and not force:
            raise ZfsDiverged(
                f"{tds} exists on {self.leg.to} but shares no snapshot with {ds}: drtool will not overwrite it. "
                f"Fix: rename or destroy {tds} (zfs rename / zfs destroy -r) and run again for a full send, "
                "or run with --force to overwrite it (its data and snapshots are lost)", "")
        base = common[-1] if common else None
        raw = src.encrypted(ds)
        with self.ctx.ui.task(f"{self.policy.name}/{self.leg.leg_name}: zfs send {newest.snap} → {self.leg.to}") as task:
            def send(force_receive: bool) -> Any:
                return src.send_receive(newest.name, tds, base=base_name, incremental_all=True, target=dst, raw=raw,
                                        force=force_receive, progress=lambda d: task.update(completed=d.get("bytes", 0)))
            try:
                if force and exists and base_name is None:
                    result = self._forced_full(dst, tds, send)
                else:
                    result = send(False)
            except ZfsDiverged as exc:
                if not force:
                    raise ZfsDiverged(f"{exc} (or run with --force to roll the replica back: its changes since "
                                      f"{base.snap if base else 'its last snapshot'} are lost)", exc.stderr) from None
                log.warning("%s/%s: --force: receiving with -F into %s after: %s", self.policy.name, self.leg.leg_name, tds, exc)
                result = send(True)
        if not exists:
            dst.set_property(tds, "readonly", "on")
            dst.set_property(tds, PROP_REPLICA_OF, f"{self.policy.name}/{self.leg.leg_name}")
        received = {s.guid: s for s in dst.list_snapshots(tds)}
        if newest.guid not in received:
            raise BackendError(f"zfs receive into {tds} reported success, but {newest.snap} (guid {newest.guid}) is not there")
        # tag every received drtool snapshot as this leg's, so its prune can see them
        for s in source_snaps:
            r = received.get(s.guid)
            if r is not None and r.properties.get(PROP_LEG) != self.leg.leg_name:
                dst.set_property(r.name, PROP_POLICY, self.policy.name)
                dst.set_property(r.name, PROP_LEG, self.leg.leg_name)
        point = self._tag_and_hold(src, dst, newest, received[newest.guid],
                                   previous=(base, by_guid.get(base.guid)) if base else (None, base_on_target) if base_on_target else None)
        self._bookmark(src, newest)
        kind = f"incremental from {base_name.split('@')[-1]}" if base_name else "full"
        return LegOutcome(point=point, bytes_processed=result.bytes,
                          message=f"replicated {newest.snap} to {tds} ({kind}, {result.bytes} bytes{', raw' if raw else ''})" + resumed,
                          detail={"snapshot": newest.name, "target": tds, "base": base_name, "bytes": result.bytes, "raw": raw})

    def _resume(self, src: ZfsCli, dst: ZfsCli, tds: str, newest: ZfsSnapshot) -> str:
        """Finish a receive that was cut short (OpenZFS ``receive -s`` left a token) before
        anything else: the bytes already received are not sent again."""
        token = dst.resume_token(tds)
        if not token:
            return ""
        log.info("%s/%s: resuming the interrupted receive into %s", self.policy.name, self.leg.leg_name, tds)
        result = src.send_receive(newest.name, tds, token=token, target=dst)
        return f"; resumed an interrupted receive first ({result.bytes} bytes)"

    def _bookmark(self, src: ZfsCli, newest: ZfsSnapshot) -> None:
        """Where bookmarks exist: bookmark the new base on the source and drop this leg's
        older base bookmarks, so the chain survives even if the snapshot is destroyed."""
        if not src.features().bookmarks:
            return
        name = bookmark_name(newest, self.leg.leg_name)
        src.bookmark(newest.name, name)
        prefix, suffix = f"{newest.dataset}#drtool-{self.policy.name}-", f".{self.leg.leg_name}"
        for old, _ in src.list_bookmarks(newest.dataset):
            if old != name and old.startswith(prefix) and old.endswith(suffix):
                src.destroy_bookmark(old)

    @staticmethod
    def _forced_full(dst: ZfsCli, tds: str, send: Callable[[bool], Any]) -> Any:
        """``receive -F`` of a full stream over an unrelated dataset (only with --force).
        The target is unmounted first, and a receive that failed on a busy mount
        (zfs-fuse answers "I/O error") is retried for a few seconds: a failed receive
        leaves the target as it was."""
        dst.unmount(tds)
        deadline = time.monotonic() + BUSY_RETRY_S
        while True:
            try:
                return send(True)
            except ZfsError as exc:
                transient = "I/O error" in exc.stderr or "busy" in exc.stderr
                if not transient or time.monotonic() >= deadline:
                    raise
                log.info("zfs receive -F into %s: %s; retrying", tds, exc.stderr)
                time.sleep(0.5)
                dst.unmount(tds)

    def _tag_and_hold(self, src: ZfsCli, dst: ZfsCli, newest: ZfsSnapshot, replica: ZfsSnapshot, previous: Any) -> RecoveryPoint:
        """Hold the new common snapshot on both sides, then release the previous base."""
        src.hold(self.hold_tag, newest.name)
        placed = dst.hold(self.hold_tag, replica.name)
        if previous:
            old_src, old_dst = previous
            if old_src is not None:
                src.release(self.hold_tag, old_src.name, missing_ok=True)
            if old_dst is not None:
                dst.release(self.hold_tag, old_dst.name, missing_ok=True)
        point = _point(replica, self.leg.to, self.policy.name, self.leg.leg_name)  # type: ignore[arg-type]
        point.meta["userrefs"] = replica.userrefs + (1 if placed else 0)
        return point

    def points(self) -> list[RecoveryPoint]:
        dst = self._cli(self.leg.to)  # type: ignore[arg-type]
        try:
            snaps = dst.list_snapshots(self.target_dataset)
        except ZfsNotFound:
            return []
        return [_point(s, self.location, self.policy.name, self.leg.leg_name) for s in _owned(snaps, self.policy.name, self.leg.leg_name)]

    def location_points(self) -> list[RecoveryPoint]:
        loc = self.ctx.cfg.location(self.location)
        try:
            snaps = self._cli(self.location).list_snapshots(loc.dataset, recursive=True)  # type: ignore[attr-defined]
        except ZfsNotFound:
            return []
        return [_point(s, self.location, s.properties.get(PROP_POLICY), s.properties.get(PROP_LEG)) for s in _owned(snaps)]

    def delete(self, point_ids: list[str]) -> None:
        dst = self._cli(self.leg.to)  # type: ignore[arg-type]
        owned = {p.id for p in self.points()}
        for pid in point_ids:
            if pid not in owned:
                raise BackendError(f"refusing to destroy {pid}: not a replica snapshot drtool made for {self.policy.name}/{self.leg.leg_name}")
            dst.destroy_snapshot(pid)

    def check(self, level: str, points: list[RecoveryPoint]) -> dict[str, Any]:
        if level == "sample":
            return self._sample(points)
        src, dst = self._cli(self.policy.source.location), self._cli(self.leg.to)  # type: ignore[arg-type]
        pool = self._pool_check(dst, self.target_dataset)
        newest = points[-1]
        snap = newest.id.split("@", 1)[1]
        twin = next((s for s in src.list_snapshots(self.source_dataset) if s.snap == snap), None)
        if twin is None:
            guid_msg, guid_ok = f"{snap} no longer exists on the source to compare guids", True
        else:
            guid_ok = twin.guid == newest.meta.get("guid")
            guid_msg = f"guid of {snap} matches the source" if guid_ok else f"guid of {snap} differs: replica {newest.meta.get('guid')} vs source {twin.guid}"
        pool["ok"] = pool["ok"] and guid_ok
        pool["message"] = f"{pool['message']}; {guid_msg}"
        return pool

    def _sample(self, points: list[RecoveryPoint]) -> dict[str, Any]:
        """Clone the newest common snapshot on both sides, hash a random sample of files
        on each side (sha256sum, locally or over ssh), compare, destroy the clones."""
        src, dst = self._cli(self.policy.source.location), self._cli(self.leg.to)  # type: ignore[arg-type]
        source_by_guid = {s.guid: s for s in src.list_snapshots(self.source_dataset)}
        common = [p for p in points if p.meta.get("guid") in source_by_guid]
        if not common:
            return {"level": "sample", "ok": False, "message": "no replica snapshot still exists on the source to compare with"}
        replica = common[-1]
        original = source_by_guid[replica.meta["guid"]]
        tag = secrets.token_hex(3)
        clones = [(src, original.name, f"{self.source_dataset.split('/')[0]}/drtool-verify-{tag}"),
                  (dst, replica.id, f"{self.target_dataset.split('/')[0]}/drtool-verify-{tag}")]
        made: list[tuple[ZfsCli, str]] = []
        try:
            mounts = []
            for cli, snap, clone in clones:
                cli.clone(snap, clone, properties={"readonly": "on"})
                made.append((cli, clone))
                mounts.append(cli.get_property(clone, "mountpoint") or "")
            files = _run_tool(src, "find", mounts[0], "-type", "f", "-printf", "%P\\n").split("\n")
            files = [f for f in files if f]
            if not files:
                return {"level": "sample", "ok": True, "message": f"sample: {original.snap} holds no files to compare", "files": 0}
            chosen = random.Random().sample(files, min(self.leg.verify.sample_files, len(files)))
            sums = [_sha256(cli, mount, chosen) for (cli, _, _), mount in zip(clones, mounts)]
            bad = [f for f in chosen if sums[0].get(f) != sums[1].get(f)]
        finally:
            for cli, clone in reversed(made):
                cli.destroy_dataset(clone)
        ok = not bad
        msg = (f"sample: {len(chosen)} file(s) of {original.snap} hash the same on the source and the replica" if ok
               else f"sample: {len(bad)} of {len(chosen)} file(s) of {original.snap} differ between source and replica: {', '.join(bad[:5])}")
        return {"level": "sample", "ok": ok, "message": msg, "files": len(chosen), "mismatches": bad[:50], "snapshot": original.snap}

    def restore_preflight(self, target: str | None, *, force: bool = False, rollback: bool = False) -> None:
        if rollback:
            raise UsageError("a replica cannot be rolled back into the source: restore it into a new dataset with --target")
        if not target or "@" in target:
            raise UsageError(f"receiving a replica back needs --target <new dataset> on {self.policy.source.location}")
        if self._cli(self.policy.source.location).dataset_exists(target):
            raise UsageError(f"{target} already exists: choose a new dataset name (a restore never overwrites)")

    def restore(self, point: RecoveryPoint, target: str | None, *, include: tuple[str, ...] = (), force: bool = False,
                rollback: bool = False, destroy_newer: bool = False) -> LegOutcome:
        """Receive the replica snapshot back onto the source location as a new dataset."""
        self.restore_preflight(target, rollback=rollback)
        src, dst = self._cli(self.policy.source.location), self._cli(self.leg.to)  # type: ignore[arg-type]
        result = dst.send_receive(point.id, target, target=src)  # type: ignore[arg-type]
        snap = point.id.split("@", 1)[1]
        back = next((s for s in src.list_snapshots(target) if s.snap == snap), None)  # type: ignore[arg-type]
        if back is None or back.guid != point.meta.get("guid"):
            raise BackendError(f"received {point.id} into {target}, but its snapshot guid does not match the replica's")
        return LegOutcome(point=point, bytes_processed=result.bytes,
                          message=f"received {point.id} back into {target} ({result.bytes} bytes; guid matches)",
                          detail={"dataset": target, "bytes": result.bytes, "guid": back.guid})


def _run_tool(cli: ZfsCli, binary: str, *args: str) -> str:
    """Run a plain tool where this ZfsCli runs zfs (locally, or over its ssh)."""
    res = ex.run(cli.argv(binary, *args), timeout=600)
    cli.commands.append(res.log_entry())
    return res.stdout or ""


def _sha256(cli: ZfsCli, mount: str, files: list[str]) -> dict[str, str]:
    out = _run_tool(cli, "sha256sum", "--", *(f"{mount}/{f}" for f in files))
    sums = {}
    for line in out.splitlines():
        digest, _, path = line.partition("  ")
        sums[path[len(mount) + 1:]] = digest
    return sums
