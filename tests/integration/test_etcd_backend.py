"""drtool.backends.etcd against a real etcd 3.4 (the session's ``etcd_server``, plus a
few private servers where a test needs a keyspace of its own: tiny, compacted, or
holding an empty value).

Tests on the shared server write under a unique ``/registry/t<hex>…`` prefix and
compare only the groups they wrote, so they do not disturb each other's counts.
What is proved: snapshot save/status; counts at a revision ignore later writes; the
offline bbolt count equals etcd's own count (deletes, overwrites, compaction, binary
keys, inline bucket); a good copy verifies; a corrupted copy passes ``snapshot
status`` but fails verification with a clear problem; count mismatches are reported
both ways; the scratch etcd is gone and the scratch dir removed afterwards.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from drtool.backends import etcd as etcd_mod
from drtool.backends.etcd import (
    EtcdCli, EtcdConn, ScratchEtcd, prefix_group, snapshot_key_counts, snapshot_restore, snapshot_status,
    verify_snapshot,
)
from drtool.errors import BackendError
from drtool.exec import CommandResult, Outcome, pid_alive
from services.etcd import EtcdServer


def tag() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def mine(counts: dict[str, int], t: str) -> dict[str, int]:
    """The groups of ``counts`` that belong to test tag ``t``."""
    return {g: n for g, n in counts.items() if g.startswith(f"/registry/{t}")}


@pytest.fixture
def private_etcd(etcd_server):
    """A fresh etcd of this test's own (after ``etcd_server``, so a missing etcd fails
    or skips through the shared fixture)."""
    server = EtcdServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def scratch_pids(monkeypatch) -> list[int]:
    """PIDs of every ScratchEtcd that verify_snapshot starts during the test."""
    pids: list[int] = []

    class Recording(ScratchEtcd):
        def start(self, timeout: float = 30) -> ScratchEtcd:
            started = super().start(timeout)
            assert self.pid is not None
            pids.append(self.pid)
            return started

    monkeypatch.setattr(etcd_mod, "ScratchEtcd", Recording)
    return pids


def save(server: EtcdServer, path: Path) -> tuple[EtcdCli, dict[str, int], int]:
    """Snapshot ``server`` into ``path``; return the cli, the /registry/ counts at the
    snapshot's revision (what a backup records) and that revision."""
    cli = EtcdCli(server.conn)
    cli.snapshot_save(path)
    rev = snapshot_status(path, etcdctl=server.etcdctl).revision
    return cli, cli.key_counts(revision=rev), rev


def flip(path: Path, offset: int, n: int = 64) -> None:
    """Corrupt ``path`` in place, same size: invert ``n`` bytes at ``offset``."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


# -- helpers ------------------------------------------------------------------


def test_prefix_group():
    assert prefix_group("/registry/pods/ns/a") == "/registry/pods/"
    assert prefix_group("/registry/ranges/serviceips") == "/registry/ranges/"
    assert prefix_group("/registry/health") == "/registry/health"
    assert prefix_group("/registry/") == "/registry/"


def test_range_end():
    assert etcd_mod.range_end(b"/registry/") == b"/registry0"
    assert etcd_mod.range_end(b"a\xff") == b"b"
    assert etcd_mod.range_end(b"\xff\xff") == b"\x00"


# -- live cluster ------------------------------------------------------------------


def test_snapshot_save_and_status(etcd_server, tmp_path):
    t = tag()
    written = etcd_server.fill({"pods": 300, "secrets": 120}, prefix_tag=t)
    rev = etcd_server.revision()
    cli = EtcdCli(etcd_server.conn)
    cli.snapshot_save(tmp_path / "snap.db")
    st = snapshot_status(tmp_path / "snap.db", etcdctl=etcd_server.etcdctl)
    assert st.revision >= rev
    assert st.total_keys >= sum(written.values())
    assert st.total_size > 0 and (tmp_path / "snap.db").stat().st_size == st.total_size + 32  # + sha256
    assert not (tmp_path / "snap.db.part").exists()
    assert any("save" in c["argv"] and c["returncode"] == 0 for c in cli.commands)


def test_snapshot_save_unreachable_endpoint_names_it(etcd_server, tmp_path, monkeypatch):
    monkeypatch.setattr(etcd_mod, "PROBE_COMMAND_TIMEOUT_S", 1)
    dead = f"http://127.0.0.1:{etcd_mod._free_port()}"
    cli = EtcdCli(EtcdConn(endpoints=[dead], etcdctl=etcd_server.etcdctl))
    with pytest.raises(BackendError) as err:
        cli.snapshot_save(tmp_path / "snap.db")
    assert dead in str(err.value) and "connection refused" in str(err.value)
    assert not list(tmp_path.iterdir())


def test_snapshot_save_tries_the_next_endpoint(etcd_server, tmp_path, monkeypatch):
    monkeypatch.setattr(etcd_mod, "PROBE_COMMAND_TIMEOUT_S", 1)
    dead = f"http://127.0.0.1:{etcd_mod._free_port()}"
    cli = EtcdCli(EtcdConn(endpoints=[dead, etcd_server.endpoint], etcdctl=etcd_server.etcdctl))
    cli.snapshot_save(tmp_path / "snap.db")
    assert snapshot_status(tmp_path / "snap.db").revision > 0


def test_key_counts_at_a_revision_ignore_later_writes(etcd_server):
    t = tag()
    written = etcd_server.fill({"pods": 50, "configmaps": 20}, prefix_tag=t)
    etcd_server.put(f"/registry/{t}health", "ok")  # no further "/": its own group
    rev = etcd_server.revision()
    etcd_server.fill({"deployments": 5}, prefix_tag=t)
    etcd_server.put(f"/registry/{t}pods/late/one", "x")
    etcd_server.delete_prefix(f"/registry/{t}configmaps/")
    cli = EtcdCli(etcd_server.conn)

    then = mine(cli.key_counts(revision=rev), t)
    assert then == {**written, f"/registry/{t}health": 1}
    now = mine(cli.key_counts(), t)
    assert now == {f"/registry/{t}pods/": 51, f"/registry/{t}deployments/": 5, f"/registry/{t}health": 1}
    # a narrower prefix groups one level further down
    narrow = cli.key_counts(f"/registry/{t}pods/")
    assert sum(narrow.values()) == 51 and narrow[f"/registry/{t}pods/late/"] == 1


def test_key_counts_binary_and_newline_keys(etcd_server):
    t = tag()
    etcd_server.put(f"/registry/{t}bin/".encode() + b"\xff\xfe/x", "v")
    etcd_server.put(f"/registry/{t}bin/multi\nline", "v")
    etcd_server.put(f"/registry/{t}bin/trailing\n", "v")
    etcd_server.put(f"/registry/{t}\xe9t\xe9/a", "v")  # UTF-8
    counts = mine(EtcdCli(etcd_server.conn).key_counts(), t)
    assert counts == {f"/registry/{t}bin/": 3, f"/registry/{t}\xe9t\xe9/": 1}


def test_key_counts_failure_is_clear(private_etcd):
    private_etcd.fill({"pods": 3})
    old = private_etcd.revision()
    private_etcd.fill({"pods": 3})
    private_etcd.compact(private_etcd.revision())
    with pytest.raises(BackendError) as err:
        EtcdCli(private_etcd.conn).key_counts(revision=old)
    assert "compacted" in str(err.value) and f"revision {old}" in str(err.value)


# -- offline counts ------------------------------------------------------------------


def test_offline_counts_equal_etcd_counts(private_etcd, tmp_path):
    """The bbolt reader agrees with etcd after overwrites, deletes (tombstones), keys
    re-created after deletion, compaction, binary keys, long keys and keys outside /registry/."""
    s = private_etcd
    s.fill({"pods": 400, "secrets": 150, "events": 300}, value_size=300)
    s.fill({"pods": 200}, value_size=50)  # overwrites
    s.delete_prefix("/registry/events/ns3/")
    s.put("/registry/events/ns3/obj3", "back")  # re-created after its tombstone
    s.put(b"/registry/bin\xff/" + bytes(range(256)), "v")
    s.put("/registry/long/" + "k" * 300, "v")  # key length needs a 2-byte varint
    s.put("/other/key", "v")
    s.put("/registry/health", "")
    s.compact(s.revision())
    s.fill({"configmaps": 70}, value_size=2000)
    s.delete_prefix("/registry/secrets/ns1/")
    cli, recorded, rev = save(s, tmp_path / "snap.db")

    keys = snapshot_key_counts(tmp_path / "snap.db")
    assert keys.counts == recorded
    assert keys.revision == rev
    assert keys.live_keys == sum(recorded.values()) + 1  # + /other/key
    assert keys.entries > keys.live_keys  # history and tombstones were read and discarded
    assert recorded["/registry/events/"] == 300 - 43 + 1 and recorded["/registry/health"] == 1


def test_offline_counts_inline_key_bucket(private_etcd, tmp_path):
    """A tiny keyspace is stored as an inline bucket inside its parent page."""
    private_etcd.put("/registry/pods/a/b", "v")
    private_etcd.put("/registry/pods/a/c", "v")
    path = tmp_path / "snap.db"
    EtcdCli(private_etcd.conn).snapshot_save(path)
    import mmap
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        bolt = etcd_mod._Bolt(mm, path)
        leaves = bolt.bucket_leaves(b"key")
        assert len(leaves) == 1 and leaves[0][0] % bolt.page_size != 0  # inline: not at a page boundary
        del bolt, leaves
    assert snapshot_key_counts(path).counts == {"/registry/pods/": 2}


def test_offline_counts_refuse_a_non_snapshot(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(os.urandom(64 * 1024))
    with pytest.raises(BackendError, match="bbolt"):
        snapshot_key_counts(junk)
    with pytest.raises(BackendError, match="cannot open"):
        snapshot_key_counts(tmp_path / "missing.db")


def test_verify_a_missing_or_junk_file_is_a_problem_not_an_exception(etcd_server, tmp_path):
    (tmp_path / "junk.db").write_bytes(os.urandom(64 * 1024))
    for name, words in (("missing.db", "does not exist"), ("junk.db", "is corrupt")):
        res = verify_snapshot(tmp_path / name, {}, workdir=tmp_path / "w", etcdctl=etcd_server.etcdctl)
        assert not res["ok"] and len(res["problems"]) == 1 and words in res["problems"][0], res["problems"]
    assert list((tmp_path / "w").iterdir()) == []


# -- restore and verify ------------------------------------------------------------------


def test_verify_good_copy(etcd_server, tmp_path, scratch_pids):
    t = tag()
    etcd_server.fill({"pods": 200, "secrets": 40}, prefix_tag=t)
    _, recorded, rev = save(etcd_server, tmp_path / "snap.db")
    copy = tmp_path / "downloaded.db"
    shutil.copyfile(tmp_path / "snap.db", copy)
    work = tmp_path / "work"

    fast = verify_snapshot(copy, recorded, workdir=work, etcdctl=etcd_server.etcdctl, etcd=etcd_server.binary)
    assert fast["ok"], fast["problems"]
    assert fast["counts"] == recorded and fast["revision"] == rev and fast["keys_read"] == 0
    assert scratch_pids == []  # integrity needs no etcd process

    sampled = verify_snapshot(copy, recorded, workdir=work, sample=12, seed=1,
                              etcdctl=etcd_server.etcdctl, etcd=etcd_server.binary)
    assert sampled["ok"], sampled["problems"]
    assert sampled["keys_read"] == 12 and sampled["seconds"]["start"] > 0
    assert len(scratch_pids) == 1 and not pid_alive(scratch_pids[0])
    assert list(work.iterdir()) == []


MARKER = b"drtool-marker-"


@pytest.mark.parametrize("where", ["value", "middle"])
def test_verify_corrupt_copy_fails(etcd_server, tmp_path, scratch_pids, where):
    """64 bytes flipped, same size. Inside a stored value, ``snapshot status`` passes
    (it checks bbolt's page structure, not the data); in the middle of the file it may
    pass or crash, depending on what it hits. Verification fails either way, clearly."""
    t = tag()
    etcd_server.fill({"pods": 500}, value_size=400, prefix_tag=t)
    etcd_server.put(f"/registry/{t}configmaps/ns/big", MARKER * 4000)  # 56 kB: overflow pages
    _, recorded, rev = save(etcd_server, tmp_path / "snap.db")
    bad = tmp_path / "bad.db"
    shutil.copyfile(tmp_path / "snap.db", bad)
    data = bad.read_bytes()
    at = data.index(MARKER * 100) + 20000 if where == "value" else len(data) // 2
    flip(bad, at)
    assert bad.stat().st_size == len(data) and bad.read_bytes() != data

    if where == "value":
        assert snapshot_status(bad).revision == rev  # status does not notice
    work = tmp_path / "work"
    res = verify_snapshot(bad, recorded, workdir=work, sample=5, etcdctl=etcd_server.etcdctl, etcd=etcd_server.binary)
    assert not res["ok"]
    assert len(res["problems"]) == 1
    problem = res["problems"][0]
    assert f"etcd snapshot {bad} is corrupt" in problem and "sha256" in problem
    assert scratch_pids == [] and list(work.iterdir()) == []

    with pytest.raises(BackendError, match="is corrupt"):
        snapshot_restore(bad, tmp_path / "restored")
    assert not (tmp_path / "restored").exists()  # the partial data dir is removed


def test_snapshot_status_of_a_damaged_header_is_a_clear_error(tmp_path, etcd_server):
    """Status does notice a damaged header (both bbolt meta pages), and says so in one line."""
    EtcdCli(etcd_server.conn).snapshot_save(tmp_path / "snap.db")
    bad = tmp_path / "snap.db"
    flip(bad, 16)
    flip(bad, 4096 + 16)
    with pytest.raises(BackendError) as err:
        snapshot_status(bad)
    assert str(err.value) == f"etcd snapshot status of {bad} failed: invalid database"
    with pytest.raises(BackendError, match="no valid bbolt meta page"):
        snapshot_key_counts(bad)


def test_a_bbolt_panic_reads_as_one_line():
    """etcdctl panics (a Go stack on stderr) on some damaged pages: keep the panic line."""
    stderr = ["panic: freepages: failed to get all reachable pages (page -4: out of bounds: 79)", "",
              "goroutine 88 [running]:", "go.etcd.io/bbolt.(*DB).freepages.func2()", "\tgo.etcd.io/bbolt/db.go:1056 +0x99"]
    res = CommandResult(argv=["etcdctl"], returncode=2, outcome=Outcome.FAILED, duration_s=0.1, stdout="",
                        stderr_lines=stderr)
    assert etcd_mod._etcdctl_reason(res) == f"etcdctl crashed reading it: {stderr[0]}"


def test_verify_reports_count_mismatches_both_ways(etcd_server, tmp_path):
    t = tag()
    etcd_server.fill({"pods": 30, "secrets": 10, "leases": 4}, prefix_tag=t)
    _, recorded, _ = save(etcd_server, tmp_path / "snap.db")
    expected = dict(recorded)
    expected[f"/registry/{t}pods/"] += 1  # differs
    del expected[f"/registry/{t}secrets/"]  # only in the restore
    expected[f"/registry/{t}gone/"] = 7  # only recorded

    res = verify_snapshot(tmp_path / "snap.db", expected, workdir=tmp_path / "w", etcdctl=etcd_server.etcdctl)
    assert not res["ok"]
    assert sorted(res["problems"]) == sorted([
        f"/registry/{t}pods/: 31 keys at backup, 30 in the restored snapshot",
        f"/registry/{t}gone/: 7 keys at backup, 0 in the restored snapshot",
        f"/registry/{t}secrets/: not recorded at backup, 10 keys in the restored snapshot",
    ])
    assert res["counts"] == recorded


def test_verify_counts_a_recorded_prefix_of_any_shape(etcd_server, tmp_path):
    """A recorded prefix that is not a /registry/<resource>/ group is counted exactly."""
    t = tag()
    etcd_server.fill({"pods": 21}, prefix_tag=t)
    _, recorded, _ = save(etcd_server, tmp_path / "snap.db")
    expected = {**recorded, f"/registry/{t}pods/ns0/": 3}
    res = verify_snapshot(tmp_path / "snap.db", expected, workdir=tmp_path / "w", etcdctl=etcd_server.etcdctl)
    assert res["ok"], res["problems"]
    assert res["counts"][f"/registry/{t}pods/ns0/"] == 3


def test_verify_sample_flags_an_empty_value(private_etcd, tmp_path, scratch_pids):
    private_etcd.fill({"pods": 20})
    private_etcd.put("/registry/pods/ns0/empty", b"")
    _, recorded, _ = save(private_etcd, tmp_path / "snap.db")
    res = verify_snapshot(tmp_path / "snap.db", recorded, workdir=tmp_path / "w", sample=100,
                          etcdctl=private_etcd.etcdctl, etcd=private_etcd.binary)
    assert res["keys_read"] == 21
    assert res["problems"] == ["1 of 21 sampled keys have an empty value, e.g. '/registry/pods/ns0/empty'"]
    assert not res["ok"] and not pid_alive(scratch_pids[0])


def test_bare_restore_and_scratch_etcd(etcd_server, tmp_path):
    t = tag()
    written = etcd_server.fill({"pods": 40, "events": 9}, value_size=64, prefix_tag=t)
    _, recorded, rev = save(etcd_server, tmp_path / "snap.db")
    target = tmp_path / "target"
    snapshot_restore(tmp_path / "snap.db", target, etcdctl=etcd_server.etcdctl, name="drill")
    with pytest.raises(BackendError, match="already exists"):
        snapshot_restore(tmp_path / "snap.db", target)

    with ScratchEtcd(target, etcd=etcd_server.binary, name="drill", log_path=tmp_path / "etcd.log") as scratch:
        pid = scratch.pid
        assert pid is not None and pid_alive(pid)
        assert scratch.key_counts(list(written)) == written
        assert scratch.count("/registry/") == sum(recorded.values())
        assert scratch.revision() == rev
        picked = scratch.sample(5, f"/registry/{t}pods/", seed=3)
        assert len(picked) == 5 and len({k for k, _ in picked}) == 5
        assert all(k.startswith(f"/registry/{t}pods/") and size == 64 for k, size in picked)
        assert scratch.sample(5, f"/registry/{t}pods/", seed=3) == picked  # seeded: repeatable
        every = scratch.sample(1000, f"/registry/{t}events/", page=4)  # paged keys-only listing
        assert sorted(k for k, _ in every) == sorted(f"/registry/{t}events/ns{j % 7}/obj{j}" for j in range(9))
        assert len({k for k, _ in scratch.sample(3, f"/registry/{t}pods/", seed=5, page=7)}) == 3
    assert not pid_alive(pid)
    scratch.stop()  # idempotent
    assert (target / "member").is_dir()  # the data dir is the caller's


def test_scratch_etcd_failure_shows_the_log(etcd_server, tmp_path):
    with pytest.raises(BackendError, match="not an etcd data dir"):
        ScratchEtcd(tmp_path / "nothing").start()
    _, _, _ = save(etcd_server, tmp_path / "snap.db")
    snapshot_restore(tmp_path / "snap.db", tmp_path / "data", etcdctl=etcd_server.etcdctl)
    # a truncated db: etcd cannot open it and exits
    db = tmp_path / "data" / "member" / "snap" / "db"
    db.write_bytes(db.read_bytes()[:8192])
    scratch = ScratchEtcd(tmp_path / "data", etcd=etcd_server.binary, log_path=tmp_path / "etcd.log")
    with pytest.raises(BackendError) as err:
        scratch.start(timeout=15)
    assert "did not become healthy" in str(err.value) and str(tmp_path / "etcd.log") in str(err.value)
    assert scratch.pid is None
