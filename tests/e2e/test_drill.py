"""Drills end to end with the local scratch: real etcd, a real OpenBao, real restic and
a real GCS emulator (fake-gcs-server). The lab is backed up once per module; each test
runs a drill against it. Drills that must fail do fail, with the right reason, and
every drill, pass or fail, leaves no process and no scratch directory behind."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from helpers import DRTOOL, make_tree

pytestmark = pytest.mark.timeout(300)


def _drtool(env: dict, config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DRTOOL, "-c", str(config), *args], capture_output=True, text=True, timeout=240, env=env)


@pytest.fixture(scope="module")
def lab(tmp_path_factory, openbao, etcd_server, fake_gcs):
    """One backed-up lab: etcd and Vault uploaded to GCS, a directory in restic."""
    root = tmp_path_factory.mktemp("lab")
    state = root / "state"
    env = {**os.environ, "DRTOOL_STATE_DIR": str(state)}
    canary = f"drtool-{uuid.uuid4().hex[:8]}/canary"
    openbao.client().secrets.kv.v2.create_or_update_secret(path=canary, secret={"value": f"canary-{uuid.uuid4().hex}"}, mount_point="secret")
    tag = uuid.uuid4().hex[:6]
    etcd_server.fill({f"pods{tag}": 30, f"services{tag}": 10})
    data = make_tree(root / "data", files=20)
    sec = root / "secrets"
    sec.mkdir()
    (sec / "token").write_text(openbao.root_token + "\n")
    for i, k in enumerate(openbao.unseal_keys[:2], 1):
        (sec / f"unseal-{i}").write_text(k + "\n")
    (sec / "restic").write_text("drill-restic-pass\n")
    bucket = fake_gcs.make_bucket("drill")
    cfg = root / "lab.yaml"
    cfg.write_text(f"""\
version: 1
locations:
  nas: {{type: filesystem, media: hdd, site: home, failure_domain: nas}}
  vault-main:
    type: vault
    address: {openbao.address}
    token: {{file: {sec}/token}}
    unseal_keys: [{{file: {sec}/unseal-1}}, {{file: {sec}/unseal-2}}]
    media: ssd
    site: home
    failure_domain: vault
  talos-lab:
    type: talos
    etcd: {{endpoints: ["{etcd_server.endpoint}"]}}
    media: nvme
    site: home
    failure_domain: k8s
  repo:
    type: restic
    repository: {root}/repo
    password: {{file: {sec}/restic}}
    init: true
    media: hdd
    site: home
    failure_domain: usb
  offsite:
    type: gcs
    bucket: {bucket}
    prefix: lab
    endpoint: {fake_gcs.endpoint}
    media: cloud-object
    site: gcp
    failure_domain: gcp
policies:
  - name: vault
    source: {{location: vault-main, canaries: ["secret/{canary}#value"]}}
    rpo: 1d
    rto: 1h
    legs: [{{kind: upload, to: offsite, schedule: "0 3 * * *"}}]
  - name: etcd
    source: {{location: talos-lab}}
    rpo: 1d
    rto: 1h
    legs: [{{kind: upload, to: offsite, schedule: "0 3 * * *"}}]
  - name: app
    source: {{location: nas, path: {data}}}
    rpo: 1d
    rto: 1h
    legs: [{{kind: backup, to: repo, schedule: "0 3 * * *", verify: {{manifest: full}}}}]
""")
    p = _drtool(env, cfg, "run", "--no-verify", "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    return {"root": root, "env": env, "cfg": cfg, "state": state, "bucket": bucket, "canary": canary, "openbao": openbao}


def _drill(lab, name: str, body: str) -> Path:
    f = lab["root"] / f"{name}-{uuid.uuid4().hex[:6]}.yaml"
    f.write_text(f"version: 1\nname: {name}\n{body}")
    return f


def _run(lab, drill: Path, *extra: str) -> tuple[int, dict]:
    p = _drtool(lab["env"], lab["cfg"], "drill", "run", str(drill), "--json", *extra)
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else {"stderr": p.stderr})


def _assert_clean(lab) -> None:
    """No scratch dir left, and no process of ours still running from one."""
    scratch = lab["state"] / "drill-scratch"
    assert not scratch.exists() or not any(scratch.iterdir()), list(scratch.iterdir())
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        assert b"drill-scratch" not in cmd, f"left running: {cmd[:200]!r}"


FULL = """\
targets: {rto: 10m, rpo: 1h}
steps:
  - name: etcd
    restore: {policy: etcd, from: offsite, point: latest}
    checks: [{etcd: {sample: 5}}]
  - name: vault
    restore: {policy: vault, from: offsite}
    checks: [{vault: {}}]
  - name: app
    needs: [vault]
    restore: {policy: app, point: random}
    checks:
      - tree-compare: {mode: full}
      - command: {argv: [sh, -c, "test -n \\"$(ls -A)\\""]}
        name: restored-files-present
"""


def test_full_lab_drill_passes_with_evidence_and_leaves_nothing(lab):
    code, out = _run(lab, _drill(lab, "full-lab", FULL))
    assert code == 0, out
    assert out["verdict"] == "pass" and not out["reasons"], out
    steps = {s["name"]: s for s in out["steps"]}
    assert all(s["status"] == "passed" for s in steps.values()), steps
    assert "match the counts recorded at backup" in steps["etcd"]["checks"][0]["message"]
    assert "1/1 canaries read" in steps["vault"]["checks"][0]["message"]
    assert "20 files (full) match their backup-time BLAKE3" in steps["app"]["checks"][0]["message"]
    assert steps["app"]["start_s"] >= steps["vault"]["end_s"]  # needs: respected
    assert 0 < out["rto_s"] < 600 and 0 <= out["rpo_s"] < 3600
    html = Path(out["evidence"]["html"]).read_text()
    assert "PASS" in html and "<script" not in html
    assert json.loads(Path(out["evidence"]["json"]).read_text())["verdict"] == "pass"
    for value in (lab["openbao"].root_token, *lab["openbao"].unseal_keys):
        assert value not in html and value not in json.dumps(out)
    _assert_clean(lab)

    hist = _drtool(lab["env"], lab["cfg"], "drill", "history", "--json")
    rows = json.loads(hist.stdout)["drills"]
    assert rows[0]["uuid"] == out["run_uuid"] and rows[0]["verdict"] == "pass"
    show = _drtool(lab["env"], lab["cfg"], "drill", "show", out["run_uuid"][:8], "--json")
    assert json.loads(show.stdout)["verdict"] == "pass"


def test_a_wrong_canary_fails_the_drill(lab):
    body = FULL.replace("checks: [{vault: {}}]", 'checks: [{vault: {canaries: ["secret/drtool-missing/nothing#value"]}}]')
    code, out = _run(lab, _drill(lab, "wrong-canary", body))
    assert code == 1 and out["verdict"] == "fail", out
    vault = next(s for s in out["steps"] if s["name"] == "vault")
    assert vault["status"] == "failed" and "secret/drtool-missing/nothing#value" in vault["message"]
    app = next(s for s in out["steps"] if s["name"] == "app")
    assert app["status"] == "skipped" and "needs vault" in app["message"]
    _assert_clean(lab)


def test_the_rto_exceeded_fails_the_drill(lab):
    body = """\
targets: {rto: 1s, rpo: 1h}
steps:
  - name: slow
    restore: {policy: app}
    checks: [{command: {argv: [sleep, "1.5"]}}]
"""
    code, out = _run(lab, _drill(lab, "slow", body))
    assert code == 1 and out["verdict"] == "fail", out
    assert any(r.startswith("RTO exceeded") for r in out["reasons"]), out
    assert out["steps"][0]["status"] == "passed"  # everything worked; it was too slow
    _assert_clean(lab)


def test_an_optional_check_failing_is_partial(lab):
    body = """\
targets: {rto: 10m, rpo: 1h}
steps:
  - name: app
    restore: {policy: app}
    checks:
      - tree-compare: {mode: sample}
      - command: {argv: ["false"]}
        required: false
"""
    code, out = _run(lab, _drill(lab, "optional", body))
    assert code == 3 and out["verdict"] == "partial", out
    _assert_clean(lab)


def test_a_corrupted_snapshot_fails_the_drill(lab, fake_gcs):
    """Corrupted before upload (the manifest agrees with the bad bytes): only the etcd restore can tell."""
    c = fake_gcs.client()
    blobs = {b.name: b for b in c.list_blobs(lab["bucket"], prefix="lab/etcd/", retry=fake_gcs.retry)}
    (mkey,) = [k for k in blobs if k.endswith("/manifest.json")]
    manifest = json.loads(blobs[mkey].download_as_bytes(retry=fake_gcs.retry))
    good = blobs["lab/" + manifest["object"]].download_as_bytes(retry=fake_gcs.retry)
    bad = bytearray(good)
    mid = len(bad) // 2
    bad[mid:mid + 256] = bytes(b ^ 0x5A for b in bad[mid:mid + 256])
    bucket = c.bucket(lab["bucket"])
    original = blobs[mkey].download_as_bytes(retry=fake_gcs.retry)
    try:
        bucket.blob("lab/" + manifest["object"]).upload_from_string(bytes(bad), retry=fake_gcs.retry)
        bucket.blob(mkey).upload_from_string(json.dumps({**manifest, "sha256": hashlib.sha256(bad).hexdigest(), "md5": None,
                                                          "crc32c": None}).encode(), retry=fake_gcs.retry)
        code, out = _run(lab, _drill(lab, "corrupt", FULL))
    finally:
        bucket.blob("lab/" + manifest["object"]).upload_from_string(good, retry=fake_gcs.retry)
        bucket.blob(mkey).upload_from_string(original, retry=fake_gcs.retry)
    assert code == 1 and out["verdict"] == "fail", out
    etcd = next(s for s in out["steps"] if s["name"] == "etcd")
    assert etcd["status"] == "failed" and "corrupt" in etcd["message"].lower(), etcd
    _assert_clean(lab)


def test_timeout_and_sigint_tear_down_and_keep_evidence(lab):
    body = """\
targets: {rto: 10m, rpo: 1h}
timeout: 2s
steps:
  - name: hang
    restore: {policy: app}
    checks: [{command: {argv: [sleep, "60"]}}]
"""
    t0 = time.monotonic()
    code, out = _run(lab, _drill(lab, "hang", body))
    assert code == 1 and out["verdict"] == "fail", out
    assert time.monotonic() - t0 < 30
    assert any("ran past its timeout" in r for r in out["reasons"]), out
    _assert_clean(lab)

    body = body.replace("timeout: 2s\n", "")
    drill = _drill(lab, "interrupted", body)
    proc = subprocess.Popen([DRTOOL, "-c", str(lab["cfg"]), "drill", "run", str(drill), "--json"], env=lab["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _sleeping_child(proc.pid):
        time.sleep(0.1)
    assert _sleeping_child(proc.pid), "the drill never reached its check"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    _assert_clean(lab)
    hist = json.loads(_drtool(lab["env"], lab["cfg"], "drill", "history", "--drill", "interrupted", "--json").stdout)
    assert hist["drills"] and hist["drills"][0]["verdict"] == "fail"


def _sleeping_child(pid: int) -> bool:
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"sleep\x0060") and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            return True
    return False


def test_a_missing_gpu_fails_a_required_gpu_check(lab):
    """No GPU exists here: gpu-compute runs its CPU fallback for real (torch CPU build), and the
    drill fails because the check is required; a software transcode beside it passes, labelled."""
    body = """\
targets: {rto: 10m, rpo: 1h}
steps:
  - name: gpu
    checks:
      - gpu-compute: {size: 256}
        name: radeon
      - transcode: {hwaccel: none, seconds: 1}
        name: software-transcode
"""
    code, out = _run(lab, _drill(lab, "gpu", body))
    assert code == 1 and out["verdict"] == "fail", out
    checks = {c["name"]: c for c in out["steps"][0]["checks"]}
    assert not checks["radeon"]["ok"] and "no GPU: ran on the CPU fallback" in checks["radeon"]["message"]
    assert "not a GPU pass" in checks["radeon"]["message"]
    assert checks["software-transcode"]["ok"] and "software" in checks["software-transcode"]["message"]
    assert any("step gpu failed" in r for r in out["reasons"]), out
    _assert_clean(lab)
