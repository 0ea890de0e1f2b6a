"""The drill's scratch removal: everything under the scratch dir goes, nothing a link points to."""
from __future__ import annotations

import os

from drtool.drill.runner import _remove_tree


def test_scratch_removal_takes_everything_and_follows_no_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the drill's")
    scratch = tmp_path / "scratch"
    for i in range(20):
        d = scratch / f"step{i % 3}" / "restore" / f"d{i % 4}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}").write_bytes(os.urandom(1000 * i))
    (scratch / "step0" / "link-to-dir").symlink_to(outside)
    (scratch / "step1" / "link-to-file").symlink_to(outside / "keep.txt")
    _remove_tree(scratch)
    assert not scratch.exists()
    assert (outside / "keep.txt").read_text() == "not the drill's"
