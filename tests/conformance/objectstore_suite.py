"""Conformance suite for the ``ObjectStore`` Protocol (drtool/backends/objectstore.py).

A backend's test module subclasses ``ObjectStoreConformance`` and provides the
fixture ``store``: a fresh ObjectStore on an empty bucket of a real local server
(SeaweedFS for S3, fake-gcs-server for GCS). Every backend that claims ``ObjectStore``
in ``drtool.backends.PROTOCOLS`` must pass it.
"""
from __future__ import annotations

import hashlib
import io
import os
from datetime import timezone

import pytest

from drtool.backends.objectstore import ObjectNotFound, ObjectStore, RetentionState


class _ChunkyReader(io.RawIOBase):
    """A non-seekable stream (like a pipe from `zfs send`) that returns short reads."""

    def __init__(self, data: bytes, chunk: int = 100_000) -> None:
        self.data, self.pos, self.chunk = data, 0, chunk

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.chunk if n is None or n < 0 else min(n, self.chunk)
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


class ObjectStoreConformance:
    def test_satisfies_protocol(self, store):
        assert isinstance(store, ObjectStore)

    def test_small_put_stat_get_round_trip(self, store):
        data = b"hello drtool\n" * 100
        res = store.put_stream("p/one.bin", io.BytesIO(data), metadata={"drtool-policy": "docs"})
        assert res.size == len(data) and res.sha256_hex == hashlib.sha256(data).hexdigest()
        assert res.md5_hex == hashlib.md5(data).hexdigest() and res.store_checksum
        info = store.stat("p/one.bin")
        assert info.size == len(data) and info.updated.tzinfo is not None and info.updated.utcoffset() == timezone.utc.utcoffset(None)
        assert info.metadata.get("drtool-policy") == "docs"
        sink = io.BytesIO()
        assert store.get_stream("p/one.bin", sink) == len(data)
        assert sink.getvalue() == data

    def test_multipart_stream_from_a_pipe_is_intact(self, store):
        data = os.urandom(12 * 1024 * 1024 + 12345)  # several parts, a short last one
        seen: list[int] = []
        res = store.put_stream("p/big.bin", _ChunkyReader(data), part_size=5 * 1024 * 1024, progress=seen.append)
        assert res.size == len(data) and res.sha256_hex == hashlib.sha256(data).hexdigest()
        assert seen and seen[-1] == len(data)
        sink = io.BytesIO()
        store.get_stream("p/big.bin", sink)
        assert hashlib.sha256(sink.getvalue()).hexdigest() == res.sha256_hex

    def test_empty_stream(self, store):
        res = store.put_stream("p/empty", io.BytesIO(b""))
        assert res.size == 0 and store.stat("p/empty").size == 0

    def test_list_by_prefix_and_delete(self, store):
        for k in ("a/1", "a/2", "b/1"):
            store.put_stream(k, io.BytesIO(k.encode()))
        assert sorted(o.key for o in store.list("a/")) == ["a/1", "a/2"]
        assert sorted(o.key for o in store.list()) == ["a/1", "a/2", "b/1"]
        store.delete("a/1")
        assert sorted(o.key for o in store.list("a/")) == ["a/2"]
        with pytest.raises(ObjectNotFound):
            store.stat("a/1")

    def test_deleting_a_missing_object_is_no_error(self, store):
        store.delete("never-there")  # prune must be idempotent: a second pass finds it gone

    def test_missing_object(self, store):
        with pytest.raises(ObjectNotFound):
            store.stat("nope")
        with pytest.raises(ObjectNotFound):
            store.get_stream("nope", io.BytesIO())

    def test_retention_state_is_read_from_the_bucket(self, store):
        state = store.retention_state()
        assert isinstance(state, RetentionState)
        assert state.immutable is False  # the suite's bucket has no lock or retention
