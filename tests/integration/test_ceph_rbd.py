"""drtool.backends.ceph_rbd against a real Ceph (Pacific; the session's ``ceph_cluster``:
mon, mgr, memstore OSD, mds), through the ``rbd`` CLI only.

Image content is written with ``rbd import-diff`` of diff streams this file builds
(the documented ``rbd diff v1`` format: ``s`` size, ``w`` offset/length/data, ``e``):
no kernel ``rbd map`` is needed, and the test keeps a byte-exact model of every image,
so each hash is checked against a value computed here, not only side against side.
Two pools per module (source and replica), unique image names per test.

What is proved: create → write → snapshot → full replicate → ~10 % of the blocks
changed → snapshot → incremental replicate (much smaller than the full stream) → whole
snapshot hashes and sampled extent hashes equal on both sides and equal to the model;
a protected snapshot cannot be removed; a flattened clone of snap1 holds snap1's
content and leaves snap1 unprotected as it was; rollback restores snap1; a missing
base (target, source, target image) and a changed replica are refused with errors
that name the fix; export-diff/import-diff through files, pipes and file objects.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from helpers import rbd_diff_stream as diff_stream

from drtool.backends.ceph_rbd import (
    CephConn, RbdCli, RbdDiverged, RbdMissingBase, RbdNotFound, RbdSnapshotProtected, error_text, parse_snaps,
    parse_timestamp,
)
from drtool.errors import BackendError
from drtool.exec import CommandResult, Outcome

MiB = 1 << 20
BLOCK = 4096
SIZE = 16 * MiB


# -- helpers -------------------------------------------------------------------


class Image:
    """A byte-exact model of an RBD image's head, kept beside the real one."""

    def __init__(self, cli: RbdCli, pool: str, name: str, size: int = SIZE) -> None:
        self.cli, self.pool, self.name, self.size = cli, pool, name, size
        self.data = bytearray(size)

    def create(self) -> Image:
        self.cli.create_image(self.pool, self.name, self.size // MiB)
        return self

    def write(self, writes: dict[int, bytes], *, via: str = "bytesio", tmp_path=None) -> None:
        stream = diff_stream(self.size, writes)
        if via == "file":
            path = tmp_path / f"{uuid.uuid4().hex}.diff"
            path.write_bytes(stream)
            with open(path, "rb") as f:
                f.read(5)  # a buffered reader's read-ahead must not cost rbd the stream's start
                f.seek(0)
                self.cli.import_diff(self.pool, self.name, f)
        else:
            self.cli.import_diff(self.pool, self.name, io.BytesIO(stream))
        for off, chunk in writes.items():
            self.data[off:off + len(chunk)] = chunk

    def sha(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def fill(rng: random.Random, size: int) -> dict[int, bytes]:
    """Random content in 1 MiB writes, leaving one 1 MiB hole (a sparse region) at 8 MiB."""
    return {off: rng.randbytes(MiB) for off in range(0, size, MiB) if off != 8 * MiB}


def scatter(rng: random.Random, size: int, fraction: float) -> dict[int, bytes]:
    """Random new content for ``fraction`` of the image's 4 KiB blocks."""
    blocks = rng.sample(range(size // BLOCK), int(size // BLOCK * fraction))
    return {b * BLOCK: rng.randbytes(BLOCK) for b in blocks}


def name(prefix: str = "img") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def pools(ceph_cluster) -> tuple[str, str]:
    """A source and a replica pool for this module (pool creation costs ~1 s each)."""
    return ceph_cluster.make_pool("src"), ceph_cluster.make_pool("dst")


@pytest.fixture
def cli(ceph_cluster) -> RbdCli:
    return RbdCli(CephConn(conf=ceph_cluster.conf, keyring=ceph_cluster.keyring))


# -- the whole cycle -------------------------------------------------------------


def test_cluster_is_healthy_with_cephfs(ceph_cluster):
    fs = json.loads(ceph_cluster.ceph("fs", "ls"))
    assert [(f["name"], f["metadata_pool"], f["data_pools"]) for f in fs] == [("cephfs", "cephfs_metadata", ["cephfs_data"])]
    assert json.loads(ceph_cluster.ceph("health"))["status"] == "HEALTH_OK"


def test_replicate_verify_clone_rollback(cli, pools, tmp_path):
    src_pool, dst_pool = pools
    rng = random.Random(7)
    img = Image(cli, src_pool, name()).create()
    assert cli.image_exists(src_pool, img.name) and not cli.image_exists(dst_pool, img.name)
    assert cli.image_info(src_pool, img.name)["size"] == SIZE

    img.write(fill(rng, SIZE), via="file", tmp_path=tmp_path)
    v1 = img.sha()
    before = datetime.now(timezone.utc).replace(microsecond=0)
    s1 = cli.snap_create(src_pool, img.name, "s1")
    assert (s1.image, s1.name, s1.size, s1.protected) == (img.name, "s1", SIZE, False)
    assert s1.timestamp is not None and before - timedelta(seconds=1) <= s1.timestamp <= datetime.now(timezone.utc)

    full = cli.replicate(src_pool, img.name, "s1", cli, dst_pool, img.name, from_snap=None)
    assert full > SIZE - 2 * MiB  # all written data (the 1 MiB hole is not sent)
    assert [s.name for s in cli.list_snaps(dst_pool, img.name)] == ["s1"]
    assert cli.image_info(dst_pool, img.name)["size"] == SIZE
    assert cli.export_hash(dst_pool, img.name, "s1") == (v1, SIZE)

    changes = scatter(rng, SIZE, 0.10)
    img.write(changes)
    v2 = img.sha()
    cli.snap_create(src_pool, img.name, "s2")
    reports: list[dict] = []
    inc = cli.replicate(src_pool, img.name, "s2", cli, dst_pool, img.name, from_snap="s1", progress=reports.append)
    assert len(changes) * BLOCK <= inc < full / 3
    assert reports and reports[-1]["bytes"] == inc
    assert [s.name for s in cli.list_snaps(dst_pool, img.name)] == ["s1", "s2"]

    # whole-snapshot hashes: both sides equal the model; the replica's s1 is untouched
    assert cli.export_hash(src_pool, img.name, "s2") == (v2, SIZE)
    assert cli.export_hash(dst_pool, img.name, "s2") == (v2, SIZE)
    assert cli.export_hash(dst_pool, img.name, "s1", algo="blake3")[1] == SIZE
    assert cli.export_hash(dst_pool, img.name, "s1", algo="blake3") == cli.export_hash(src_pool, img.name, "s1", algo="blake3")

    # sampled extents: random, overlapping, one on a changed block, one ending at the end
    offsets = sorted(rng.sample(range(0, SIZE - 64 * 1024, 512), 12)) + [min(changes), SIZE - 64 * 1024, 100, 200]
    want = {off: hashlib.sha256(img.data[off:off + 64 * 1024]).hexdigest() for off in offsets}
    assert cli.extent_hashes(src_pool, img.name, "s2", offsets, 64 * 1024) == want
    assert cli.extent_hashes(dst_pool, img.name, "s2", offsets, 64 * 1024) == want
    early = cli.extent_hashes(dst_pool, img.name, "s2", [0, 4096], 4096)  # stops rbd after 8 KiB
    assert early == {0: hashlib.sha256(img.data[:4096]).hexdigest(), 4096: hashlib.sha256(img.data[4096:8192]).hexdigest()}
    assert cli.commands[-1].get("stopped_early") is True

    # a protected snapshot cannot be removed
    cli.snap_protect(src_pool, img.name, "s1")
    with pytest.raises(RbdSnapshotProtected) as err:
        cli.snap_remove(src_pool, img.name, "s1")
    assert isinstance(err.value, BackendError)
    assert f"{src_pool}/{img.name}@s1" in str(err.value) and "unprotect" in str(err.value)
    assert [s.protected for s in cli.list_snaps(src_pool, img.name)] == [True, False]
    cli.snap_unprotect(src_pool, img.name, "s1")

    # clone-restore from s1 (on the replica side's pool): snap1's content, stands alone
    restored = name("restored")
    cli.clone(src_pool, img.name, "s1", dst_pool, restored)
    assert "parent" not in cli.image_info(dst_pool, restored)
    assert cli.export_hash(dst_pool, restored, None) == (v1, SIZE)
    assert not cli.list_snaps(src_pool, img.name)[0].protected  # as it was before the clone

    # rollback to s1 restores its content on the head
    cli.rollback(src_pool, img.name, "s1")
    assert cli.export_hash(src_pool, img.name, None) == (v1, SIZE)

    for pool, image in ((src_pool, img.name), (dst_pool, img.name), (dst_pool, restored)):
        cli.remove_image(pool, image, purge_snapshots=True)
        assert not cli.image_exists(pool, image)
    failed = [(c["argv"][c["argv"].index("--keyring") + 2], c["returncode"]) for c in cli.commands if c["returncode"]]
    assert set(failed) == {("info", 2), ("snap", 16)}  # image_exists' misses, the refused removal


def test_clone_without_flatten_keeps_the_snapshot_protected(cli, pools):
    src_pool, dst_pool = pools
    img = Image(cli, src_pool, name(), 8 * MiB).create()
    img.write({0: b"x" * MiB})
    cli.snap_create(src_pool, img.name, "base")
    child = name("child")
    cli.clone(src_pool, img.name, "base", dst_pool, child, flatten=False)
    assert cli.image_info(dst_pool, child)["parent"]["snapshot"] == "base"
    assert cli.list_snaps(src_pool, img.name)[0].protected
    with pytest.raises(BackendError, match="clones depend on it"):
        cli.snap_unprotect(src_pool, img.name, "base")
    cli.remove_image(dst_pool, child)
    cli.snap_unprotect(src_pool, img.name, "base")
    cli.remove_image(src_pool, img.name, purge_snapshots=True)


# -- refusals with a way out ---------------------------------------------------------


def test_incremental_base_missing_on_target(cli, pools):
    src_pool, dst_pool = pools
    img = Image(cli, src_pool, name(), 8 * MiB).create()
    img.write({0: b"a" * BLOCK})
    cli.snap_create(src_pool, img.name, "s1")
    img.write({BLOCK: b"b" * BLOCK})
    cli.snap_create(src_pool, img.name, "s2")
    # the target was seeded from s2, so it never had s1
    cli.replicate(src_pool, img.name, "s2", cli, dst_pool, img.name, from_snap=None)
    img.write({2 * BLOCK: b"c" * BLOCK})
    cli.snap_create(src_pool, img.name, "s3")

    with pytest.raises(RbdMissingBase) as err:
        cli.replicate(src_pool, img.name, "s3", cli, dst_pool, img.name, from_snap="s1")
    msg = str(err.value)
    assert f"{dst_pool}/{img.name}" in msg and "@s1" in msg and "from_snap='s2'" in msg
    assert [s.name for s in cli.list_snaps(dst_pool, img.name)] == ["s2"]  # nothing was sent

    with pytest.raises(RbdMissingBase, match="does not exist on the source"):
        cli.replicate(src_pool, img.name, "s3", cli, dst_pool, img.name, from_snap="gone")
    with pytest.raises(RbdMissingBase, match="send it in full first"):
        cli.replicate(src_pool, img.name, "s3", cli, dst_pool, name("absent"), from_snap="s2")
    with pytest.raises(BackendError, match="target image exists"):
        cli.replicate(src_pool, img.name, "s3", cli, dst_pool, img.name, from_snap=None)
    with pytest.raises(RbdNotFound, match="no such snapshot"):
        cli.replicate(src_pool, img.name, "nope", cli, dst_pool, img.name, from_snap="s2")

    # the fix the message names works, and the replica then equals the source
    cli.replicate(src_pool, img.name, "s3", cli, dst_pool, img.name, from_snap="s2")
    assert cli.export_hash(dst_pool, img.name, "s3") == (img.sha(), 8 * MiB)
    for pool in (src_pool, dst_pool):
        cli.remove_image(pool, img.name, purge_snapshots=True)


def test_changed_replica_is_refused_unless_forced(cli, pools):
    src_pool, dst_pool = pools
    img = Image(cli, src_pool, name(), 8 * MiB).create()
    img.write({0: b"a" * MiB})
    cli.snap_create(src_pool, img.name, "s1")
    cli.replicate(src_pool, img.name, "s1", cli, dst_pool, img.name, from_snap=None)
    img.write({MiB: b"b" * BLOCK})
    cli.snap_create(src_pool, img.name, "s2")

    cli.import_diff(dst_pool, img.name, io.BytesIO(diff_stream(8 * MiB, {5 * MiB: b"stray" * 100})))
    with pytest.raises(RbdDiverged, match=r"changed since @s1 .*force=True to roll it back to @s1"):
        cli.replicate(src_pool, img.name, "s2", cli, dst_pool, img.name, from_snap="s1")
    assert [s.name for s in cli.list_snaps(dst_pool, img.name)] == ["s1"]
    # a rollback by hand still reads as a change (rbd's diffs track writes): force it is
    cli.rollback(dst_pool, img.name, "s1")
    with pytest.raises(RbdDiverged):
        cli.replicate(src_pool, img.name, "s2", cli, dst_pool, img.name, from_snap="s1")
    cli.replicate(src_pool, img.name, "s2", cli, dst_pool, img.name, from_snap="s1", force=True)
    assert any("rollback" in c["argv"] for c in cli.commands[-8:])
    # the next incremental finds a clean replica
    img.write({2 * MiB: b"c" * BLOCK})
    cli.snap_create(src_pool, img.name, "s3")
    cli.replicate(src_pool, img.name, "s3", cli, dst_pool, img.name, from_snap="s2")
    assert cli.export_hash(dst_pool, img.name, "s3") == (img.sha(), 8 * MiB)
    for pool in (src_pool, dst_pool):
        cli.remove_image(pool, img.name, purge_snapshots=True)


def test_errors_name_the_object_and_rbds_reason(cli, pools):
    src_pool, _ = pools
    missing = name("missing")
    assert not cli.image_exists(src_pool, missing)
    with pytest.raises(BackendError, match="error opening pool"):
        cli.image_exists(f"nopool-{uuid.uuid4().hex[:6]}", missing)
    with pytest.raises(RbdNotFound, match=rf"{src_pool}/{missing}.*No such file or directory"):
        cli.list_snaps(src_pool, missing)

    img = Image(cli, src_pool, name(), 4 * MiB).create()
    cli.snap_create(src_pool, img.name, "keep")
    with pytest.raises(BackendError, match=rf"cannot remove image {src_pool}/{img.name}: it has snapshots.*snap purge"):
        cli.remove_image(src_pool, img.name)
    with pytest.raises(RbdNotFound, match=rf"{src_pool}/{img.name}@nope"):
        cli.snap_remove(src_pool, img.name, "nope")
    with pytest.raises(BackendError, match=r"export-diff @gone\.\."):
        cli.export_diff(src_pool, img.name, "keep", io.BytesIO(), from_snap="gone")
    with pytest.raises(RbdMissingBase, match="lacks the diff's base snapshot"):
        cli.import_diff(src_pool, img.name, io.BytesIO(diff_stream(4 * MiB, {}, from_snap="absent")))
    with pytest.raises(ValueError):
        cli.extent_hashes(src_pool, img.name, "keep", [4 * MiB - 10], 100)
    with pytest.raises(ValueError):
        cli.snap_create(src_pool, img.name, "a/b")
    cli.remove_image(src_pool, img.name, purge_snapshots=True)


# -- the streams themselves ------------------------------------------------------


def test_export_diff_to_file_pipe_and_object_then_import(cli, pools, tmp_path):
    src_pool, dst_pool = pools
    rng = random.Random(3)
    img = Image(cli, src_pool, name(), 8 * MiB).create()
    img.write(scatter(rng, 8 * MiB, 0.3))
    cli.snap_create(src_pool, img.name, "s1")

    path = tmp_path / "s1.diff"
    with open(path, "wb") as f:
        f.write(b"HEAD")  # the count is what this call wrote, not the file's size
        reports: list[dict] = []
        n_file = cli.export_diff(src_pool, img.name, "s1", f, progress=reports.append)
        f.write(b"TAIL")  # the file object's position followed rbd's writes
    data = path.read_bytes()
    assert data[:4] == b"HEAD" and data[-4:] == b"TAIL" and len(data) == n_file + 8
    assert data[4:4 + 12] == b"rbd diff v1\n" and reports[-1]["bytes"] == n_file

    with open(path, "ab") as f:  # O_APPEND: counted by the size change
        assert cli.export_diff(src_pool, img.name, "s1", f.fileno()) == n_file

    buf = io.BytesIO()
    assert cli.export_diff(src_pool, img.name, "s1", buf) == n_file
    r, w = os.pipe()
    got = bytearray()
    reader = threading.Thread(target=lambda: got.extend(iter_fd(r)))
    reader.start()
    try:
        assert cli.export_diff(src_pool, img.name, "s1", w) == n_file
    finally:
        os.close(w)
        reader.join()
        os.close(r)
    assert bytes(got) == buf.getvalue() == data[4:4 + n_file]

    # a diff stream imported into a new image of the same size reproduces the snapshot
    copy = name("copy")
    cli.create_image(dst_pool, copy, 8)
    with open(path, "rb") as f:
        f.seek(4)
        cli.import_diff(dst_pool, copy, f)
    assert [s.name for s in cli.list_snaps(dst_pool, copy)] == ["s1"]
    assert cli.export_hash(dst_pool, copy, "s1") == (img.sha(), 8 * MiB)
    cli.remove_image(dst_pool, copy, purge_snapshots=True)
    cli.remove_image(src_pool, img.name, purge_snapshots=True)


def iter_fd(fd: int):
    while chunk := os.read(fd, 1 << 16):
        yield from chunk


# -- parsing (no cluster) ----------------------------------------------------------


def test_parse_snaps_and_timestamps():
    doc = [{"id": 9, "name": "b", "size": 10, "protected": "true", "timestamp": "Sat Nov 28 16:51:45 2026"},
           {"id": 4, "name": "a", "size": 10, "protected": "false", "timestamp": "Sun Mar  1 01:02:03 2026"},
           {"id": 5, "name": "c", "size": 1, "protected": False}]
    snaps = parse_snaps("img", doc)
    assert [(s.name, s.id, s.protected) for s in snaps] == [("a", 4, False), ("c", 5, False), ("b", 9, True)]
    assert snaps[0].timestamp == datetime(2026, 3, 1, 1, 2, 3, tzinfo=timezone.utc)
    assert snaps[1].timestamp is None
    assert parse_timestamp("garbage") is None


def test_error_text_keeps_the_reason_and_drops_noise():
    lines = [
        "2026-11-28T16:52:30.994+0000 7fd3893576c0 -1 librbd::SnapshotUnprotectRequest: cannot unprotect: at least 1 child(ren) [1068e32e57e7] in pool 'p2'",
        "",
        "2026-11-28T16:52:30.994+0000 7fd3893576c0 -1 librbd::SnapshotUnprotectRequest: 0x559265338950 should_complete_error: ret_val=-16",
        "Removing snap: 10% complete...Removing snap: 100% complete...failed.",
        "rbd: unprotecting snap failed: (16) Device or resource busy",
    ]
    res = CommandResult(argv=["rbd"], returncode=16, outcome=Outcome.FAILED, duration_s=0.1, stdout="", stderr_lines=lines)
    text = error_text(res)
    assert "cannot unprotect: at least 1 child(ren)" in text and text.endswith("(16) Device or resource busy")
    assert "ret_val" not in text and "complete" not in text and "7fd3893576c0" not in text
