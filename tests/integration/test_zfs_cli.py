"""drtool.backends.zfs.ZfsCli against a real zfs-fuse daemon (the ``zfs`` fixture), plus
the pure parsers against captured output: zfs-fuse 0.7 text seen on this machine, and
OpenZFS 2.x text (usage and ``zpool status`` shapes) so feature detection and status
parsing are covered for both."""
from __future__ import annotations

import errno
import hashlib
import itertools
import os
import time
from datetime import datetime, timedelta, timezone

import pytest

from drtool.backends.zfs import (
    ZfsCli, ZfsDiverged, ZfsError, ZfsFeatures, ZfsNotFound, ZfsSnapshot, ZfsUnsupported,
    features_from_usage, parse_pool_status, parse_scan, parse_usage, receive_args, send_args,
)
from drtool.legs.zfs_legs import bookmark_name, choose_base

# -- captured output ---------------------------------------------------------

ZFS_FUSE_USAGE = """\
usage: zfs command args ...
where 'command' is one of the following:

\tcreate [-p] [-o property=value] ... <filesystem>
\tcreate [-ps] [-b blocksize] [-o property=value] ... -V <size> <volume>
\tdestroy [-rRf] <filesystem|volume>
\tdestroy [-rRd] <snapshot>

\tsnapshot [-r] [-o property=value] ... <filesystem@snapname|volume@snapname>
\trollback [-rRf] <snapshot>
\tlist [-rH][-d max] [-o property[,...]] [-t type[,...]] [-s property] ...
\t    [-S property] ... [filesystem|volume|snapshot] ...

\tget [-rHp] [-d max] [-o "all" | field[,...]] [-s source[,...]]
\t    <"all" | property[,...]> [filesystem|volume|snapshot] ...
\tsend [-RDp] [-[iI] snapshot] <snapshot>
\treceive [-vnF] <filesystem|volume|snapshot>
\treceive [-vnF] -d <filesystem>

\thold [-r] <tag> <snapshot> ...
\tholds [-r] <snapshot> ...
\trelease [-r] <tag> <snapshot> ...

Each dataset is of the form: pool/[dataset/]*dataset[@name]
"""
ZFS_FUSE_HOLDS_PROBE = "internal error: /usr/lib/zfs/pyzfs.py not found"

OPENZFS_USAGE = """\
usage: zfs command args ...
where 'command' is one of the following:

\tsnapshot [-r] [-o property=value] ... <filesystem|volume>@<snap> ...
\tlist [-Hp] [-r|-d max] [-o property[,...]] [-s property]...
\t    [-S property]... [-t type[,...]] [filesystem|volume|snapshot] ...
\tsend [-DLPbcehnpsVvw] [-i|-I snapshot]
\t     [-R [-X dataset[,dataset]...]]     <snapshot>
\tsend [-DnVvPLecw] [-i snapshot|bookmark] <filesystem|volume|snapshot>
\tsend [-DnPpVvLec] [-i bookmark|snapshot] --redact <bookmark> <snapshot>
\tsend [-nVvPe] -t <receive_resume_token>
\tsend [-PnVv] --saved filesystem
\treceive [-vMnsuF] [-o <property>=<value>] ... [-x <property>] ...
\t    <filesystem|volume|snapshot>
\treceive -A <filesystem|volume>
\tbookmark <snapshot|bookmark> <newbookmark>
\thold [-r] <tag> <snapshot> ...
\tholds [-rHp] <snapshot> ...
"""
OPENZFS_HOLDS_PROBE = "missing dataset argument\nusage:\n\tholds [-rHp] <snapshot> ..."

ZFS_FUSE_STATUS_SCRUBBED = """\
  pool: tank
 state: ONLINE
 scrub: scrub completed after 0h0m with 0 errors on Sat Nov 28 11:27:36 2026
config:

\tNAME          STATE     READ WRITE CKSUM
\ttank          ONLINE       0     0     0
\t  /tmp/zx/v1  ONLINE       0     0     0

errors: No known data errors
"""

OPENZFS_STATUS_DEGRADED = """\
  pool: tank
 state: DEGRADED
status: One or more devices has experienced an error resulting in data
\tcorruption.  Applications may be affected.
action: Restore the file in question if possible.
   see: https://openzfs.github.io/openzfs-docs/msg/ZFS-8000-8A
  scan: scrub in progress since Sun Jul 25 16:07:49 2021
\t1.23G scanned at 100M/s, 500M issued at 50M/s, 2.00G total
\t0B repaired, 25.00% done, 00:00:30 to go
config:

\tNAME        STATE     READ WRITE CKSUM
\ttank        DEGRADED     0     0     0
\t  mirror-0  DEGRADED     0     0     0
\t    sda     ONLINE       0     0     0
\t    sdb     FAULTED      3 1.2K     7  too many errors

errors: Permanent errors have been detected in the following files:

        /tank/data/file.bin
"""


def test_feature_detection_from_usage_text():
    assert parse_usage(ZFS_FUSE_USAGE)["send"] == {"R", "D", "p", "i", "I"}
    assert features_from_usage(ZFS_FUSE_USAGE, ZFS_FUSE_HOLDS_PROBE) == ZfsFeatures(snapshot_properties=True)
    assert features_from_usage(OPENZFS_USAGE, OPENZFS_HOLDS_PROBE) == ZfsFeatures(
        parsable_list=True, bookmarks=True, resume_tokens=True, compressed_send=True, raw_send=True,
        snapshot_properties=True, holds_list=True)


def test_send_and_receive_argv_follow_the_binary():
    """OpenZFS (captured usage text) gets -c, raw -w for encrypted sources, receive -s and
    resume tokens; zfs-fuse gets the plain common subset. Bookmarks are always -i bases."""
    new = features_from_usage(OPENZFS_USAGE, OPENZFS_HOLDS_PROBE)
    old = features_from_usage(ZFS_FUSE_USAGE, ZFS_FUSE_HOLDS_PROBE)
    assert send_args("t/d@b", base="t/d@a", incremental_all=True, features=new) == ["send", "-c", "-I", "t/d@a", "t/d@b"]
    assert send_args("t/d@b", base="t/d@a", incremental_all=True, features=new, raw=True) == ["send", "-w", "-I", "t/d@a", "t/d@b"]
    assert send_args("t/d@b", base="t/d#a.leg", incremental_all=True, features=new) == ["send", "-c", "-i", "t/d#a.leg", "t/d@b"]
    assert send_args("t/d@b", features=new, token="1-abc-def") == ["send", "-t", "1-abc-def"]
    assert receive_args("b/d", features=new) == ["receive", "-s", "b/d"]
    assert receive_args("b/d", force=True, features=new) == ["receive", "-s", "-F", "b/d"]
    assert send_args("t/d@b", base="t/d@a", incremental_all=True, features=old, raw=True) == ["send", "-I", "t/d@a", "t/d@b"]
    assert send_args("t/d@b", features=old) == ["send", "t/d@b"]
    assert receive_args("b/d", features=old) == ["receive", "b/d"]


def _snap(name: str, guid: str, txg: int) -> ZfsSnapshot:
    ds, snap = name.split("@")
    return ZfsSnapshot(name, ds, snap, guid, txg, datetime(2026, 1, 1, tzinfo=timezone.utc), 0, 0, 0)


def test_replication_base_prefers_a_common_snapshot_then_a_bookmark():
    src = [_snap("t/d@s1", "1", 10), _snap("t/d@s2", "2", 20), _snap("t/d@s3", "3", 30)]
    dst = [_snap("b/d@s1", "1", 5), _snap("b/d@s2", "2", 6)]
    assert choose_base(src, [], dst) == ("t/d@s2", dst[1])
    # s1 and s2 destroyed on the source; their bookmarks remain (OpenZFS)
    marks = [("t/d#s1.rep", "1"), ("t/d#s2.rep", "2"), ("t/d#other", "99")]
    assert choose_base(src[2:], marks, dst) == ("t/d#s2.rep", dst[1])
    assert choose_base(src[2:], [("t/d#other", "99")], dst) == (None, None)  # nothing shared: full send (or divergence)
    assert bookmark_name(src[2], "rep") == "t/d#s3.rep"


def test_pool_status_parsers():
    st = parse_pool_status(ZFS_FUSE_STATUS_SCRUBBED)
    assert (st.pool, st.state, st.scan_function, st.scan_state, st.scan_errors) == ("tank", "ONLINE", "scrub", "completed", 0)
    assert st.last_scrub_end == datetime(2026, 11, 28, 11, 27, 36, tzinfo=timezone.utc)
    assert [d.name for d in st.devices] == ["tank", "/tmp/zx/v1"] and st.healthy

    bad = parse_pool_status(OPENZFS_STATUS_DEGRADED)
    assert (bad.state, bad.scan_state, bad.scan_percent, bad.last_scrub_end) == ("DEGRADED", "in_progress", 25.0, None)
    assert bad.data_errors == 1 and bad.error_files == ["/tank/data/file.bin"] and not bad.healthy
    assert bad.status.endswith("Applications may be affected.")
    sdb = bad.devices[-1]
    assert (sdb.name, sdb.state, sdb.read, sdb.write, sdb.cksum, sdb.depth) == ("sdb", "FAULTED", 3, 1200, 7, 2)

    assert parse_scan("none requested")[1] == "none"
    assert parse_scan("resilver in progress for 0h1m, 12.50% done, 0h7m to go")[:2] == ("resilver", "in_progress")
    assert parse_scan("scrub stopped after 0h0m with 0 errors on Sat Nov  7 01:02:03 2026")[1:3] == (
        "stopped", datetime(2026, 11, 7, 1, 2, 3, tzinfo=timezone.utc))
    assert parse_scan("scrub repaired 0B in 00:00:01 with 2 errors on Sun Jul 25 16:07:49 2021")[1:4] == (
        "completed", datetime(2021, 7, 25, 16, 7, 49, tzinfo=timezone.utc), 2)


def test_remote_argv_is_quoted_for_the_remote_shell():
    argv = ZfsCli(ssh="root@nas").argv("zfs", "set", "drtool:note=a b; rm -rf /", "tank/x")
    assert argv[:5] == ["ssh", "-o", "BatchMode=yes", "root@nas", "--"]
    assert " ".join(argv[5:]) == "env LC_ALL=C TZ=UTC zfs set 'drtool:note=a b; rm -rf /' tank/x"
    assert ZfsCli().argv("zfs", "list") == ["zfs", "list"]


# -- real zfs-fuse -----------------------------------------------------------

_names = itertools.count()


@pytest.fixture(scope="module")
def pools(zfs):
    return zfs.make_pool("drtsrc"), zfs.make_pool("drtdst")


@pytest.fixture
def cli():
    return ZfsCli()


@pytest.fixture
def ds(cli, pools, zfs):
    """A fresh dataset on the source pool: (name, mounted path)."""
    name = f"{pools[0]}/t{next(_names)}"
    cli.create_dataset(name)
    return name, zfs.mountpoint(pools[0]) / name.split("/", 1)[1]


def _digest(path) -> dict[str, str]:
    return {p: hashlib.sha256((path / p).read_bytes()).hexdigest() for p in sorted(os.listdir(path))}


def _read_snapshot(cli, zfs, snapshot: str, pool: str) -> dict[str, str]:
    """zfs-fuse cannot reach .zfs/snapshot: read a snapshot through a clone."""
    clone = f"{pool}/check{next(_names)}"
    cli.clone(snapshot, clone)
    try:
        return _digest(zfs.mountpoint(pool) / clone.split("/", 1)[1])
    finally:
        cli.destroy_dataset(clone)  # right after reading: zfs-fuse says "busy" briefly


def test_zfs_fuse_features(cli, pools):
    assert cli.features() == ZfsFeatures(snapshot_properties=True)


def test_snapshot_user_properties_round_trip(cli, ds, pools):
    name, path = ds
    cli.create_dataset(f"{name}/child")
    cli.set_property(name, "drtool:policy", "inherited-not-mine")  # on the dataset, not a snapshot
    props = {"drtool:policy": "db", "drtool:leg": "hourly"}
    assert cli.snapshot(name, "a", properties=props, recursive=True) == f"{name}@a"
    # a binary without `snapshot -o`: properties are set right after, on every child too
    ZfsCli(features=ZfsFeatures()).snapshot(name, "b", properties={"drtool:policy": "db"}, recursive=True)
    cli.snapshot(name, "foreign")

    snaps = cli.list_snapshots(name)
    assert [s.snap for s in snaps] == ["a", "b", "foreign"]
    assert snaps[0].properties == props
    assert snaps[1].properties == {"drtool:policy": "db"}
    assert snaps[2].properties == {}  # inherited user properties are not the snapshot's own
    deep = cli.list_snapshots(name, recursive=True)
    assert {s.name for s in deep} >= {f"{name}/child@a", f"{name}/child@b"}
    assert next(s for s in deep if s.name == f"{name}/child@b").properties == {"drtool:policy": "db"}
    assert cli.get_property(f"{name}@a", "drtool:leg") == "hourly"
    assert cli.get_property(f"{name}@foreign", "drtool:leg") is None
    with pytest.raises(ValueError):
        cli.snapshot(name, "c", properties={"nocolon": "x"})


def test_listing_has_guid_txg_creation_and_sizes(cli, ds):
    name, path = ds
    before = datetime.now(timezone.utc).replace(microsecond=0)
    cli.snapshot(name, "one")
    (path / "f").write_bytes(os.urandom(200_000))
    cli.snapshot(name, "two")
    one, two = cli.list_snapshots(name)
    assert one.name == f"{name}@one" and one.dataset == name and one.snap == "one"
    assert one.guid.isdigit() and one.guid != two.guid and one.createtxg < two.createtxg
    assert before - timedelta(seconds=2) <= one.creation <= datetime.now(timezone.utc) + timedelta(seconds=2)
    assert one.creation.tzinfo is timezone.utc
    assert two.referenced > one.referenced + 150_000 and one.userrefs == 0
    assert cli.dataset_exists(name) and not cli.dataset_exists(f"{name}/nope")
    with pytest.raises(ZfsNotFound):
        cli.list_snapshots(f"{name}/nope")


def test_hold_blocks_destroy_until_released(cli, ds):
    name, _ = ds
    snap = cli.snapshot(name, "held")
    assert cli.hold("drtool-repl", snap) is True
    assert cli.hold("drtool-repl", snap) is False  # idempotent
    assert cli.list_snapshots(name)[0].userrefs == 1
    with pytest.raises(ZfsError, match=r"it is held \(1 hold\(s\)\); release the hold first"):
        cli.destroy_snapshot(snap)
    with pytest.raises(ZfsUnsupported, match="cannot list holds"):
        cli.holds(snap)  # zfs-fuse's `zfs holds` needs a pyzfs.py it does not ship
    cli.release("drtool-repl", snap)
    with pytest.raises(ZfsError, match="no such tag"):
        cli.release("drtool-repl", snap)
    cli.release("drtool-repl", snap, missing_ok=True)
    cli.destroy_snapshot(snap)
    assert cli.list_snapshots(name) == []
    with pytest.raises(ValueError, match="not a snapshot"):
        cli.destroy_snapshot(name)


def test_full_then_incremental_replication_to_another_pool(cli, ds, pools, zfs):
    name, path = ds
    target = f"{pools[1]}/replica{next(_names)}"
    (path / "a.bin").write_bytes(os.urandom(3_000_000))
    s1 = cli.snapshot(name, "s1")
    seen: list[dict] = []
    full = cli.send_receive(s1, target, progress=seen.append)
    assert full.bytes > 3_000_000 and seen[-1]["bytes"] == full.bytes
    assert [c["argv"][:2] for c in full.commands] == [["zfs", "send"], ["zfs", "receive"]]
    cli.set_property(target, "readonly", "on")

    (path / "b.bin").write_bytes(os.urandom(1_000_000))
    (path / "a.bin").write_bytes(b"changed")
    s2 = cli.snapshot(name, "s2")
    inc = cli.send_receive(s2, target, base=s1)
    assert 1_000_000 < inc.bytes < full.bytes

    src, rep = cli.list_snapshots(name), cli.list_snapshots(target)
    assert [(s.snap, s.guid) for s in rep] == [(s.snap, s.guid) for s in src]
    # zfs-fuse reports a mounted dataset's readonly as "off" (source "temporary") even
    # while readonly=on is set and enforced: check what the mount does
    with pytest.raises(OSError) as rofs:
        (zfs.mountpoint(pools[1]) / target.split("/", 1)[1] / "x").write_bytes(b"x")
    assert rofs.value.errno == errno.EROFS
    assert _read_snapshot(cli, zfs, f"{target}@s2", pools[1]) == _digest(path)
    assert _read_snapshot(cli, zfs, f"{target}@s1", pools[1]) == _read_snapshot(cli, zfs, s1, pools[0])

    with pytest.raises(ZfsDiverged, match="a full stream cannot go into an existing dataset"):
        cli.send_receive(s2, target)

    cli.snapshot(name, "s3")
    (path / "c.bin").write_bytes(b"c")
    s4 = cli.snapshot(name, "s4")
    cli.send_receive(s4, target, base=s2, incremental_all=True)  # -I: s3 comes along
    assert [s.snap for s in cli.list_snapshots(target)] == ["s1", "s2", "s3", "s4"]


def test_incremental_into_a_changed_target_is_a_clear_error(cli, ds, pools, zfs):
    name, path = ds
    target = f"{pools[1]}/diverged{next(_names)}"
    (path / "a").write_bytes(b"1")
    s1 = cli.snapshot(name, "s1")
    cli.send_receive(s1, target)  # no readonly=on: the replica can change under us
    (zfs.mountpoint(pools[1]) / target.split("/", 1)[1] / "local-edit").write_bytes(b"x")
    (path / "a").write_bytes(b"2")
    s2 = cli.snapshot(name, "s2")
    with pytest.raises(ZfsDiverged) as err:
        cli.send_receive(s2, target, base=s1)
    msg = str(err.value)
    assert "changed since its latest snapshot" in msg and "readonly=on" in msg and "DESTROY" in msg
    assert "has been modified" in err.value.stderr
    assert [s.snap for s in cli.list_snapshots(target)] == ["s1"]  # nothing destroyed

    cli.send_receive(s2, target, base=s1, force=True)  # -F discards the local edit
    assert _read_snapshot(cli, zfs, f"{target}@s2", pools[1]) == _digest(path)


def test_incremental_needs_an_existing_target(cli, ds, pools):
    """zfs-fuse would put an incremental stream for a missing target into ANY dataset
    that holds the base snapshot (lookup by guid); drtool refuses before sending."""
    name, _ = ds
    s1, other = cli.snapshot(name, "s1"), f"{pools[1]}/other{next(_names)}"
    cli.send_receive(s1, other)
    s2 = cli.snapshot(name, "s2")
    with pytest.raises(ZfsNotFound, match="does not exist; send a full stream first"):
        cli.send_receive(s2, f"{pools[1]}/missing{next(_names)}", base=s1)
    assert [s.snap for s in cli.list_snapshots(other)] == ["s1"]


def test_either_side_failing_raises_its_error_and_stops_the_other(cli, ds, pools):
    name, path = ds
    (path / "big").write_bytes(os.urandom(8_000_000))  # more than a pipe buffer: send would block
    snap = cli.snapshot(name, "s")
    t0 = time.monotonic()
    with pytest.raises(ZfsNotFound, match=r"zfs receive into .*/no/such/parent failed: .*does not exist"):
        cli.send_receive(snap, f"{pools[1]}/no/such/parent")
    with pytest.raises(ZfsError, match=r"zfs send .*@missing failed: .*does not exist"):
        cli.send_receive(f"{name}@missing", f"{pools[1]}/never{next(_names)}")
    with pytest.raises(ZfsError, match=r"zfs send .* failed: .*incremental source .*does not exist"):
        cli.send_receive(snap, pools[1], base=f"{name}@missing")
    # no send is left blocked on a pipe nobody reads (that would keep the snapshot busy)
    cli.destroy_dataset(name, recursive=True)
    assert time.monotonic() - t0 < 15


def test_rollback_is_guarded(cli, ds):
    name, path = ds
    (path / "f").write_bytes(b"old")
    s1 = cli.snapshot(name, "s1")
    (path / "f").write_bytes(b"new")
    cli.snapshot(name, "s2")
    with pytest.raises(ZfsError, match=r"more recent snapshots exist.*destroy_newer=True"):
        cli.rollback(s1)
    assert (path / "f").read_bytes() == b"new"
    cli.rollback(s1, destroy_newer=True)
    assert (path / "f").read_bytes() == b"old"
    assert [s.snap for s in cli.list_snapshots(name)] == ["s1"]


def test_pool_status_healthy_then_scrubbed(cli, pools):
    pool = pools[0]
    st = cli.pool_status(pool)
    assert st.pool == pool and st.state == "ONLINE" and st.healthy and st.data_errors == 0
    assert st.devices[0].name == pool and st.devices[1].name.endswith(".img")
    started = datetime.now(timezone.utc).replace(microsecond=0)
    cli.scrub(pool)
    deadline = time.monotonic() + 20
    while (st := cli.pool_status(pool)).scan_state != "completed" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (st.scan_function, st.scan_state, st.scan_errors) == ("scrub", "completed", 0)
    assert started - timedelta(seconds=2) <= st.last_scrub_end <= datetime.now(timezone.utc) + timedelta(seconds=2)
    with pytest.raises(ZfsNotFound, match="no such pool"):
        cli.pool_status(f"{pool}-absent")


def test_unmount_is_idempotent_and_waits_out_a_brief_busy(cli, ds, zfs):
    import threading
    name, path = ds
    (path / "f").write_bytes(b"x")
    handle = open(path / "f", "rb")  # an open file keeps the mount busy
    closer = threading.Timer(1.0, handle.close)
    closer.start()
    try:
        cli.unmount(name)  # retries while busy, succeeds once the file is closed
    finally:
        closer.join()
    attempts = [c for c in cli.commands if c["argv"][1:2] == ["unmount"]]
    assert len(attempts) >= 2 and attempts[-1]["returncode"] == 0  # the first ones met "busy"
    assert not os.path.ismount(path)
    cli.unmount(name)  # already unmounted: a no-op, not an error
    cli._zfs("mount", name)
    assert (path / "f").read_bytes() == b"x"


def test_features_are_probed_once_then_cached(tmp_path, zfs):
    cache = tmp_path / "zfs-features.json"
    first = ZfsCli(features_cache=cache)
    assert first.features() == ZfsFeatures(snapshot_properties=True) and len(first.commands) == 2
    second = ZfsCli(features_cache=cache)
    assert second.features() == first.features() and len(second.commands) == 0  # no zfs call
    cache.write_text("not json")  # a damaged cache is ignored and rewritten
    third = ZfsCli(features_cache=cache)
    assert third.features() == first.features() and len(third.commands) == 2
