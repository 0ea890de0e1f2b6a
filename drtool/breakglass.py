"""The break-glass bundle: everything a restore needs that must not live only inside
Vault or the cluster, age-encrypted and written to every offsite object store.

What goes in is computed from the configuration, so that ``verify`` can say what is
missing: each vault location's unseal keys, each talos location's secrets bundle and
talosconfig, each restic repository's password (and its environment), each object
store's credentials, the ``include`` extras, the policy files themselves and an export
of the catalog's recovery points. Layout in each store:
``<prefix>/breakglass/<UTC time>/bundle.age`` and, written last, ``…/manifest.json``
(size and SHA-256 of the encrypted bundle, item names; never a value).

Inside the age envelope: a tar with ``bundle.json`` (format, created, items with their
SHA-256 and where each came from), ``items/<name>``, ``config/<file>`` and
``catalog.json``. Secrets are resolved at the last moment and only ever held in
memory; the bundle is small (kilobytes), so it is built in memory too.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from .errors import ConfigError, DrtoolError, SecretError, UsageError
from .secrets import SecretRef, register_secret, resolve

if TYPE_CHECKING:
    from .engine import Context

log = logging.getLogger("drtool.breakglass")
FORMAT = "drtool-breakglass/1"
PREFIX = "breakglass"
TIME_FORMAT = "%Y%m%dT%H%M%SZ"


@dataclass
class Item:
    name: str  # e.g. vault/vault-main/unseal-key-1
    ref: SecretRef
    why: str


@dataclass
class BuildResult:
    created: datetime
    items: list[str]
    missing: dict[str, str]  # name -> why it could not be read (never a value)
    written: dict[str, str] = field(default_factory=dict)  # location -> object key
    errors: dict[str, str] = field(default_factory=dict)  # location -> error

    def to_dict(self) -> dict[str, Any]:
        return {"created": self.created.isoformat(), "items": self.items, "missing": self.missing, "written": self.written,
                "errors": self.errors}


def required_items(cfg: Any) -> list[Item]:
    """Every secret a restore of this configuration needs, named by where it belongs."""
    items: list[Item] = []
    for name, loc in sorted(cfg.locations.items()):
        t = getattr(loc, "type", "")
        if t == "vault":
            for i, ref in enumerate(loc.unseal_keys, 1):
                items.append(Item(f"vault/{name}/unseal-key-{i}", ref, "unseals the restored Vault"))
        elif t == "talos":
            if loc.secrets_bundle is not None:
                items.append(Item(f"talos/{name}/secrets-bundle", loc.secrets_bundle, "rebuilds the cluster with its identity"))
            if loc.talosconfig is not None:
                items.append(Item(f"talos/{name}/talosconfig", loc.talosconfig, "talks to the nodes"))
        elif t == "restic":
            items.append(Item(f"restic/{name}/password", loc.password, "opens the repository"))
            for var, ref in sorted(loc.env.items()):
                items.append(Item(f"restic/{name}/env/{var}", ref, "reaches the repository"))
        elif t == "gcs" and loc.credentials is not None:
            items.append(Item(f"gcs/{name}/credentials", loc.credentials, "reads the bucket"))
        elif t == "s3" and loc.access_key_id is not None:
            items.append(Item(f"s3/{name}/access_key_id", loc.access_key_id, "reads the bucket"))
            items.append(Item(f"s3/{name}/secret_access_key", loc.secret_access_key, "reads the bucket"))
    bg = cfg.breakglass
    for name, ref in sorted((bg.include if bg else {}).items()):
        items.append(Item(f"extra/{name}", ref, "listed under breakglass.include"))
    return items


def targets(cfg: Any) -> list[str]:
    bg = _config(cfg)
    if bg.to:
        return list(bg.to)
    found = [n for n, loc in sorted(cfg.locations.items()) if getattr(loc, "type", "") in ("gcs", "s3")]
    if not found:
        raise ConfigError("the break-glass bundle goes to object stores, and the configuration has no gcs or s3 location: add one")
    return found


def _config(cfg: Any) -> Any:
    if cfg.breakglass is None:
        raise ConfigError("no 'breakglass:' section in the configuration: add one with the age recipients (see docs/breakglass.md)")
    return cfg.breakglass


def _recipients(strings: list[str]) -> list[Any]:
    import pyrage

    out = []
    for r in strings:
        try:
            out.append(pyrage.ssh.Recipient.from_str(r) if r.startswith("ssh-") else pyrage.x25519.Recipient.from_str(r))
        except Exception as exc:  # noqa: BLE001 - pyrage raises its own types
            raise ConfigError(f"breakglass.recipients: {r[:16]}… is not a valid age recipient ({type(exc).__name__})") from None
    return out


def _identity(cfg: Any) -> Any:
    import pyrage

    bg = _config(cfg)
    if bg.identity is None:
        raise ConfigError("breakglass.identity is not set: verify needs the offline age identity (a secret reference) to decrypt")
    raw = resolve(bg.identity, what="breakglass.identity").get_secret_value()
    keys = [line.strip() for line in raw.splitlines() if line.strip().startswith("AGE-SECRET-KEY-")]
    if not keys:
        raise SecretError(f"breakglass.identity ({bg.identity.describe()}) holds no AGE-SECRET-KEY-1… line")
    for k in keys:
        register_secret(k)
    return [pyrage.x25519.Identity.from_str(k) for k in keys]


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def _catalog_export(ctx: "Context") -> bytes:
    rows = [{"location": r.location, "point": r.point_id, "policy": r.policy, "leg": r.leg, "time": r.time.isoformat(),
             "size_bytes": r.size_bytes, "checksum": r.checksum} for r in ctx.catalog.points()]
    return json.dumps({"exported": ctx.now().isoformat(), "points": rows}, indent=1).encode()


def build(ctx: "Context", *, allow_missing: bool = False, dry_run: bool = False) -> BuildResult:
    """Resolve every item, encrypt the bundle, write it to every target store.
    A missing item fails the build (nothing is written) unless ``allow_missing``."""
    import pyrage

    from .backends import object_store_for

    cfg = ctx.cfg
    bg = _config(cfg)
    recipients = _recipients(bg.recipients)
    stores = targets(cfg)
    created = ctx.now().astimezone(timezone.utc).replace(microsecond=0)
    values: dict[str, SecretStr] = {}
    missing: dict[str, str] = {}
    items = required_items(cfg)
    for it in items:
        try:
            values[it.name] = resolve(it.ref, what=it.name)
        except SecretError as exc:
            missing[it.name] = str(exc)
    result = BuildResult(created=created, items=[it.name for it in items if it.name in values], missing=missing)
    if missing and not allow_missing:
        raise SecretError("the break-glass bundle would be incomplete, nothing was written: " +
                          "; ".join(missing.values()) + " (fix them, or pass --allow-missing)")
    if dry_run:
        return result

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        meta = {"format": FORMAT, "created": created.isoformat(), "missing": sorted(missing),
                "items": {it.name: {"sha256": hashlib.sha256(values[it.name].get_secret_value().encode()).hexdigest(),
                                    "from": it.ref.describe(), "why": it.why} for it in items if it.name in values}}
        _tar_add(tar, "bundle.json", json.dumps(meta, indent=1).encode())
        for name, v in values.items():
            _tar_add(tar, f"items/{name}", v.get_secret_value().encode())
        for f in cfg.files:
            p = Path(f)
            _tar_add(tar, f"config/{p.name}", p.read_bytes())
        _tar_add(tar, "catalog.json", _catalog_export(ctx))
    sealed = pyrage.encrypt(buf.getvalue(), recipients)
    digest = hashlib.sha256(sealed).hexdigest()
    stamp = f"{PREFIX}/{created:{TIME_FORMAT}}"
    manifest = {"format": FORMAT, "created": created.isoformat(), "object": f"{stamp}/bundle.age", "size": len(sealed),
                "sha256": digest, "items": sorted(values), "missing": sorted(missing), "recipients": bg.recipients}
    for name in stores:
        try:
            store = object_store_for(name, cfg.location(name))
            store.put_stream(f"{stamp}/bundle.age", io.BytesIO(sealed), metadata={"drtool-kind": "breakglass"})
            store.put_stream(f"{stamp}/manifest.json", io.BytesIO(json.dumps(manifest, indent=1).encode()),
                             metadata={"drtool-kind": "breakglass"})
            result.written[name] = f"{stamp}/bundle.age"
        except DrtoolError as exc:
            result.errors[name] = str(exc)
    return result


def _newest(store: Any) -> tuple[str, dict[str, Any]] | None:
    """(stamp, manifest) of the newest complete bundle in ``store``."""
    stamps = sorted({i.key.split("/")[1] for i in store.list(PREFIX + "/") if i.key.endswith("/manifest.json") and i.key.count("/") == 2})
    if not stamps:
        return None
    buf = io.BytesIO()
    store.get_stream(f"{PREFIX}/{stamps[-1]}/manifest.json", buf)
    return stamps[-1], json.loads(buf.getvalue())


def open_bundle(ctx: "Context", location: str) -> dict[str, Any]:
    """Download and decrypt the newest bundle in ``location``: {stamp, manifest, meta,
    items: {name: SecretStr}, files: [names], problems: [...]}. Values are registered
    with the masker as they are read."""
    import pyrage

    from .backends import object_store_for

    cfg = ctx.cfg
    identities = _identity(cfg)
    store = object_store_for(location, cfg.location(location))
    found = _newest(store)
    if found is None:
        raise DrtoolError(f"{location}: no break-glass bundle under {PREFIX}/ (run `drtool breakglass build`)")
    stamp, manifest = found
    buf = io.BytesIO()
    store.get_stream(manifest["object"], buf)
    sealed = buf.getvalue()
    problems: list[str] = []
    if hashlib.sha256(sealed).hexdigest() != manifest.get("sha256"):
        problems.append("the encrypted bundle's SHA-256 differs from its manifest")
    try:
        plain = pyrage.decrypt(sealed, identities)
    except Exception as exc:  # noqa: BLE001 - pyrage.DecryptError and friends
        raise DrtoolError(f"{location}: the bundle of {stamp} does not decrypt with breakglass.identity ({type(exc).__name__}: "
                          f"{exc}); is it the identity for the recipients {', '.join(r[:12] + '…' for r in manifest.get('recipients', []))}?") from None
    items: dict[str, SecretStr] = {}
    files: list[str] = []
    meta: dict[str, Any] = {}
    with tarfile.open(fileobj=io.BytesIO(plain), mode="r:") as tar:
        for m in tar:
            f = tar.extractfile(m) if m.isfile() else None
            if f is None:
                continue
            data = f.read()
            files.append(m.name)
            if m.name == "bundle.json":
                meta = json.loads(data)
            elif m.name.startswith("items/"):
                value = data.decode()
                register_secret(value)
                items[m.name[len("items/"):]] = SecretStr(value)
    if meta.get("format") != FORMAT:
        problems.append(f"unknown bundle format {meta.get('format')!r}")
    for name, info in meta.get("items", {}).items():
        v = items.get(name)
        if v is None:
            problems.append(f"{name} is listed but not in the bundle")
        elif hashlib.sha256(v.get_secret_value().encode()).hexdigest() != info.get("sha256"):
            problems.append(f"{name} does not match its recorded SHA-256")
    return {"stamp": stamp, "manifest": manifest, "meta": meta, "items": items, "files": files, "problems": problems}


def verify(ctx: "Context", *, compare_current: bool = True) -> dict[str, Any]:
    """For every target store: the newest bundle decrypts with the offline identity,
    is whole, and holds every item the configuration needs now. ``compare_current``:
    items whose current value differs (a rotated password) are reported as stale."""
    cfg = ctx.cfg
    need = required_items(cfg)
    out: dict[str, Any] = {"ok": True, "locations": {}}
    for name in targets(cfg):
        entry: dict[str, Any] = {"ok": False, "problems": [], "stale": [], "missing": []}
        out["locations"][name] = entry
        try:
            b = open_bundle(ctx, name)
        except DrtoolError as exc:
            entry["problems"].append(str(exc))
            out["ok"] = False
            continue
        entry.update(stamp=b["stamp"], created=b["meta"].get("created"), items=len(b["items"]))
        entry["problems"].extend(b["problems"])
        entry["missing"] = [it.name for it in need if it.name not in b["items"]]
        if not any(f.startswith("config/") for f in b["files"]):
            entry["problems"].append("the bundle holds no policy files")
        if "catalog.json" not in b["files"]:
            entry["problems"].append("the bundle holds no catalog export")
        if compare_current:
            for it in need:
                have = b["items"].get(it.name)
                if have is None:
                    continue
                try:
                    now = resolve(it.ref, what=it.name)
                except SecretError:
                    continue  # cannot compare here; the bundle still has it
                if now.get_secret_value() != have.get_secret_value():
                    entry["stale"].append(it.name)
        entry["ok"] = not (entry["problems"] or entry["missing"] or entry["stale"])
        out["ok"] = out["ok"] and entry["ok"]
    return out


def unseal_keys_from_bundle(ctx: "Context", location: str) -> list[SecretStr] | None:
    """The unseal keys of vault ``location`` from the newest bundle, when a bundle and an
    identity to open it are configured (None otherwise: the caller falls back to the
    location's own refs). A configured but unreadable bundle is an error."""
    cfg = ctx.cfg
    if cfg.breakglass is None or cfg.breakglass.identity is None:
        return None
    errors = []
    for name in targets(cfg):
        try:
            b = open_bundle(ctx, name)
        except DrtoolError as exc:
            errors.append(f"{name}: {exc}")
            continue
        keys = [v for k, v in sorted(b["items"].items()) if k.startswith(f"vault/{location}/unseal-key-")]
        if keys:
            return keys
        errors.append(f"{name}: the bundle of {b['stamp']} has no unseal keys for {location}")
    if errors:
        raise UsageError("the break-glass bundle cannot provide the unseal keys: " + "; ".join(errors))
    return None
