"""drtool.backends.cephfs against a real CephFS (Pacific; the session's ``ceph_cluster``:
mon, mgr, memstore OSD, mds, fs ``cephfs``), mounted with ceph-fuse (no kernel client).

One ceph-fuse mount of the fs root for the module; each test works in a directory of its
own under it. What is proved:

- a snapshot is a point-in-time view: after files are changed, deleted, added, renamed
  and a directory removed, ``snap_path`` still holds the old tree byte for byte (modes,
  mtimes, symlinks), the live tree holds the new one, and the snapshot is read-only;
  its ``created`` is the MDS's stamp (``ceph.snap.btime``, equal to the snapshot dir's
  ctime, which is the fallback);
- ``list_snaps`` lists a directory's own snapshots, oldest first, and not the
  ``_NAME_INODE`` entries its ancestors' snapshots put in its ``.snap``; sibling
  directories' snapshots are separate; removal works; refusals (duplicate, reserved
  and bad names, missing directory, a file, a non-CephFS dir) name the fs/path/snap;
- a mount of a sub-path reports fs paths from the fs root;
- mount failures (bad fs name, missing root, non-empty or mounted mountpoint) are clear
  and leave no process, no mount and no mountpoint made by the attempt; unmount leaves
  no ceph-fuse process and nothing in /proc/self/mountinfo, also for a busy mount
  (detached lazily) and after ceph-fuse was killed (the next mount detaches the dead one);
- subvolume snapshots through the real mgr ``volumes`` module, loaded into the session
  cluster on demand (``ceph_cluster.enable_volumes()``: the default cluster keeps a stub
  to start fast): create/list/info/rm, data read back from the v2 snapshot path, the
  argv each method ran, errors.

Labelled exceptions: the "volumes module missing" error is tested on captured Pacific
output (the session cluster may already have loaded the real module); the pure parsers
are tested on literal values.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import missing, require
from helpers import tree_state

from drtool.backends import cephfs
from drtool.backends.cephfs import (
    CephFsCli, CephFsConn, CephFsError, CephFsMount, CephFsMountError, CephFsNotFound, CephFsSnapshotExists,
    CephFsVolumesUnavailable, FsSnap, check_snap_name, fs_join, mount_table, parse_btime, parse_created_at, probe,
    rel_path,
)
from drtool.exec import CommandResult, Outcome, pid_alive


# -- helpers -------------------------------------------------------------------


def answers(path: Path) -> bool:
    """The mount works: a file written through it reads back (and is removed)."""
    probe = Path(path) / f".probe-{uuid.uuid4().hex[:8]}"
    probe.write_text("ok")
    try:
        return probe.read_text() == "ok"
    finally:
        probe.unlink()


def write_tree(root: Path, seed: int = 7) -> None:
    rng = random.Random(seed)
    for d in ("docs", "docs/deep/er", "media", "gone"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "docs/a.txt").write_text("alpha\n")
    (root / "docs/deep/er/b.bin").write_bytes(rng.randbytes(300_000))
    (root / "media/big.bin").write_bytes(rng.randbytes(1 << 20))
    (root / "media/empty").write_bytes(b"")
    (root / "gone/x").write_text("in a directory that will be removed")
    (root / "secret").write_text("0600 file")
    os.chmod(root / "secret", 0o600)
    os.symlink("docs/a.txt", root / "link")


def fuse_processes(mountpoint: Path) -> list[int]:
    """PIDs of live ceph-fuse processes whose command line names ``mountpoint``."""
    want = os.path.realpath(mountpoint).encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"ceph-fuse") and want in argv and pid_alive(int(entry)):
            pids.append(int(entry))
    return pids


def assert_gone(mountpoint: Path, pid: int | None = None) -> None:
    """No ceph-fuse for ``mountpoint``, nothing mounted there (mountinfo), ``pid`` dead."""
    deadline = time.monotonic() + 5
    while fuse_processes(mountpoint) and time.monotonic() < deadline:  # a zombie's /proc lingers briefly
        time.sleep(0.05)
    assert fuse_processes(mountpoint) == []
    if pid is not None:
        assert not pid_alive(pid)
    real = os.path.realpath(mountpoint)
    assert real not in mount_table()
    assert real not in Path("/proc/self/mountinfo").read_text()


@pytest.fixture(scope="module")
def conn(ceph_cluster) -> CephFsConn:
    require("ceph-fuse")
    return CephFsConn(conf=ceph_cluster.conf, keyring=ceph_cluster.keyring)


@pytest.fixture(scope="module")
def mnt(conn, tmp_path_factory) -> Path:
    """The fs root, mounted for the whole module."""
    with CephFsMount(conn, tmp_path_factory.mktemp("cephfs") / "root") as path:
        yield path


@pytest.fixture
def base(mnt) -> str:
    """A fresh directory of this test's own, as a path inside the mount."""
    rel = f"t-{uuid.uuid4().hex[:8]}"
    (mnt / rel).mkdir()
    return rel


@pytest.fixture
def cli(conn) -> CephFsCli:
    return CephFsCli(conn)


# -- path snapshots --------------------------------------------------------------


def test_snapshot_is_a_point_in_time_view(cli, mnt, base):
    live = mnt / base
    write_tree(live)
    before = tree_state(live)
    t0 = datetime.now(timezone.utc)
    snap = cli.snap_create(mnt, base, "s1")
    t1 = datetime.now(timezone.utc)

    assert snap.name == "s1" and snap.path == f"/{base}"
    assert snap.created is not None and snap.created.tzinfo is not None and snap.created.utcoffset() == timedelta(0)
    assert t0 - timedelta(seconds=1) <= snap.created <= t1 + timedelta(seconds=1)  # the MDS's clock is this host's
    snap_dir = cli.snap_path(mnt, base, "s1")
    assert snap_dir == live / ".snap" / "s1"
    # created is ceph.snap.btime, and the snapshot dir's ctime is the same stamp (the fallback)
    btime = parse_btime(os.getxattr(snap_dir, "ceph.snap.btime"))
    assert snap.created == btime
    assert abs(datetime.fromtimestamp(os.stat(snap_dir).st_ctime, timezone.utc) - btime) < timedelta(milliseconds=1)

    # change, delete, add, rename, remove a directory, chmod
    time.sleep(0.01)
    (live / "docs/a.txt").write_text("ALPHA, rewritten\n")
    with open(live / "media/big.bin", "r+b") as f:
        f.seek(4096)
        f.write(b"\xff" * 4096)
    (live / "docs/deep/er/b.bin").unlink()
    (live / "gone/x").unlink()
    (live / "gone").rmdir()
    (live / "new.txt").write_text("added after the snapshot")
    (live / "media/empty").rename(live / "media/renamed")
    os.chmod(live / "secret", 0o644)
    after = tree_state(live)

    assert tree_state(snap_dir) == before  # byte for byte, modes, mtimes, the symlink
    assert (snap_dir / "media/big.bin").read_bytes()[4096:8192] != b"\xff" * 4096
    assert (snap_dir / "docs/a.txt").read_text() == "alpha\n"
    assert after != before and "new.txt" in after and "gone" not in after and "new.txt" not in before  # the live edits landed
    # read-only
    with pytest.raises(OSError) as e:
        (snap_dir / "docs/a.txt").write_text("no")
    assert e.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)

    time.sleep(0.01)
    s2 = cli.snap_create(mnt, base, "s2")
    assert [s.name for s in cli.list_snaps(mnt, base)] == ["s1", "s2"]  # oldest first
    assert s2.created > snap.created
    assert tree_state(cli.snap_path(mnt, base, "s2")) == after
    assert tree_state(cli.snap_path(mnt, base, "s1")) == before
    assert [c["op"] for c in cli.commands] == ["mkdir", "mkdir"] and all(c["errno"] == 0 for c in cli.commands)


def test_list_skips_inherited_snapshots_and_keeps_paths_apart(cli, mnt, base):
    for d in ("p/child", "p/sibling", "other"):
        (mnt / base / d).mkdir(parents=True)
    (mnt / base / "p/child/f").write_text("child")
    parent = cli.snap_create(mnt, f"{base}/p", "parentsnap")
    mine = cli.snap_create(mnt, f"{base}/p/child", "childsnap")
    cli.snap_create(mnt, f"{base}/other", "othersnap")

    # the child's .snap shows the parent's snapshot as _NAME_INODE (the parent's inode)...
    raw = sorted(os.listdir(mnt / base / "p/child/.snap"))
    assert raw == sorted(["childsnap", f"_parentsnap_{os.stat(mnt / base / 'p').st_ino}"])
    # ...which list_snaps leaves out
    assert cli.list_snaps(mnt, f"{base}/p/child") == [mine]
    assert cli.list_snaps(mnt, f"{base}/p") == [parent]
    assert cli.list_snaps(mnt, f"{base}/p/sibling") == []
    assert [s.name for s in cli.list_snaps(mnt, f"{base}/other")] == ["othersnap"]
    assert cli.list_snaps(mnt, base) == []
    assert mine.path == f"/{base}/p/child" and parent.path == f"/{base}/p"
    # the parent's snapshot covers the child's content too
    assert (cli.snap_path(mnt, f"{base}/p", "parentsnap") / "child/f").read_text() == "child"

    cli.snap_remove(mnt, f"{base}/p", "parentsnap")
    assert os.listdir(mnt / base / "p/child/.snap") == ["childsnap"]
    assert cli.list_snaps(mnt, f"{base}/p/child") == [mine]
    # path spellings: leading slash and trailing slash mean the same directory
    assert cli.list_snaps(mnt, f"/{base}/p/child/") == [mine]


def test_remove_and_refusals_name_the_fs_path_and_snapshot(cli, mnt, base):
    (mnt / base / "d").mkdir()
    (mnt / base / "file").write_text("x")
    cli.snap_create(mnt, f"{base}/d", "keep")
    cli.snap_create(mnt, f"{base}/d", "drop")

    cli.snap_remove(mnt, f"{base}/d", "drop")
    assert [s.name for s in cli.list_snaps(mnt, f"{base}/d")] == ["keep"]
    assert not (mnt / base / "d/.snap/drop").exists()

    with pytest.raises(CephFsNotFound, match=rf"'drop' of /{base}/d in CephFS 'cephfs'.*no such snapshot"):
        cli.snap_remove(mnt, f"{base}/d", "drop")
    with pytest.raises(CephFsNotFound, match=r"no snapshot 'drop'"):
        cli.snap_path(mnt, f"{base}/d", "drop")
    with pytest.raises(CephFsSnapshotExists, match=rf"'keep' of /{base}/d in CephFS 'cephfs': it already exists"):
        cli.snap_create(mnt, f"{base}/d", "keep")
    with pytest.raises(CephFsNotFound, match=rf"no directory /{base}/missing in CephFS 'cephfs'"):
        cli.snap_create(mnt, f"{base}/missing", "s")
    with pytest.raises(CephFsError, match="not a directory"):
        cli.snap_create(mnt, f"{base}/file", "s")
    for bad in ("_reserved", "a/b", "", ".", ".."):
        with pytest.raises(ValueError, match="bad CephFS snapshot name"):
            cli.snap_create(mnt, f"{base}/d", bad)
    with pytest.raises(ValueError, match=r"'\.\.'"):
        cli.list_snaps(mnt, f"{base}/d/../..")
    with pytest.raises(ValueError, match=r"\.snap"):
        cli.list_snaps(mnt, f"{base}/d/.snap")
    # the MDS itself refuses names starting with "_" (what makes skipping them safe)
    with pytest.raises(OSError) as e:
        os.mkdir(mnt / base / "d/.snap/_mine")
    assert e.value.errno == errno.EINVAL
    # a directory that is not on CephFS
    with pytest.raises(CephFsError, match="not a CephFS mount"):
        cli.list_snaps(Path("/tmp"), "")
    # names with blanks are fine on a path snapshot
    cli.snap_create(mnt, f"{base}/d", "nightly 2026-11-28")
    assert [s.name for s in cli.list_snaps(mnt, f"{base}/d")] == ["keep", "nightly 2026-11-28"]
    assert [c["errno"] for c in cli.commands if c["op"] == "rmdir"] == [0, errno.ENOENT]


def test_sub_path_mount_reports_paths_from_the_fs_root(conn, cli, mnt, base, tmp_path):
    (mnt / base / "app/data").mkdir(parents=True)
    (mnt / base / "app/data/f").write_text("v1")
    with CephFsMount(conn, tmp_path / "sub", root=f"/{base}/app") as sub:
        assert sorted(os.listdir(sub)) == ["data"]
        s = cli.snap_create(sub, "data", "viasub")
        assert s.path == f"/{base}/app/data"
        assert cli.list_snaps(sub, "data") == [s]
        (sub / "data/f").write_text("v2")
        assert (cli.snap_path(sub, "data", "viasub") / "f").read_text() == "v1"
        # the same snapshot, seen through the root mount
        assert cli.list_snaps(mnt, f"{base}/app/data") == [s]
        # a directory below a mountpoint resolves too
        assert cli.list_snaps(sub / "data", "")[0].path == f"/{base}/app/data"
    assert not (tmp_path / "sub").exists()  # the mountpoint this mount made is gone again


# -- mounting and unmounting -----------------------------------------------------------


def test_unmount_leaves_no_process_and_no_mount(conn, cli, tmp_path):
    mp = tmp_path / "m"
    m = CephFsMount(conn, mp)
    t0 = time.monotonic()
    with m as path:
        mounted_s = time.monotonic() - t0
        pid = m.proc.pid
        assert path == mp and pid_alive(pid) and fuse_processes(mp) == [pid]
        entry = mount_table()[os.path.realpath(mp)]
        assert entry.fstype == "fuse.ceph-fuse" and entry.source == "ceph-fuse"
        # no remount-based dentry trimming (its helper child could hold /dev/fuse past ceph-fuse)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[cmdline.index(b"--client_try_dentry_invalidate") + 1] == b"true"
        d = f"u-{uuid.uuid4().hex[:6]}"
        (path / d).mkdir()
        cli.snap_create(path, d, "s")  # an unmount after a snapshot waits ~1 s for ceph-fuse
        t1 = time.monotonic()
    unmount_s = time.monotonic() - t1
    assert not m.forced
    assert_gone(mp, pid)
    assert not mp.exists()
    assert mounted_s < 10 and unmount_s < CephFsMount.UNMOUNT_GRACE_S
    m.unmount()  # idempotent


def test_mount_failures_are_clear_and_leave_nothing(conn, ceph_cluster, mnt, tmp_path):
    mp = tmp_path / "m"
    bad_fs = CephFsConn(conf=conn.conf, keyring=conn.keyring, fs_name="nosuchfs")
    with pytest.raises(CephFsMountError, match=r"cannot mount CephFS 'nosuchfs'.*no CephFS named 'nosuchfs' \(ceph fs ls"):
        with CephFsMount(bad_fs, mp):
            pass
    assert_gone(mp)
    assert not mp.exists()  # the attempt made it, the failure removed it

    with pytest.raises(CephFsMountError, match=r"path /no/such/dir.*does not exist in CephFS 'cephfs'"):
        CephFsMount(conn, mp, root="/no/such/dir").mount()
    assert_gone(mp)

    bad_key = tmp_path / "bad.keyring"
    bad_key.write_text("[client.admin]\n\tkey = AQBHeW5mAAAAABAAu3kTUQTnO0QRT8FNJhLrqA==\n")
    with pytest.raises(CephFsMountError, match=r"cephx authentication of client.admin failed"):
        CephFsMount(CephFsConn(conf=conn.conf, keyring=str(bad_key)), mp).mount()
    assert_gone(mp)

    full = tmp_path / "full"
    full.mkdir()
    (full / "precious").write_text("x")
    with pytest.raises(CephFsMountError, match="is not empty"):
        CephFsMount(conn, full).mount()
    assert (full / "precious").read_text() == "x"
    assert_gone(full)

    with pytest.raises(CephFsMountError, match="already a mount point .*fuse.ceph-fuse"):
        CephFsMount(conn, mnt).mount()
    assert answers(mnt)  # the module's mount still works


def test_busy_mount_is_detached_and_ceph_fuse_ended(conn, tmp_path):
    mp = tmp_path / "busy"
    m = CephFsMount(conn, mp)
    m.BUSY_RETRY_S, m.UNMOUNT_GRACE_S = 0.3, 1.0  # the defaults: 2 s and 10 s
    path = m.mount()
    pid = m.proc.pid
    f = open(path / "held", "w")  # an open file keeps the mount busy
    try:
        f.write("x")
        f.flush()
        m.unmount()
        assert m.forced
        assert_gone(mp, pid)
    finally:
        try:
            f.close()
        except OSError:  # its ceph-fuse is gone
            pass


def mds_sessions(ceph_cluster) -> dict[str, str]:
    """pid -> state of the MDS's ceph-fuse sessions."""
    doc = json.loads(ceph_cluster.ceph("tell", "mds.cephfs:0", "session", "ls"))
    return {s["client_metadata"].get("pid", ""): s["state"] for s in doc}


def test_dead_mount_from_a_killed_ceph_fuse_is_detached_by_the_next_mount(conn, ceph_cluster, tmp_path):
    mp = tmp_path / "dead"
    mp.mkdir()
    first = CephFsMount(conn, mp)
    first.mount()
    pid = first.proc.pid
    assert str(pid) in mds_sessions(ceph_cluster)
    first.proc.proc.kill()  # as if drtool had been killed (PR_SET_PDEATHSIG kills ceph-fuse alone)
    first.proc.proc.wait()
    assert probe(str(mp), 5.0) == errno.ENOTCONN  # (probe: a hung mount must not hang the test)
    with CephFsMount(conn, mp) as path:
        # the dead client's session was evicted: its caps do not hold others up for session_timeout (60 s)
        assert str(pid) not in mds_sessions(ceph_cluster)
        assert os.path.isdir(path)
        second_id = mount_table()[os.path.realpath(mp)].id
        first.unmount()  # the dead object's cleanup must not touch the new mount (its ID may be the same)
        assert mount_table()[os.path.realpath(mp)].id == second_id
        assert answers(path)
    assert_gone(mp)


def _steal_fuse_fd(pid: int) -> int | None:
    """A copy of ``pid``'s /dev/fuse descriptor in this process (pidfd_getfd(2)), or None
    when the kernel or its policy does not allow it."""
    try:
        target = next(int(fd) for fd in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse")
        libc = ctypes.CDLL(None, use_errno=True)
        pidfd = os.pidfd_open(pid)
    except (StopIteration, OSError, AttributeError):
        return None
    try:
        fd = libc.syscall(438, pidfd, target, 0)  # SYS_pidfd_getfd (x86_64 and aarch64)
    finally:
        os.close(pidfd)
    return fd if fd >= 0 else None


def test_hung_dead_mount_does_not_hang_the_next_mount(conn, tmp_path):
    """A dead ceph-fuse whose /dev/fuse is still open elsewhere (Pacific's remount helper
    child, inheriting it, did this when ceph-fuse was killed during its start-up test)
    leaves a mount that answers nothing: stat() waits in D state for ever. Here this test
    holds the descriptor itself (pidfd_getfd)."""
    mp = tmp_path / "hung"
    first = CephFsMount(conn, mp)
    first.mount()
    fd = _steal_fuse_fd(first.proc.pid)
    if fd is None:
        first.unmount()
        missing("pidfd_getfd", "pidfd_getfd(2) is not allowed here: cannot hold a FUSE connection open")
    try:
        first.proc.proc.kill()
        first.proc.proc.wait()
        assert probe(str(mp), 0.5) is None  # hangs
        second = CephFsMount(conn, mp)
        second.PROBE_TIMEOUT_S = 0.5
        t0 = time.monotonic()
        with second as path:  # detached (its connection aborted, where fusectl is mounted), mounted anew
            assert time.monotonic() - t0 < 15
            assert answers(path)
    finally:
        os.close(fd)  # the last reference: the connection ends, stuck probe threads return
    first.unmount()
    assert_gone(mp)


# -- subvolumes (the real mgr volumes module) --------------------------------------------


@pytest.fixture(scope="module")
def volumes(ceph_cluster, conn):
    """The session cluster with the real mgr volumes module (swapped in on first use)."""
    ceph_cluster.enable_volumes()
    return ceph_cluster


def test_subvolume_snapshots(volumes, cli, conn, mnt):
    """Each ``ceph`` call costs ~0.4-1.5 s here (a Python CLI start plus the mgr): the
    test keeps to ~30 of them and leaves its subvolumes behind (uniquely named, in the
    throwaway session fs)."""
    group, sub, sub2 = f"g{uuid.uuid4().hex[:6]}", f"sv{uuid.uuid4().hex[:6]}", f"sv{uuid.uuid4().hex[:6]}"
    volumes.ceph("fs", "subvolumegroup", "create", "cephfs", group)
    volumes.ceph("fs", "subvolume", "create", "cephfs", sub, "--group_name", group)
    volumes.ceph("fs", "subvolume", "create", "cephfs", sub2)  # the default group (_nogroup)

    path = cli.subvolume_path(group, sub)
    assert path.startswith(f"/volumes/{group}/{sub}/")
    data = mnt / path.lstrip("/")
    (data / "f").write_text("v1")

    t0 = datetime.now(timezone.utc)
    snap = cli.subvolume_snap_create(group, sub, "daily1")
    t1 = datetime.now(timezone.utc)
    assert snap == FsSnap(name="daily1", path=path, created=snap.created)
    assert snap.created is not None and t0 - timedelta(seconds=2) <= snap.created <= t1 + timedelta(seconds=2)
    (data / "f").write_text("v2")
    (data / "new").write_text("new")

    # v2 subvolumes are snapshotted at their base dir: the data is under .snap/NAME/UUID
    snap_data = cli.subvolume_snap_path(group, sub, "daily1")
    assert snap_data == f"/volumes/{group}/{sub}/.snap/daily1/{path.rsplit('/', 1)[1]}"
    assert sorted(os.listdir(mnt / snap_data.lstrip("/"))) == ["f"]
    assert (mnt / snap_data.lstrip("/") / "f").read_text() == "v1"
    # the data dir's .snap holds it only as inherited (_daily1_INODE): no path snapshot there
    assert any(n.startswith("_daily1_") for n in os.listdir(data / ".snap"))
    assert cli.list_snaps(mnt, path) == []

    cli.subvolume_snap_create(group, sub, "daily2")
    listed = cli.subvolume_snap_list(group, sub)
    assert [s.name for s in listed] == ["daily1", "daily2"] and listed[0] == snap
    assert listed[1].created >= listed[0].created and listed[1].path == path

    # another subvolume (default group): its snapshots are its own
    other = cli.subvolume_snap_create(None, sub2, "other")
    assert other.path.startswith(f"/volumes/_nogroup/{sub2}/")

    cli.subvolume_snap_remove(group, sub, "daily1")
    assert cli.subvolume_snap_list(group, sub, times=False) == [FsSnap(name="daily2", path=path, created=None)]

    # the argv each method ran (what a leg's run record shows)
    ran = [c["argv"][c["argv"].index("fs"):] for c in cli.commands if "argv" in c]
    assert ["fs", "subvolume", "snapshot", "create", "cephfs", sub, "daily1", "--group_name", group] in ran
    assert ["fs", "subvolume", "snapshot", "ls", "cephfs", sub, "--group_name", group, "--format", "json"] in ran
    assert ["fs", "subvolume", "snapshot", "info", "cephfs", sub, "daily1", "--group_name", group, "--format", "json"] in ran
    assert ["fs", "subvolume", "snapshot", "rm", "cephfs", sub, "daily1", "--group_name", group] in ran
    assert ["fs", "subvolume", "getpath", "cephfs", sub, "--group_name", group] in ran
    assert ["fs", "subvolume", "snapshot", "create", "cephfs", sub2, "other"] in ran
    assert ["fs", "subvolume", "getpath", "cephfs", sub2] in ran
    head = cli.commands[-1]["argv"]
    assert head[:9] == ["ceph", "-c", conn.conf, "--id", "admin", "--keyring", conn.keyring, "--connect-timeout", "30"]

    # errors
    with pytest.raises(CephFsNotFound, match=rf"cannot remove snapshot 'daily1' of subvolume '{sub}' in group '{group}' "
                                             rf"of CephFS 'cephfs': .*does not exist"):
        cli.subvolume_snap_remove(group, sub, "daily1")
    # the mgr would take an existing name as success: refused before it is asked
    n = len(cli.commands)
    with pytest.raises(CephFsSnapshotExists, match=r"'daily2' of subvolume .*already exists"):
        cli.subvolume_snap_create(group, sub, "daily2")
    assert [c["argv"][c["argv"].index("snapshot") + 1] for c in cli.commands[n:]] == ["ls"]  # no create ran
    with pytest.raises(CephFsNotFound, match=r"subvolume 'nosuchsv' of CephFS 'cephfs'"):
        cli.subvolume_snap_list(None, "nosuchsv")
    with pytest.raises(CephFsNotFound, match=r"group 'nosuchgroup'"):
        cli.subvolume_path("nosuchgroup", sub)
    with pytest.raises(ValueError):
        cli.subvolume_snap_create(None, sub, "-rf")
    with pytest.raises(ValueError):
        cli.subvolume_snap_create(None, "a b", "s")


# -- labelled: captured output and pure parsers (no cluster) --------------------------------


def _failed(argv: list[str], stderr: list[str], code: int = 22) -> CommandResult:
    return CommandResult(argv=argv, returncode=code, outcome=Outcome.FAILED, duration_s=0.1, stdout="",
                         stderr_lines=stderr)


def test_volumes_module_missing_is_clear(monkeypatch):
    """Captured from Pacific with the stub ``volumes`` module (not run against a cluster:
    the session cluster may hold the real module by now)."""
    captured = ["no valid command found; 10 closest matches:", "fs authorize <filesystem> <entity> <caps>...",
                "fs dump [<epoch:int>]", "Error EINVAL: invalid command"]
    monkeypatch.setattr(cephfs.ex, "run", lambda argv, **kw: _failed(argv, captured))
    cli = CephFsCli(CephFsConn(conf="/x/ceph.conf"))
    with pytest.raises(CephFsVolumesUnavailable, match=r"subvolume 'sv1' of CephFS 'cephfs'.*volumes module"):
        cli.subvolume_snap_list(None, "sv1")
    assert cli.commands[0]["argv"][-6:] == ["snapshot", "ls", "cephfs", "sv1", "--format", "json"]


def test_parsers():
    assert parse_btime(b"1795886344.517968748") == datetime(2026, 11, 28, 17, 19, 4, 517968, tzinfo=timezone.utc)
    assert parse_btime("1795886344") == datetime(2026, 11, 28, 17, 19, 4, tzinfo=timezone.utc)
    assert parse_btime(b"junk") is None and parse_btime(None) is None
    # the mgr's created_at is its local time: read in the zone given
    assert parse_created_at("2026-11-28 17:19:48.738383") == datetime(2026, 11, 28, 17, 19, 48, 738383, tzinfo=timezone.utc)
    plus2 = timezone(timedelta(hours=2))
    assert parse_created_at("2026-11-28 19:19:48", plus2) == datetime(2026, 11, 28, 17, 19, 48, tzinfo=timezone.utc)
    assert parse_created_at("") is None and parse_created_at("yesterday") is None
    assert rel_path("/a//b/./c/") == "a/b/c" and rel_path("") == "" and rel_path("/") == ""
    assert fs_join("/", "") == "/" and fs_join("/x/y", "a/b") == "/x/y/a/b" and fs_join("", "a") == "/a"
    assert check_snap_name("nightly 1") == "nightly 1"
    for bad in ("", "_x", "a/b", ".", "..", "a\0b"):
        with pytest.raises(ValueError):
            check_snap_name(bad)


def test_mount_table_decodes_escapes(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        "42 27 0:39 / /mnt/with\\040space rw,nosuid,nodev,relatime - fuse.ceph-fuse ceph-fuse rw,user_id=0\n"
        "43 27 0:40 / /mnt/k rw shared:5 - ceph 127.0.0.1:6789:/sub/dir rw,name=admin\n")
    table = mount_table(str(info))
    assert table["/mnt/with space"] == cephfs.MountEntry(42, "0:39", "fuse.ceph-fuse", "ceph-fuse")
    assert table["/mnt/k"].source == "127.0.0.1:6789:/sub/dir"
