"""upload legs: stream a file, a directory (as tar) or a command's stdout to an object
store (GCS, S3), with a manifest that proves what arrived.

Layout under the location's prefix: ``<policy>/<leg>/<UTC time>/<name>`` and, written
last, ``…/<UTC time>/manifest.json`` (size, SHA-256, MD5, CRC32C, the store's own
checksum, the source). A point counts only once its manifest exists, so an upload cut
short never becomes a recovery point. Memory stays at about two parts whatever the size:
the source is read through a pipe and sent part by part.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tarfile
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from .. import exec as ex
from ..backends import object_store_for
from ..backends.base import RecoveryPoint
from ..backends.objectstore import ObjectLocked, ObjectNotFound, ObjectStore, RetentionState
from ..errors import BackendError, DrtoolError, SourceError, UsageError
from .base import LegDriver, LegOutcome
from .naming import TIME_FORMAT, snap_prefix

log = logging.getLogger("drtool.legs.upload")
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "drtool-upload-manifest/1"
PLATFORM_KINDS = ("vault-raft", "etcd", "machineconfig")


class UploadLeg(LegDriver):
    levels = ("integrity", "sample")

    @property
    def store(self) -> ObjectStore:
        to = self.leg.to
        return self.ctx.backend(f"store:{to}", lambda: object_store_for(to, self.ctx.cfg.location(to)))  # type: ignore[arg-type]

    @property
    def base(self) -> str:
        return f"{self.policy.name}/{self.leg.leg_name}"

    # -- the source ----------------------------------------------------------------

    def _spec(self) -> tuple[str, str, str]:
        """(kind, what, object name): kind is command, file or directory."""
        up = self.leg.upload
        if up and up.command:
            return "command", " ".join(up.command), up.name or "stream"
        plat = self._platform()
        if plat is not None:
            return plat.kind, plat.what, (up.name if up and up.name else plat.default_name())
        if self._zfs_source():
            snap = self._sent = self._newest_snapshot()  # what the manifest records: the snapshot sent, not a re-listing
            return "zfs", snap.name, (up.name if up and up.name else f"{snap.snap}.zfs")
        if self._rbd_source():
            spec, self._sent = self._newest_rbd()
            return "rbd", spec, (up.name if up and up.name else f"{spec.split('@', 1)[1]}.rbddiff")
        paths = self.policy.source.paths
        if len(paths) != 1:
            raise UsageError(f"{self.policy.name}/{self.leg.leg_name}: an upload leg streams one path (the source has {len(paths)}); "
                             "use one policy per path, or upload.command")
        p = Path(paths[0])
        if not p.exists():
            raise SourceError(f"source {p} does not exist")
        if p.is_dir():
            return "directory", str(p), (up.name if up and up.name else f"{p.name or 'root'}.tar")
        return "file", str(p), (up.name if up and up.name else p.name)

    def _platform(self) -> Any:
        from .platform import platform_source

        return platform_source(self)

    @contextlib.contextmanager
    def _workdir(self) -> Iterator[Path]:
        """A private scratch directory under the state dir, removed afterwards."""
        import secrets as _secrets
        import shutil

        d = self.ctx.state_dir / "work" / f"{self.policy.name}-{_secrets.token_hex(4)}"
        d.mkdir(parents=True, mode=0o700)
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def _rbd_source(self) -> bool:
        return getattr(self.ctx.cfg.location(self.policy.source.location), "type", "") == "ceph-rbd"

    def _rbd(self) -> Any:
        from ..backends.ceph_rbd import CephConn, RbdCli, keyring_path

        loc = self.ctx.cfg.location(self.policy.source.location)
        return self.ctx.backend(f"rbd:{self.policy.source.location}", lambda: RbdCli(CephConn(
            conf=loc.conf, keyring=keyring_path(loc, self.policy.source.location), client_id=loc.client_id)))  # type: ignore[attr-defined]

    def _newest_rbd(self) -> tuple[str, Any]:
        """(pool/image@snap, its RbdSnap): the newest snapshot the policy's snapshot leg made
        (sent as a full export-diff stream)."""

        legs = [leg.leg_name for leg in self.policy.legs if leg.kind == "snapshot"]
        if not legs:
            raise UsageError(f"{self.policy.name}/{self.leg.leg_name}: uploading an RBD image sends the policy's own snapshots: add a snapshot leg")
        pool, image = self.ctx.cfg.location(self.policy.source.location).pool, self.policy.source.image  # type: ignore[attr-defined]
        snaps = [s for s in self._rbd().list_snaps(pool, image) if s.name.startswith(snap_prefix(self.policy.name, legs[0]))]
        if not snaps:
            raise SourceError(f"{pool}/{image} has no snapshot of {self.policy.name}/{legs[0]} yet: run the snapshot leg first")
        return f"{pool}/{image}@{snaps[-1].name}", snaps[-1]

    def _zfs_source(self) -> bool:
        return getattr(self.ctx.cfg.location(self.policy.source.location), "type", "") == "zfs"

    def _zfs(self) -> Any:
        from ..backends.zfs import ZfsCli

        loc = self.ctx.cfg.location(self.policy.source.location)
        return self.ctx.backend(f"zfs:{self.policy.source.location}", lambda: ZfsCli(
            ssh=loc.ssh, ssh_options=loc.ssh_options, features_cache=self.ctx.state_dir / "zfs-features.json"))  # type: ignore[attr-defined]

    def _newest_snapshot(self) -> Any:
        """The newest snapshot the policy's snapshot leg made: what a zfs upload sends (full stream)."""
        from .zfs_legs import PROP_LEG, PROP_POLICY

        legs = [leg.leg_name for leg in self.policy.legs if leg.kind == "snapshot"]
        if not legs:
            raise UsageError(f"{self.policy.name}/{self.leg.leg_name}: uploading a zfs source sends the policy's own snapshots: add a snapshot leg")
        ds = self.policy.source.dataset
        snaps = [s for s in self._zfs().list_snapshots(ds) if s.snap.startswith("drtool-")
                 and s.properties.get(PROP_POLICY) == self.policy.name and s.properties.get(PROP_LEG) == legs[0]]
        if not snaps:
            raise SourceError(f"{ds} has no snapshot of {self.policy.name}/{legs[0]} yet: run the snapshot leg first")
        return snaps[-1]

    @contextlib.contextmanager
    def _open_source(self, kind: str, what: str, name: str) -> Iterator[tuple[BinaryIO, Any]]:
        """Yield (stream, finish) for what ``_spec()`` named: ``finish()`` raises if the producer
        failed (a command's exit code, a tar error), after the stream has been read to the end."""
        if kind == "file":
            with open(what, "rb") as f:
                yield f, lambda: None
            return
        plat = self._platform() if not (self.leg.upload and self.leg.upload.command) else None
        if plat is not None:  # written and proved whole first, then streamed from the file
            with self._workdir() as work:
                path = work / name
                self._source_point = plat.produce(path)
                with open(path, "rb") as f:
                    yield f, lambda: None
            return
        r, w = os.pipe()
        box: dict[str, Any] = {}

        def produce() -> None:
            try:
                if kind == "directory":
                    with os.fdopen(w, "wb", closefd=True) as out, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                        tar.add(what, arcname=os.path.basename(what.rstrip("/")) or ".")
                elif kind == "rbd":
                    spec, snap = what.split("@", 1)
                    pool, image = spec.split("/", 1)
                    try:
                        self._rbd().export_diff(pool, image, snap, w)  # the full diff stream: the image at that snapshot
                    finally:
                        os.close(w)
                elif kind == "zfs":
                    from ..backends.zfs import send_args

                    cli = self._zfs()
                    try:
                        box["result"] = cli._run(cli.zfs_bin, *send_args(what, features=cli.features()), stdout=w, timeout=7 * 24 * 3600)
                    finally:
                        os.close(w)
                else:
                    try:
                        box["result"] = ex.run(list(self.leg.upload.command), stdout=w, check=False, timeout=7 * 24 * 3600)  # type: ignore[union-attr]
                    finally:
                        os.close(w)
            except BaseException as exc:  # noqa: BLE001 - re-raised by finish()
                box["error"] = exc

        thread = threading.Thread(target=produce, name="upload-source", daemon=True)
        thread.start()
        reader = _ProducerReader(r, thread)

        def finish() -> None:
            thread.join()
            if "error" in box:
                err = box["error"]
                raise SourceError(f"reading the source {what} failed: {err}") from err
            res = box.get("result")
            if res is not None and not res.ok:
                raise SourceError(f"the source command exited {res.returncode}: {res.stderr_tail(3) or 'no message'}")

        try:
            yield reader, finish
        finally:
            reader.close()  # a producer still writing gets EPIPE and ends
            thread.join(timeout=30)

    # -- run -----------------------------------------------------------------------

    def describe(self) -> str:
        kind, what, name = self._spec()
        return f"would stream the {kind} {what} to {self.leg.to}: {self.base}/<time>/{name} (+ {MANIFEST})"

    def run(self, rec: Any) -> LegOutcome:
        kind, what, name = self._spec()
        when = self.ctx.now().astimezone(timezone.utc).replace(microsecond=0)
        point_id = f"{self.base}/{when:{TIME_FORMAT}}"
        key = f"{point_id}/{name}"
        store = self.store
        mb = self.leg.upload.part_size_mb if self.leg.upload else None
        part = mb * 1024 * 1024 if mb else store.default_part_size
        meta = {"drtool-policy": self.policy.name, "drtool-leg": self.leg.leg_name, "drtool-point": point_id}
        with self.ctx.ui.task(f"{self.policy.name}/{self.leg.leg_name}: upload → {self.leg.to}") as task:
            with self._open_source(kind, what, name) as (stream, finish):
                rec.start()
                try:
                    res = store.put_stream(key, stream, metadata=meta, part_size=part, progress=lambda n: task.update(completed=n))
                except BaseException:
                    stream.close()  # the producer gets EPIPE instead of blocking on a full pipe
                    finish_quietly(finish)
                    raise
                try:
                    finish()
                except SourceError:
                    store.delete(key, version=res.version)  # an incomplete source is never kept
                    raise
        if res.size == 0:
            store.delete(key, version=res.version)
            raise SourceError(f"the source {what} was empty: nothing was kept")
        manifest = {
            "format": MANIFEST_FORMAT, "policy": self.policy.name, "leg": self.leg.leg_name, "point": point_id,
            "created": when.isoformat(), "object": key, "name": name, "size": res.size, "sha256": res.sha256_hex,
            "md5": res.md5_hex, "crc32c": res.crc32c_b64, "version": res.version, "store_checksum": res.store_checksum,
            "source": {"kind": kind, "what": what},
        }
        if kind == "zfs":
            manifest["source_point"] = {"location": self.policy.source.location, "snapshot": self._sent.name, "guid": self._sent.guid}
        elif kind == "rbd":
            manifest["source_point"] = {"location": self.policy.source.location, "snapshot": what, "size": self._sent.size}
        elif getattr(self, "_source_point", None) is not None:
            manifest["source_point"] = self._source_point
        store.put_stream(f"{point_id}/{MANIFEST}", io.BytesIO(json.dumps(manifest, indent=1).encode()), metadata=meta)
        point = RecoveryPoint(id=point_id, time=when, location=self.leg.to, policy=self.policy.name, leg=self.leg.leg_name,  # type: ignore[arg-type]
                              size_bytes=res.size, checksum=f"sha256:{res.sha256_hex}", meta={"object": key})
        return LegOutcome(point=point, bytes_processed=res.size, detail={"manifest": manifest},
                          message=f"uploaded {res.size} bytes to {self.leg.to}:{key} (sha256 {res.sha256_hex[:12]}…, store checksum matched)")

    # -- points --------------------------------------------------------------------

    def _listing(self, prefix: str) -> dict[str, dict[str, Any]]:
        """point id -> {"objects": {name: ObjectInfo}}, for the points under ``prefix``."""
        out: dict[str, dict[str, Any]] = {}
        for info in self.store.list(prefix):
            parts = info.key.split("/")
            if len(parts) != 4:  # policy/leg/time/name
                continue
            out.setdefault("/".join(parts[:3]), {"objects": {}})["objects"][parts[3]] = info
        return out

    def _points(self, prefix: str) -> list[RecoveryPoint]:
        points = []
        for pid, entry in self._listing(prefix).items():
            objs = entry["objects"]
            policy, leg, stamp = pid.split("/")
            try:
                when = datetime.strptime(stamp, TIME_FORMAT).replace(tzinfo=timezone.utc)
            except ValueError:
                continue
            if MANIFEST not in objs:
                log.info("%s: %s has no manifest (an interrupted upload): not a recovery point", self.leg.to, pid)
                continue
            data = [o for n, o in objs.items() if n != MANIFEST]
            size = sum(o.size for o in data)
            until = max((o.retain_until for o in objs.values() if o.retain_until), default=None)
            points.append(RecoveryPoint(id=pid, time=when, location=self.leg.to, policy=policy, leg=leg, size_bytes=size,  # type: ignore[arg-type]
                                        meta={"objects": sorted(objs), "retain_until": until.isoformat() if until else None}))
        return sorted(points, key=lambda p: p.time)

    def points(self) -> list[RecoveryPoint]:
        return self._points(self.base + "/")

    def location_points(self) -> list[RecoveryPoint]:
        return self._points("")

    def delete(self, point_ids: list[str]) -> list[str]:
        """Delete points (data first, manifest last); returns those the store's retention
        or lock refused: blocked, not failed."""
        blocked = []
        mine = {p.id for p in self.points()}
        for pid in point_ids:
            if pid not in mine:
                raise BackendError(f"refusing to delete {pid}: not an upload drtool made for {self.base}")
            objs = self._listing(pid + "/").get(pid, {"objects": {}})["objects"]
            # ask first: on a versioned bucket a plain delete "succeeds" with a delete marker
            # while the locked data stays; a point under retention is left whole instead
            now = self.ctx.now()
            stats = {name: self.store.stat(f"{pid}/{name}") for name in objs}
            held = [f"{n} (until {i.retain_until:%Y-%m-%d %H:%M}Z)" if i.retain_until else f"{n} (legal hold)"
                    for n, i in stats.items() if (i.retain_until and i.retain_until > now) or i.legal_hold]
            if held:
                log.warning("%s: %s is under retention, kept: %s", self.leg.to, pid, ", ".join(held))
                blocked.append(pid)
                continue
            try:
                for name in sorted(objs, key=lambda n: n == MANIFEST):  # data first, the manifest last
                    self.store.delete(f"{pid}/{name}", version=stats[name].version)
            except ObjectLocked as exc:
                log.warning("%s: %s is under retention, kept: %s", self.leg.to, pid, exc)
                blocked.append(pid)
        return blocked

    # -- verify --------------------------------------------------------------------

    def _manifest(self, point: RecoveryPoint) -> dict[str, Any]:
        buf = io.BytesIO()
        try:
            self.store.get_stream(f"{point.id}/{MANIFEST}", buf)
        except ObjectNotFound:
            raise BackendError(f"{point.id}: its manifest is gone") from None
        doc = json.loads(buf.getvalue())
        if doc.get("format") != MANIFEST_FORMAT:
            raise BackendError(f"{point.id}: unknown manifest format {doc.get('format')!r}")
        return doc

    def check(self, level: str, points: list[RecoveryPoint]) -> dict[str, Any]:
        """integrity: the newest point is downloaded and re-hashed against its manifest,
        and the store's own checksum must still be the one recorded at upload.
        sample: the download is restored through its consumer, and checked there."""
        if level == "sample":
            return self._sample(points[-1])
        point = points[-1]
        doc = self._manifest(point)
        if doc.get("source", {}).get("kind") in PLATFORM_KINDS:
            return self._platform_check("integrity", point, doc)
        info = self.store.stat(doc["object"])
        problems = []
        if info.size != doc["size"]:
            problems.append(f"size {info.size} ≠ {doc['size']} in the manifest")
        if info.md5_hex and doc.get("md5") and info.md5_hex != doc["md5"]:
            problems.append("the store's MD5 differs from the manifest's")
        if info.crc32c_b64 and doc.get("crc32c") and info.crc32c_b64 != doc["crc32c"]:
            problems.append("the store's CRC32C differs from the manifest's")

        sink = _HashingSink()
        self.store.get_stream(doc["object"], sink)  # type: ignore[arg-type]
        if sink.sha256.hexdigest() != doc["sha256"]:
            problems.append(f"downloaded SHA-256 {sink.sha256.hexdigest()[:12]}… ≠ {doc['sha256'][:12]}… in the manifest")
        msg = "; ".join(problems) or f"{point.id}: downloaded {sink.n} bytes, SHA-256 matches the manifest"
        return {"level": "integrity", "ok": not problems, "message": (f"{point.id}: " + msg) if problems else msg}

    def _download(self, key: str) -> tuple[int, threading.Thread, dict[str, Any]]:
        """Start downloading ``key`` into a pipe: (read fd, the thread, its result box with
        "n" bytes and "sha256", or "error"). The caller reads the fd, then joins the thread."""
        r, w = os.pipe()
        box: dict[str, Any] = {}

        def fetch() -> None:
            try:
                with os.fdopen(w, "wb") as out:
                    tee = _HashingSink(out)
                    box["n"] = self.store.get_stream(key, tee)  # type: ignore[arg-type]
                    box["sha256"] = tee.sha256.hexdigest()
            except BaseException as exc:  # noqa: BLE001 - reported by the caller
                box["error"] = exc

        t = threading.Thread(target=fetch, name="download", daemon=True)
        t.start()
        return r, t, box

    def _sample(self, point: RecoveryPoint) -> dict[str, Any]:
        """A zfs stream is received into a scratch dataset beside the source and its
        snapshot guid compared with the manifest's (then destroyed); a tar is read member
        by member to its end; anything else is re-hashed (as integrity)."""
        doc = self._manifest(point)
        kind = doc.get("source", {}).get("kind")
        if kind in PLATFORM_KINDS:
            return self._platform_check("sample", point, doc)
        if kind == "zfs":
            return self._sample_zfs(point, doc)
        if kind == "rbd":
            return self._sample_rbd(point, doc)
        if kind == "directory":
            r, t, box = self._download(doc["object"])
            members = size = 0
            try:
                with os.fdopen(r, "rb") as inp, tarfile.open(fileobj=inp, mode="r|") as tar:
                    for m in tar:
                        members += 1
                        if m.isfile():
                            f = tar.extractfile(m)
                            while f and (chunk := f.read(1 << 20)):
                                size += len(chunk)
            except (tarfile.TarError, OSError) as exc:
                t.join()
                return {"level": "sample", "ok": False, "message": f"{point.id}: the tar does not read back: {exc}"}
            t.join()
            if "error" in box:
                return {"level": "sample", "ok": False, "message": f"{point.id}: download failed: {box['error']}"}
            return {"level": "sample", "ok": True, "message": f"{point.id}: the tar reads back: {members} members, {size} bytes of file data"}
        out = self.check("integrity", [point])
        return {**out, "level": "sample"}

    def _platform_check(self, level: str, point: RecoveryPoint, doc: dict[str, Any]) -> dict[str, Any]:
        """Download into a private work dir (SHA-256 checked on the way), then the
        platform's own proof: offline raft check, etcd restore + key counts, scratch servers."""
        plat = self._platform()
        if plat is None or plat.kind != doc["source"]["kind"]:
            return {"level": level, "ok": False, "message": f"{point.id}: a {doc['source']['kind']} upload, but the policy's source is "
                    "no longer that kind: verify it with the configuration that made it"}
        with self._workdir() as work:
            path = work / doc["name"]
            try:
                self._fetch(doc, path)
            except BackendError as exc:
                return {"level": level, "ok": False, "message": f"{point.id}: {exc}"}
            try:
                problems, proved = plat.sample(path, doc, work) if level == "sample" else plat.integrity(path, doc, work)
            except DrtoolError as exc:
                problems, proved = [str(exc)], ""
        msg = "; ".join(problems) if problems else f"downloaded {doc['size']} bytes, SHA-256 matches the manifest; {proved}"
        return {"level": level, "ok": not problems, "message": f"{point.id}: {msg}"}

    def _fetch(self, doc: dict[str, Any], path: Path) -> None:
        """Download the point's object to ``path``; BackendError unless its SHA-256 is the manifest's."""
        with open(path, "wb") as out:
            tee = _HashingSink(out)
            self.store.get_stream(doc["object"], tee)  # type: ignore[arg-type]
        if tee.sha256.hexdigest() != doc["sha256"]:
            raise BackendError(f"downloaded SHA-256 {tee.sha256.hexdigest()[:12]}… ≠ {doc['sha256'][:12]}… in the manifest")

    def _sample_rbd(self, point: RecoveryPoint, doc: dict[str, Any]) -> dict[str, Any]:
        """The restore path itself, into a scratch image beside the source, then removed."""
        import secrets as _secrets

        pool = self.ctx.cfg.location(self.policy.source.location).pool  # type: ignore[attr-defined]
        scratch = f"{pool}/drtool-verify-{_secrets.token_hex(3)}"
        cli = self._rbd()
        try:
            out = self.restore(point, scratch)
        except BackendError as exc:
            return {"level": "sample", "ok": False, "message": f"{point.id}: {exc}"}
        finally:
            if cli.image_exists(pool, scratch.split("/", 1)[1]):
                cli.remove_image(pool, scratch.split("/", 1)[1], purge_snapshots=True)
        problems = out.detail["mismatches"]
        return {"level": "sample", "ok": not problems, "message": "; ".join(problems) if problems else f"{point.id}: {out.message}"}

    def _sample_zfs(self, point: RecoveryPoint, doc: dict[str, Any]) -> dict[str, Any]:
        """The restore path itself, into a scratch dataset beside the source, then destroyed."""
        import secrets as _secrets

        cli = self._zfs()
        root = self.ctx.cfg.location(self.policy.source.location).dataset  # type: ignore[attr-defined]
        scratch = f"{root}/drtool-verify-{_secrets.token_hex(3)}"
        try:
            out = self.restore(point, scratch)
        except BackendError as exc:
            return {"level": "sample", "ok": False, "message": f"{point.id}: {exc}"}
        finally:
            if cli.dataset_exists(scratch):
                cli.destroy_dataset(scratch, recursive=True)
        problems = out.detail["mismatches"]
        want = doc.get("source_point", {}).get("guid")
        msg = "; ".join(problems) if problems else \
            f"{point.id}: the stream received into {scratch}; snapshot guid {want} matches the source"
        return {"level": "sample", "ok": not problems, "message": msg}

    # -- restore -------------------------------------------------------------------

    def restore_preflight(self, target: str | None, *, force: bool = False, rollback: bool = False) -> None:
        if rollback or not target:
            raise UsageError("an upload restores into --target: a directory (files, tar), or a new dataset (zfs streams)")
        if self._zfs_source():
            if self._zfs().dataset_exists(target):
                raise UsageError(f"{target} already exists: a zfs stream is received into a new dataset")
            return
        if self._rbd_source():
            pool, _, image = target.rpartition("/")
            if not pool or not image:
                raise UsageError("an RBD stream is imported into a new image: --target <pool>/<new-image>")
            if self._rbd().image_exists(pool, image):
                raise UsageError(f"{target} already exists: an RBD stream is imported into a new image")
            return
        tgt = Path(target)
        if tgt.exists() and any(tgt.iterdir()) and not force:
            raise UsageError(f"{target} is not empty: restore into an empty directory (or pass --force)")

    def restore(self, point: RecoveryPoint, target: str | None, *, include: tuple[str, ...] = (), force: bool = False,
                rollback: bool = False, destroy_newer: bool = False) -> LegOutcome:
        """Download the point into ``target``, hashing the bytes on the way: the SHA-256 must
        equal the manifest's (a zfs stream must also land with the manifest's snapshot guid)."""
        assert target
        doc = self._manifest(point)
        kind = doc.get("source", {}).get("kind")
        r, t, box = self._download(doc["object"])
        mismatches: list[str] = []
        try:
            if kind == "rbd":
                mismatches.extend(self._restore_rbd(doc, target, r))
            elif kind == "zfs":
                from ..backends.zfs import receive_args

                cli = self._zfs()
                res = cli._run(cli.zfs_bin, *receive_args(target, features=cli.features()), stdin=r, timeout=7 * 24 * 3600)
                if not res.ok:
                    mismatches.append(f"zfs receive into {target} failed: {res.stderr_tail(2)}")
                else:
                    want = doc.get("source_point", {}).get("guid")
                    if want not in {s.guid for s in cli.list_snapshots(target)}:
                        mismatches.append(f"{target} holds no snapshot with the manifest's guid {want}")
            elif kind == "directory":
                if not hasattr(tarfile, "data_filter"):  # Python < 3.11.4: no safe extraction filter
                    raise UsageError("restoring a tar needs Python 3.11.4 or later (tarfile's 'data' extraction filter)")
                Path(target).mkdir(parents=True, exist_ok=True)
                with os.fdopen(r, "rb", closefd=False) as inp, tarfile.open(fileobj=inp, mode="r|") as tar:
                    tar.extractall(target, filter="data")  # no absolute paths, no links out of the target
                    for _ in iter(lambda: inp.read(1 << 20), b""):  # drain the padding, so the hash covers every byte
                        pass
            else:
                Path(target).mkdir(parents=True, exist_ok=True)
                with open(Path(target) / doc["name"], "wb") as out, os.fdopen(r, "rb", closefd=False) as inp:
                    while chunk := inp.read(1 << 20):
                        out.write(chunk)
        finally:
            os.close(r)
            t.join()
        if "error" in box:
            raise BackendError(f"downloading {doc['object']} failed: {box['error']}")
        if box.get("sha256") != doc["sha256"]:
            mismatches.append(f"downloaded SHA-256 {str(box.get('sha256'))[:12]}… ≠ {doc['sha256'][:12]}… in the manifest")
        what = {"zfs": f"received into {target}", "rbd": f"imported into {target}", "directory": f"extracted into {target}"}.get(
            kind, f"written to {target}/{doc['name']}")
        plat = self._platform() if kind in PLATFORM_KINDS else None
        if plat is not None and not mismatches:
            what += "; " + plat.restore_hint(Path(target) / doc["name"])
        return LegOutcome(point=point, bytes_processed=box.get("n"), detail={"mismatches": mismatches, "manifest": doc},
                          message=f"{point.id}: {box.get('n')} bytes {what}" + ("; SHA-256 matches the manifest" if not mismatches else ""))

    def _restore_rbd(self, doc: dict[str, Any], target: str, fd: int) -> list[str]:
        """Create ``target`` (pool/image) at the snapshot's size and import the diff stream;
        the image then holds the snapshot, which must hash like the source's when that still exists."""
        cli = self._rbd()
        sp = doc.get("source_point", {})
        src_spec, snap = sp["snapshot"].split("@", 1)
        pool, image = target.rsplit("/", 1)
        cli.create_image_bytes(pool, image, int(sp["size"]))
        try:
            cli.import_diff(pool, image, fd)
        except BaseException:  # never leave a half-imported image: a retry would find the name taken
            try:
                cli.remove_image(pool, image, purge_snapshots=True)
            except Exception as e:  # noqa: BLE001 - the import's error is the one to raise
                log.warning("could not remove the partial image %s: %s", target, e)
            raise
        if snap not in {s.name for s in cli.list_snaps(pool, image)}:
            return [f"{target} holds no snapshot {snap} after the import"]
        spool, simage = src_spec.split("/", 1)
        if snap in {s.name for s in cli.list_snaps(spool, simage)}:
            want, _ = cli.export_hash(spool, simage, snap)
            got, _ = cli.export_hash(pool, image, snap)
            if want != got:
                return [f"{target}@{snap} hashes {got[:12]}…, the source snapshot {want[:12]}…"]
        return []

    def immutability(self) -> tuple[bool, str]:
        """(immutable, how we know), read from the bucket."""
        return describe_retention(self.store.retention_state())

    def commands(self) -> list[dict[str, Any]]:
        if self._zfs_source():
            cli = self._zfs()
        elif self._rbd_source():
            cli = self._rbd()
        else:
            return []
        out = list(cli.commands)
        cli.commands.clear()
        return out


def describe_retention(state: RetentionState) -> tuple[bool, str]:
    if state.immutable:
        days = (state.default_retention_s or 0) / 86400
        return True, f"read from the bucket: {state.default_mode or 'retention'} {days:g} day(s)" + (", locked" if state.locked else "")
    why = "no object lock or retention policy" if not state.lock_enabled else "a lock without a default retention period"
    return False, f"read from the bucket: {why}"


def finish_quietly(finish: Any) -> None:
    try:
        finish()
    except Exception:  # noqa: BLE001 - the upload's own error is the one to report
        log.debug("source also failed", exc_info=True)


class _HashingSink(io.RawIOBase):
    """A write sink that SHA-256-hashes and counts what passes, optionally passing it on."""

    def __init__(self, out: BinaryIO | None = None) -> None:
        self.out, self.sha256, self.n = out, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.sha256.update(b)
        self.n += len(b)
        if self.out is not None:
            self.out.write(b)
        return len(b)


class _ProducerReader(io.RawIOBase):
    """The read end of a pipe fed by a producer thread. EOF comes when the pipe closes,
    or when the producer has ended and nothing is left to read (zfs-fuse's daemon keeps
    a copy of the write end of a `zfs send` pipe open)."""

    def __init__(self, fd: int, producer: threading.Thread) -> None:
        self.fd, self.producer = fd, producer

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        import select

        n = 1 << 20 if n is None or n < 0 else n
        while True:
            if select.select([self.fd], [], [], 0.5)[0]:
                return os.read(self.fd, n)
            if not self.producer.is_alive():
                return os.read(self.fd, n) if select.select([self.fd], [], [], 0)[0] else b""

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()
