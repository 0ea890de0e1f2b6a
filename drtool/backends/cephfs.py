"""CephFS: snapshots of directories (through a ceph-fuse mount) and of subvolumes
(through the mgr ``volumes`` module, ``ceph fs subvolume …``). No engine logic here.

A CephFS snapshot is a directory under the magic ``.snap`` dir of the directory it
covers: ``mkdir DIR/.snap/NAME`` takes it (recursively, for the whole subtree),
``rmdir`` drops it, and ``DIR/.snap/NAME/`` is a read-only, point-in-time view of the
tree: what a restic backup reads. That is all plain file-system calls on a mount, so
``CephFsCli``'s path methods take the mount (``CephFsMount``: ceph-fuse, no kernel
client needed) and a path inside it. Facts they rely on (Pacific 16.2.15):

- ``.snap`` of a directory also lists the snapshots of its ancestors, as
  ``_NAME_INODE`` (INODE: the decimal inode number of the ancestor that was
  snapshotted). The MDS refuses snapshot names that begin with ``_`` (EINVAL), so an
  entry starting with ``_`` is always inherited: ``list_snaps`` skips them.
- A snapshot directory carries the virtual xattr ``ceph.snap.btime``
  (``SECONDS.NANOSECONDS``, the MDS's creation stamp); that is ``FsSnap.created``. Its
  ctime is the same stamp (the MDS sets the directory's ctime when it takes the
  snapshot), used when the xattr is missing (older clients); its mtime is the
  directory's mtime at that moment, not the snapshot's time.
- Removing a snapshot is immediate for clients; the MDS purges the data later.
- Reading a file in a fresh snapshot that a client changed after the snapshot was
  taken waits until the MDS has the file's snap flush, which progresses on the MDS
  tick (``mds_tick_interval``, 5 s): the first stat of such a file stalled up to ~5 s
  (several in a row: 6 files changed, 8-15 s), from this client or another; ~10 s
  after the snapshot there were no stalls. A backup that starts right after its
  snapshot of a busy tree may see that.

``CephFsMount`` runs ``ceph-fuse -f`` through ``drtool.exec.spawn`` (own process group,
dies with drtool) and waits until ``/proc/self/mountinfo`` lists the mount; on exit it
runs ``fusermount -u``, waits for ceph-fuse to flush and end (~1 s after snapshots),
and kills it otherwise. ceph-fuse started by root mounts with ``allow_other``: every
local user can reach the tree as far as its modes allow, hence the private (0700)
mountpoint. A ceph-fuse that died (killed drtool) leaves a dead mount ("Transport
endpoint is not connected") and an MDS session that keeps its caps until the MDS's
session_timeout (60 s; other clients needing those inodes wait): the next mount at
that place detaches the mount (``fusermount -u -z``; a mount that hangs instead is
probed with a timeout and its FUSE connection aborted where fusectl is mounted) and
evicts the session (``evict_dead_client``, best effort: it needs ``tell`` rights).

Subvolumes: ``ceph fs subvolume snapshot create|ls|info|rm`` and ``… getpath``/``info``
with ``--format json``, through ``drtool.exec.run``. The mgr reports
``created_at`` as a naive timestamp in the mgr host's local time zone
(``datetime.fromtimestamp``): ``CephFsCli(mgr_tz=…)`` says which zone that is (UTC by
default, as in Ceph's containers). ``snapshot create`` of an existing name succeeds
without doing anything, so ``subvolume_snap_create`` looks the name up first.
Subvolumes made by Pacific (v2) are snapshotted at their base dir
``/volumes/GROUP/SUBVOL`` while their data lives in ``…/SUBVOL/UUID`` (what
``getpath`` returns): the data of snapshot S is at ``/volumes/GROUP/SUBVOL/.snap/S/UUID``
(``subvolume_snap_path``), and the data dir's ``.snap`` shows S only as inherited.
Each ``ceph`` call is a process start (~0.4-0.5 s on an idle 2-core machine).
"""
from __future__ import annotations

import errno
import logging
import os
import posixpath
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import Any, Mapping

from .. import exec as ex
from ..errors import ToolError

log = logging.getLogger("drtool.cephfs")

CMD_TIMEOUT_S = 120.0  # ceph CLI calls (a volumes call waits for the mgr)
MOUNT_TIMEOUT_S = 60.0  # ceph-fuse: mon + mds session (also its client_mount_timeout)
ENV = {"LC_ALL": "C", "TZ": "UTC"}
SNAPDIR = ".snap"  # the client's client_snapdir (the default)
COMMAND_LOG_MAX = 500
INFO_WORKERS = 4  # concurrent `ceph fs subvolume snapshot info` calls when listing
SNAP_BTIME_XATTR = "ceph.snap.btime"
_NAME_BAD = re.compile(r"[/\x00]")
_CEPH_NAME_BAD = re.compile(r"[/\s\x00]")
_ERROR_LINE = re.compile(r"^Error (E[A-Z]+): ?(.*)$")
_LOG_PREFIX = re.compile(r"^\d{4}-\d\d-\d\dT\S+\s+[0-9a-f]+\s+-?\d+\s+")

# the live CephFsMounts of this process: mountpoint (real path) -> (the mount, the path in
# the fs it shows), so that FsSnap.path names directories from the fs root, and a mount
# object whose ceph-fuse died never unmounts a newer mount made at the same place
_mounts: dict[str, tuple["CephFsMount", str]] = {}
_mounts_lock = threading.Lock()


class CephFsError(ToolError):
    """A CephFS operation failed or was refused; ``stderr`` is the tool's error text
    (empty for file-system calls)."""


class CephFsNotFound(CephFsError):
    """The file system, directory, subvolume (group) or snapshot does not exist."""


class CephFsSnapshotExists(CephFsError):
    """A snapshot of that name already exists on that directory or subvolume."""


class CephFsMountError(CephFsError):
    """ceph-fuse could not mount (or unmount) the file system."""


class CephFsVolumesUnavailable(CephFsError):
    """The mgr ``volumes`` module does not answer (``ceph fs subvolume …`` unknown)."""


@dataclass(frozen=True)
class CephFsConn:
    """How the tools reach a CephFS: a ceph.conf path, a cephx user and its keyring,
    the file system's name."""

    conf: str  # ceph.conf path
    keyring: str | None = None
    client_id: str = "admin"  # --id
    fs_name: str = "cephfs"
    ceph: str = "ceph"
    ceph_fuse: str = "ceph-fuse"

    def args(self) -> list[str]:
        return ["-c", self.conf, "--id", self.client_id, *(["--keyring", self.keyring] if self.keyring else [])]


@dataclass(frozen=True)
class FsSnap:
    name: str
    path: str  # the snapshotted directory inside the fs, from its root: "/" or "/a/b"
    created: datetime | None  # aware, UTC


# -- pure helpers (tested without a cluster) -----------------------------------


def check_snap_name(name: str) -> str:
    """A snapshot name the MDS takes: not empty, no ``/`` or NUL, not ``.``/``..``, not
    starting with ``_`` (reserved for the inherited ``_NAME_INODE`` entries)."""
    if not isinstance(name, str) or not name or name in (".", "..") or _NAME_BAD.search(name) or name.startswith("_"):
        raise ValueError(f"bad CephFS snapshot name {name!r} (not empty, no '/', not '.'/'..', not starting with '_')")
    return name


def check_ceph_name(what: str, name: str) -> str:
    """A volume/subvolume/group/snapshot name safe to pass to the ``ceph`` CLI."""
    if not isinstance(name, str) or not name or _CEPH_NAME_BAD.search(name) or name.startswith(("-", "_")):
        raise ValueError(f"bad CephFS {what} name {name!r} (not empty, no '/' or blanks, not starting with '-' or '_')")
    return name


def rel_path(path: str) -> str:
    """A directory inside a mount, normalised and relative ("" is the mount's root);
    a leading ``/`` is taken as the mount's root; ``..`` and ``.snap`` are refused."""
    parts = [p for p in str(path).replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValueError(f"bad CephFS path {path!r}: '..' is not allowed")
    if SNAPDIR in parts:
        raise ValueError(f"bad CephFS path {path!r}: name the directory, not its {SNAPDIR} dir")
    return "/".join(parts)


def fs_join(root: str, rel: str) -> str:
    """``root`` (a path in the fs) + ``rel`` -> a normalised absolute fs path."""
    return posixpath.normpath("/" + "/".join(p for p in (root.strip("/"), rel.strip("/")) if p))


def is_inherited(entry: str) -> bool:
    """An entry of ``DIR/.snap`` that is an ancestor's snapshot (``_NAME_INODE``)."""
    return entry.startswith("_")


def parse_btime(raw: bytes | str | None) -> datetime | None:
    """``ceph.snap.btime`` ("1795886344.517968748") -> aware UTC (microseconds)."""
    if raw is None:
        return None
    text = raw.decode() if isinstance(raw, bytes) else raw
    m = re.fullmatch(r"\s*(\d+)(?:\.(\d{1,9}))?\s*\x00?", text)
    if not m:
        return None
    micros = int((m.group(2) or "0").ljust(9, "0")[:6])
    return datetime.fromtimestamp(int(m.group(1)), tz=timezone.utc).replace(microsecond=micros)


def parse_created_at(text: str | None, tz: tzinfo = timezone.utc) -> datetime | None:
    """The mgr's ``created_at`` ("2026-11-28 17:19:48.738383", the mgr's local time) ->
    aware UTC, reading it in ``tz``."""
    if not text:
        return None
    for fmt in ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S"):
        try:
            return datetime.strptime(text.strip(), fmt).replace(tzinfo=tz).astimezone(timezone.utc)
        except ValueError:
            continue
    return None


def ceph_error(result: ex.CommandResult) -> tuple[str, str]:
    """(code, message) from a failed ``ceph`` command: its ``Error ECODE: text`` line
    ("" code when it has none); the message is one line."""
    lines = [_LOG_PREFIX.sub("", ln.strip()) for ln in result.stderr_lines if ln.strip()]
    for line in reversed(lines):
        m = _ERROR_LINE.match(line)
        if m:
            return m.group(1), (m.group(2) or m.group(1)).strip()
    if any(ln.startswith("no valid command found") for ln in lines):
        return "EINVAL", "no valid command found"
    return "", " | ".join(lines[-3:]) or f"exit status {result.returncode}"


@dataclass(frozen=True)
class MountEntry:
    id: int  # mountinfo's mount ID (the kernel reuses them)
    dev: str  # MAJOR:MINOR; for FUSE, MINOR names the connection in /sys/fs/fuse/connections
    fstype: str
    source: str


def mount_table(path: str = "/proc/self/mountinfo") -> dict[str, MountEntry]:
    """Mount points -> MountEntry from mountinfo (octal escapes such as ``\\040``
    decoded; of stacked mounts on one point, the last (visible) one)."""
    out: dict[str, MountEntry] = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(rest) < 2 or not fields[0].isdigit():
            continue
        out[_unescape(fields[4])] = MountEntry(int(fields[0]), fields[2], rest[0], _unescape(rest[1]))
    return out


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def fuse_error_hint(log_text: str, conn: CephFsConn, root: str) -> str:
    """What a failed ceph-fuse's log means, and the fix."""
    t = log_text
    if "mdsmap subscription failed" in t or "no such filesystem" in t.lower():
        return (f"the cluster has no CephFS named {conn.fs_name!r} (ceph fs ls; set the fs name, or create the fs "
                f"with ceph fs volume create {conn.fs_name})")
    if "mount failed with (2)" in t:
        return f"the path {root!r} does not exist in CephFS {conn.fs_name!r} (create it, or mount its parent)"
    if "mount failed with (1)" in t or "mount failed with (13)" in t or "Operation not permitted" in t:
        return (f"client.{conn.client_id} may not mount {root!r} of {conn.fs_name!r}: its mds caps do not allow it "
                f"(ceph auth get client.{conn.client_id}; ceph fs authorize {conn.fs_name} client.{conn.client_id} {root} rw)")
    if "handle_auth_bad_method" in t or "keyring" in t or "failed to fetch mon config" in t or "(13) Permission denied" in t:
        return (f"cephx authentication of client.{conn.client_id} failed (check the keyring "
                f"{conn.keyring or '(default path)'} and the client id)")
    if "(110)" in t or "timed out" in t.lower():
        return f"the cluster did not answer in time (mons reachable per {conn.conf}? an MDS up: ceph fs status {conn.fs_name}?)"
    if "fuse: device not found" in t or "/dev/fuse" in t:
        return "FUSE is not available here (modprobe fuse; in a container: --device /dev/fuse and CAP_SYS_ADMIN)"
    return "see the ceph-fuse log above"


def _fusermount() -> list[str]:
    for name in ("fusermount", "fusermount3"):
        if shutil.which(name):
            return [name, "-u"]
    return ["umount"]


def _lazy(argv: list[str]) -> list[str]:
    return argv + (["-z"] if argv[0].startswith("fusermount") else ["-l"])


def probe(path: str, timeout: float = 5.0) -> int | None:
    """``stat(path)`` in a daemon thread -> 0, an errno, or None when it does not answer
    in ``timeout``: a FUSE mount whose daemon died while another process still holds its
    /dev/fuse descriptor answers nothing, and a caller would wait in D state for ever."""
    box: dict[str, int] = {}

    def go() -> None:
        try:
            os.stat(path)
            box["r"] = 0
        except OSError as e:
            box["r"] = e.errno or -1

    t = threading.Thread(target=go, name="cephfs-probe", daemon=True)
    t.start()
    t.join(timeout)
    return box.get("r")


FUSECTL = "/sys/fs/fuse/connections"


def abort_fuse(entry: MountEntry) -> bool:
    """Abort a FUSE connection (fusectl's ``abort``): its waiters get ENOTCONN. False when
    fusectl is not mounted (``mount -t fusectl none /sys/fs/fuse/connections``)."""
    minor = entry.dev.partition(":")[2]
    path = os.path.join(FUSECTL, minor, "abort")
    try:
        with open(path, "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def evict_dead_client(conn: CephFsConn, mount_point: str, pid: int | None = None, *, timeout: float = 30.0) -> bool:
    """Evict the MDS session of a ceph-fuse of this host that died at ``mount_point``
    (``pid``, when known): ``ceph tell mds.FS:0 client evict client_metadata.…=…``. A
    dead client's session keeps its caps until the MDS's session_timeout (60 s) runs
    out, and every other client that needs those inodes (the application's too) waits
    that long. Needs mds caps that allow ``tell`` (admin-like); False, with a warning,
    when it fails: the session then times out by itself."""
    filters = [f"client_metadata.mount_point={mount_point}", f"client_metadata.hostname={socket.gethostname()}"]
    if pid is not None:
        filters.append(f"client_metadata.pid={pid}")
    argv = [conn.ceph, *conn.args(), "--connect-timeout", "10", "tell", f"mds.{conn.fs_name}:0", "client", "evict", *filters]
    try:
        res = ex.run(argv, tool="ceph", env=ENV, check=False, timeout=timeout)
    except ex.CommandError as e:
        log.warning("could not evict the dead CephFS client at %s: %s", mount_point, e)
        return False
    if not res.ok:
        log.warning("could not evict the dead CephFS client at %s (its session times out by itself; other clients "
                    "may wait on its caps until then): %s", mount_point, ceph_error(res)[1])
    return res.ok


def _abs_mountpoint(path: Path) -> str:
    """The mountpoint as mountinfo spells it, without stat()ing it (a dead mount would
    hang a realpath() of the mountpoint itself): the parent's real path + the name."""
    path = Path(os.path.abspath(path))
    return os.path.join(os.path.realpath(path.parent), path.name)


# -- the mount ---------------------------------------------------------------


class CephFsMount:
    """``with CephFsMount(conn, mountpoint, root="/sub") as path:`` — the file system
    (or its sub-path ``root``) mounted by ceph-fuse at ``mountpoint`` (made 0700 when
    missing, and removed again; an existing one must be an empty directory that is not
    a mount, or a dead FUSE mount, which is detached first). ``config`` adds ceph-fuse
    options (``{"client_oc": "false"}`` -> ``--client_oc false``) over ``DEFAULT_CONFIG``.
    ``log_tail()`` reads ceph-fuse's output; ``unmount()`` may be called early and is
    idempotent; ``forced`` tells that the last unmount had to detach a busy mount lazily
    or kill ceph-fuse.

    ``DEFAULT_CONFIG`` sets ``client_try_dentry_invalidate``: without it, Pacific's
    ceph-fuse trims the kernel's dentries by remounting, and tests that at start with a
    ``sh -c 'mount -i -o remount MP'`` child that inherits ceph-fuse's /dev/fuse
    descriptor; a ceph-fuse killed while that runs leaves a mount that hangs every
    caller (the child holds the connection open and waits on the mount itself)."""

    BUSY_RETRY_S = 2.0  # a busy mount: retry ``fusermount -u`` this long, then detach lazily
    UNMOUNT_GRACE_S = 10.0  # ceph-fuse's flush and session close after the unmount (~1 s after snapshots)
    PROBE_TIMEOUT_S = 5.0  # a mountpoint that does not answer stat() in this long is hung
    DEFAULT_CONFIG = {"client_try_dentry_invalidate": "true"}

    def __init__(self, conn: CephFsConn, mountpoint: Path, *, root: str = "/", timeout: float = MOUNT_TIMEOUT_S,
                 config: Mapping[str, str] | None = None) -> None:
        self.conn, self.mountpoint, self.timeout = conn, Path(mountpoint), timeout
        self.root = fs_join("/", rel_path(root))
        self.config = {**self.DEFAULT_CONFIG, **(config or {})}
        for key in self.config:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", key):
                raise ValueError(f"bad ceph-fuse option name {key!r}")
        self.proc: ex.Spawned | None = None
        self.forced = False
        self._made_dir = False
        self._logdir: str | None = None
        self._mp: str | None = None  # the mountpoint's real path while mounted
        self._mount_id: int | None = None

    def __enter__(self) -> Path:
        return self.mount()

    def __exit__(self, *exc: object) -> None:
        self.unmount()

    def log_tail(self, n: int = 15) -> str:
        return self.proc.log_tail(n) if self.proc is not None else "(no log)"

    def _where(self) -> str:
        return f"CephFS {self.conn.fs_name!r}{'' if self.root == '/' else ' path ' + self.root} at {self.mountpoint}"

    def argv(self, mp: str) -> list[str]:
        return [self.conn.ceph_fuse, "-f", *self.conn.args(), "--client_fs", self.conn.fs_name,
                "--client_mount_timeout", str(max(1, int(self.timeout))),
                *[a for k, v in self.config.items() for a in (f"--{k}", str(v))], "-r", self.root, mp]

    def mount(self) -> Path:
        if self.proc is not None:
            raise CephFsMountError(f"{self._where()} is already mounted by this object")
        mp = _abs_mountpoint(self.mountpoint)
        self._prepare_mountpoint(mp)
        self._logdir = tempfile.mkdtemp(prefix="drtool-ceph-fuse-")
        try:
            self.proc = ex.spawn(self.argv(mp), log_path=os.path.join(self._logdir, "ceph-fuse.log"), env=ENV)
            self._mount_id = self._wait_mounted(mp)
        except BaseException:
            self._cleanup_failed(mp)
            raise
        self._mp = mp
        with _mounts_lock:
            _mounts[mp] = (self, self.root)
        return self.mountpoint

    def _prepare_mountpoint(self, mp: str) -> None:
        entry = mount_table().get(mp)
        if entry is not None:
            state = probe(mp, self.PROBE_TIMEOUT_S) if entry.fstype.startswith("fuse") else 0
            if state not in (errno.ENOTCONN, None):
                raise CephFsMountError(f"cannot mount {self._where()}: {mp} is already a mount point ({entry.fstype} "
                                       f"from {entry.source}); unmount it (fusermount -u {mp}) or use another mountpoint")
            self._detach_dead(mp, entry, hung=state is None)
        try:
            st = os.stat(mp)
        except FileNotFoundError:
            Path(mp).mkdir(mode=0o700, parents=True)
            self._made_dir = True
            return
        except OSError as e:
            raise CephFsMountError(f"cannot mount {self._where()}: {mp}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise CephFsMountError(f"cannot mount {self._where()}: {mp} is not a directory")
        if os.listdir(mp):
            raise CephFsMountError(f"cannot mount {self._where()}: {mp} is not empty (a mount would hide its files); "
                                   f"use an empty private directory")

    def _detach_dead(self, mp: str, entry: MountEntry, *, hung: bool) -> None:
        """A FUSE mount whose process died (a killed drtool's ceph-fuse): ENOTCONN, or no
        answer at all while some process still holds its /dev/fuse. Abort its connection
        when fusectl allows, then detach it."""
        log.warning("%s: a dead FUSE mount (%s, dev %s%s); detaching it", mp, entry.source, entry.dev,
                    ", hung" if hung else "")
        aborted = abort_fuse(entry) if hung else False
        if hung and not aborted:
            log.warning("%s hangs and fusectl is not mounted: processes waiting on it stay stuck until whatever holds "
                        "its /dev/fuse exits (mount -t fusectl none %s; echo 1 > %s/%s/abort)",
                        mp, FUSECTL, FUSECTL, entry.dev.partition(":")[2])
        res = self._fusermount(mp, lazy=True)
        if mount_table().get(mp) == entry:
            raise CephFsMountError(f"cannot mount {self._where()}: {mp} is a dead FUSE mount and could not be "
                                   f"detached ({res.stderr_tail(2) or 'exit ' + str(res.returncode)}); "
                                   f"run fusermount -u -z {mp}")
        if entry.source == "ceph-fuse":
            evict_dead_client(self.conn, mp)

    def _wait_mounted(self, mp: str) -> int:
        """Poll mountinfo until ceph-fuse's mount shows up -> its mount ID."""
        assert self.proc is not None
        deadline = time.monotonic() + self.timeout + 5  # ceph-fuse gives up itself after ``timeout``
        delay = 0.005
        while True:
            entry = mount_table().get(mp)
            if entry is not None and entry.fstype.startswith("fuse"):
                return entry.id
            if not self.proc.running():
                tail = self.proc.log_tail(8)
                raise CephFsMountError(f"cannot mount {self._where()}: ceph-fuse exited "
                                       f"{self.proc.proc.returncode}: {fuse_error_hint(tail, self.conn, self.root)}; "
                                       f"ceph-fuse log: {_one_line(tail)}")
            if time.monotonic() > deadline:
                tail = self.proc.log_tail(8)
                raise CephFsMountError(f"cannot mount {self._where()}: not mounted after {self.timeout:.0f}s "
                                       f"({fuse_error_hint(tail + ' timed out', self.conn, self.root)}); "
                                       f"ceph-fuse log: {_one_line(tail)}")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _cleanup_failed(self, mp: str) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.stop(grace=2)  # the whole process group
            entry = mount_table().get(mp)
            if entry is not None and entry.fstype == "fuse.ceph-fuse":  # it mounted just as the wait gave up
                self._fusermount(mp, lazy=True)
        self._remove_dirs()

    def _fusermount(self, mp: str, *, lazy: bool = False) -> ex.CommandResult:
        argv = _fusermount()
        return ex.run((_lazy(argv) if lazy else argv) + [mp], tool=argv[0], env=ENV, check=False, timeout=30)

    def _ours(self) -> MountEntry | None:
        """Our mount, while it is still on the mountpoint (not a newer one made there
        after our ceph-fuse died: mount IDs are reused, the registry tells)."""
        entry = mount_table().get(self._mp or "")
        with _mounts_lock:
            owner = _mounts.get(self._mp or "", (None, ""))[0]
        return entry if entry is not None and entry.id == self._mount_id and owner is self else None

    def unmount(self) -> None:
        """``fusermount -u``; a busy mount is retried for ``BUSY_RETRY_S``, then detached
        lazily (``-z``); ceph-fuse gets ``UNMOUNT_GRACE_S`` to flush and end, then its
        process group is killed (and a mount it left behind detached). Leaves no process
        and no mount."""
        proc = self.proc
        if proc is None:
            return
        mp = self._mp or _abs_mountpoint(self.mountpoint)
        self.forced = False
        refused = ""
        died = not proc.running()
        try:
            if died:  # end helpers of its group that may hold /dev/fuse
                proc.stop(grace=1)
            deadline = time.monotonic() + self.BUSY_RETRY_S
            while proc.running() and self._ours():
                res = self._fusermount(mp)
                if res.ok or not self._ours():
                    break
                refused = res.stderr_tail(2) or f"exit {res.returncode}"
                if time.monotonic() > deadline:
                    log.warning("%s: unmount refused (%s); detaching it lazily", mp, refused)
                    self._fusermount(mp, lazy=True)
                    self.forced = True
                    break
                time.sleep(0.1)
            grace = time.monotonic() + self.UNMOUNT_GRACE_S
            while proc.running() and time.monotonic() < grace:
                time.sleep(0.01)
            killed = proc.running()
            if killed:
                log.warning("%s: ceph-fuse (pid %d) still running %.0fs after the unmount; killing it",
                            mp, proc.pid, self.UNMOUNT_GRACE_S)
                self.forced = True
            proc.stop(grace=2)
            if died or killed:  # its MDS session would hold its caps until session_timeout
                evict_dead_client(self.conn, mp, proc.pid)
            entry = self._ours()
            if entry is not None:  # ceph-fuse died before it unmounted: a dead mount
                if probe(mp, self.PROBE_TIMEOUT_S) is None:
                    abort_fuse(entry)
                self._fusermount(mp, lazy=True)
                self.forced = True
            if self._ours():
                raise CephFsMountError(f"could not unmount {self._where()} ({refused or 'still mounted'}); "
                                       f"run fusermount -u -z {mp}")
        finally:
            self.proc = None
            with _mounts_lock:
                if _mounts.get(mp, (None, ""))[0] is self:
                    del _mounts[mp]
            self._mp = self._mount_id = None
            self._remove_dirs()

    def _remove_dirs(self) -> None:
        if self._logdir is not None:
            shutil.rmtree(self._logdir, ignore_errors=True)
            self._logdir = None
        if self._made_dir:
            try:
                self.mountpoint.rmdir()
            except OSError:
                pass
            self._made_dir = False


def _one_line(text: str) -> str:
    """ceph-fuse's log tail, one line, without its start-up chatter."""
    lines = [_LOG_PREFIX.sub("", ln.strip()) for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if "init, newargv" not in ln and not ln.endswith("starting ceph client")]
    return " | ".join(lines[-4:]) or "(empty)"


def _mount_root(mount: Path) -> tuple[str, str]:
    """(mountpoint, fs path of its root) of the CephFsMount holding ``mount`` (or a
    kernel CephFS mount: its source ``MONS:/PATH``); "/" when unknown."""
    real = os.path.realpath(mount)
    at = real
    with _mounts_lock:
        roots = {mp: root for mp, (_, root) in _mounts.items()}
    table = None
    while True:
        if at in roots:
            return at, fs_join(roots[at], os.path.relpath(real, at) if real != at else "")
        if table is None:
            table = mount_table()
        if at in table and table[at].fstype == "ceph" and ":" in table[at].source:
            sub = table[at].source.rsplit(":", 1)[1] or "/"
            return at, fs_join(sub, os.path.relpath(real, at) if real != at else "")
        parent = os.path.dirname(at)
        if parent == at:
            return real, "/"
        at = parent


# -- the CLI / file-system wrapper ---------------------------------------------


class CephFsCli:
    """Snapshots of one CephFS (``CephFsConn``): of any directory through a mount,
    of subvolumes through ``ceph fs subvolume``. ``commands`` keeps the last 500
    commands' exec log entries (masked argv, code, duration) and file-system calls
    (``{"op": "mkdir"|"rmdir", "path", "errno", "duration_s"}``)."""

    def __init__(self, conn: CephFsConn, *, timeout: float = CMD_TIMEOUT_S, mgr_tz: tzinfo = timezone.utc) -> None:
        self.conn, self.timeout, self.mgr_tz = conn, timeout, mgr_tz
        self.commands: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def _log(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.commands.append(entry)
            if len(self.commands) > COMMAND_LOG_MAX:
                del self.commands[:-COMMAND_LOG_MAX]

    # -- path snapshots (through a mount)
    def _dir(self, mount: Path, path: str) -> tuple[Path, str]:
        """(local directory, its fs path) for ``path`` inside ``mount``; it must exist
        and be on CephFS."""
        rel = rel_path(path)
        local = Path(mount) / rel if rel else Path(mount)
        fs_path = fs_join(_mount_root(Path(mount))[1], rel)
        where = f"{fs_path} in CephFS {self.conn.fs_name!r} (mounted at {mount})"
        try:
            if not local.is_dir():
                if local.exists():
                    raise CephFsError(f"{where} is not a directory: only directories have snapshots")
                raise CephFsNotFound(f"no directory {where}: create it, or check the path and the mount")
            os.stat(local / SNAPDIR)
        except FileNotFoundError:
            raise CephFsError(f"{local} has no {SNAPDIR} directory: {mount} is not a CephFS mount "
                              f"(mount it with CephFsMount)") from None
        except OSError as e:
            raise CephFsError(f"cannot reach {where}: {e.strerror} (is the mount alive? remount it)") from None
        return local, fs_path

    def _fsop(self, op: str, path: Path) -> OSError | None:
        start = time.monotonic()
        err: OSError | None = None
        try:
            (os.mkdir if op == "mkdir" else os.rmdir)(path)
        except OSError as e:
            err = e
        self._log({"op": op, "path": str(path), "errno": err.errno if err else 0,
                   "duration_s": round(time.monotonic() - start, 3)})
        return err

    def _snap_of(self, snapdir: Path, name: str, fs_path: str) -> FsSnap:
        return FsSnap(name=name, path=fs_path, created=snap_created(snapdir / name))

    def snap_create(self, mount: Path, path: str, name: str) -> FsSnap:
        """Snapshot the directory ``path`` (inside ``mount``) and everything below it:
        ``mkdir PATH/.snap/NAME``."""
        check_snap_name(name)
        local, fs_path = self._dir(mount, path)
        what = f"snapshot {name!r} of {fs_path} in CephFS {self.conn.fs_name!r}"
        err = self._fsop("mkdir", local / SNAPDIR / name)
        if err is None:
            return self._snap_of(local / SNAPDIR, name, fs_path)
        code = err.errno
        if code == errno.EEXIST:
            raise CephFsSnapshotExists(f"cannot create {what}: it already exists (use another name, or remove it "
                                       f"first)")
        if code in (errno.EPERM, errno.EACCES):
            raise CephFsError(f"cannot create {what}: {err.strerror}; either snapshots are disabled on the fs "
                              f"(ceph fs set {self.conn.fs_name} allow_new_snaps true) or client.{self.conn.client_id} "
                              f"lacks the 's' flag in its mds caps (ceph fs authorize {self.conn.fs_name} "
                              f"client.{self.conn.client_id} {fs_path} rws)")
        if code == errno.EMLINK:
            raise CephFsError(f"cannot create {what}: too many snapshots on that directory (the MDS's "
                              f"mds_max_snaps_per_dir, 100 by default); remove old ones first")
        if code == errno.EINVAL:
            raise CephFsError(f"cannot create {what}: the MDS refused the name (EINVAL)")
        raise CephFsError(f"cannot create {what}: {err.strerror} (errno {code})")

    def list_snaps(self, mount: Path, path: str) -> list[FsSnap]:
        """The snapshots taken of directory ``path`` itself (not those inherited from its
        ancestors), oldest first."""
        local, fs_path = self._dir(mount, path)
        snapdir = local / SNAPDIR
        try:
            names = [n for n in os.listdir(snapdir) if not is_inherited(n)]
        except OSError as e:
            raise CephFsError(f"cannot list the snapshots of {fs_path} in CephFS {self.conn.fs_name!r}: "
                              f"{e.strerror}") from None
        snaps = []
        for n in names:
            try:
                snaps.append(self._snap_of(snapdir, n, fs_path))
            except FileNotFoundError:  # removed meanwhile
                continue
        epoch = datetime.min.replace(tzinfo=timezone.utc)
        return sorted(snaps, key=lambda s: (s.created or epoch, s.name))

    def snap_remove(self, mount: Path, path: str, name: str) -> None:
        """``rmdir PATH/.snap/NAME`` (the MDS purges the data in the background)."""
        check_snap_name(name)
        local, fs_path = self._dir(mount, path)
        what = f"snapshot {name!r} of {fs_path} in CephFS {self.conn.fs_name!r}"
        err = self._fsop("rmdir", local / SNAPDIR / name)
        if err is None:
            return
        if err.errno == errno.ENOENT:
            raise CephFsNotFound(f"cannot remove {what}: no such snapshot (list_snaps shows what exists)")
        if err.errno in (errno.EPERM, errno.EACCES):
            raise CephFsError(f"cannot remove {what}: {err.strerror}; client.{self.conn.client_id} needs the 's' "
                              f"flag in its mds caps (ceph fs authorize {self.conn.fs_name} "
                              f"client.{self.conn.client_id} {fs_path} rws)")
        raise CephFsError(f"cannot remove {what}: {err.strerror} (errno {err.errno})")

    def snap_path(self, mount: Path, path: str, name: str) -> Path:
        """``MOUNT/PATH/.snap/NAME``: the read-only point-in-time view of the tree (what a
        backup reads). The snapshot must exist."""
        check_snap_name(name)
        local, fs_path = self._dir(mount, path)
        p = local / SNAPDIR / name
        if not p.is_dir():
            raise CephFsNotFound(f"no snapshot {name!r} of {fs_path} in CephFS {self.conn.fs_name!r} "
                                 f"(list_snaps shows what exists)")
        return p

    # -- subvolumes (mgr volumes module)
    def argv(self, *args: str) -> list[str]:
        return [self.conn.ceph, *self.conn.args(), "--connect-timeout", "30", *args]

    def _ceph(self, *args: str, what: str, parse: str | None = None) -> ex.CommandResult:
        res = ex.run(self.argv(*args), tool="ceph", env=ENV, check=False, timeout=self.timeout, parse=parse)
        self._log(res.log_entry())
        if res.ok:
            return res
        code, msg = ceph_error(res)
        if any("no valid command found" in ln for ln in res.stderr_lines):
            raise CephFsVolumesUnavailable(
                f"{what}: the mgr does not know 'ceph fs subvolume' (its volumes module is not loaded: "
                f"ceph mgr module ls; ceph mgr services; a Pacific+ mgr loads it always)", msg)
        if code == "ENOENT":
            raise CephFsNotFound(f"{what}: {msg}", msg)
        if code == "EEXIST":
            raise CephFsSnapshotExists(f"{what}: {msg} (use another name, or remove it first)", msg)
        if code in ("EPERM", "EACCES"):
            raise CephFsError(f"{what}: {msg} (client.{self.conn.client_id} needs mgr caps 'allow rw' and mon "
                              f"caps 'allow r' for fs subvolume commands)", msg)
        if code == "ENOTEMPTY":
            raise CephFsError(f"{what}: {msg}", msg)
        raise CephFsError(f"{what}: {msg or code}", msg)

    def _sub_args(self, group: str | None, subvolume: str) -> tuple[list[str], str]:
        check_ceph_name("subvolume", subvolume)
        if group is not None:
            check_ceph_name("subvolume group", group)
        where = f"subvolume {subvolume!r}{'' if group is None else ' in group ' + repr(group)} of CephFS {self.conn.fs_name!r}"
        return (["--group_name", group] if group is not None else []), where

    def subvolume_path(self, group: str | None, subvolume: str) -> str:
        """``ceph fs subvolume getpath`` -> the subvolume's data dir in the fs
        (``/volumes/GROUP/SUBVOL/UUID``)."""
        gargs, where = self._sub_args(group, subvolume)
        res = self._ceph("fs", "subvolume", "getpath", self.conn.fs_name, subvolume, *gargs,
                         what=f"cannot get the path of {where}")
        return str(res.stdout or "").strip()

    def subvolume_info(self, group: str | None, subvolume: str) -> dict[str, Any]:
        """``ceph fs subvolume info --format json`` (path, features, bytes_used, …)."""
        gargs, where = self._sub_args(group, subvolume)
        return self._ceph("fs", "subvolume", "info", self.conn.fs_name, subvolume, *gargs, "--format", "json",
                          what=f"cannot read {where}", parse="json").parsed or {}

    def _subvol_snap(self, group: str | None, subvolume: str, name: str, path: str, where: str) -> FsSnap:
        gargs = ["--group_name", group] if group is not None else []
        info = self._ceph("fs", "subvolume", "snapshot", "info", self.conn.fs_name, subvolume, name, *gargs,
                          "--format", "json", what=f"cannot read snapshot {name!r} of {where}", parse="json").parsed or {}
        return FsSnap(name=name, path=path, created=parse_created_at(info.get("created_at"), self.mgr_tz))

    def subvolume_snap_create(self, group: str | None, subvolume: str, name: str) -> FsSnap:
        """``ceph fs subvolume snapshot create FS SUBVOL NAME [--group_name G]``; the
        FsSnap's ``path`` is the subvolume's data dir (``subvolume_path``). The mgr takes
        an existing name as success (Pacific's ``mksnap``: "do nothing if it already
        exists"), which would pass an old snapshot off as new: the name is looked up
        first and refused (``CephFsSnapshotExists``)."""
        gargs, where = self._sub_args(group, subvolume)
        check_ceph_name("snapshot", name)
        if name in self._subvol_snap_names(group, subvolume, where):
            raise CephFsSnapshotExists(f"cannot create snapshot {name!r} of {where}: it already exists (use another "
                                       f"name, or remove it first)")
        self._ceph("fs", "subvolume", "snapshot", "create", self.conn.fs_name, subvolume, name, *gargs,
                   what=f"cannot create snapshot {name!r} of {where}")
        return self._subvol_snap(group, subvolume, name, self.subvolume_path(group, subvolume), where)

    def subvolume_snap_list(self, group: str | None, subvolume: str, *, times: bool = True) -> list[FsSnap]:
        """``ceph fs subvolume snapshot ls --format json`` (the mgr skips inherited
        snapshots), oldest first. ``created`` needs one ``snapshot info`` per snapshot
        (a ``ceph`` process each, ~0.4 s; run ``INFO_WORKERS`` at a time: the CLI's batch
        mode on stdin exits 0 and prints nothing for a failed command, so its output
        cannot be attributed); ``times=False`` skips them (``created`` None, name order)."""
        gargs, where = self._sub_args(group, subvolume)
        names = self._subvol_snap_names(group, subvolume, where)
        if not names:
            return []
        path = self.subvolume_path(group, subvolume)
        if not times:
            return [FsSnap(name=n, path=path, created=None) for n in sorted(names)]
        with ThreadPoolExecutor(max_workers=min(INFO_WORKERS, len(names)), thread_name_prefix="cephfs-info") as pool:
            snaps = list(pool.map(lambda n: self._subvol_snap(group, subvolume, n, path, where), names))
        epoch = datetime.min.replace(tzinfo=timezone.utc)
        return sorted(snaps, key=lambda s: (s.created or epoch, s.name))

    def _subvol_snap_names(self, group: str | None, subvolume: str, where: str) -> list[str]:
        gargs = ["--group_name", group] if group is not None else []
        doc = self._ceph("fs", "subvolume", "snapshot", "ls", self.conn.fs_name, subvolume, *gargs, "--format", "json",
                         what=f"cannot list the snapshots of {where}", parse="json").parsed or []
        return [str(d["name"]) for d in doc if isinstance(d, dict) and "name" in d]

    def subvolume_snap_remove(self, group: str | None, subvolume: str, name: str) -> None:
        """``ceph fs subvolume snapshot rm FS SUBVOL NAME [--group_name G]`` (a snapshot
        with pending clones is refused by the mgr)."""
        gargs, where = self._sub_args(group, subvolume)
        check_ceph_name("snapshot", name)
        self._ceph("fs", "subvolume", "snapshot", "rm", self.conn.fs_name, subvolume, name, *gargs,
                   what=f"cannot remove snapshot {name!r} of {where}")

    def subvolume_snap_path(self, group: str | None, subvolume: str, name: str) -> str:
        """Where snapshot ``name``'s data is in the fs (read it through a mount of the fs
        root): ``/volumes/G/SUBVOL/.snap/NAME/UUID`` for v2 subvolumes (snapshotted at
        their base dir; the ``snapshot-retention`` feature), ``DATA/.snap/NAME`` for v1."""
        check_ceph_name("snapshot", name)
        info = self.subvolume_info(group, subvolume)
        data = str(info.get("path") or self.subvolume_path(group, subvolume)).rstrip("/")
        if "snapshot-retention" in (info.get("features") or []):
            base, leaf = posixpath.split(data)
            return f"{base}/{SNAPDIR}/{name}/{leaf}"
        return f"{data}/{SNAPDIR}/{name}"


def snap_created(snap_dir: Path) -> datetime | None:
    """A snapshot dir's creation time: ``ceph.snap.btime``, else its ctime (which the
    MDS sets to the same stamp)."""
    try:
        return parse_btime(os.getxattr(snap_dir, SNAP_BTIME_XATTR))
    except FileNotFoundError:
        raise
    except OSError:
        pass
    st = os.stat(snap_dir)
    return datetime.fromtimestamp(st.st_ctime_ns // 1000 / 1e6, tz=timezone.utc)
