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


def object_store_for(name: str, location: Any) -> ObjectStore:
    """An ObjectStore for a ``gcs`` or ``s3`` location, its secrets resolved now (at first use)."""
    import json

    from ..secrets import resolve

    kind = getattr(location, "type", "")
    if kind not in OBJECT_STORES:
        raise ConfigError(f"location {name!r} (type {kind or '?'}) is not an object store (gcs or s3)")
    cls = object_store_class(kind)
    common = {"prefix": location.prefix, "endpoint": location.endpoint}
    if kind == "gcs":
        info = None
        if location.credentials is not None:
            raw = resolve(location.credentials, what=f"location {name}: credentials").get_secret_value()
            try:
                info = json.loads(raw)
            except ValueError:
                raise ConfigError(f"location {name}: credentials are not a service-account JSON key") from None
        return cls(name, location.bucket, project=location.project, credentials_info=info, **common)
    keys = {}
    if location.access_key_id is not None:
        keys = {"access_key": resolve(location.access_key_id, what=f"location {name}: access_key_id").get_secret_value(),
                "secret_key": resolve(location.secret_access_key, what=f"location {name}: secret_access_key").get_secret_value()}
    return cls(name, location.bucket, region=location.region, **common, **keys)
