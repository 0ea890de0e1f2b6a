"""A drill step restoring ZFS points on real ZFS (zfs-fuse): the snapshot is cloned
(and the replica received back) into scratch datasets beside the source, the checks
run in their mountpoints, and teardown destroys them, pass or fail."""
from __future__ import annotations

import json
import subprocess

import pytest

from helpers import DRTOOL, ZfsLab, zfs_cmd

pytestmark = pytest.mark.timeout(300)


def test_zfs_clone_and_receive_back_in_a_drill_leave_no_dataset(zfs, tmp_path):
    lab = ZfsLab(zfs, tmp_path)
    lab.json("run", "--no-verify")
    drill = tmp_path / "zfs-drill.yaml"
    drill.write_text("""\
version: 1
name: zfs-docs
targets: {rto: 10m, rpo: 1h}
steps:
  - name: clone
    restore: {policy: docs, leg: snapshot}
    checks:
      - command: {argv: [sh, -c, "grep -q 'version 1 of file 3' file3.txt"]}
  - name: replica
    restore: {policy: docs, leg: replicate-backup}
    checks:
      - command: {argv: [sh, -c, "test $(ls | wc -l) -eq 5"]}
      - command: {argv: ["false"]}
        name: must-fail
""")
    p = subprocess.run([DRTOOL, "-c", str(lab.config), "drill", "run", str(drill), "--json"], capture_output=True, text=True, timeout=240)
    out = json.loads(p.stdout)
    assert p.returncode == 1 and out["verdict"] == "fail", out
    steps = {s["name"]: s for s in out["steps"]}
    assert steps["clone"]["status"] == "passed", steps["clone"]
    replica = steps["replica"]
    assert replica["status"] == "failed" and replica["checks"][0]["ok"] and not replica["checks"][1]["ok"], replica
    left = zfs_cmd("list", "-H", "-o", "name", "-r", lab.pools[0])
    assert "drtool-drill-" not in left, left
    assert out["teardown"]["ok"], out["teardown"]
