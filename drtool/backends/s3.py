"""S3 (and S3-compatible: SeaweedFS, MinIO, Ceph RGW) as an ``ObjectStore``, with boto3.

Checksum proof
--------------
Every byte is read once, through ``HashingReader`` (SHA-256 for the manifest; no
whole-stream CRC32C, which nothing here compares), one part (``part_size`` bytes) at a
time; up to ``PARALLEL_PARTS`` parts are uploaded at once while the next is read, so
memory stays at about five parts. From the same bytes we compute the checksum S3 must
answer with:

* one ``put_object`` (the object is smaller than one part): the hex MD5 of the bytes,
  which the ETag must equal;
* a multipart upload of N parts: each part goes with its CRC32C (S3's additional
  checksums: the store refuses a part whose bytes do not match it), and the completed
  object's composite checksum must equal ours: the CRC32C of the parts' concatenated
  binary CRC32Cs, followed by ``-N``. A store that does not answer with additional
  checksums (it ignores them) is proved the classic way: the ETag must equal the hex
  MD5 of the concatenated binary MD5s of the parts, ``-N``; the parts' MD5s are
  computed until the store's first answer says which way applies (MD5 is the most
  expensive pass here: ~0.5 GB/s against CRC32C's several GB/s).

Request bodies are not signed (``payload_signing_enabled: False``, UNSIGNED-PAYLOAD):
over http botocore would hash every part again with SHA-256 for the signature, and the
proof above already covers what reached the store.

A store checksum that differs from ours means the store did not get what we read: the
object (that version) is deleted and ``ChecksumMismatch`` raised.
(Objects encrypted with SSE-KMS/SSE-C have ETags that are not MD5s; such buckets
fail the proof.) A multipart upload is aborted on any exception, so an interrupted
upload never leaves a visible object or a pending upload.
"""
from __future__ import annotations

import base64
import collections
import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, BinaryIO, Iterator

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .objectstore import (DEFAULT_PART_SIZE, ChecksumMismatch, HashingReader, ObjectInfo, ObjectLocked,
                          ObjectNotFound, ObjectStoreError, ProgressFn, PutResult, RetentionState)

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's minimum for every part but the last
MAX_PARTS = 10_000
PARALLEL_PARTS = 4  # parts in flight at once (boto3's TransferManager uses 10 threads)
S3_PART_SIZE = 8 * 1024 * 1024  # 4 in flight + 1 being read: ~40 MiB of buffers
READ_CHUNK = 1024 * 1024
_NOT_FOUND = {"404", "NoSuchKey", "NoSuchVersion", "NotFound"}
_LOCKED = {"AccessDenied", "ObjectLocked"}  # AWS and SeaweedFS say AccessDenied; MinIO ObjectLocked


def _utc(dt: datetime) -> datetime:
    return dt.astimezone(timezone.utc)


def _utc_or_none(dt: datetime | None) -> datetime | None:
    return dt.astimezone(timezone.utc) if dt is not None else None


def _etag(value: str | None) -> str:
    return (value or "").strip('"')


def _read_part(reader: HashingReader, size: int) -> bytes:
    """Up to ``size`` bytes; short only at the end of the stream (pipes return short reads)."""
    chunks, got = [], 0
    while got < size:
        chunk = reader.read(size - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class S3Store:
    """A bucket (and key prefix) on S3. Keys are relative to ``prefix``; credentials are
    plain strings here (the caller resolves secret references) and are only handed to
    boto3, never kept or put into messages. ``client`` overrides everything else."""

    def __init__(self, name: str, bucket: str, prefix: str = "", *, endpoint: str | None = None,
                 region: str | None = None, access_key: str | None = None, secret_key: str | None = None,
                 client: Any = None) -> None:
        self.name, self.bucket, self.prefix = name, bucket, prefix.strip("/")
        if client is None:
            # drtool proves every upload itself (part CRC32Cs, ETags; see the module docstring):
            # no SigV4 payload hash (botocore signs bodies over http, a second SHA-256 pass
            # beside the manifest's) and no SDK CRC pass of its own
            opts: dict[str, Any] = {"s3": {**({"addressing_style": "path"} if endpoint else {}), "payload_signing_enabled": False},
                                    "retries": {"max_attempts": 5, "mode": "standard"},
                                    "request_checksum_calculation": "when_required"}
            try:
                config = Config(**opts)
            except TypeError:  # botocore < 1.36 has no flexible-checksum settings (and no default CRC)
                opts.pop("request_checksum_calculation")
                config = Config(**opts)
            client = boto3.client("s3", endpoint_url=endpoint, region_name=region, aws_access_key_id=access_key,
                                  aws_secret_access_key=secret_key, config=config)
        self.client = client

    default_part_size = S3_PART_SIZE

    def __repr__(self) -> str:
        return f"S3Store({self.name!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"

    # -- keys and errors ------------------------------------------------------ #

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def _error(self, e: Exception, what: str, key: str = "") -> ObjectStoreError:
        where = f"{self.name}: {what} s3://{self.bucket}/{self._key(key) if key else self.prefix}"
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            msg = f"{where}: {code} {err.get('Message', '')}".rstrip()
            if code in _NOT_FOUND:
                return ObjectNotFound(f"{where}: no such object")
            return ObjectStoreError(msg)
        return ObjectStoreError(f"{where}: {e}")

    # -- upload --------------------------------------------------------------- #

    def put_stream(self, key: str, stream: BinaryIO, *, metadata: dict[str, str] | None = None,
                   part_size: int = DEFAULT_PART_SIZE, progress: ProgressFn | None = None) -> PutResult:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size {part_size} is below S3's minimum of {MIN_PART_SIZE} bytes")
        full, meta = self._key(key), dict(metadata or {})
        reader = HashingReader(stream, progress, crc32c=False)  # parts are proved one by one (see the module docstring)
        data = _read_part(reader, part_size)
        whole_md5 = ""
        try:
            if len(data) < part_size:  # the whole object fits in one part
                resp = self.client.put_object(Bucket=self.bucket, Key=full, Body=data, Metadata=meta)
                expected = {"etag": (whole_md5 := hashlib.md5(data).hexdigest())}  # the whole stream is ``data``
            else:
                first, data = [data], b""  # handed over: the multipart loop drops it once sent
                resp, expected = self._multipart(full, reader, first, part_size, meta)
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, "upload to", key) from e
        etag, version = _etag(resp.get("ETag")), resp.get("VersionId")
        theirs = {"etag": etag}
        if "crc32c" in expected:
            crc = resp.get("ChecksumCRC32C")
            if crc is None:  # some stores answer the completion without it: read it back
                try:
                    crc = self.client.head_object(Bucket=self.bucket, Key=full, ChecksumMode="ENABLED",
                                                  **({"VersionId": version} if version else {})).get("ChecksumCRC32C")
                except (ClientError, BotoCoreError) as e:
                    raise self._error(e, "read the checksum of", key) from e
            theirs["crc32c"] = crc or ""
        kind = "crc32c" if "crc32c" in expected else "etag"
        if theirs[kind] != expected[kind]:
            why = self._discard(full, version)
            raise ChecksumMismatch(f"{self.name}: s3://{self.bucket}/{full}: store {kind.upper()} {theirs[kind]!r} != ours "
                                   f"{expected[kind]!r} for {reader.size} bytes; {why}")
        return PutResult(key=key, size=reader.size, sha256_hex=reader.sha256_hex, md5_hex=whole_md5,
                         crc32c_b64=reader.crc32c_b64, version=version, store_checksum=theirs)

    def _multipart(self, full: str, reader: HashingReader, first: list[bytes], part_size: int,
                   meta: dict[str, str]) -> tuple[dict, dict[str, str]]:
        """Parts go up ``PARALLEL_PARTS`` at a time while the next ones are read (and hashed,
        in order); memory stays at about PARALLEL_PARTS + 1 parts. Returns the completion
        answer and the store checksum we expect (``{"crc32c": …}`` or ``{"etag": …}``)."""
        import google_crc32c

        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=full, Metadata=meta,
                                                        ChecksumAlgorithm="CRC32C")["UploadId"]
        crc_mode: list[bool | None] = [None]  # None until the store's first answer: does it keep additional checksums?
        mode_lock = threading.Lock()

        def send(n: int, body: bytes) -> dict[str, Any]:
            # hashed on the upload thread (hashlib releases the GIL): beside the main thread's
            # SHA-256 of the next part
            crc = base64.b64encode(google_crc32c.Checksum(body).digest()).decode()
            md5 = hashlib.md5(body).digest() if crc_mode[0] is not True else None
            resp = self.client.upload_part(Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=n, Body=body,
                                           ChecksumCRC32C=crc)
            theirs = resp.get("ChecksumCRC32C")
            with mode_lock:
                if crc_mode[0] is None:
                    crc_mode[0] = theirs is not None
                elif crc_mode[0] != (theirs is not None):
                    raise ObjectStoreError(f"{self.name}: s3://{self.bucket}/{full}: the store answered part {n} "
                                           f"{'with' if theirs else 'without'} a CRC32C, unlike the parts before it")
            if theirs is not None and theirs != crc:
                raise ChecksumMismatch(f"{self.name}: s3://{self.bucket}/{full}: part {n}: store CRC32C {theirs!r} != ours {crc!r}")
            return {"PartNumber": n, "ETag": resp["ETag"], "_md5": md5, "_crc": crc}

        data = first.pop()
        pool = ThreadPoolExecutor(max_workers=PARALLEL_PARTS, thread_name_prefix="s3-part")
        try:
            inflight: collections.deque[Future] = collections.deque()
            parts: list[dict[str, Any]] = []
            count = 0
            while data:
                if count == MAX_PARTS:
                    raise ObjectStoreError(f"{self.name}: s3://{self.bucket}/{full}: more than {MAX_PARTS} parts "
                                           f"of {part_size} bytes; use a larger part_size")
                count += 1
                inflight.append(pool.submit(send, count, data))
                data = b""
                if len(inflight) >= PARALLEL_PARTS:
                    parts.append(inflight.popleft().result())
                data = _read_part(reader, part_size)
            parts.extend(f.result() for f in inflight)
            md5s, crcs = [p.pop("_md5") for p in parts], [p.pop("_crc") for p in parts]
            if crc_mode[0]:
                for p, crc in zip(parts, crcs):
                    p["ChecksumCRC32C"] = crc
            done = self.client.complete_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id,
                                                         MultipartUpload={"Parts": parts})
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
            except (ClientError, BotoCoreError):
                pass  # the original error matters more; a lifecycle rule reaps what is left
            raise
        finally:
            pool.shutdown(wait=False)
        if crc_mode[0]:
            joined = b"".join(base64.b64decode(c) for c in crcs)
            return done, {"crc32c": f"{base64.b64encode(google_crc32c.Checksum(joined).digest()).decode()}-{len(parts)}"}
        return done, {"etag": f"{hashlib.md5(b''.join(md5s)).hexdigest()}-{len(parts)}"}  # type: ignore[arg-type]

    def _discard(self, full: str, version: str | None) -> str:
        """Delete what a failed proof left behind; say what happened."""
        try:
            kw = {"VersionId": version} if version else {}
            self.client.delete_object(Bucket=self.bucket, Key=full, **kw)
            return "the object was deleted"
        except ClientError as e:
            return f"deleting it failed too ({e.response.get('Error', {}).get('Code')}): remove it by hand"
        except BotoCoreError as e:
            return f"deleting it failed too ({type(e).__name__}): remove it by hand"

    # -- read ----------------------------------------------------------------- #

    def get_stream(self, key: str, sink: BinaryIO, *, version: str | None = None) -> int:
        kw = {"VersionId": version} if version else {}
        total = 0
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._key(key), **kw)["Body"]
            for chunk in body.iter_chunks(READ_CHUNK):
                sink.write(chunk)
                total += len(chunk)
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, "download of", key) from e
        return total

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(key=self._rel(obj["Key"]), size=obj["Size"], updated=_utc(obj["LastModified"]),
                                     version=obj.get("VersionId"), etag=_etag(obj.get("ETag")) or None)
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, "listing of", prefix) from e

    def stat(self, key: str) -> ObjectInfo:
        try:
            h = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, "stat of", key) from e
        return ObjectInfo(key=key, size=h["ContentLength"], updated=_utc(h["LastModified"]), version=h.get("VersionId"),
                          etag=_etag(h.get("ETag")) or None, metadata=dict(h.get("Metadata", {})),
                          retain_until=_utc_or_none(h.get("ObjectLockRetainUntilDate")), lock_mode=h.get("ObjectLockMode"),
                          legal_hold=h.get("ObjectLockLegalHoldStatus") == "ON")

    # -- delete and retention ------------------------------------------------- #

    def delete(self, key: str, *, version: str | None = None) -> None:
        kw = {"VersionId": version} if version else {}
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key), **kw)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in _LOCKED:
                raise ObjectLocked(self._lock_message(key, version, e)) from e
            raise self._error(e, "delete of", key) from e
        except BotoCoreError as e:
            raise self._error(e, "delete of", key) from e

    def _lock_message(self, key: str, version: str | None, e: ClientError) -> str:
        what = f"{self.name}: s3://{self.bucket}/{self._key(key)}" + (f" version {version}" if version else "")
        code = e.response.get("Error", {}).get("Code")
        try:
            h = self.client.head_object(Bucket=self.bucket, Key=self._key(key), **({"VersionId": version} if version else {}))
        except (ClientError, BotoCoreError):
            return f"{what}: deletion refused ({code}: object lock, legal hold or missing permission)"
        until, mode = _utc_or_none(h.get("ObjectLockRetainUntilDate")), h.get("ObjectLockMode")
        held = " and a legal hold" if h.get("ObjectLockLegalHoldStatus") == "ON" else ""
        if until is not None:
            return f"{what}: deletion refused: {mode} retention until {until.isoformat()}{held}"
        return f"{what}: deletion refused ({code}){held or ': no retention on it, check permissions'}"

    def retention_state(self) -> RetentionState:
        try:
            status = self.client.get_bucket_versioning(Bucket=self.bucket).get("Status")
            try:
                cfg = self.client.get_object_lock_configuration(Bucket=self.bucket)["ObjectLockConfiguration"]
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") != "ObjectLockConfigurationNotFoundError":
                    raise
                cfg = {}
        except (ClientError, BotoCoreError) as e:
            raise self._error(e, "retention state of") from e
        lock = cfg.get("ObjectLockEnabled") == "Enabled"
        rule = cfg.get("Rule", {}).get("DefaultRetention", {})
        mode = rule.get("Mode")
        seconds = (rule.get("Days") or 0) * 86400 + (rule.get("Years") or 0) * 365 * 86400 or None
        detail = f"versioning {status or 'never enabled'}; object lock {'enabled' if lock else 'disabled'}"
        if mode:
            detail += f", default {mode} {rule.get('Days') or 0} day(s) {rule.get('Years') or 0} year(s)"
        return RetentionState(versioning=status == "Enabled", lock_enabled=lock, default_mode=mode,
                              default_retention_s=seconds, locked=mode == "COMPLIANCE", detail=detail)
