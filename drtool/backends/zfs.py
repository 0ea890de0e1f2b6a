"""ZFS: a thin wrapper over the ``zfs``/``zpool`` CLIs (no engine logic here).

Every command goes through ``drtool.exec.run`` with ``LC_ALL=C TZ=UTC`` (stable
usage text and ``zpool status`` dates), locally or as ``ssh -o BatchMode=yes HOST
-- env LC_ALL=C TZ=UTC zfs …`` with each remote word ``shlex.quote``d. Written for
the subset zfs-fuse 0.7 (pool v23) has (``zfs get -H -p``, user properties, holds);
``features()`` detects newer OpenZFS abilities. zfs-fuse quirks are noted where met.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from .. import exec as ex
from .. import pipes
from ..errors import ToolError
from .base import ProgressFn

log = logging.getLogger("drtool.zfs")

CMD_TIMEOUT_S = 300.0
STREAM_TIMEOUT_S = 24 * 3600.0
BUSY_RETRY_S = 5.0
FEATURES_TTL_S = 24 * 3600.0
SNAP_PROPS = "type,guid,createtxg,creation,used,referenced,userrefs"


class ZfsError(ToolError):
    """A zfs/zpool command failed; ``stderr`` is its (usage-trimmed) error text."""


class ZfsNotFound(ZfsError):
    """The dataset, snapshot or pool does not exist."""


class ZfsDiverged(ZfsError):
    """A receive cannot apply: the target changed, or it does not hold the stream's base."""


class ZfsUnsupported(ZfsError):
    """This zfs binary cannot do that (see ``ZfsFeatures``)."""


@dataclass(frozen=True)
class ZfsFeatures:
    """What the binary can do, read from the usage text ``zfs`` prints without
    arguments, plus one probe of ``zfs holds``. zfs-fuse 0.7: only ``snapshot_properties``."""

    parsable_list: bool = False  # "p" among `list`'s flags
    bookmarks: bool = False  # a `bookmark` subcommand
    resume_tokens: bool = False  # `send -t <token>` and `receive -s`
    compressed_send: bool = False  # `send -c`
    raw_send: bool = False  # `send -w`
    snapshot_properties: bool = False  # `snapshot -o prop=value`
    holds_list: bool = False  # `zfs holds` works (zfs-fuse's needs a pyzfs.py it lacks)


@dataclass(frozen=True)
class ZfsSnapshot:
    name: str  # pool/ds@snap
    dataset: str
    snap: str
    guid: str  # uint64 as decimal text (too big for SQLite and JSON integers)
    createtxg: int
    creation: datetime  # aware, UTC
    used: int
    referenced: int
    userrefs: int  # number of holds
    properties: dict[str, str] = field(default_factory=dict)  # user props set on it (local/received)


@dataclass(frozen=True)
class PoolDevice:
    name: str
    state: str
    read: int
    write: int
    cksum: int
    depth: int  # 0 = the pool itself


@dataclass(frozen=True)
class PoolStatus:
    pool: str
    state: str  # ONLINE, DEGRADED, FAULTED, …
    scan_function: str | None  # "scrub" | "resilver" | None (never scanned)
    scan_state: str  # none | in_progress | completed | stopped | canceled | paused | unknown
    scan_end: datetime | None
    scan_errors: int | None
    scan_percent: float | None
    data_errors: int
    error_files: list[str]
    devices: list[PoolDevice]
    status: str | None = None
    action: str | None = None

    @property
    def last_scrub_end(self) -> datetime | None:
        return self.scan_end if (self.scan_function, self.scan_state) == ("scrub", "completed") else None

    @property
    def healthy(self) -> bool:
        return (self.state == "ONLINE" and self.data_errors == 0 and not self.scan_errors
                and all(d.read == d.write == d.cksum == 0 for d in self.devices))


@dataclass
class StreamResult:
    bytes: int
    duration_s: float
    commands: list[dict[str, Any]]


# -- pure parsing (tested with captured output) ------------------------------

_FLAG_RE = re.compile(r"(?:^|[\s\[|])-([A-Za-z]+)|-\[([A-Za-z]+)\]")


def parse_usage(text: str) -> dict[str, set[str]]:
    """``zfs`` usage text -> {subcommand: single-letter flags over all its forms}."""
    out: dict[str, set[str]] = {}
    current = None
    for line in text.splitlines():
        if m := re.match(r"^\t([a-z][a-z_-]*)\b(.*)$", line):
            current, rest = m.group(1), m.group(2)
        elif current and re.match(r"^\t\s+\S", line):  # continuation line
            rest = line
        else:
            current = None
            continue
        out.setdefault(current, set()).update("".join(a or b for a, b in _FLAG_RE.findall(rest)))
    return out


def features_from_usage(usage: str, holds_probe: str) -> ZfsFeatures:
    u = parse_usage(usage)
    send, recv = u.get("send", set()), u.get("receive", u.get("recv", set()))
    return ZfsFeatures(
        parsable_list="p" in u.get("list", set()), bookmarks="bookmark" in u,
        resume_tokens="t" in send and "s" in recv, compressed_send="c" in send, raw_send="w" in send,
        snapshot_properties="o" in u.get("snapshot", set()),
        holds_list="holds" in u and "internal error" not in holds_probe)


def send_args(snapshot: str, *, base: str | None = None, incremental_all: bool = False, features: ZfsFeatures = ZfsFeatures(),
              raw: bool = False, token: str | None = None) -> list[str]:
    """``zfs send`` arguments for what the binary can do.

    - ``token``: resume an interrupted receive (``send -t``; nothing else applies).
    - ``raw`` (an encrypted source, where ``send -w`` exists): the blocks go as stored, so
      the replica holds ciphertext and no key is needed on the target.
    - otherwise ``-c`` where supported: compressed blocks stay compressed on the wire.
    - ``base``: a snapshot (``-I`` keeps the intermediate snapshots when
      ``incremental_all``) or a bookmark ``ds#name`` (always ``-i``: a bookmark has no
      intermediate snapshots to carry)."""
    if token:
        return ["send", "-t", token]
    flags = ["-w"] if raw and features.raw_send else ["-c"] if features.compressed_send else []
    if base:
        flags += ["-i" if "#" in base or not incremental_all else "-I", base]
    return ["send", *flags, snapshot]


def receive_args(target: str, *, force: bool = False, features: ZfsFeatures = ZfsFeatures()) -> list[str]:
    """``zfs receive`` arguments: ``-s`` where resume tokens exist (an interrupted receive
    then leaves a token to continue from, instead of starting over), ``-F`` only when forced."""
    return ["receive", *(["-s"] if features.resume_tokens else []), *(["-F"] if force else []), target]


def _get_rows(text: str) -> Iterable[tuple[str, str, str, str]]:
    """``zfs get -H -o name,property,value,source`` lines (a value may hold tabs)."""
    for parts in (line.split("\t") for line in text.splitlines()):
        if len(parts) >= 4:
            yield parts[0], parts[1], "\t".join(parts[2:-1]), parts[-1]


def parse_snapshots(native: str, user: str) -> list[ZfsSnapshot]:
    """``zfs get -H -p`` of SNAP_PROPS, and of ``all`` for user properties -> snapshots
    by createtxg. Only properties set on the snapshot itself count: an inherited
    ``drtool:policy`` would make someone else's snapshot look like drtool's."""
    props: dict[str, dict[str, str]] = {}
    for name, prop, value, _ in _get_rows(native):
        props.setdefault(name, {})[prop] = value
    mine: dict[str, dict[str, str]] = {}
    for name, prop, value, src in _get_rows(user):
        if ":" in prop and src in ("local", "received"):
            mine.setdefault(name, {})[prop] = value
    snaps = [
        ZfsSnapshot(name=name, dataset=name.partition("@")[0], snap=name.partition("@")[2], guid=p["guid"],
                    createtxg=int(p["createtxg"]), creation=datetime.fromtimestamp(int(p["creation"]), timezone.utc),
                    used=int(p.get("used", 0)), referenced=int(p.get("referenced", 0)),
                    userrefs=int(p.get("userrefs", 0)), properties=mine.get(name, {}))
        for name, p in props.items() if p.get("type") == "snapshot" and "@" in name]
    return sorted(snaps, key=lambda s: (s.createtxg, s.name))


def _count(text: str) -> int:
    m = re.fullmatch(r"([\d.]+)([KMGTPE]?)", text)
    return int(float(m.group(1)) * 1000 ** " KMGTPE".index(m.group(2) or " ")) if m else 0


def parse_scan(line: str) -> tuple[str | None, str, datetime | None, int | None, float | None]:
    """The ``scrub:`` (zfs-fuse, Solaris) or ``scan:`` (OpenZFS) text of zpool status ->
    (function, state, end, errors, percent). Dates are ctime(3) text in UTC (TZ=UTC)."""
    line = " ".join(line.split())
    if not line or line.startswith("none requested"):
        return None, "none", None, None, None
    fn = "resilver" if line.startswith("resilver") else "scrub" if line.startswith("scrub") else None
    errors, pct = re.search(r"with (\d+) errors", line), re.search(r"([\d.]+)% done", line)
    n_err, percent = int(errors.group(1)) if errors else None, float(pct.group(1)) if pct else None
    end = None
    if on := re.search(r" on (\w{3} \w{3} +\d+ [\d:]+ \d{4})", line):
        end = datetime.strptime(on.group(1), "%a %b %d %H:%M:%S %Y").replace(tzinfo=timezone.utc)
    if "in progress" in line:
        return fn, "in_progress", None, n_err, percent
    for state in ("canceled", "stopped", "paused"):
        if state in line:
            return fn, state, end, n_err, percent
    if end is not None:  # "scrub completed after …" / "scrub repaired 0B in … on …"
        return fn, "completed", end, n_err, 100.0
    return fn, "unknown", None, n_err, percent


def parse_pool_status(text: str) -> PoolStatus:
    """``zpool status -v POOL`` (one pool) -> PoolStatus."""
    fields: dict[str, str] = {}
    devices: list[PoolDevice] = []
    files: list[str] = []
    key = None
    for line in text.splitlines():
        m = re.match(r"^\s*(pool|state|status|action|scrub|scan|see|config|errors):\s?(.*)$", line)
        if m and not (key == "config" and line.startswith("\t")):
            key, fields[m.group(1)] = m.group(1), m.group(2).strip()
        elif key == "config" and line.startswith("\t"):
            cols = line[1:].split()
            if len(cols) >= 5 and cols[0] != "NAME" and cols[1].isupper():
                depth = (len(line[1:]) - len(line[1:].lstrip(" "))) // 2
                devices.append(PoolDevice(cols[0], cols[1], *(_count(c) for c in cols[2:5]), depth))
        elif key == "errors" and line.strip():
            files.append(line.strip())
        elif key in ("status", "action", "scan", "scrub") and line.startswith("\t"):
            fields[key] += " " + line.strip()
    fn, st, end, n_err, pct = parse_scan(fields.get("scan", fields.get("scrub", "")))
    err_text = fields.get("errors", "")
    n = re.match(r"(\d+) data errors", err_text)
    data_errors = 0 if err_text.startswith("No known") else int(n.group(1)) if n else max(len(files), 1 if err_text else 0)
    return PoolStatus(
        pool=fields.get("pool", ""), state=fields.get("state", "UNKNOWN"), scan_function=fn, scan_state=st,
        scan_end=end, scan_errors=n_err, scan_percent=pct, data_errors=data_errors, error_files=files,
        devices=devices, status=fields.get("status"), action=fields.get("action"))


def _error_text(result: ex.CommandResult) -> str:
    """The error up to any usage dump, one line (zfs wraps messages at 80 columns);
    stderr, else stdout (zfs-fuse prints some errors there)."""
    lines = []
    for ln in result.stderr_lines or (result.stdout or "").splitlines():
        if ln.strip().startswith("usage:"):
            break
        lines.append(ln.strip())
    return " ".join(filter(None, lines)) or f"exit status {result.returncode}"


def _err(result: ex.CommandResult, what: str) -> ZfsError:
    err = _error_text(result)
    cls = ZfsNotFound if "does not exist" in err or "no such pool" in err else ZfsError
    return cls(f"{what}: {err}", err)


def _opts(properties: dict[str, str] | None) -> list[str]:
    return [a for k, v in (properties or {}).items() for a in ("-o", f"{k}={v}")]


# -- the CLI wrapper ---------------------------------------------------------


class ZfsCli:
    """``zfs``/``zpool`` on this host, or on ``ssh`` (``user@host``). ``commands`` keeps
    the exec log entries of the last 500 commands (masked argv, code, duration)."""

    def __init__(self, ssh: str | None = None, *, ssh_options: Iterable[str] = (), zfs: str | None = None,
                 zpool: str | None = None, features: ZfsFeatures | None = None, timeout: float = CMD_TIMEOUT_S,
                 features_cache: Path | None = None) -> None:
        self.ssh, self.timeout, self._features, self.features_cache = ssh, timeout, features, features_cache
        self.ssh_options = list(ssh_options)  # e.g. ["-p", "2222", "-i", KEY]: before the host
        self.zfs_bin = zfs or os.environ.get("DRTOOL_ZFS") or "zfs"
        self.zpool_bin = zpool or os.environ.get("DRTOOL_ZPOOL") or "zpool"
        self.commands: collections.deque[dict[str, Any]] = collections.deque(maxlen=500)

    def argv(self, binary: str, *args: str) -> list[str]:
        if self.ssh is None:
            return [binary, *args]
        remote = ["env", "LC_ALL=C", "TZ=UTC", binary, *args]
        return ["ssh", "-o", "BatchMode=yes", *self.ssh_options, self.ssh, "--", *(shlex.quote(a) for a in remote)]

    def _run(self, binary: str, *args: str, what: str | None = None, ok_if: str | None = None, **kw: Any) -> ex.CommandResult:
        """Run one command. With ``what``, a failure raises ``ZfsError("what: error")``,
        unless its error text contains ``ok_if`` (then the failed result is returned)."""
        kw.setdefault("timeout", self.timeout)
        env = None if self.ssh else {"LC_ALL": "C", "TZ": "UTC"}
        res = ex.run(self.argv(binary, *args), tool=os.path.basename(binary), env=env, check=False, **kw)
        self.commands.append(res.log_entry())
        if what is not None and not res.ok and not (ok_if and ok_if in _error_text(res)):
            raise _err(res, what)
        return res

    def _zfs(self, *args: str, what: str | None = None, **kw: Any) -> ex.CommandResult:
        return self._run(self.zfs_bin, *args, what=what or f"zfs {args[0]} {args[-1]} failed", **kw)

    def features(self) -> ZfsFeatures:
        """What this zfs can do: probed once (two calls), then cached in ``features_cache``
        (a JSON file) for a day, keyed by host and binary (a local binary's mtime too)."""
        if self._features is None:
            self._features = self._cached_features()
        if self._features is None:
            usage = self._run(self.zfs_bin)  # no subcommand: usage on stderr, exit 2
            probe = self._run(self.zfs_bin, "holds")  # zfs-fuse: "internal error: …pyzfs.py not found"
            text = [("\n".join(r.stderr_lines) + "\n" + (r.stdout or "")) for r in (usage, probe)]
            self._features = features_from_usage(*text)
            self._store_features(self._features)
        return self._features

    def _features_key(self) -> str | None:
        if self.ssh:
            return f"ssh:{self.ssh}:{' '.join(self.ssh_options)}:{self.zfs_bin}"
        path = shutil.which(self.zfs_bin)
        if path is None:
            return None
        st = os.stat(path)
        return f"local:{os.path.realpath(path)}:{st.st_mtime_ns}:{st.st_size}"

    def _cached_features(self) -> ZfsFeatures | None:
        if self.features_cache is None:
            return None
        try:
            key = self._features_key()
            entry = json.loads(self.features_cache.read_text()).get(key or "")
            if entry and time.time() - entry["at"] < FEATURES_TTL_S:
                return ZfsFeatures(**entry["features"])
        except (OSError, ValueError, TypeError, KeyError):
            pass
        return None

    def _store_features(self, features: ZfsFeatures) -> None:
        if self.features_cache is None:
            return
        try:
            key = self._features_key()
            if key is None:
                return
            try:
                data = json.loads(self.features_cache.read_text())
            except (OSError, ValueError):
                data = {}
            data[key] = {"at": time.time(), "features": dataclasses.asdict(features)}
            self.features_cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.features_cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.features_cache)
        except OSError:
            log.debug("could not cache zfs features", exc_info=True)

    # -- datasets and properties
    def dataset_exists(self, name: str) -> bool:
        return self._zfs("list", "-H", "-o", "name", name, ok_if="does not exist").ok

    def create_dataset(self, name: str, *, properties: dict[str, str] | None = None, parents: bool = False) -> None:
        self._zfs("create", *(["-p"] if parents else []), *_opts(properties), name)

    def destroy_dataset(self, name: str, *, recursive: bool = False) -> None:
        """Destroy a filesystem or clone (snapshots: ``destroy_snapshot``). Retries while
        "busy": zfs-fuse keeps a just-read mount busy for a moment."""
        if "@" in name:
            raise ValueError(f"{name!r} is a snapshot; use destroy_snapshot")
        deadline = time.monotonic() + BUSY_RETRY_S
        while not self._zfs("destroy", *(["-r"] if recursive else []), name,
                            ok_if="dataset is busy" if time.monotonic() < deadline else None).ok:
            time.sleep(0.1)

    def unmount(self, name: str) -> None:
        """Unmount a filesystem (a no-op when it is not mounted); retries while busy."""
        deadline = time.monotonic() + BUSY_RETRY_S
        while True:
            res = self._run(self.zfs_bin, "unmount", name)  # no ``what``: failures come back to be judged
            err = "" if res.ok else _error_text(res)
            if res.ok or "not currently mounted" in err:
                return
            if "busy" not in err or time.monotonic() >= deadline:
                raise _err(res, f"zfs unmount {name} failed")
            time.sleep(0.2)

    def set_property(self, name: str, prop: str, value: str) -> None:
        self._zfs("set", f"{prop}={value}", name)

    def get_property(self, name: str, prop: str) -> str | None:
        """The value, or None for an unset user property. On zfs-fuse, a mounted dataset's
        ``readonly`` reads "off" (source "temporary") even while readonly=on is in force."""
        out = self._zfs("get", "-H", "-p", "-o", "value,source", prop, name).stdout or ""
        value, _, source = out.rstrip("\n").rpartition("\t")
        return None if value == "-" and source == "-" else value

    # -- snapshots
    def snapshot(self, dataset: str, name: str, *, recursive: bool = False, properties: dict[str, str] | None = None) -> str:
        """Create ``dataset@name`` with user properties (``drtool:…``); returns the full name.
        A binary without ``snapshot -o`` gets them by ``zfs set`` right after."""
        props = dict(properties or {})
        if bad := [k for k in props if ":" not in k]:
            raise ValueError(f"user properties need a ':' in their name: {bad}")
        full, inline = f"{dataset}@{name}", self.features().snapshot_properties
        self._zfs("snapshot", *(["-r"] if recursive else []), *(_opts(props) if inline else []), full)
        if props and not inline:
            targets = [s.name for s in self.list_snapshots(dataset, recursive=True) if s.snap == name] if recursive else [full]
            for k, v in props.items():
                self._zfs("set", f"{k}={v}", *targets)
        return full

    def list_snapshots(self, dataset: str, *, recursive: bool = False) -> list[ZfsSnapshot]:
        """Snapshots of ``dataset`` (and of its descendants when ``recursive``): two calls in all."""
        opts = ["-H", "-p", *(["-r"] if recursive else ["-d", "1"]), "-o", "name,property,value,source"]
        native = self._zfs("get", *opts, SNAP_PROPS, dataset)
        user = self._zfs("get", *opts, "-s", "local,received", "all", dataset)
        snaps = parse_snapshots(native.stdout or "", user.stdout or "")
        return snaps if recursive else [s for s in snaps if s.dataset == dataset]

    def destroy_snapshot(self, full_name: str) -> None:
        if "@" not in full_name:
            raise ValueError(f"refusing to destroy {full_name!r}: not a snapshot name (no '@')")
        what = f"cannot destroy snapshot {full_name}"
        res = self._zfs("destroy", full_name, what=what, ok_if="dataset is busy")
        if not res.ok and (refs := self.get_property(full_name, "userrefs")) not in (None, "0"):
            raise ZfsError(f"{what}: it is held ({refs} hold(s)); release the hold first (zfs release TAG {full_name})",
                           _error_text(res))
        if not res.ok:
            raise _err(res, what)

    def hold(self, tag: str, full_name: str) -> bool:
        """Place hold ``tag``; False when that tag was already there (idempotent)."""
        return self._zfs("hold", tag, full_name, what=f"cannot hold {full_name}", ok_if="tag already exists").ok

    def release(self, tag: str, full_name: str, *, missing_ok: bool = False) -> None:
        self._zfs("release", tag, full_name, what=f"cannot release {tag!r} from {full_name}",
                  ok_if="no such tag" if missing_ok else None)

    def holds(self, full_name: str) -> list[str]:
        """Hold tags on a snapshot. zfs-fuse cannot list them, only count them (``userrefs``)."""
        if not self.features().holds_list:
            raise ZfsUnsupported(f"this zfs cannot list holds of {full_name} (zfs-fuse: 'zfs holds' is broken); "
                                 "use ZfsSnapshot.userrefs and the tags you placed")
        out = self._zfs("holds", "-H", full_name).stdout or ""
        return [ln.split("\t")[1] for ln in out.splitlines() if "\t" in ln]

    def clone(self, snapshot: str, new_dataset: str, *, properties: dict[str, str] | None = None) -> None:
        self._zfs("clone", *_opts(properties), snapshot, new_dataset)

    def rollback(self, snapshot: str, *, destroy_newer: bool = False) -> None:
        """Roll back; refuses when newer snapshots exist unless ``destroy_newer`` (``-r``)."""
        newer = "more recent snapshots exist"
        res = self._zfs("rollback", *(["-r"] if destroy_newer else []), snapshot, what=f"cannot roll back to {snapshot}", ok_if=newer)
        if not res.ok:
            raise ZfsError(f"cannot roll back to {snapshot}: {_error_text(res)} (pass destroy_newer=True to destroy them)",
                           _error_text(res))

    # -- OpenZFS extras (feature-gated; zfs-fuse has none of them)
    def bookmark(self, snapshot: str, bookmark: str) -> None:
        """``zfs bookmark ds@snap ds#name``: a replication base that survives the snapshot."""
        if not self.features().bookmarks:
            raise ZfsUnsupported("this zfs has no bookmarks")
        self._zfs("bookmark", snapshot, bookmark)

    def list_bookmarks(self, dataset: str) -> list[tuple[str, str]]:
        """(``ds#name``, guid) of the dataset's bookmarks; [] where bookmarks do not exist."""
        if not self.features().bookmarks:
            return []
        out = self._zfs("list", "-H", "-p", "-t", "bookmark", "-d", "1", "-o", "name,guid", dataset).stdout or ""
        return [(a, b) for a, _, b in (ln.partition("\t") for ln in out.splitlines()) if "#" in a]

    def destroy_bookmark(self, name: str) -> None:
        if "#" not in name:
            raise ValueError(f"refusing to destroy {name!r}: not a bookmark name (no '#')")
        self._zfs("destroy", name, ok_if="could not find any snapshots to destroy")

    def resume_token(self, dataset: str) -> str | None:
        """The ``receive_resume_token`` an interrupted ``receive -s`` left, else None."""
        if not self.features().resume_tokens:
            return None
        try:
            value = self.get_property(dataset, "receive_resume_token")
        except ZfsNotFound:  # nothing received yet
            return None
        return value if value not in (None, "", "-") else None

    def encrypted(self, dataset: str) -> bool:
        """Whether ``dataset`` is encrypted (only asked where ``send -w`` exists)."""
        if not self.features().raw_send:
            return False
        return (self.get_property(dataset, "encryption") or "off") not in ("off", "-")

    # -- pools
    def scrub(self, pool: str) -> None:
        """Start a scrub; it runs on after this returns (follow it with ``pool_status``)."""
        self._run(self.zpool_bin, "scrub", pool, what=f"zpool scrub {pool} failed")

    def pool_status(self, pool: str) -> PoolStatus:
        res = self._run(self.zpool_bin, "status", "-v", pool, what=f"zpool status {pool} failed")
        return parse_pool_status(res.stdout or "")

    # -- replication
    def send_receive(self, source_snapshot: str, target_dataset: str, *, base: str | None = None,
                     incremental_all: bool = False, force: bool = False, target: ZfsCli | None = None,
                     raw: bool = False, token: str | None = None,
                     progress: ProgressFn | None = None, timeout: float = STREAM_TIMEOUT_S) -> StreamResult:
        """``zfs send [-i|-I base] SRC | zfs receive [-F] TARGET`` in constant memory.

        Each side runs through ``exec.run`` in its own thread on an OS pipe; this thread
        moves the stream between the two pipes ≤1 MiB at a time (splice(2): the bytes stay
        in the kernel), counting them for ``progress``. When the receive dies, the copy
        stops and closes the send's pipe (EPIPE ends the send, as in a shell pipeline);
        when the send ends, the receive gets EOF. The error names the side that failed
        first. ``target``: the ZfsCli of another host (``ssh=``)."""
        if "@" not in source_snapshot and not token:
            raise ValueError(f"{source_snapshot!r} is not a snapshot")
        target = target or self
        if base and not target.dataset_exists(target_dataset):  # zfs-fuse would receive it into
            raise ZfsNotFound(  # ANY dataset holding the base snapshot (found by guid)
                f"incremental receive needs the target {target_dataset}, which does not exist; send a full stream first")
        sargs = send_args(source_snapshot, base=base, incremental_all=incremental_all, features=self.features(), raw=raw, token=token)
        rargs = receive_args(target_dataset, force=force, features=target.features())
        (from_send, send_out), (recv_in, to_recv) = pipes.pipe(), pipes.pipe()
        box: dict[str, Any] = {}
        start = time.monotonic()
        sender = pipes.side(box, "send", send_out, name="zfs", fn=lambda: self._run(self.zfs_bin, *sargs, stdout=send_out, timeout=timeout))
        receiver = pipes.side(box, "receive", recv_in, name="zfs", fn=lambda: target._run(target.zfs_bin, *rargs, stdin=recv_in, timeout=timeout))
        try:
            sent, broken = pipes.relay(from_send, to_recv, sender, progress, start)
        finally:
            os.close(from_send)
            os.close(to_recv)
            sender.join()
            receiver.join()
        for side in ("send", "receive"):
            if isinstance(box[side], BaseException):
                raise box[side]
        send_res, recv_res = box["send"], box["receive"]
        if (send_res.ok or broken) and not recv_res.ok:
            raise _receive_error(recv_res, target_dataset)
        if not send_res.ok:
            raise _err(send_res, f"zfs send {source_snapshot} failed")
        if progress:
            pipes.report(progress, sent, time.monotonic() - start)
        return StreamResult(sent, time.monotonic() - start, [send_res.log_entry(), recv_res.log_entry()])







def _receive_error(res: ex.CommandResult, target: str) -> ZfsError:
    err = _error_text(res)
    if "has been modified" in err:
        why = ("the target changed since its latest snapshot",
               "set readonly=on on replicas; to discard the target's changes roll it back to its latest snapshot")
    elif "does not match incremental source" in err:
        why = ("the target's latest snapshot is not the incremental base",
               "send from the newest snapshot both sides share (same guid), or roll the target back to it")
    elif "exists" in err and "-F" in err:
        why = ("a full stream cannot go into an existing dataset",
               "send incrementally from a snapshot both sides share, or receive into a new dataset")
    else:
        return _err(res, f"zfs receive into {target} failed")
    return ZfsDiverged(f"zfs receive into {target} failed: {why[0]} ({err}). Fix: {why[1]}; "
                       "receiving with force (-F) would DESTROY the target's newer data", err)
