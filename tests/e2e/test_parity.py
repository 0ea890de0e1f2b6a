"""parity legs end to end: the drtool CLI against a real SnapRAID array with a real
mergerfs pool (tmpfs data disks, one tmpfs parity disk; tests/services/snapraid_array.py).
Nothing is mocked; --test-skip-device is never used (each disk is its own tmpfs)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import DRTOOL

pytestmark = pytest.mark.timeout(300)


def _policy(array, tmp_path: Path, *, max_removed: int = 3, extra: str = "") -> Path:
    path = tmp_path / "parity.yaml"
    path.write_text(f"""\
version: 1
locations:
  array:
    type: snapraid
    media: hdd
    site: home
    failure_domain: nas01
    config: {array.conf}
    pool: {array.pool}
policies:
  - name: media
    source: {{location: array, path: {array.pool}/media}}
    rpo: 1d
    rto: 4h
    legs:
      - kind: parity
        schedule: "0 4 * * *"
        verify: {{level: integrity, every: 1d}}
        parity:
          max_removed: {max_removed}
          max_removed_percent: 50
          max_updated: 10
          max_updated_percent: 50
          scrub_percent: 100
          scrub_older_than_days: 0
{extra}""")
    return path


def _drtool(config: Path, *args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([DRTOOL, "-c", str(config), *args], capture_output=True, text=True, timeout=240)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _json(config: Path, *args: str, check: int | None = 0) -> dict:
    return json.loads(_drtool(config, *args, "--json", check=check).stdout)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _fill(array, n: int = 24) -> dict[str, Path]:
    files = {}
    for i in range(n):
        files[f"media/dir{i % 3}/file{i:02d}.bin"] = array.write(f"media/dir{i % 3}/file{i:02d}.bin", os.urandom(20_000 + 3_000 * i))
    return files


def _last_run(config: Path, kind: str = "leg") -> dict:
    return next(r for r in _json(config, "runs")["runs"] if r["kind"] == kind)


def test_silent_corruption_is_found_by_scrub_and_repaired(snapraid_array, tmp_path):
    array = snapraid_array
    files = _fill(array)
    config = _policy(array, tmp_path)
    doc = _json(config, "run")
    assert doc["results"][0]["phase"] == "succeeded", doc
    assert "synced 24 added" in doc["results"][0]["message"]
    assert doc["verifications"][0]["ok"], doc["verifications"]

    victim = files["media/dir1/file04.bin"]
    good = _sha(victim)
    real = array.corrupt_silently(victim)
    assert _sha(victim) != good
    assert array.snapraid("diff", check=False).returncode == 0  # same size and mtime: invisible to diff

    # the next run scrubs, finds it: the point is made, the run is partial, verify fails
    doc = _json(config, "run", check=3)
    result = doc["results"][0]
    assert result["phase"] == "partially_failed" and "scrub found errors" in _last_run(config)["errors"][0]
    doc = _json(config, "verify", check=1)
    assert "bad blocks" in doc["verifications"][0]["message"]

    plan = _json(config, "restore", "--policy", "media", "--dry-run")
    assert plan["ok"] and "would fix 1 bad blocks" in plan["message"] and _sha(victim) != good  # nothing changed yet
    doc = _json(config, "restore", "--policy", "media")
    assert doc["ok"], doc
    assert _sha(real) == good
    doc = _json(config, "verify")
    assert doc["verifications"][0]["ok"], doc


def test_mass_deletion_aborts_the_sync_and_parity_brings_the_files_back(snapraid_array, tmp_path):
    array = snapraid_array
    files = _fill(array)
    config = _policy(array, tmp_path)
    on_d2 = {rel: p for rel, p in files.items() if str(array.branch_of(p)).startswith(str(array.disks["d2"]) + "/")}
    assert len(on_d2) >= 4, "mergerfs spread the files unevenly; the test needs ≥4 on d2"
    first = sorted(on_d2)[0]
    os.chmod(on_d2[first], 0o640)
    os.chown(on_d2[first], 1234, 2345)
    _drtool(config, "run")
    digests = {rel: _sha(p) for rel, p in on_d2.items()}

    for p in on_d2.values():  # "ransomware" deletes one disk's worth of files
        p.unlink()
    proc = _drtool(config, "run", check=1)
    assert "sync refused" in proc.stdout and f"{len(on_d2)} files removed (limit 3)" in proc.stdout and "--force-sync" in proc.stdout
    run = _last_run(config)
    assert run["phase"] == "failed"
    assert sorted(run["detail"]["files"]["removed"]) == sorted(f"d2:{rel}" for rel in on_d2)
    events = _json(config, "events")["events"]
    assert events[-1]["event"] == "parity.sync_refused" and events[-1]["counted"]["removed"] == len(on_d2)

    # parity is intact: every deleted file comes back, mode and owner too
    plan = _json(config, "restore", "--policy", "media", "--include", str(on_d2[first]), "--dry-run")
    assert "would fix 1 file(s)" in plan["message"] and not on_d2[first].exists()
    args = [a for p in on_d2.values() for a in ("--include", str(p))]
    doc = _json(config, "restore", "--policy", "media", *args)
    assert doc["ok"] and "checked: the fixed data matches the parity" in doc["message"], doc
    assert {rel: _sha(p) for rel, p in on_d2.items()} == digests
    st = os.stat(on_d2[first])
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 1234, 2345)

    # a reviewed mass deletion goes through with --force-sync, and says so
    for p in on_d2.values():
        p.unlink()
    doc = _json(config, "run", "--force-sync")
    result = doc["results"][0]
    assert result["phase"] == "succeeded" and "--force-sync" in result["warnings"][0]
    assert array.snapraid("diff", check=False).returncode == 0  # parity now matches the smaller array


def test_threshold_ignore_lets_expected_churn_through(snapraid_array, tmp_path):
    array = snapraid_array
    for i in range(8):
        array.write(f"rolling/day{i}.tar", os.urandom(5_000))
    array.write("media/keep.bin", os.urandom(5_000))
    config = _policy(array, tmp_path, max_removed=2, extra="          threshold_ignore: ['rolling/*']\n")
    _drtool(config, "run")
    for i in range(6):
        (array.pool / f"rolling/day{i}.tar").unlink()
    doc = _json(config, "run")
    assert doc["results"][0]["phase"] == "succeeded" and "6 removed" in doc["results"][0]["message"]


def test_a_missing_disk_fails_verify_and_refuses_the_sync_then_the_disk_is_rebuilt(snapraid_array, tmp_path):
    array = snapraid_array
    files = _fill(array)
    config = _policy(array, tmp_path)
    _drtool(config, "run")
    on_d3 = {rel: _sha(p) for rel, p in files.items() if str(array.branch_of(p)).startswith(str(array.disks["d3"]) + "/")}

    array.unmount_disk("d3")  # the mount point stays, empty; mergerfs serves the rest silently
    doc = _json(config, "verify", check=1)
    msg = doc["verifications"][0]["message"]
    assert "disk d3" in msg and "not mounted" in msg
    proc = _drtool(config, "run", check=1)
    assert "the array is not whole" in proc.stdout and "Sync refused" in proc.stdout

    # a replacement disk: a fresh empty filesystem at the same mount point, rebuilt from parity
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(array.disks["d3"])], check=True)
    plan = _json(config, "restore", "--policy", "media", "--target", "d3", "--dry-run")
    assert f"would fix {len(on_d3)} file(s) in disk d3" in plan["message"], plan
    doc = _json(config, "restore", "--policy", "media", "--target", "d3")
    assert doc["ok"], doc
    assert {rel: _sha(array.pool / rel) for rel in on_d3} == on_d3
    assert _json(config, "verify")["verifications"][0]["ok"]


def test_explain_and_status_treat_parity_as_protection(snapraid_array, tmp_path):
    array = snapraid_array
    _fill(array, 6)
    config = _policy(array, tmp_path)
    _drtool(config, "run")
    proc = _drtool(config, "policy", "explain", check=None)
    assert "SnapRAID parity is protection, not a copy" in proc.stdout
    inv = _json(config, "inventory")
    points = inv["locations"]["array"]["points"]
    assert len(points) == 1 and points[0]["id"].startswith("parity-") and points[0]["meta"]["disks"] == ["d1", "d2", "d3"]

    # status: the array's parity as the protection of the source, with the disks holding it
    doc = _json(config, "status", check=4)  # one copy only: not 3-2-1 compliant, and says so
    production = doc["policies"][0]["copies"][0]
    prot = production["protection"][0]
    assert production["leg"] is None and prot["leg"] == "parity" and prot["ok"] and not prot["problems"]
    assert prot["source_disks"][f"{array.pool}/media"] and set(prot["source_disks"][f"{array.pool}/media"]) <= {"d1", "d2", "d3"}
    array.unmount_disk("d1")
    prot = _json(config, "status", check=4)["policies"][0]["copies"][0]["protection"][0]
    assert not prot["ok"] and "disk d1" in prot["problems"][0]
    assert "protected by parity" in _drtool(config, "status", check=4).stdout
