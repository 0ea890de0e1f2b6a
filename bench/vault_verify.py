#!/usr/bin/env python3
"""Benchmark: integrity check of a Vault/OpenBao raft snapshot against a bare check by hand.

Builds a ~100 MB snapshot (a throwaway OpenBao from tests/services/openbao.py, its raft
data in /dev/shm, KV v2 secrets at secret/bench/… with incompressible random values of
4-24 kB, written by concurrent clients), takes it with ``VaultApi.snapshot()``, then
times, in the same run, several rounds alternating which goes first:

- bare: what a person runs to check a raft snapshot offline,
  ``tar -xzf SNAP -C TMP && (cd TMP && sha256sum -c SHA256SUMS)``: two processes (tar
  runs gzip), the temp dir made before and removed after, all inside the time (the
  extraction is part of the method; drtool's side writes nothing to disk)
- drtool: ``check_snapshot(open(SNAP, 'rb'))`` in a fresh Python process (interpreter
  start-up and imports counted, as the bare side's process start-ups are), which
  also reports the time of check_snapshot alone and its own peak RSS.

Prints per-round times, the median times, the ratio drtool/bare per round and of the
medians (target <= 1.2), check_snapshot's in-process time, and drtool's peak RSS
(VmHWM of the Python process, polled from /proc).

    .venv/bin/python bench/vault_verify.py [--size-mb 100] [--rounds 5]
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from services.openbao import OpenBao, OpenBaoUnavailable  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from backup_overhead import timed_process  # noqa: E402

from pydantic import SecretStr  # noqa: E402

from drtool.backends.vault import VaultApi, VaultConn, check_snapshot  # noqa: E402

# the drtool side: a fresh interpreter, printing its own timings as JSON
CHECK_SCRIPT = """\
import json, sys, time
t0 = time.perf_counter()
from drtool.backends.vault import check_snapshot
t1 = time.perf_counter()
with open(sys.argv[1], "rb") as f:
    res = check_snapshot(f)
t2 = time.perf_counter()
print(json.dumps({"ok": res["ok"], "problems": res["problems"], "members": res["members"],
                  "import_s": t1 - t0, "check_s": t2 - t1}))
sys.exit(0 if res["ok"] else 1)
"""

VALUE_MIN, VALUE_MAX = 3_000, 18_000  # random bytes per secret; base64 makes them 4-24 kB
BATCH = 256  # secrets per batch handed to the writers


def fill(address: str, token: str, target_bytes: int, *, start: int = 0, workers: int = 16,
         seed: int = 7) -> tuple[int, int]:
    """Write KV v2 secrets secret/bench/NNNNNNN (one key ``v``, base64 of random bytes)
    from ``workers`` threads until about ``target_bytes`` of values are written;
    return (secrets written, value bytes written)."""
    import requests

    local = threading.local()

    def session() -> requests.Session:
        s = getattr(local, "s", None)
        if s is None:
            s = local.s = requests.Session()
            s.trust_env = False
            s.headers.update({"X-Vault-Token": token, "X-Vault-Request": "true"})
        return s

    def put(item: tuple[int, str]) -> int:
        i, value = item
        resp = session().post(f"{address}/v1/secret/data/bench/{i:07d}", json={"data": {"v": value}}, timeout=60)
        if resp.status_code not in (200, 204):
            raise SystemExit(f"write of secret {i} failed: HTTP {resp.status_code}: {resp.text[:300]}")
        return len(value)

    rng = random.Random(seed + start)
    n = written = 0
    with ThreadPoolExecutor(workers) as pool:
        while written < target_bytes:
            batch = []
            for _ in range(BATCH):
                value = base64.b64encode(rng.randbytes(rng.randint(VALUE_MIN, VALUE_MAX))).decode()
                batch.append((start + n, value))
                n += 1
            written += sum(pool.map(put, batch))
    return n, written


def take_snapshot(api: VaultApi, snap: Path) -> int:
    with open(snap, "wb") as f:
        return api.snapshot(f)


def settle(pause: float) -> None:
    os.sync()  # the previous side's extracted files are written back now, not during the next one
    time.sleep(pause)


def run(argv: list[str], cwd: Path | None = None) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{argv[0]} failed ({proc.returncode}): {' '.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed


def bare_check(snap: Path, scratch: Path) -> tuple[float, dict[str, float]]:
    """``tar -xzf SNAP -C TMP && (cd TMP && sha256sum -c SHA256SUMS)``, then rm -r TMP;
    all of it timed. The ``cd`` is the child's cwd, no shell."""
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bare-", dir=scratch))
    t_tar = run(["tar", "-xzf", str(snap), "-C", str(tmp)])
    t_sum = run(["sha256sum", "-c", "SHA256SUMS"], cwd=tmp)
    t1 = time.perf_counter()
    shutil.rmtree(tmp)
    t2 = time.perf_counter()
    return t2 - t0, {"tar": t_tar, "sha256sum": t_sum, "rm": t2 - t1}


def drtool_check(snap: Path) -> tuple[float, int, dict]:
    elapsed, rss_kb, out = timed_process([sys.executable, "-c", CHECK_SCRIPT, str(snap)], dict(os.environ))
    return elapsed, rss_kb, json.loads(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5, help="the order alternates: bare first in odd rounds")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds of idle before each timed side")
    ap.add_argument("--workers", type=int, default=16, help="concurrent writers while filling")
    ap.add_argument("--workdir", default=None, help="where the snapshot and extractions go (default: a temp dir under /var/tmp)")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="drtool-vault-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    snap, scratch = work / "vault.snap", work / "scratch"
    scratch.mkdir(exist_ok=True)

    # the server's raft data in RAM (as the etcd bench does): filling is then bound by the
    # server, not by fsyncs; the test service makes its dir with tempfile.mkdtemp()
    saved_tempdir = tempfile.tempdir
    if os.access("/dev/shm", os.W_OK):
        tempfile.tempdir = "/dev/shm"
    try:
        bao = OpenBao().start()
    except OpenBaoUnavailable as exc:
        raise SystemExit(f"cannot run: {exc}")
    finally:
        tempfile.tempdir = saved_tempdir
    try:
        ver = subprocess.run([bao.binary, "version"], capture_output=True, text=True).stdout.strip()
        api = VaultApi(VaultConn(bao.address, token=SecretStr(bao.root_token), timeout=300))
        target = args.size_mb * 1_000_000
        n = written = 0
        need, fill_s, snaps = target, 0.0, []
        for _ in range(5):  # fill by value bytes, then top up by what the snapshot still lacks
            t0 = time.perf_counter()
            got_n, got_bytes = fill(bao.address, bao.root_token, need, start=n, workers=args.workers)
            fill_s += time.perf_counter() - t0
            n, written = n + got_n, written + got_bytes
            t0 = time.perf_counter()
            size = take_snapshot(api, snap)
            snaps.append(time.perf_counter() - t0)
            if size >= 0.98 * target:
                break
            need = target - size
        print(f"filled {n} secrets ({written / 1e6:.1f} MB of values, {args.workers} writers) in {fill_s:.1f}s; "
              f"snapshot taken in {snaps[-1]:.1f}s" + (f" ({len(snaps)} snapshots to reach the size)" if len(snaps) > 1 else ""),
              flush=True)
    finally:
        bao.stop()

    ref = check_snapshot(open(snap, "rb"))
    if not ref["ok"]:
        raise SystemExit(f"the snapshot does not check: {ref['problems']}")
    members = ", ".join(f"{k} {v / 1e6:.1f} MB" if v > 100_000 else f"{k} {v} B" for k, v in ref["members"].items())
    print(f"snapshot {snap.stat().st_size / 1e6:.1f} MB ({members}); {ver}; "
          f"{os.cpu_count()} cores; {args.rounds} rounds", flush=True)
    with open(snap, "rb") as f:  # warm the page cache once, for both sides alike
        while f.read(1 << 20):
            pass

    bare_t, drtool_t, ratios, firsts, rss_all, check_s, import_s, bare_parts = [], [], [], [], [], [], [], []
    for i in range(args.rounds):
        sides = ["bare", "drtool"] if i % 2 == 0 else ["drtool", "bare"]
        got: dict[str, float] = {}
        for side in sides:
            settle(args.pause)
            if side == "bare":
                got["bare"], parts = bare_check(snap, scratch)
            else:
                got["drtool"], rss, doc = drtool_check(snap)
        bare_t.append(got["bare"])
        drtool_t.append(got["drtool"])
        ratios.append(got["drtool"] / got["bare"])
        firsts.append(sides[0])
        rss_all.append(rss)
        check_s.append(doc["check_s"])
        import_s.append(doc["import_s"])
        bare_parts.append(parts)
        print(f"round {i + 1} ({sides[0]} first): bare {got['bare']:6.3f}s (tar {parts['tar']:.3f} + sha256sum "
              f"{parts['sha256sum']:.3f} + rm {parts['rm']:.3f})  drtool {got['drtool']:6.3f}s (import "
              f"{doc['import_s']:.3f}, check_snapshot {doc['check_s']:.3f})  ratio {ratios[-1]:.3f}  "
              f"drtool peak RSS {rss / 1024:.1f} MB", flush=True)

    mb, md = statistics.median(bare_t), statistics.median(drtool_t)
    print(f"\nmedian bare {mb:.3f}s, median drtool {md:.3f}s: ratio of medians {md / mb:.3f} (target <= 1.2)")
    print(f"ratio per round: {', '.join(f'{r:.3f}' for r in ratios)}; geometric mean {statistics.geometric_mean(ratios):.3f}, "
          f"median {statistics.median(ratios):.3f}, min {min(ratios):.3f} max {max(ratios):.3f}")
    for first in ("bare", "drtool"):
        sel = [r for r, f in zip(ratios, firsts) if f == first]
        if sel:
            print(f"  median ratio when {first} ran first: {statistics.median(sel):.3f} ({len(sel)} rounds)")
    med = {k: statistics.median(p[k] for p in bare_parts) for k in ("tar", "sha256sum", "rm")}
    no_rm = statistics.median(b - p["rm"] for b, p in zip(bare_t, bare_parts))
    print(f"bare parts (medians): tar -xzf {med['tar']:.3f}s, sha256sum -c {med['sha256sum']:.3f}s, rm -r {med['rm']:.3f}s; "
          f"without the rm the ratio of medians would be {md / no_rm:.3f}")
    print(f"drtool parts (medians): check_snapshot alone {statistics.median(check_s):.3f}s "
          f"({ref['bytes'] / 1e6 / statistics.median(check_s):.0f} MB/s of snapshot), import {statistics.median(import_s):.3f}s, "
          f"the rest (interpreter start-up, exit) {md - statistics.median(check_s) - statistics.median(import_s):.3f}s")
    print(f"drtool peak RSS: median {statistics.median(rss_all) / 1024:.1f} MB, max {max(rss_all) / 1024:.1f} MB "
          "(VmHWM polled from /proc; not the child's own ru_maxrss, which after vfork+exec carries this parent's peak)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
