"""A real SnapRAID array behind a real mergerfs pool, built from tmpfs or loop mounts.

``SnapraidArray.start()`` makes ``<tmp_dir>/drtool-snapraid-<PID>-<random>/``
(``tmp_dir`` defaults to ``/tmp``; or uses ``root``) with data disks ``d1..dN`` and
the parity disk ``p1``, each its own filesystem so snapraid sees distinct devices
without any ``--test-*`` flag, plus ``content/`` (on the root's filesystem) and
``pool/``. The disks are, by ``backing``:

* ``"tmpfs"`` (the default, what the tests use): a ``tmpfs`` of ``size=<disk_mb>m``,
  all in RAM;
* ``"loop"``: ext4 on a loop device, like a real disk: a sparse image file
  ``img/<name>.img`` of ``disk_mb`` under the root (so put the root on a filesystem
  with room to spare, e.g. ``tmp_dir=Path("/var/tmp")``), made with ``mkfs.ext4 -q
  -F -m 0 -E lazy_itable_init=0,lazy_journal_init=0`` (no background init writing
  while it is used) and mounted with ``mount -o loop``, which attaches the loop
  device with autoclear: it is released when the filesystem is unmounted.

It writes ``snapraid.conf`` (parity on p1; content files in ``content/`` and on d1,
which snapraid leaves out of the array by itself; ``blocksize 64``; ``lost+found``
of an ext4 disk excluded) and mounts
``mergerfs -o category.create=mfs,minfreespace=1M,allow_other,fsname=drtool-test``
over ``d1:..:dN`` at ``pool/`` (the default ``minfreespace=4G`` would make every
create fail with ENOSPC on these small disks), then waits until the pool's
``.mergerfs`` control file answers ``user.mergerfs.srcmounts``. The d1 content file
shows up in the pool as ``/snapraid.content``.

``stop()`` unmounts everything under the root, found in ``/proc/self/mountinfo``
(the fuse pool first with ``fusermount -u``, falling back to ``umount -l``; then
deepest first: a tmpfs with ``umount -l``, any other filesystem, i.e. a loop disk,
with plain ``umount``, retried for a moment while busy, so its loop device is
released at once, and ``umount -l`` as a last resort) and removes what it made,
images included; idempotent and registered with atexit. Directories of a crashed
session in ``tmp_dir`` are recognised by the ``drtool-snapraid-<PID>-`` name and
cleaned the same way at start once that PID is dead.

Snapraid exits 1 when ``scrub`` finds data errors (reported on stderr as
``Data error in file ...``), 2 from ``diff`` when there are differences, and 1
from ``sync`` when a whole disk's files vanished (``--force-empty`` overrides).
"""
from __future__ import annotations

import atexit
import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

from services.common import alive

__all__ = ["SnapraidArray", "SnapraidUnavailable"]

CMD_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 10.0
UMOUNT_RETRY_S = 2.0  # how long a busy loop disk gets before the lazy unmount
TMP = Path("/tmp")
BACKINGS = ("tmpfs", "loop")
MKFS = ("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0")
_OURS = re.compile(r"^drtool-snapraid-(\d+)-[0-9a-f]{6}$")  # drtool-snapraid-<PID>-<random>


class SnapraidUnavailable(RuntimeError):
    """The array cannot be built here: snapraid, mergerfs or fusermount (or, for loop
    disks, mkfs.ext4 or /dev/loop-control) missing, not root, /dev/fuse missing, or
    the kernel refused the tmpfs/loop/fuse mounts."""


def _run(*argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {(res.stderr or res.stdout).strip()[-2000:]}")
    return res


def _mounts_under(root: Path) -> list[tuple[Path, str]]:
    """(mount point, fs type) of every mount at or below ``root``: fuse first, then deepest first."""
    found: list[tuple[Path, str]] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
            fstype = fields[fields.index("-") + 1]
            if point == root or root in point.parents:
                found.append((point, fstype))
    return sorted(found, key=lambda m: (not m[1].startswith("fuse"), -len(m[0].parts)))


def _unmount_all(root: Path) -> None:
    for point, fstype in _mounts_under(root):
        if fstype.startswith("fuse"):
            if _run("fusermount", "-u", str(point), check=False).returncode == 0:
                continue
        elif fstype != "tmpfs":  # a loop disk: only a real unmount releases the loop device now
            deadline = time.monotonic() + UMOUNT_RETRY_S
            while _run("umount", str(point), check=False).returncode != 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            if not os.path.ismount(point):
                continue
        _run("umount", "-l", str(point), check=False)


class SnapraidArray:
    """One throwaway SnapRAID array and its mergerfs pool; see the module docstring."""

    def __init__(self, root: Path | None = None, disks: int = 3, disk_mb: int = 64,
                 backing: str = "tmpfs", tmp_dir: Path = TMP) -> None:
        if backing not in BACKINGS:
            raise ValueError(f"backing must be one of {', '.join(BACKINGS)}, not {backing!r}")
        if disks < 1:
            raise ValueError("need at least one data disk")
        tools = ("snapraid", "mergerfs", "fusermount", *(("mkfs.ext4",) if backing == "loop" else ()))
        missing = [t for t in tools if shutil.which(t) is None]
        if missing:
            raise SnapraidUnavailable(f"{', '.join(missing)} not on PATH (apt-get install snapraid mergerfs fuse e2fsprogs)")
        if os.geteuid() != 0:
            raise SnapraidUnavailable(f"mounting {backing} disks and mergerfs needs root")
        for dev in ("/dev/fuse", *(("/dev/loop-control",) if backing == "loop" else ())):
            if not os.path.exists(dev):
                raise SnapraidUnavailable(f"{dev} is missing")
        self._wanted_root, self.n_disks, self.disk_mb = root, disks, disk_mb
        self.backing, self.tmp_dir = backing, Path(tmp_dir).resolve()  # as mountinfo spells it
        self.root: Path | None = None
        self._own_root = False

    # -- layout ---------------------------------------------------------------- #

    def _at(self, name: str) -> Path:
        assert self.root is not None, "start() first"
        return self.root / name

    @property
    def conf(self) -> Path:
        return self._at("snapraid.conf")

    @property
    def pool(self) -> Path:
        """The mergerfs mount over all data disks."""
        return self._at("pool")

    @property
    def parity(self) -> Path:
        """The parity disk (a tmpfs or a loop disk, like the data disks)."""
        return self._at("p1")

    @property
    def disks(self) -> dict[str, Path]:
        """Data disks by snapraid name: ``{"d1": <root>/d1, ...}``."""
        return {f"d{i}": self._at(f"d{i}") for i in range(1, self.n_disks + 1)}

    # -- lifecycle ------------------------------------------------------------- #

    def start(self) -> SnapraidArray:
        _clean_leftovers(self.tmp_dir)
        if self._wanted_root is None:
            self.root = self.tmp_dir / f"drtool-snapraid-{os.getpid()}-{secrets.token_hex(3)}"
            self.root.mkdir(mode=0o755)
            self._own_root = True
        else:
            self._own_root = not self._wanted_root.exists()
            self.root = self._wanted_root.resolve()
            self.root.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            for d in (*self.disks.values(), self.parity, self._at("content"), self.pool):
                d.mkdir(exist_ok=True)
            for d in (*self.disks.values(), self.parity):
                self._mount_disk(d)
            self._write_conf()
            self._mount_pool()
            return self
        except BaseException:
            self.stop()
            raise

    def _mount_disk(self, d: Path) -> None:
        if self.backing == "tmpfs":
            argv = ("mount", "-t", "tmpfs", "-o", f"size={self.disk_mb}m", "tmpfs", str(d))
        else:
            img = self._at("img") / f"{d.name}.img"
            img.parent.mkdir(exist_ok=True)
            with open(img, "wb") as f:
                f.truncate(self.disk_mb << 20)  # sparse: takes space only as the disk fills
            _run(*MKFS, str(img), timeout=CMD_TIMEOUT_S)
            argv = ("mount", "-o", "loop", str(img), str(d))
        res = _run(*argv, check=False)
        if res.returncode != 0:
            raise SnapraidUnavailable(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")

    def _write_conf(self) -> None:
        lines = [f"parity {self.parity}/snapraid.parity",
                 f"content {self._at('content')}/snapraid.content",
                 f"content {self.disks['d1']}/snapraid.content"]
        lines += [f"data {name} {path}/" for name, path in self.disks.items()]
        lines += ["exclude *.unrecoverable", "exclude /lost+found/", "blocksize 64", ""]
        self.conf.write_text("\n".join(lines))

    def _mount_pool(self) -> None:
        branches = ":".join(str(p) for p in self.disks.values())
        res = _run("mergerfs", "-o", "category.create=mfs,minfreespace=1M,allow_other,fsname=drtool-test",
                   branches, str(self.pool), check=False)
        if res.returncode != 0:
            raise SnapraidUnavailable(f"mergerfs exited {res.returncode}: {(res.stderr or res.stdout).strip()}")
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                os.getxattr(self.pool / ".mergerfs", "user.mergerfs.srcmounts")
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise SnapraidUnavailable(f"mergerfs pool {self.pool} not answering: {e}") from e
                time.sleep(0.02)

    def stop(self) -> None:
        """Unmount the pool and every disk, remove what start() made. Idempotent."""
        atexit.unregister(self.stop)
        if self.root is None:
            return
        root, self.root = self.root, None
        _unmount_all(root)
        if self._own_root:
            shutil.rmtree(root, ignore_errors=True)
            return
        (root / "snapraid.conf").unlink(missing_ok=True)
        for name in ("pool", "p1", "content", "img", *(f"d{i}" for i in range(1, self.n_disks + 1))):
            shutil.rmtree(root / name, ignore_errors=True)

    def __enter__(self) -> SnapraidArray:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers --------------------------------------------------------------- #

    def write(self, rel: str, data: bytes) -> Path:
        """Write ``data`` at ``rel`` through the pool (mergerfs picks the disk); the pool path."""
        path = self.pool / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def branch_of(self, pool_path: Path | str) -> Path:
        """The real file on a data disk behind ``pool_path``."""
        return Path(os.fsdecode(os.getxattr(pool_path, "user.mergerfs.fullpath")))

    def snapraid(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """``snapraid -c <conf> *args`` (test-side convenience; drtool runs its own)."""
        return _run("snapraid", "-c", str(self.conf), *args, check=check, timeout=CMD_TIMEOUT_S)

    def corrupt_silently(self, pool_path: Path | str, offset: int = 10) -> Path:
        """Flip one byte of the real file, keeping size, atime and mtime (bit rot that only
        a scrub can see); returns the branch path."""
        real = self.branch_of(pool_path)
        st = real.stat()
        with open(real, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            if not byte:
                raise ValueError(f"{real} has no byte at offset {offset}")
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0xFF]))
        os.utime(real, ns=(st.st_atime_ns, st.st_mtime_ns))
        return real

    def unmount_disk(self, name: str) -> None:
        """Lazily unmount disk ``name`` (``d1``.. or ``p1``): its files are gone, its empty
        directory stays, as when a disk is not mounted. mergerfs keeps the branch. (A loop
        disk's device is released once nothing uses that filesystem any more.)"""
        path = self.disks.get(name) or (self.parity if name == "p1" else None)
        if path is None:
            raise KeyError(name)
        _run("umount", "-l", str(path))


def _clean_leftovers(tmp_dir: Path) -> None:
    """``<tmp_dir>/drtool-snapraid-<PID>-*`` of dead PIDs: unmount what is under them (loop
    disks included), remove them with their images."""
    for d in tmp_dir.glob("drtool-snapraid-*"):
        m = _OURS.match(d.name)
        if m and d.is_dir() and not alive(int(m.group(1))):
            _unmount_all(d)
            shutil.rmtree(d, ignore_errors=True)
