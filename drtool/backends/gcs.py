"""Google Cloud Storage as an ``ObjectStore`` (objectstore.py), on google-cloud-storage.

Uploads read the source once, through ``HashingReader`` (SHA-256 for the manifest,
CRC32C, the checksum GCS keeps for every object). A stream that ends within its first
``part_size`` goes up in one request. A longer one goes up as a resumable upload sent
in **one streaming request** (``Content-Range: bytes 0-*/*``, chunked transfer
encoding), which is what GCS recommends for throughput: no per-chunk round trips.
Memory stays constant: the last ``part_size`` bytes sent are kept, so a connection
that breaks mid-stream is resumed from the offset GCS says it persisted (a status
query), as long as that offset is within what is kept; otherwise the upload fails
and nothing is counted. A failing source cancels the session. Every upload carries
``ifGenerationMatch=0`` (drtool never overwrites an object; an existing key is also
refused before the stream is read). The object resource GCS returns is then compared
with what was read (size and CRC32C); on a mismatch that generation is deleted and
``ChecksumMismatch`` raised; a one-request upload is also compared by its MD5. (No
MD5 pass over a streamed upload: CRC32C is GCS's end-to-end check, and an MD5 pass
costs more CPU than the upload itself.)

Retention is a fact read from the bucket resource by
``retention_state_from_bucket_resource`` (a pure function over the JSON API's
documented shape; no emulator stores retention policies). Credentials come from
the caller as a parsed service-account key (or Application Default Credentials); with an
``endpoint`` and no credentials the client is anonymous (emulators). No message
carries credentials.
"""
from __future__ import annotations

import hashlib
import io
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, BinaryIO, Iterator, Mapping

import requests
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY, ConditionalRetryPolicy, is_generation_specified
from google.oauth2 import service_account

from .objectstore import (DEFAULT_PART_SIZE, ChecksumMismatch, HashingReader, ObjectInfo, ObjectLocked, ObjectNotFound,
                          ObjectStoreError, ProgressFn, PutResult, RetentionState, md5_b64_to_hex)

__all__ = ["GcsStore", "retention_state_from_bucket_resource"]

SINGLE_REQUEST_MAX = 8 * 1024 * 1024  # a stream that ends within min(part_size, this) goes up in one request
READ_SIZE = 1024 * 1024  # what the streaming request reads from the source at a time
RESUME_ATTEMPTS = 5  # an interrupted streaming upload is resumed at most this often
TIMEOUT_S = 60.0  # per HTTP request
_RETRYABLE = (308, 408, 429, 500, 502, 503, 504)  # an upload request answered so was cut short: ask what GCS kept
CONTENT_TYPE = "application/octet-stream"


def retention_state_from_bucket_resource(resource: Mapping[str, Any]) -> RetentionState:
    """What a bucket enforces, from its JSON API resource (``storage#bucket``):
    ``retentionPolicy: {retentionPeriod: "<seconds>", effectiveTime, isLocked}`` and
    ``versioning: {enabled}``. Object retention (``objectRetention.mode``) only lets
    single objects be locked; it sets no default, so it is reported in ``detail``."""
    policy = resource.get("retentionPolicy") or {}
    period = int(policy.get("retentionPeriod") or 0) or None
    locked = bool(period and policy.get("isLocked"))
    versioning = bool((resource.get("versioning") or {}).get("enabled"))
    if period:
        since = f" since {policy['effectiveTime']}" if policy.get("effectiveTime") else ""
        notes = [f"bucket retention policy {period} s{since}",
                 "locked" if locked else "not locked: a bucket owner can still shorten or remove it"]
    else:
        notes = ["no bucket retention policy"]
    if (resource.get("objectRetention") or {}).get("mode") == "Enabled":
        notes.append("object retention enabled (per object)")
    notes.append(f"versioning {'on' if versioning else 'off'}")
    return RetentionState(versioning=versioning, lock_enabled=period is not None,
                          default_mode="bucket-retention" if period else None, default_retention_s=period,
                          locked=locked, detail="; ".join(notes))


class _SourceFailed(Exception):
    """The source raised while the streaming request was reading it (not the network)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class _Sent:
    """The last ``keep`` bytes (at least) handed to the streaming request: a resumed
    request starts from the offset GCS persisted, which may trail what was sent."""

    def __init__(self, keep: int) -> None:
        self.keep, self.start, self.end = keep, 0, 0
        self._blocks: deque[bytes] = deque()

    def add(self, data: bytes) -> None:
        self._blocks.append(data)
        self.end += len(data)
        while self._blocks and self.end - self.start - len(self._blocks[0]) >= self.keep:
            self.start += len(self._blocks.popleft())

    def release(self) -> None:
        self._blocks.clear()

    def since(self, offset: int) -> list[bytes] | None:
        """What was sent from ``offset`` on, or None when that is no longer kept."""
        if not self.start <= offset <= self.end:
            return None
        out, pos = [], self.start
        for block in self._blocks:
            if pos + len(block) > offset:
                out.append(block[offset - pos:] if offset > pos else block)
            pos += len(block)
        return out


def _read_up_to(reader: HashingReader, n: int) -> bytes:
    """``n`` bytes, fewer only at the end of the stream."""
    buf = io.BytesIO()
    while buf.tell() < n:
        data = reader.read(n - buf.tell())
        if not data:
            break
        buf.write(data)
    return buf.getvalue()


class _CountingSink:
    def __init__(self, sink: BinaryIO) -> None:
        self.sink, self.count = sink, 0

    def write(self, data: bytes) -> int:
        self.sink.write(data)
        self.count += len(data)
        return len(data)


def _reason(e: gexc.GoogleAPICallError) -> str:
    """The server's message without the "METHOD URL: " the client puts in front."""
    head, _, rest = str(e.message).partition(": ")
    return rest if rest and "://" in head else str(e.message)


class GcsStore:
    """A GCS bucket (and key prefix) drtool uploads recovery points to."""

    default_part_size = DEFAULT_PART_SIZE  # the bytes kept to resume a streaming upload: ~1 part of memory

    def __init__(self, name: str, bucket: str, prefix: str = "", *, endpoint: str | None = None,
                 project: str | None = None, credentials_info: dict | None = None,
                 client: storage.Client | None = None, retry_deadline_s: float = 60.0) -> None:
        self.name, self.bucket_name = name, bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._client = client or self._make_client(endpoint, project, credentials_info)
        self._bucket = self._client.bucket(bucket)
        self._retry = DEFAULT_RETRY.with_timeout(retry_deadline_s).with_delay(
            initial=min(1.0, retry_deadline_s / 20), maximum=max(1.0, retry_deadline_s / 4))
        self._timeout = TIMEOUT_S

    def _make_client(self, endpoint: str | None, project: str | None, info: dict | None) -> storage.Client:
        try:
            if info is not None:  # a service-account key only: no other credential type is taken from config
                if info.get("type") != "service_account":
                    raise ValueError("not a service account key")
                credentials = service_account.Credentials.from_service_account_info(info)
                project = project or info.get("project_id")
            else:  # anonymous for an emulator, else Application Default Credentials
                credentials = AnonymousCredentials() if endpoint else None
            return storage.Client(project=project, credentials=credentials,
                                  client_options={"api_endpoint": endpoint} if endpoint else None)
        except (auth_exc.GoogleAuthError, ValueError, KeyError, TypeError) as e:
            kind = info.get("type", "?") if isinstance(info, dict) else "application default"
            raise ObjectStoreError(f"{self.name}: cannot set up GCS credentials ({kind}: {type(e).__name__})") from None

    def _path(self, key: str) -> str:
        if not key or key.startswith("/"):
            raise ObjectStoreError(f"{self.name}: invalid object key {key!r}")
        return self.prefix + key

    @contextmanager
    def _errors(self, op: str, key: str) -> Iterator[None]:
        """google/requests exceptions -> the ObjectStore errors, with no credentials in them."""
        where = f"{self.name} (gs://{self.bucket_name}/{self.prefix}{key})"
        try:
            yield
        except gexc.NotFound as e:
            raise ObjectNotFound(f"{where}: not found: {_reason(e)}") from e
        except gexc.PreconditionFailed as e:
            if op == "upload":
                raise ObjectStoreError(f"{where}: object already exists; drtool never overwrites one") from e
            raise ObjectStoreError(f"{where}: {op} precondition failed: {_reason(e)}") from e
        except gexc.Forbidden as e:
            text = _reason(e)
            if op == "delete" and ("retention" in text.lower() or "hold" in text.lower()):
                raise ObjectLocked(f"{where}: deletion refused by the bucket: {text}") from e
            raise ObjectStoreError(f"{where}: {op} forbidden: {text}") from e
        except gexc.GoogleAPICallError as e:
            raise ObjectStoreError(f"{where}: {op} failed: HTTP {e.code}: {_reason(e)}") from e
        except DataCorruption as e:
            raise ChecksumMismatch(f"{where}: {op}: checksum mismatch reported by the client library") from e
        except InvalidResponse as e:
            raise ObjectStoreError(f"{where}: {op}: unexpected response {e.response.status_code}") from e
        except auth_exc.GoogleAuthError as e:
            raise ObjectStoreError(f"{where}: {op}: authentication failed ({type(e).__name__})") from None
        except requests.RequestException as e:
            raise ObjectStoreError(f"{where}: {op}: cannot reach GCS ({type(e).__name__})") from e

    # -- the ObjectStore Protocol -------------------------------------------- #

    def put_stream(self, key: str, stream: BinaryIO, *, metadata: dict[str, str] | None = None,
                   part_size: int = DEFAULT_PART_SIZE, progress: ProgressFn | None = None) -> PutResult:
        path = self._path(key)
        reader = HashingReader(stream, progress)
        blob = self._bucket.blob(path)
        blob.metadata = dict(metadata) if metadata else None
        with self._errors("upload", key):
            if self._bucket.get_blob(path, retry=self._retry, timeout=self._timeout) is not None:
                raise gexc.PreconditionFailed("exists")  # fail before reading the stream
            limit = max(1, min(part_size, SINGLE_REQUEST_MAX))
            first = _read_up_to(reader, limit)
            whole_md5 = ""
            if len(first) < limit:  # the whole stream: one request, also proved by its MD5 (in memory: cheap)
                whole_md5 = hashlib.md5(first).hexdigest()
                blob.upload_from_file(io.BytesIO(first), size=len(first), content_type=CONTENT_TYPE,
                                      if_generation_match=0, checksum=None, retry=self._retry, timeout=self._timeout)
                blob.reload(retry=self._retry, timeout=self._timeout)  # this generation, as stored
                stored = {"size": blob.size, "md5Hash": blob.md5_hash, "crc32c": blob.crc32c, "generation": blob.generation}
            else:
                pending = [first]
                del first  # owned by the request from here (frames can outlive the call in a reference cycle)
                stored = self._stream(blob, reader, pending, keep=max(part_size, READ_SIZE))
        size, generation = int(stored.get("size") or 0), stored.get("generation")
        store_md5, store_crc = md5_b64_to_hex(stored.get("md5Hash")), stored.get("crc32c")
        problems = [f"{what}: sent {ours}, stored {theirs}" for what, ours, theirs in (
            ("size", reader.size, size), ("crc32c", reader.crc32c_b64, store_crc), ("md5", whole_md5 or None, store_md5))
            if ours is not None and theirs is not None and ours != theirs]
        if store_crc is None:
            problems.append("the store reported no CRC32C")
        if problems:
            with self._errors("delete", key):
                self._bucket.delete_blob(path, generation=int(generation) if generation else None,
                                         if_generation_match=int(generation) if generation else None,
                                         retry=self._retry, timeout=self._timeout)
            raise ChecksumMismatch(f"{self.name}: {key}: {'; '.join(problems)}; the upload was deleted")
        return PutResult(key=key, size=reader.size, sha256_hex=reader.sha256_hex, md5_hex=whole_md5,
                         crc32c_b64=reader.crc32c_b64, version=str(generation),
                         store_checksum={k: v for k, v in (("md5_hex", store_md5), ("crc32c_b64", store_crc)) if v})

    def _stream(self, blob: storage.Blob, reader: HashingReader, pending: list[bytes], *, keep: int) -> dict[str, Any]:
        """A resumable upload sent as one streaming request (``pending``: what was read
        already, then the rest of ``reader``); resumed from GCS's persisted offset after a
        network failure while that offset is still kept. The object resource."""
        url = blob.create_resumable_upload_session(content_type=CONTENT_TYPE, if_generation_match=0, checksum=None,
                                                   retry=self._retry, timeout=self._timeout)
        http = self._client._http  # the client's (authorized) session
        sent = _Sent(keep)

        def body(offset: int) -> Iterator[bytes]:
            yield from sent.since(offset) or ()
            while True:
                if pending:
                    data = pending.pop()
                else:
                    try:
                        data = reader.read(READ_SIZE)
                    except Exception as e:  # noqa: BLE001 - the source's failure, told apart from the network's
                        raise _SourceFailed(e) from e
                if not data:
                    return
                sent.add(data)
                yield data

        offset, failures = 0, 0
        try:
            while True:
                try:
                    resp = http.put(url, data=body(offset), headers={"Content-Range": f"bytes {offset}-*/*", "Content-Type": CONTENT_TYPE},
                                    timeout=(self._timeout, self._timeout))
                    if resp.status_code in (200, 201):
                        return resp.json()
                    if resp.status_code not in _RETRYABLE:
                        raise gexc.from_http_response(resp)
                    why = f"HTTP {resp.status_code}"
                except (requests.ConnectionError, requests.Timeout) as e:
                    why = type(e).__name__
                status = None
                while status is None:  # ask GCS what it kept (asking again while the network is still out)
                    failures += 1
                    if failures > RESUME_ATTEMPTS:
                        raise ObjectStoreError(f"{self.name}: upload of {blob.name} interrupted {failures - 1} times "
                                               f"(last: {why}); nothing was counted")
                    time.sleep(min(8.0, 0.25 * 2 ** failures))
                    try:
                        status = self._persisted(http, url)
                    except (requests.ConnectionError, requests.Timeout) as e:
                        why = type(e).__name__
                done, offset = status
                if done is not None:
                    return done
                if sent.since(offset) is None:
                    raise ObjectStoreError(f"{self.name}: upload of {blob.name} interrupted ({why}); GCS kept {offset} bytes, "
                                           f"and the stream (not replayable) is no longer held from there; nothing was counted")
        except BaseException as exc:
            try:  # a session left open expires by itself; cancelling it is a courtesy
                http.delete(url, timeout=(self._timeout, self._timeout))
            except requests.RequestException:
                pass
            if isinstance(exc, _SourceFailed):
                raise exc.error from None
            raise
        finally:
            sent.release()  # now: the request keeps the body generator, and a reference cycle may keep both until a gc pass

    def _persisted(self, http: Any, url: str) -> tuple[dict[str, Any] | None, int] | None:
        """A resumable session's status: (the object resource if it completed, else None; the
        bytes persisted), or None when GCS answers "try again" (5xx, 429, 408)."""
        resp = http.put(url, data=b"", headers={"Content-Range": "bytes */*"}, timeout=(self._timeout, self._timeout))
        if resp.status_code in (200, 201):
            return resp.json(), 0
        if resp.status_code == 308:
            rng = resp.headers.get("Range", "")  # "bytes=0-N": N+1 bytes persisted; none when nothing was
            return None, int(rng.rsplit("-", 1)[1]) + 1 if "-" in rng else 0
        if resp.status_code in _RETRYABLE:
            return None
        raise gexc.from_http_response(resp)

    def get_stream(self, key: str, sink: BinaryIO, *, version: str | None = None) -> int:
        blob = self._bucket.blob(self._path(key), generation=int(version) if version else None)
        counter = _CountingSink(sink)
        with self._errors("download", key):  # streamed to the sink; CRC32C checked by the library
            blob.download_to_file(counter, checksum="auto", retry=self._retry, timeout=self._timeout)
        return counter.count

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        with self._errors("list", prefix):
            for blob in self._client.list_blobs(self._bucket, prefix=(self.prefix + prefix) or None,
                                                retry=self._retry, timeout=self._timeout):
                yield self._info(blob)

    def stat(self, key: str) -> ObjectInfo:
        with self._errors("stat", key):
            blob = self._bucket.get_blob(self._path(key), retry=self._retry, timeout=self._timeout)
        if blob is None:
            raise ObjectNotFound(f"{self.name} (gs://{self.bucket_name}/{self.prefix}{key}): not found")
        return self._info(blob)

    def delete(self, key: str, *, version: str | None = None) -> None:
        """Deleting what is already gone is no error (as on S3): prune stays idempotent."""
        try:
            with self._errors("delete", key):  # retried only when generation-specific (idempotent)
                self._bucket.delete_blob(self._path(key), generation=int(version) if version else None,
                                         retry=ConditionalRetryPolicy(self._retry, is_generation_specified, ["query_params"]),
                                         timeout=self._timeout)
        except ObjectNotFound:
            pass

    def retention_state(self) -> RetentionState:
        with self._errors("read retention of", ""):
            self._bucket.reload(retry=self._retry, timeout=self._timeout)
        return retention_state_from_bucket_resource(self._bucket._properties)  # the raw bucket resource

    def _info(self, blob: storage.Blob) -> ObjectInfo:
        retention = blob.retention
        until = [t for t in (blob.retention_expiration_time, retention.retain_until_time) if t is not None]
        mode = retention.mode or ("bucket-retention" if blob.retention_expiration_time else None)
        return ObjectInfo(key=blob.name[len(self.prefix):], size=int(blob.size or 0), updated=blob.updated,
                          version=str(blob.generation) if blob.generation is not None else None,
                          md5_hex=md5_b64_to_hex(blob.md5_hash), crc32c_b64=blob.crc32c, etag=blob.etag,
                          metadata=dict(blob.metadata or {}), retain_until=max(until) if until else None,
                          lock_mode=mode, legal_hold=bool(blob.event_based_hold or blob.temporary_hold))
