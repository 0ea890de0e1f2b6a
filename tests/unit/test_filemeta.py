"""FileMeta: the modes and owners SnapRAID does not keep, recorded from a sync's change list."""
from __future__ import annotations

import os

from drtool.backends.filemeta import FileMeta


def test_changes_are_recorded_as_the_files_are_now(tmp_path):
    disk = tmp_path / "d1"
    disk.mkdir()
    for name, mode in (("keep", 0o640), ("gone", 0o600), ("replaced", 0o644)):
        (disk / name).write_bytes(b"x")
        os.chmod(disk / name, mode)
    meta = FileMeta(tmp_path / "meta.sqlite", {"d1": disk})
    assert meta.rebuild() == 3
    (disk / "gone").unlink()
    (disk / "replaced").unlink()
    (disk / "replaced").write_bytes(b"new")
    os.chmod(disk / "replaced", 0o600)
    (disk / "added").write_bytes(b"y")
    os.chmod(disk / "added", 0o751)
    for change in (("removed", "d1", "gone"), ("added", "d1", "replaced"), ("removed", "d1", "replaced"),
                   ("added", "d1", "added"), ("added", "d1", "vanished-before-the-flush")):
        meta.change(*change)
    meta.close()
    meta = FileMeta(tmp_path / "meta.sqlite", {"d1": disk})
    uid, gid = os.getuid(), os.getgid()
    assert meta.lookup("d1", "keep") == (0o640, uid, gid)
    assert meta.lookup("d1", "gone") is None
    assert meta.lookup("d1", "replaced") == (0o600, uid, gid)  # it exists: recorded whatever order the sync reported
    assert meta.lookup("d1", "added") == (0o751, uid, gid)
    assert meta.lookup("d1", "vanished-before-the-flush") is None
    meta.close()
