"""Google Cloud Storage as an ``ObjectStore`` (objectstore.py), on google-cloud-storage.

Uploads stream a non-seekable source through ``HashingReader`` as a resumable
upload in ``part_size`` chunks (rounded up to 256 KiB, GCS's chunk quantum): memory
holds about two chunks whatever the object size. A stream that ends within its
first chunk goes up in one request. Every upload carries ``ifGenerationMatch=0``
(drtool never overwrites an object; an existing key is also refused before the
stream is read). Afterwards the stored generation is read back and its size, MD5
and CRC32C compared with ours; on a mismatch that generation is deleted and
``ChecksumMismatch`` raised.

Retention is a fact read from the bucket resource by
``retention_state_from_bucket_resource`` (a pure function over the JSON API's
documented shape; no emulator stores retention policies). Credentials come from
the caller as a parsed service-account key (or Application Default Credentials); with an
``endpoint`` and no credentials the client is anonymous (emulators). No message
carries credentials.
"""
from __future__ import annotations

import io
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

CHUNK_QUANTUM = 256 * 1024  # resumable-upload chunks must be multiples of this
TIMEOUT_S = 60.0  # per HTTP request
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


class _ChunkFeed:
    """A non-seekable stream as google's resumable upload wants it: ``tell()``, and
    ``read(n)`` that returns ``n`` bytes unless the stream ended (a short read
    means "last chunk" to it). Holds at most one chunk."""

    def __init__(self, source: HashingReader, chunk: int) -> None:
        self.source, self.chunk, self.pos = source, chunk, 0
        self._pending: bytes | None = None

    def prefetch(self) -> bool:
        """Read the first chunk; True when that was the whole stream."""
        self._pending = self._read_full(self.chunk)
        return len(self._pending) < self.chunk

    @property
    def pending_size(self) -> int:
        return len(self._pending or b"")

    def _read_full(self, n: int) -> bytes:
        first = self.source.read(n)
        if not first or len(first) >= n:
            return first
        buf = io.BytesIO()  # getvalue() hands over its buffer: ~1 chunk, where join() needs 2
        buf.write(first)
        del first
        while buf.tell() < n:
            data = self.source.read(n - buf.tell())
            if not data:
                break
            buf.write(data)
        return buf.getvalue()

    def read(self, n: int) -> bytes:  # the library always asks for a size: a chunk, or what is left
        data, self._pending = self._pending or b"", None
        if len(data) > n:
            data, self._pending = data[:n], data[n:]
        elif len(data) < n:
            more = self._read_full(n - len(data))
            data = data + more if data else more
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos


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

    default_part_size = DEFAULT_PART_SIZE  # resumable chunks go one at a time: ~2 chunks of memory

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
        chunk = max(CHUNK_QUANTUM, -(-part_size // CHUNK_QUANTUM) * CHUNK_QUANTUM)
        reader = HashingReader(stream, progress)
        feed = _ChunkFeed(reader, chunk)
        blob = self._bucket.blob(path, chunk_size=chunk)
        blob.metadata = dict(metadata) if metadata else None
        with self._errors("upload", key):
            if self._bucket.get_blob(path, retry=self._retry, timeout=self._timeout) is not None:
                raise gexc.PreconditionFailed("exists")  # fail before reading the stream
            whole = feed.prefetch()
            blob.upload_from_file(feed, size=feed.pending_size if whole else None, content_type=CONTENT_TYPE,
                                  if_generation_match=0, checksum=None, retry=self._retry, timeout=self._timeout)
            blob.reload(retry=self._retry, timeout=self._timeout)  # this generation, as stored
        store_md5, store_crc = md5_b64_to_hex(blob.md5_hash), blob.crc32c
        problems = [f"{what}: sent {ours}, stored {theirs}" for what, ours, theirs in (
            ("size", reader.size, blob.size), ("md5", reader.md5_hex, store_md5), ("crc32c", reader.crc32c_b64, store_crc))
            if theirs is not None and ours != theirs]
        if store_md5 is None and store_crc is None:
            problems.append("the store reported no checksum")
        if problems:
            with self._errors("delete", key):
                self._bucket.delete_blob(path, generation=blob.generation, if_generation_match=blob.generation,
                                         retry=self._retry, timeout=self._timeout)
            raise ChecksumMismatch(f"{self.name}: {key}: {'; '.join(problems)}; the upload was deleted")
        return PutResult(key=key, size=reader.size, sha256_hex=reader.sha256_hex, md5_hex=reader.md5_hex,
                         crc32c_b64=reader.crc32c_b64, version=str(blob.generation),
                         store_checksum={k: v for k, v in (("md5_hex", store_md5), ("crc32c_b64", store_crc)) if v})

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
