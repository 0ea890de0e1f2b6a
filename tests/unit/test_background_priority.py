"""The catalog warm-up thread runs at the lowest CPU priority until someone waits for
it (engine._Background): real threads and the kernel's per-thread nice values."""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest
from conftest import missing

from drtool.engine import Context, _Background


@pytest.fixture
def linux() -> None:
    """Per-thread nice values are Linux's: elsewhere this skips, or fails under DRTOOL_TEST_REQUIRE=all."""
    if not sys.platform.startswith("linux"):
        missing("linux", "per-thread nice values")


def _nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def test_background_thread_is_lowered_then_hurried_back(linux):
    base = _nice(threading.get_native_id())
    bg = _Background()
    lowered, release, seen = threading.Event(), threading.Event(), {}

    def work() -> None:
        bg.start()
        seen["tid"] = threading.get_native_id()
        seen["low"] = _nice(seen["tid"])
        bg.hurry()  # the thread itself asking changes nothing
        seen["after_own_hurry"] = _nice(seen["tid"])
        lowered.set()
        release.wait(10)
        seen["end"] = _nice(seen["tid"])
        bg.done()

    t = threading.Thread(target=work)
    t.start()
    assert lowered.wait(10)
    assert seen["low"] == max(base, _Background.LOW) and seen["after_own_hurry"] == seen["low"]
    assert _nice(threading.get_native_id()) == base  # only that thread was lowered
    bg.hurry()
    release.set()
    t.join(10)
    if os.geteuid() == 0:  # raising a nice value back needs the right to
        assert seen["end"] == base
    bg.hurry()  # after done(): nothing to do, no error


def test_warm_catalog_then_use_it(tmp_path: Path):
    """A command that warms the catalog and then needs it at once gets it (no deadlock
    between the waiting thread and the low-priority warm-up), once: the same object."""
    from drtool.policy.loader import Config
    from drtool.ui import UI

    ctx = Context(cfg=Config(), state_dir=tmp_path, ui=UI(enabled=False),
                  catalog_url=f"sqlite:///{tmp_path / 'catalog.sqlite3'}")
    ctx.warm_catalog()
    ctx.warm_catalog()  # a second call starts no second thread
    first = ctx.catalog
    assert first is ctx.catalog
    assert first.runs(limit=1) == []
