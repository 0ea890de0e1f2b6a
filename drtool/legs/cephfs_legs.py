"""CephFS snapshot legs, and the snapshot a restic backup leg of a CephFS source reads.

A ``cephfs`` location is a tree: a directory of the file system (snapshotted with
``mkdir DIR/.snap/NAME`` through a ceph-fuse mount) or a subvolume (``ceph fs subvolume
snapshot create``). drtool's snapshots are named ``drtool-<policy>-<leg>-<UTC time>``;
a leg lists and prunes only its own names, never anyone else's.

A backup leg never reads the live tree: it backs up a snapshot (the newest of the
policy's snapshot leg, or one it takes for the backup and removes afterwards), so the
restic snapshot is point-in-time consistent. restic runs in the snapshot's directory on
``.``, so the files sit at the restic snapshot's root (a restore does not recreate the
mount path); the restic snapshot's time is the CephFS snapshot's, and it is tagged
``drtool:cephfs-snapshot=<name>``.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from .. import manifest
from ..backends.base import RecoveryPoint
from ..backends.ceph_rbd import keyring_path
from ..backends.cephfs import SNAPDIR, CephFsCli, CephFsConn, CephFsError, CephFsMount, CephFsNotFound, FsSnap
from ..errors import BackendError, ConfigError, SourceError, UsageError
from .base import LegDriver, LegOutcome
from .naming import name_time, owned_name, snap_prefix

log = logging.getLogger("drtool.cephfs")
SNAP_TAG = "drtool:cephfs-snapshot="


def _time(s: FsSnap, prefix: str) -> datetime:
    return name_time(s.name, prefix, s.created)


@dataclass
class Tree:
    """One cephfs location's tree: snapshot create/list/remove, and mounts to read them."""

    ctx: Any
    name: str  # the location's name
    _mp: Path | None = None  # the location's path, while ``session()`` holds it mounted

    @property
    def loc(self) -> Any:
        loc = self.ctx.cfg.location(self.name)
        if getattr(loc, "type", "") != "cephfs":
            raise ConfigError(f"location {self.name} is not a cephfs location")
        return loc

    @property
    def conn(self) -> CephFsConn:
        loc = self.loc
        return CephFsConn(conf=loc.conf, keyring=keyring_path(loc, self.name), client_id=loc.client_id, fs_name=loc.fs)

    @property
    def cli(self) -> CephFsCli:
        return self.ctx.backend(f"cephfs:{self.name}", lambda: CephFsCli(self.conn))

    @property
    def what(self) -> str:
        return self.loc.tree

    @property
    def is_subvolume(self) -> bool:
        return self.loc.subvolume is not None

    @contextmanager
    def mounted(self, root: str, label: str) -> Iterator[Path]:
        """The fs path ``root`` mounted by ceph-fuse under drtool's state dir (one
        mountpoint per policy/leg: a run holds its policy's lock)."""
        base = self.ctx.state_dir / "cephfs"
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            with CephFsMount(self.conn, base / label, root=root) as mp:
                yield mp
        except CephFsNotFound as exc:
            raise SourceError(f"{self.what}: {exc}") from None

    @contextmanager
    def session(self, label: str) -> Iterator[None]:
        """Keep a directory location mounted across several operations (each ceph-fuse
        mount and unmount costs a second or more); subvolumes need no mount to snapshot."""
        if self.is_subvolume or self._mp is not None:
            yield
            return
        with self.mounted(self.loc.path or "/", label) as mp:
            self._mp = mp
            try:
                yield
            finally:
                self._mp = None

    @contextmanager
    def _root(self, label: str) -> Iterator[Path]:
        if self._mp is not None:
            yield self._mp
        else:
            with self.mounted(self.loc.path or "/", label) as mp:
                yield mp

    def create(self, name: str, label: str) -> FsSnap:
        """Snapshot the tree (callers check the snapshot's content: an empty one is removed)."""
        loc = self.loc
        if self.is_subvolume:
            try:
                return self.cli.subvolume_snap_create(loc.group, loc.subvolume, name)
            except CephFsNotFound as exc:
                raise SourceError(f"{self.what} does not exist: {exc}") from None
        with self._root(label) as mp:
            try:
                return self.cli.snap_create(mp, "/", name)
            except CephFsNotFound as exc:
                raise SourceError(f"{self.what} does not exist: {exc}") from None

    def list(self, label: str) -> list[FsSnap]:
        loc = self.loc
        try:
            if self.is_subvolume:
                return self.cli.subvolume_snap_list(loc.group, loc.subvolume, times=False)
            with self._root(label) as mp:
                return self.cli.list_snaps(mp, "/")
        except (CephFsNotFound, SourceError):
            return []

    def remove(self, names: list[str], label: str) -> None:
        loc = self.loc
        if self.is_subvolume:
            for n in names:
                self.cli.subvolume_snap_remove(loc.group, loc.subvolume, n)
            return
        with self._root(label) as mp:
            for n in names:
                self.cli.snap_remove(mp, "/", n)

    def snap_data_path(self, name: str) -> str:
        """The fs path of snapshot ``name``'s data (for subvolumes, the mgr's layout)."""
        loc = self.loc
        if self.is_subvolume:
            return self.cli.subvolume_snap_path(loc.group, loc.subvolume, name)
        return f"{(loc.path or '').rstrip('/')}/{SNAPDIR}/{name}"

    @contextmanager
    def open_snap(self, name: str, label: str) -> Iterator[Path]:
        """The read-only directory of snapshot ``name``, through a mount of the directory
        that holds its ``.snap`` (ceph-fuse cannot mount a snapshot itself)."""
        if self._mp is not None:
            mounted: Any = nullcontext(self._mp)
            tail = name
        else:
            head, _, tail = self.snap_data_path(name).partition(f"/{SNAPDIR}/")
            mounted = self.mounted(head or "/", label)
        with mounted as mp:
            snap = mp / SNAPDIR / tail
            if not snap.is_dir():
                raise CephFsNotFound(f"no snapshot {name!r} of {self.what}")
            yield snap


class CephFsSnapshotLeg(LegDriver):
    """snapshot legs on a cephfs source: in place, a recovery point (not a copy). At
    snapshot time a sample of its files is hashed (BLAKE3) from the snapshot; a
    ``sample`` verify re-reads them from the snapshot."""

    levels: tuple[str, ...] = ("sample",)

    @cached_property
    def tree(self) -> Tree:
        return Tree(self.ctx, self.policy.source.location)

    @property
    def prefix(self) -> str:
        return snap_prefix(self.policy.name, self.leg.leg_name)

    @property
    def label(self) -> str:
        return f"{self.policy.name}.{self.leg.leg_name}"

    def _name(self) -> str:
        return owned_name(self.policy.name, self.leg.leg_name, self.ctx.now())

    def describe(self) -> str:
        return f"would snapshot {self.tree.what} as {self._name()}"

    def _point(self, s: FsSnap) -> RecoveryPoint:
        return RecoveryPoint(id=s.name, time=_time(s, self.prefix), location=self.location, policy=self.policy.name,
                             leg=self.leg.leg_name, meta={"fs_path": s.path})

    def run(self, rec: Any) -> LegOutcome:
        tree = self.tree
        rec.start()
        with tree.session(self.label):
            snap = tree.create(self._name(), self.label)
            try:
                with tree.open_snap(snap.name, self.label) as d:
                    manifest.check_source([str(d)])
                    sample = manifest.rebase(manifest.sample([str(d)], self.leg.verify.sample_files), d)
            except SourceError:
                tree.remove([snap.name], self.label)  # an empty snapshot is not a recovery point
                raise
        return LegOutcome(point=self._point(snap), message=f"snapshot {snap.name} of {tree.what}",
                          detail={"snapshot": snap.name, "fs_path": snap.path, "manifest": [e.to_dict() for e in sample]})

    def points(self) -> list[RecoveryPoint]:
        return sorted((self._point(s) for s in self.tree.list(self.label) if s.name.startswith(self.prefix)), key=lambda p: p.time)

    def delete(self, point_ids: list[str]) -> None:
        for pid in point_ids:  # prune listed them just now: ownership is the name (a missing one fails the rmdir)
            if not pid.startswith(self.prefix):
                raise BackendError(f"refusing to remove {pid}: not a snapshot drtool made for {self.policy.name}/{self.leg.leg_name}")
        self.tree.remove(point_ids, self.label)

    def commands(self) -> list[dict[str, Any]]:
        cli = self.tree.cli
        out = list(cli.commands)
        cli.commands.clear()
        return out

    def check(self, level: str, points: list[RecoveryPoint]) -> dict[str, Any]:
        from .restic_backup import manifest_for

        found = manifest_for(self.ctx, self.policy.name, self.leg.leg_name, points)
        if found is None:
            return {"level": level, "ok": False, "message": f"no snapshot of {self.policy.name}/{self.leg.leg_name} recorded a "
                    "sample manifest in this catalog: run the snapshot leg with drtool first"}
        point, entries = found
        chosen = random.Random().sample(entries, min(self.leg.verify.sample_files, len(entries)))
        with self.tree.open_snap(point.id, self.label) as d:
            bad = manifest.compare_tree(d, chosen)
        msg = (f"sample: {len(chosen)} file(s) read back from snapshot {point.id} match their snapshot-time BLAKE3" if not bad
               else f"sample: {len(bad)} of {len(chosen)} file(s) of snapshot {point.id} do not match: " + "; ".join(bad[:5]))
        return {"level": level, "ok": not bad, "message": msg, "point": point.id, "files": len(chosen), "mismatches": bad[:50]}

    def restore_preflight(self, target: str | None, *, force: bool = False, rollback: bool = False) -> None:
        if rollback:
            raise UsageError("a CephFS snapshot is restored by copying it out: --target DIR (there is no in-place rollback)")
        if not target:
            raise UsageError("restoring a CephFS snapshot copies it out: --target DIR (an empty directory)")
        tgt = Path(target).absolute()
        if tgt.exists() and (not tgt.is_dir() or any(tgt.iterdir())) and not force:
            raise UsageError(f"restore target {tgt} is not an empty directory: choose an empty one, or pass --force to copy over it")

    def restore(self, point: RecoveryPoint, target: str | None, *, include: tuple[str, ...] = (), force: bool = False,
                rollback: bool = False, destroy_newer: bool = False) -> LegOutcome:
        """Copy the snapshot (or its ``include`` paths) out into ``target`` (modes,
        times, symlinks; owners when run as root), then hash every copied file against
        the snapshot."""
        self.restore_preflight(target, force=force, rollback=rollback)
        tgt = Path(target).absolute()  # type: ignore[arg-type]
        tgt.mkdir(parents=True, exist_ok=True)
        with self.tree.open_snap(point.id, self.label) as snap:
            roots = [snap / i.strip("/") for i in include] or [snap]
            for r in roots:
                if not os.path.lexists(r):
                    raise UsageError(f"{r.relative_to(snap)} is not in snapshot {point.id}")
                copy_out(snap, r, tgt)
            entries = manifest.rebase(manifest.full([str(r) for r in roots]), snap)
            mismatches = manifest.compare_tree(tgt, [e.to_dict() for e in entries])
        size = sum(e.size for e in entries)
        msg = (f"copied snapshot {point.id} into {tgt}: {len(entries)} file(s), {size} bytes"
               + ("; every file's BLAKE3 matches the snapshot" if not mismatches else f"; {len(mismatches)} mismatch(es): {'; '.join(mismatches[:5])}"))
        return LegOutcome(point=point, bytes_processed=size, message=msg,
                          detail={"checked": len(entries), "mismatches": mismatches, "include": list(include)})


def copy_out(snap: Path, src: Path, target: Path) -> None:
    """``src`` (inside ``snap``) into ``target`` at the same relative path, with modes,
    times and symlinks (and owners when running as root)."""
    dst = target / src.relative_to(snap)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True, copy_function=shutil.copy2)
    else:
        shutil.copy2(src, dst, follow_symlinks=False)
    if os.geteuid() == 0:
        for dirpath, dirnames, filenames in os.walk(src):
            for n in [".", *dirnames, *filenames]:
                s = Path(dirpath) / n if n != "." else Path(dirpath)
                st = s.lstat()
                os.chown(dst / s.relative_to(src), st.st_uid, st.st_gid, follow_symlinks=False)
        if not src.is_dir():
            st = src.lstat()
            os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    # directory times last: copying into them changed theirs
    if src.is_dir() and not src.is_symlink():
        for dirpath, _dirs, _files in os.walk(src, topdown=False):
            st = os.stat(dirpath)
            os.utime(dst / Path(dirpath).relative_to(src), ns=(st.st_atime_ns, st.st_mtime_ns))


@contextmanager
def backup_snapshot(driver: Any) -> Iterator[tuple[Path, dict[str, Any], datetime]]:
    """For a restic backup leg of a cephfs source: (the snapshot's directory, what to
    record, the snapshot's time). The newest snapshot of the policy's snapshot leg when
    it has one; else a snapshot taken now for this backup, removed afterwards."""
    policy, leg = driver.policy, driver.leg
    tree = Tree(driver.ctx, policy.source.location)
    label = f"{policy.name}.{leg.leg_name}"
    with tree.session(label):
        with _backup_snapshot(driver, tree, label) as got:
            yield got


@contextmanager
def _backup_snapshot(driver: Any, tree: Tree, label: str) -> Iterator[tuple[Path, dict[str, Any], datetime]]:
    policy, leg = driver.policy, driver.leg
    snap_legs = [lg for lg in policy.legs if lg.kind == "snapshot"]
    transient = not snap_legs
    if snap_legs:
        prefix = snap_prefix(policy.name, snap_legs[0].leg_name)
        owned = sorted((s for s in tree.list(label) if s.name.startswith(prefix)), key=lambda s: _time(s, prefix))
        if not owned:
            raise SourceError(f"{policy.name}: {tree.what} has no snapshot from the {snap_legs[0].leg_name} leg yet: "
                              f"run it first (the backup reads its newest snapshot)")
        snap, when = owned[-1], _time(owned[-1], prefix)
    else:
        prefix = snap_prefix(policy.name, leg.leg_name)
        stale = [s.name for s in tree.list(label) if s.name.startswith(prefix)]
        if stale:  # a crashed run's transient snapshot: ours, and never a recovery point
            log.warning("%s: removing %d leftover backup snapshot(s) of %s: %s", policy.name, len(stale), tree.what, ", ".join(stale))
            tree.remove(stale, label)
        snap = tree.create(owned_name(policy.name, leg.leg_name, driver.ctx.now()), label)
        when = _time(snap, prefix)
    try:
        with tree.open_snap(snap.name, label) as d:
            yield d, {"cephfs_snapshot": snap.name, "cephfs_fs_path": snap.path, "cephfs_transient": transient}, when
    finally:
        if transient:
            try:
                tree.remove([snap.name], label)
            except CephFsError as exc:  # the next backup removes it
                log.warning("%s: could not remove the backup snapshot %s of %s: %s", policy.name, snap.name, tree.what, exc)


__all__ = ["CephFsSnapshotLeg", "SNAP_TAG", "Tree", "backup_snapshot", "copy_out", "snap_prefix"]
