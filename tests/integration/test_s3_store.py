"""The S3 object store against a real SeaweedFS (``weed mini``, tests/services/seaweedfs.py):
the ObjectStore conformance suite, plus S3 specifics: object lock (what SeaweedFS
enforces), interrupted multipart uploads, and the ETag proof catching bytes that were
changed on the wire."""
from __future__ import annotations

import hashlib
import io
import os
from datetime import datetime, timedelta, timezone

import pytest

from conformance.objectstore_suite import ObjectStoreConformance

from drtool.backends.objectstore import ChecksumMismatch, ObjectLocked, ObjectNotFound, ObjectStore, ObjectStoreError
from drtool.backends.s3 import S3Store

MiB = 1024 * 1024


def make_store(seaweedfs, bucket: str, prefix: str = "", **kw) -> S3Store:
    return S3Store("offsite-s3", bucket, prefix, endpoint=seaweedfs.endpoint, region="us-east-1",
                   access_key=seaweedfs.access_key, secret_key=seaweedfs.secret_key, **kw)


def set_default_retention(seaweedfs, bucket: str, mode: str, days: int = 1) -> None:
    seaweedfs.client().put_object_lock_configuration(Bucket=bucket, ObjectLockConfiguration={
        "ObjectLockEnabled": "Enabled", "Rule": {"DefaultRetention": {"Mode": mode, "Days": days}}})


class TestS3StoreConformance(ObjectStoreConformance):
    @pytest.fixture(params=["", "hosts/nas1"], ids=["no-prefix", "prefix"])
    def store(self, request, seaweedfs):
        return make_store(seaweedfs, seaweedfs.make_bucket("conf"), request.param)


# -- keys, listing, arguments -------------------------------------------------- #

def test_keys_are_relative_to_the_prefix(seaweedfs):
    bucket = seaweedfs.make_bucket("prefix")
    store = make_store(seaweedfs, bucket, "/hosts/nas1/")
    seaweedfs.client().put_object(Bucket=bucket, Key="hosts/other/x", Body=b"not ours")
    res = store.put_stream("zfs/tank@1", io.BytesIO(b"data"))
    assert res.key == "zfs/tank@1" and res.store_checksum == {"etag": hashlib.md5(b"data").hexdigest()}
    assert seaweedfs.client().head_object(Bucket=bucket, Key="hosts/nas1/zfs/tank@1")["ContentLength"] == 4
    [info] = store.list()
    assert info.key == "zfs/tank@1" and info.size == 4 and info.etag == res.store_checksum["etag"]
    assert info.updated.tzinfo is not None and info.updated.utcoffset() == timedelta(0)


def test_part_size_below_the_s3_minimum_is_refused(seaweedfs):
    store = make_store(seaweedfs, seaweedfs.make_bucket("part"))
    with pytest.raises(ValueError, match="minimum"):
        store.put_stream("k", io.BytesIO(b"x"), part_size=MiB)


def test_a_stream_of_exactly_one_part_goes_multipart(seaweedfs):
    store = make_store(seaweedfs, seaweedfs.make_bucket("onepart"))
    data = os.urandom(5 * MiB)
    res = store.put_stream("k", io.BytesIO(data), part_size=5 * MiB)
    assert res.store_checksum["etag"] == hashlib.md5(hashlib.md5(data).digest()).hexdigest() + "-1"
    sink = io.BytesIO()
    assert store.get_stream("k", sink) == len(data) and sink.getvalue() == data


def test_errors_never_carry_the_secret(seaweedfs):
    store = S3Store("offsite-s3", seaweedfs.make_bucket("creds"), endpoint=seaweedfs.endpoint, region="us-east-1",
                    access_key=seaweedfs.access_key, secret_key="wrong-" + seaweedfs.secret_key)
    with pytest.raises(Exception) as err:
        store.stat("k")
    assert seaweedfs.secret_key not in str(err.value) and "wrong-" not in str(err.value)
    assert seaweedfs.secret_key not in repr(store)


# -- object lock and versioning ------------------------------------------------ #

def test_versioned_bucket_without_lock_is_not_immutable(seaweedfs):
    store = make_store(seaweedfs, seaweedfs.make_bucket("vers", versioning=True))
    state = store.retention_state()
    assert state.versioning is True and state.lock_enabled is False and state.immutable is False
    v1 = store.put_stream("k", io.BytesIO(b"one")).version
    v2 = store.put_stream("k", io.BytesIO(b"two")).version
    assert v1 and v2 and v1 != v2
    store.delete("k")  # only a delete marker
    with pytest.raises(ObjectNotFound):
        store.stat("k")
    sink = io.BytesIO()
    store.get_stream("k", sink, version=v1)
    assert sink.getvalue() == b"one"
    store.delete("k", version=v1)  # no lock: a version really goes
    with pytest.raises(ObjectNotFound):
        store.get_stream("k", io.BytesIO(), version=v1)


def test_lock_enabled_without_default_retention_is_not_immutable(seaweedfs):
    store = make_store(seaweedfs, seaweedfs.make_bucket("lockonly", object_lock=True))
    state = store.retention_state()
    assert state.versioning is True and state.lock_enabled is True  # SeaweedFS turns versioning on with the lock
    assert state.default_retention_s is None and state.immutable is False
    version = store.put_stream("k", io.BytesIO(b"x")).version
    store.delete("k", version=version)  # nothing retains it


@pytest.mark.parametrize("mode", ["COMPLIANCE", "GOVERNANCE"])
def test_default_retention_makes_versions_undeletable(seaweedfs, mode):
    bucket = seaweedfs.make_bucket("lock", object_lock=True)
    set_default_retention(seaweedfs, bucket, mode, days=1)
    store = make_store(seaweedfs, bucket, "p")
    state = store.retention_state()
    assert state.immutable is True and state.lock_enabled and state.versioning
    assert state.default_mode == mode and state.default_retention_s == 86400
    assert state.locked is (mode == "COMPLIANCE")

    res = store.put_stream("k", io.BytesIO(b"precious"))
    assert res.version
    info = store.stat("k")
    assert info.lock_mode == mode and info.version == res.version and info.legal_hold is False
    assert info.retain_until is not None and info.retain_until.utcoffset() == timedelta(0)
    assert timedelta(hours=23) < info.retain_until - datetime.now(timezone.utc) <= timedelta(days=1, minutes=1)

    # SeaweedFS enforces it: deleting the version is refused with 403 AccessDenied (as AWS
    # does). Our delete never sends BypassGovernanceRetention, so GOVERNANCE holds too
    # (SeaweedFS does honour that bypass header for an admin identity).
    with pytest.raises(ObjectLocked, match=f"{mode} retention until {info.retain_until.date().isoformat()}"):
        store.delete("k", version=res.version)
    # A plain delete only adds a delete marker (S3 semantics); the locked version stays.
    store.delete("k")
    with pytest.raises(ObjectNotFound):
        store.stat("k")
    sink = io.BytesIO()
    store.get_stream("k", sink, version=res.version)
    assert sink.getvalue() == b"precious"
    with pytest.raises(ObjectLocked):
        store.delete("k", version=res.version)


def test_legal_hold_blocks_deleting_a_version(seaweedfs):
    bucket = seaweedfs.make_bucket("hold", object_lock=True)
    store = make_store(seaweedfs, bucket)
    res = store.put_stream("k", io.BytesIO(b"held"))
    seaweedfs.client().put_object_legal_hold(Bucket=bucket, Key="k", VersionId=res.version, LegalHold={"Status": "ON"})
    assert store.stat("k").legal_hold is True
    with pytest.raises(ObjectLocked, match="legal hold"):
        store.delete("k", version=res.version)
    seaweedfs.client().put_object_legal_hold(Bucket=bucket, Key="k", VersionId=res.version, LegalHold={"Status": "OFF"})
    store.delete("k", version=res.version)


# -- interrupted uploads ---------------------------------------------------------- #

class _Interrupted(Exception):
    pass


class _FailingReader(io.RawIOBase):
    """Yields ``ok`` bytes, then raises (a `zfs send` that dies mid-stream)."""

    def __init__(self, ok: int) -> None:
        self.left = ok

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise _Interrupted("source died")
        n = min(self.left, 1 * MiB if n is None or n < 0 else n, 1 * MiB)
        self.left -= n
        return os.urandom(n)


@pytest.mark.parametrize("versioning", [False, True], ids=["plain", "versioned"])
def test_interrupted_upload_leaves_no_object_and_no_pending_upload(seaweedfs, versioning):
    bucket = seaweedfs.make_bucket("intr", versioning=versioning)
    store = make_store(seaweedfs, bucket, "p")
    with pytest.raises(_Interrupted):  # the source's own error, not a wrapped one
        store.put_stream("big", _FailingReader(7 * MiB), part_size=5 * MiB)  # dies after the first part went up
    with pytest.raises(ObjectNotFound):
        store.stat("big")
    assert list(store.list()) == []
    client = seaweedfs.client()
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert client.list_object_versions(Bucket=bucket).get("Versions", []) == []


# -- the ETag proof ------------------------------------------------------------------- #

def _corrupting_client(seaweedfs, operation: str, part: int | None = None, *, no_additional_checksums: bool = False):
    """A real client whose ``operation`` request body gets one byte flipped after
    HashingReader saw it and before it is signed and sent: corruption on the wire,
    which S3 stores faithfully and reports in its ETag. Flexible checksums are off for
    this client (else botocore's CRC32 header would make S3 reject the body itself).
    ``no_additional_checksums``: the x-amz-checksum-* headers drtool sets are dropped
    before signing, so the store behaves like one without additional checksums (it
    keeps none and answers with none)."""
    client = seaweedfs.client(request_checksum_calculation="when_required")

    def strip(request, **_kw):
        for name in list(request.headers.keys()):
            if name.lower().startswith(("x-amz-checksum", "x-amz-sdk-checksum")):
                del request.headers[name]

    if no_additional_checksums:
        for op in ("CreateMultipartUpload", "UploadPart"):
            client.meta.events.register(f"before-sign.s3.{op}", strip)

    def flip(request, **_kw):
        if part is not None and f"partNumber={part}" not in request.url:
            return
        data = request.data
        body = bytearray(data.read() if hasattr(data, "read") else data)  # botocore may hand a file object
        body[len(body) // 2] ^= 0xFF
        request.data = bytes(body)

    client.meta.events.register(f"before-sign.s3.{operation}", flip)
    return client


@pytest.mark.parametrize("versioning", [False, True], ids=["plain", "versioned"])
def test_checksum_mismatch_on_a_single_put_deletes_the_object(seaweedfs, versioning):
    bucket = seaweedfs.make_bucket("sum1", versioning=versioning)
    store = make_store(seaweedfs, bucket, client=_corrupting_client(seaweedfs, "PutObject"))
    with pytest.raises(ChecksumMismatch, match="the object was deleted"):
        store.put_stream("k", io.BytesIO(b"0123456789" * 1000))
    with pytest.raises(ObjectNotFound):
        store.stat("k")
    assert seaweedfs.client().list_object_versions(Bucket=bucket).get("Versions", []) == []


def test_a_corrupted_part_is_refused_by_its_crc32c_and_nothing_is_left(seaweedfs):
    """Multipart parts carry their CRC32C (S3 additional checksums): the store refuses a
    part whose bytes do not match it, drtool aborts the upload."""
    bucket = seaweedfs.make_bucket("summp")
    store = make_store(seaweedfs, bucket, client=_corrupting_client(seaweedfs, "UploadPart", part=2))
    with pytest.raises(ObjectStoreError, match="BadDigest"):
        store.put_stream("k", io.BytesIO(os.urandom(11 * MiB)), part_size=5 * MiB)
    with pytest.raises(ObjectNotFound):
        store.stat("k")
    assert seaweedfs.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_multipart_proof_is_the_composite_crc32c(seaweedfs):
    import base64

    import google_crc32c

    bucket = seaweedfs.make_bucket("sumcrc")
    data = os.urandom(11 * MiB)
    res = make_store(seaweedfs, bucket).put_stream("k", io.BytesIO(data), part_size=5 * MiB)
    parts = [data[i:i + 5 * MiB] for i in range(0, len(data), 5 * MiB)]
    want = base64.b64encode(google_crc32c.Checksum(b"".join(google_crc32c.Checksum(p).digest() for p in parts)).digest()).decode()
    assert res.store_checksum["crc32c"] == f"{want}-3", res.store_checksum
    head = seaweedfs.client().head_object(Bucket=bucket, Key="k", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32C"] == res.store_checksum["crc32c"]
    assert res.crc32c_b64 is None  # proved part by part: no whole-stream CRC32C is computed
    assert res.sha256_hex == hashlib.sha256(data).hexdigest()


def test_without_additional_checksums_the_etag_proof_catches_a_corrupted_part(seaweedfs):
    """A store that keeps no additional checksums (the headers never reach it here) is
    proved by the multipart ETag (MD5 of the parts' MD5s): the corrupted part shows."""
    bucket = seaweedfs.make_bucket("summd5")
    store = make_store(seaweedfs, bucket, client=_corrupting_client(seaweedfs, "UploadPart", part=2, no_additional_checksums=True))
    with pytest.raises(ChecksumMismatch, match=r"store ETAG .*-3'"):
        store.put_stream("k", io.BytesIO(os.urandom(11 * MiB)), part_size=5 * MiB)
    with pytest.raises(ObjectNotFound):
        store.stat("k")
    assert seaweedfs.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    ok = make_store(seaweedfs, bucket, client=_corrupting_client(seaweedfs, "UploadPart", part=99, no_additional_checksums=True))
    res = ok.put_stream("k2", io.BytesIO(os.urandom(11 * MiB)), part_size=5 * MiB)
    assert set(res.store_checksum) == {"etag"} and res.store_checksum["etag"].endswith("-3")


def test_a_failed_proof_on_a_locked_bucket_says_the_bad_version_stays(seaweedfs):
    bucket = seaweedfs.make_bucket("sumlock", object_lock=True)
    set_default_retention(seaweedfs, bucket, "COMPLIANCE")
    store = make_store(seaweedfs, bucket, client=_corrupting_client(seaweedfs, "PutObject"))
    with pytest.raises(ChecksumMismatch, match="deleting it failed too"):
        store.put_stream("k", io.BytesIO(b"x" * 1000))


def test_store_satisfies_the_protocol_without_a_server():
    store = S3Store("offsite-s3", "bucket", endpoint="http://127.0.0.1:9", region="us-east-1",
                    access_key="a", secret_key="b")
    assert isinstance(store, ObjectStore)
