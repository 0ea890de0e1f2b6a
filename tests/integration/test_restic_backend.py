"""The restic backend against real restic: conformance suite plus restic specifics
(stale/live locks, corrupted packs, incomplete snapshots, password handling)."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conformance.repository_suite import RepositoryConformance
from conftest import require
from helpers import PASSWORD, make_tree

from drtool import exec as ex
from drtool.backends import OBJECT_STORES, PROTOCOLS, REPOSITORIES
from drtool.backends.restic import ResticRepository
from drtool.errors import BackendError, LockHeld
from drtool.policy.models import ResticLocation


@pytest.fixture(autouse=True)
def _restic():
    require("restic")


@pytest.fixture
def make_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_RESTIC_PW", PASSWORD)
    counter = iter(range(1000))

    def factory() -> ResticRepository:
        loc = ResticLocation(type="restic", repository=str(tmp_path / f"repo{next(counter)}"), password={"env": "TEST_RESTIC_PW"},
                             media="hdd", site="home", failure_domain="disk")
        return ResticRepository("test-repo", loc)

    return factory


@pytest.fixture
def source_tree(tmp_path):
    return make_tree(tmp_path / "src", files=20)


class TestResticConformance(RepositoryConformance):
    pass


def test_every_registered_backend_claims_and_satisfies_its_protocols(make_repo):
    assert set(REPOSITORIES) | set(OBJECT_STORES) == set(PROTOCOLS)
    repo = make_repo()
    for proto in PROTOCOLS["restic"]:
        assert isinstance(repo, proto)


def _raw_restic(repo: ResticRepository, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, RESTIC_PASSWORD=PASSWORD)
    return subprocess.Popen(["restic", "--repo", repo.loc.repository, *args], env=env, **kw)


def test_stale_lock_from_a_killed_restic_is_removed_and_logged(make_repo, tmp_path, caplog):
    repo = make_repo()
    repo.ensure_ready(create=True)
    big = tmp_path / "big"
    big.mkdir()
    (big / "data").write_bytes(os.urandom(150 * 1024 * 1024))
    proc = _raw_restic(repo, "backup", str(big), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    locks = Path(repo.loc.repository) / "locks"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(locks.iterdir()):
        time.sleep(0.02)
    time.sleep(0.5)  # let restic finish writing the lock file and start reading data
    assert proc.poll() is None, "restic finished before it could be killed: use more data"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(locks.iterdir()), "restic left no lock behind; the test did not exercise anything"
    assert [lk["pid"] for lk in repo.locks()] == [proc.pid]
    caplog.set_level(logging.WARNING, logger="drtool")
    repo.ensure_ready(create=False)
    assert repo.locks() == []
    assert f"PID {proc.pid}" in caplog.text and "stale restic lock" in caplog.text
    repo.check(read_data_percent=1)  # an exclusive lock can be taken again


def test_live_lock_is_lock_held_not_failure_and_is_left_alone(make_repo, source_tree):
    repo = make_repo()
    repo.ensure_ready(create=True)
    # a backup reading stdin holds a (non-exclusive) lock for as long as stdin stays open
    holder = _raw_restic(repo, "backup", "--stdin", "--stdin-filename", "held", stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        locks = Path(repo.loc.repository) / "locks"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(locks.iterdir()):
            time.sleep(0.02)
        assert repo.clear_stale_locks() == []
        assert len(repo.locks()) == 1
        with pytest.raises(LockHeld, match="locked"):
            repo.check(read_data_percent=1)  # needs an exclusive lock
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_corrupted_pack_fails_integrity_check_and_names_it(make_repo, source_tree):
    repo = make_repo()
    repo.ensure_ready(create=True)
    repo.backup([str(source_tree)], policy="p", leg="l")
    packs = sorted((Path(repo.loc.repository) / "data").rglob("*"), key=lambda p: p.stat().st_size if p.is_file() else 0)
    pack = packs[-1]
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    result = repo.check(read_data_percent=100)
    assert not result.ok
    assert pack.name[:8] in result.message or "pack" in result.message.lower(), result.message


def test_incomplete_snapshot_exit_3_is_a_failure(monkeypatch, source_tree):
    """A source file restic cannot read makes restic exit 3: drtool must fail the run.

    Root reads everything, so restic runs as ``nobody`` through setpriv (a real
    restic, a real unreadable file; the wrapper only drops privileges).
    """
    setpriv = require("setpriv")
    base = Path(tempfile.mkdtemp(prefix="drtool-exit3-"))
    try:
        base.chmod(0o755)
        src = base / "src"
        shutil.copytree(source_tree, src)
        (src / "unreadable").write_text("root only")
        (src / "unreadable").chmod(0)
        repo_dir = base / "repo"
        repo_dir.mkdir()
        cache = base / "cache"
        cache.mkdir()
        for d in (repo_dir, cache):
            shutil.chown(d, "nobody", "nogroup")
        wrapper = base / "restic-as-nobody"
        # the password pipe belongs to root: hand its content on through the environment
        wrapper.write_text(f"#!/bin/sh\nRESTIC_PASSWORD=$(cat \"$RESTIC_PASSWORD_FILE\"); export RESTIC_PASSWORD; unset RESTIC_PASSWORD_FILE\nexec {setpriv} --reuid=nobody --regid=nogroup --clear-groups env XDG_CACHE_HOME={cache} restic \"$@\"\n")
        wrapper.chmod(0o755)
        monkeypatch.setenv("DRTOOL_RESTIC", str(wrapper))
        monkeypatch.setenv("TEST_RESTIC_PW", PASSWORD)
        loc = ResticLocation(type="restic", repository=str(repo_dir / "r"), password={"env": "TEST_RESTIC_PW"},
                             media="hdd", site="home", failure_domain="disk")
        repo = ResticRepository("nobody-repo", loc)
        repo.ensure_ready(create=True)
        with pytest.raises(BackendError, match=r"exit 3.*incomplete.*unreadable"):
            repo.backup([str(src)], policy="p", leg="l")
        # the incomplete snapshot is kept (a failing backup deletes nothing), but the run failed
        assert len(repo.list_points()) == 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_password_never_in_argv_or_command_log(make_repo, source_tree):
    repo = make_repo()
    repo.ensure_ready(create=True)
    repo.backup([str(source_tree)], policy="p", leg="l")
    assert repo.commands and all(PASSWORD not in " ".join(c["argv"]) for c in repo.commands)


def test_wrong_password_is_a_clear_error(make_repo, source_tree, monkeypatch):
    repo = make_repo()
    repo.ensure_ready(create=True)
    monkeypatch.setenv("TEST_RESTIC_PW", "not-the-password")
    other = ResticRepository("test-repo", repo.loc)
    with pytest.raises(ex.CommandError, match="wrong password"):
        other.list_points()


def test_backup_point_matches_what_restic_lists(make_repo, source_tree):
    """The point a local backup returns without re-listing equals restic's own listing."""
    repo = make_repo()
    repo.ensure_ready(create=True)
    made = repo.backup([str(source_tree)], policy="p", leg="l").point
    (listed,) = repo.list_points()
    assert (made.id, made.time, made.policy, made.leg, made.paths) == (listed.id, listed.time, listed.policy, listed.leg, listed.paths)
    assert made.meta["tags"] == listed.meta["tags"]
