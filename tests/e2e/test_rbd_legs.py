"""RBD snapshot and replicate legs end to end: the drtool CLI against a real single-node
Ceph (the session's ``ceph_cluster``). Image content is written with ``rbd import-diff``
of generated diff streams (no kernel map needed).

snapshot → change ~10 % of the blocks → snapshot → incremental replicate into a second
pool → identical checksums (integrity: whole-snapshot SHA-256 on both sides; sample:
random extents) → prune by each side's own retention, never the replication base, never
a foreign snapshot → clone-restore hashes like its snapshot → policy explain."""
from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from drtool.backends.ceph_rbd import CephConn, RbdCli
from helpers import DRTOOL, rbd_diff_stream

pytestmark = pytest.mark.timeout(300)
MiB = 1 << 20
SIZE = 16 * MiB


def _drtool(cfg: Path, *args: str, code: int = 0) -> dict:
    p = subprocess.run([DRTOOL, "-c", str(cfg), *args, "--json"], capture_output=True, text=True, timeout=240)
    assert p.returncode == code, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout)


def test_rbd_snapshot_replicate_verify_prune_restore(ceph_cluster, tmp_path):
    src_pool, dst_pool = ceph_cluster.make_pool("src"), ceph_cluster.make_pool("dst")
    image = f"vol-{uuid.uuid4().hex[:6]}"
    cli = RbdCli(CephConn(conf=str(ceph_cluster.conf), keyring=str(ceph_cluster.keyring)))
    cli.create_image(src_pool, image, SIZE // MiB)
    rng = random.Random(5)
    data = bytearray(rng.randbytes(SIZE))
    cli.import_diff(src_pool, image, io.BytesIO(rbd_diff_stream(SIZE, {o: bytes(data[o:o + MiB]) for o in range(0, SIZE, MiB)})))
    cfg = tmp_path / "rbd.yaml"
    cfg.write_text(f"""\
version: 1
locations:
  ceph: {{type: ceph-rbd, pool: {src_pool}, conf: {ceph_cluster.conf}, keyring: {ceph_cluster.keyring}, media: nvme, site: home, failure_domain: ceph-a}}
  ceph-backup: {{type: ceph-rbd, pool: {dst_pool}, conf: {ceph_cluster.conf}, keyring: {ceph_cluster.keyring}, media: hdd, site: home, failure_domain: ceph-b}}
policies:
  - name: vol
    source: {{location: ceph, image: {image}}}
    rpo: 1h
    rto: 1h
    legs:
      - {{kind: snapshot, schedule: "@hourly", retention: {{keep_last: 2}}, verify: {{level: integrity, every: 1d}}}}
      - {{kind: replicate, to: ceph-backup, schedule: "@hourly", retention: {{keep_last: 3}}, verify: {{level: integrity, every: 1d}}}}
""")
    first = _drtool(cfg, "run", "--no-verify")
    assert [r["phase"] for r in first["results"]] == ["succeeded", "succeeded"], first
    assert "(full," in first["results"][1]["message"]
    time.sleep(1.1)  # snapshot names have one-second resolution

    blocks = rng.sample(range(SIZE // 4096), SIZE // 4096 // 10)  # ~10 % of the 4 KiB blocks
    writes = {b * 4096: rng.randbytes(4096) for b in blocks}
    cli.import_diff(src_pool, image, io.BytesIO(rbd_diff_stream(SIZE, writes)))
    for off, chunk in writes.items():
        data[off:off + 4096] = chunk
    second = _drtool(cfg, "run", "--no-verify")
    assert "incremental from drtool-vol-snapshot-" in second["results"][1]["message"], second
    sent = second["results"][1]["bytes_processed"]
    assert sent < SIZE // 2, sent  # a diff, not the image

    newest = second["results"][1]["point"]
    snap = newest.split("@", 1)[1]
    want = hashlib.sha256(data).hexdigest()
    assert cli.export_hash(dst_pool, image, snap)[0] == want == cli.export_hash(src_pool, image, snap)[0]
    ver = _drtool(cfg, "verify")
    assert all(v["ok"] for v in ver["verifications"]), ver
    assert any("hash the same" in v["message"] for v in ver["verifications"]), ver
    ver = _drtool(cfg, "verify", "--leg", "replicate-ceph-backup", "--level", "sample")
    assert ver["verifications"][0]["ok"] and "random 1 MiB extents" in ver["verifications"][0]["message"], ver

    # prune: someone else's snapshot is never touched; the replication base survives keep_last
    cli.snap_create(src_pool, image, "manual-before-upgrade")
    for _ in range(2):
        time.sleep(1.1)
        _drtool(cfg, "run", "--no-verify")
    _drtool(cfg, "prune")
    src_snaps = [s.name for s in cli.list_snaps(src_pool, image)]
    dst_snaps = [s.name for s in cli.list_snaps(dst_pool, image)]
    assert "manual-before-upgrade" in src_snaps
    mine = [s for s in src_snaps if s.startswith("drtool-")]
    assert len(mine) == 3 and mine[0] == snap, src_snaps  # keep_last 2, plus the last verified point
    assert len(dst_snaps) == 3 and snap in dst_snaps, dst_snaps  # the first (full) one went
    assert [s for s in src_snaps if s.startswith("drtool-")][-1] == dst_snaps[-1]  # the base is on both sides

    # an incremental still works after prune: the chain is intact
    time.sleep(1.1)
    again = _drtool(cfg, "run", "--no-verify")
    assert "incremental from" in again["results"][1]["message"], again

    # snapshots taken faster than replication: the replication base is pinned, not pruned
    base = again["results"][1]["point"].split("@", 1)[1]
    for _ in range(3):
        time.sleep(1.1)
        _drtool(cfg, "run", "--no-verify", "--leg", "snapshot")
    plan = _drtool(cfg, "prune", "--dry-run", "--leg", "snapshot")["prunes"][0]["plan"]
    decision = next(d for d in plan["decisions"] if d["point_id"].endswith("@" + base))
    assert decision["keep"] and any("replication base" in r for r in decision["reasons"]), plan

    # clone-restore the old point from the replica: it hashes like that snapshot
    restored = _drtool(cfg, "restore", "--policy", "vol", "--leg", "replicate-ceph-backup", "--point", snap,
                       "--target", f"{dst_pool}/restored-{uuid.uuid4().hex[:4]}")
    assert restored["ok"] and "SHA-256 matches" in restored["message"], restored

    explain = _drtool(cfg, "policy", "explain")["policies"][0]
    why = {c["leg"]: (c["counts"], c["reason"]) for c in explain["copies"]}
    assert why["snapshot"][0] is False and "same Ceph cluster is a recovery point, not a copy" in why["snapshot"][1]
    # both pools are in the one test cluster: the replica does not count, whatever failure_domain says
    assert why["replicate-ceph-backup"][0] is False and "same Ceph cluster" in why["replicate-ceph-backup"][1], why

    # the disaster: the source image is gone; the replica still verifies, alone, and prunes by its own retention
    cli.remove_image(src_pool, image, purge_snapshots=True)
    ver = _drtool(cfg, "verify", "--leg", "replicate-ceph-backup")
    assert ver["verifications"][0]["ok"] and "checked on the replica alone" in ver["verifications"][0]["message"], ver
    _drtool(cfg, "prune", "--leg", "replicate-ceph-backup")


def test_rbd_snapshot_uploads_as_a_stream_verifies_and_imports_back(ceph_cluster, fake_gcs, tmp_path):
    """The stream interface for object storage: the newest snapshot as a full `rbd export-diff`
    stream to GCS (fake-gcs-server) with a manifest; sample verify imports it into a scratch
    image and compares its SHA-256 with the source snapshot's; restore imports it into a new image."""
    pool = ceph_cluster.make_pool("up")
    image = f"vol-{uuid.uuid4().hex[:6]}"
    cli = RbdCli(CephConn(conf=str(ceph_cluster.conf), keyring=str(ceph_cluster.keyring)))
    cli.create_image(pool, image, SIZE // MiB)
    rng = random.Random(9)
    writes = {o: rng.randbytes(MiB) for o in range(0, SIZE, 2 * MiB)}  # half the image: a sparse stream
    cli.import_diff(pool, image, io.BytesIO(rbd_diff_stream(SIZE, writes)))
    bucket = fake_gcs.make_bucket("rbd")
    cfg = tmp_path / "rbd-up.yaml"
    cfg.write_text(f"""\
version: 1
locations:
  ceph: {{type: ceph-rbd, pool: {pool}, conf: {ceph_cluster.conf}, keyring: {ceph_cluster.keyring}, media: nvme, site: home, failure_domain: ceph-a}}
  offsite: {{type: gcs, bucket: {bucket}, prefix: lab, endpoint: {fake_gcs.endpoint}, media: cloud-object, site: gcp, failure_domain: gcp}}
policies:
  - name: vol
    source: {{location: ceph, image: {image}}}
    rpo: 1h
    rto: 1h
    legs:
      - {{kind: snapshot, schedule: "@hourly"}}
      - {{kind: upload, to: offsite, schedule: "@daily", verify: {{level: sample, every: 1d}}}}
""")
    run = _drtool(cfg, "run", "--no-verify")
    assert [r["phase"] for r in run["results"]] == ["succeeded", "succeeded"], run
    assert ".rbddiff" in run["results"][1]["message"]
    ver = _drtool(cfg, "verify", "--leg", "upload-offsite")
    assert ver["verifications"][0]["ok"], ver
    assert "imported into" in ver["verifications"][0]["message"]
    assert ceph_cluster.rbd("ls", pool).stdout.decode().split() == [image]  # the scratch image is gone
    up = next(r for r in _drtool(cfg, "runs", "--limit", "10")["runs"] if r["kind"] == "leg" and r["leg"] == "upload-offsite")
    assert up["detail"]["manifest"]["source_point"]["size"] == SIZE, up["detail"]["manifest"]  # the snapshot sent, not a re-listing
    assert any("export-diff" in c["argv"] for c in up["command_log"]), up["command_log"]  # the rbd commands are in the run record
    target = f"{pool}/restored-{uuid.uuid4().hex[:4]}"
    out = _drtool(cfg, "restore", "--policy", "vol", "--leg", "upload-offsite", "--target", target)
    assert out["ok"], out
    snap = run["results"][0]["point"].split("@", 1)[1]
    assert cli.export_hash(pool, target.split("/", 1)[1], snap)[0] == cli.export_hash(pool, image, snap)[0]


def test_a_drill_clones_rbd_points_into_scratch_images_and_removes_them(ceph_cluster, tmp_path):
    pool = ceph_cluster.make_pool("drill")
    image = f"vol-{uuid.uuid4().hex[:6]}"
    cli = RbdCli(CephConn(conf=str(ceph_cluster.conf), keyring=str(ceph_cluster.keyring)))
    cli.create_image(pool, image, 4)
    cli.import_diff(pool, image, io.BytesIO(rbd_diff_stream(4 * MiB, {0: random.Random(3).randbytes(MiB)})))
    cfg = tmp_path / "rbd-drill.yaml"
    cfg.write_text(f"""\
version: 1
locations:
  ceph: {{type: ceph-rbd, pool: {pool}, conf: {ceph_cluster.conf}, keyring: {ceph_cluster.keyring}, media: nvme, site: home, failure_domain: ceph-a}}
policies:
  - name: vol
    source: {{location: ceph, image: {image}}}
    rpo: 1h
    rto: 1h
    legs: [{{kind: snapshot, schedule: "@hourly"}}]
""")
    _drtool(cfg, "run", "--no-verify")
    drill = tmp_path / "d.yaml"
    drill.write_text("version: 1\nname: rbd\ntargets: {rto: 10m, rpo: 1h}\nsteps:\n  - name: clone\n    restore: {policy: vol}\n")
    out = _drtool(cfg, "drill", "run", str(drill))
    assert out["verdict"] == "pass" and out["steps"][0]["status"] == "passed", out
    assert ceph_cluster.rbd("ls", pool).stdout.decode().split() == [image]  # the drill's clone is gone
    assert out["teardown"]["ok"]
    restores = [r for r in _drtool(cfg, "runs")["runs"] if r["kind"] == "restore"]
    assert restores and restores[0]["phase"] == "succeeded", restores
    assert restores[0]["detail"]["image"].startswith(f"{pool}/drtool-drill-") and not restores[0]["detail"]["mismatches"]
