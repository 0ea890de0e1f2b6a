#!/usr/bin/env python3
"""Benchmark: incremental ZFS replication by `drtool run` against a bare
`zfs send -i A B | zfs receive` shell pipeline, on real zfs-fuse.

One source pool and two target pools on sparse file vdevs (a zfs-fuse daemon is
started if none answers; tests/services/zfs.py does that and the cleanup). The
source dataset gets ~50 MB, a drtool snapshot, and one untimed full replication
into each target (drtool's replicate leg into one, a bare `zfs send | zfs receive`
into the other). Then each round writes --size-mb of NEW random (incompressible)
data, takes the next snapshot with drtool's snapshot leg (untimed), and times
  (a) bare:   sh -c 'zfs send -i PREV NEW | zfs receive TARGET_BARE/ds'
  (b) drtool: drtool run --leg replicate-<target> (the whole CLI process: start-up,
      catalog, listing, send|receive, holds, tagging)
so both receive the same delta from the same source. The order alternates per
round; each timed side is preceded by sync + a pause. Reported: per-round times
and throughput (stream bytes / wall time), the median and geometric mean of the
throughput ratio drtool/bare (target >= 0.95), the same ratio for the stream alone
(drtool's `zfs receive` duration from its run record: what is left is drtool's
fixed cost per run), and drtool's own peak RSS (VmHWM of the drtool Python
process polled from /proc; zfs and its pipe are not in it).

    .venv/bin/python bench/zfs_replication.py [--size-mb 500] [--rounds 4]

Writing the data through zfs-fuse's FUSE mount (~35 MB/s) is most of the wall time:
the default (4 rounds of 500 MB) takes ~2 min on our machines, where send|receive
itself runs at ~140 MB/s (the file vdevs sit in the page cache), so drtool's fixed
cost per run (start-up, catalog, ~17 zfs commands) weighs on the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from services.zfs import ZfsFuse, ZfsUnavailable  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from backup_overhead import timed_process  # noqa: E402  (one timed, RSS-polled runner for every benchmark)

INITIAL_MB = 50
FILE_MB = 50  # the round's data goes into files of this size
CHUNK = 4 << 20


def sh(*argv: str) -> str:
    res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")
    return res.stdout


def write_random(directory: Path, tag: str, size_mb: int) -> None:
    """size_mb of fresh random data (incompressible, never deduplicable) in new files."""
    directory.mkdir(parents=True, exist_ok=True)
    left, n = size_mb << 20, 0
    while left > 0:
        size = min(FILE_MB << 20, left)
        with open(directory / f"{tag}-{n:03d}.bin", "wb") as f:
            done = 0
            while done < size:
                done += f.write(os.urandom(min(CHUNK, size - done)))
        left -= size
        n += 1
    os.sync()


class Drtool:
    def __init__(self, config: Path, state: Path) -> None:
        self.argv = [str(Path(sys.executable).parent / "drtool"), "-c", str(config)]
        self.env = dict(os.environ, DRTOOL_STATE_DIR=str(state))

    def run_leg(self, leg: str) -> tuple[float, int, dict]:
        """(wall seconds, peak RSS kB, the leg's result) of `drtool run --leg LEG`."""
        elapsed, rss_kb, out = timed_process([*self.argv, "run", "--leg", leg, "--no-verify", "--json"], self.env)
        result = json.loads(out)["results"][0]
        assert result["phase"] == "succeeded", result
        return elapsed, rss_kb, result

    def last_stream_s(self) -> float:
        """How long the send|receive itself took in the last run (its `zfs receive`
        command's duration in the run record): the rest of drtool's time is fixed cost."""
        out = subprocess.run([*self.argv, "runs", "--json", "--limit", "1"], env=self.env, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, check=True).stdout
        log = json.loads(out)["runs"][0]["command_log"]
        return max(c["duration_s"] for c in log if "receive" in c["argv"])


def bare(source_prev: str | None, source_new: str, target: str) -> float:
    """Wall seconds of the shell pipeline `zfs send [-i PREV] NEW | zfs receive TARGET`."""
    inc = f"-i {source_prev} " if source_prev else ""
    t0 = time.perf_counter()
    res = subprocess.run(["sh", "-c", f"zfs send {inc}{source_new} | zfs receive {target}"],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"bare zfs send|receive into {target} failed ({res.returncode}): {res.stderr.strip()}")
    return elapsed


def newest_snapshot(dataset: str) -> str:
    out = sh("zfs", "get", "-H", "-p", "-d", "1", "-o", "name,value", "createtxg", dataset)
    snaps = [(int(v), n) for n, v in (ln.split("\t") for ln in out.splitlines()) if "@" in n]
    return max(snaps)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=500, help="new data per round (default 500)")
    ap.add_argument("--rounds", type=int, default=4, help="rounded up to an even number: each side goes first equally often")
    ap.add_argument("--pause", type=float, default=2.0, help="seconds of idle (after sync) before each timed side")
    args = ap.parse_args()
    args.rounds += args.rounds % 2

    data_mb = INITIAL_MB + args.rounds * args.size_mb
    pool_mb = int(data_mb * 1.3) + 256  # sparse: only what is written takes disk space
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill, too
    work = Path(tempfile.mkdtemp(prefix="drtool-zbench-", dir="/var/tmp"))
    try:
        helper = ZfsFuse()
    except ZfsUnavailable as e:
        shutil.rmtree(work, ignore_errors=True)
        raise SystemExit(f"zfs-fuse is not usable here: {e}")
    helper.start()
    try:
        run(args, helper, work, pool_mb)
    finally:
        helper.stop()  # destroys the pools it made; stops the daemon if it started it
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, helper: ZfsFuse, work: Path, pool_mb: int) -> None:
    src_pool = helper.make_pool("zbsrc", size_mb=pool_mb)
    bare_pool = helper.make_pool("zbbare", size_mb=pool_mb)
    drt_pool = helper.make_pool("zbdrt", size_mb=pool_mb)
    for pool in (src_pool, bare_pool, drt_pool):
        sh("zfs", "set", "atime=off", pool)
    ds = f"{src_pool}/data"
    sh("zfs", "create", ds)
    data_dir = helper.mountpoint(src_pool) / "data"
    bare_ds = f"{bare_pool}/data"

    config = work / "bench.yaml"
    config.write_text(
        "version: 1\nlocations:\n"
        f"  src: {{type: zfs, dataset: {src_pool}, media: ssd, site: home, failure_domain: a}}\n"
        f"  replica: {{type: zfs, dataset: {drt_pool}, media: hdd, site: home, failure_domain: b}}\n"
        "policies:\n"
        f"  - name: zbench\n    source: {{location: src, dataset: {ds}}}\n    rpo: 1d\n    rto: 1h\n    legs:\n"
        "      - {kind: snapshot, schedule: '@daily'}\n"
        "      - {kind: replicate, to: replica, schedule: '@daily'}\n")
    drtool = Drtool(config, work / "state")
    leg = "replicate-replica"

    zver = "zfs-fuse " + (sh("dpkg-query", "-W", "-f=${Version}", "zfs-fuse").strip() or "?")
    print(f"{zver}; {os.cpu_count()} cores; pools {pool_mb} MB sparse each; {args.rounds} rounds of {args.size_mb} MB new data; "
          f"daemon {'started here' if helper.started_daemon else 'already running (shared)'}", flush=True)

    # untimed: initial data, first snapshot, full replication on both sides
    write_random(data_dir, "initial", INITIAL_MB)
    drtool.run_leg("snapshot")
    prev = newest_snapshot(ds)
    bare(None, prev, bare_ds)
    sh("zfs", "set", "readonly=on", bare_ds)  # like drtool's replica: an incremental needs an unchanged target
    drtool.run_leg(leg)
    print(f"setup: {INITIAL_MB} MB, full replication done on both sides", flush=True)

    def settle() -> None:
        os.sync()
        time.sleep(args.pause)

    rows = []
    for i in range(args.rounds):
        write_random(data_dir, f"round{i + 1}", args.size_mb)
        time.sleep(1.1)  # drtool's snapshot names have one-second resolution
        drtool.run_leg("snapshot")
        new = newest_snapshot(ds)
        assert new != prev
        if i % 2 == 0:
            settle()
            t_bare = bare(prev, new, bare_ds)
            settle()
            t_drt, rss, res = drtool.run_leg(leg)
        else:
            settle()
            t_drt, rss, res = drtool.run_leg(leg)
            settle()
            t_bare = bare(prev, new, bare_ds)
        assert "incremental" in res["message"], res
        t_stream = drtool.last_stream_s()
        stream = res["bytes_processed"]  # the same -i/-I stream (one snapshot apart) on both sides
        guids = {sh("zfs", "get", "-H", "-o", "value", "guid", f"{d}@{new.split('@')[1]}").strip() for d in (ds, bare_ds, f"{drt_pool}/data")}
        assert len(guids) == 1, f"replicas differ from the source: {guids}"
        mb = stream / 1e6
        rows.append({"bare_s": t_bare, "drtool_s": t_drt, "stream_s": t_stream, "mb": mb, "rss_kb": rss,
                     "first": "bare" if i % 2 == 0 else "drtool"})
        print(f"round {i + 1} ({rows[-1]['first']} first): stream {mb:6.1f} MB | bare {t_bare:6.2f}s {mb / t_bare:6.1f} MB/s | "
              f"drtool {t_drt:6.2f}s {mb / t_drt:6.1f} MB/s (its send|receive {t_stream:5.2f}s {mb / t_stream:6.1f} MB/s) | "
              f"ratio {t_bare / t_drt:.3f} | drtool peak RSS {rss / 1024:.1f} MB", flush=True)
        prev = new

    ratios = [r["bare_s"] / r["drtool_s"] for r in rows]  # throughput drtool / bare
    print(f"\nthroughput ratio drtool/bare: median {statistics.median(ratios):.3f}, geometric mean "
          f"{statistics.geometric_mean(ratios):.3f} (target >= 0.95), min {min(ratios):.3f}, max {max(ratios):.3f}")
    print(f"  median when bare ran first {statistics.median(ratios[0::2]):.3f}, when drtool ran first {statistics.median(ratios[1::2]):.3f}")
    print(f"  overhead: median drtool - bare = {statistics.median(r['drtool_s'] - r['bare_s'] for r in rows):.2f}s per run; "
          f"fixed cost outside the stream (drtool - its send|receive) median "
          f"{statistics.median(r['drtool_s'] - r['stream_s'] for r in rows):.2f}s")
    stream_ratios = [r["bare_s"] / r["stream_s"] for r in rows]
    print(f"  the stream alone (drtool's send|receive vs the shell pipeline): ratio median {statistics.median(stream_ratios):.3f}, "
          f"geometric mean {statistics.geometric_mean(stream_ratios):.3f}")
    print(f"throughput: bare median {statistics.median(r['mb'] / r['bare_s'] for r in rows):.1f} MB/s, "
          f"drtool median {statistics.median(r['mb'] / r['drtool_s'] for r in rows):.1f} MB/s")
    rss = [r["rss_kb"] for r in rows]
    print(f"drtool peak RSS: median {statistics.median(rss) / 1024:.1f} MB, max {max(rss) / 1024:.1f} MB")


if __name__ == "__main__":
    main()
