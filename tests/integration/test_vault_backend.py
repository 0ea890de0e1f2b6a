"""The Vault backend (drtool/backends/vault.py) against a real OpenBao (raft storage,
the session's ``openbao`` fixture): snapshots stream as a complete gzip that the
offline check accepts, and damaged copies fail it; KV v2 and v1 reads and versions;
credentials never show in errors; the ``vault:`` secret ref; and a scratch server
that restores a snapshot, unseals with the ORIGINAL keys and serves the values as
they were at snapshot time.

Each test uses its own secret paths (and its own KV v1 mount), so the shared server
carries no state between tests. Every value a test reads is unique too: reading
registers it with the process-wide masker, and a common word ("ok") would then be
masked in every later test's output.
"""
from __future__ import annotations

import gzip
import io
import os
import tarfile
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from drtool.backends.vault import ScratchVault, VaultApi, VaultConn, check_snapshot
from drtool.errors import BackendError, SecretError
from drtool.exec import pid_alive
from drtool.secrets import SecretRef, mask, resolve


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def api(openbao, token: str | None = None) -> VaultApi:
    return VaultApi(VaultConn(openbao.address, token=SecretStr(token or openbao.root_token), timeout=10))


def take_snapshot(openbao, path: Path) -> dict:
    """Snapshot the live server into ``path``; return check_snapshot's verdict on it."""
    with open(path, "wb") as f:
        written = api(openbao).snapshot(f)
    assert written == path.stat().st_size > 0
    with open(path, "rb") as f:
        return check_snapshot(f)


def flip_bytes_in_member(snapshot: bytes, member: str) -> bytes:
    """The same snapshot with a few bytes inside ``member`` flipped, re-gzipped and
    re-tarred so gzip and tar are both valid: only the SHA256SUMS can tell."""
    tar_bytes = bytearray(gzip.decompress(snapshot))
    with tarfile.open(fileobj=io.BytesIO(bytes(tar_bytes))) as tar:
        info = tar.getmember(member)
    middle = info.offset_data + info.size // 2
    for i in range(middle, middle + 4):
        tar_bytes[i] ^= 0xFF
    return gzip.compress(bytes(tar_bytes))


# --------------------------------------------------------------------------- #
# snapshot and offline check


def test_snapshot_streams_a_gzip_that_the_offline_check_accepts(openbao, tmp_path):
    """Progress is reported as the body streams; the file is a complete gzip tar whose
    SHA256SUMS lists meta.json and state.bin with matching hashes."""
    health = api(openbao).health()
    assert health["initialized"] is True and health["sealed"] is False and health["version"]
    seen: list[int] = []
    path = tmp_path / "raft.snap"
    with open(path, "wb") as f:
        written = api(openbao).snapshot(f, progress=seen.append)
    assert seen and seen[-1] == written == path.stat().st_size
    with open(path, "rb") as f:
        result = check_snapshot(f)
    assert result["ok"], result["problems"]
    assert {"meta.json", "state.bin", "SHA256SUMS", "SHA256SUMS.sealed"} <= set(result["members"])
    assert result["bytes"] == written
    assert result["meta"]["index"] > 0 and result["meta"]["term"] > 0
    assert result["meta"]["size"] == result["members"]["state.bin"]
    sums = tarfile.open(path).extractfile("SHA256SUMS").read().decode()
    assert "  meta.json" in sums and "  state.bin" in sums


def test_a_truncated_or_bit_flipped_snapshot_fails_the_check(openbao, tmp_path):
    path = tmp_path / "raft.snap"
    assert take_snapshot(openbao, path)["ok"]
    good = path.read_bytes()

    truncated = check_snapshot(io.BytesIO(good[: len(good) * 2 // 3]))
    assert not truncated["ok"]
    assert "truncated" in truncated["problems"][0]

    flipped = check_snapshot(io.BytesIO(flip_bytes_in_member(good, "state.bin")))
    assert not flipped["ok"]
    assert any(p.startswith("state.bin: SHA-256 mismatch") for p in flipped["problems"]), flipped["problems"]


def test_snapshot_with_a_bad_token_names_address_and_status_never_the_token(openbao):
    token = "s." + uuid.uuid4().hex
    with pytest.raises(BackendError) as err:
        api(openbao, token).snapshot(io.BytesIO())
    message = str(err.value)
    assert openbao.address in message and "403" in message
    assert token not in message


# --------------------------------------------------------------------------- #
# KV reads


def test_read_kv_v2_with_its_version(openbao):
    client = openbao.client()
    path, first, second, user = unique("app"), unique("first"), unique("second"), unique("user")
    client.secrets.kv.v2.create_or_update_secret(path, secret={"password": first}, mount_point="secret")
    client.secrets.kv.v2.create_or_update_secret(path, secret={"password": second, "user": user}, mount_point="secret")
    vault = api(openbao)
    assert vault.read(f"secret/{path}#password").get_secret_value() == second
    assert vault.read(f"secret/{path}#user").get_secret_value() == user
    assert vault.kv_version(f"secret/{path}#password") == 2
    assert mask(f"user={user}") == "user=***"  # read values are registered with the masker


def test_read_kv_v1_has_no_version(openbao):
    client = openbao.client()
    mount, value = unique("kv1"), unique("v1value")
    client.sys.enable_secrets_engine("kv", path=mount, options={"version": "1"})
    client.secrets.kv.v1.create_or_update_secret("team/db", secret={"password": value}, mount_point=mount)
    vault = api(openbao)
    assert vault.read(f"{mount}/team/db#password").get_secret_value() == value
    assert vault.kv_version(f"{mount}/team/db#password") is None


def test_missing_secret_or_key_names_the_ref_never_a_value(openbao):
    client = openbao.client()
    path, value = unique("app"), unique("hidden")
    client.secrets.kv.v2.create_or_update_secret(path, secret={"password": value}, mount_point="secret")
    vault = api(openbao)
    with pytest.raises(SecretError, match=f"secret/{path}-nope#password: not found"):
        vault.read(f"secret/{path}-nope#password")
    with pytest.raises(SecretError) as err:
        vault.read(f"secret/{path}#username")
    assert f"secret/{path}#username" in str(err.value) and "keys: password" in str(err.value)
    assert value not in str(err.value)


def test_a_wrong_token_fails_without_showing_the_token(openbao):
    path = unique("app")
    openbao.client().secrets.kv.v2.create_or_update_secret(path, secret={"k": unique("v")}, mount_point="secret")
    token = "s." + uuid.uuid4().hex
    with pytest.raises(BackendError) as err:
        api(openbao, token).read(f"secret/{path}#k")
    message = str(err.value)
    assert "permission denied" in message and openbao.address in message
    assert token not in message


def test_vault_secret_ref_resolves_and_masks(openbao, monkeypatch):
    path, value = unique("backup"), unique("restic-pass")
    openbao.client().secrets.kv.v2.create_or_update_secret(path, secret={"password": value}, mount_point="secret")
    for name in ("BAO_ADDR", "BAO_TOKEN", "VAULT_CACERT", "BAO_CACERT", "VAULT_NAMESPACE", "BAO_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("VAULT_ADDR", openbao.address)
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)
    ref = SecretRef(vault=f"secret/{path}#password")
    assert ref.describe() == f"vault:secret/{path}#password"
    assert resolve(ref).get_secret_value() == value
    assert mask(f"password is {value}") == "password is ***"
    with pytest.raises(SecretError, match=f"vault:secret/{path}#nokey|secret/{path}#nokey"):
        resolve(SecretRef(vault=f"secret/{path}#nokey"))
    with pytest.raises(ValueError, match="exactly one of env, file, command, vault"):
        SecretRef(vault=f"secret/{path}#password", env="X")
    with pytest.raises(ValueError, match="not of the form mount/path#key"):
        SecretRef(vault="secret#password")


# --------------------------------------------------------------------------- #
# scratch server: restore with the original keys


def original_keys(openbao, which: slice) -> list[SecretStr]:
    return [SecretStr(k) for k in openbao.unseal_keys[which]]


@pytest.fixture(scope="module")
def restored(openbao, tmp_path_factory):
    """One scratch restore for the module (OpenBao seals a restored node ~5 s after the
    restore call, so each restore costs ~6 s): canaries written and snapshotted, then
    changed and deleted on the live server; the scratch server restored from the
    snapshot and unsealed with two of the three ORIGINAL keys (a threshold). Yields
    (scratch, {ref: value at snapshot time}, {ref: KV version at snapshot time})."""
    client = openbao.client()
    changed, deleted = unique("canary"), unique("canary")
    refs = {f"secret/{changed}#v": unique("at-snapshot"), f"secret/{deleted}#v": unique("kept")}
    for path, value in zip((changed, deleted), refs.values()):
        client.secrets.kv.v2.create_or_update_secret(path, secret={"v": value}, mount_point="secret")
    versions = {ref: api(openbao).kv_version(ref) for ref in refs}
    work = tmp_path_factory.mktemp("vault-restore")
    snap = work / "raft.snap"
    assert take_snapshot(openbao, snap)["ok"]
    client.secrets.kv.v2.create_or_update_secret(changed, secret={"v": unique("after-snapshot")}, mount_point="secret")
    client.secrets.kv.v2.delete_metadata_and_all_versions(deleted, mount_point="secret")

    with ScratchVault(work / "scratch", binary=openbao.binary) as scratch:
        scratch.restore(snap, original_keys(openbao, slice(1, 3)))
        yield scratch, refs, versions


def test_scratch_restore_serves_the_values_at_snapshot_time(openbao, restored):
    """The ORIGINAL root token works against the restored data, and the canaries read
    as they were at snapshot time (the changed one unchanged, the deleted one back),
    at the versions recorded then."""
    scratch, refs, versions = restored
    token = SecretStr(openbao.root_token)
    for ref, value in refs.items():
        assert scratch.read(ref, token).get_secret_value() == value
        assert scratch.kv_version(ref, token) == versions[ref]
    assert api(openbao).read(next(iter(refs))).get_secret_value().startswith("after-snapshot")  # the live one moved on


def test_wrong_unseal_keys_are_a_clear_error_and_the_right_ones_still_work(openbao, restored):
    """Sealed again, the restored server refuses keys of another cluster (and too few
    keys) with a clear error that shows no key, then opens with the original ones."""
    import hvac  # here, not at the top: without hvac the openbao fixture skips (or fails under REQUIRE)

    scratch, refs, _ = restored
    token = SecretStr(openbao.root_token)
    hvac.Client(url=scratch.address, token=openbao.root_token, timeout=10).sys.seal()
    wrong = [SecretStr(os.urandom(33).hex()) for _ in range(3)]
    with pytest.raises(BackendError, match="the unseal keys do not match this snapshot") as err:
        scratch.unseal(wrong)
    assert all(k.get_secret_value() not in str(err.value) for k in wrong)
    with pytest.raises(BackendError, match="needs 2 unseal keys, 1 given"):
        scratch.unseal(original_keys(openbao, slice(0, 1)))
    scratch.unseal(original_keys(openbao, slice(0, 2)))
    ref, value = next(iter(refs.items()))
    assert scratch.read(ref, token).get_secret_value() == value


def test_scratch_stop_leaves_no_process_and_keeps_the_workdir(openbao, tmp_path):
    scratch = ScratchVault(tmp_path / "scratch", binary=openbao.binary).start()
    pid = scratch.pid
    assert pid and pid_alive(pid) and scratch.api(SecretStr("unused")).health()["sealed"] is False
    scratch.stop()
    scratch.stop()  # idempotent
    assert not pid_alive(pid)
    assert (tmp_path / "scratch" / "server.log").exists() and (tmp_path / "scratch" / "raft").is_dir()
