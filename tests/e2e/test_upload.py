"""upload legs end to end: the drtool CLI against real local object stores, GCS on
fake-gcs-server and S3 on SeaweedFS. Immutability is read from the bucket: SeaweedFS
enforces S3 object lock, so the "blocked, not failed" prune and the 1-immutable rule
are tested there (no GCS emulator implements retention; see test_gcs_store.py)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from helpers import DRTOOL, make_tree, tree_digest

pytestmark = pytest.mark.timeout(300)


def _drtool(config: Path, *args: str, check: int | None = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([DRTOOL, "-c", str(config), *args], capture_output=True, text=True, timeout=240,
                          env={**os.environ, **(env or {})})
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _json(config: Path, *args: str, check: int | None = 0, env: dict | None = None) -> dict:
    return json.loads(_drtool(config, *args, "--json", check=check, env=env).stdout)


def _policy(tmp_path: Path, location: str, source: str, *, leg_extra: str = "", immutable: bool = False) -> Path:
    p = tmp_path / "upload.yaml"
    p.write_text(f"""\
version: 1
locations:
  nas:
    type: filesystem
    media: hdd
    site: home
    failure_domain: nas01
{location}
    media: cloud-object
    site: offsite
    failure_domain: cloud
    immutable: {str(immutable).lower()}
policies:
  - name: docs
    source: {source}
    rpo: 1d
    rto: 4h
    legs:
      - kind: upload
        to: offsite
        schedule: "0 3 * * *"
        verify: {{level: integrity, every: 1d}}
{leg_extra}""")
    return p


def _gcs_location(fake_gcs, bucket: str) -> str:
    return f"""  offsite:
    type: gcs
    bucket: {bucket}
    prefix: lab
    endpoint: {fake_gcs.endpoint}"""


def _s3_location(seaweedfs, bucket: str) -> str:
    return f"""  offsite:
    type: s3
    bucket: {bucket}
    prefix: lab
    endpoint: {seaweedfs.endpoint}
    region: us-east-1
    access_key_id: {{env: TEST_S3_KEY}}
    secret_access_key: {{env: TEST_S3_SECRET}}"""


def test_directory_to_gcs_is_proven_then_corruption_is_caught(fake_gcs, tmp_path):
    bucket = fake_gcs.make_bucket("up")
    src = make_tree(tmp_path / "src", files=30)
    config = _policy(tmp_path, _gcs_location(fake_gcs, bucket), f"{{location: nas, path: {src}}}")
    assert "would stream the directory" in _drtool(config, "run", "--dry-run").stdout
    doc = _json(config, "run")
    result = doc["results"][0]
    assert result["phase"] == "succeeded" and "store checksum matched" in result["message"], doc
    assert doc["verifications"][0]["ok"] and "SHA-256 matches the manifest" in doc["verifications"][0]["message"]

    client = fake_gcs.client()
    names = sorted(b.name for b in client.list_blobs(bucket))
    point = result["point"]
    assert names == sorted([f"lab/{point}/{src.name}.tar", f"lab/{point}/manifest.json"])
    manifest = json.loads(client.bucket(bucket).blob(f"lab/{point}/manifest.json").download_as_bytes())
    data = client.bucket(bucket).blob(f"lab/{point}/{src.name}.tar").download_as_bytes()
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest() and manifest["size"] == len(data)
    assert manifest["policy"] == "docs" and manifest["source"]["kind"] == "directory"

    inv = _json(config, "inventory")["locations"]["offsite"]
    assert [p["id"] for p in inv["points"]] == [point]

    # restore: the tar is extracted, and the download's SHA-256 must equal the manifest's
    restored = tmp_path / "restored"
    doc = _json(config, "restore", "--policy", "docs", "--target", str(restored))
    assert doc["ok"] and "SHA-256 matches the manifest" in doc["message"], doc
    assert tree_digest(restored / src.name) == tree_digest(src)

    # someone replaces the object in the bucket: verify notices
    client.bucket(bucket).blob(f"lab/{point}/{src.name}.tar").upload_from_string(data[:-10] + b"x" * 10)
    doc = _json(config, "verify", check=1)
    assert "differs" in doc["verifications"][0]["message"] or "≠" in doc["verifications"][0]["message"], doc


def test_a_point_without_manifest_never_counts(fake_gcs, tmp_path):
    bucket = fake_gcs.make_bucket("up")
    src = tmp_path / "db.dump"
    src.write_bytes(os.urandom(100_000))
    config = _policy(tmp_path, _gcs_location(fake_gcs, bucket), f"{{location: nas, path: {src}}}")
    # what an upload cut short leaves: data without a manifest
    fake_gcs.client().bucket(bucket).blob("lab/docs/upload-offsite/20260101T000000Z/db.dump").upload_from_string(b"partial")
    assert _json(config, "inventory")["locations"]["offsite"]["points"] == []
    _drtool(config, "verify", check=1)  # nothing to verify is a failure, not a pass
    _drtool(config, "run")
    assert len(_json(config, "inventory")["locations"]["offsite"]["points"]) == 1


def test_command_stream_to_s3_and_a_failing_command_keeps_nothing(seaweedfs, tmp_path):
    env = {"TEST_S3_KEY": seaweedfs.access_key, "TEST_S3_SECRET": seaweedfs.secret_key}
    bucket = seaweedfs.make_bucket("up")
    config = _policy(tmp_path, _s3_location(seaweedfs, bucket), "{location: nas}",
                     leg_extra="        upload: {command: [head, -c, '12000000', /dev/urandom], name: stream.bin, part_size_mb: 5}\n")
    doc = _json(config, "run", env=env)
    assert doc["results"][0]["phase"] == "succeeded" and doc["results"][0]["bytes_processed"] == 12_000_000, doc
    assert doc["verifications"][0]["ok"], doc
    assert seaweedfs.access_key not in json.dumps(doc)

    restored = tmp_path / "stream-restored"
    doc = _json(config, "restore", "--policy", "docs", "--target", str(restored), env=env)
    assert doc["ok"] and (restored / "stream.bin").stat().st_size == 12_000_000, doc

    time.sleep(1.1)
    bad = _policy(tmp_path, _s3_location(seaweedfs, bucket), "{location: nas}",
                  leg_extra="        upload: {command: [sh, -c, 'head -c 6000000 /dev/urandom; exit 3'], part_size_mb: 5}\n")
    proc = _drtool(bad, "run", check=1, env=env)
    assert "the source command exited 3" in proc.stdout
    points = _json(config, "inventory", env=env)["locations"]["offsite"]["points"]
    assert len(points) == 1  # the failed run left no point
    keys = [o["Key"] for o in seaweedfs.client().list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert len(keys) == 2, keys  # the good point's data and manifest; nothing from the failed run


def test_locked_bucket_is_immutable_and_prune_reports_blocked(seaweedfs, tmp_path):
    env = {"TEST_S3_KEY": seaweedfs.access_key, "TEST_S3_SECRET": seaweedfs.secret_key}
    bucket = seaweedfs.make_bucket("locked", object_lock=True)
    seaweedfs.client().put_object_lock_configuration(Bucket=bucket, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": "GOVERNANCE", "Days": 1}}})
    src = tmp_path / "etcd.db"
    src.write_bytes(os.urandom(50_000))
    config = _policy(tmp_path, _s3_location(seaweedfs, bucket), f"{{location: nas, path: {src}}}",
                     leg_extra="        retention: {keep_last: 1}\n", immutable=True)
    doc = _json(config, "policy", "explain", env=env)
    rule = next(r for r in doc["policies"][0]["rules"] if r["rule"] == "1 immutable or offline")
    assert rule["ok"] and "read from the bucket: GOVERNANCE 1 day(s)" in rule["detail"], rule
    for _ in range(3):
        _drtool(config, "run", "--no-verify", env=env)
        time.sleep(1.1)
    assert len(_json(config, "inventory", env=env)["locations"]["offsite"]["points"]) == 3
    doc = _json(config, "prune", env=env)
    prune = doc["prunes"][0]
    assert prune["ok"] and len(prune["blocked"]) == 2 and prune["removed"] == [], prune
    assert "2 blocked by the store's retention" in prune["message"]
    assert len(_json(config, "inventory", env=env)["locations"]["offsite"]["points"]) == 3  # nothing lost


def test_declared_immutable_without_a_lock_is_flagged(seaweedfs, tmp_path):
    env = {"TEST_S3_KEY": seaweedfs.access_key, "TEST_S3_SECRET": seaweedfs.secret_key}
    bucket = seaweedfs.make_bucket("plain")
    src = tmp_path / "f"
    src.write_bytes(b"x" * 1000)
    config = _policy(tmp_path, _s3_location(seaweedfs, bucket), f"{{location: nas, path: {src}}}", immutable=True)
    doc = _json(config, "policy", "explain", env=env)
    rule = next(r for r in doc["policies"][0]["rules"] if r["rule"] == "1 immutable or offline")
    assert not rule["ok"] and "claims immutable but contradicted: declared immutable, but read from the bucket: no object lock" in rule["detail"]
    proc = _drtool(config, "status", check=4, env=env)
    assert "contradicted" in proc.stdout


def test_empty_source_is_a_failure(fake_gcs, tmp_path):
    bucket = fake_gcs.make_bucket("up")
    src = tmp_path / "empty.dump"
    src.write_bytes(b"")
    config = _policy(tmp_path, _gcs_location(fake_gcs, bucket), f"{{location: nas, path: {src}}}")
    proc = _drtool(config, "run", check=1)
    assert "was empty" in proc.stdout
    assert list(fake_gcs.client().list_blobs(bucket)) == []


def test_zfs_stream_upload_is_proven_by_a_receive_into_scratch(zfs, fake_gcs, tmp_path):
    """A zfs source: the upload leg sends the newest snapshot of the policy's snapshot
    leg as a full stream; sample verify downloads it and receives it into a scratch
    dataset beside the source (real zfs-fuse), compares the snapshot guid with the
    manifest's, and destroys the scratch dataset."""
    from helpers import zfs_cmd

    pool = zfs.make_pool("drup")
    zfs_cmd("create", f"{pool}/docs")
    for i in range(5):
        (zfs.mountpoint(pool) / "docs" / f"f{i}.txt").write_text(f"file {i}\n" * 2000)
    bucket = fake_gcs.make_bucket("zfsup")
    config = tmp_path / "zfsup.yaml"
    config.write_text(f"""\
version: 1
locations:
  tank: {{type: zfs, dataset: {pool}, media: ssd, site: home, failure_domain: nas01}}
{_gcs_location(fake_gcs, bucket)}
    media: cloud-object
    site: offsite
    failure_domain: cloud
policies:
  - name: docs
    source: {{location: tank, dataset: {pool}/docs}}
    rpo: 1d
    rto: 4h
    legs:
      - {{kind: snapshot, schedule: "@hourly", retention: {{keep_last: 3}}}}
      - {{kind: upload, to: offsite, schedule: "@daily", verify: {{level: sample, every: 1d}}}}
""")
    doc = _json(config, "run")
    snap_res, up_res = doc["results"]
    assert snap_res["phase"] == "succeeded" and up_res["phase"] == "succeeded", doc
    snap = snap_res["point"]
    manifest = json.loads(fake_gcs.client().bucket(bucket).blob(f"lab/{up_res['point']}/manifest.json").download_as_bytes())
    assert manifest["source"]["kind"] == "zfs" and manifest["source_point"]["snapshot"] == snap
    guid = zfs_cmd("get", "-H", "-p", "-o", "value", "guid", snap).strip()
    assert manifest["source_point"]["guid"] == guid
    ver = next(v for v in doc["verifications"] if v["leg"] == "upload-offsite")
    assert ver["ok"] and ver["level"] == "sample" and f"snapshot guid {guid} matches" in ver["message"], ver
    leftovers = zfs_cmd("list", "-H", "-o", "name", "-r", pool)
    assert "drtool-verify" not in leftovers  # the scratch dataset is gone

    # restore: the stream is received into a new dataset, with the source snapshot's guid
    doc = _json(config, "restore", "--policy", "docs", "--leg", "upload-offsite", "--target", f"{pool}/restored")
    assert doc["ok"], doc
    clone = f"{pool}/restored-check"
    zfs_cmd("clone", zfs_cmd("list", "-H", "-t", "snapshot", "-o", "name", "-r", f"{pool}/restored").split()[0], clone)
    for i in range(5):
        assert (zfs.mountpoint(pool) / "restored-check" / f"f{i}.txt").read_text() == f"file {i}\n" * 2000
