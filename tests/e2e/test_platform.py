"""Platform sources end to end: the drtool CLI uploads a real OpenBao raft snapshot
and a real etcd snapshot to a real GCS emulator (fake-gcs-server), then verifies and
restores them. talosctl does not exist here: the talos location reaches etcd with
etcdctl, and a Talos etcd snapshot IS an etcd snapshot (same file format), so the
verify and restore paths are the ones a Talos cluster's snapshots take."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from helpers import DRTOOL

pytestmark = pytest.mark.timeout(300)


def _drtool(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DRTOOL, "-c", str(config), *args], capture_output=True, text=True, timeout=240, env=dict(os.environ))


def _ok(config: Path, *args: str, code: int = 0) -> dict:
    p = _drtool(config, *args, "--json")
    assert p.returncode == code, f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout)


def _offsite(fake_gcs, bucket: str) -> str:
    return f"""  offsite:
    type: gcs
    bucket: {bucket}
    prefix: lab
    endpoint: {fake_gcs.endpoint}
    media: cloud-object
    site: gcp
    failure_domain: gcp"""


def _blobs(fake_gcs, bucket: str) -> dict[str, bytes]:
    c = fake_gcs.client()
    return {b.name: b.download_as_bytes(retry=fake_gcs.retry) for b in c.list_blobs(bucket, retry=fake_gcs.retry)}


def _put(fake_gcs, bucket: str, name: str, data: bytes) -> None:
    fake_gcs.client().bucket(bucket).blob(name).upload_from_string(data, retry=fake_gcs.retry)


# --------------------------------------------------------------------------- vault


def _vault_config(tmp_path: Path, openbao, fake_gcs, bucket: str, canary: str, *, breakglass: str = "") -> Path:
    sec = tmp_path / "secrets"
    sec.mkdir(exist_ok=True)
    (sec / "token").write_text(openbao.root_token + "\n")
    keys = []
    for i, k in enumerate(openbao.unseal_keys[:2], 1):  # the threshold is 2 of 3
        (sec / f"unseal-{i}").write_text(k + "\n")
        keys.append(f"{{file: {sec}/unseal-{i}}}")
    cfg = tmp_path / "vault.yaml"
    cfg.write_text(f"""\
version: 1
locations:
  vault-main:
    type: vault
    address: {openbao.address}
    token: {{file: {sec}/token}}
    unseal_keys: [{", ".join(keys)}]
    media: ssd
    site: home
    failure_domain: vault
{_offsite(fake_gcs, bucket)}
policies:
  - name: vault
    source: {{location: vault-main, canaries: ["{canary}#value"]}}
    rpo: 1d
    rto: 4h
    legs:
      - kind: upload
        to: offsite
        schedule: "0 3 * * *"
        verify: {{level: sample, every: 1d}}
{breakglass}""")
    return cfg


def _secret_values(openbao) -> list[str]:
    return [openbao.root_token, *openbao.unseal_keys]


def test_vault_snapshot_upload_verify_restore(tmp_path, openbao, fake_gcs):
    client = openbao.client()
    path = f"drtool-{uuid.uuid4().hex[:8]}/canary"
    client.secrets.kv.v2.create_or_update_secret(path=path, secret={"value": "at-backup"}, mount_point="secret")
    bucket = fake_gcs.make_bucket("vault")
    cfg = _vault_config(tmp_path, openbao, fake_gcs, bucket, f"secret/{path}")

    run = _ok(cfg, "run", "--policy", "vault", "--no-verify")
    (leg,) = run["results"]
    assert leg["phase"] == "succeeded", leg
    blobs = _blobs(fake_gcs, bucket)
    (manifest_key,) = [k for k in blobs if k.endswith("/manifest.json")]
    manifest = json.loads(blobs[manifest_key])
    assert manifest["source"]["kind"] == "vault-raft"
    assert manifest["source_point"]["canaries"] == {f"secret/{path}#value": 1}
    assert {"meta.json", "state.bin"} <= set(manifest["source_point"]["members"])
    snap = blobs["lab/" + manifest["object"]]
    assert snap[:2] == b"\x1f\x8b" and hashlib.sha256(snap).hexdigest() == manifest["sha256"]

    # the live secret moves on; the snapshot must still hold the backup-time version
    client.secrets.kv.v2.create_or_update_secret(path=path, secret={"value": "after"}, mount_point="secret")
    out = _ok(cfg, "verify", "--policy", "vault", "--level", "integrity")
    assert out["verifications"][0]["ok"], out
    assert "SHA256SUMS match" in out["verifications"][0]["message"]
    out = _ok(cfg, "verify", "--policy", "vault", "--level", "sample")
    assert out["verifications"][0]["ok"], out
    assert "1/1 canaries read" in out["verifications"][0]["message"]

    target = tmp_path / "restore"
    out = _ok(cfg, "restore", "--policy", "vault", "--target", str(target))
    assert (target / "vault.snap").read_bytes() == snap
    assert "snapshot restore -force" in json.dumps(out)

    # every record and output stays free of the token and the unseal keys
    runs = _drtool(cfg, "runs", "--json")
    for value in _secret_values(openbao):
        assert value not in runs.stdout + runs.stderr
        assert value.encode() not in b"".join(_blobs(fake_gcs, bucket).values())


def test_a_corrupted_vault_snapshot_fails_verify(tmp_path, openbao, fake_gcs):
    client = openbao.client()
    path = f"drtool-{uuid.uuid4().hex[:8]}/canary"
    client.secrets.kv.v2.create_or_update_secret(path=path, secret={"value": "x"}, mount_point="secret")
    bucket = fake_gcs.make_bucket("vault-bad")
    cfg = _vault_config(tmp_path, openbao, fake_gcs, bucket, f"secret/{path}")
    _ok(cfg, "run", "--policy", "vault", "--no-verify")
    blobs = _blobs(fake_gcs, bucket)
    (mkey,) = [k for k in blobs if k.endswith("/manifest.json")]
    manifest = json.loads(blobs[mkey])
    # corrupted before it was uploaded: the manifest agrees with the bad bytes, so only the
    # offline SHA256SUMS check can tell
    import gzip
    import io
    import tarfile

    raw = gzip.decompress(blobs["lab/" + manifest["object"]])
    buf = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw)) as src, tarfile.open(fileobj=buf, mode="w") as dst:
        for m in src:
            data = src.extractfile(m).read()
            if m.name == "state.bin":
                data = data[:-64] + bytes(b ^ 0xFF for b in data[-64:])
            dst.addfile(m, io.BytesIO(data))
    bad = gzip.compress(buf.getvalue())
    _put(fake_gcs, bucket, "lab/" + manifest["object"], bad)
    manifest.update(sha256=hashlib.sha256(bad).hexdigest(), size=len(bad), md5=None, crc32c=None)
    _put(fake_gcs, bucket, mkey, json.dumps(manifest).encode())
    out = _ok(cfg, "verify", "--policy", "vault", "--level", "integrity", code=1)
    assert not out["verifications"][0]["ok"]
    assert "state.bin" in out["verifications"][0]["message"], out


def test_vault_sample_unseals_with_the_keys_from_the_breakglass_bundle(tmp_path, openbao, fake_gcs):
    import pyrage

    ident = pyrage.x25519.Identity.generate()
    (tmp_path / "bg.key").write_text(f"{ident}\n")
    client = openbao.client()
    path = f"drtool-{uuid.uuid4().hex[:8]}/canary"
    client.secrets.kv.v2.create_or_update_secret(path=path, secret={"value": "x"}, mount_point="secret")
    bucket = fake_gcs.make_bucket("vault-bg")
    cfg = _vault_config(tmp_path, openbao, fake_gcs, bucket, f"secret/{path}", breakglass=f"""\
breakglass:
  recipients: ["{ident.to_public()}"]
  identity: {{file: {tmp_path}/bg.key}}
""")
    _ok(cfg, "run", "--policy", "vault", "--no-verify")
    assert _drtool(cfg, "breakglass", "build").returncode == 0
    for f in (tmp_path / "secrets").glob("unseal-*"):  # the worst day: the keys live only in the bundle
        f.unlink()
    out = _ok(cfg, "verify", "--policy", "vault", "--level", "sample")
    assert out["verifications"][0]["ok"], out
    assert "the break-glass bundle" in out["verifications"][0]["message"]


# --------------------------------------------------------------------------- etcd (Talos)


def _etcd_config(tmp_path: Path, etcd_server, fake_gcs, bucket: str) -> Path:
    cfg = tmp_path / "talos.yaml"
    cfg.write_text(f"""\
version: 1
locations:
  talos-lab:
    type: talos
    etcd: {{endpoints: ["{etcd_server.endpoint}"]}}
    media: nvme
    site: home
    failure_domain: k8s
{_offsite(fake_gcs, bucket)}
policies:
  - name: etcd
    source: {{location: talos-lab}}
    rpo: 1d
    rto: 4h
    legs:
      - kind: upload
        to: offsite
        schedule: "0 */6 * * *"
        verify: {{level: integrity, every: 1d, sample_files: 8}}
""")
    return cfg


def test_etcd_snapshot_upload_key_counts_verify_restore(tmp_path, etcd_server, fake_gcs):
    tag = uuid.uuid4().hex[:6]
    etcd_server.fill({f"pods{tag}": 40, f"secrets{tag}": 15})
    bucket = fake_gcs.make_bucket("etcd")
    cfg = _etcd_config(tmp_path, etcd_server, fake_gcs, bucket)
    run = _ok(cfg, "run", "--policy", "etcd", "--no-verify")
    assert run["results"][0]["phase"] == "succeeded", run
    blobs = _blobs(fake_gcs, bucket)
    (mkey,) = [k for k in blobs if k.endswith("/manifest.json")]
    manifest = json.loads(blobs[mkey])
    counts = manifest["source_point"]["key_counts"]
    assert counts[f"/registry/pods{tag}/"] == 40 and counts[f"/registry/secrets{tag}/"] == 15
    assert manifest["source_point"]["revision"] > 0

    etcd_server.fill({f"pods{tag}": 5}, prefix_tag="late")  # after the snapshot: not in it, not counted
    out = _ok(cfg, "verify", "--policy", "etcd", "--level", "integrity")
    assert out["verifications"][0]["ok"], out
    assert "match the counts recorded at backup" in out["verifications"][0]["message"]
    out = _ok(cfg, "verify", "--policy", "etcd", "--level", "sample")
    assert out["verifications"][0]["ok"], out
    assert "random keys read back" in out["verifications"][0]["message"]

    target = tmp_path / "restore"
    _ok(cfg, "restore", "--policy", "etcd", "--target", str(target))
    assert hashlib.sha256((target / "etcd.db").read_bytes()).hexdigest() == manifest["sha256"]


def test_a_corrupted_etcd_snapshot_fails_integrity(tmp_path, etcd_server, fake_gcs):
    etcd_server.fill({f"cm{uuid.uuid4().hex[:6]}": 30})
    bucket = fake_gcs.make_bucket("etcd-bad")
    cfg = _etcd_config(tmp_path, etcd_server, fake_gcs, bucket)
    _ok(cfg, "run", "--policy", "etcd", "--no-verify")
    blobs = _blobs(fake_gcs, bucket)
    (mkey,) = [k for k in blobs if k.endswith("/manifest.json")]
    manifest = json.loads(blobs[mkey])
    data = bytearray(blobs["lab/" + manifest["object"]])
    mid = len(data) // 2
    data[mid:mid + 256] = bytes(b ^ 0x5A for b in data[mid:mid + 256])  # same size; `snapshot status` would pass it
    _put(fake_gcs, bucket, "lab/" + manifest["object"], bytes(data))
    manifest.update(sha256=hashlib.sha256(data).hexdigest(), md5=None, crc32c=None)  # corrupted before upload
    _put(fake_gcs, bucket, mkey, json.dumps(manifest).encode())
    out = _ok(cfg, "verify", "--policy", "etcd", "--level", "integrity", code=1)
    assert not out["verifications"][0]["ok"]
    assert "corrupt" in out["verifications"][0]["message"].lower(), out


def test_talos_without_talosctl_or_etcd_endpoint_is_a_clear_failure(tmp_path, fake_gcs):
    bucket = fake_gcs.make_bucket("talos")
    (tmp_path / "talosconfig").write_text("context: lab\n")
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"""\
version: 1
locations:
  talos-lab:
    type: talos
    nodes: [10.0.0.2]
    talosconfig: {{file: {tmp_path}/talosconfig}}
    talosctl: talosctl-not-installed
    media: nvme
    site: home
    failure_domain: k8s
{_offsite(fake_gcs, bucket)}
policies:
  - name: etcd
    source: {{location: talos-lab}}
    rpo: 1d
    rto: 4h
    legs:
      - {{kind: upload, to: offsite, schedule: "0 3 * * *"}}
""")
    p = _drtool(cfg, "run", "--policy", "etcd")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "talosctl-not-installed is not installed" in p.stdout + p.stderr
    assert _blobs(fake_gcs, bucket) == {}


def test_talosctl_command_lines():
    """talosctl cannot run here: the argv drtool builds is checked against talosctl's documented CLI
    (`talosctl etcd snapshot <path>`, `talosctl get machineconfig -o yaml`); the talosconfig travels in
    $TALOSCONFIG as a /dev/fd pipe, never in argv."""
    from drtool.legs.platform import talosctl_etcd_snapshot_args, talosctl_machineconfig_args

    assert talosctl_etcd_snapshot_args("talosctl", "10.0.0.2", "/w/etcd.db") == \
        ["talosctl", "--nodes", "10.0.0.2", "etcd", "snapshot", "/w/etcd.db"]
    assert talosctl_machineconfig_args("talosctl", "10.0.0.2") == \
        ["talosctl", "--nodes", "10.0.0.2", "get", "machineconfig", "--output", "yaml"]


def test_machine_configs_from_git_files_upload_and_verify(tmp_path, etcd_server, fake_gcs):
    repo = tmp_path / "talos-git" / "clusterconfig"
    repo.mkdir(parents=True)
    (repo / "controlplane.yaml").write_text("version: v1alpha1\nmachine: {type: controlplane}\n")
    (repo / "worker.yaml").write_text("version: v1alpha1\nmachine: {type: worker}\n")
    bucket = fake_gcs.make_bucket("machineconfig")
    cfg = _etcd_config(tmp_path, etcd_server, fake_gcs, bucket)
    text = cfg.read_text().replace("    media: nvme\n", f"    machine_configs: {repo}\n    media: nvme\n", 1)
    text += """      - kind: upload
        name: machineconfig
        to: offsite
        schedule: "0 4 * * *"
        upload: {content: machineconfig}
        verify: {level: integrity, every: 1d}
"""
    cfg.write_text(text)
    run = _ok(cfg, "run", "--policy", "etcd", "--leg", "machineconfig", "--no-verify")
    assert run["results"][0]["phase"] == "succeeded", run
    out = _ok(cfg, "verify", "--policy", "etcd", "--leg", "machineconfig", "--level", "integrity")
    assert out["verifications"][0]["ok"] and "2 files" in out["verifications"][0]["message"], out
    target = tmp_path / "restore"
    _ok(cfg, "restore", "--policy", "etcd", "--leg", "machineconfig", "--target", str(target))
    import tarfile

    with tarfile.open(target / "machineconfig.tar") as tar:
        assert sorted(m.name for m in tar if m.isfile()) == ["clusterconfig/controlplane.yaml", "clusterconfig/worker.yaml"]

    (repo / "controlplane.yaml").unlink()
    (repo / "worker.yaml").unlink()
    p = _drtool(cfg, "run", "--policy", "etcd", "--leg", "machineconfig")
    assert p.returncode == 1 and "holds no machine config files" in p.stdout + p.stderr


def test_vault_and_etcd_into_restic_backup_legs(tmp_path, openbao, etcd_server, fake_gcs):
    """The same artifacts through restic: the sample verify restores the file from the
    repository, checks its backup-time BLAKE3, then runs the platform's own proof on it."""
    client = openbao.client()
    path = f"drtool-{uuid.uuid4().hex[:8]}/canary"
    client.secrets.kv.v2.create_or_update_secret(path=path, secret={"value": "x"}, mount_point="secret")
    etcd_server.fill({f"deploy{uuid.uuid4().hex[:6]}": 12})
    cfg = _vault_config(tmp_path, openbao, fake_gcs, fake_gcs.make_bucket("unused"), f"secret/{path}")
    (tmp_path / "restic.pass").write_text("restic-test-pass\n")
    text = cfg.read_text().replace("policies:\n", f"""\
  repo:
    type: restic
    repository: {tmp_path}/repo
    password: {{file: {tmp_path}/restic.pass}}
    init: true
    media: hdd
    site: home
    failure_domain: nas
  talos-lab:
    type: talos
    etcd: {{endpoints: ["{etcd_server.endpoint}"]}}
    media: nvme
    site: home
    failure_domain: k8s
policies:
""", 1)
    text += """      - kind: backup
        to: repo
        schedule: "0 3 * * *"
        verify: {level: sample, every: 1d}
  - name: etcd
    source: {location: talos-lab}
    rpo: 1d
    rto: 4h
    legs:
      - kind: backup
        to: repo
        schedule: "0 3 * * *"
        verify: {level: sample, every: 1d, sample_files: 4}
"""
    cfg.write_text(text)
    proof = {"vault": "1/1 canaries read", "etcd": "random keys read back"}
    for policy in ("vault", "etcd"):
        run = _ok(cfg, "run", "--policy", policy, "--leg", "backup-repo", "--no-verify")
        assert run["results"][0]["phase"] == "succeeded", run
        out = _ok(cfg, "verify", "--policy", policy, "--leg", "backup-repo", "--level", "sample")
        assert out["verifications"][0]["ok"], out
        assert "matches its backup-time BLAKE3" in out["verifications"][0]["message"]
        assert proof[policy] in out["verifications"][0]["message"], out
    runs = _drtool(cfg, "runs", "--json")
    for value in _secret_values(openbao):
        assert value not in runs.stdout + runs.stderr
