#!/usr/bin/env python3
"""Benchmark: a restore drill with a full tree-compare against bare `restic restore`,
and drtool's tree-compare hashing alone against `b3sum`.

Set-up (untimed except the snapshot, which is reported): a generated tree of
~--size-mb MiB (backup_overhead.make_tree), a restic repository, a one-policy config
whose backup leg records a full BLAKE3 manifest (`verify: {manifest: full}`), one
`drtool run` to make the snapshot, and a drill file with one step that restores that
policy's latest point and runs `tree-compare: {mode: full}`.

Part 1, several rounds alternating which side goes first:
  (a) `restic -r REPO --password-file F restore latest --target DIR` (the process is
      timed; removing DIR afterwards is NOT, and is reported separately);
  (b) `drtool drill run FILE --json` (the whole process: start-up, the restore into its
      own scratch dir, the full tree-compare, teardown, which removes the restored
      tree, INSIDE drtool's time, and the evidence files).
  Prints medians, the ratio of medians (target <= 1.3), drtool's peak RSS (the Python
  process, VmHWM polled from /proc; restic's memory is restic's) and, from the drill's
  JSON, how its time splits into restore and tree-compare; afterwards (untimed) it reads
  the restore runs' command logs (`drtool runs --json`) for restic's own share.

Part 2 (--hash-rounds), the snapshot restored once and read into the page cache, then rounds
alternating: (a) `b3sum` over every restored file (file paths as argv, batched
under ARG_MAX); (b) a separate Python process calling drtool.manifest.compare_tree
on the restored tree against the full manifest read with manifest.read_file (start-up,
imports and the manifest load count, as b3sum's start-up does). Prints the throughput
ratio drtool/b3sum (target >= 0.9).

Everything lives in one work dir under /var/tmp (the repository, the state dir, the
restic cache via RESTIC_CACHE_DIR), removed at the end unless --keep.

    .venv/bin/python bench/drill_restore.py [--size-mb 1024] [--rounds 5] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ from importing the sibling script
sys.path.insert(0, str(Path(__file__).resolve().parent))
from backup_overhead import PASSWORD, make_tree, timed_process, warm  # noqa: E402

POLICY, LEG = "bench", "backup-repo"

COMPARE_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from drtool import manifest
entries = manifest.read_file(Path(sys.argv[2]))
t1 = time.perf_counter()
bad = manifest.compare_tree(Path(sys.argv[1]), entries)
t2 = time.perf_counter()
print(json.dumps({"files": len(entries), "bytes": sum(e["size"] for e in entries), "mismatches": bad[:5],
                  "n_bad": len(bad), "load_s": t1 - t0, "compare_s": t2 - t1}))
"""


def settle(pause: float) -> None:
    """Write back the previous side's dirty pages and idle, so neither side pays for the other."""
    os.sync()
    time.sleep(pause)


def files_under(root: Path) -> list[str]:
    out = []
    for d, _, names in os.walk(root):
        out.extend(os.path.join(d, n) for n in names if os.path.isfile(os.path.join(d, n)))
    return sorted(out)


def argv_batches(cmd: list[str], paths: list[str]) -> list[list[str]]:
    """``cmd`` + paths, split so that no argv (plus the environment) nears ARG_MAX."""
    budget = os.sysconf("SC_ARG_MAX") // 2 - sum(len(k) + len(v) + 2 for k, v in os.environ.items())
    batches, cur, size = [], list(cmd), 0
    for p in paths:
        cost = len(os.fsencode(p)) + 1 + 8  # the string, its NUL, the pointer
        if size + cost > budget and len(cur) > len(cmd):
            batches.append(cur)
            cur, size = list(cmd), 0
        cur.append(p)
        size += cost
    batches.append(cur)
    return batches


def run_b3sum(batches: list[list[str]], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    outs = [subprocess.run(b, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True).stdout for b in batches]
    return time.perf_counter() - t0, "".join(outs)


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5, help="rounds of part 1; odd rounds run the bare tool first, even ones drtool")
    ap.add_argument("--hash-rounds", type=int, default=10, help="rounds of part 2 (each under a second at 1 GiB, so more of them)")
    ap.add_argument("--pause", type=float, default=3.0, help="seconds of idle (after a sync) before each timed side")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (tree, repository, state, evidence)")
    args = ap.parse_args()

    drtool = str(Path(sys.executable).parent / "drtool")
    work = Path(tempfile.mkdtemp(prefix="drtool-drill-bench-", dir="/var/tmp"))
    try:
        run(args, drtool, work)
    finally:
        if args.keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, drtool: str, work: Path) -> None:
    src, repo, state, pw = work / "tree", work / "repo", work / "state", work / "password"
    pw.write_text(PASSWORD)
    env = dict(os.environ, RESTIC_CACHE_DIR=str(work / "restic-cache"), DRTOOL_STATE_DIR=str(state))
    for k in ("RESTIC_PASSWORD", "RESTIC_PASSWORD_FILE", "RESTIC_PASSWORD_COMMAND", "RESTIC_REPOSITORY", "RESTIC_REPOSITORY_FILE"):
        env.pop(k, None)
    restic = ["restic", "-r", str(repo), "--password-file", str(pw)]

    n = make_tree(src, args.size_mb)
    total = sum(os.path.getsize(p) for p in files_under(src))
    rver = subprocess.run(["restic", "version"], capture_output=True, text=True).stdout.strip()
    bver = subprocess.run(["b3sum", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"generated {n} files, {total / 2**20:.0f} MiB in {src}", flush=True)
    print(f"{rver}; {bver}; {os.cpu_count()} cores; {args.rounds} + {args.hash_rounds} rounds; work dir {work}", flush=True)

    subprocess.run([*restic, "init", "-q"], env=env, check=True, capture_output=True)
    config = work / "bench.yaml"
    config.write_text(
        "version: 1\nlocations:\n"
        "  src: {type: filesystem, media: ssd, site: home, failure_domain: host}\n"
        f"  repo: {{type: restic, repository: {repo}, password: {{file: {pw}}}, media: hdd, site: home, failure_domain: disk}}\n"
        "policies:\n"
        f"  - {{name: {POLICY}, source: {{location: src, path: {src}}}, rpo: 1d, rto: 1h,\n"
        "     legs: [{kind: backup, to: repo, schedule: '@daily', verify: {manifest: full}}]}\n"
    )
    drill = work / "drill.yaml"
    drill.write_text(
        "version: 1\nname: bench-restore\ntargets: {rto: 4h, rpo: 30d}\ntimeout: 4h\nsteps:\n"
        f"  - name: restore\n    timeout: 4h\n    restore: {{policy: {POLICY}, point: latest}}\n"
        "    checks: [{tree-compare: {mode: full}}]\n"
    )

    warm(src)
    settle(args.pause)
    dt, rss, out = timed_process([drtool, "-c", str(config), "run", "--policy", POLICY, "--no-verify", "--json"], env)
    res = json.loads(out)["results"][0]
    assert res["phase"] == "succeeded", res
    mdir = state / "manifests" / POLICY / LEG
    mfiles = list(mdir.glob("*.jsonl.gz"))
    assert len(mfiles) == 1, f"expected one full manifest in {mdir}, found {mfiles}"
    print(f"snapshot: `drtool run` (restic backup + full BLAKE3 manifest) {dt:.2f}s, peak RSS {rss / 1024:.1f} MB; "
          f"manifest {mfiles[0].name}", flush=True)
    # the source is not needed any more: drop it so both sides' restores have the page cache to themselves
    shutil.rmtree(src)

    # ---------------------------------------------------------------- part 1: drill vs restic restore
    print("\n== restore + full tree-compare: `drtool drill run` vs bare `restic restore` ==", flush=True)
    bare_target = work / "bare-restore"
    rows = []  # (restic s, rm s, drtool s, rss kB, restore s, tree-compare s, rto s, files)

    def side_restic() -> tuple[float, float]:
        settle(args.pause)
        t, _, _ = timed_process([*restic, "restore", "latest", "--target", str(bare_target)], env, poll_rss=False)
        t0 = time.perf_counter()
        shutil.rmtree(bare_target)
        return t, time.perf_counter() - t0

    def side_drtool() -> tuple[float, int, dict]:
        settle(args.pause)
        t, rss, out = timed_process([drtool, "-c", str(config), "drill", "run", str(drill), "--json"], env)
        doc = json.loads(out)
        assert doc["verdict"] == "pass", doc.get("reasons")
        return t, rss, doc

    for i in range(args.rounds):
        if i % 2 == 0:
            (raw, rm), (dt, rss, doc) = side_restic(), side_drtool()
        else:
            (dt, rss, doc), (raw, rm) = side_drtool(), side_restic()
        step = doc["steps"][0]
        restore_s = step["restore_s"] - step["start_s"]
        tc = next(c for c in step["checks"] if c["kind"] == "tree-compare")
        rows.append((raw, rm, dt, rss, restore_s, tc["seconds"], doc["rto_s"], tc["detail"].get("files")))
        print(f"round {i + 1} ({'restic' if i % 2 == 0 else 'drtool'} first): restic {raw:6.2f}s (+ rm {rm:4.2f}s untimed)  "
              f"drtool {dt:6.2f}s [restore {restore_s:5.2f}s, tree-compare {tc['seconds']:5.2f}s, rto {doc['rto_s']:5.2f}s]  "
              f"ratio {dt / raw:.3f}  RSS {rss / 1024:.1f} MB", flush=True)

    # restic's own share of each drill, from the restore runs' command logs in the catalog (read untimed)
    _, _, out = timed_process([drtool, "-c", str(config), "runs", "--limit", str(4 * args.rounds + 10), "--json"], env, poll_rss=False)
    restores = [r for r in json.loads(out)["runs"] if r["kind"] == "restore"][: args.rounds]
    inner = {"restore": [], "snapshots": []}
    for r in restores:
        for kind in inner:
            inner[kind].append(sum(c["duration_s"] for c in r.get("command_log") or [] if kind in c["argv"][3:4]))
    n_snap = max(sum(1 for c in r.get("command_log") or [] if "snapshots" in c["argv"][3:4]) for r in restores)

    m_raw, m_rm, m_dt = med([r[0] for r in rows]), med([r[1] for r in rows]), med([r[2] for r in rows])
    m_rest, m_tc, m_rto = med([r[4] for r in rows]), med([r[5] for r in rows]), med([r[6] for r in rows])
    ratios = [r[2] / r[0] for r in rows]
    print(f"\nrestic restore median {m_raw:.2f}s; drtool drill median {m_dt:.2f}s "
          f"(includes removing the restored tree; the bare side's rm, untimed, median {m_rm:.2f}s)")
    print(f"ratio of medians drtool/restic: {m_dt / m_raw:.3f} (target <= 1.3); per-round {min(ratios):.3f}-{max(ratios):.3f}, "
          f"geometric mean {statistics.geometric_mean(ratios):.3f}")
    print(f"  against restic + rm: {m_dt / (m_raw + m_rm):.3f}")
    print(f"drill split (medians, from its JSON): restore {m_rest:.2f}s ({m_rest / m_raw:.2f}x bare restic), "
          f"tree-compare {m_tc:.2f}s ({rows[0][7]} files), rto {m_rto:.2f}s; outside the rto "
          f"(start-up, teardown rm, evidence) {m_dt - m_rto:.2f}s")
    m_in, m_snap = med(inner["restore"]), med(inner["snapshots"])
    print(f"inside the drill (medians, from the catalog's command log): `restic restore` {m_in:.2f}s (bare: {m_raw:.2f}s), "
          f"{n_snap} `restic snapshots` call(s) {m_snap:.2f}s; drtool's own time {m_dt - m_in:.2f}s of {m_dt:.2f}s = "
          f"tree-compare {m_tc:.2f} + snapshots {m_snap:.2f} + other in-step {m_rest - m_in - m_snap:.2f} "
          f"(catalog open, sample re-hash) + outside the rto {m_dt - m_rto:.2f} (start-up, teardown rm, evidence) "
          f"+ medians not adding up {m_dt - m_in - m_tc - (m_rest - m_in) - (m_dt - m_rto):.2f}")
    print(f"drtool peak RSS: median {med([r[3] for r in rows]) / 1024:.1f} MB, max {max(r[3] for r in rows) / 1024:.1f} MB "
          "(VmHWM: it counts the page-cache pages of the files compare_tree mmaps, not only the heap)", flush=True)

    # ---------------------------------------------------------------- part 2: hashing alone
    print("\n== tree-compare hashing alone: drtool compare_tree vs b3sum, page cache warm ==", flush=True)
    tree = work / "hash-restore"
    subprocess.run([*restic, "restore", "latest", "--target", str(tree)], env=env, check=True, capture_output=True)
    paths = files_under(tree)
    nbytes = sum(os.path.getsize(p) for p in paths)
    batches = argv_batches(["b3sum"], paths)
    warm(tree)
    # both sides hash the same bytes to the same digests (checked once, untimed)
    from drtool import manifest

    want = {e["path"]: e["blake3"] for e in manifest.read_file(mfiles[0])}
    _, b3out = run_b3sum(batches, env)
    got = {}
    for line in b3out.splitlines():
        digest, path = line.split("  ", 1)
        got["/" + os.path.relpath(path, tree)] = digest
    assert got == want, f"b3sum and the manifest disagree on {len(set(got.items()) ^ set(want.items()))} entries"
    print(f"{len(paths)} files, {nbytes / 2**20:.0f} MiB; b3sum in {len(batches)} invocation(s); digests match the manifest", flush=True)

    child = [sys.executable, "-c", COMPARE_CHILD, str(tree), str(mfiles[0])]
    hrows = []  # (b3sum s, drtool s, compare_s, load_s, rss)

    def side_b3() -> float:
        settle(args.pause)
        return run_b3sum(batches, env)[0]

    def side_cmp() -> tuple[float, dict, int]:
        settle(args.pause)
        t, rss, out = timed_process(child, env)
        doc = json.loads(out)
        assert doc["n_bad"] == 0 and doc["files"] == len(paths), doc
        return t, doc, rss

    for i in range(args.hash_rounds):
        if i % 2 == 0:
            b3, (dt, doc, rss) = side_b3(), side_cmp()
        else:
            (dt, doc, rss), b3 = side_cmp(), side_b3()
        hrows.append((b3, dt, doc["compare_s"], doc["load_s"], rss))
        print(f"round {i + 1} ({'b3sum' if i % 2 == 0 else 'drtool'} first): b3sum {b3:5.2f}s ({nbytes / b3 / 2**20:6.0f} MiB/s)  "
              f"drtool {dt:5.2f}s ({nbytes / dt / 2**20:6.0f} MiB/s) [compare_tree {doc['compare_s']:5.2f}s, imports+manifest "
              f"{doc['load_s']:4.2f}s, interpreter {dt - doc['load_s'] - doc['compare_s']:4.2f}s]  ratio {b3 / dt:.3f}", flush=True)
    m_b3, m_h, m_c = med([r[0] for r in hrows]), med([r[1] for r in hrows]), med([r[2] for r in hrows])
    print(f"\nthroughput ratio drtool/b3sum (medians, whole processes): {m_b3 / m_h:.3f} (target >= 0.9); "
          f"compare_tree alone (in-process) {m_b3 / m_c:.3f}")
    print(f"b3sum median {m_b3:.2f}s ({nbytes / m_b3 / 2**20:.0f} MiB/s), drtool median {m_h:.2f}s ({nbytes / m_h / 2**20:.0f} MiB/s), "
          f"compare_tree median {m_c:.2f}s; drtool hashing process peak RSS {max(r[4] for r in hrows) / 1024:.1f} MB")


if __name__ == "__main__":
    main()
