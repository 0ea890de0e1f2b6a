"""secrets.secret_path: a secret handed to a child process as a file name, in memory only."""
from __future__ import annotations

import os
import subprocess

from drtool.backends.ceph_rbd import keyring_path
from drtool.policy.models import CephRbdLocation
from drtool.secrets import SecretRef, mask, secret_path


def test_secret_path_is_an_in_memory_file_a_child_can_read(monkeypatch):
    monkeypatch.setenv("T_SECRET_PATH", "hunter2-in-memory")
    path = secret_path(SecretRef(env="T_SECRET_PATH"), what="test")
    assert path.startswith(f"/proc/{os.getpid()}/fd/")
    assert os.readlink(path).startswith("/memfd:drtool-secret")  # not a file on any disk
    assert subprocess.run(["cat", path], capture_output=True, text=True, check=True).stdout == "hunter2-in-memory\n"
    assert secret_path(SecretRef(env="T_SECRET_PATH"), what="test") == path  # resolved once per process
    assert oct(os.stat(path).st_mode & 0o777) == "0o400"


def test_a_keyring_secret_masks_its_key(monkeypatch):
    monkeypatch.setenv("T_KEYRING", "[client.drtool]\n\tkey = AQBkeyringSecretValue==\n\tcaps mon = \"allow r\"")
    loc = CephRbdLocation(type="ceph-rbd", pool="kube", keyring={"env": "T_KEYRING"}, media="nvme", site="home", failure_domain="c")
    path = keyring_path(loc, "ceph")
    assert "key = AQBkeyringSecretValue==" in open(path).read()
    assert "AQBkeyringSecretValue==" not in mask("auth failed for key AQBkeyringSecretValue==")
    plain = CephRbdLocation(type="ceph-rbd", pool="kube", keyring="/etc/ceph/k", media="nvme", site="home", failure_domain="c")
    assert keyring_path(plain, "ceph") == "/etc/ceph/k"
