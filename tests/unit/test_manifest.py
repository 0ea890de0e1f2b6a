"""Backup-time manifests: source checks, reservoir sampling, change detection."""
from __future__ import annotations

import os
import random
from collections import Counter

import blake3
import pytest

from drtool import manifest
from drtool.errors import SourceError


def test_missing_and_empty_sources_are_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        manifest.check_source([str(tmp_path / "nope")])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(SourceError, match="contains no files"):
        manifest.check_source([str(tmp_path / "empty")])
    with pytest.raises(SourceError, match="names no source"):
        manifest.check_source([])
    (tmp_path / "empty" / "sub" / "f").write_text("x")
    manifest.check_source([str(tmp_path / "empty")])


def test_hash_matches_blake3_of_the_content(tmp_path):
    data = os.urandom(3 * manifest.CHUNK + 17)
    f = tmp_path / "f"
    f.write_bytes(data)
    assert manifest.hash_file(str(f)) == blake3.blake3(data).hexdigest()
    (tmp_path / "empty").write_bytes(b"")
    assert manifest.hash_file(str(tmp_path / "empty")) == blake3.blake3(b"").hexdigest()


def test_sample_is_uniform_and_bounded(tmp_path):
    for i in range(10):
        (tmp_path / f"f{i}").write_text(str(i))
    assert len(manifest.sample([str(tmp_path)], 20)) == 10
    counts: Counter[str] = Counter()
    rng = random.Random(3)
    for _ in range(2000):
        for e in manifest.sample([str(tmp_path)], 3, rng):
            counts[os.path.basename(e.path)] += 1
    # each file should be picked ~600 times (3/10 of 2000); a biased reservoir would not be
    assert set(counts) == {f"f{i}" for i in range(10)}
    assert all(480 < c < 720 for c in counts.values()), counts


def test_symlinks_are_not_followed(tmp_path):
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to("/etc/passwd")
    paths = [e.path for e in manifest.sample([str(tmp_path)], 10)]
    assert paths == [str(tmp_path / "real")]


def test_still_valid_drops_changed_files(tmp_path):
    for i in range(3):
        (tmp_path / f"f{i}").write_text(str(i))
    entries = manifest.sample([str(tmp_path)], 3)
    (tmp_path / "f1").write_text("changed, and longer")
    os.remove(tmp_path / "f2")
    assert [os.path.basename(e.path) for e in manifest.still_valid(entries)] == ["f0"]


def test_full_manifest_round_trip_and_compare_tree(tmp_path):
    """Every file hashed (big ones through the multi-threaded mmap path), written as
    gzipped JSON lines, and a restored tree compared against it: a changed byte, a
    missing file and a size change are each named."""
    import os

    from drtool import manifest

    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "small").write_bytes(b"x" * 1000)
    (src / "big").write_bytes(os.urandom(manifest.BIG_FILE + 4096))
    (src / "gone").write_bytes(b"y")
    entries = manifest.full([str(src)])
    assert sorted(os.path.basename(e.path) for e in entries) == ["big", "gone", "small"]
    mfile = tmp_path / "m" / "p.jsonl.gz"
    manifest.write_file(mfile, entries)
    back = manifest.read_file(mfile)
    assert [e["blake3"] for e in back] == [e.blake3 for e in entries]

    restored = tmp_path / "restore"
    import shutil

    shutil.copytree(src, restored / str(src).lstrip("/"))
    assert manifest.compare_tree(restored, back) == []
    root = restored / str(src).lstrip("/")
    data = bytearray((root / "big").read_bytes())
    data[manifest.BIG_FILE // 2] ^= 1
    (root / "big").write_bytes(bytes(data))
    (root / "gone").unlink()
    (root / "a" / "small").write_bytes(b"x" * 999)
    problems = manifest.compare_tree(restored, back)
    assert len(problems) == 3
    assert any(p.endswith("/big: BLAKE3 differs") for p in problems)
    assert any(p.endswith("/gone: missing") for p in problems)
    assert any(p.endswith("/small: size 999, 1000 at backup") for p in problems)


def test_parallel_splits_only_files_bigger_than_half_a_fair_share():
    """Hashing order and threading: a file gets every core only when it exceeds half a
    worker's share of the bytes; the rest go one per worker, biggest first; every item
    is hashed exactly once."""
    from drtool import manifest

    seen: list[tuple[int, bool]] = []

    def fn(size: int, threads: bool) -> int:
        seen.append((size, threads))
        return size

    mib = 1 << 20
    many = [mib] * 100 + [3 * mib, 2000]  # 103 MiB in all: half a share of 2 workers is ~26 MiB, none split
    out = manifest._parallel(many, lambda s: s, fn, workers=2)
    assert sorted(out) == sorted(many) and out[0] == 3 * mib
    assert not any(t for _, t in seen)

    seen.clear()
    one_huge = [512 * mib, 8 * mib, mib, 500]
    out = manifest._parallel(one_huge, lambda s: s, fn, workers=2)
    assert out == [512 * mib, 8 * mib, mib, 500]
    assert seen[0] == (512 * mib, True) and all(not t for _, t in seen[1:])

    seen.clear()  # one worker: nothing to split for
    manifest._parallel(one_huge, lambda s: s, fn, workers=1)
    assert not any(t for _, t in seen)


def test_small_files_hash_the_same_through_every_path(tmp_path):
    """Files below, at and above BIG_FILE hash to blake3 of their bytes, threaded or not."""
    import os

    import blake3

    from drtool import manifest

    for size in (0, 1, manifest.BIG_FILE - 1, manifest.BIG_FILE, 3 * manifest.BIG_FILE + 7):
        f = tmp_path / f"f{size}"
        data = os.urandom(size)
        f.write_bytes(data)
        want = blake3.blake3(data).hexdigest()
        assert manifest.hash_file_fast(str(f)) == want
        assert manifest.hash_file_fast(str(f), size, threads=False) == want
