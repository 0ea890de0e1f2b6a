"""``check_snapshot`` on synthetic raft snapshots built here, shaped like a real one
(a gzip tar of meta.json, state.bin, SHA256SUMS over those two, SHA256SUMS.sealed):
each damage a snapshot can carry is reported as a problem, never raised."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile

from drtool.backends.vault import check_snapshot

STATE = os.urandom(40_000)
META = json.dumps({"Version": 1, "ID": "bolt-snapshot", "Index": 36, "Term": 3, "Size": len(STATE),
                   "Configuration": {"Servers": [{"ID": "n1", "Address": "127.0.0.1:8201"}]},
                   "ConfigurationIndex": 1}).encode()


def sums_for(members: dict[str, bytes]) -> bytes:
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in members.items()).encode()


def snapshot(members: dict[str, bytes] | None = None, *, sums: bytes | None = None, extra: dict[str, bytes] | None = None,
             sealed: bool = True) -> bytes:
    """A gzip tar in Vault's member order; ``sums`` None means SHA256SUMS over ``members``,
    ``b""`` means no SHA256SUMS at all."""
    members = {"meta.json": META, "state.bin": STATE} if members is None else members
    files = dict(members)
    if sums is None:
        sums = sums_for(members)
    if sums:
        files["SHA256SUMS"] = sums
    if sealed:
        files["SHA256SUMS.sealed"] = os.urandom(185)
    files.update(extra or {})
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue())


def check(data: bytes) -> dict:
    return check_snapshot(io.BytesIO(data))


def test_a_well_formed_snapshot_passes_with_members_and_meta():
    data = snapshot()
    result = check(data)
    assert result["ok"], result["problems"]
    assert result["members"]["state.bin"] == len(STATE) and result["members"]["meta.json"] == len(META)
    assert result["meta"]["index"] == 36 and result["meta"]["term"] == 3 and result["meta"]["version"] == 1
    assert result["bytes"] == len(data) and result["sha256"] == hashlib.sha256(data).hexdigest()


def test_missing_sha256sums_is_a_problem():
    result = check(snapshot(sums=b""))
    assert not result["ok"]
    assert any("SHA256SUMS is missing" in p for p in result["problems"])


def test_a_member_not_listed_in_sha256sums_is_a_problem():
    result = check(snapshot(sums=sums_for({"meta.json": META}), extra={"extra.bin": b"x"}))
    assert not result["ok"]
    assert "state.bin is not listed in SHA256SUMS" in result["problems"]
    assert "member extra.bin is not listed in SHA256SUMS" in result["problems"]


def test_a_hash_mismatch_in_state_bin_is_a_problem():
    sums = sums_for({"meta.json": META, "state.bin": STATE})
    damaged = bytearray(STATE)
    damaged[len(damaged) // 2] ^= 0x01
    result = check(snapshot({"meta.json": META, "state.bin": bytes(damaged)}, sums=sums))
    assert not result["ok"]
    assert any(p.startswith("state.bin: SHA-256 mismatch") and "corrupted" in p for p in result["problems"])


def test_a_listed_member_that_is_absent_and_a_missing_state_bin_are_problems():
    sums = sums_for({"meta.json": META, "state.bin": STATE})
    result = check(snapshot({"meta.json": META}, sums=sums))
    assert "state.bin is missing from the snapshot" in result["problems"]
    assert "SHA256SUMS lists state.bin, which is not in the snapshot" in result["problems"]


def test_missing_sealed_sums_and_a_size_that_disagrees_with_meta_are_problems():
    meta = json.dumps({"Version": 1, "Index": 1, "Term": 1, "Size": len(STATE) + 1}).encode()
    result = check(snapshot({"meta.json": meta, "state.bin": STATE}, sealed=False))
    assert "SHA256SUMS.sealed is missing: the server cannot verify this snapshot" in result["problems"]
    assert any("meta.json says state.bin is" in p for p in result["problems"])


def test_not_gzip_at_all_is_a_problem_not_an_exception():
    for data in (b"", b"{\"errors\":[\"permission denied\"]}", os.urandom(1000)):
        result = check(data)
        assert not result["ok"] and len(result["problems"]) == 1
        assert "gzip" in result["problems"][0]


def test_gzip_of_something_that_is_not_a_tar_is_a_problem():
    result = check(gzip.compress(b"not a tar archive " * 100))
    assert not result["ok"]
    assert "not a complete tar archive" in result["problems"][0]


def test_truncation_anywhere_and_trailing_bytes_are_problems():
    """Every cut point, including inside the 8-byte gzip trailer (after the tar's end
    marker, where tarfile's own r|gz would stop reading and call it fine)."""
    data = snapshot()
    for cut in (1, 10, len(data) // 3, len(data) // 2, len(data) - 8, len(data) - 4, len(data) - 1):
        result = check(data[:cut])
        assert not result["ok"], cut
        assert "truncated" in result["problems"][0] or "too short" in result["problems"][0], (cut, result["problems"])
    result = check(data + b"\0")
    assert result["problems"] == [f"data after the end of the gzip stream (after {len(data) + 1} bytes): not a usable snapshot"]


def test_a_flipped_compressed_byte_is_caught_by_the_gzip_crc_or_the_sums():
    data = bytearray(snapshot())
    data[len(data) // 2] ^= 0xFF
    result = check(bytes(data))
    assert not result["ok"]


def test_memory_stays_bounded_on_a_highly_compressible_state_bin():
    """64 MiB of zeros compress to ~64 kB; the check never holds more than a few chunks."""
    import tracemalloc

    zeros = b"\0" * (64 * 1024 * 1024)
    data = snapshot({"meta.json": json.dumps({"Size": len(zeros)}).encode(), "state.bin": zeros})
    del zeros
    tracemalloc.start()
    try:
        result = check(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result["ok"], result["problems"]
    assert peak < 16 * 1024 * 1024, peak
