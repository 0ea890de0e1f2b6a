"""Backend registry: location type -> factory, one line per backend (STYLE #3).

``PROTOCOLS`` says which Protocols each backend claims; a test asserts every
registered backend satisfies them, and the conformance suites run against each.
"""
from __future__ import annotations

from typing import Any, Callable

from ..errors import ConfigError
from .base import Repository
from .restic import ResticRepository

REPOSITORIES: dict[str, Callable[..., Repository]] = {
    "restic": ResticRepository,
}

PROTOCOLS: dict[str, tuple[type, ...]] = {
    "restic": (Repository,),
}


def repository_for(name: str, location: Any) -> Repository:
    factory = REPOSITORIES.get(getattr(location, "type", ""))
    if factory is None:
        raise ConfigError(f"location {name!r} (type {getattr(location, 'type', '?')}) is not a repository drtool can back up into")
    return factory(name, location)
