"""The drtool catalog: runs, recovery points and verifications as data."""

from .models import (
    RUN_KINDS,
    TERMINAL_PHASES,
    VERIFICATION_LEVELS,
    RecoveryPointRow,
    Run,
    RunPhase,
    Verification,
)
from ..paths import default_catalog_url, state_dir
from .store import Catalog, levels_at_least

__all__ = [
    "Catalog",
    "Run",
    "RecoveryPointRow",
    "Verification",
    "RunPhase",
    "RUN_KINDS",
    "TERMINAL_PHASES",
    "VERIFICATION_LEVELS",
    "default_catalog_url",
    "levels_at_least",
    "state_dir",
]
