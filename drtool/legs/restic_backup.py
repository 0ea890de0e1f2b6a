"""backup legs into a restic repository."""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import blake3

from .. import manifest
from ..backends.base import RecoveryPoint, Repository
from ..errors import BackendError, DrtoolError, UsageError
from ..phases import RunPhase
from .base import LegDriver, LegOutcome
from .cephfs_legs import SNAP_TAG, Tree, backup_snapshot


class ResticBackupLeg(LegDriver):
    levels = ("integrity", "sample", "full")

    @property
    def repo(self) -> Repository:
        return self.ctx.repo(self.leg.to)  # type: ignore[arg-type]

    def _platform(self) -> Any:
        from .platform import platform_source

        return platform_source(self)  # type: ignore[arg-type]

    def _ensure_repo(self) -> Repository:
        """The repository, checked (or initialised, ``init: true``) once per command."""
        if not getattr(self, "_ready", False):
            self.repo.ensure_ready(create=getattr(self.ctx.cfg.location(self.leg.to), "init", False))  # type: ignore[arg-type]
            self._ready = True
        return self.repo

    def _cephfs(self) -> Any:
        loc = self.ctx.cfg.location(self.policy.source.location)
        return loc if getattr(loc, "type", "") == "cephfs" else None

    def describe(self) -> str:
        fs = self._cephfs()
        if fs is not None:
            has_snap = any(leg.kind == "snapshot" for leg in self.policy.legs)
            which = "the newest snapshot of the snapshot leg" if has_snap else "a snapshot taken for the backup (removed afterwards)"
            return f"would back up {which} of {fs.tree} to {self.leg.to} ({self.ctx.cfg.location(self.leg.to).repository})"  # type: ignore[arg-type,attr-defined]
        plat = self._platform()
        if plat is not None:
            return f"would back up {plat.what} to {self.leg.to} ({self.ctx.cfg.location(self.leg.to).repository})"  # type: ignore[arg-type,attr-defined]
        manifest.check_source(self.policy.source.paths)
        return f"would back up {', '.join(self.policy.source.paths)} to {self.leg.to} ({self.ctx.cfg.location(self.leg.to).repository})"  # type: ignore[arg-type,attr-defined]

    def run(self, rec: Any) -> LegOutcome:
        if self._cephfs() is not None:
            return self._run_cephfs(rec)
        plat = self._platform()
        if plat is None:
            return self._run_paths(rec, self.policy.source.paths, {})
        # a platform artifact (raft or etcd snapshot) is written and proved whole first, at a
        # stable path (restic keys snapshots by path), then backed up as one file
        work = self.ctx.state_dir / "platform" / self.policy.name / self.leg.leg_name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, mode=0o700)
        try:
            path = work / plat.default_name()
            source_point = plat.produce(path)
            return self._run_paths(rec, [str(path)], {"source_point": source_point, "source_kind": plat.kind})
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _run_cephfs(self, rec: Any) -> LegOutcome:
        """Back up a CephFS snapshot (never the live tree): restic runs in the snapshot's
        directory on ``.``; the point's time is the snapshot's, its tag names it."""
        self._ensure_repo()
        with backup_snapshot(self) as (snapdir, info, when):
            prev = [p for p in self.points() if any(t.startswith(SNAP_TAG) for t in p.meta.get("tags") or ())]
            return self._run_paths(rec, [str(snapdir)], info, root=snapdir, time=when,
                                   parent=prev[-1].id if prev else None, tags=[SNAP_TAG + info["cephfs_snapshot"]])

    def _run_paths(self, rec: Any, paths: list[str], extra: dict[str, Any], *, root: Path | None = None,
                   time: Any = None, parent: str | None = None, tags: tuple[str, ...] | list[str] = ()) -> LegOutcome:
        """``root``: back up that directory's content at the snapshot's root (``paths``
        is ``[root]``; the manifest's paths are from the root, as restic stores them)."""
        manifest.check_source(paths)
        repo = self._ensure_repo()
        name = self.leg.leg_name
        with self.ctx.ui.task(f"{self.policy.name}/{name}: backup → {self.leg.to}") as task, ThreadPoolExecutor(1, thread_name_prefix="backup") as pool:
            def progress(msg: dict[str, Any]) -> None:
                task.update(completed=msg.get("bytes_done", 0), total=msg.get("total_bytes"))

            where: dict[str, Any] = {"cwd": root, "time": time, "parent": parent, "tags": tags} if root is not None else {}
            backup = pool.submit(repo.backup, ["."] if root is not None else paths, policy=self.policy.name, leg=name,
                                 excludes=self.leg.exclude, progress=progress, **where)
            # While restic reads the source: open the catalog and record the run, then hash
            # a sample of files for the manifest (each re-checked unchanged after the backup).
            rec.start()
            sample = manifest.sample(paths, self.leg.verify.sample_files)
            every = manifest.full(paths) if self.leg.verify.manifest == "full" else None
            out = backup.result()
        kept = manifest.still_valid(sample)
        warnings = list(out.warnings)
        if len(kept) < len(sample):
            warnings.append(f"{len(sample) - len(kept)} sampled file(s) changed during the backup and were left out of the manifest")
        if root is not None:
            kept = manifest.rebase(kept, root)
        if every is not None:
            whole = manifest.still_valid(every)
            if len(whole) < len(every):
                warnings.append(f"{len(every) - len(whole)} file(s) changed during the backup and were left out of the full manifest")
            if root is not None:
                whole = manifest.rebase(whole, root)
            mfile = full_manifest_path(self.ctx, self.policy.name, self.leg.leg_name, out.point.id)
            manifest.write_file(mfile, whole)
            extra = {**extra, "manifest_file": str(mfile), "manifest_files": len(whole)}
        return LegOutcome(
            point=out.point,
            bytes_processed=out.bytes_processed,
            warnings=warnings,
            detail={"paths": paths, "files": out.files, "bytes_added": out.bytes_added, "point_time": out.point.time.isoformat(),
                    "manifest": [e.to_dict() for e in kept], **extra},
            message=f"snapshot {out.point.id[:8]} of {out.files} files, {out.bytes_processed} bytes ({out.bytes_added} new)",
        )

    def points(self) -> list[RecoveryPoint]:
        return [p for p in self.location_points() if p.policy == self.policy.name and p.leg == self.leg.leg_name]

    def location_points(self) -> list[RecoveryPoint]:
        return self.repo.list_points()

    def restore_points(self) -> list[RecoveryPoint]:
        """For a local repository, without a restic process (each one pays the repository's
        key derivation, ~0.5 s): the points this catalog recorded for the leg whose
        snapshot file (named by the snapshot's full id) is still in the repository. restic
        lists them instead when the catalog knows none, or when a recorded point still in
        the repository predates the recorded point time (a catalog from before it)."""
        root = self.repo.local_path
        if root:
            try:
                present = set(os.listdir(os.path.join(root, "snapshots")))
            except OSError:
                present = set()
            seen: dict[str, RecoveryPoint] = {}
            for run in self.ctx.catalog.runs(policy=self.policy.name, kind="leg", limit=None, leg=self.leg.leg_name):
                if run.phase != RunPhase.succeeded.value or run.recovery_point not in present:
                    continue
                when = (run.detail or {}).get("point_time")
                if not when:
                    return self.points()
                seen.setdefault(run.recovery_point, self._known_point(run.recovery_point, datetime.fromisoformat(when), "catalog"))
            if seen:
                return sorted(seen.values(), key=lambda p: p.time)
        return self.points()

    def delete(self, point_ids: list[str]) -> None:
        self.repo.forget(point_ids)
        for pid in point_ids:  # their full manifests go with them
            full_manifest_path(self.ctx, self.policy.name, self.leg.leg_name, pid).unlink(missing_ok=True)

    def commands(self) -> list[dict[str, Any]]:
        cmds = getattr(self.repo, "commands", [])
        out = list(cmds)
        cmds.clear()
        if self._cephfs() is not None:  # the snapshot the backup read: its ceph commands and .snap mkdir/rmdir
            fs_cmds = Tree(self.ctx, self.policy.source.location).cli.commands
            out = list(fs_cmds) + out
            fs_cmds.clear()
        return out

    def restore_preflight(self, target: str | None, *, force: bool = False, rollback: bool = False) -> None:
        if rollback or not target:
            raise UsageError("a restic restore needs --target DIR (an empty directory); there is no in-place rollback")
        tgt = Path(target).absolute()
        if tgt.exists() and any(tgt.iterdir()) and not force:
            raise UsageError(f"restore target {tgt} is not empty: choose an empty directory, or pass --force to restore over it")

    def restore(self, point: RecoveryPoint, target: str | None, *, include: tuple[str, ...] = (), force: bool = False,
                rollback: bool = False, destroy_newer: bool = False) -> LegOutcome:
        """Into an empty directory (``force`` for a non-empty one); then every restored
        file of the point's backup-time manifest is compared with its BLAKE3."""
        tgt = self._target(target, force=force, rollback=rollback)
        self.repo.restore(point.id, str(tgt), include=include)
        return self._prove(point, tgt, include)

    def _target(self, target: str | None, *, force: bool, rollback: bool = False) -> Path:
        self.restore_preflight(target, force=force, rollback=rollback)
        tgt = Path(target).absolute()  # type: ignore[arg-type]
        tgt.mkdir(parents=True, exist_ok=True)
        return tgt

    def _known_point(self, point_id: str, when: datetime, source: str) -> RecoveryPoint:
        """One of this leg's points, known without restic's listing (``source`` says how)."""
        return RecoveryPoint(id=point_id, time=when, location=self.leg.to or "", policy=self.policy.name, leg=self.leg.leg_name,
                             meta={"short_id": point_id[:8], "owned": True, "from": source})

    def restore_latest(self, target: str | None, *, include: tuple[str, ...] = (), force: bool = False) -> tuple[RecoveryPoint, LegOutcome]:
        """``latest`` picked by restic as it restores (its own listing, the ground truth), so
        neither a listing process nor the catalog stands before the restore; the point's id
        and time come from restic's first line, its manifest from the catalog afterwards."""
        tgt = self._target(target, force=force)
        got = self.repo.restore_latest(str(tgt), policy=self.policy.name, leg=self.leg.leg_name, include=include)
        if got is None:
            raise DrtoolError(f"no recovery point of {self.policy.name}/{self.leg.leg_name} exists in {self.location}")
        short, when = got
        point = self._restored_point(short, when)
        return point, self._prove(point, tgt, include)

    def _restored_point(self, short: str, when: datetime | None) -> RecoveryPoint:
        """The point behind restic's short id: its full id from a local repository's snapshot
        file, else (or for the time, when restic did not print it) the catalog's points, else
        restic's listing."""
        if when is not None and self.repo.local_path:
            try:
                names = [n for n in os.listdir(os.path.join(self.repo.local_path, "snapshots")) if n.startswith(short)]
            except OSError:
                names = []
            if len(names) == 1:
                return self._known_point(names[0], when, "restic restore latest")
        for points in (self.restore_points, self.points):
            found = {p.id: p for p in points() if p.id.startswith(short)}
            if len(found) == 1:
                return found.popitem()[1]
        raise BackendError(f"restic restored snapshot {short} of {self.location}, which drtool cannot find again")

    def _prove(self, point: RecoveryPoint, tgt: Path, include: tuple[str, ...]) -> LegOutcome:
        """Every restored file of the point's backup-time manifest against its BLAKE3 (on every core)."""
        entries = [e for e in manifest_of(self.ctx, self.policy.name, self.leg.leg_name, point.id)
                   if not include or any(e["path"] == i or e["path"].startswith(i.rstrip("/") + "/") for i in include)]
        mismatches = manifest.compare_tree(tgt, entries)
        checked = len(entries)
        proof = f"; {checked} file(s) checked against backup-time BLAKE3" if checked else "; no backup-time manifest for this point"
        msg = f"restored {point.id[:8]} into {tgt}" + proof + (f": {len(mismatches)} mismatch(es): {'; '.join(mismatches[:5])}" if mismatches else "")
        return LegOutcome(point=point, message=msg, detail={"checked": checked, "mismatches": mismatches, "include": list(include)})

    # -- verification -------------------------------------------------------------

    def _platform_sample(self, level: str, point: RecoveryPoint, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """The artifact matched its backup-time BLAKE3; now the platform's own proof on it
        (a scratch Vault unsealed with the original keys, an etcd restore with key counts)."""
        plat = self._platform()
        doc = _platform_doc(self.ctx, self.policy.name, self.leg.leg_name, point.id)
        scratch = Path(tempfile.mkdtemp(prefix="drtool-verify-", dir=self.ctx.state_dir))
        try:
            path = scratch / plat.default_name()
            with open(path, "wb") as out:
                self.repo.read_file(point.id, entries[0]["path"], out.write)
            problems, proved = plat.sample(path, doc, scratch)
        except DrtoolError as exc:
            problems, proved = [str(exc)], ""
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        msg = "; ".join(problems) if problems else f"{point.id[:8]}: the artifact matches its backup-time BLAKE3; {proved}"
        return {"level": level, "ok": not problems, "message": f"{level}: {msg}", "point": point.id}

    def check(self, level: str, points: list[RecoveryPoint]) -> dict[str, Any]:
        if level == "integrity":
            chk = self.repo.check(read_data_percent=self.leg.verify.read_data_percent)
            return {"level": "integrity", "ok": chk.ok, "message": chk.message, "detail": chk.detail}
        return self._sample(points, full=level == "full")

    def _sample(self, points: list[RecoveryPoint], *, full: bool) -> dict[str, Any]:
        level = "full" if full else "sample"
        found = manifest_for(self.ctx, self.policy.name, self.leg.leg_name, points)
        if found is None:
            return {"level": level, "ok": False,
                    "message": f"no backup of {self.policy.name}/{self.leg.leg_name} recorded a manifest in this catalog: run a backup with drtool first"}
        point, entries = found
        if full:
            entries = full_manifest_of(self.ctx, self.policy.name, self.leg.leg_name, point.id) or entries
        chosen = entries if full else random.Random().sample(entries, min(self.leg.verify.sample_files, len(entries)))
        mismatches: list[str] = []
        scratch = Path(tempfile.mkdtemp(prefix="drtool-verify-", dir=self.ctx.state_dir))
        try:
            if full:
                with self.ctx.ui.task(f"{self.policy.name}/{self.leg.leg_name}: full restore of {point.id[:8]}"):
                    self.repo.restore(point.id, str(scratch), verify=True)
                mismatches.extend(manifest.compare_tree(scratch, chosen))
            else:
                for e in chosen:
                    h = blake3.blake3()
                    try:
                        self.repo.read_file(point.id, e["path"], h.update)
                    except DrtoolError as exc:
                        mismatches.append(f"{e['path']}: could not be restored: {exc}")
                        continue
                    if h.hexdigest() != e["blake3"]:
                        mismatches.append(f"{e['path']}: BLAKE3 differs from the backup-time hash")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        plat = self._platform()
        if plat is not None and not mismatches:
            return self._platform_sample(level, point, chosen)
        ok = not mismatches
        msg = (f"{level}: {len(chosen)} file(s) restored from {point.id[:8]} match their backup-time BLAKE3"
               if ok else f"{level}: {len(mismatches)} of {len(chosen)} file(s) from {point.id[:8]} do not match: " + "; ".join(mismatches[:5]))
        return {"level": level, "ok": ok, "message": msg, "point": point.id, "files": len(chosen), "mismatches": mismatches[:50]}


def full_manifest_path(ctx: Any, policy: str, leg: str, point_id: str) -> Path:
    return ctx.state_dir / "manifests" / policy / leg / f"{point_id}.jsonl.gz"


def full_manifest_of(ctx: Any, policy: str, leg: str, point_id: str) -> list[dict[str, Any]] | None:
    """The full backup-time manifest of one point, when one was recorded (verify.manifest: full)."""
    path = full_manifest_path(ctx, policy, leg, point_id)
    return manifest.read_file(path) if path.is_file() else None


def _platform_doc(ctx: Any, policy: str, leg: str, point_id: str) -> dict[str, Any]:
    for run in ctx.catalog.runs(policy=policy, kind="leg", limit=500, leg=leg):
        if run.recovery_point == point_id and run.phase == RunPhase.succeeded.value:
            return {"source_point": (run.detail or {}).get("source_point") or {}}
    return {"source_point": {}}


def manifest_for(ctx: Any, policy: str, leg: str, points: list[RecoveryPoint]) -> tuple[RecoveryPoint, list[dict[str, Any]]] | None:
    """The newest point that still exists and has a manifest recorded at backup time."""
    by_id = {p.id: p for p in points}
    for run in ctx.catalog.runs(policy=policy, kind="leg", limit=200, leg=leg):
        if run.phase == RunPhase.succeeded.value and run.recovery_point in by_id:
            entries = (run.detail or {}).get("manifest") or []
            if entries:
                return by_id[run.recovery_point], entries
    return None


def manifest_of(ctx: Any, policy: str, leg: str, point_id: str) -> list[dict[str, Any]]:
    """The backup-time manifest recorded for one point (empty when none)."""
    for run in ctx.catalog.runs(policy=policy, kind="leg", limit=500, leg=leg):
        if run.recovery_point == point_id and run.phase == RunPhase.succeeded.value:
            return list((run.detail or {}).get("manifest") or [])
    return []
