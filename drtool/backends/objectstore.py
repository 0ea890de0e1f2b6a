"""The ``ObjectStore`` Protocol (DESIGN.md): what an offsite bucket must do for drtool.

Eight operations, the same for GCS and S3. Every byte that leaves is hashed on the way
(``HashingReader``: SHA-256 for our manifests, plus MD5 and CRC32C, the checksums the
stores compute themselves), so an upload can be proven against the store's own answer.
"Immutable" is a fact read from the bucket (``retention_state``), never a claim.

Shared logic lives here once; a backend module (``s3.py``, ``gcs.py``) implements only
the primitives against its SDK.
"""
from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO, Callable, Iterator, Protocol, runtime_checkable

from ..errors import BackendError

DEFAULT_PART_SIZE = 16 * 1024 * 1024
ProgressFn = Callable[[int], None]  # bytes so far


class ObjectStoreError(BackendError):
    pass


class ObjectNotFound(ObjectStoreError):
    pass


class ObjectLocked(ObjectStoreError):
    """Deletion refused by the store: retention, object lock or legal hold. Prune reports
    such objects as blocked, not failed."""


class ChecksumMismatch(ObjectStoreError):
    """The store's checksum of what it received differs from what drtool sent."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    updated: datetime  # aware, UTC
    version: str | None = None  # S3 VersionId, GCS generation
    md5_hex: str | None = None  # the store's MD5 of the whole object, where it has one
    crc32c_b64: str | None = None  # GCS
    etag: str | None = None
    metadata: dict[str, str] = field(default_factory=dict, compare=False)
    retain_until: datetime | None = None  # object lock / retention expiry
    lock_mode: str | None = None  # GOVERNANCE, COMPLIANCE (S3); Locked/Unlocked (GCS object retention)
    legal_hold: bool = False


@dataclass(frozen=True)
class RetentionState:
    """What the bucket enforces, read from the store."""

    versioning: bool
    lock_enabled: bool  # S3 object lock enabled / GCS bucket retention policy set
    default_mode: str | None = None  # S3 default retention mode; "bucket-retention" for GCS
    default_retention_s: int | None = None
    locked: bool = False  # GCS: retention policy locked; S3: default mode COMPLIANCE
    detail: str = ""

    @property
    def immutable(self) -> bool:
        """New objects cannot be deleted or overwritten before they expire."""
        return self.lock_enabled and bool(self.default_retention_s) and self.default_retention_s > 0


@dataclass(frozen=True)
class PutResult:
    key: str
    size: int
    sha256_hex: str  # ours, for the manifest
    md5_hex: str  # of the whole object; "" where the upload is proved otherwise (S3 multipart per part, GCS streaming by CRC32C)
    crc32c_b64: str | None  # of the whole object (GCS proves it by this); None where nothing compares it (S3)
    version: str | None
    store_checksum: dict[str, str]  # what the store reported: {"md5_hex": …} / {"crc32c_b64": …} / {"etag": …}


@runtime_checkable
class ObjectStore(Protocol):
    """A bucket (and key prefix) drtool uploads recovery points to."""

    name: str  # the location name, for messages
    default_part_size: int  # what ``put_stream`` is given when the policy does not say

    def put_stream(self, key: str, stream: BinaryIO, *, metadata: dict[str, str] | None = None,
                   part_size: int = DEFAULT_PART_SIZE, progress: ProgressFn | None = None) -> PutResult:
        """Upload ``stream`` in constant memory (resumable for GCS, multipart for S3) and
        check the store's checksum against ours; on mismatch the object is deleted and
        ``ChecksumMismatch`` raised."""
        ...

    def get_stream(self, key: str, sink: BinaryIO, *, version: str | None = None) -> int:
        """Write the object to ``sink``; returns the byte count."""
        ...

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        ...

    def stat(self, key: str) -> ObjectInfo:
        """Raises ``ObjectNotFound``."""
        ...

    def delete(self, key: str, *, version: str | None = None) -> None:
        """Raises ``ObjectLocked`` when retention or a hold forbids it; a missing object is no error."""
        ...

    def retention_state(self) -> RetentionState:
        ...


class HashingReader:
    """Wraps a binary stream: every byte read is counted and hashed: SHA-256 for the
    manifest, and with ``crc32c`` the whole stream's CRC32C (GCS proves an object by it;
    S3 proves each part by its own, so its store asks for none: ~0.17 s of CPU per GB
    saved). No whole-stream MD5: a one-request upload hashes its bytes in memory."""

    def __init__(self, raw: BinaryIO, progress: ProgressFn | None = None, *, crc32c: bool = True) -> None:
        self.raw, self.progress, self.size = raw, progress, 0
        self._sha = hashlib.sha256()
        self._crc = None
        if crc32c:
            import google_crc32c  # the C extension; part of the gcs extra and the test extra

            self._crc = google_crc32c.Checksum()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if data:
            self.size += len(data)
            self._sha.update(data)
            if self._crc is not None:
                self._crc.update(data)
            if self.progress:
                self.progress(self.size)
        return data

    def readable(self) -> bool:
        return True

    @property
    def sha256_hex(self) -> str:
        return self._sha.hexdigest()

    @property
    def crc32c_b64(self) -> str | None:
        return base64.b64encode(self._crc.digest()).decode() if self._crc is not None else None


def md5_b64_to_hex(value: str | None) -> str | None:
    return base64.b64decode(value).hex() if value else None
