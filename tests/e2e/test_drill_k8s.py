"""A drill with the kubernetes scratch, through the drtool CLI, against the recorded-API
STUB of tests/services/kubestub.py (no kube-apiserver or Velero runs here; the objects
drtool creates are checked against the official schemas in
tests/integration/test_k8s_scratch.py). Proves the runner's wiring: a Velero restore per
step into its own scratch namespace, k8s-ready on those namespaces, the backup's age as
the RPO, and the namespaces deleted at teardown, pass or fail."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import missing, require
from helpers import DRTOOL

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def stub():
    try:
        import kubernetes  # noqa: F401
    except ImportError as exc:
        missing("kubernetes", str(exc))
    from services.kubestub import ApiStub

    s = ApiStub().start()
    yield s
    s.stop()


def _setup(tmp_path: Path, stub, *, ready: bool) -> tuple[Path, Path]:
    from datetime import datetime, timedelta, timezone

    from services.kubestub import backup, deployment, statefulset

    done = (datetime.now(timezone.utc) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    stub.backups["immich-daily-1"] = backup("immich-daily-1", "Completed", done)
    stub.workloads[("*", "deployments")] = [[deployment("server", 0)], [deployment("server", 1 if ready else 0)]]
    stub.workloads[("*", "statefulsets")] = [[statefulset("db", 1)]]
    kubeconfig = stub.write_kubeconfig(tmp_path / "kubeconfig")
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("version: 1\n")
    drill = tmp_path / "immich.yaml"
    drill.write_text(f"""\
version: 1
name: immich-k8s
scratch: kubernetes
kubernetes: {{kubeconfig: {kubeconfig}, ttl: 2h}}
targets: {{rto: 10m, rpo: 1d}}
steps:
  - name: immich
    velero: {{schedule: immich-daily, namespaces: [immich], timeout: 2m}}
    checks:
      - k8s-ready: {{timeout: 8s}}
""")
    return cfg, drill


def _run(cfg: Path, drill: Path) -> tuple[int, dict]:
    p = subprocess.run([DRTOOL, "-c", str(cfg), "drill", "run", str(drill), "--json"], capture_output=True, text=True,
                       timeout=240, env=dict(os.environ))
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else {"stderr": p.stderr}


def test_velero_restore_into_a_scratch_namespace_ready_and_deleted(tmp_path, stub):
    cfg, drill = _setup(tmp_path, stub, ready=True)
    code, out = _run(cfg, drill)
    assert code == 0 and out["verdict"] == "pass", out
    step = out["steps"][0]
    assert step["point"] == "velero:immich-daily-1" and 7000 < step["point_age_s"] < 7300, step
    assert "ready" in step["checks"][0]["message"]
    created = [body for m, p, body in stub.requests if m == "POST" and p == "/api/v1/namespaces"]
    assert len(created) == 1
    ns = created[0]["metadata"]["name"]
    assert created[0]["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "drtool"
    restore = next(body for m, p, body in stub.requests if m == "POST" and p.endswith("/restores"))
    assert restore["spec"]["namespaceMapping"] == {"immich": ns}
    assert ("DELETE", f"/api/v1/namespaces/{ns}") in stub.calls()
    assert out["teardown"]["ok"] and out["teardown"]["kubernetes"]["ok"], out["teardown"]


def test_workloads_that_never_become_ready_fail_and_still_tear_down(tmp_path, stub):
    cfg, drill = _setup(tmp_path, stub, ready=False)
    code, out = _run(cfg, drill)
    assert code == 1 and out["verdict"] == "fail", out
    assert not out["steps"][0]["checks"][0]["ok"] and "server" in out["steps"][0]["checks"][0]["message"]
    ns = next(body for m, p, body in stub.requests if m == "POST" and p == "/api/v1/namespaces")["metadata"]["name"]
    assert ("DELETE", f"/api/v1/namespaces/{ns}") in stub.calls()


def test_restic_point_restored_by_a_job_into_a_fresh_pvc(tmp_path, stub, seaweedfs, monkeypatch):
    """A real restic repository on SeaweedFS (S3) gets a backup through drtool; the drill
    resolves that point from the real repository and restores it with a Job into a fresh
    PVC in a scratch namespace (the Job runs against the STUB: nothing runs restic in a
    cluster here), PVC Bound and Job Complete checked, the namespace deleted. The
    repository's password and S3 keys are in the scratch Secret only: not in the Job, the
    evidence or the output."""
    from services.kubestub import job, pvc

    require("restic")
    src = tmp_path / "src"
    src.mkdir()
    (src / "photo.jpg").write_bytes(os.urandom(4096))
    monkeypatch.setenv("PVC_RESTIC_PW", "pvc-drill-password-31")
    monkeypatch.setenv("PVC_S3_KEY", seaweedfs.access_key)
    monkeypatch.setenv("PVC_S3_SECRET", seaweedfs.secret_key)
    bucket = seaweedfs.make_bucket("pvcdrill")
    cfg = tmp_path / "lab.yaml"
    cfg.write_text(f"""\
version: 1
locations:
  nas: {{type: filesystem, media: hdd, site: home, failure_domain: nas}}
  offsite:
    type: restic
    repository: s3:{seaweedfs.endpoint}/{bucket}/repo
    password: {{env: PVC_RESTIC_PW}}
    env: {{AWS_ACCESS_KEY_ID: {{env: PVC_S3_KEY}}, AWS_SECRET_ACCESS_KEY: {{env: PVC_S3_SECRET}}}}
    init: true
    media: cloud-object
    site: offsite
    failure_domain: s3
policies:
  - name: library
    source: {{location: nas, path: {src}}}
    rpo: 1d
    rto: 1h
    legs:
      - {{kind: backup, to: offsite, schedule: "@daily"}}
""")
    ran = subprocess.run([DRTOOL, "-c", str(cfg), "run", "--no-verify", "--json"], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    point = json.loads(ran.stdout)["results"][0]["point"]
    kubeconfig = stub.write_kubeconfig(tmp_path / "kubeconfig")
    stub.workloads[("*", "persistentvolumeclaims")] = [[pvc("library", "Bound")]]
    stub.workloads[("*", "jobs")] = [[job("drtool-restore-library", "Complete")]]
    drill = tmp_path / "library.yaml"
    drill.write_text(f"""\
version: 1
name: library-pvc
scratch: kubernetes
kubernetes: {{kubeconfig: {kubeconfig}}}
targets: {{rto: 10m, rpo: 1d}}
steps:
  - name: library
    restore: {{policy: library, point: latest}}
    pvc: {{name: library, size: 1Gi, storage_class: ceph-block, timeout: 1m}}
    checks:
      - k8s-ready: {{kinds: [PersistentVolumeClaim, Job], timeout: 8s}}
""")
    code, out = _run(cfg, drill)
    assert code == 0 and out["verdict"] == "pass", out
    step = out["steps"][0]
    assert step["point"] == point and step["point_age_s"] < 300, step
    ns = next(body for m, p, body in stub.requests if m == "POST" and p == "/api/v1/namespaces")["metadata"]["name"]
    jobdoc = next(b for (plural, n, _), b in stub.created.items() if plural == "jobs" and n == ns)
    assert jobdoc["spec"]["template"]["spec"]["containers"][0]["args"][:2] == ["restore", point]
    secret = stub.created[("secrets", ns, "drtool-restic")]["stringData"]
    assert secret["RESTIC_PASSWORD"] == "pvc-drill-password-31" and secret["AWS_SECRET_ACCESS_KEY"] == seaweedfs.secret_key
    assert secret["RESTIC_REPOSITORY"].startswith("s3:")
    assert out["evidence"] and all(Path(f).is_file() for f in out["evidence"].values()), out["evidence"]
    shown = json.dumps(out) + json.dumps(jobdoc) + "".join(Path(f).read_text() for f in out["evidence"].values())
    assert "pvc-drill-password-31" not in shown and seaweedfs.secret_key not in shown
    assert ("DELETE", f"/api/v1/namespaces/{ns}") in stub.calls() and out["teardown"]["ok"], out["teardown"]

    # a repository on a path of the drill host cannot be reached from a Job: refused up front
    local = cfg.read_text().replace(f"repository: s3:{seaweedfs.endpoint}/{bucket}/repo", f"repository: {tmp_path}/repo")
    cfg.write_text(local)
    p = subprocess.run([DRTOOL, "-c", str(cfg), "drill", "run", str(drill), "--json"], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "a Job in the cluster cannot reach" in p.stdout + p.stderr, p.stdout + p.stderr
