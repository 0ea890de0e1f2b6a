#!/usr/bin/env python3
"""Benchmark: `drtool run` of one SnapRAID parity leg against bare
`snapraid diff && snapraid sync`, on the same array, in the same run.

A real array from tests/services/snapraid_array.py (3 data disks of --disk-mb, one
parity disk, a mergerfs pool over the data disks; needs root, snapraid, mergerfs),
the disks per --backing: "loop" (the default) makes each an ext4 filesystem on a
loop device over a sparse image file under /var/tmp, i.e. on the machine's real
disk, "tmpfs" a tmpfs in RAM. The array gets an initial fill (--initial-mb) that
drtool syncs in one untimed warm-up run (its first run also walks the disks once to
record file modes). Then every round makes two change sets through the pool, one
per side, each of the same shape: --mb of NEW random files (the same list of file
sizes every time, several hundred files), the set made two change sets earlier
deleted (so the array stays at a steady size whatever the number of rounds), and a
few initial files deleted (--delete) and rewritten with 1 MiB of new data
(--modify). So each side syncs the same amount of work:
  (a) bare:   snapraid -c CONF diff (exit 0 or 2), then snapraid -c CONF sync (exit 0)
  (b) drtool: drtool -c POLICY run --no-verify --json (the whole CLI process: start-up,
      catalog, disk check, diff with its log, sync, file-mode table), scrub_percent 0
Round k: change set A, time the first side; change set B, time the other side. The
order alternates per round (an even number of rounds). Each timed side is preceded
by sync + a pause and, with --cold (the default for loop disks), by dropping the
page cache (echo 3 > /proc/sys/vm/drop_caches), so that both sides start as a
nightly run does, reading metadata and data from the disks (drtool its Python code,
too); each is followed by an untimed `snapraid diff` that must find nothing left to
sync. Reported: per-round times, the ratio drtool/bare (median and the
order-balanced geometric mean; target <= 1.05), drtool's fixed cost (drtool - bare,
and drtool outside its own snapraid commands, from its run record), the snapraid
commands alone, and drtool's own peak RSS (VmHWM of the drtool Python process polled
from /proc; snapraid is not in it).

    .venv/bin/python bench/parity_overhead.py [--backing loop|tmpfs] [--cold|--no-cold]
        [--rounds 6] [--mb N] [--initial-mb N] [--disk-mb N]

Size defaults by backing: loop --mb 3500 --initial-mb 1000 --disk-mb 4500 (4 sparse
images of 4500 MB, refused if that is over 40% of the free space in /var/tmp; a bare
diff+sync of a change set takes well over 10 s from a cold cache on a virtio disk), tmpfs
--mb 150 --initial-mb 200 --disk-mb 400. On tmpfs everything sits in RAM, so snapraid
hashes and computes parity at memory speed (about 2.5 s for 150 MB), and a fixed cost
per drtool run weighs on the ratio accordingly; loop disks with a cold cache are the
realistic case.
"""
from __future__ import annotations

import argparse
import json
import os
import random
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

from services.snapraid_array import SnapraidArray, SnapraidUnavailable  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from backup_overhead import timed_process  # noqa: E402  (one timed, RSS-polled runner for every benchmark)

MODIFY_BYTES = 1 << 20  # a modified initial file is rewritten with this much new data
CHUNK = 4 << 20
VAR_TMP = Path("/var/tmp")
SIZES = {"loop": {"mb": 3500, "initial_mb": 1000, "disk_mb": 4500},  # per --backing, unless given
         "tmpfs": {"mb": 150, "initial_mb": 200, "disk_mb": 400}}
MAX_IMAGES_SHARE = 0.4  # the loop images (sparse, 4 x --disk-mb at most) vs free space in /var/tmp


def drop_caches() -> None:
    """Drop the page cache, dentries and inodes (dirty pages are written by the os.sync() before)."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def file_sizes(total_mb: int, seed: int) -> list[int]:
    """Sizes of one change set: many small files, most medium, a few large (~0.5 MB mean)."""
    rng = random.Random(seed)
    target, total, sizes = total_mb << 20, 0, []
    while total < target:
        r = rng.random()
        size = rng.randint(4_000, 64_000) if r < 0.5 else rng.randint(100_000, 1_000_000) if r < 0.95 else rng.randint(2_000_000, 8_000_000)
        size = min(size, target - total)
        sizes.append(size)
        total += size
    return sizes


def write_file(path: Path, size: int) -> None:
    """``size`` bytes of fresh random (incompressible, never duplicated) data at ``path`` (through the pool)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        done = 0
        while done < size:
            done += f.write(os.urandom(min(CHUNK, size - done)))


class Workload:
    """The initial fill and the change sets, all written through the mergerfs pool."""

    def __init__(self, pool: Path, args: argparse.Namespace) -> None:
        self.pool, self.args = pool, args
        self.sizes = file_sizes(args.mb, seed=11)  # every change set: the same file sizes
        self.rng = random.Random(5)
        self.base: list[Path] = []  # initial files still there (candidates to delete/modify)
        self.made = 0

    def initial(self) -> int:
        for n, size in enumerate(file_sizes(self.args.initial_mb, seed=7)):
            p = self.pool / "base" / f"dir{n % 13:02d}" / f"file{n:05d}.bin"
            write_file(p, size)
            self.base.append(p)
        return len(self.base)

    def change_set(self) -> dict[str, int]:
        """One change set: the set of two change sets ago deleted, --mb of new files, a few
        initial files deleted and a few rewritten. The same shape every time from the 3rd on
        (the first two have no old set to delete: they form round 1, so rounds stay even)."""
        self.made += 1
        removed = 0
        old = self.pool / f"cs{self.made - 2:03d}"
        if self.made > 2:
            removed = sum(1 for p in old.rglob("*") if p.is_file())
            shutil.rmtree(old)
        picked = self.rng.sample(self.base, self.args.delete + self.args.modify)
        for p in picked[:self.args.delete]:
            p.unlink()
            self.base.remove(p)
        for p in picked[self.args.delete:]:
            write_file(p, MODIFY_BYTES)
        new = self.pool / f"cs{self.made:03d}"
        for n, size in enumerate(self.sizes):
            write_file(new / f"dir{n % 8}" / f"f{n:04d}.bin", size)
        return {"added": len(self.sizes), "removed": removed + self.args.delete, "updated": self.args.modify}


def bare(conf: Path) -> float:
    """Wall seconds of `snapraid -c CONF diff` (0 or 2) then `snapraid -c CONF sync` (0)."""
    t0 = time.perf_counter()
    diff = subprocess.run(["snapraid", "-c", str(conf), "diff"], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if diff.returncode not in (0, 2):
        raise SystemExit(f"bare snapraid diff exited {diff.returncode}: {(diff.stderr or diff.stdout)[-2000:]}")
    sync = subprocess.run(["snapraid", "-c", str(conf), "sync"], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if sync.returncode != 0:
        raise SystemExit(f"bare snapraid sync exited {sync.returncode}: {(sync.stderr or sync.stdout)[-2000:]}")
    return elapsed


def assert_synced(conf: Path, after: str) -> None:
    """Untimed: `snapraid diff` finds nothing left to sync (exit 0)."""
    res = subprocess.run(["snapraid", "-c", str(conf), "diff"], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"after {after}, snapraid diff exited {res.returncode} (0 = nothing to sync):\n{res.stdout[-2000:]}{res.stderr[-1000:]}")


class Drtool:
    def __init__(self, config: Path, state: Path) -> None:
        exe = Path(sys.executable).parent / "drtool"
        if not exe.exists():
            exe = ROOT / ".venv" / "bin" / "drtool"
        self.argv = [str(exe), "-c", str(config)]
        self.env = dict(os.environ, DRTOOL_STATE_DIR=str(state))

    def run(self) -> tuple[float, int, dict]:
        """(wall seconds, peak RSS kB, the leg's result) of `drtool run --no-verify --json`."""
        elapsed, rss_kb, out = timed_process([*self.argv, "run", "--no-verify", "--json"], self.env)
        result = json.loads(out)["results"][0]
        assert result["phase"] == "succeeded", result
        return elapsed, rss_kb, result

    def last_commands(self) -> dict[str, float]:
        """Seconds per snapraid command (diff, sync, …) of the last run, from its run record:
        the rest of drtool's wall time is its own cost."""
        out = subprocess.run([*self.argv, "runs", "--json", "--limit", "1"], env=self.env, stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, check=True).stdout
        times: dict[str, float] = {}
        for c in json.loads(out)["runs"][0]["command_log"] or []:
            verb = next((a for a in c["argv"][1:] if a in ("diff", "sync", "status", "scrub")), c["argv"][-1])
            times[verb] = times.get(verb, 0.0) + c["duration_s"]
        return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backing", choices=("loop", "tmpfs"), default="loop",
                    help="the disks: ext4 on loop devices over images in /var/tmp (default), or tmpfs")
    ap.add_argument("--cold", action=argparse.BooleanOptionalAction, default=None,
                    help="drop the page cache before each timed side (default: on for loop, off for tmpfs)")
    ap.add_argument("--mb", type=int, help="new data per change set, i.e. per side per round (default 3500 loop, 150 tmpfs)")
    ap.add_argument("--rounds", type=int, default=6, help="rounded up to an even number: each side goes first equally often")
    ap.add_argument("--disk-mb", type=int, help="size of each disk, 3 data + 1 parity (default 4500 loop, 400 tmpfs)")
    ap.add_argument("--initial-mb", type=int, help="initial fill, synced untimed (default 1000 loop, 200 tmpfs)")
    ap.add_argument("--delete", type=int, default=5, help="initial files deleted per change set (default 5)")
    ap.add_argument("--modify", type=int, default=5, help="initial files rewritten per change set (default 5)")
    ap.add_argument("--pause", type=float, default=2.0, help="seconds of idle (after sync) before each timed side")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (policy, drtool state and run records); "
                    "the array itself is always torn down")
    args = ap.parse_args()
    args.rounds += args.rounds % 2
    for k, v in SIZES[args.backing].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.cold is None:
        args.cold = args.backing == "loop"

    # steady state: the initial fill plus two live change sets; keep it well inside the
    # data disks, and the fullest disk (which the parity mirrors in size) inside the parity disk
    live_mb = args.initial_mb + 2 * args.mb + (args.modify * MODIFY_BYTES >> 20)
    if live_mb > 0.7 * 3 * args.disk_mb:
        raise SystemExit(f"--disk-mb {args.disk_mb} is too small for {live_mb} MB of live data on 3 disks: "
                         f"use --disk-mb {int(live_mb / 3 / 0.7) + 1} or more")
    if args.backing == "loop":
        free_mb = shutil.disk_usage(VAR_TMP).free >> 20
        if 4 * args.disk_mb > MAX_IMAGES_SHARE * free_mb:
            raise SystemExit(f"4 disk images of {args.disk_mb} MB are over {MAX_IMAGES_SHARE:.0%} of the {free_mb} MB "
                             f"free in {VAR_TMP}: use a smaller --disk-mb (and --mb, --initial-mb)")
    if args.cold:
        try:
            drop_caches()
        except OSError as e:
            raise SystemExit(f"--cold needs to write /proc/sys/vm/drop_caches: {e}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill, too
    work = Path(tempfile.mkdtemp(prefix="drtool-pbench-", dir=VAR_TMP))
    try:
        array = SnapraidArray(disks=3, disk_mb=args.disk_mb, backing=args.backing,
                              **({"tmp_dir": VAR_TMP} if args.backing == "loop" else {}))
    except SnapraidUnavailable as e:
        shutil.rmtree(work, ignore_errors=True)
        raise SystemExit(f"a SnapRAID array cannot be built here: {e}")
    try:
        array.start()
        run(args, array, work)
    finally:
        array.stop()
        if args.keep:
            print(f"kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, array: SnapraidArray, work: Path) -> None:
    config = work / "bench.yaml"
    config.write_text(
        "version: 1\nlocations:\n"
        f"  array: {{type: snapraid, media: hdd, site: home, failure_domain: nas01, config: {array.conf}, pool: {array.pool}}}\n"
        "policies:\n"
        f"  - name: bench\n    source: {{location: array, path: {array.pool}}}\n    rpo: 1d\n    rto: 1d\n    legs:\n"
        "      - kind: parity\n        schedule: \"0 4 * * *\"\n"
        "        parity: {max_removed: null, max_removed_percent: null, max_updated: null, max_updated_percent: null, scrub_percent: 0}\n")
    drtool = Drtool(config, work / "state")
    load = Workload(array.pool, args)

    sver = subprocess.run(["snapraid", "--version"], capture_output=True, text=True).stdout.strip().split(" by ")[0]
    n = load.initial()
    need = args.rounds * 2 * (args.delete + args.modify)
    if n < need:
        raise SystemExit(f"the initial fill has {n} files, fewer than the {need} the rounds delete/modify: raise --initial-mb")
    disks = "tmpfs in RAM" if args.backing == "tmpfs" else f"ext4 on a loop device, images in {array.root}/img"
    print(f"{sver}; {os.cpu_count()} cores; 3 data disks + parity, {args.disk_mb} MB each; backing {args.backing} ({disks}); "
          f"cold cache {'on (drop_caches' if args.cold else 'off (no drop_caches'} before each timed side); initial fill {n} files, "
          f"{args.initial_mb} MB; {args.rounds} rounds; change set per side: {len(load.sizes)} new files, {args.mb} MB, "
          f"the set before last deleted, {args.delete} deleted + {args.modify} rewritten", flush=True)

    # untimed: drtool's first run syncs the initial fill and records the file modes
    t_warm, _, res = drtool.run()
    assert_synced(array.conf, "the warm-up")
    print(f"warm-up: drtool {t_warm:.2f}s: {res['message']}", flush=True)

    def settle() -> None:
        os.sync()
        time.sleep(args.pause)
        if args.cold:
            drop_caches()

    def timed(side: str, i: int) -> dict:
        shape = load.change_set()
        settle()
        if side == "bare":
            out = {"bare_s": bare(array.conf)}
        else:
            t, rss, res = drtool.run()
            cmds = drtool.last_commands()
            out = {"drtool_s": t, "rss_kb": rss, "snapraid_s": sum(cmds.values()), "cmds": cmds, "message": res["message"]}
        assert_synced(array.conf, f"{side} in round {i + 1}")
        out[f"{side}_shape"] = shape
        return out

    rows = []
    for i in range(args.rounds):
        order = ("bare", "drtool") if i % 2 == 0 else ("drtool", "bare")
        row = {"first": order[0]}
        for side in order:
            row.update(timed(side, i))
        assert row["bare_shape"] == row["drtool_shape"], f"unequal change sets in round {i + 1}: {row}"
        rows.append(row)
        ratio = row["drtool_s"] / row["bare_s"]
        cmds = " ".join(f"{k} {v:.2f}s" for k, v in row["cmds"].items())
        print(f"round {i + 1} ({row['first']} first): bare {row['bare_s']:6.2f}s | drtool {row['drtool_s']:6.2f}s "
              f"(its snapraid: {cmds}) | ratio {ratio:.3f} | drtool peak RSS {row['rss_kb'] / 1024:.1f} MB | {row['message']}",
              flush=True)

    ratios = [r["drtool_s"] / r["bare_s"] for r in rows]
    print(f"\nratio drtool/bare: geometric mean {statistics.geometric_mean(ratios):.3f} (order-balanced; target <= 1.05), "
          f"median {statistics.median(ratios):.3f}, min {min(ratios):.3f}, max {max(ratios):.3f}")
    print(f"  median when bare ran first {statistics.median(ratios[0::2]):.3f}, when drtool ran first {statistics.median(ratios[1::2]):.3f}")
    print(f"  fixed cost: median drtool - bare = {statistics.median(r['drtool_s'] - r['bare_s'] for r in rows):.2f}s per run; "
          f"drtool outside its snapraid commands median {statistics.median(r['drtool_s'] - r['snapraid_s'] for r in rows):.2f}s")
    cmd_ratios = [r["snapraid_s"] / r["bare_s"] for r in rows]
    print(f"  snapraid alone (drtool's diff+sync commands vs bare's): ratio median {statistics.median(cmd_ratios):.3f}, "
          f"geometric mean {statistics.geometric_mean(cmd_ratios):.3f}")
    print(f"bare median {statistics.median(r['bare_s'] for r in rows):.2f}s, drtool median {statistics.median(r['drtool_s'] for r in rows):.2f}s")
    rss = [r["rss_kb"] for r in rows]
    print(f"drtool peak RSS: median {statistics.median(rss) / 1024:.1f} MB, max {max(rss) / 1024:.1f} MB")


if __name__ == "__main__":
    main()
