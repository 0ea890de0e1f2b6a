"""End-to-end on real ZFS (zfs-fuse): snapshot and replicate legs through the CLI.

policy → run (snapshot + full replicate) → modify → run (incremental) → replica
content equals the source → holds protect the replication base from prune →
prune never touches foreign snapshots → a diverged replica is a clear error and
nothing is destroyed.
"""
from __future__ import annotations

import subprocess
import time

import pytest

from helpers import ZfsLab, tree_digest, zfs_cmd

_zfs, _tree = zfs_cmd, tree_digest


@pytest.fixture
def zlab(zfs, tmp_path):
    return ZfsLab(zfs, tmp_path)


def _run(lab) -> dict:
    doc = lab.json("run", "--no-verify")
    assert [r["phase"] for r in doc["results"]] == ["succeeded", "succeeded"], doc
    time.sleep(1.1)  # snapshot names have one-second resolution
    return doc


def test_snapshot_replicate_incremental_prune_restore(zlab, tmp_path):
    first = _run(zlab)
    assert "full" in first["results"][1]["message"]
    for i in range(5):
        (zlab.data_dir / f"file{i}.txt").write_text(f"version 2 of file {i}\n" * 100)
    (zlab.data_dir / "new.bin").write_bytes(b"\x00\x01" * 50_000)
    second = _run(zlab)
    assert "incremental from" in second["results"][1]["message"]
    assert _zfs("get", "-H", "-o", "value", "readonly", zlab.replica).strip() in ("on", "off")  # mounted: reads 'temporary'
    assert _zfs("get", "-H", "-o", "value,source", "readonly", zlab.replica).split()[1] in ("local", "temporary")

    # the replica's newest snapshot holds exactly the source's data: read it via a clone
    newest = zlab.snaps(zlab.replica)[-1]
    clone = f"{zlab.pools[1]}/restore-check"
    _zfs("clone", newest, clone)
    try:
        assert _tree(zlab.mount(zlab.pools[1]) / "restore-check") == _tree(zlab.data_dir)
    finally:
        subprocess.run(["zfs", "destroy", clone], capture_output=True)

    # explain: snapshots are recovery points, the replica is a copy in another failure domain
    explain = zlab.json("policy", "explain")["policies"][0]
    why = {c["leg"]: (c["counts"], c["reason"]) for c in explain["copies"]}
    assert why["snapshot"] == (False, "a snapshot on the source's own storage is a recovery point, not an independent copy")
    assert why["replicate-backup"][0] is True

    # verify integrity on both legs: pool health, and the replica's guid matches the source
    ver = zlab.json("verify")
    assert all(v["ok"] for v in ver["verifications"]), ver
    assert any("guid of drtool-docs-" in v["message"] and "matches the source" in v["message"] for v in ver["verifications"]), [v["message"] for v in ver["verifications"]]

    # live status: the replica is fresh and verified, but two copies are not three
    status = zlab.json("status", check=4)["policies"][0]
    rules = {r["rule"]: r["ok"] for r in status["rules"]}
    assert rules["3 copies"] is False and rules["0 errors"] is True
    replica = next(c for c in status["copies"] if c["leg"] == "replicate-backup")
    assert replica["counts"] and replica["live"]["fresh"] and replica["live"]["verified"]

    # inventory shows both sides
    inv = zlab.json("inventory")["locations"]
    assert len(inv["tank"]["points"]) == 2 and len(inv["backup"]["points"]) == 2

    # more runs, plus someone else's snapshot, then prune
    _zfs("snapshot", f"{zlab.source}@manual-before-upgrade")
    for _ in range(2):
        _run(zlab)
    src_before = zlab.snaps(zlab.source)
    assert len(src_before) == 5  # 4 drtool + 1 manual
    plan = zlab.json("prune", "--dry-run")
    assert zlab.snaps(zlab.source) == src_before  # dry run destroys nothing
    snap_plan = next(p for p in plan["prunes"] if p["leg"] == "snapshot")["plan"]["decisions"]
    drtool_snaps = [s for s in src_before if "@drtool-" in s]
    assert [d["point_id"] for d in snap_plan] == drtool_snaps[::-1]  # newest first; the manual snapshot is never a candidate
    reasons = [" ".join(d["reasons"]) for d in snap_plan]
    assert [d["keep"] for d in snap_plan] == [True, True, True, False]
    assert "held" in reasons[0] and "last #1" in reasons[0]  # the replication base is held on both sides
    assert "last #2" in reasons[1]
    assert "pinned: last verified point" in reasons[2]  # verified after the second run
    zlab.json("prune")
    after = zlab.snaps(zlab.source)
    assert f"{zlab.source}@manual-before-upgrade" in after
    assert [s for s in after if "@drtool-" in s] == drtool_snaps[1:]
    replica = zlab.snaps(zlab.replica)
    assert len([s for s in replica if "@drtool-" in s]) == 3  # the replica is pruned by its own retention (keep_last 3)
    assert f"{zlab.replica}@manual-before-upgrade" in replica  # -I carried it over; not drtool's, so never pruned

    # the chain is intact: another incremental still works after prune
    (zlab.data_dir / "after-prune.txt").write_text("x")
    third = _run(zlab)
    assert "incremental from" in third["results"][1]["message"]


def test_diverged_replica_is_a_clear_error_and_nothing_is_destroyed(zlab):
    _run(zlab)
    # someone writes into the replica (replicas are readonly; they turned it off)
    _zfs("set", "readonly=off", zlab.replica)
    (zlab.mount(zlab.pools[1]) / "docs" / "intruder.txt").write_text("changed on the replica")
    (zlab.data_dir / "more.txt").write_text("more")
    before = zlab.snaps(zlab.replica)
    proc = zlab.drtool("run", check=3)  # the snapshot leg succeeds, the replicate leg fails
    assert "has been modified" in proc.stdout or "diverged" in proc.stdout.lower(), proc.stdout
    assert "--force" in proc.stdout  # the message names the way out, and what it costs
    assert zlab.snaps(zlab.replica) == before
    assert (zlab.mount(zlab.pools[1]) / "docs" / "intruder.txt").exists()

    # --force: the replica takes the increment (receive -F when zfs still refuses it); its
    # newest snapshot then holds exactly the source's data. (zfs-fuse may accept the plain
    # incremental on a retry and keep showing the stray file in the live mount, so the proof
    # reads the snapshot through a clone, as a restore would.)
    time.sleep(1.1)
    doc = zlab.json("run", "--leg", "replicate-backup", "--force")
    assert doc["results"][0]["phase"] == "succeeded", doc
    newest = zlab.snaps(zlab.replica)[-1]
    assert newest.split("@")[1] == zlab.snaps(zlab.source)[-1].split("@")[1]
    clone = f"{zlab.pools[1]}/force-check"
    _zfs("clone", newest, clone)
    try:
        assert _tree(zlab.mount(zlab.pools[1]) / "force-check") == _tree(zlab.data_dir)
    finally:
        subprocess.run(["zfs", "destroy", clone], capture_output=True)


def test_replicate_needs_a_snapshot_leg(zlab):
    text = zlab.config.read_text().replace("      - {kind: snapshot,", "      # - {kind: snapshot,")
    zlab.config.write_text(text)
    proc = zlab.drtool("policy", "validate", check=2)
    assert "a replicate leg sends the policy's own snapshots: add a snapshot leg" in proc.stderr


def test_restore_clone_rollback_and_receive_back(zlab):
    _run(zlab)
    v1 = _tree(zlab.data_dir)
    (zlab.data_dir / "file0.txt").write_text("version 2\n")
    _run(zlab)
    v2 = _tree(zlab.data_dir)
    assert v1 != v2
    src_pool, dst_pool = zlab.pools

    # sample verification: clones on both sides, hashes compared, clones destroyed
    ver = zlab.json("verify", "--leg", "replicate-backup", "--level", "sample")["verifications"][0]
    assert ver["ok"], ver
    sample = next(c for c in ver["checks"] if c["level"] == "sample")
    assert sample["files"] == 5 and "hash the same on the source and the replica" in sample["message"]
    assert "drtool-verify" not in _zfs("list", "-H", "-o", "name")

    # a level the driver does not have is never claimed: `full` is recorded as what ran
    full = zlab.json("verify", "--leg", "snapshot", "--level", "full")["verifications"][0]
    assert full["ok"] and full["level"] == "integrity" and "have no full level: verified at integrity" in full["message"]

    # clone restore of the first snapshot (the default): a new dataset with the old content
    first = zlab.snaps(zlab.source)[0].split("@")[1]
    doc = zlab.json("restore", "--policy", "docs", "--leg", "snapshot", "--point", first, "--target", f"{src_pool}/docs-v1")
    assert doc["ok"] and _tree(zlab.mount(src_pool) / "docs-v1") == v1

    # receive back from the replica: a new dataset on the source pool, guid-checked
    doc = zlab.json("restore", "--policy", "docs", "--leg", "replicate-backup", "--target", f"{src_pool}/docs-from-replica")
    assert doc["ok"] and "guid matches" in doc["message"]
    assert _tree(zlab.mount(src_pool) / "docs-from-replica") == v2

    # a restore never overwrites: an existing target is refused before anything runs
    proc = zlab.drtool("restore", "--policy", "docs", "--leg", "snapshot", "--target", f"{src_pool}/docs-v1", check=2)
    assert "already exists" in proc.stderr

    # rollback is guarded: newer snapshots would be destroyed
    proc = zlab.drtool("restore", "--policy", "docs", "--leg", "snapshot", "--point", first, "--rollback", check=2)
    assert "would destroy 1 newer snapshot" in proc.stderr
    assert _tree(zlab.data_dir) == v2


def test_unrelated_replica_is_refused_then_overwritten_only_with_force(zlab):
    src_pool, dst_pool = zlab.pools
    _zfs("create", zlab.replica)
    (zlab.mount(dst_pool) / "docs" / "someone-elses.txt").write_text("not drtool's")
    proc = zlab.drtool("run", check=3)
    assert "shares no snapshot" in proc.stdout and "--force" in proc.stdout
    assert (zlab.mount(dst_pool) / "docs" / "someone-elses.txt").exists()  # nothing destroyed
    time.sleep(1.1)
    doc = zlab.json("run", "--leg", "replicate-backup", "--force", check=None)
    result = doc["results"][0]
    if result["phase"] != "succeeded":  # zfs refuses -F onto a dataset with snapshots: the message must say so
        pytest.fail(f"--force did not overwrite the unrelated replica: {result['message']}")
    clone = f"{dst_pool}/force-check"
    _zfs("clone", zlab.snaps(zlab.replica)[-1], clone)
    try:
        assert _tree(zlab.mount(dst_pool) / "force-check") == _tree(zlab.data_dir)
    finally:
        subprocess.run(["zfs", "destroy", clone], capture_output=True)


def test_missing_source_dataset_is_a_failed_run(zlab):
    zlab.config.write_text(zlab.config.read_text().replace(f"dataset: {zlab.source}}}", f"dataset: {zlab.source}-gone}}"))
    doc = zlab.json("run", check=1)
    assert [r["phase"] for r in doc["results"]] == ["failed", "failed"]
    assert all("does not exist" in r["message"] for r in doc["results"]), doc
