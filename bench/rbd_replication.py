#!/usr/bin/env python3
"""Benchmark: incremental RBD replication by `drtool run` against a bare
`rbd export-diff --from-snap A SRC@B - | rbd import-diff - DST` pipeline, on a real
single-node Ceph (tests/services/ceph.py: mon, mgr, one memstore OSD, started here as
local processes and stopped at the end).

Each round: a --size-mb image (default 256 MiB) of random content in a source pool,
named in a policy with two ceph-rbd locations (the source pool and a replica pool), a
snapshot leg and a replicate leg; untimed set-up: drtool's snapshot leg, drtool's full
replication into <replica pool>/<image>, and a bare full `export-diff | import-diff` of
the same snapshot into <replica pool>/<image>-bare (the baseline's replica, in step
with drtool's). Then --changed (default 10 %) of the image's 4 KiB blocks, chosen at
random, are rewritten (`rbd import-diff` of a generated diff stream: no kernel map),
drtool's snapshot leg takes the next snapshot (untimed), and the round times
  (a) bare:   the two rbd processes, export-diff's stdout piped straight into
              import-diff's stdin (--from-snap PREV SRC@NEW into the -bare replica)
  (b) drtool: drtool run --policy P --leg replicate-replica --no-verify --json (the
              whole CLI process: interpreter start-up, config, catalog, the checks,
              the export-diff|import-diff stream, the run record)
so both sides apply the same diff (same source, same snapshot pair) to equal replicas;
afterwards the new snapshot must hash the same on all three images.

The images are new each round, in two new pools (the previous round's are deleted):
on this memstore OSD one image chain slows down round by round (the same 10 % diff of
256 MiB took 1.4 s to import-diff in round 1 and 12.5 s in round 8, the OSD's CPU per
import growing from 1.1 s to 12.4 s; the source writes slowed alike, with or without
removing old snapshots), which would make every round a different measurement.
--reuse-image runs the one-chain variant (one full replication, then one incremental
per round).

The order alternates per round; each timed side follows a pause. Reported per round
and as medians: wall times and throughput (diff bytes / wall time), the throughput
ratio drtool/bare (= bare time / drtool time; target >= 0.95), and where drtool's time
goes: outside the leg (wall - the leg's duration_s from the JSON: start-up, config,
catalog, JSON), the checks before the stream (its rbd commands other than the two
stream processes, from the run record's command log), and the stream itself; plus
drtool's peak RSS (VmHWM of the drtool Python process polled from /proc; the rbd
children are not in it). Last, the CLI's start-up floor (`drtool --version`, `policy
validate`, `runs`: less and less of a run) next to one bare `rbd snap ls`.

    .venv/bin/python bench/rbd_replication.py [--size-mb 256] [--changed 0.10] [--rounds 5] [--reuse-image]

Needs root and the apt ceph-* packages (what the Ceph tests need); memstore keeps the
data in RAM (the OSD's cap is --memstore-mb, sized from the image by default).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import rbd_diff_stream  # noqa: E402
from services.ceph import CephCluster, CephUnavailable  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from backup_overhead import timed_process  # noqa: E402  (one timed, RSS-polled runner for every benchmark)

MiB = 1 << 20
BLOCK = 4096
POLICY = "rbdbench"
LEG = "replicate-replica"
STREAM_CMDS = ("export-diff", "import-diff")


@contextlib.contextmanager
def reaped(*procs: subprocess.Popen):
    """Kill and reap the processes if the body raises (SIGTERM, a failed write): an rbd
    left behind would outlive the cluster it talks to."""
    try:
        yield procs
    except BaseException:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        raise


def stop_children(exclude: set[int], grace: float = 5.0) -> None:
    """SIGTERM this process's own children still running (a timed drtool stops its rbd
    children and records the run as interrupted), SIGKILL after ``grace``; the Ceph
    daemons (``exclude``) are the cluster's to stop."""
    me, pids = str(os.getpid()), []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in exclude:
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me and fields[0] != "Z":
                pids.append(int(entry))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                break
            time.sleep(0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


class Rbd:
    """The rbd CLI against the bench cluster, as a bare script would call it."""

    def __init__(self, cluster: CephCluster) -> None:
        self.base = ["rbd", "-c", cluster.conf, "--id", "admin", "--keyring", cluster.keyring]

    def __call__(self, *args: str, **kw) -> subprocess.CompletedProcess:
        res = subprocess.run([*self.base, *args], capture_output=True, **kw)
        if res.returncode != 0:
            raise SystemExit(f"rbd {' '.join(args)} failed ({res.returncode}): {res.stderr.decode(errors='replace')[-800:]}")
        return res

    def fill_random(self, where: str, size: int, chunk: int = 4 * MiB) -> None:
        """Write the whole image with random data: one `rbd import-diff -` fed a diff
        stream (the format tests/helpers.py rbd_diff_stream makes) written as it goes."""
        with reaped(subprocess.Popen([*self.base, "import-diff", "--no-progress", "-", where], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)) as (proc,):
            assert proc.stdin is not None and proc.stderr is not None
            proc.stdin.write(rbd_diff_stream(size, {})[:-1])  # header and size record, without the end record
            for off in range(0, size, chunk):
                n = min(chunk, size - off)
                proc.stdin.write(b"w" + struct.pack("<QQ", off, n) + os.urandom(n))
            proc.stdin.write(b"e")
            proc.stdin.close()
            err = proc.stderr.read()
            proc.wait()
        if proc.returncode != 0:
            raise SystemExit(f"rbd import-diff into {where} failed: {err.decode(errors='replace')[-800:]}")

    def change_blocks(self, where: str, size: int, fraction: float, rng: random.Random) -> int:
        """Rewrite ``fraction`` of the image's 4 KiB blocks (random ones) with random data."""
        blocks = rng.sample(range(size // BLOCK), int(size // BLOCK * fraction))
        writes = {b * BLOCK: rng.randbytes(BLOCK) for b in blocks}
        self("import-diff", "--no-progress", "-", where, input=rbd_diff_stream(size, writes))
        return len(blocks)

    def send(self, src: str, dst: str, from_snap: str | None) -> float:
        """Wall seconds of `rbd export-diff [--from-snap A] SRC - | rbd import-diff - DST`
        (two processes, one OS pipe between them: the bytes never pass through Python)."""
        inc = ["--from-snap", from_snap] if from_snap else []
        t0 = time.perf_counter()
        exp = subprocess.Popen([*self.base, "export-diff", "--no-progress", *inc, src, "-"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        with reaped(exp):
            imp = subprocess.Popen([*self.base, "import-diff", "--no-progress", "-", dst], stdin=exp.stdout,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        with reaped(exp, imp):
            assert exp.stdout is not None
            exp.stdout.close()  # the importer holds the read end now
            imp_err = imp.communicate()[1]
            exp_err = exp.communicate()[1]
        elapsed = time.perf_counter() - t0
        if exp.returncode or imp.returncode:
            raise SystemExit(f"bare export-diff ({exp.returncode}) | import-diff ({imp.returncode}) {src} -> {dst} failed: "
                             f"{exp_err.decode(errors='replace')[-400:]} {imp_err.decode(errors='replace')[-400:]}")
        return elapsed

    def sha256(self, where: str) -> str:
        h = hashlib.sha256()
        with reaped(subprocess.Popen([*self.base, "export", "--no-progress", where, "-"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)) as (proc,):
            assert proc.stdout is not None
            while chunk := proc.stdout.read(MiB):
                h.update(chunk)
            proc.wait()
        if proc.returncode != 0:
            raise SystemExit(f"rbd export {where} failed ({proc.returncode})")
        return h.hexdigest()


class Drtool:
    def __init__(self, config: Path, state: Path) -> None:
        self.argv = [str(Path(sys.executable).parent / "drtool"), "-c", str(config)]
        self.env = dict(os.environ, DRTOOL_STATE_DIR=str(state))

    def run_leg(self, leg: str) -> tuple[float, int, dict]:
        """(wall seconds, peak RSS kB, the leg's result) of `drtool run --policy P --leg LEG`."""
        elapsed, rss_kb, out = timed_process([*self.argv, "run", "--policy", POLICY, "--leg", leg, "--no-verify", "--json"], self.env)
        result = json.loads(out)["results"][0]
        if result["phase"] != "succeeded":
            raise SystemExit(f"drtool {leg}: {result['phase']}: {result['message']}")
        return elapsed, rss_kb, result

    def last_command_log(self) -> list[dict]:
        out = subprocess.run([*self.argv, "runs", "--policy", POLICY, "--json", "--limit", "1"], env=self.env,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True).stdout
        return json.loads(out)["runs"][0]["command_log"]


FLOOR_RUNS = 3


def floors(drtool: Drtool, rbd: Rbd, src: str) -> dict[str, float]:
    """Median wall seconds of drtool commands that do less and less than a run (what the
    CLI costs before any leg work), and of one rbd CLI call."""
    cmds = {"version": [drtool.argv[0], "--version"], "validate": [*drtool.argv, "policy", "validate", "--json"],
            "runs": [*drtool.argv, "runs", "--policy", POLICY, "--limit", "1", "--json"], "snap ls": [*rbd.base, "snap", "ls", src]}
    out = {}
    for name, argv in cmds.items():
        times = []
        for _ in range(FLOOR_RUNS):
            t0 = time.perf_counter()
            subprocess.run(argv, env=drtool.env, stdin=subprocess.DEVNULL, capture_output=True, check=True)
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def rbd_verb(argv: list[str]) -> str:
    """`snap ls`, `diff`, `export-diff`… from a logged rbd argv (options and specs dropped)."""
    words, skip = [], False
    for a in argv[1:]:
        if skip:
            skip = False
        elif a in ("-c", "--id", "--keyring", "--format", "--from-snap"):
            skip = True
        elif not a.startswith("-") and "/" not in a and "@" not in a:
            words.append(a)
    return " ".join(words[:2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=256, help="image size (default 256 MiB)")
    ap.add_argument("--changed", type=float, default=0.10, help="fraction of the 4 KiB blocks rewritten per round (default 0.10)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds; the order alternates, bare first in odd rounds")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds of idle before each timed side")
    ap.add_argument("--reuse-image", action="store_true",
                    help="one image chain for all rounds (slows down round by round on memstore: see above)")
    ap.add_argument("--memstore-mb", type=int, default=None, help="the OSD's memstore cap (default: sized from the image)")
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args()
    # 3 images and a snapshot clone of each (one image chain: one clone each per round)
    memstore_mb = args.memstore_mb or args.size_mb * 3 * ((args.rounds + 2) if args.reuse_image else 4) + 1024

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill, too
    try:
        cluster = CephCluster(memstore_mb=memstore_mb, mds=False)
    except CephUnavailable as e:
        raise SystemExit(f"ceph is not usable here: {e}")
    work = Path(tempfile.mkdtemp(prefix="drtool-rbdbench-", dir="/var/tmp"))
    try:
        t0 = time.monotonic()
        cluster.start()
        print(f"ceph {subprocess.run(['ceph', '--version'], capture_output=True, text=True).stdout.split()[2]}: "
              f"single-node cluster up in {time.monotonic() - t0:.1f}s (memstore cap {memstore_mb} MiB); "
              f"{os.cpu_count()} cores", flush=True)
        run(args, cluster, work)
    finally:
        stop_children(exclude={p.pid for p in cluster.procs.values()})  # a drtool or rbd cut short by SIGTERM/an error
        cluster.stop()  # every daemon by PID, and its temp dir
        shutil.rmtree(work, ignore_errors=True)


def drop_pools(cluster: CephCluster, pools: tuple[str, ...], timeout: float = 300.0) -> None:
    """Delete the pools and wait until the OSD has freed their data, so that none of it
    is still going during a timed side and the memstore does not fill up (a full OSD
    blocks writes). Whole pools, not `rbd snap purge` + `rbd rm`: the snapshot clones
    those leave go by background snap trimming, slow on memstore (5 s sleeps: it calls
    itself rotational; one send stalled 140 s on a full OSD), and with the sleeps off,
    memstore's usage count once went negative (16 EiB used: full for good)."""
    for pool in pools:
        cluster.ceph("osd", "pool", "delete", pool, pool, "--yes-i-really-really-mean-it")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if json.loads(cluster.ceph("df"))["stats"]["total_used_raw_bytes"] < 64 * MiB:
            return
        time.sleep(0.5)
    print(f"warning: the deleted pools' data was still not freed after {timeout:.0f}s", flush=True)


def run(args: argparse.Namespace, cluster: CephCluster, work: Path) -> None:
    rbd = Rbd(cluster)
    size = args.size_mb * MiB
    rng = random.Random(args.seed)
    config = work / "bench.yaml"
    drtool = Drtool(config, work / "state")  # one catalog for all rounds, as in real use
    print(f"{args.rounds} rounds of {args.changed:.0%} of the 4 KiB blocks changed, "
          + ("one image chain for all rounds" if args.reuse_image else "a fresh image (and replicas, and pools) per round"),
          flush=True)

    def setup(image: str) -> tuple[tuple[str, str], str, str, str, str]:
        """Untimed: two new pools, a random image, drtool's first snapshot, a full
        replication on both sides. -> (the pools, source, drtool's replica, the bare
        replica, the snapshot all three hold)."""
        src_pool, dst_pool = cluster.make_pool("bsrc"), cluster.make_pool("bdst")
        src, drt, bare = f"{src_pool}/{image}", f"{dst_pool}/{image}", f"{dst_pool}/{image}-bare"
        loc = f"conf: {cluster.conf}, keyring: {cluster.keyring}, media: ssd, site: home"
        config.write_text(
            "version: 1\nlocations:\n"
            f"  src: {{type: ceph-rbd, pool: {src_pool}, {loc}, failure_domain: ceph}}\n"
            f"  replica: {{type: ceph-rbd, pool: {dst_pool}, {loc}, failure_domain: ceph}}\n"
            "policies:\n"
            f"  - name: {POLICY}\n    source: {{location: src, image: {image}}}\n    rpo: 1d\n    rto: 1h\n    legs:\n"
            "      - {kind: snapshot, schedule: '@daily'}\n"
            "      - {kind: replicate, to: replica, schedule: '@daily'}\n")
        rbd("create", "--size", f"{args.size_mb}M", src)
        rbd.fill_random(src, size)
        _, _, snap = drtool.run_leg("snapshot")
        _, _, full = drtool.run_leg(LEG)
        assert "(full," in full["message"], full
        base = snap["point"].split("@", 1)[1]
        rbd("create", "--size", f"{args.size_mb}M", bare)
        rbd.send(f"{src}@{base}", bare, None)
        return (src_pool, dst_pool), src, drt, bare, base

    def settle() -> None:
        time.sleep(args.pause)

    rows: list[dict] = []
    pools: tuple[str, ...] = ()
    for i in range(args.rounds):
        if i == 0 or not args.reuse_image:
            if pools:  # the previous round's: memstore holds them in RAM
                drop_pools(cluster, pools)
            pools, src, drt, bare, prev = setup("vol" if args.reuse_image else f"vol{i + 1}")
        nblocks = rbd.change_blocks(src, size, args.changed, rng)
        time.sleep(1.1)  # drtool's snapshot names have one-second resolution
        _, _, snap = drtool.run_leg("snapshot")
        new = snap["point"].split("@", 1)[1]
        assert new != prev
        bare_first = i % 2 == 0
        if bare_first:
            settle()
            t_bare = rbd.send(f"{src}@{new}", bare, prev)
        settle()
        t_drt, rss, res = drtool.run_leg(LEG)
        if not bare_first:
            settle()
            t_bare = rbd.send(f"{src}@{new}", bare, prev)
        assert f"incremental from {prev}" in res["message"], res  # the same snapshot pair as the bare side
        log = drtool.last_command_log()
        stream = [c for c in log if rbd_verb(c["argv"]) in STREAM_CMDS]
        checks = [c for c in log if rbd_verb(c["argv"]) not in STREAM_CMDS]
        t_stream = max(c["duration_s"] for c in stream)  # the two run side by side
        t_checks = sum(c["duration_s"] for c in checks)  # one after the other, before the stream
        mb = res["bytes_processed"] / 1e6
        row = {"bare_s": t_bare, "drtool_s": t_drt, "leg_s": res["duration_s"], "stream_s": t_stream, "checks_s": t_checks,
               "n_checks": len(checks), "mb": mb, "rss_kb": rss, "first": "bare" if bare_first else "drtool",
               "checks": [(rbd_verb(c["argv"]), c["duration_s"]) for c in checks]}
        rows.append(row)
        if not args.reuse_image or i == args.rounds - 1:
            hashes = {where: rbd.sha256(f"{where}@{new}") for where in (src, drt, bare)}
            if len(set(hashes.values())) != 1:
                raise SystemExit(f"the replicas differ from the source at @{new}: {hashes}")
        print(f"round {i + 1} ({row['first']} first): {nblocks} blocks, diff {mb:5.1f} MB | bare {t_bare:5.2f}s "
              f"{mb / t_bare:5.1f} MB/s | drtool {t_drt:5.2f}s {mb / t_drt:5.1f} MB/s (leg {row['leg_s']:.2f}s: "
              f"checks {t_checks:.2f}s in {len(checks)} rbd runs, stream {t_stream:.2f}s) | ratio {t_bare / t_drt:.3f} | "
              f"drtool peak RSS {rss / 1024:.1f} MB", flush=True)
        prev = new
    print(f"\nchecked: {'every round' if not args.reuse_image else 'the last round'}: the new snapshot hashes the same "
          "(SHA-256 of a whole export) on the source and both replicas")

    med = statistics.median
    ratios = [r["bare_s"] / r["drtool_s"] for r in rows]  # throughput drtool / bare
    print(f"throughput ratio drtool/bare (bare time / drtool time): median {med(ratios):.3f}, geometric mean "
          f"{statistics.geometric_mean(ratios):.3f} (target >= 0.95), min {min(ratios):.3f}, max {max(ratios):.3f}")
    if len(rows) > 1:
        by_order = (med(ratios[0::2]), med(ratios[1::2]))
        print(f"  median when bare ran first {by_order[0]:.3f}, when drtool ran first {by_order[1]:.3f}; order-balanced "
              f"(geometric mean of the two) {statistics.geometric_mean(by_order):.3f}")
    leg_ratios = [r["bare_s"] / r["leg_s"] for r in rows]
    stream_ratios = [r["bare_s"] / r["stream_s"] for r in rows]
    print(f"  the leg alone (JSON duration_s, no CLI start-up): ratio median {med(leg_ratios):.3f}; "
          f"its stream alone (export-diff|import-diff): ratio median {med(stream_ratios):.3f}")
    print(f"times (median): bare {med(r['bare_s'] for r in rows):.2f}s, drtool {med(r['drtool_s'] for r in rows):.2f}s = "
          f"outside the leg {med(r['drtool_s'] - r['leg_s'] for r in rows):.2f}s (start-up, config, catalog, JSON) + "
          f"checks {med(r['checks_s'] for r in rows):.2f}s + stream {med(r['stream_s'] for r in rows):.2f}s + "
          f"rest of the leg {med(r['leg_s'] - r['checks_s'] - r['stream_s'] for r in rows):.2f}s")
    per_verb: dict[str, list[float]] = {}
    for r in rows:
        for verb, d in r["checks"]:
            per_verb.setdefault(verb, []).append(d)
    print("  drtool's rbd commands before the stream, per run (median each): "
          + ", ".join(f"{v} ×{len(ds) // len(rows)} {med(ds):.2f}s" for v, ds in per_verb.items()))
    fl = floors(drtool, rbd, src)
    print(f"  start-up floors (median of {FLOOR_RUNS}): `drtool --version` {fl['version']:.2f}s (interpreter, imports), "
          f"`policy validate` {fl['validate']:.2f}s (+ config), `runs --limit 1` {fl['runs']:.2f}s (+ catalog: SQLAlchemy, "
          f"schema); one bare `rbd snap ls` {fl['snap ls']:.2f}s")
    print(f"  overhead: median drtool - bare = {med(r['drtool_s'] - r['bare_s'] for r in rows):.2f}s per run")
    print(f"throughput: bare median {med(r['mb'] / r['bare_s'] for r in rows):.1f} MB/s, "
          f"drtool median {med(r['mb'] / r['drtool_s'] for r in rows):.1f} MB/s (diff {med(r['mb'] for r in rows):.1f} MB)")
    rss = [r["rss_kb"] for r in rows]
    print(f"drtool peak RSS: median {med(rss) / 1024:.1f} MB, max {max(rss) / 1024:.1f} MB")


if __name__ == "__main__":
    main()
