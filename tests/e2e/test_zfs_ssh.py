"""End-to-end on real ZFS (zfs-fuse) reached over ssh: both locations are "remote".

Both zfs locations declare ``ssh: root@127.0.0.1`` and the ``ssh_options`` of a
throwaway sshd on loopback (tests/services/sshd.py). The zfs-fuse daemon is local,
so every zfs/zpool command takes drtool's real remote path: ``ssh -o BatchMode=yes
-p PORT -i KEY … root@127.0.0.1 -- env LC_ALL=C TZ=UTC zfs …``, with each remote
word shell-quoted, and ``zfs send`` piped into ``zfs receive`` between two ssh
processes.

run (snapshot + full replicate) → modify → run (incremental) → the replica's newest
snapshot, read through a local clone, equals the source → every command in the
run records went through ssh → verify and prune over ssh → a diverged replica and
an unreachable host are clear errors.
"""
from __future__ import annotations

import json
import subprocess
import time

import pytest

from helpers import ZfsLab, tree_digest, zfs_cmd

_zfs, _tree = zfs_cmd, tree_digest


@pytest.fixture
def rlab(zfs, sshd, tmp_path):
    lab = ZfsLab(zfs, tmp_path, remote=f"ssh: {sshd.ssh}, ssh_options: {json.dumps(sshd.ssh_options)}",
                 file_name="file {i}.txt", backup_site="offsite", snapshot_keep_last=1, name="zfs-ssh.yaml")
    lab.server = sshd
    return lab


def _run(lab, *extra: str) -> tuple[dict, str]:
    """``drtool -v run --no-verify --json``: (the JSON document, the stderr log)."""
    proc = lab.drtool("-v", "run", "--no-verify", "--json", *extra)
    doc = json.loads(proc.stdout)
    assert [r["phase"] for r in doc["results"]] == ["succeeded", "succeeded"], doc
    time.sleep(1.1)  # snapshot names have one-second resolution
    return doc, proc.stderr


def _remote_prefix(lab) -> list[str]:
    return ["ssh", "-o", "BatchMode=yes", *lab.server.ssh_options, lab.server.ssh, "--", "env", "LC_ALL=C", "TZ=UTC"]


def test_snapshot_replicate_incremental_over_ssh(rlab):
    first, log = _run(rlab)
    assert "full" in first["results"][1]["message"], first
    # -v logs every command: zfs ran through ssh, send and receive included
    sends = [ln for ln in log.splitlines() if "zfs send" in ln]
    assert sends and all("ssh -o BatchMode=yes" in ln and rlab.server.ssh in ln for ln in sends), log
    assert any("ssh -o BatchMode=yes" in ln and "zfs receive" in ln for ln in log.splitlines()), log

    for i in range(5):
        (rlab.data_dir / f"file {i}.txt").write_text(f"version 2 of file {i}\n" * 100)
    (rlab.data_dir / "new.bin").write_bytes(bytes(range(256)) * 400)
    second, _ = _run(rlab)
    assert "incremental from" in second["results"][1]["message"], second
    assert second["results"][1]["bytes_processed"] > 100_000

    # the run records: every command of both legs ran through ssh with the location's options
    runs = rlab.json("runs")["runs"]
    prefix = _remote_prefix(rlab)
    argvs = [c["argv"] for r in runs for c in r["command_log"]]
    assert len(argvs) >= 10
    assert all(a[:len(prefix)] == prefix for a in argvs), [a for a in argvs if a[:len(prefix)] != prefix]
    remote = [a[len(prefix):] for a in argvs]
    assert any(a[:2] == ["zfs", "send"] and "-I" in a for a in remote), remote
    assert any(a[:2] == ["zfs", "receive"] and a[-1] == rlab.replica for a in remote), remote
    assert any(a[:2] == ["zfs", "snapshot"] for a in remote), remote

    # the replica's newest snapshot holds exactly the source's data: read it via a local clone
    assert len(rlab.snaps(rlab.replica)) == 2
    newest = rlab.snaps(rlab.replica)[-1]
    clone = f"{rlab.pools[1]}/restore-check"
    _zfs("clone", newest, clone)
    try:
        assert _tree(rlab.mount(rlab.pools[1]) / "restore-check") == _tree(rlab.data_dir)
    finally:
        subprocess.run(["zfs", "destroy", clone], capture_output=True)

    # verify over ssh: zpool status parsed through ssh, guid compared across the two "hosts"
    ver = rlab.json("verify")
    assert len(ver["verifications"]) == 2 and all(v["ok"] for v in ver["verifications"]), ver
    assert any("matches the source" in v["message"] for v in ver["verifications"]), ver

    # prune over ssh: the snapshot leg keeps 1; the older source snapshot goes, the held base stays
    before = rlab.snaps(rlab.source)
    assert len(before) == 2
    rlab.json("prune")
    assert rlab.snaps(rlab.source) == before[1:]
    assert len(rlab.snaps(rlab.replica)) == 2  # keep_last 3 on the replica

    # the chain still works after prune
    (rlab.data_dir / "after-prune.txt").write_text("x")
    third, _ = _run(rlab)
    assert "incremental from" in third["results"][1]["message"], third


def test_over_ssh_divergence_and_unreachable_host_are_clear_errors(rlab):
    _run(rlab)
    # someone writes into the replica: zfs's error comes back through ssh and is recognised
    _zfs("set", "readonly=off", rlab.replica)
    (rlab.mount(rlab.pools[1]) / "docs" / "intruder.txt").write_text("changed on the replica")
    (rlab.data_dir / "more.txt").write_text("more")
    before = rlab.snaps(rlab.replica)
    proc = rlab.drtool("run", "--no-verify", "--json", check=3)
    doc = json.loads(proc.stdout)
    replicate = doc["results"][1]
    assert replicate["phase"] == "failed"
    assert "has been modified" in replicate["message"] and "Fix:" in replicate["message"], replicate
    assert rlab.snaps(rlab.replica) == before
    assert (rlab.mount(rlab.pools[1]) / "docs" / "intruder.txt").exists()

    # a host that does not answer: the error names ssh's reason, not a zfs one
    port = rlab.server.ssh_options[1]
    rlab.config.write_text(rlab.config.read_text().replace(f'"-p", "{port}"', '"-p", "1"'))
    proc = rlab.drtool("run", "--no-verify", "--json", check=None)
    assert proc.returncode != 0
    doc = json.loads(proc.stdout)
    assert doc["results"][0]["phase"] == "failed", doc
    assert "Connection refused" in doc["results"][0]["message"], doc
