"""The GCS backend (drtool/backends/gcs.py) against a real fake-gcs-server: the
ObjectStore conformance suite plus GCS specifics (interrupted uploads, never
overwriting, checksum mismatch, constant memory, retention and error shapes).

fake-gcs-server does not implement bucket retention policies, object retention or
holds, and ignores ``ifGenerationMatch`` on resumable uploads and ``generation`` on
DELETE. Those paths are tested here at the level of the JSON API's documented
resource and error shapes, and say so.
"""
from __future__ import annotations

import hashlib
import json
import io
import os
import tracemalloc

import psutil
import pytest

from conformance.objectstore_suite import ObjectStoreConformance

from drtool.backends import gcs as gcs_module
from drtool.backends.gcs import GcsStore, retention_state_from_bucket_resource
from drtool.backends.objectstore import ChecksumMismatch, ObjectLocked, ObjectNotFound, ObjectStoreError

MiB = 1024 * 1024


def make_store(fake_gcs, bucket: str, prefix: str = "host1/zfs") -> GcsStore:
    return GcsStore("offsite-gcs", bucket, prefix, endpoint=fake_gcs.endpoint, retry_deadline_s=5)


@pytest.fixture
def store(fake_gcs):
    return make_store(fake_gcs, fake_gcs.make_bucket("drtool-test"))


class TestGcsStoreConformance(ObjectStoreConformance):
    pass  # the suite's tests, on the `store` fixture above


class _Generated(io.RawIOBase):
    """A non-seekable stream of ``total`` bytes made on the fly, at most ``block`` per
    read (a pipe from ``zfs send``); optionally dies after ``fail_after`` bytes."""

    def __init__(self, total: int, block: int = MiB, fail_after: int | None = None) -> None:
        self.total, self.block, self.fail_after, self.pos = total, block, fail_after, 0
        self._pattern = os.urandom(block)

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.pos >= self.fail_after:
            raise OSError("source died mid-stream")
        n = self.block if n is None or n < 0 else min(n, self.block)
        n = min(n, self.total - self.pos)
        out = self.pos.to_bytes(8, "big") + self._pattern[8:n] if n >= 8 else self._pattern[:n]
        self.pos += len(out)
        return out


# -- keys, versions ---------------------------------------------------------- #

def test_keys_are_relative_to_the_prefix(fake_gcs):
    bucket = fake_gcs.make_bucket("prefix")
    store = make_store(fake_gcs, bucket, prefix="/host1/zfs/")
    store.put_stream("tank/a.zfs", io.BytesIO(b"a"))
    raw = [b.name for b in fake_gcs.client().list_blobs(bucket, retry=fake_gcs.retry)]
    assert raw == ["host1/zfs/tank/a.zfs"]
    assert [o.key for o in store.list()] == ["tank/a.zfs"]
    assert [o.key for o in make_store(fake_gcs, bucket, prefix="host1").list("zfs/")] == ["zfs/tank/a.zfs"]


def test_version_is_the_generation_and_reads_it(fake_gcs):
    store = make_store(fake_gcs, fake_gcs.make_bucket("versioned", versioning=True))
    res = store.put_stream("k", io.BytesIO(b"v1"))
    assert res.version and res.version == store.stat("k").version and res.version.isdigit()
    sink = io.BytesIO()
    assert store.get_stream("k", sink, version=res.version) == 2 and sink.getvalue() == b"v1"
    assert store.retention_state().versioning is True  # read from the emulator's bucket resource
    store.delete("k", version=res.version)
    with pytest.raises(ObjectNotFound):
        store.stat("k")


# -- (b) an interrupted upload leaves nothing -------------------------------- #

def test_interrupted_upload_leaves_no_object(store):
    seen: list[int] = []
    src = _Generated(3 * MiB, block=256 * 1024, fail_after=MiB + 256 * 1024)  # dies in the 2nd 1 MiB chunk
    with pytest.raises(OSError, match="source died"):
        store.put_stream("p/broken.bin", src, part_size=MiB, progress=seen.append)
    assert seen[-1] >= MiB  # the first chunk went up: a resumable session was open
    assert list(store.list()) == []
    with pytest.raises(ObjectNotFound):
        store.stat("p/broken.bin")
    store.put_stream("p/broken.bin", io.BytesIO(b"retry works"))  # the key is free for the retry
    assert store.stat("p/broken.bin").size == len(b"retry works")


# -- (c) never overwrite ----------------------------------------------------- #

def test_existing_key_is_refused_before_the_stream_is_read(store):
    store.put_stream("k", io.BytesIO(b"original"))
    again = io.BytesIO(b"replacement")
    with pytest.raises(ObjectStoreError, match="already exists"):
        store.put_stream("k", again)
    assert again.tell() == 0
    sink = io.BytesIO()
    store.get_stream("k", sink)
    assert sink.getvalue() == b"original"


def test_generation_precondition_stops_a_racing_writer(fake_gcs):
    """The key is free at the pre-check but written by someone else while our stream is
    read: the upload request itself carries ifGenerationMatch=0 and gets 412."""
    bucket = fake_gcs.make_bucket("race")
    store = make_store(fake_gcs, bucket)
    other = fake_gcs.client().bucket(bucket).blob("host1/zfs/k")

    class Racing(io.RawIOBase):
        done = False

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            if not Racing.done:
                Racing.done = True
                other.upload_from_string(b"theirs", retry=fake_gcs.retry)
                return b"ours"
            return b""

    with pytest.raises(ObjectStoreError, match="already exists"):
        store.put_stream("k", Racing())
    sink = io.BytesIO()
    store.get_stream("k", sink)
    assert sink.getvalue() == b"theirs"


def test_streaming_upload_is_one_request_asking_for_generation_zero(store, monkeypatch):
    """A stream longer than its part goes up as a resumable upload in ONE streaming request
    (no per-chunk round trips). fake-gcs-server ignores ifGenerationMatch on resumable
    uploads (it overwrites), so we check the session request real GCS enforces it on."""
    session = store._client._http
    calls: list[tuple[str, str, dict]] = []
    real = session.request

    def spy(method, url, *args, **kw):
        calls.append((method, url, dict(kw.get("headers") or {})))
        return real(method, url, *args, **kw)

    monkeypatch.setattr(session, "request", spy)
    data_len = 3 * MiB + 1000
    res = store.put_stream("big", _Generated(data_len, block=64 * 1024), part_size=256 * 1024)
    initiate = [u for m, u, _ in calls if m == "POST" and "uploadType=resumable" in u]
    assert len(initiate) == 1 and "ifGenerationMatch=0" in initiate[0]
    puts = [h for m, _, h in calls if m == "PUT"]
    assert puts == [{"Content-Range": "bytes 0-*/*", "Content-Type": "application/octet-stream"}], puts
    assert res.size == data_len == store.stat("big").size and res.md5_hex == ""  # proved by size and CRC32C
    assert res.store_checksum["crc32c_b64"] == res.crc32c_b64


@pytest.mark.parametrize("size", [256 * 1024 - 1, 256 * 1024, 256 * 1024 + 1, 768 * 1024])
def test_sizes_around_the_one_request_limit(store, size):
    """Below the part size: one plain request; from it on: the streaming resumable request."""
    data = os.urandom(size)
    res = store.put_stream("edge", io.BytesIO(data), part_size=256 * 1024, metadata={"drtool-leg": "upload"})
    info = store.stat("edge")
    assert res.size == info.size == size and info.metadata == {"drtool-leg": "upload"}
    assert bool(res.md5_hex) == (size < 256 * 1024)
    sink = io.BytesIO()
    store.get_stream("edge", sink)
    assert sink.getvalue() == data


# -- checksums --------------------------------------------------------------- #

def test_checksum_mismatch_deletes_the_upload(store, monkeypatch):
    monkeypatch.setattr(gcs_module, "md5_b64_to_hex", lambda value: "0" * 32)
    with pytest.raises(ChecksumMismatch, match="md5"):
        store.put_stream("p/bad.bin", io.BytesIO(b"payload"))
    assert list(store.list()) == []


def test_crc32c_mismatch_of_a_streamed_upload_deletes_it(store, monkeypatch):
    """What GCS stored must hash to what drtool read: a CRC32C that differs (here: ours
    made wrong) fails the upload, and that generation is deleted, never counted."""
    import google_crc32c

    class Off(google_crc32c.Checksum):
        def digest(self) -> bytes:
            return bytes(b ^ 0xFF for b in super().digest())

    monkeypatch.setattr(google_crc32c, "Checksum", Off)
    with pytest.raises(ChecksumMismatch, match="crc32c"):
        store.put_stream("p/bad.bin", _Generated(2 * MiB), part_size=MiB)
    assert list(store.list()) == []


def test_put_result_matches_the_store(store):
    data = os.urandom(300_000)
    res = store.put_stream("x", io.BytesIO(data))
    info = store.stat("x")
    assert res.store_checksum == {"md5_hex": hashlib.md5(data).hexdigest(), "crc32c_b64": res.crc32c_b64}
    assert info.md5_hex == res.md5_hex and info.crc32c_b64 == res.crc32c_b64 and info.version == res.version


# -- (d) constant memory ----------------------------------------------------- #

class _HashingSink:
    def __init__(self) -> None:
        self.sha, self.size = hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return len(data)


def test_upload_and_download_of_64_mib_in_constant_memory(store):
    total, part = 64 * MiB, 8 * MiB
    proc = psutil.Process()
    rss_before = proc.memory_info().rss
    rss_peak = [rss_before]

    def progress(_: int) -> None:
        rss_peak[0] = max(rss_peak[0], proc.memory_info().rss)

    tracemalloc.start()
    try:
        res = store.put_stream("big/64m", _Generated(total), part_size=part, progress=progress)
        _, up_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        sink = _HashingSink()
        assert store.get_stream("big/64m", sink) == total
        _, down_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    growth = rss_peak[0] - rss_before
    print(f"64 MiB upload, 8 MiB parts: tracemalloc peak {up_peak / MiB:.1f} MiB, RSS growth {growth / MiB:.1f} MiB; "
          f"download tracemalloc peak {down_peak / MiB:.1f} MiB")
    assert res.size == total and sink.size == total and sink.sha.hexdigest() == res.sha256_hex
    assert up_peak < 3 * part  # ~2 chunks: the one being sent and the next being assembled
    assert growth < 40 * MiB
    assert down_peak < 4 * MiB  # streamed to the sink


# -- retention: API shapes (fake-gcs-server stores no retention policy) ------ #

LOCKED_BUCKET = {  # GET /storage/v1/b/BUCKET, as documented for a locked policy
    "kind": "storage#bucket", "name": "offsite", "versioning": {"enabled": True},
    "retentionPolicy": {"retentionPeriod": "2592000", "effectiveTime": "2024-03-01T12:00:00.000Z", "isLocked": True},
}
UNLOCKED_BUCKET = {
    "kind": "storage#bucket", "name": "offsite",
    "retentionPolicy": {"retentionPeriod": "86400", "effectiveTime": "2024-03-01T12:00:00.000Z"},
}
PLAIN_BUCKET = {"kind": "storage#bucket", "name": "offsite", "versioning": {"enabled": False},
                "objectRetention": {"mode": "Enabled"}}


def test_retention_state_of_a_locked_policy():
    state = retention_state_from_bucket_resource(LOCKED_BUCKET)
    assert state.immutable and state.locked and state.versioning
    assert state.default_retention_s == 30 * 86400 and state.default_mode == "bucket-retention"
    assert "2592000 s" in state.detail and "locked" in state.detail


def test_retention_state_of_an_unlocked_policy():
    state = retention_state_from_bucket_resource(UNLOCKED_BUCKET)
    assert state.immutable and not state.locked and not state.versioning
    assert state.default_retention_s == 86400 and "not locked" in state.detail


def test_retention_state_without_a_policy():
    state = retention_state_from_bucket_resource(PLAIN_BUCKET)
    assert not state.immutable and not state.lock_enabled and not state.locked
    assert state.default_mode is None and state.default_retention_s is None
    assert "no bucket retention policy" in state.detail and "object retention enabled" in state.detail


def test_retention_state_reads_the_bucket_resource(store, monkeypatch):
    def reload(**kw):
        store._bucket._set_properties(LOCKED_BUCKET)

    monkeypatch.setattr(store._bucket, "reload", reload)
    assert store.retention_state().locked is True


def test_object_retention_and_holds_from_the_object_resource(store):
    blob = store._bucket.blob("host1/zfs/tank@1")
    blob._set_properties({  # GET /storage/v1/b/B/o/O of a retained object on hold
        "name": "host1/zfs/tank@1", "bucket": "offsite", "size": "42", "generation": "1709294400000001",
        "updated": "2024-03-01T12:00:00.000Z", "md5Hash": "XrY7u+Ae7tCTyyK7j1rNww==", "crc32c": "yZRlqg==",
        "retentionExpirationTime": "2024-03-31T12:00:00.000Z",
        "retention": {"mode": "Locked", "retainUntilTime": "2025-01-01T00:00:00.000Z"},
        "temporaryHold": True, "metadata": {"drtool-policy": "tank"},
    })
    info = store._info(blob)
    assert info.key == "tank@1" and info.size == 42 and info.version == "1709294400000001"
    assert info.md5_hex == "5eb63bbbe01eeed093cb22bb8f5acdc3"  # md5("hello world")
    assert info.retain_until is not None and info.retain_until.year == 2025 and info.lock_mode == "Locked"
    assert info.legal_hold is True and info.metadata == {"drtool-policy": "tank"}


@pytest.mark.parametrize("message, locked", [
    ("Object 'offsite/host1/zfs/k' is subject to bucket's retention policy or object retention and cannot be "
     "deleted or overwritten until 2030-01-01T00:00:00.000Z", True),
    ("Object 'offsite/host1/zfs/k' is under active Temporary hold and cannot be deleted, overwritten or "
     "archived until hold is removed.", True),
    ("anonymous caller does not have storage.objects.delete access to the Google Cloud Storage object.", False),
])
def test_forbidden_delete_maps_to_object_locked_only_for_retention(store, monkeypatch, message, locked):
    from google.api_core import exceptions as gexc

    def refuse(*a, **kw):
        raise gexc.Forbidden(f"DELETE https://storage.googleapis.com/storage/v1/b/offsite/o/k: {message}")

    monkeypatch.setattr(store._bucket, "delete_blob", refuse)
    with pytest.raises(ObjectStoreError) as err:
        store.delete("k")
    assert isinstance(err.value, ObjectLocked) is locked
    assert message in str(err.value) and "https://" not in str(err.value)


def test_bad_credentials_never_appear_in_the_error():
    info = {"type": "service_account", "project_id": "p", "client_email": "drtool@p.iam.gserviceaccount.com",
            "private_key": "-----BEGIN PRIVATE KEY-----\nTOPSECRETKEYMATERIAL\n-----END PRIVATE KEY-----\n",
            "private_key_id": "abc", "token_uri": "https://oauth2.googleapis.com/token"}
    with pytest.raises(ObjectStoreError) as err:
        GcsStore("offsite-gcs", "bucket", credentials_info=info)
    assert "TOPSECRET" not in str(err.value) and err.value.__cause__ is None
    assert "service_account" in str(err.value)
    with pytest.raises(ObjectStoreError, match="external_account"):  # only service-account keys are taken
        GcsStore("offsite-gcs", "bucket", credentials_info={"type": "external_account", "audience": "x"})


# -- resuming an interrupted streaming upload: the documented protocol -------- #
# fake-gcs-server cannot show this: it treats a status query ("Content-Range: bytes */*",
# empty body) as the end of the upload and commits what it got. So these two tests run
# the resume path against a stand-in that answers as GCS documents for resumable uploads
# (a 308 with "Range: bytes=0-N" for the bytes persisted; the rest sent again from there).

class _Gcs308:
    """A resumable-upload endpoint: the first data request is cut after ``drop_after``
    bytes, of which ``persist`` were persisted."""

    def __init__(self, drop_after: int, persist: int) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.content, self.requests, self.cancelled = bytearray(), [], False
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def _chunks(self):
                while True:
                    n = int(self.rfile.readline().strip() or b"0", 16)
                    if n == 0:
                        self.rfile.readline()
                        return
                    yield self.rfile.read(n)
                    self.rfile.readline()

            def do_DELETE(self) -> None:
                outer.cancelled = True
                self.send_response(499)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_PUT(self) -> None:
                rng = self.headers["Content-Range"]
                outer.requests.append(rng)
                if rng == "bytes */*":  # a status query
                    self.send_response(308)
                    if outer.content:
                        self.send_header("Range", f"bytes=0-{len(outer.content) - 1}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(rng.split()[1].split("-")[0])
                assert start == len(outer.content), (start, len(outer.content))
                got = bytearray()
                for chunk in self._chunks():
                    got += chunk
                    if len(outer.requests) == 1 and len(got) >= drop_after:  # the network breaks
                        outer.content += got[:persist]
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                outer.content += got
                import base64
                import google_crc32c
                body = json.dumps({"size": str(len(outer.content)), "generation": "7",
                                   "crc32c": base64.b64encode(google_crc32c.Checksum(bytes(outer.content)).digest()).decode()}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/upload?upload_id=1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


class _Blob:
    name = "host1/zfs/resumed"

    def __init__(self, url: str) -> None:
        self.url = url

    def create_resumable_upload_session(self, **kw) -> str:
        assert kw["if_generation_match"] == 0
        return self.url


def test_a_broken_streaming_upload_resumes_from_the_persisted_offset(store):
    from drtool.backends.objectstore import HashingReader

    data = os.urandom(14 * MiB + 123)
    srv = _Gcs308(drop_after=3 * MiB, persist=2 * MiB + 256 * 1024)
    try:
        reader = HashingReader(io.BytesIO(data))
        first = reader.read(MiB)
        # what is kept must cover what the kernel's socket buffers took before the break surfaced (MiBs on loopback)
        stored = store._stream(_Blob(srv.url), reader, [first], keep=10 * MiB)
    finally:
        srv.server.shutdown()
    assert bytes(srv.content) == data  # every byte once, in order, although 3 MiB or more went out before the break
    assert srv.requests == ["bytes 0-*/*", "bytes */*", f"bytes {2 * MiB + 256 * 1024}-*/*"]
    assert stored["size"] == str(len(data)) and stored["crc32c"] == reader.crc32c_b64
    assert reader.size == len(data)  # the source was read once: resent bytes came from what was kept


def test_a_broken_streaming_upload_fails_when_the_persisted_offset_is_gone(store):
    """GCS kept less than drtool still holds to resend (a non-replayable stream): the
    upload fails, the session is cancelled, and nothing is counted."""
    from drtool.backends.objectstore import HashingReader

    srv = _Gcs308(drop_after=5 * MiB, persist=256 * 1024)
    try:
        reader = HashingReader(io.BytesIO(os.urandom(8 * MiB)))
        with pytest.raises(ObjectStoreError, match="GCS kept 262144 bytes.*nothing was counted"):
            store._stream(_Blob(srv.url), reader, [reader.read(MiB)], keep=MiB)
    finally:
        srv.server.shutdown()
    assert srv.cancelled and srv.requests == ["bytes 0-*/*", "bytes */*"]
