"""Where drtool keeps its state (catalog database, locks)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

__all__ = ["state_dir", "default_catalog_url", "ENV_STATE_DIR", "ENV_CATALOG_URL"]

ENV_STATE_DIR = "DRTOOL_STATE_DIR"
ENV_CATALOG_URL = "DRTOOL_CATALOG_URL"


def state_dir() -> Path:
    """drtool's state directory: ``$DRTOOL_STATE_DIR`` or the platform default.

    The directory is not created here; callers that write into it create it.
    """
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_state_dir("drtool"))


def default_catalog_url() -> str:
    """``$DRTOOL_CATALOG_URL`` or ``sqlite:///<state_dir>/catalog.sqlite3``."""
    env = os.environ.get(ENV_CATALOG_URL)
    if env:
        return env
    path = (state_dir() / "catalog.sqlite3").absolute()
    return f"sqlite:///{path.as_posix()}"
