#!/usr/bin/env python3
"""Benchmark: integrity verification of an etcd snapshot against a bare restore.

Builds a ~200 MB snapshot (a throwaway etcd on 127.0.0.1, Kubernetes-shaped keys under
/registry/ with values of 0.5-8 kB), then times, in the same run, several rounds
alternating which goes first:

- bare: ``etcdctl snapshot restore`` into a temp dir (what any integrity check costs)
- drtool: ``verify_snapshot(path, counts, workdir=…)`` (integrity, no sample): the
  same restore plus the offline key count per /registry/ prefix and the comparison
  with the counts recorded at backup.

Prints per-round times, the median times, the ratio drtool/bare (target <= 1.2), and,
for reference, what starting a scratch etcd on the restored dir costs (the approach
the offline count replaces).

    .venv/bin/python bench/etcd_verify.py [--size-mb 200] [--rounds 6]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from backup_overhead import timed_process  # noqa: E402

from drtool.backends.etcd import EtcdCli, EtcdConn, ScratchEtcd, snapshot_restore, snapshot_status, verify_snapshot  # noqa: E402

RESOURCES = {"pods": 30, "events": 25, "replicasets": 10, "configmaps": 10, "secrets": 10, "deployments": 5,
             "services/specs": 4, "leases": 3, "serviceaccounts": 3}  # weights


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(endpoint: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{endpoint}{path}", data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def start_etcd(root: Path) -> tuple[subprocess.Popen, str]:
    """A one-member etcd with a data dir under ``root``, a big quota and big txns."""
    client, peer = free_port(), free_port()
    ep, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    log = open(root / "etcd.log", "ab")
    proc = subprocess.Popen(
        ["etcd", "--name=bench", f"--data-dir={root / 'data'}", f"--listen-client-urls={ep}",
         f"--advertise-client-urls={ep}", f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
         f"--initial-cluster=bench={peer_url}", "--quota-backend-bytes=8589934592", "--max-txn-ops=100000",
         "--max-request-bytes=67108864"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{ep}/health", timeout=1) as resp:
                if json.loads(resp.read()).get("health") == "true":
                    return proc, ep
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"etcd did not start: {(root / 'etcd.log').read_text()[-2000:]}")


def fill(endpoint: str, size_mb: int, seed: int = 7) -> int:
    """Put keys until etcd's db is ``size_mb`` MB; return the number of keys."""
    rng = random.Random(seed)
    names, weights = list(RESOURCES), list(RESOURCES.values())
    blob = rng.randbytes(16_000)
    n, target = 0, size_mb * 1_000_000
    while True:
        ops = []
        for _ in range(2000):
            res = rng.choices(names, weights)[0]
            size = rng.randint(500, 8000)
            off = rng.randrange(len(blob) - size)
            key = f"/registry/{res}/ns{rng.randrange(40)}/obj-{n:07d}"
            ops.append({"request_put": {"key": base64.b64encode(key.encode()).decode(),
                                        "value": base64.b64encode(blob[off: off + size]).decode()}})
            n += 1
        post(endpoint, "/v3/kv/txn", {"success": ops})
        status = post(endpoint, "/v3/maintenance/status", {})
        if int(status["dbSize"]) >= target:
            return n


def settle(pause: float) -> None:
    os.sync()  # the previous side's restored data dir is written back now, not during the next one
    time.sleep(pause)


def bare_restore(snap: Path, scratch: Path) -> float:
    target = scratch / f"bare-{time.monotonic_ns()}"
    elapsed, _, _ = timed_process(["etcdctl", "snapshot", "restore", str(snap), f"--data-dir={target}",
                                   "--name=drtool-scratch", "--initial-cluster=drtool-scratch=http://127.0.0.1:2380",
                                   "--initial-advertise-peer-urls=http://127.0.0.1:2380"],
                                  dict(os.environ, ETCDCTL_API="3"), poll_rss=False)
    shutil.rmtree(target)  # untimed; verify_snapshot removes its scratch dir inside its time (conservative)
    return elapsed


def drtool_verify(snap: Path, counts: dict[str, int], scratch: Path) -> tuple[float, dict]:
    t0 = time.perf_counter()
    res = verify_snapshot(snap, counts, workdir=scratch)
    elapsed = time.perf_counter() - t0
    if not res["ok"]:
        raise SystemExit(f"verify failed: {res['problems']}")
    return elapsed, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=6, help="rounded up to an even number: each side goes first equally often")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds of idle before each timed side")
    ap.add_argument("--workdir", default=None, help="where the snapshot and restores go (default: a temp dir under /var/tmp)")
    args = ap.parse_args()
    args.rounds += args.rounds % 2

    work = Path(args.workdir or tempfile.mkdtemp(prefix="drtool-etcd-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    snap, scratch = work / "snapshot.db", work / "scratch"
    scratch.mkdir(exist_ok=True)
    etcd_root = Path(tempfile.mkdtemp(prefix="drtool-etcd-bench-server-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    proc, endpoint = start_etcd(etcd_root)
    try:
        t0 = time.perf_counter()
        n = fill(endpoint, args.size_mb)
        print(f"filled {n} keys in {time.perf_counter() - t0:.1f}s", flush=True)
        cli = EtcdCli(EtcdConn(endpoints=[endpoint]))
        cli.snapshot_save(snap)
        status = snapshot_status(snap)
        counts = cli.key_counts(revision=status.revision)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(etcd_root, ignore_errors=True)
    ver = subprocess.run(["etcdctl", "version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(f"snapshot {snap.stat().st_size / 1e6:.1f} MB, revision {status.revision}, {sum(counts.values())} keys "
          f"in {len(counts)} prefixes; {ver}; {os.cpu_count()} cores; {args.rounds} rounds", flush=True)
    with open(snap, "rb") as f:  # warm the page cache once, for both sides alike
        while f.read(1 << 20):
            pass

    bare_t, drtool_t, ratios = [], [], []
    for i in range(args.rounds):
        sides = ["bare", "drtool"] if i % 2 == 0 else ["drtool", "bare"]
        got: dict[str, float] = {}
        for side in sides:
            settle(args.pause)
            if side == "bare":
                got["bare"] = bare_restore(snap, scratch)
            else:
                got["drtool"], res = drtool_verify(snap, counts, scratch)
        bare_t.append(got["bare"])
        drtool_t.append(got["drtool"])
        ratios.append(got["drtool"] / got["bare"])
        print(f"round {i + 1} ({sides[0]} first): bare restore {got['bare']:6.2f}s  verify {got['drtool']:6.2f}s  "
              f"ratio {ratios[-1]:.3f}  verify parts {res['seconds']}", flush=True)

    # what the etcd-based count would cost on top of a restore (for the record)
    target = scratch / "with-etcd"
    snapshot_restore(snap, target)
    t0 = time.perf_counter()
    with ScratchEtcd(target, log_path=scratch / "scratch-etcd.log") as etcd:
        started = time.perf_counter() - t0
        t1 = time.perf_counter()
        assert etcd.key_counts(sorted(counts)) == counts
        counted = time.perf_counter() - t1
    shutil.rmtree(target)

    mb, md = statistics.median(bare_t), statistics.median(drtool_t)
    print(f"\nmedian bare restore {mb:.2f}s, median verify {md:.2f}s: ratio of medians {md / mb:.3f} (target <= 1.2)")
    print(f"ratio per round: geometric mean {statistics.geometric_mean(ratios):.3f}, median {statistics.median(ratios):.3f}, "
          f"min {min(ratios):.3f} max {max(ratios):.3f}")
    print(f"for reference: a scratch etcd on the restored dir takes {started:.2f}s to become healthy and "
          f"{counted:.3f}s to count {len(counts)} prefixes (ratio with it would be ~{(mb + started + counted) / mb:.2f})")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
