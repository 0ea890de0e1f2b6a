"""A real SnapRAID array behind a real mergerfs pool, built from tmpfs mounts.

``SnapraidArray.start()`` makes ``/tmp/drtool-snapraid-<PID>-<random>/`` (or uses
``root``) with data disks ``d1..dN`` and the parity disk ``p1``, each its own
``tmpfs`` (``size=<disk_mb>m``) so snapraid sees distinct devices without any
``--test-*`` flag, plus ``content/`` (on the root's filesystem) and ``pool/``. It
writes ``snapraid.conf`` (parity on p1; content files in ``content/`` and on d1,
which snapraid leaves out of the array by itself; ``blocksize 64``) and mounts
``mergerfs -o category.create=mfs,minfreespace=1M,allow_other,fsname=drtool-test``
over ``d1:..:dN`` at ``pool/`` (the default ``minfreespace=4G`` would make every
create fail with ENOSPC on these small disks), then waits until the pool's
``.mergerfs`` control file answers ``user.mergerfs.srcmounts``. The d1 content file
shows up in the pool as ``/snapraid.content``.

``stop()`` unmounts everything under the root (the fuse pool first with
``fusermount -u``, falling back to ``umount -l``; then ``umount -l`` deepest first)
and removes what it made; idempotent and registered with atexit. Directories of a
crashed session are recognised by the ``drtool-snapraid-<PID>-`` name and
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
TMP = Path("/tmp")
_OURS = re.compile(r"^drtool-snapraid-(\d+)-[0-9a-f]{6}$")  # drtool-snapraid-<PID>-<random>


class SnapraidUnavailable(RuntimeError):
    """The array cannot be built here: snapraid, mergerfs or fusermount missing, not
    root, /dev/fuse missing, or the kernel refused the tmpfs/fuse mounts."""


def _run(*argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {(res.stderr or res.stdout).strip()[-2000:]}")
    return res


def _mounts_under(root: Path) -> list[tuple[Path, bool]]:
    """(mount point, is fuse) of every mount at or below ``root``: fuse first, then deepest first."""
    found: list[tuple[Path, bool]] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
            fstype = fields[fields.index("-") + 1]
            if point == root or root in point.parents:
                found.append((point, fstype.startswith("fuse")))
    return sorted(found, key=lambda m: (not m[1], -len(m[0].parts)))


def _unmount_all(root: Path) -> None:
    for point, fuse in _mounts_under(root):
        if fuse and _run("fusermount", "-u", str(point), check=False).returncode == 0:
            continue
        _run("umount", "-l", str(point), check=False)


class SnapraidArray:
    """One throwaway SnapRAID array and its mergerfs pool; see the module docstring."""

    def __init__(self, root: Path | None = None, disks: int = 3, disk_mb: int = 64) -> None:
        missing = [t for t in ("snapraid", "mergerfs", "fusermount") if shutil.which(t) is None]
        if missing:
            raise SnapraidUnavailable(f"{', '.join(missing)} not on PATH (apt-get install snapraid mergerfs fuse)")
        if os.geteuid() != 0:
            raise SnapraidUnavailable("mounting tmpfs and mergerfs needs root")
        if not os.path.exists("/dev/fuse"):
            raise SnapraidUnavailable("/dev/fuse is missing")
        if disks < 1:
            raise ValueError("need at least one data disk")
        self._wanted_root, self.n_disks, self.disk_mb = root, disks, disk_mb
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
        """The parity disk (a tmpfs)."""
        return self._at("p1")

    @property
    def disks(self) -> dict[str, Path]:
        """Data disks by snapraid name: ``{"d1": <root>/d1, ...}``."""
        return {f"d{i}": self._at(f"d{i}") for i in range(1, self.n_disks + 1)}

    # -- lifecycle ------------------------------------------------------------- #

    def start(self) -> SnapraidArray:
        _clean_leftovers()
        if self._wanted_root is None:
            self.root = TMP / f"drtool-snapraid-{os.getpid()}-{secrets.token_hex(3)}"
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
                res = _run("mount", "-t", "tmpfs", "-o", f"size={self.disk_mb}m", "tmpfs", str(d), check=False)
                if res.returncode != 0:
                    raise SnapraidUnavailable(f"mount -t tmpfs {d} exited {res.returncode}: {res.stderr.strip()}")
            self._write_conf()
            self._mount_pool()
            return self
        except BaseException:
            self.stop()
            raise

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
        for name in ("pool", "p1", "content", *(f"d{i}" for i in range(1, self.n_disks + 1))):
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
        directory stays, as when a disk is not mounted. mergerfs keeps the branch."""
        path = self.disks.get(name) or (self.parity if name == "p1" else None)
        if path is None:
            raise KeyError(name)
        _run("umount", "-l", str(path))


def _clean_leftovers() -> None:
    """``/tmp/drtool-snapraid-<PID>-*`` of dead PIDs: unmount what is under them, remove."""
    for d in TMP.glob("drtool-snapraid-*"):
        m = _OURS.match(d.name)
        if m and d.is_dir() and not alive(int(m.group(1))):
            _unmount_all(d)
            shutil.rmtree(d, ignore_errors=True)
