"""Source manifests recorded at backup time, for ``sample`` verification (and, with
``verify.manifest: full``, a BLAKE3 of every file for full tree-compares).

Before a backup, drtool picks a uniform random sample of regular files under the
source paths (reservoir sampling: one pass, constant memory) and records each
file's size, mtime and BLAKE3. After the backup it re-stats them and drops any
that changed while the backup ran, so the manifest describes exactly what the
recovery point should contain. ``sample`` verification restores those files
from the point and compares hashes.
"""
from __future__ import annotations

import gzip
import json
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import blake3

from .errors import SourceError


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    mtime_ns: int
    blake3: str

    def to_dict(self) -> dict:
        return asdict(self)


CHUNK = 1 << 20


def hash_file(path: str, chunk: int = CHUNK) -> str:
    """BLAKE3 of a file, read in ``chunk``-sized pieces (1 MiB by default): constant
    memory (mmap would count the whole file in drtool's RSS) and fast enough to run
    beside a backup."""
    h = blake3.blake3()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def walk_files(paths: Iterable[str]) -> Iterator[os.DirEntry | str]:
    """Regular files under ``paths`` (symlinks not followed)."""
    for root in paths:
        if os.path.isfile(root) and not os.path.islink(root):
            yield root
            continue
        stack = [root]
        while stack:
            d = stack.pop()
            try:
                with os.scandir(d) as it:
                    for e in it:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        elif e.is_file(follow_symlinks=False):
                            yield e
            except (PermissionError, FileNotFoundError):
                continue


def check_source(paths: list[str]) -> None:
    """A missing or empty source is a failure, never an empty success."""
    if not paths:
        raise SourceError("the policy names no source path")
    for p in paths:
        if not os.path.lexists(p):
            raise SourceError(f"source path {p} does not exist (is the disk mounted?)")
        if not os.access(p, os.R_OK):
            raise SourceError(f"source path {p} is not readable")
    for _ in walk_files(paths):
        return
    raise SourceError(f"source {', '.join(paths)} contains no files: refusing to record an empty backup as a success")


def sample(paths: list[str], k: int, rng: random.Random | None = None) -> list[Entry]:
    rng = rng or random.Random()
    chosen: list[str] = []
    seen = 0
    for e in walk_files(paths):
        path = e if isinstance(e, str) else e.path
        seen += 1
        if len(chosen) < k:
            chosen.append(path)
        else:
            j = rng.randrange(seen)
            if j < k:
                chosen[j] = path
    out = []
    for path in sorted(chosen):
        try:
            st = os.stat(path, follow_symlinks=False)
            out.append(Entry(path, st.st_size, st.st_mtime_ns, hash_file(path)))
        except OSError:
            continue
    return out


def rebase(entries: list[Entry], root: str | os.PathLike) -> list[Entry]:
    """Entries with paths from ``root`` ("/a/b"), as restic stores a backup of ``.`` run in ``root``."""
    return [Entry("/" + os.path.relpath(e.path, root), e.size, e.mtime_ns, e.blake3) for e in entries]


def still_valid(entries: list[Entry]) -> list[Entry]:
    """Entries whose file is unchanged since it was hashed."""
    keep = []
    for e in entries:
        try:
            st = os.stat(e.path, follow_symlinks=False)
        except OSError:
            continue
        if st.st_size == e.size and st.st_mtime_ns == e.mtime_ns:
            keep.append(e)
    return keep


BIG_FILE = 64 << 10  # from this size, files are mapped (no copy) rather than read


def hash_file_fast(path: str, size: int | None = None, *, threads: bool = True) -> str:
    """BLAKE3 of a file for verification: from ``BIG_FILE`` mapped (the mapping is
    transient; its pages count in RSS while it lasts) and on every core unless
    ``threads`` is off; smaller files read in one or a few ``BIG_FILE`` pieces."""
    if size is None:
        size = os.stat(path).st_size
    if size >= BIG_FILE:
        h = blake3.blake3(max_threads=blake3.blake3.AUTO if threads else 1)
        h.update_mmap(path)
        return h.hexdigest()
    return hash_file(path, BIG_FILE)  # a small buffer: zeroing 1 MiB per small file cost more than hashing it


def _parallel(items: list[Any], size: Callable[[Any], int], fn: Callable[[Any, bool], Any], workers: int | None) -> list[Any]:
    """``fn(item, threads)`` for every item: a pool of one file per core (each hashed on
    one thread, biggest first, so no straggler is left at the end), except files so big
    that one of them would keep a worker busy while the others idle (more than half a
    worker's fair share of the bytes): those go first, one at a time, each on every core
    (``threads``). Splitting a file costs a hand-off between cores per file; splitting
    only the big ones keeps the cores busy whatever the mix (one huge file, or
    hundreds of small ones) without that cost. Results in the order: split files
    biggest first, then the rest biggest first."""
    n = _workers(workers)
    ordered = sorted(items, key=lambda i: -size(i))
    split_from = max(BIG_FILE, sum(size(i) for i in ordered) // (2 * n)) if n > 1 else 1 << 62
    split = [i for i in ordered if size(i) >= split_from]
    out = [fn(i, True) for i in split]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="hash") as pool:
        out.extend(pool.map(lambda i: fn(i, False), ordered[len(split):]))
    return out


def _workers(workers: int | None) -> int:
    return workers or min(4, os.cpu_count() or 2)


def full(paths: list[str], workers: int | None = None) -> list[Entry]:
    """Every regular file under ``paths`` with its BLAKE3 (see ``_parallel``), in path order;
    size and mtime from the one stat the walk made."""
    files: list[tuple[str, os.stat_result]] = []
    for e in walk_files(paths):
        try:
            files.append((e, os.stat(e, follow_symlinks=False)) if isinstance(e, str) else (e.path, e.stat(follow_symlinks=False)))
        except OSError:
            continue

    def entry(f: tuple[str, os.stat_result], threads: bool) -> Entry | None:
        path, st = f
        try:
            return Entry(path, st.st_size, st.st_mtime_ns, hash_file_fast(path, st.st_size, threads=threads))
        except OSError:  # gone since the walk
            return None

    entries = _parallel(files, lambda f: f[1].st_size, entry, workers)
    return sorted((e for e in entries if e is not None), key=lambda e: e.path)


def write_file(path: Path, entries: list[Entry]) -> None:
    """A manifest as gzipped JSON lines (written to a temp name, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e.to_dict(), separators=(",", ":")) + "\n")
    os.replace(tmp, path)


def read_file(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def compare_tree(root: Path, entries: list[dict], workers: int | None = None) -> list[str]:
    """Mismatches of the files under ``root`` (a restore target: entry paths re-rooted
    there) against ``entries``; files hashed in parallel."""
    def one(e: dict, threads: bool) -> str | None:
        restored = root / e["path"].lstrip("/")
        try:
            st = restored.stat()
        except OSError:
            return f"{e['path']}: missing"
        if st.st_size != e["size"]:
            return f"{e['path']}: size {st.st_size}, {e['size']} at backup"
        return None if hash_file_fast(str(restored), st.st_size, threads=threads) == e["blake3"] else f"{e['path']}: BLAKE3 differs"

    return [m for m in _parallel(entries, lambda e: int(e.get("size") or 0), one, workers) if m]
