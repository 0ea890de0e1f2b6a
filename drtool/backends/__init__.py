"""Backend registry: location type -> factory, one line per backend (STYLE #3).

``PROTOCOLS`` says which Protocols each backend claims; a test asserts every
registered backend satisfies them, and the conformance suites run against each.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from ..errors import ConfigError
from .base import Repository
from .objectstore import ObjectStore
from .restic import ResticRepository

REPOSITORIES: dict[str, Callable[..., Repository]] = {
    "restic": ResticRepository,
}

# object stores load their SDK (boto3, google-cloud-storage) only when used: "module:Class"
OBJECT_STORES: dict[str, str] = {
    "s3": "drtool.backends.s3:S3Store",
    "gcs": "drtool.backends.gcs:GcsStore",
}

PROTOCOLS: dict[str, tuple[type, ...]] = {
    "restic": (Repository,),
    "s3": (ObjectStore,),
    "gcs": (ObjectStore,),
}


def object_store_class(kind: str) -> type:
    """The ObjectStore class for ``s3`` or ``gcs`` (imports its SDK)."""
    module, _, cls = OBJECT_STORES[kind].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise ConfigError(f"{kind} locations need the Python package {exc.name!r}: pip install 'drtool[{kind}]'") from None


def repository_for(name: str, location: Any) -> Repository:
    factory = REPOSITORIES.get(getattr(location, "type", ""))
    if factory is None:
        raise ConfigError(f"location {name!r} (type {getattr(location, 'type', '?')}) is not a repository drtool can back up into")
    return factory(name, location)
