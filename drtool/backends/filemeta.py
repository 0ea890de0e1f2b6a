"""Modes and owners of the files on a SnapRAID array, which SnapRAID itself does not keep
(a file recovered by ``snapraid fix`` comes back mode 0600, owned by root).

A small SQLite table per array in the state directory, kept current from the change
list of each sync (only added/changed files are stat'ed), and rebuilt by one walk of
the data disks when it is empty. After a fix, ``apply`` puts modes and owners back.
"""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Iterable

_SCHEMA = "CREATE TABLE IF NOT EXISTS files (disk TEXT, path TEXT, mode INTEGER, uid INTEGER, gid INTEGER, PRIMARY KEY (disk, path))"


class FileMeta:
    def __init__(self, db: Path, disks: dict[str, Path]) -> None:
        db.parent.mkdir(parents=True, exist_ok=True)
        self.db, self.disks = db, disks
        self.conn = sqlite3.connect(db)
        self.conn.execute(_SCHEMA)
        self._pending: list[tuple[str, str, str]] = []

    def close(self) -> None:
        self.flush()
        self.conn.close()

    def empty(self) -> bool:
        return self.conn.execute("SELECT 1 FROM files LIMIT 1").fetchone() is None

    def rebuild(self, skip: Iterable[Path] = ()) -> int:
        """Record every regular file of every data disk (``skip``: SnapRAID's own content files)."""
        skipped = {os.path.realpath(p) for p in skip}
        rows = []
        for disk, root in self.disks.items():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = [d for d in dirnames if d != "lost+found"]
                for fn in filenames:
                    full = os.path.join(dirpath, fn)
                    if os.path.realpath(full) in skipped:
                        continue
                    st = os.lstat(full)
                    rows.append((disk, os.path.relpath(full, root), st.st_mode & 0o7777, st.st_uid, st.st_gid))
        with self.conn:
            self.conn.execute("DELETE FROM files")
            self.conn.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", rows)
        return len(rows)

    def change(self, kind: str, disk: str, path: str) -> None:
        """A change from a sync's scan (``added``, ``updated``, ``removed``, …)."""
        self._pending.append((kind, disk, path))
        if len(self._pending) >= 5000:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        gone, rows = [], []
        for kind, disk, path in self._pending:
            if kind == "removed":
                gone.append((disk, path))
                continue
            root = self.disks.get(disk)
            try:
                st = os.lstat(os.path.join(root, path)) if root else None
            except OSError:
                st = None
            if st is not None:
                rows.append((disk, path, st.st_mode & 0o7777, st.st_uid, st.st_gid))
        with self.conn:  # removals first: a path removed and added again in one sync (replaced) stays recorded
            self.conn.executemany("DELETE FROM files WHERE disk = ? AND path = ?", gone)
            self.conn.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", rows)
        self._pending.clear()

    def lookup(self, disk: str, path: str) -> tuple[int, int, int] | None:
        row = self.conn.execute("SELECT mode, uid, gid FROM files WHERE disk = ? AND path = ?", (disk, path)).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def apply(self, files: Iterable[tuple[str, str]]) -> tuple[int, list[str]]:
        """Put back mode and owner of recovered ``(disk, path)`` files: (restored count, problems)."""
        done, problems = 0, []
        for disk, path in files:
            meta = self.lookup(disk, path)
            root = self.disks.get(disk)
            if meta is None or root is None:
                problems.append(f"{disk}:{path}: no recorded mode/owner (left as SnapRAID restored it)")
                continue
            full = os.path.join(root, path)
            try:
                os.lchown(full, meta[1], meta[2])
                if not os.path.islink(full):
                    os.chmod(full, meta[0])
                done += 1
            except OSError as exc:
                problems.append(f"{disk}:{path}: could not restore mode/owner: {exc.strerror}")
        return done, problems
