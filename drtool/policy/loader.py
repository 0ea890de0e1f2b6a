"""Load a configuration (one YAML file or a directory of them) and report every
error at once as ``file:line: field.path: message``, each with its fix."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError

from ..errors import ConfigError
from .models import LEG_KINDS, BreakGlass, LocationBase, Policy, PolicyFile

DEFAULT_CONFIG = "./policies"


@dataclass(frozen=True)
class Issue:
    file: str
    line: int  # 1-based; 0 when unknown
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class PolicyError(ConfigError):
    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        n = len(issues)
        super().__init__(f"{n} error{'s' if n != 1 else ''} in the configuration:\n" + "\n".join(f"  {i}" for i in issues))


@dataclass
class Config:
    locations: dict[str, LocationBase] = field(default_factory=dict)
    policies: dict[str, Policy] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    breakglass: BreakGlass | None = None

    def policy(self, name: str) -> Policy:
        try:
            return self.policies[name]
        except KeyError:
            raise ConfigError(f"no policy named {name!r}{_did_you_mean(name, self.policies)} (known: {', '.join(sorted(self.policies)) or 'none'})") from None

    def location(self, name: str) -> LocationBase:
        try:
            return self.locations[name]
        except KeyError:
            raise ConfigError(f"no location named {name!r}{_did_you_mean(name, self.locations)}") from None

    def select(self, policy: str | None = None) -> list[Policy]:
        return [self.policy(policy)] if policy else list(self.policies.values())


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def config_path(explicit: str | None) -> Path:
    return Path(explicit or os.environ.get("DRTOOL_CONFIG") or DEFAULT_CONFIG)


def _yaml_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            raise ConfigError(f"{path}: no *.yaml files in this directory (write one, see `drtool policy sample`)")
        return files
    if path.is_file():
        return [path]
    raise ConfigError(f"{path}: configuration not found (pass -c PATH, set DRTOOL_CONFIG, or create ./policies/)")


# ------------------------------------------------------------------ line lookup


def _node_line(root: Any, loc: tuple[Any, ...]) -> tuple[int, str]:
    """Walk the ruamel tree along a pydantic error location; return (line, dotted path).

    pydantic puts discriminator tags and ``[key]`` markers in ``loc``; those that
    do not name a child in the YAML are skipped.
    """
    node = root
    line = getattr(getattr(root, "lc", None), "line", -1)
    parts: list[str] = []
    for item in loc:
        if isinstance(node, CommentedMap) and item in node:
            try:
                line = node.lc.key(item)[0]
            except (KeyError, AttributeError, TypeError):
                pass
            parts.append(str(item))
            node = node[item]
        elif isinstance(node, CommentedSeq) and isinstance(item, int) and 0 <= item < len(node):
            try:
                line = node.lc.item(item)[0]
            except (KeyError, AttributeError, TypeError):
                pass
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
            node = node[item]
        elif item == "[key]":
            continue
        elif isinstance(node, CommentedMap) and isinstance(item, str) and node.get("type") == item:
            continue  # discriminator tag
        else:
            parts.append(str(item))
            node = None
    return line + 1, ".".join(parts)


def _fix_for(err: dict[str, Any], model_fields: Iterable[str] = ()) -> str:
    typ = err["type"]
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if typ == "extra_forbidden":
        name = str(err["loc"][-1])
        hint = _did_you_mean(name, model_fields)
        return f"unknown field {name!r}{hint}: remove it or fix its spelling"
    if typ == "missing":
        return f"required field {err['loc'][-1]!r} is missing: add it"
    if typ == "string_pattern_mismatch":
        from .models import NAME_HINT, NAME_PATTERN

        if err.get("ctx", {}).get("pattern") == NAME_PATTERN:
            return f"{err.get('input')!r} is not a valid name: {NAME_HINT}"
        return f"{err.get('input')!r} is not valid here: write a duration like '24h', '7d' or '1h30m'"
    if typ in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        return f"{msg}, got {err.get('input')!r}"
    if typ == "literal_error":
        return f"{msg}, got {err.get('input')!r}"
    if typ == "union_tag_invalid":
        return f"unknown type {err.get('ctx', {}).get('tag')!r}: use one of {err.get('ctx', {}).get('expected_tags')}"
    if typ == "union_tag_not_found":
        return "add 'type:' (one of filesystem, restic)"
    return msg


def _known_fields() -> list[str]:
    """Every field name of the policy models (for 'did you mean' on an unknown key)."""
    from pydantic import BaseModel

    from . import models

    names: set[str] = set()
    for obj in vars(models).values():
        if isinstance(obj, type) and issubclass(obj, BaseModel):
            names.update(obj.model_fields)
    return sorted(names)


# ------------------------------------------------------------------ loading


def _parse(file: Path, issues: list[Issue]) -> Any:
    yaml = YAML(typ="rt")
    try:
        data = yaml.load(file.read_text())
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        issues.append(Issue(str(file), (mark.line + 1) if mark else 0, "", f"YAML syntax: {exc.problem or exc}"))
        return None
    except OSError as exc:
        issues.append(Issue(str(file), 0, "", f"cannot read: {exc.strerror}"))
        return None
    if data is None:
        issues.append(Issue(str(file), 1, "", "the file is empty: add 'locations:' and/or 'policies:'"))
        return None
    if not isinstance(data, CommentedMap):
        issues.append(Issue(str(file), 1, "", "the top level must be a mapping with 'locations:' and/or 'policies:'"))
        return None
    return data


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k) if not isinstance(k, (int, float, bool)) else k: _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _only_command_uploads(legs: Any) -> bool:
    """Every leg streams a command's stdout: the source then needs no path (it only says
    where the production data lives, for 3-2-1)."""
    return isinstance(legs, CommentedSeq) and len(legs) > 0 and all(
        isinstance(leg, CommentedMap) and leg.get("kind") == "upload" and isinstance(leg.get("upload"), CommentedMap)
        and leg["upload"].get("command") for leg in legs)


def _source_issue(stype: str | None, loc: Any, source: Any) -> tuple[str, str] | None:
    """(field suffix, message) when a source does not fit its location's type."""
    if stype == "filesystem" and not source.get("path"):
        return ".path", "a filesystem source needs 'path': the absolute path(s) to protect"
    if stype == "zfs":
        ds = source.get("dataset")
        root = loc.get("dataset") if isinstance(loc, dict) else None
        if not ds:
            return ".dataset", "a zfs source needs 'dataset': the dataset to protect, e.g. tank/documents"
        if isinstance(root, str) and not (ds == root or str(ds).startswith(root + "/")):
            return ".dataset", f"dataset {ds!r} is not under the location's dataset {root!r}"
    if stype == "ceph-rbd" and not source.get("image"):
        return ".image", "a ceph-rbd source needs 'image': the RBD image to protect, e.g. csi-vol-3f2a"
    if stype == "cephfs":
        extra = [k for k in ("path", "dataset", "image") if source.get(k) is not None]
        if extra:
            return f".{extra[0]}", f"a cephfs source is the location's tree (its 'path' or 'subvolume'): remove '{extra[0]}'"
    if stype in ("vault", "talos"):
        extra = [k for k in ("path", "dataset") if source.get(k) is not None]
        if extra:
            return f".{extra[0]}", f"a {stype} source is the whole cluster: remove '{extra[0]}'"
    if source.get("canaries") and stype != "vault":
        return ".canaries", "canaries are secrets read back from a Vault snapshot: only vault sources have them"
    if stype == "snapraid":
        pool = loc.get("pool") if isinstance(loc, dict) else None
        paths = source.get("path")
        for p in ([paths] if isinstance(paths, str) else paths if isinstance(paths, list) else []):
            if isinstance(pool, str) and isinstance(p, str) and not (p == pool or p.startswith(pool.rstrip("/") + "/")):
                return ".path", f"path {p!r} is not inside the array's pool {pool!r}: name paths as seen through the pool"
    return None


def load_config(path: str | os.PathLike | None = None, *, paths: Iterable[str | os.PathLike] = ()) -> Config:
    """Load and validate. Raises PolicyError listing every issue found."""
    files: list[Path] = []
    for p in [*paths] or [config_path(str(path) if path else None)]:
        files.extend(_yaml_files(Path(p)))

    issues: list[Issue] = []
    cfg = Config(files=[str(f) for f in files])
    # where each named thing was defined, for duplicate and cross-reference errors
    loc_where: dict[str, tuple[str, int]] = {}
    pol_where: dict[str, tuple[str, int]] = {}
    bg_where: tuple[str, int] | None = None
    raw_trees: list[tuple[Path, Any]] = []

    for f in files:
        tree = _parse(f, issues)
        if tree is None:
            continue
        raw_trees.append((f, tree))
        try:
            pf = PolicyFile.model_validate(_plain(tree))
        except ValidationError as exc:
            for err in exc.errors():
                loc = tuple(err["loc"]) + (("type",) if err["type"].startswith("union_tag") else ())
                line, dotted = _node_line(tree, loc)
                fields = _known_fields() if err["type"] == "extra_forbidden" else ()
                issues.append(Issue(str(f), line, dotted, _fix_for(err, fields)))
            continue
        for name, loc in pf.locations.items():
            line, _ = _node_line(tree, ("locations", name))
            if name in loc_where:
                other = loc_where[name]
                issues.append(Issue(str(f), line, f"locations.{name}", f"location {name!r} is already defined at {other[0]}:{other[1]}: rename one"))
                continue
            loc_where[name] = (str(f), line)
            cfg.locations[name] = loc
        for i, pol in enumerate(pf.policies):
            line, _ = _node_line(tree, ("policies", i, "name"))
            if pol.name in pol_where:
                other = pol_where[pol.name]
                issues.append(Issue(str(f), line, f"policies[{i}].name", f"policy {pol.name!r} is already defined at {other[0]}:{other[1]}: rename one"))
                continue
            pol_where[pol.name] = (str(f), line)
            cfg.policies[pol.name] = pol
        if pf.breakglass is not None:
            line, _ = _node_line(tree, ("breakglass",))
            if bg_where:
                issues.append(Issue(str(f), line, "breakglass", f"a break-glass bundle is already defined at {bg_where[0]}:{bg_where[1]}: keep one"))
            else:
                bg_where = (str(f), line)
                cfg.breakglass = pf.breakglass

    # Cross-references, on the raw trees so that they are reported even for files
    # that failed validation: every error at once.
    raw_locations: dict[str, Any] = {}
    for f, tree in raw_trees:
        locs = tree.get("locations")
        if isinstance(locs, CommentedMap):
            for name, body in locs.items():
                raw_locations.setdefault(str(name), body)

    from ..legs import DRIVERS, driver_class  # what this drtool can run: (leg kind, location type)

    supported_types = {k: tuple(sorted(t for kk, t in DRIVERS if kk == k)) for k in LEG_KINDS}

    def loc_type(name: str) -> str | None:
        body = raw_locations.get(name)
        return str(body.get("type")) if isinstance(body, dict) and body.get("type") is not None else None

    for f, tree in raw_trees:
        pols = tree.get("policies")
        if not isinstance(pols, CommentedSeq):
            continue
        for i, pol in enumerate(pols):
            if not isinstance(pol, CommentedMap):
                continue
            source = pol.get("source")
            src_name = source.get("location") if isinstance(source, CommentedMap) else None
            if isinstance(src_name, str) and src_name not in raw_locations:
                line, dotted = _node_line(tree, ("policies", i, "source", "location"))
                issues.append(Issue(str(f), line, dotted, f"unknown location {src_name!r}{_did_you_mean(src_name, raw_locations)}: define it under 'locations:'"))
            elif isinstance(src_name, str) and not _only_command_uploads(pol.get("legs")):
                issue = _source_issue(loc_type(src_name), raw_locations.get(src_name), source)
                if issue:
                    line, dotted = _node_line(tree, ("policies", i, "source"))
                    issues.append(Issue(str(f), line, dotted + issue[0], issue[1]))
            legs = pol.get("legs")
            if not isinstance(legs, CommentedSeq):
                continue
            kinds = [leg.get("kind") for leg in legs if isinstance(leg, CommentedMap)]
            src_type = loc_type(src_name) if isinstance(src_name, str) else None
            if src_type in ("zfs", "ceph-rbd") and "upload" in kinds and "snapshot" not in kinds:
                line, dotted = _node_line(tree, ("policies", i, "legs", kinds.index("upload"), "kind"))
                issues.append(Issue(str(f), line, dotted, f"an upload leg of a {src_type} source sends the policy's own snapshots: add a snapshot leg"))
            if "replicate" in kinds and "snapshot" not in kinds:
                line, dotted = _node_line(tree, ("policies", i, "legs", kinds.index("replicate"), "kind"))
                issues.append(Issue(str(f), line, dotted, "a replicate leg sends the policy's own snapshots: add a snapshot leg to this policy"))
            if "replicate" in kinds and isinstance(source, CommentedMap) and source.get("recursive") is True:
                line, dotted = _node_line(tree, ("policies", i, "source", "recursive"))
                issues.append(Issue(str(f), line, dotted, "replicating a recursive source (its child datasets) is not supported yet: "
                                    "it would copy the top dataset only; write one policy per dataset"))
            for j, leg in enumerate(legs):
                if not isinstance(leg, CommentedMap):
                    continue
                kind, to = leg.get("kind"), leg.get("to")
                verify = leg.get("verify")
                where_type = loc_type(to) if isinstance(to, str) else (loc_type(src_name) if isinstance(src_name, str) else None)
                driver = driver_class(str(kind), str(where_type))
                if driver is not None and isinstance(verify, CommentedMap) and verify.get("level") not in (None, "exists", *driver.levels):
                    line, dotted = _node_line(tree, ("policies", i, "legs", j, "verify", "level"))
                    issues.append(Issue(str(f), line, dotted, f"a {kind} leg on a {where_type} location can verify at: "
                                        f"{', '.join(('exists', *driver.levels))} (not {verify.get('level')!r})"))
                up = leg.get("upload")
                if kind == "upload" and isinstance(up, CommentedMap) and up.get("content") is not None and \
                        isinstance(src_name, str) and loc_type(src_name) != "talos":
                    line, dotted = _node_line(tree, ("policies", i, "legs", j, "upload", "content"))
                    issues.append(Issue(str(f), line, dotted, "'content' picks what a talos source uploads: remove it for this source"))
                if to is None:
                    stype = loc_type(src_name) if isinstance(src_name, str) else None
                    if kind in supported_types and stype is not None and stype not in supported_types[kind]:
                        line, dotted = _node_line(tree, ("policies", i, "legs", j, "kind"))
                        supported = ", ".join(supported_types[kind]) or "none in this drtool version"
                        issues.append(Issue(str(f), line, dotted, f"a {kind} leg is not supported on a {stype} source (supported: {supported})"))
                    continue
                if not isinstance(to, str):
                    continue
                line, dotted = _node_line(tree, ("policies", i, "legs", j, "to"))
                if to not in raw_locations:
                    issues.append(Issue(str(f), line, dotted, f"unknown location {to!r}{_did_you_mean(to, raw_locations)}: define it under 'locations:'"))
                    continue
                ttype = loc_type(to)
                allowed = supported_types.get(str(kind), ())
                platform_src = isinstance(src_name, str) and loc_type(src_name) in ("vault", "talos", "cephfs")
                if kind == "backup" and isinstance(src_name, str) and loc_type(src_name) not in (None, "filesystem", "snapraid", "vault", "talos", "cephfs"):
                    issues.append(Issue(str(f), line, dotted, f"backup legs read files, a CephFS snapshot, a Vault or an etcd: the source must be a filesystem or snapraid location with 'path', or a cephfs, vault or talos location (this one is {loc_type(src_name)})"))
                elif kind == "backup" and not platform_src and isinstance(source, CommentedMap) and not source.get("path"):
                    issues.append(Issue(str(f), line, dotted, "backup legs read files: give the source a 'path' (the directories to back up)"))
                elif kind == "upload" and isinstance(source, CommentedMap) and not source.get("path") and not (
                        isinstance(leg.get("upload"), CommentedMap) and leg["upload"].get("command")) and not (
                        isinstance(src_name, str) and loc_type(src_name) in ("zfs", "vault", "talos", "ceph-rbd")):
                    issues.append(Issue(str(f), line, dotted, "an upload leg streams the source's 'path' (a file, or a directory as tar) "
                                        "or the stdout of 'upload: {command: [...]}': give one of them"))
                elif kind in supported_types and ttype not in allowed:
                    fix = f"point it at a location of type {' or '.join(allowed)}" if allowed else f"{kind} legs are not supported by this drtool version yet"
                    issues.append(Issue(str(f), line, dotted, f"a {kind} leg cannot write to {to!r} (type {ttype}): {fix}"))
                if to == src_name:
                    issues.append(Issue(str(f), line, dotted, f"the {kind} leg targets the source's own location {to!r}: a copy must go elsewhere"))


    for f, tree in raw_trees:
        bg = tree.get("breakglass")
        targets = bg.get("to") if isinstance(bg, CommentedMap) else None
        for k, name in enumerate(targets if isinstance(targets, CommentedSeq) else []):
            line, dotted = _node_line(tree, ("breakglass", "to", k))
            if name not in raw_locations:
                issues.append(Issue(str(f), line, dotted, f"unknown location {name!r}{_did_you_mean(str(name), raw_locations)}: define it under 'locations:'"))
            elif loc_type(name) not in ("gcs", "s3"):
                issues.append(Issue(str(f), line, dotted, f"the bundle goes to object stores: {name!r} is a {loc_type(name)} location (use a gcs or s3 one)"))

    if issues:
        raise PolicyError(sorted(issues, key=lambda i: (i.file, i.line)))
    return cfg
