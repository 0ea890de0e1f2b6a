"""Shared test harness.

Tests that need a real tool or service call ``require(name)``. On a developer
laptop a missing tool skips the test; with ``DRTOOL_TEST_REQUIRE=all`` (set by
.ci/run) it FAILS, so CI can never go green by skipping (restic's
RESTIC_TEST_DISALLOW_SKIP).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def required_all() -> bool:
    value = os.environ.get("DRTOOL_TEST_REQUIRE", "")
    return value == "all"


def require(tool: str) -> str:
    """Path of ``tool``; skip when missing, or fail when DRTOOL_TEST_REQUIRE=all."""
    path = shutil.which(tool)
    if path:
        return path
    wanted = os.environ.get("DRTOOL_TEST_REQUIRE", "")
    if wanted == "all" or tool in wanted.split(","):
        pytest.fail(f"required tool {tool!r} is missing (DRTOOL_TEST_REQUIRE={wanted}); run scripts/install-deps.sh")
    pytest.skip(f"{tool} not installed (set DRTOOL_TEST_REQUIRE=all to make this a failure)")


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory, monkeypatch):
    """Every test gets its own state dir and catalog; nothing touches ~/.local."""
    state = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("DRTOOL_STATE_DIR", str(state))
    monkeypatch.delenv("DRTOOL_CATALOG_URL", raising=False)
    monkeypatch.delenv("DRTOOL_CONFIG", raising=False)
    return state
