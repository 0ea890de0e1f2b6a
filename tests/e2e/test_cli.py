"""End-to-end: the drtool CLI against real restic repositories in temp dirs.

Covers the foundation's "Done means": compliant status after run+verify, a
corrupted pack failing integrity verification, a missing source failing the
run, a SIGKILLed run not blocking the next one, and the password never showing
in ps, logs, --json output or the catalog.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import require
from helpers import PASSWORD, make_tree, write_policy

DRTOOL = str(Path(sys.executable).parent / "drtool")


@pytest.fixture
def lab(tmp_path):
    require("restic")
    src = make_tree(tmp_path / "src", files=30)
    policy = write_policy(tmp_path / "policy.yaml", src, tmp_path / "repo-a", tmp_path / "repo-b", password_file=tmp_path / "pw")

    class Lab:
        root = tmp_path
        source = src
        config = policy
        repo_a = tmp_path / "repo-a"
        repo_b = tmp_path / "repo-b"

        def drtool(self, *args: str, check: int | None = 0, config: Path | None = None) -> subprocess.CompletedProcess:
            proc = subprocess.run([DRTOOL, "-c", str(config or self.config), *args], capture_output=True, text=True, timeout=600)
            if check is not None:
                assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            return proc

        def json(self, *args: str, check: int | None = 0) -> dict:
            return json.loads(self.drtool(*args, "--json", check=check).stdout)

    return Lab()


def test_run_verify_status_is_compliant(lab):
    doc = lab.json("run")
    assert [r["phase"] for r in doc["results"]] == ["succeeded", "succeeded"]
    assert {v["level"] for v in doc["verifications"]} == {"sample", "integrity"} and all(v["ok"] for v in doc["verifications"])
    status = lab.json("status")
    assert status["compliant"] is True
    rules = {r["rule"]: r["ok"] for r in status["policies"][0]["rules"]}
    assert rules == {"3 copies": True, "2 media": True, "1 offsite": True, "1 immutable or offline": True, "0 errors": True}
    inv = lab.json("inventory")
    assert len(inv["locations"]["repo-a"]["points"]) == 1 and inv["locations"]["repo-a"]["points"][0]["policy"] == "docs"
    # a second run is not blocked and adds a point; verification is not due again
    doc = lab.json("run")
    assert doc["verifications"] == []
    assert len(lab.json("inventory", "--location", "repo-b")["locations"]["repo-b"]["points"]) == 2


def test_status_is_noncompliant_before_any_backup(lab):
    proc = lab.drtool("status", check=4)
    assert "NOT compliant" in proc.stdout
    assert f"its inventory could not be read: restic repository {lab.repo_a} (location repo-a) does not exist" in proc.stdout


def test_missing_source_is_a_failed_run_and_makes_no_snapshot(lab):
    cfg = lab.config.read_text().replace(str(lab.source), str(lab.root / "not-there"))
    bad = lab.root / "bad.yaml"
    bad.write_text(cfg)
    proc = lab.drtool("run", check=1, config=bad)
    assert "does not exist" in proc.stdout
    runs = lab.json("runs", "--policy", "docs")["runs"]
    assert runs and all(r["phase"] == "failed" for r in runs)
    assert not (lab.repo_a / "snapshots").exists() or not any((lab.repo_a / "snapshots").iterdir())


def test_empty_source_is_a_failed_run(lab):
    empty = lab.root / "empty"
    empty.mkdir()
    bad = lab.root / "bad.yaml"
    bad.write_text(lab.config.read_text().replace(str(lab.source), str(empty)))
    proc = lab.drtool("run", check=1, config=bad)
    assert "contains no files" in proc.stdout


def test_corrupted_pack_fails_integrity_verify_and_status(lab):
    lab.drtool("run")
    packs = [p for p in (lab.repo_b / "data").rglob("*") if p.is_file()]
    pack = max(packs, key=lambda p: p.stat().st_size)
    data = bytearray(pack.read_bytes())
    for i in range(100, len(data), 997):
        data[i] ^= 0x5A
    pack.write_bytes(bytes(data))
    proc = lab.drtool("verify", "--leg", "backup-repo-b", "--level", "integrity", check=1)
    assert "restic check found errors in repo-b" in proc.stdout
    assert pack.name[:8] in proc.stdout, proc.stdout  # names the damaged pack
    status = lab.json("status", check=4)
    zero = next(r for r in status["policies"][0]["rules"] if r["rule"] == "0 errors")
    assert zero["ok"] is False and "the latest verification failed" in zero["detail"]


def test_sample_verify_detects_a_changed_file_in_the_repository(lab):
    """Sample verification compares restored bytes with hashes taken at backup time."""
    lab.drtool("run", "--leg", "backup-repo-a", "--no-verify")
    doc = lab.json("verify", "--leg", "backup-repo-a", "--level", "sample")
    assert doc["verifications"][0]["ok"] is True
    check = next(c for c in doc["verifications"][0]["checks"] if c["level"] == "sample")
    assert check["files"] == 8


def _wait_for_running_run(timeout: float = 30) -> None:
    """The run is recorded while restic already works (the catalog opens meanwhile)."""
    from drtool.catalog import Catalog

    cat = Catalog.open()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.phase == "running" for r in cat.runs(limit=5)):
            return
        time.sleep(0.05)
    raise AssertionError("no running run was recorded")


def test_sigkill_mid_backup_does_not_block_the_next_run(lab):
    big = lab.source / "big.bin"
    big.write_bytes(os.urandom(200 * 1024 * 1024))
    proc = subprocess.Popen([DRTOOL, "-c", str(lab.config), "run", "--leg", "backup-repo-a", "--no-verify"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    locks = lab.repo_a / "locks"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (locks.is_dir() and any(locks.iterdir())):
        time.sleep(0.02)
    _wait_for_running_run()
    assert proc.poll() is None, "the backup finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(locks.iterdir()), "no restic lock was left behind: the scenario was not exercised"
    nxt = lab.drtool("run", "--leg", "backup-repo-a", "--no-verify")
    assert "succeeded" in nxt.stdout
    assert "stale restic lock" in nxt.stderr
    runs = lab.json("runs", "--policy", "docs")["runs"]
    killed = [r for r in runs if r["errors"] and "interrupted" in r["errors"][0]]
    assert len(killed) == 1 and killed[0]["phase"] == "failed"


def test_password_never_in_ps_logs_json_or_catalog(lab):
    (lab.source / "big.bin").write_bytes(os.urandom(40 * 1024 * 1024))  # restic runs long enough for ps to see it
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            out = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout  # -ww: never truncate
            seen.append(out)
            time.sleep(0.01)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        proc = lab.drtool("-v", "run", "--json")
        inv = lab.drtool("-v", "inventory", "--json")
        ver = lab.drtool("-v", "verify", "--json", "--level", "sample")
    finally:
        stop.set()
        t.join()
    assert any("restic --repo" in ln and " backup " in ln for s in seen for ln in s.splitlines()), "ps never saw restic backup: the watch proved nothing"
    assert not any(PASSWORD in s for s in seen)
    for p in (proc, inv, ver):
        assert PASSWORD not in p.stdout and PASSWORD not in p.stderr
    assert "restic --repo" in proc.stderr  # -v logs the (masked) commands
    state = Path(os.environ["DRTOOL_STATE_DIR"])
    for f in state.rglob("*"):
        if f.is_file():
            assert PASSWORD.encode() not in f.read_bytes(), f


def test_prune_plans_then_removes_only_drtool_points(lab):
    for i in range(3):
        (lab.source / f"new{i}").write_text(str(i))
        lab.drtool("run", "--leg", "backup-repo-a", "--no-verify")
    # a snapshot drtool did not make must never be touched
    env = dict(os.environ, RESTIC_PASSWORD=PASSWORD)
    subprocess.run(["restic", "--repo", str(lab.repo_a), "backup", "-q", str(lab.source)], env=env, check=True, capture_output=True)
    plan = lab.json("prune", "--leg", "backup-repo-a", "--dry-run")
    decisions = plan["prunes"][0]["plan"]["decisions"]
    assert len(decisions) == 3  # only drtool's own points are candidates
    assert [d["keep"] for d in decisions] == [True, True, False]  # keep_last: 2
    before = subprocess.run(["restic", "--repo", str(lab.repo_a), "snapshots", "--json"], env=env, capture_output=True, text=True, check=True)
    assert len(json.loads(before.stdout)) == 4  # dry run deleted nothing
    doc = lab.json("prune", "--leg", "backup-repo-a")
    assert len(doc["prunes"][0]["removed"]) == 1
    after = json.loads(subprocess.run(["restic", "--repo", str(lab.repo_a), "snapshots", "--json"], env=env, capture_output=True, text=True, check=True).stdout)
    assert len(after) == 3
    assert any("drtool" not in (s.get("tags") or []) for s in after)  # the foreign snapshot survived


def test_prune_never_removes_the_last_verified_point(lab):
    lab.drtool("run", "--leg", "backup-repo-a")  # backup + sample verification of the first point
    for i in range(3):
        (lab.source / f"n{i}").write_text(str(i))
        lab.drtool("run", "--leg", "backup-repo-a", "--no-verify")
    cfg = lab.config.read_text().replace("retention: {keep_last: 2}", "retention: {keep_last: 1}")
    one = lab.root / "keep1.yaml"
    one.write_text(cfg)
    plan = json.loads(lab.drtool("prune", "--leg", "backup-repo-a", "--dry-run", "--json", config=one).stdout)
    decisions = plan["prunes"][0]["plan"]["decisions"]
    kept = [d for d in decisions if d["keep"]]
    assert len(kept) == 2 and any("last verified point" in " ".join(d["reasons"]) for d in kept)
    assert decisions[-1]["keep"] is True  # the oldest point is the verified one


def test_lock_held_is_exit_75(lab):
    from drtool.locks import leg_lock

    lab.drtool("run", "--leg", "backup-repo-a", "--no-verify")
    with leg_lock(os.environ["DRTOOL_STATE_DIR"], "docs", "backup-repo-a"):
        proc = lab.drtool("run", "--leg", "backup-repo-a", check=75)
        prune = lab.drtool("prune", "--leg", "backup-repo-a", check=75)
    assert "already running" in proc.stdout and "skipped" in prune.stdout
    runs = lab.json("runs", "--policy", "docs")["runs"]
    assert runs[0]["phase"] == "skipped"


def test_partial_exit_code_when_one_leg_fails(lab):
    cfg = lab.config.read_text().replace(f"repository: {lab.repo_b}", f"repository: {lab.root / 'no-such'}").replace("init: true\n    media: hdd", "init: false\n    media: hdd")
    bad = lab.root / "partial.yaml"
    bad.write_text(cfg)
    proc = lab.drtool("run", "--no-verify", check=3, config=bad)
    assert "does not exist" in proc.stdout and "succeeded" in proc.stdout


def test_policy_commands(lab, tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("version: 1\npolicies:\n  - name: x\n    rpo: soon\n")
    proc = lab.drtool("policy", "validate", str(bad), check=2)
    assert f"{bad}:3: policies[0]" in proc.stderr and f"{bad}:4: policies[0].rpo" in proc.stderr
    schema = json.loads(lab.drtool("policy", "schema").stdout)
    assert schema["title"] == "drtool policy file"
    sample = lab.drtool("policy", "sample").stdout
    f = tmp_path / "sample.yaml"
    f.write_text(sample)
    lab.drtool("policy", "validate", str(f))
    explain = lab.json("policy", "explain", "--policy", "docs")
    assert explain["policies"][0]["compliant"] is None  # 0 errors is only known live
    assert lab.drtool("policy", "explain", "--policy", "nope", check=2).stderr.startswith("drtool: no policy named 'nope'")


def test_dry_run_changes_nothing(lab):
    proc = lab.drtool("run", "--dry-run")
    assert "would back up" in proc.stdout
    assert not lab.repo_a.exists() and not lab.repo_b.exists()


def test_sigterm_mid_backup_stops_restic_and_records_the_interruption(lab):
    (lab.source / "big.bin").write_bytes(os.urandom(200 * 1024 * 1024))
    proc = subprocess.Popen([DRTOOL, "-c", str(lab.config), "run", "--leg", "backup-repo-a", "--no-verify"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    locks = lab.repo_a / "locks"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (locks.is_dir() and any(locks.iterdir())):
        time.sleep(0.02)
    _wait_for_running_run()
    assert proc.poll() is None, "the backup finished before it could be interrupted"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 15
    assert proc.returncode == 130 and "interrupted" in err
    ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    assert str(lab.repo_a) not in ps, "restic outlived the interrupted drtool"
    runs = lab.json("runs", "--policy", "docs")["runs"]
    assert runs[0]["phase"] == "failed" and "interrupted by a signal" in runs[0]["errors"][0]
    assert lab.json("run", "--leg", "backup-repo-a", "--no-verify")["results"][0]["phase"] == "succeeded"


def _digest(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_restore_latest_and_by_id_with_proof(lab):
    first = lab.json("run", "--leg", "backup-repo-a", "--no-verify")["results"][0]["point"]
    original = _digest(lab.source)
    (lab.source / "d0" / "f0.bin").write_bytes(b"changed after the first backup")
    lab.drtool("run", "--leg", "backup-repo-a", "--no-verify")

    plan = lab.json("restore", "--policy", "docs", "--leg", "backup-repo-a", "--point", first[:10], "--target", str(lab.root / "r1"), "--dry-run")
    assert plan["point"] == first and not (lab.root / "r1").exists()
    doc = lab.json("restore", "--policy", "docs", "--leg", "backup-repo-a", "--point", first[:10], "--target", str(lab.root / "r1"))
    assert doc["ok"] and doc["detail"]["checked"] == 8 and doc["detail"]["mismatches"] == []
    assert _digest(lab.root / "r1" / str(lab.source).lstrip("/")) == original

    # a non-empty target is refused without --force; one leg must be chosen
    proc = lab.drtool("restore", "--policy", "docs", "--leg", "backup-repo-a", "--target", str(lab.root / "r1"), check=2)
    assert "is not empty" in proc.stderr
    proc = lab.drtool("restore", "--policy", "docs", "--target", str(lab.root / "r2"), check=2)
    assert "choose the leg to restore from with --leg" in proc.stderr

    one = str(lab.source / "d0" / "f0.bin")
    doc = lab.json("restore", "--policy", "docs", "--leg", "backup-repo-a", "--target", str(lab.root / "r3"), "--include", one)
    restored = [p for p in (lab.root / "r3").rglob("*") if p.is_file()]
    assert [p.read_bytes() for p in restored] == [b"changed after the first backup"]
    runs = lab.json("runs", "--policy", "docs")["runs"]
    assert [r["kind"] for r in runs[:2]] == ["restore", "restore"] and all(r["phase"] == "succeeded" for r in runs[:2])


def test_restore_picks_points_from_the_catalog_and_the_repository_without_listing(lab):
    """A local repository's points come from the catalog's records, kept only while the
    snapshot file (named by the full id) is in the repository: no `restic snapshots`
    (each restic process pays the key derivation). A point forgotten behind drtool's back
    is never picked; a catalog that knows nothing falls back to restic's listing."""
    first = lab.json("run", "--leg", "backup-repo-a", "--no-verify")["results"][0]["point"]
    time.sleep(1.1)
    second = lab.json("run", "--leg", "backup-repo-a", "--no-verify")["results"][0]["point"]
    doc = lab.json("restore", "--policy", "docs", "--leg", "backup-repo-a", "--target", str(lab.root / "r1"))
    # "latest": restic picks it as it restores (one process); its full id, time and manifest are found after
    assert doc["point"] == second and doc["ok"] and doc["detail"]["checked"] > 0, doc
    assert doc["point_time"] == lab.json("runs", "--policy", "docs", "--limit", "3")["runs"][1]["detail"]["point_time"], doc
    restore_run = lab.json("runs", "--policy", "docs", "--limit", "1")["runs"][0]
    verbs = [c["argv"][3:5] for c in restore_run["command_log"]]
    assert verbs == [["restore", "latest"]] and restore_run["recovery_point"] == second, restore_run["command_log"]

    env = {**os.environ, "RESTIC_PASSWORD": PASSWORD}
    subprocess.run(["restic", "-r", str(lab.repo_a), "forget", second], env=env, check=True, capture_output=True)
    plan = lab.json("restore", "--policy", "docs", "--leg", "backup-repo-a", "--target", str(lab.root / "r2"), "--dry-run")
    assert plan["point"] == first, plan
    done = lab.json("restore", "--policy", "docs", "--leg", "backup-repo-a", "--target", str(lab.root / "r2"))
    assert done["point"] == first and done["ok"] and done["detail"]["checked"] > 0, done

    fresh = {**os.environ, "DRTOOL_STATE_DIR": str(lab.root / "other-state")}  # a catalog with no record of them
    p = subprocess.run([DRTOOL, "-c", str(lab.config), "restore", "--policy", "docs", "--leg", "backup-repo-a", "--target",
                        str(lab.root / "r3"), "--dry-run", "--json"], capture_output=True, text=True, env=fresh, timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout)["point"] == first, p.stdout + p.stderr

    # that catalog now records one newer point: an older id it never recorded is still found (restic's listing)
    time.sleep(1.1)
    p = subprocess.run([DRTOOL, "-c", str(lab.config), "run", "--leg", "backup-repo-a", "--no-verify", "--json"],
                       capture_output=True, text=True, env=fresh, timeout=120)
    third = json.loads(p.stdout)["results"][0]["point"]
    for selector, want in (("latest", third), (first[:10], first)):
        p = subprocess.run([DRTOOL, "-c", str(lab.config), "restore", "--policy", "docs", "--leg", "backup-repo-a", "--point", selector,
                            "--target", str(lab.root / "r4"), "--dry-run", "--json"], capture_output=True, text=True, env=fresh, timeout=120)
        assert p.returncode == 0 and json.loads(p.stdout)["point"] == want, (selector, p.stdout + p.stderr)


def test_progress_on_a_terminal(lab):
    """On a TTY drtool draws rich progress; the code path must work, not only the --json one."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([DRTOOL, "-c", str(lab.config), "run", "--leg", "backup-repo-a"], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "succeeded" in text and "backup → repo-a" in text and "internal error" not in text
