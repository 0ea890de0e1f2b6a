"""etcd v3: take a snapshot, record its key counts, restore it, and verify a copy.

Every command goes through ``drtool.exec`` (``run`` for etcdctl, ``spawn`` for a
scratch etcd) with ``ETCDCTL_API=3``. What each check proves:

- ``snapshot status`` walks the bbolt tree but checks it against nothing: it passes a
  file whose data is damaged (and crashes on some damaged pages).
- ``snapshot restore`` checks the sha256 etcd appends to every snapshot over the whole
  file: a restore that succeeds proves the copy is byte-identical to what etcd wrote.
- The key counts per ``/registry/<resource>/`` prefix, taken at backup at the
  snapshot's revision and again from the verified copy, prove that the snapshot holds
  the cluster state that was recorded (not an empty or a different cluster's db).
- ``sample`` reads values through a scratch etcd started on the restored data dir:
  it proves etcd itself can open the db and serve keys from it.

Counting the copy does not need a running etcd: ``snapshot_key_counts`` reads the
snapshot's bbolt file directly (a small read-only parser of the ``key`` bucket,
where etcd's MVCC store keeps one ``mvccpb.KeyValue`` per revision) and keeps the
latest revision of every key. Starting etcd on a restored db takes about as long as
the restore itself (it rebuilds its index from every key: measured 1.6 s for 204 MB,
2.4 s for 332 MB, against restores of 1.75 s and 3.0 s); the offline count runs
concurrently with the restore and costs almost nothing on top (bench/etcd_verify.py).
When ``sample`` is asked for, the scratch etcd's own counts are compared with the
offline ones too, so the parser is cross-checked against etcd on every sampled verify.
"""
from __future__ import annotations

import base64
import json
import mmap
import os
import random
import re
import shutil
import socket
import struct
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import exec as ex
from ..errors import BackendError

REGISTRY = "/registry/"
ETCDCTL_ENV = {"ETCDCTL_API": "3"}
PROBE_COMMAND_TIMEOUT_S = 5  # how long the pre-snapshot probe waits for an endpoint
CMD_TIMEOUT_S = 600.0
RESTORE_TIMEOUT_S = 3600.0
HTTP_TIMEOUT_S = 30.0
# the peer URL written into a restored member; a scratch etcd listens elsewhere (a
# restarted single member does not check its listen URLs against its membership)
DEFAULT_PEER_URL = "http://127.0.0.1:2380"


@dataclass(frozen=True)
class EtcdConn:
    """How etcdctl reaches a cluster. TLS files are paths (the key file too)."""

    endpoints: list[str]
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    etcdctl: str = "etcdctl"
    etcd: str = "etcd"

    def flags(self, endpoints: list[str] | None = None) -> list[str]:
        """etcdctl global flags for ``endpoints`` (default: all of them)."""
        out = [f"--endpoints={','.join(endpoints or self.endpoints)}"]
        for name in ("cacert", "cert", "key"):
            value = getattr(self, name)
            if value:
                out.append(f"--{name}={value}")
        return out


@dataclass(frozen=True)
class SnapshotStatus:
    """``etcdctl snapshot status``: facts about the file; NOT an integrity check."""

    hash: int
    revision: int
    total_keys: int  # bbolt entries in all buckets (every revision), not live keys
    total_size: int


# --------------------------------------------------------------------------- #
# helpers


def prefix_group(key: str, prefix: str = REGISTRY) -> str:
    """The group a key counts under: ``prefix`` plus its first path component
    ("/registry/pods/ns/a" -> "/registry/pods/"); a key with no further "/" is its own
    group ("/registry/health" -> "/registry/health")."""
    rest = key[len(prefix):]
    i = rest.find("/")
    return key if i < 0 else prefix + rest[: i + 1]


def range_end(prefix: bytes) -> bytes:
    """etcd's end of the range of keys that start with ``prefix`` (clientv3.GetPrefixRangeEnd)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # every key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _decode_key(key: bytes) -> str:
    """etcd keys are bytes; decode them the way etcdctl's streamed lines are decoded."""
    return key.decode("utf-8", errors="replace")


_SHA_RE = re.compile(r"\[(\d{1,3}(?: \d{1,3}){31})\]")


def _etcdctl_reason(res: ex.CommandResult) -> str:
    """etcdctl's own words: its ``Error:`` or ``panic:`` line (bbolt panics on a damaged
    page), else the last zap ``error`` field, else the stderr tail. sha256 byte lists
    are shown as hex."""
    reason = ""
    for line in res.stderr_lines:
        line = line.strip()
        if line.startswith("panic:"):
            reason = f"etcdctl crashed reading it: {line}"
            break
        if line.startswith("Error:"):
            reason = line[len("Error:"):].strip()
        elif not reason and line.startswith("{"):
            try:
                reason = json.loads(line).get("error", "") or reason
            except ValueError:
                pass
    reason = reason or res.stderr_tail(3) or f"exit code {res.returncode}"
    if res.timed_out:
        reason = f"timed out after {res.duration_s:.0f}s ({reason})"
    return _SHA_RE.sub(lambda m: bytes(int(x) for x in m.group(1).split()).hex(), reason)


def _etcdctl(argv: list[str], commands: list[dict] | None, **kw: Any) -> ex.CommandResult:
    """Run one etcdctl command (API v3), never raising on its exit code; the log entry
    goes to ``commands``."""
    kw.setdefault("timeout", CMD_TIMEOUT_S)
    try:
        res = ex.run(argv, tool="etcdctl", env=ETCDCTL_ENV, check=False, **kw)
    except ex.CommandTimeout as exc:
        res = exc.result
    except ex.CommandNotFound as exc:
        raise BackendError(str(exc)) from None
    if commands is not None:
        commands.append(res.log_entry())
    return res


# --------------------------------------------------------------------------- #
# a live cluster


class EtcdCli:
    """etcdctl against a live cluster. ``commands`` keeps the exec log entries."""

    def __init__(self, conn: EtcdConn) -> None:
        self.conn = conn
        self.commands: list[dict] = []

    def _run(self, args: list[str], *, endpoints: list[str] | None = None, **kw: Any) -> ex.CommandResult:
        return _etcdctl([self.conn.etcdctl, *self.conn.flags(endpoints), *args], self.commands, **kw)

    def _probe(self, endpoint: str) -> str | None:
        """None when ``endpoint`` answers ``endpoint status``, else etcdctl's reason.
        Needed because ``snapshot save`` waits its whole command timeout on a dead endpoint."""
        res = self._run([f"--command-timeout={PROBE_COMMAND_TIMEOUT_S}s", "endpoint", "status", "-w", "json"],
                        endpoints=[endpoint], timeout=PROBE_COMMAND_TIMEOUT_S + 10)
        return None if res.ok else _etcdctl_reason(res)

    def snapshot_save(self, path: Path, *, timeout: float = 3600) -> None:
        """Save a snapshot from the first endpoint that answers (etcdctl takes one at a
        time). Raises BackendError naming every endpoint tried and etcdctl's reason."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        errors = []
        for endpoint in self.conn.endpoints:
            reason = self._probe(endpoint)
            if reason is None:
                res = self._run([f"--command-timeout={int(timeout)}s", "snapshot", "save", str(path)],
                                endpoints=[endpoint], timeout=timeout + 30)
                if res.ok:
                    return
                reason = _etcdctl_reason(res)
            Path(f"{path}.part").unlink(missing_ok=True)  # etcdctl writes FILE.part, then renames
            errors.append(f"{endpoint}: {reason}")
        raise BackendError(f"etcd snapshot save to {path} failed: " + "; ".join(errors))

    def key_counts(self, prefix: str = REGISTRY, *, revision: int | None = None,
                   timeout: float = CMD_TIMEOUT_S) -> dict[str, int]:
        """Live keys under ``prefix`` counted per ``prefix_group``, at ``revision`` when
        given (later writes do not count). Streams etcdctl's keys-only output line by
        line (constant memory here in the number of keys; etcdctl itself holds its one
        keys-only range response). In that output every key is followed by an empty
        line (its value); a key containing newlines is re-joined."""
        counts: dict[str, int] = {}
        parts: list[str] = []

        def on_line(line: str) -> None:
            if line:  # a key, or a part of one
                parts.append(line)
                return
            if not parts:  # a second empty line: the key ended with a newline
                return
            key = "\n".join(parts)
            parts.clear()
            group = prefix_group(key, prefix)
            counts[group] = counts.get(group, 0) + 1

        args = ["get", prefix, "--prefix", "--keys-only", f"--command-timeout={int(timeout)}s"]
        if revision is not None:
            args.append(f"--rev={int(revision)}")
        res = self._run(args, on_stdout_line=on_line, timeout=timeout + 30)
        if not res.ok:
            at = f" at revision {revision}" if revision is not None else ""
            raise BackendError(f"etcd key count under {prefix}{at} from {','.join(self.conn.endpoints)} failed: "
                               f"{_etcdctl_reason(res)}")
        if parts:
            on_line("")  # a final key without its value line
        return counts


# --------------------------------------------------------------------------- #
# snapshot files


def snapshot_status(path: Path, *, etcdctl: str = "etcdctl") -> SnapshotStatus:
    """Header facts of a snapshot file. Does NOT prove integrity (see ``snapshot_restore``)."""
    res = _etcdctl([etcdctl, "snapshot", "status", str(path), "-w", "json"], None, timeout=CMD_TIMEOUT_S)
    if not res.ok:
        raise BackendError(f"etcd snapshot status of {path} failed: {_etcdctl_reason(res)}")
    try:
        doc = json.loads(str(res.stdout))
        return SnapshotStatus(hash=int(doc["hash"]), revision=int(doc["revision"]),
                              total_keys=int(doc["totalKey"]), total_size=int(doc["totalSize"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise BackendError(f"etcd snapshot status of {path}: unexpected output {str(res.stdout)[:200]!r} ({exc})") from None


# what etcdctl/bbolt say about a damaged file (not: permission denied, no space left, …)
_CORRUPT_RE = re.compile(r"sha256|integrity|missing hash|invalid|unexpected EOF|checksum|magic|too small|crashed", re.I)


def snapshot_restore(path: Path, data_dir: Path, *, etcdctl: str = "etcdctl", name: str = "drtool-scratch",
                     peer_url: str = DEFAULT_PEER_URL, timeout: float = RESTORE_TIMEOUT_S) -> None:
    """Restore ``path`` into a new ``data_dir`` as a one-member cluster ``name`` (its
    peer URL ``peer_url``). Success proves the file matches the sha256 etcd appended to
    it. A failure removes the partial ``data_dir``; a corrupt file raises a
    BackendError saying so with etcdctl's reason."""
    path, data_dir = Path(path), Path(data_dir)
    if data_dir.exists():
        raise BackendError(f"etcd restore target {data_dir} already exists: restore needs a new directory "
                           "(move the old data dir away first)")
    if not path.is_file():
        raise BackendError(f"etcd snapshot {path} does not exist")
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    res = _etcdctl([etcdctl, "snapshot", "restore", str(path), f"--data-dir={data_dir}", f"--name={name}",
                    f"--initial-cluster={name}={peer_url}", f"--initial-advertise-peer-urls={peer_url}"],
                   None, timeout=timeout)
    if res.ok:
        return
    shutil.rmtree(data_dir, ignore_errors=True)
    reason = _etcdctl_reason(res)
    if _CORRUPT_RE.search(reason):
        raise BackendError(f"etcd snapshot {path} is corrupt: restore failed its integrity check: {reason}")
    raise BackendError(f"etcd snapshot restore of {path} into {data_dir} failed: {reason}")


# --------------------------------------------------------------------------- #
# offline key counts: a read-only reader of the snapshot's bbolt file

_PAGE_HDR = struct.Struct("<QHHI")  # id, flags, count, overflow
_META = struct.Struct("<IIIIQQQQQQ")  # magic, version, pageSize, flags, root{root, seq}, freelist, pgid, txid, checksum
_BRANCH_ELEM = struct.Struct("<IIQ")  # pos, ksize, pgid
_LEAF_ELEM = struct.Struct("<IIII")  # flags, pos, ksize, vsize
_BUCKET_HDR = struct.Struct("<QQ")  # root, sequence
BOLT_MAGIC = 0xED0CDAED
BRANCH, LEAF, META = 0x01, 0x02, 0x04
BUCKET_LEAF_FLAG = 0x01
MAX_DEPTH = 64


def _fnv64a(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


class _Bolt:
    """Just enough of bbolt's on-disk format to walk one bucket's leaves in key order
    (bbolt 1.3, as etcd 3.4-3.6 write it). Reads through mmap; every page id, offset
    and depth is bounds-checked, so a damaged file raises BackendError, not garbage."""

    def __init__(self, mm: mmap.mmap, path: Path) -> None:
        self.mm, self.path = mm, path
        self.size = len(mm)
        self._seen: set[int] = set()
        # two meta pages; the valid one with the higher txid is current (bbolt's rule)
        first = self._meta(0)
        metas = [m for m in (first, self._meta(first[0] if first else 4096)) if m is not None]
        if not metas:
            raise self._bad("no valid bbolt meta page (not an etcd snapshot?)")
        self.page_size, self.root, _ = max(metas, key=lambda m: m[2])

    def _bad(self, what: str) -> BackendError:
        return BackendError(f"etcd snapshot {self.path}: cannot read its bbolt db: {what}")

    def _meta(self, offset: int) -> tuple[int, int, int] | None:
        """(page size, root bucket page, txid) of the meta page at ``offset``, if valid."""
        body_at = offset + _PAGE_HDR.size
        if body_at + _META.size > self.size:
            return None
        flags = _PAGE_HDR.unpack_from(self.mm, offset)[1]
        magic, version, page_size, _, root, _, _, _, txid, checksum = _META.unpack_from(self.mm, body_at)
        if flags != META or magic != BOLT_MAGIC or version != 2 or not 512 <= page_size <= 1 << 20:
            return None
        if _fnv64a(self.mm[body_at: body_at + _META.size - 8]) != checksum:
            return None
        return page_size, root, txid

    def _page(self, pgid: int) -> tuple[int, int, int, int]:
        """(offset, flags, element count, end offset incl. overflow) of page ``pgid``."""
        offset = pgid * self.page_size
        if pgid < 2 or offset + _PAGE_HDR.size > self.size:
            raise self._bad(f"page {pgid} is out of range")
        pid, flags, count, overflow = _PAGE_HDR.unpack_from(self.mm, offset)
        limit = offset + (overflow + 1) * self.page_size
        if pid != pgid or not flags & (BRANCH | LEAF) or limit > self.size:
            raise self._bad(f"page {pgid} is damaged (id {pid}, flags {flags:#x})")
        return offset, flags, count, limit

    def _leaf_items(self, offset: int, count: int, limit: int) -> list[tuple[int, int, int, int, int]]:
        """(flags, key offset, key size, value offset, value size) of the elements of the
        leaf page at ``offset`` (ending at ``limit``)."""
        base = offset + _PAGE_HDR.size
        if base + count * _LEAF_ELEM.size > limit:
            raise self._bad(f"a leaf page of {count} elements overruns its page")
        out = []
        for i, (flags, pos, ksize, vsize) in enumerate(_LEAF_ELEM.iter_unpack(self.mm[base: base + count * _LEAF_ELEM.size])):
            koff = base + i * _LEAF_ELEM.size + pos
            if koff + ksize + vsize > limit:
                raise self._bad("a leaf element points outside its page")
            out.append((flags, koff, ksize, koff + ksize, vsize))
        return out

    def _walk(self, pgid: int, leaves: list[tuple[int, int, int]], depth: int = 0) -> list[tuple[int, int, int]]:
        """Append (offset, count, limit) of every leaf page under ``pgid`` to ``leaves``, in key order."""
        if depth > MAX_DEPTH:
            raise self._bad("tree is too deep")
        if pgid in self._seen:
            raise self._bad(f"page {pgid} is reachable twice (a damaged branch)")
        self._seen.add(pgid)
        offset, flags, count, limit = self._page(pgid)
        if flags & LEAF:
            leaves.append((offset, count, limit))
            return leaves
        base = offset + _PAGE_HDR.size
        if base + count * _BRANCH_ELEM.size > limit:
            raise self._bad(f"branch page {pgid} overruns its page")
        for _, _, child in _BRANCH_ELEM.iter_unpack(self.mm[base: base + count * _BRANCH_ELEM.size]):
            self._walk(child, leaves, depth + 1)
        return leaves

    def bucket_leaves(self, name: bytes) -> list[tuple[int, int, int]]:
        """(offset, count, limit) of the leaf pages of top-level bucket ``name``, in key
        order; an inline bucket (a small one, stored in its parent's value) is one leaf."""
        found = [item for leaf in self._walk(self.root, []) for item in self._leaf_items(*leaf)
                 if item[0] & BUCKET_LEAF_FLAG and self.mm[item[1]: item[1] + item[2]] == name]
        if not found:
            raise self._bad(f"no {name.decode()!r} bucket (not an etcd snapshot?)")
        _, _, _, voff, vsize = found[0]
        if vsize < _BUCKET_HDR.size:
            raise self._bad(f"bucket {name.decode()!r} header is truncated")
        broot, _ = _BUCKET_HDR.unpack_from(self.mm, voff)
        if broot == 0:  # inline: a page follows the header inside the value
            page = voff + _BUCKET_HDR.size
            if vsize < _BUCKET_HDR.size + _PAGE_HDR.size:
                raise self._bad(f"inline bucket {name.decode()!r} is truncated")
            return [(page, _PAGE_HDR.unpack_from(self.mm, page)[2], voff + vsize)]
        return self._walk(broot, [])


def _kv_key(mm: Any, voff: int, vsize: int) -> bytes | None:
    """Field 1 (``key``) of an ``mvccpb.KeyValue`` protobuf, or None if it has none."""
    pos, end = voff, voff + vsize
    while pos < end:
        tag, pos = _varint(mm, pos, end)
        wire = tag & 7
        if wire == 2:
            length, pos = _varint(mm, pos, end)
            if tag >> 3 == 1:
                return bytes(mm[pos: pos + length]) if pos + length <= end else None
            pos += length
        elif wire == 0:
            _, pos = _varint(mm, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            return None
    return None


def _varint(mm: Any, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while pos < end:
        b = mm[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
    return value, end + 1  # truncated: the caller's loop ends


@dataclass(frozen=True)
class SnapshotKeys:
    """Live keys of a snapshot file, counted offline."""

    counts: dict[str, int]  # per prefix_group under the prefix
    extra: dict[str, int]  # exact counts of other prefixes asked for
    revision: int  # the highest revision in the key bucket (= snapshot status's revision)
    live_keys: int  # live keys in the whole keyspace
    entries: int  # key-bucket entries read (every revision and tombstone)


def snapshot_key_counts(path: Path, prefix: str = REGISTRY, *, extra_prefixes: tuple[str, ...] = ()) -> SnapshotKeys:
    """Count the live keys of a snapshot file without etcd, the way etcd would see them
    at the snapshot's revision: the ``key`` bucket maps revision (8-byte main, "_",
    8-byte sub, "t" for a tombstone) to an ``mvccpb.KeyValue``; walking it in revision
    order, the last entry of each key says whether it is live. Compaction keeps the
    latest revision of every live key, so this holds on compacted dbs too. Memory is
    one dict entry per distinct key. Cross-checked against etcd in the integration tests."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 2 * 4096:
                raise BackendError(f"etcd snapshot {path}: too small to be an etcd snapshot")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise BackendError(f"etcd snapshot {path}: cannot open it: {exc}") from None
    try:
        return _count_live(_Bolt(mm, Path(path)), mm, prefix, extra_prefixes)
    except (struct.error, IndexError, ValueError) as exc:  # a damaged page the bounds checks missed
        raise BackendError(f"etcd snapshot {path}: cannot read its bbolt db: {exc}") from None
    finally:
        mm.close()


def _count_live(bolt: _Bolt, mm: mmap.mmap, prefix: str, extra_prefixes: tuple[str, ...]) -> SnapshotKeys:
    live: dict[bytes, bool] = {}
    entries = 0
    last = -1
    for leaf in bolt.bucket_leaves(b"key"):
        for _, koff, ksize, voff, vsize in bolt._leaf_items(*leaf):
            if ksize != 17 and ksize != 18:
                raise bolt._bad(f"unexpected revision key of {ksize} bytes in the key bucket")
            # fast path: gogoproto writes field 1 (key) first; a key under 128 bytes has a one-byte length
            n = mm[voff + 1] if vsize >= 2 else 0x80
            if n < 0x80 and mm[voff] == 0x0A and 2 + n <= vsize:
                key = mm[voff + 2: voff + 2 + n]
            else:
                key = _kv_key(mm, voff, vsize)
                if key is None:
                    raise bolt._bad(f"the KeyValue at offset {voff} has no key")
            live[key] = ksize == 17 or mm[koff + 17] != 0x74  # "t" marks a tombstone
            entries += 1
            last = koff
    last_rev = mm[last: last + 8] if last >= 0 else b""
    counts: dict[str, int] = {}
    extra = dict.fromkeys(extra_prefixes, 0)
    pb = prefix.encode()
    extra_b = [(p, p.encode()) for p in extra_prefixes]
    n_live = 0
    for key, alive in live.items():
        if not alive:
            continue
        n_live += 1
        if key.startswith(pb):
            group = prefix_group(_decode_key(key), prefix)
            counts[group] = counts.get(group, 0) + 1
        for p, b in extra_b:
            if key.startswith(b):
                extra[p] += 1
    return SnapshotKeys(counts=counts, extra=extra, revision=int.from_bytes(last_rev, "big") if last_rev else 0,
                        live_keys=n_live, entries=entries)


# --------------------------------------------------------------------------- #
# a scratch etcd on a restored data dir


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScratchEtcd:
    """A throwaway etcd serving a restored data dir on 127.0.0.1 (client and peer
    ports free at start), for reading what a snapshot holds. Its output goes to
    ``log_path`` (default: ``<data_dir>.etcd.log`` beside the data dir). ``stop()`` kills
    its process group and is idempotent; the data dir and the log are the caller's."""

    def __init__(self, data_dir: Path, *, etcd: str = "etcd", name: str = "drtool-scratch",
                 log_path: Path | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.etcd, self.name = etcd, name
        self.log_path = Path(log_path) if log_path else self.data_dir.parent / f"{self.data_dir.name}.etcd.log"
        self.endpoint = ""
        self._proc: ex.Spawned | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self, timeout: float = 30) -> "ScratchEtcd":
        """Start etcd and wait until ``/health`` says true; raise BackendError with the
        log tail if it exits or does not get healthy within ``timeout``."""
        if self._proc is not None:
            return self
        if not (self.data_dir / "member").is_dir():
            raise BackendError(f"scratch etcd: {self.data_dir} is not an etcd data dir (restore a snapshot into it first)")
        deadline = time.monotonic() + timeout
        for _ in range(3):  # a free port can be taken before etcd binds it
            self._launch()
            if self._wait_healthy(deadline):
                return self
            tail = self._proc.log_tail(15) if self._proc else ""
            self.stop()
            if "address already in use" not in tail or time.monotonic() >= deadline:
                break
        raise BackendError(f"scratch etcd on {self.data_dir} did not become healthy within {timeout:.0f}s; "
                           f"log {self.log_path}: {tail}")

    def _launch(self) -> None:
        client, peer = _free_port(), _free_port()
        self.endpoint = f"http://127.0.0.1:{client}"
        argv = [self.etcd, f"--name={self.name}", f"--data-dir={self.data_dir}",
                f"--listen-client-urls={self.endpoint}", f"--advertise-client-urls={self.endpoint}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}"]
        try:
            self._proc = ex.spawn(argv, log_path=self.log_path)
        except ex.CommandNotFound as exc:
            raise BackendError(str(exc)) from None

    def _wait_healthy(self, deadline: float) -> bool:
        assert self._proc is not None
        while time.monotonic() < deadline:
            if not self._proc.running():
                return False
            try:
                with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1.0) as resp:
                    if json.loads(resp.read()).get("health") == "true":
                        return True
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None

    def __enter__(self) -> "ScratchEtcd":
        return self if self._proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reads (the v3 JSON gateway: keys and values are base64) ---------------

    def _range(self, key: bytes, end: bytes | None = None, **opts: Any) -> dict:
        if not self.endpoint or self._proc is None:
            raise BackendError("scratch etcd is not running (start() first)")
        body: dict[str, Any] = {"key": _b64(key), **opts}
        if end is not None:
            body["range_end"] = _b64(end)
        req = urllib.request.Request(f"{self.endpoint}/v3/kv/range", data=json.dumps(body).encode(), method="POST")
        try:
            with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise BackendError(f"scratch etcd {self.endpoint}: range failed: {exc.code} "
                               f"{exc.read()[:300].decode(errors='replace')}") from None
        except (OSError, ValueError) as exc:
            raise BackendError(f"scratch etcd {self.endpoint}: range failed: {exc}") from None

    def count(self, prefix: str) -> int:
        """Keys under ``prefix`` (a count_only range: etcd counts, nothing is sent)."""
        p = prefix.encode()
        return int(self._range(p, range_end(p), count_only=True).get("count", 0))

    def key_counts(self, prefixes: list[str]) -> dict[str, int]:
        return {p: self.count(p) for p in prefixes}

    def revision(self) -> int:
        return int(self._range(b"\x00", count_only=True)["header"]["revision"])

    def sample(self, n: int, prefix: str = REGISTRY, *, seed: int | None = None,
               page: int = 5000) -> list[tuple[str, int]]:
        """``n`` keys under ``prefix`` chosen uniformly at random (reservoir sampling over
        keys-only pages at one revision, so memory is O(n + page)), each read with its
        value in full: [(key, value size in bytes)]."""
        if n <= 0:
            return []
        rng = random.Random(seed)
        p = prefix.encode()
        end = range_end(p)
        chosen: list[bytes] = []
        seen = 0
        start, rev = p, 0
        while True:
            opts: dict[str, Any] = {"keys_only": True, "limit": page}
            if rev:
                opts["revision"] = rev
            doc = self._range(start, end, **opts)
            rev = rev or int(doc["header"]["revision"])
            kvs = doc.get("kvs", [])
            for kv in kvs:
                key = base64.b64decode(kv["key"])
                seen += 1
                if len(chosen) < n:
                    chosen.append(key)
                else:
                    j = rng.randrange(seen)
                    if j < n:
                        chosen[j] = key
            if not doc.get("more") or not kvs:
                break
            start = base64.b64decode(kvs[-1]["key"]) + b"\x00"
        out = []
        for key in chosen:
            kvs = self._range(key, revision=rev).get("kvs", [])
            if not kvs:
                raise BackendError(f"scratch etcd {self.endpoint}: key {_decode_key(key)!r} vanished at revision {rev}")
            out.append((_decode_key(key), len(base64.b64decode(kvs[0].get("value", "")))))
        return out


# --------------------------------------------------------------------------- #
# verify a downloaded snapshot


def compare_counts(expected: dict[str, int], actual: dict[str, int]) -> list[str]:
    """Problems, both ways: a recorded prefix whose count differs (or is gone), and a
    prefix present in the restore that was not recorded at backup."""
    problems = []
    for prefix in sorted(expected):
        want, got = expected[prefix], actual.get(prefix, 0)
        if want != got:
            problems.append(f"{prefix}: {want} keys at backup, {got} in the restored snapshot")
    for prefix in sorted(set(actual) - set(expected)):
        if actual[prefix]:
            problems.append(f"{prefix}: not recorded at backup, {actual[prefix]} keys in the restored snapshot")
    return problems


def verify_snapshot(path: Path, expected_counts: dict[str, int] | None, *, workdir: Path, sample: int = 0,
                    etcdctl: str = "etcdctl", etcd: str = "etcd", seed: int | None = None) -> dict:
    """Verify a snapshot copy: restore it into ``workdir/<unique>`` (proves integrity:
    sha256), count its keys per /registry/ prefix offline while the restore runs and
    compare with ``expected_counts`` (proves it holds the recorded state), and with
    ``sample`` > 0 start a scratch etcd on the restored dir, cross-check its counts and
    read ``sample`` random values in full (proves etcd serves it; an empty value under
    /registry/ is a problem). The scratch etcd is always stopped and the scratch dir
    removed. A corrupt snapshot is ``ok: False`` with the restore error, not an exception.

    Returns {"ok", "problems", "counts" (per prefix, as restored), "revision", "keys_read",
    "seconds": {"restore", "start" (0 without a sample), "count" (the offline count,
    which overlaps the restore)}}."""
    workdir = Path(workdir)
    scratch = workdir / f"etcd-verify-{uuid.uuid4().hex[:12]}"
    out: dict[str, Any] = {"ok": False, "problems": [], "counts": {}, "revision": 0, "keys_read": 0,
                           "seconds": {"restore": 0.0, "start": 0.0, "count": 0.0}}
    problems: list[str] = out["problems"]
    extra = tuple(p for p in (expected_counts or {})
                  if not p.startswith(REGISTRY) or prefix_group(p, REGISTRY) != p)
    scratch_etcd: ScratchEtcd | None = None
    try:
        scratch.mkdir(parents=True)
        keys = _restore_and_count(path, scratch / "data", etcdctl, extra, out)
        if keys is None:
            return out
        counts = dict(keys.counts)
        counts.update(keys.extra)
        out["counts"], out["revision"] = counts, keys.revision
        if expected_counts is not None:
            problems.extend(compare_counts(expected_counts, counts))
        if sample > 0:
            scratch_etcd = ScratchEtcd(scratch / "data", etcd=etcd, log_path=scratch / "etcd.log")
            problems.extend(_sample_check(scratch_etcd, keys, counts, sample, seed, out))
        out["ok"] = not problems
        return out
    except BackendError as exc:
        problems.append(str(exc))
        return out
    finally:
        if scratch_etcd is not None:
            scratch_etcd.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def _restore_and_count(path: Path, data_dir: Path, etcdctl: str, extra: tuple[str, ...],
                       out: dict) -> SnapshotKeys | None:
    """The restore and the offline count, concurrently (etcdctl is a separate process;
    the count reads the same page-cached file). The count is used only if the restore
    passed its sha256 check; otherwise the restore error is the problem."""
    t0 = time.monotonic()
    timing: dict[str, float] = {}

    def count() -> SnapshotKeys:
        t = time.monotonic()
        try:
            return snapshot_key_counts(path, REGISTRY, extra_prefixes=extra)
        finally:
            timing["count"] = time.monotonic() - t

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="etcd-count") as pool:
        counted = pool.submit(count)
        try:
            snapshot_restore(path, data_dir, etcdctl=etcdctl)
            restore_error = None
        except BackendError as exc:
            restore_error = exc
        out["seconds"]["restore"] = round(time.monotonic() - t0, 3)
        try:
            keys = counted.result()
        except BackendError as exc:
            keys, count_error = None, exc
        else:
            count_error = None
    out["seconds"]["count"] = round(timing.get("count", 0.0), 3)
    if restore_error is not None:
        out["problems"].append(str(restore_error))
        return None
    if count_error is not None:  # the file passed sha256, so this is a format we cannot read
        out["problems"].append(f"restore passed, but the keys could not be counted: {count_error}")
        return None
    return keys


def _sample_check(scratch: ScratchEtcd, keys: SnapshotKeys, counts: dict[str, int], n: int,
                  seed: int | None, out: dict) -> list[str]:
    """Start ``scratch``, compare etcd's own counts and revision with the offline ones,
    and read ``n`` random values; return the problems."""
    problems = []
    t0 = time.monotonic()
    scratch.start()
    out["seconds"]["start"] = round(time.monotonic() - t0, 3)
    served = scratch.key_counts(sorted(counts))
    served_total = scratch.count(REGISTRY)
    for prefix, want in sorted(counts.items()):
        if served[prefix] != want:
            problems.append(f"{prefix}: {want} keys read from the snapshot file, but the restored etcd serves {served[prefix]}")
    if served_total != sum(keys.counts.values()):
        problems.append(f"{REGISTRY}: {sum(keys.counts.values())} keys read from the snapshot file, "
                        f"but the restored etcd serves {served_total}")
    rev = scratch.revision()
    if rev != keys.revision:
        problems.append(f"revision {keys.revision} read from the snapshot file, but the restored etcd is at {rev}")
    sampled = scratch.sample(n, REGISTRY, seed=seed)
    out["keys_read"] = len(sampled)
    empty = [k for k, size in sampled if size == 0]
    if empty:
        problems.append(f"{len(empty)} of {len(sampled)} sampled keys have an empty value, e.g. {empty[0]!r}")
    return problems
