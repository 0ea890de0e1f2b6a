"""mergerfs pools: which branches a pool spans, whether each is really mounted, and
which disks hold a path.

mergerfs answers on its control file ``<pool>/.mergerfs``: the xattr
``user.mergerfs.srcmounts`` lists the branches (``a:b:c``, each possibly with
``=RW``/``=RO``/``=NC``). No command runs: these are filesystem calls.

A missing disk is the failure other tools miss: its mount point stays as an empty
directory, mergerfs keeps serving the other branches, and a parity sync would then
see every file on it as deleted. ``check_branches`` turns that into a clear error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class MergerfsError(OSError):
    pass


@dataclass(frozen=True)
class Branch:
    path: str
    mode: str  # RW, RO or NC (no create)


def branches(pool: str | os.PathLike) -> list[Branch]:
    """The pool's branches, read from the running mergerfs."""
    control = os.path.join(pool, ".mergerfs")
    try:
        raw = os.getxattr(control, "user.mergerfs.srcmounts").decode()
    except FileNotFoundError:
        raise MergerfsError(f"{pool} is not a mergerfs pool (no {control}): is the pool mounted?") from None
    except OSError as exc:
        raise MergerfsError(f"cannot read the branches of {pool}: {exc.strerror}") from None
    out = []
    for item in filter(None, raw.split(":")):
        path, _, mode = item.partition("=")
        out.append(Branch(os.path.normpath(path), mode or "RW"))
    return out


def is_mountpoint(path: str | os.PathLike) -> bool:
    """A mount point per /proc/self/mountinfo (``os.path.ismount`` misses bind mounts of the same device)."""
    target = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unoctal(fields[4]) == target:
                    return True
    except OSError:
        return os.path.ismount(target)
    return False


def _unoctal(s: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    if "\\" not in s:
        return s
    return s.encode().decode("unicode_escape").encode("latin-1").decode(errors="replace")


def check_branches(pool: str | os.PathLike | None, disks: dict[str, Path]) -> list[str]:
    """Problems (empty when healthy): every data disk must be a mounted directory,
    and, when a pool is given, the pool must be up and list every disk."""
    problems = []
    for name, path in disks.items():
        p = Path(path)
        if not p.is_dir():
            problems.append(f"disk {name}: {p} is missing")
        elif not is_mountpoint(p):
            problems.append(f"disk {name}: {p} is not mounted (an empty mount point: is the disk attached and mounted?)")
    if pool is not None:
        try:
            listed = {b.path for b in branches(pool)}
        except MergerfsError as exc:
            problems.append(str(exc))
        else:
            for name, path in disks.items():
                if os.path.normpath(path) not in listed:
                    problems.append(f"disk {name}: {path} is not a branch of the mergerfs pool {pool}")
    return problems


def map_paths(pool: str | os.PathLike, paths: list[str], disks: dict[str, Path]) -> dict[str, list[str]]:
    """For reporting: pool path -> the disk names whose branch holds it. A directory
    usually spans several disks; a path not on the pool maps to the disk containing it."""
    pool_s = os.path.normpath(pool)
    out: dict[str, list[str]] = {}
    for p in paths:
        p = os.path.normpath(p)
        if p == pool_s or p.startswith(pool_s + "/"):
            rel = os.path.relpath(p, pool_s)
            out[p] = [name for name, d in disks.items() if os.path.lexists(os.path.join(d, rel))]
        else:
            out[p] = [name for name, d in disks.items() if p == os.path.normpath(d) or p.startswith(os.path.normpath(d) + "/")]
    return out
