"""The break-glass bundle end to end: `drtool breakglass build|verify` against a real
GCS emulator (fake-gcs-server) with real age encryption (pyrage). The Vault location
here is never contacted: building the bundle only reads its unseal-key references."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from helpers import DRTOOL

pytestmark = pytest.mark.timeout(300)

SECRETS = {"unseal-1": "unseal-key-one-6c1f", "unseal-2": "unseal-key-two-93ab", "restic": "restic-pass-77e2",
           "talos-secrets": "cluster: {id: abc}\nsecrets: {bootstraptoken: t0k3n}"}


def _drtool(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DRTOOL, "-c", str(config), *args], capture_output=True, text=True, timeout=240, env=dict(os.environ))


def _setup(tmp_path: Path, fake_gcs, *, identity_file: Path | None = None) -> tuple[Path, Path, str]:
    import pyrage

    ident = pyrage.x25519.Identity.generate()
    keyfile = identity_file or tmp_path / "breakglass.key"
    if identity_file is None:
        keyfile.write_text(f"# offline identity\n{ident}\n")
    sec = tmp_path / "secrets"
    sec.mkdir()
    for name, value in SECRETS.items():
        (sec / name).write_text(value + "\n")
    bucket = fake_gcs.make_bucket("breakglass")
    cfg = tmp_path / "lab.yaml"
    cfg.write_text(f"""\
version: 1
locations:
  vault-main:
    type: vault
    address: http://127.0.0.1:1
    token: {{file: {sec}/restic}}
    unseal_keys: [{{file: {sec}/unseal-1}}, {{file: {sec}/unseal-2}}]
    media: ssd
    site: home
    failure_domain: vault
  talos-lab:
    type: talos
    etcd: {{endpoints: ["http://127.0.0.1:2"]}}
    secrets_bundle: {{file: {sec}/talos-secrets}}
    media: nvme
    site: home
    failure_domain: k8s
  repo:
    type: restic
    repository: {tmp_path}/repo
    password: {{file: {sec}/restic}}
    media: hdd
    site: home
    failure_domain: nas
  offsite:
    type: gcs
    bucket: {bucket}
    prefix: lab
    endpoint: {fake_gcs.endpoint}
    media: cloud-object
    site: gcp
    failure_domain: gcp
breakglass:
  recipients: ["{ident.to_public()}"]
  identity: {{file: {keyfile}}}
""")
    return cfg, sec, bucket


def _objects(fake_gcs, bucket: str) -> dict[str, bytes]:
    c = fake_gcs.client()
    return {b.name: b.download_as_bytes(retry=fake_gcs.retry) for b in c.list_blobs(bucket, retry=fake_gcs.retry)}


def test_build_encrypts_every_item_and_verify_decrypts_with_the_offline_identity(tmp_path, fake_gcs):
    cfg, sec, bucket = _setup(tmp_path, fake_gcs)
    p = _drtool(cfg, "breakglass", "build", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert sorted(doc["items"]) == ["restic/repo/password", "talos/talos-lab/secrets-bundle",
                                    "vault/vault-main/unseal-key-1", "vault/vault-main/unseal-key-2"]
    assert doc["written"]["offsite"].startswith("breakglass/") and not doc["missing"]
    objs = _objects(fake_gcs, bucket)
    bundle = objs[f"lab/{doc['written']['offsite']}"]
    assert bundle.startswith(b"age-encryption.org/v1")
    for value in SECRETS.values():  # nothing readable without the identity, nothing leaked in output
        assert value.encode() not in bundle
        assert value not in p.stdout + p.stderr
    manifest = json.loads(objs[f"lab/{doc['written']['offsite'].rsplit('/', 1)[0]}/manifest.json"])
    assert manifest["size"] == len(bundle) and "restic/repo/password" in manifest["items"]

    v = _drtool(cfg, "breakglass", "verify", "--json")
    assert v.returncode == 0, v.stdout + v.stderr
    loc = json.loads(v.stdout)["locations"]["offsite"]
    assert loc["ok"] and loc["items"] == 4 and not loc["missing"] and not loc["stale"]
    for value in SECRETS.values():
        assert value not in v.stdout + v.stderr

    # a rotated restic password makes the bundle stale: verify fails until it is rebuilt
    (sec / "restic").write_text("a-new-restic-pass\n")
    v = _drtool(cfg, "breakglass", "verify", "--json")
    assert v.returncode == 1
    assert json.loads(v.stdout)["locations"]["offsite"]["stale"] == ["restic/repo/password"]
    assert "a-new-restic-pass" not in v.stdout + v.stderr


def test_a_missing_item_writes_nothing_unless_allowed_and_verify_then_names_it(tmp_path, fake_gcs):
    cfg, sec, bucket = _setup(tmp_path, fake_gcs)
    (sec / "unseal-2").unlink()
    p = _drtool(cfg, "breakglass", "build")
    assert p.returncode == 2, p.stdout + p.stderr  # a secret reference that does not resolve: a configuration error
    assert "vault/vault-main/unseal-key-2" in p.stderr and "nothing was written" in p.stderr
    assert _objects(fake_gcs, bucket) == {}

    p = _drtool(cfg, "breakglass", "build", "--allow-missing", "--json")
    assert p.returncode == 3, p.stdout + p.stderr
    assert list(json.loads(p.stdout)["missing"]) == ["vault/vault-main/unseal-key-2"]
    v = _drtool(cfg, "breakglass", "verify", "--json")
    assert v.returncode == 1
    assert json.loads(v.stdout)["locations"]["offsite"]["missing"] == ["vault/vault-main/unseal-key-2"]


def test_the_wrong_identity_is_a_clear_failure(tmp_path, fake_gcs):
    import pyrage

    cfg, _, _ = _setup(tmp_path, fake_gcs)
    assert _drtool(cfg, "breakglass", "build").returncode == 0
    other = tmp_path / "other.key"
    other.write_text(f"{pyrage.x25519.Identity.generate()}\n")
    text = cfg.read_text().replace(str(tmp_path / "breakglass.key"), str(other))
    cfg.write_text(text)
    v = _drtool(cfg, "breakglass", "verify")
    assert v.returncode == 1
    assert "does not decrypt with breakglass.identity" in v.stdout
    assert "AGE-SECRET-KEY" not in v.stdout + v.stderr
