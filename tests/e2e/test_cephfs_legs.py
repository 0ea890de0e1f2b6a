"""CephFS legs end to end: the drtool CLI against the session's real single-node Ceph
(``ceph_cluster``: mon, mgr, memstore OSD, mds, fs ``cephfs``; ceph-fuse mounts, no
kernel client) and a real local restic repository.

A directory location: snapshot → restic backup from that snapshot (the restic point is
tagged with it and carries its time; files at the restic snapshot's root) → modify the
live tree → restore from restic and from the snapshot → both equal the snapshot, byte
for byte with modes and symlinks → verify (sample) on both legs → prune keeps a foreign
snapshot and only what retention says → policy explain (same cluster: a recovery point,
not a copy) → an empty tree fails and leaves no snapshot.

A subvolume location with only a backup leg (real mgr volumes module): the backup takes a
snapshot of its own through ``ceph fs subvolume snapshot create``, backs it up, removes
it; the second backup names the first as its restic parent."""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from drtool.backends.cephfs import CephFsConn, CephFsMount
from conftest import require
from helpers import DRTOOL, tree_state

pytestmark = pytest.mark.timeout(420)


def _drtool(cfg: Path, *args: str, code: int = 0) -> dict:
    p = subprocess.run([DRTOOL, "-c", str(cfg), *args, "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == code, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout)


def content(t: dict[str, tuple]) -> dict[str, tuple]:
    """What restic brings back for sure: file bytes and modes, symlinks (dir modes and
    mtimes too, but compare the essentials)."""
    return {k: (v[0], v[1], v[3]) if v[0] == "file" else v for k, v in t.items()}


def write_tree(root: Path) -> None:
    (root / "photos" / "2026").mkdir(parents=True)
    for i in range(12):
        (root / "photos" / "2026" / f"img{i:02d}.jpg").write_bytes(os.urandom(1000 + 4093 * i))
    (root / "docs").mkdir()
    (root / "docs" / "notes.txt").write_text("before the incident\n")
    (root / "docs" / "secret.key").write_bytes(os.urandom(64))
    os.chmod(root / "docs" / "secret.key", 0o600)
    (root / "docs" / "latest").symlink_to("notes.txt")
    (root / "empty-dir").mkdir()


@pytest.fixture
def fsroot(ceph_cluster, tmp_path):
    require("ceph-fuse")
    require("restic")
    conn = CephFsConn(conf=str(ceph_cluster.conf), keyring=str(ceph_cluster.keyring), fs_name="cephfs")
    with CephFsMount(conn, tmp_path / "fsroot") as mp:
        yield mp


def _config(tmp_path: Path, ceph_cluster, location: str, legs: str, keyring: str | None = None) -> Path:
    (tmp_path / "restic.pass").write_text("restic-test-pass\n")
    cfg = tmp_path / "cephfs.yaml"
    cfg.write_text(f"""\
version: 1
locations:
  fs:
    type: cephfs
    {location}
    conf: {ceph_cluster.conf}
    keyring: {keyring or ceph_cluster.keyring}
    media: nvme
    site: home
    failure_domain: ceph-lab
  repo:
    type: restic
    repository: {tmp_path}/repo
    password: {{file: {tmp_path}/restic.pass}}
    init: true
    media: hdd
    site: home
    failure_domain: nas
policies:
  - name: share
    source: {{location: fs}}
    rpo: 1h
    rto: 1h
    legs:
{legs}""")
    return cfg


def _restic(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "RESTIC_PASSWORD_FILE": str(tmp_path / "restic.pass")}
    return subprocess.run(["restic", "-r", str(tmp_path / "repo"), *args], capture_output=True, text=True, check=True, env=env).stdout


def test_cephfs_snapshot_backup_restore_verify_prune(ceph_cluster, fsroot, tmp_path):
    d = f"share-{uuid.uuid4().hex[:6]}"
    live = fsroot / d
    live.mkdir()
    write_tree(live)
    before = tree_state(live)
    cfg = _config(tmp_path, ceph_cluster, f"path: /{d}", """\
      - {kind: snapshot, schedule: "@hourly", retention: {keep_last: 2}, verify: {level: sample, every: 1d, sample_files: 5}}
      - {kind: backup, to: repo, schedule: "@daily", retention: {keep_last: 5}, verify: {level: sample, every: 1d, sample_files: 5}}
""")
    dry = subprocess.run([DRTOOL, "-c", str(cfg), "run", "--dry-run"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "newest snapshot of the snapshot leg" in dry.stdout, dry.stdout + dry.stderr

    first = _drtool(cfg, "run", "--no-verify")
    assert [r["phase"] for r in first["results"]] == ["succeeded", "succeeded"], first
    snap = first["results"][0]["point"]
    assert snap.startswith("drtool-share-snapshot-") and (live / ".snap" / snap).is_dir()
    assert tree_state(live / ".snap" / snap) == before

    # the restic point: tagged with the snapshot, at the snapshot's time, files at its root
    snaps = json.loads(_restic(tmp_path, "snapshots", "--json"))
    assert len(snaps) == 1 and f"drtool:cephfs-snapshot={snap}" in snaps[0]["tags"], snaps
    assert snaps[0]["time"].startswith(time.strftime("%Y-%m-%dT%H:%M:%S", time.strptime(snap[-16:], "%Y%m%dT%H%M%SZ"))), (snaps, snap)
    listed = _restic(tmp_path, "ls", snaps[0]["id"]).splitlines()
    assert "/docs/notes.txt" in listed and not any(".snap" in ln for ln in listed[1:]), listed[:5]
    assert snaps[0]["paths"][0].endswith(f"/.snap/{snap}")

    # the live tree changes (the incident); the snapshot and the backup do not
    (live / "docs" / "notes.txt").write_text("after the incident: ransomware\n")
    (live / "photos" / "2026" / "img03.jpg").unlink()
    (live / "new.bin").write_bytes(b"x" * 100)
    assert tree_state(live) != before

    from_restic = tmp_path / "from-restic"
    out = _drtool(cfg, "restore", "--policy", "share", "--leg", "backup-repo", "--target", str(from_restic))
    assert out["ok"] and "checked against backup-time BLAKE3" in out["message"], out
    assert content(tree_state(from_restic)) == content(before)

    from_snap = tmp_path / "from-snap"
    out = _drtool(cfg, "restore", "--policy", "share", "--leg", "snapshot", "--point", snap, "--target", str(from_snap))
    assert out["ok"] and "every file's BLAKE3 matches the snapshot" in out["message"], out
    assert tree_state(from_snap) == before  # modes, mtimes, symlinks, empty dirs
    refused = subprocess.run([DRTOOL, "-c", str(cfg), "restore", "--policy", "share", "--leg", "snapshot", "--target", str(from_snap)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "not an empty directory" in refused.stderr + refused.stdout

    ver = _drtool(cfg, "verify")
    assert [v["ok"] for v in ver["verifications"]] == [True, True], ver
    assert "match their snapshot-time BLAKE3" in ver["verifications"][0]["message"], ver

    # a second backup: the snapshot leg's newest, with the first restic point as its parent
    os.mkdir(live / ".snap" / "manual-before-upgrade")  # someone else's snapshot
    for _ in range(3):
        time.sleep(1.1)  # snapshot names have one-second resolution
        assert all(r["phase"] == "succeeded" for r in _drtool(cfg, "run", "--no-verify")["results"])
    snaps = json.loads(_restic(tmp_path, "snapshots", "--json"))
    assert len(snaps) == 4 and snaps[-1].get("parent", "").startswith(snaps[-2]["id"][:8]), snaps[-1]

    _drtool(cfg, "prune")
    names = sorted(os.listdir(live / ".snap"))
    mine = [n for n in names if n.startswith("drtool-share-snapshot-")]
    assert "manual-before-upgrade" in names, names
    assert len(mine) == 3 and snap in mine, names  # keep_last 2, plus the last verified point

    explain = _drtool(cfg, "policy", "explain")["policies"][0]
    why = {c["leg"]: (c["counts"], c["reason"]) for c in explain["copies"]}
    assert why["snapshot"][0] is False and "same Ceph cluster is a recovery point, not a copy" in why["snapshot"][1], why
    assert why["backup-repo"][0] is True, why

    # an empty tree is a failure, and leaves no snapshot behind
    for p in sorted(live.rglob("*"), key=lambda p: -len(p.parts)):
        p.unlink() if p.is_file() or p.is_symlink() else p.rmdir()
    failed = _drtool(cfg, "run", "--no-verify", "--leg", "snapshot", code=1)
    assert "no files" in json.dumps(failed), failed
    assert sorted(os.listdir(live / ".snap")) == names


def test_cephfs_subvolume_backup_takes_and_removes_its_own_snapshot(ceph_cluster, fsroot, tmp_path, monkeypatch):
    """The keyring here is a secret reference (its content in an environment variable):
    the Ceph tools read it from an in-memory file, and its key never shows in the output."""
    ceph_cluster.enable_volumes()
    keyring_text = Path(ceph_cluster.keyring).read_text()
    key = next(ln.split("=", 1)[1].strip() for ln in keyring_text.splitlines() if ln.strip().startswith("key"))
    monkeypatch.setenv("TEST_CEPH_KEYRING", keyring_text)
    sub = f"sv{uuid.uuid4().hex[:6]}"
    ceph_cluster.ceph("fs", "subvolume", "create", "cephfs", sub)
    data = fsroot / ceph_cluster.ceph("fs", "subvolume", "getpath", "cephfs", sub).strip().lstrip("/")
    write_tree(data)
    before = tree_state(data)
    cfg = _config(tmp_path, ceph_cluster, f"subvolume: {sub}", """\
      - {kind: backup, to: repo, schedule: "@daily", retention: {keep_last: 5}, verify: {level: sample, every: 1d, sample_files: 4}}
""", keyring="{env: TEST_CEPH_KEYRING}")
    first = _drtool(cfg, "run")
    assert first["results"][0]["phase"] == "succeeded", first
    runs = _drtool(cfg, "runs", "--limit", "5")
    assert key not in json.dumps(runs) + json.dumps(first)
    assert any("/proc/" in " ".join(c["argv"]) for r in runs["runs"] for c in r.get("command_log") or []), runs
    assert [(v["level"], v["ok"]) for v in first["verifications"]] == [("sample", True)], first
    snaps = json.loads(_restic(tmp_path, "snapshots", "--json"))
    tag = next(t for t in snaps[0]["tags"] if t.startswith("drtool:cephfs-snapshot="))
    assert tag.split("=", 1)[1].startswith("drtool-share-backup-repo-")
    # the backup's own snapshot is gone again
    assert json.loads(ceph_cluster.ceph("fs", "subvolume", "snapshot", "ls", "cephfs", sub, "--format", "json")) == []

    (data / "docs" / "notes.txt").write_text("changed\n")
    time.sleep(1.1)
    second = _drtool(cfg, "run", "--no-verify")
    assert second["results"][0]["phase"] == "succeeded", second
    snaps = json.loads(_restic(tmp_path, "snapshots", "--json"))
    assert len(snaps) == 2 and snaps[1].get("parent", "").startswith(snaps[0]["id"][:8]), snaps

    target = tmp_path / "restored"
    out = _drtool(cfg, "restore", "--policy", "share", "--point", snaps[0]["id"], "--target", str(target))
    assert out["ok"], out
    assert content(tree_state(target)) == content(before)
