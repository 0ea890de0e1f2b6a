#!/usr/bin/env python3
"""Benchmark: `drtool run` of one upload leg against the tools a user would otherwise
reach for, on the same file, the same local server, in the same run.

GCS on fake-gcs-server (tests/services/fakegcs.py; memory backend, plain HTTP):
  (a) drtool:  drtool -c POLICY run --no-verify --json (the whole CLI process: start-up,
      catalog, existence check, resumable upload in 16 MiB chunks hashed on the way,
      read-back of the stored checksums, manifest), leg source = the file
  (b) gcloud:  gcloud storage cp FILE gs://BUCKET/KEY (env from /work/shared/TESTING.md:
      throw-away CLOUDSDK_CONFIG, no credentials, endpoint override, no parallel
      composite uploads)
  (c) python:  a fresh interpreter running google-cloud-storage's plain
      blob.upload_from_filename(FILE) (AnonymousCredentials, api_endpoint)
S3 on SeaweedFS (tests/services/seaweedfs.py; `weed mini`, data on disk):
  (a) drtool as above (multipart, 16 MiB parts, ETag proof)
  (b) boto3:   a fresh interpreter running s3.upload_fileobj(open(FILE), ...) with the
      default TransferConfig (8 MiB parts, 10 threads)
Every side is timed as a whole process (interpreter start and imports included, as
for drtool); as "in-process" the python baselines also report their upload call, and
drtool its leg's duration_s (store client, upload, read-back, manifest). Every
upload goes to a fresh key and is deleted (untimed, with a client) right after its
timing, so fake-gcs-server's memory does not grow. The servers are started once per
store and never restarted. Rounds are order-balanced (an even number; each round's
order is the previous one's reversed, rotating which side leads), each side preceded
by sync + a pause. MB = MiB; MB/s = file size / wall seconds of the process.

fake-gcs-server recomputes MD5 and CRC32C over the whole object received so far on
every chunk of a resumable upload (fakestorage/upload.go), so its cost grows with
(object size)^2 / chunk size: small chunks (drtool's 16 MiB default) are billed far
more there than on real GCS, where a chunk costs the same wherever it falls. Compare
--part-size-mb 128 to see how much of a gap is the emulator's.

Reported per store: per-round times and MB/s, the medians, and the ratio drtool MB/s
/ the faster baseline's MB/s (the baseline with the higher median; per-round ratios
summarised by median and geometric mean; target >= 1.0). Then drtool's peak RSS
(VmHWM of the drtool Python process, polled from /proc) for each of --rss-sizes
(target: flat, <= 150 MB). The python baselines' peak RSS is shown for comparison;
gcloud's is not measured (its PID is a shell wrapper that starts Python).

    .venv/bin/python bench/upload_throughput.py [--size-mb 1024] [--rounds 4]
        [--rss-sizes 100,1024,2048] [--stores gcs,s3] [--part-size-mb N] [--workdir DIR]
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
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from services.fakegcs import FakeGcs, FakeGcsUnavailable  # noqa: E402
from services.seaweedfs import SeaweedFS, SeaweedFSUnavailable  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from backup_overhead import timed_process  # noqa: E402  (one timed, RSS-polled runner for every benchmark)

MiB = 1 << 20
CHUNK = 8 * MiB
RSS_TARGET_MB = 150
VAR_TMP = Path("/var/tmp")
S3_KEY_ENV, S3_SECRET_ENV = "BENCH_S3_KEY", "BENCH_S3_SECRET"

# the python baselines: a fresh interpreter each, printing its own timings as JSON
GCS_SCRIPT = """\
import json, sys, time
t0 = time.perf_counter()
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
endpoint, bucket, key, path = sys.argv[1:5]
client = storage.Client(project="bench", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
blob = client.bucket(bucket).blob(key)
t1 = time.perf_counter()
blob.upload_from_filename(path)
t2 = time.perf_counter()
print(json.dumps({"setup_s": t1 - t0, "upload_s": t2 - t1}))
"""
S3_SCRIPT = """\
import json, sys, time
t0 = time.perf_counter()
import boto3
from botocore.config import Config
endpoint, bucket, key, path = sys.argv[1:5]
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=Config(s3={"addressing_style": "path"}))
t1 = time.perf_counter()
with open(path, "rb") as f:
    s3.upload_fileobj(f, bucket, key)
t2 = time.perf_counter()
print(json.dumps({"setup_s": t1 - t0, "upload_s": t2 - t1}))
"""


def make_file(path: Path, size_mb: int) -> None:
    """``size_mb`` MiB of random data (incompressible), created once; reused when it is there."""
    if path.exists() and path.stat().st_size == size_mb * MiB:
        return
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        for _ in range(size_mb * MiB // CHUNK):
            f.write(os.urandom(CHUNK))
        if size_mb * MiB % CHUNK:
            f.write(os.urandom(size_mb * MiB % CHUNK))
    tmp.rename(path)


def warm(path: Path) -> None:
    """Read the file once so that every side reads it from the page cache."""
    with open(path, "rb") as f:
        while f.read(CHUNK):
            pass


class Drtool:
    """One policy file per (store, input file): a filesystem source, one upload leg."""

    def __init__(self, work: Path, env: dict[str, str], part_size_mb: int | None = None) -> None:
        exe = Path(sys.executable).parent / "drtool"
        self.exe = str(exe if exe.exists() else ROOT / ".venv" / "bin" / "drtool")
        self.work = work
        self.upload = f"        upload: {{part_size_mb: {part_size_mb}}}\n" if part_size_mb else ""
        self.env = dict(env, DRTOOL_STATE_DIR=str(work / "state"))
        self._catalog = False

    def config(self, store: str, location: str, src: Path) -> Path:
        path = self.work / f"upload-{store}-{src.stem}.yaml"
        path.write_text(f"""\
version: 1
locations:
  nas: {{type: filesystem, media: ssd, site: home, failure_domain: host}}
{location}
    media: cloud-object
    site: offsite
    failure_domain: cloud
    immutable: false
policies:
  - name: bench
    source: {{location: nas, path: {src}}}
    rpo: 1d
    rto: 4h
    legs:
      - kind: upload
        to: offsite
        schedule: "0 3 * * *"
{self.upload}""")
        if not self._catalog:  # create the catalog once, untimed
            subprocess.run([self.exe, "-c", str(path), "runs"], env=self.env, check=True, capture_output=True)
            self._catalog = True
        return path

    def run(self, config: Path) -> tuple[float, int, dict]:
        """(wall seconds, peak RSS kB, the leg's result) of `drtool run --no-verify --json`;
        the result's ``duration_s`` is the leg's own time (lock, store client, upload, manifest)."""
        t, rss, out = timed_process([self.exe, "-c", str(config), "run", "--no-verify", "--json"], self.env, poll_rss=True)
        result = json.loads(out)["results"][0]
        assert result["phase"] == "succeeded", result
        return t, rss, result


def mbps(size_mb: int, seconds: float) -> float:
    return size_mb / seconds


def orders(sides: tuple[str, ...], rounds: int) -> list[tuple[str, ...]]:
    """Round 2k: the sides rotated by k; round 2k+1: that order reversed."""
    out = []
    for k in range(rounds // 2):
        rot = sides[k % len(sides):] + sides[:k % len(sides)]
        out += [rot, rot[::-1]]
    return out


class Sides:
    """One store's phase: drtool's location there, its baselines (each a timed process), a cleanup."""

    name: str
    baselines: tuple[str, ...]

    def drtool_location(self) -> str: ...
    def side(self, name: str, src: Path, key: str) -> tuple[float, dict]: ...
    def clean(self, prefix: str) -> int: ...


class GcsSides(Sides):
    name, baselines = "gcs", ("gcloud", "python")

    def __init__(self, server: FakeGcs, work: Path, env: dict[str, str]) -> None:
        self.server, self.bucket = server, server.make_bucket("bench-upload")
        self.client = server.client()
        cfg = work / "gcloud-config"
        cfg.mkdir(exist_ok=True)
        self.gcloud_env = dict(env, CLOUDSDK_CONFIG=str(cfg), CLOUDSDK_AUTH_DISABLE_CREDENTIALS="true",
                               CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE=server.endpoint + "/",
                               CLOUDSDK_CORE_CHECK_GCE_METADATA="false", CLOUDSDK_METRICS_ENVIRONMENT="x",
                               CLOUDSDK_STORAGE_PARALLEL_COMPOSITE_UPLOAD_ENABLED="False", CLOUDSDK_CORE_DISABLE_PROMPTS="1")
        self.env = env

    def drtool_location(self) -> str:
        return f"  offsite:\n    type: gcs\n    bucket: {self.bucket}\n    prefix: drtool\n    endpoint: {self.server.endpoint}"

    def side(self, name: str, src: Path, key: str) -> tuple[float, dict]:
        if name == "gcloud":
            t, _, _ = timed_process(["gcloud", "storage", "cp", str(src), f"gs://{self.bucket}/{key}"], self.gcloud_env, poll_rss=False)
            return t, {}
        t, rss, out = timed_process([sys.executable, "-c", GCS_SCRIPT, self.server.endpoint, self.bucket, key, str(src)],
                                    self.env, poll_rss=True)
        return t, dict(json.loads(out.strip().splitlines()[-1]), rss_kb=rss)

    def clean(self, prefix: str) -> int:
        blobs = list(self.client.list_blobs(self.bucket, prefix=prefix, retry=self.server.retry))
        for b in blobs:
            b.delete(retry=self.server.retry, timeout=60)
        return sum(int(b.size or 0) for b in blobs)


class S3Sides(Sides):
    name, baselines = "s3", ("boto3",)

    def __init__(self, server: SeaweedFS, env: dict[str, str]) -> None:
        self.server, self.bucket = server, server.make_bucket("bench-upload")
        self.client = server.client(read_timeout=120)
        self.env = dict(env, AWS_ACCESS_KEY_ID=server.access_key, AWS_SECRET_ACCESS_KEY=server.secret_key)
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            self.env.pop(k, None)

    def drtool_location(self) -> str:
        return (f"  offsite:\n    type: s3\n    bucket: {self.bucket}\n    prefix: drtool\n    endpoint: {self.server.endpoint}\n"
                f"    region: us-east-1\n    access_key_id: {{env: {S3_KEY_ENV}}}\n    secret_access_key: {{env: {S3_SECRET_ENV}}}")

    def side(self, name: str, src: Path, key: str) -> tuple[float, dict]:
        t, rss, out = timed_process([sys.executable, "-c", S3_SCRIPT, self.server.endpoint, self.bucket, key, str(src)],
                                    self.env, poll_rss=True)
        return t, dict(json.loads(out.strip().splitlines()[-1]), rss_kb=rss)

    def clean(self, prefix: str) -> int:
        size = 0
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                self.client.delete_object(Bucket=self.bucket, Key=obj["Key"])
                size += obj["Size"]
        return size


def phase(store: Sides, drtool: Drtool, main_file: Path, size_mb: int, rss_files: dict[int, Path],
          args: argparse.Namespace) -> dict:
    """One store: a warm-up, the timed rounds, then the RSS series. Returns the summary rows."""
    configs = {p: drtool.config(store.name, store.drtool_location(), p) for p in {main_file, *rss_files.values(), args.small}}

    def settle() -> None:
        os.sync()
        time.sleep(max(args.pause, 1.1))  # >= 1.1 s also keeps drtool's per-second point ids apart

    def one(side: str, src: Path, tag: str) -> dict:
        settle()
        if side == "drtool":
            t, rss, res = drtool.run(configs[src])
            stored = store.clean("drtool/")
            row = {"s": t, "rss_kb": rss, "upload_s": res["duration_s"], "message": res["message"]}
        else:
            key = f"baseline/{side}-{tag}-{uuid.uuid4().hex[:8]}"
            t, extra = store.side(side, src, key)
            stored = store.clean(key)
            row = {"s": t, **extra}
        want = src.stat().st_size
        if side != "drtool" and stored != want:  # drtool's manifest rides along; its own checks cover its object
            raise SystemExit(f"{store.name}/{side}: {stored} bytes stored, expected {want}")
        if side == "drtool" and stored < want:
            raise SystemExit(f"{store.name}/drtool: {stored} bytes stored, expected at least {want}")
        return row

    sides = ("drtool", *store.baselines)
    for side in sides:  # warm-up, untimed: first-run costs (gcloud's config dir, .pyc, the catalog)
        one(side, args.small, "warmup")
    # and the server's: the first object of the timed size grows the server's heap (fake-gcs-server holds
    # objects in memory, appending every request's body), which made whichever side went first ~2x slower
    one(store.baselines[0], main_file, "warmup-server")

    rows = []
    for i, order in enumerate(orders(sides, args.rounds)):
        row = {"order": order}
        for side in order:
            row[side] = one(side, main_file, f"r{i + 1}")
        rows.append(row)
        parts = []
        for side in sides:
            r = row[side]
            extra = f", in-process {r['upload_s']:.2f}s" if "upload_s" in r else ""
            extra += f", RSS {r['rss_kb'] / 1024:.0f} MB" if r.get("rss_kb") else ""
            parts.append(f"{side} {r['s']:6.2f}s {mbps(size_mb, r['s']):6.1f} MB/s{extra}")
        print(f"{store.name} round {i + 1} ({' > '.join(order)}): " + " | ".join(parts), flush=True)

    med = {s: statistics.median(mbps(size_mb, r[s]["s"]) for r in rows) for s in sides}
    faster = max(store.baselines, key=lambda s: med[s])
    ratios = [r[faster]["s"] / r["drtool"]["s"] for r in rows]  # = drtool MB/s / baseline MB/s
    best_ratios = [min(r[b]["s"] for b in store.baselines) / r["drtool"]["s"] for r in rows]

    rss_series = {}
    for mb, path in sorted(rss_files.items()):
        r = one("drtool", path, f"rss{mb}")
        t, rss = r["s"], r["rss_kb"]
        rss_series[mb] = (rss, mbps(mb, t))
        print(f"{store.name} RSS series: {mb} MB input: drtool {t:6.2f}s {mbps(mb, t):6.1f} MB/s, peak RSS {rss / 1024:.1f} MB", flush=True)
    return {"sides": sides, "rows": rows, "med": med, "faster": faster, "ratios": ratios, "best_ratios": best_ratios,
            "rss": rss_series}


def summary(store: str, s: dict, size_mb: int) -> None:
    rows, sides = s["rows"], s["sides"]
    print(f"\n== {store.upper()}: {size_mb} MB file, {len(rows)} rounds (MB/s by whole-process wall time; in-process: drtool's leg "
          "duration_s, the python baselines' upload call; MB = MiB)")
    print(f"  {'side':<8} {'median s':>9} {'median MB/s':>12} {'min..max MB/s':>16} {'in-process MB/s':>16} {'peak RSS MB':>12}")
    for side in sides:
        secs = [r[side]["s"] for r in rows]
        rates = [mbps(size_mb, t) for t in secs]
        calls = [r[side]["upload_s"] for r in rows if "upload_s" in r[side]]
        call = f"{mbps(size_mb, statistics.median(calls)):.1f}" if calls else "-"
        rss = [r[side]["rss_kb"] for r in rows if r[side].get("rss_kb")]
        rss_s = f"{max(rss) / 1024:.1f}" if rss else "-"
        print(f"  {side:<8} {statistics.median(secs):9.2f} {s['med'][side]:12.1f} {min(rates):7.1f}..{max(rates):<7.1f} {call:>16} {rss_s:>12}")
    r = s["ratios"]
    print(f"  ratio drtool MB/s / {s['faster']} MB/s (the faster baseline by median): median {statistics.median(r):.3f}, "
          f"geometric mean {statistics.geometric_mean(r):.3f} (order-balanced; target >= 1.0), min {min(r):.3f} max {max(r):.3f}")
    if len(s["med"]) > 2:
        b = s["best_ratios"]
        print(f"  ratio against the faster baseline of each round: median {statistics.median(b):.3f}, "
              f"geometric mean {statistics.geometric_mean(b):.3f}")
    firsts = {side: [x for x, row in zip(r, rows) if row["order"][0] == side] for side in sides}
    print("  median ratio by the side that went first: " + ", ".join(
        f"{side} {statistics.median(v):.3f}" for side, v in firsts.items() if v))
    if s["rss"]:
        print(f"  drtool peak RSS by input size (target flat, <= {RSS_TARGET_MB} MB): " + ", ".join(
            f"{mb} MB -> {rss / 1024:.1f} MB ({rate:.0f} MB/s)" for mb, (rss, rate) in sorted(s["rss"].items())))


def wait_for_quiet(patterns: tuple[str, ...], poll_s: float = 30.0) -> None:
    """Other benchmarks share this machine: wait until none of them runs."""
    me = os.getpid()
    announced = False
    while True:
        busy = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == me:
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if any(p in cmd for p in patterns):
                busy.append(f"{d.name}: {cmd.strip()[:100]}")
        if not busy:
            return
        if not announced:
            print("waiting for other benchmarks to finish: " + "; ".join(busy), flush=True)
            announced = True
        time.sleep(poll_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1024, help="the file of the timed rounds (MiB)")
    ap.add_argument("--rounds", type=int, default=4, help="rounded up to an even number (order-balanced)")
    ap.add_argument("--rss-sizes", default="100,1024,2048", help="input sizes (MiB) of drtool's peak-RSS series; empty: none")
    ap.add_argument("--stores", default="gcs,s3", help="gcs, s3 or both")
    ap.add_argument("--part-size-mb", type=int, default=None,
                    help="the leg's upload.part_size_mb (default: not set, i.e. drtool's default of 16)")
    ap.add_argument("--pause", type=float, default=2.0, help="seconds of idle (after sync) before each timed side")
    ap.add_argument("--workdir", default=None, help="where the input files, policies and drtool state go "
                    "(default: a temp dir under /var/tmp, removed at the end; a given one is kept and its files reused)")
    ap.add_argument("--wait-for", default="parity_overhead.py,zfs_replication.py",
                    help="command-line substrings of other benchmarks to wait for before measuring ('' = none)")
    args = ap.parse_args()
    args.rounds += args.rounds % 2
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    rss_sizes = [int(x) for x in args.rss_sizes.split(",") if x.strip()]

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (servers, temp dir) on kill, too
    work = Path(args.workdir or tempfile.mkdtemp(prefix="drtool-ubench-", dir=VAR_TMP))
    work.mkdir(parents=True, exist_ok=True)
    try:
        files = {}
        for mb in sorted({args.size_mb, *rss_sizes}):
            path = work / f"input-{mb}m.bin"
            t0 = time.perf_counter()
            make_file(path, mb)
            files[mb] = path
            print(f"input {path}: {mb} MiB random ({time.perf_counter() - t0:.1f}s)", flush=True)
        args.small = work / "input-warmup.bin"
        args.small.write_bytes(os.urandom(MiB))
        patterns = tuple(p for p in args.wait_for.split(",") if p)
        if patterns:
            wait_for_quiet(patterns)
        for p in files.values():
            warm(p)
        gver = subprocess.run(["gcloud", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        import boto3
        import google.cloud.storage as gcs_lib
        print(f"{gver}; google-cloud-storage {gcs_lib.__version__}; boto3 {boto3.__version__}; {os.cpu_count()} cores; "
              f"{args.rounds} rounds of {args.size_mb} MB; RSS series {rss_sizes}; stores {stores}; drtool part size "
              f"{args.part_size_mb or 'default (16)'} MiB", flush=True)

        env = dict(os.environ)
        drtool = Drtool(work, env, args.part_size_mb)
        results = {}
        main_file = files[args.size_mb]
        rss_files = {mb: files[mb] for mb in rss_sizes}
        if "gcs" in stores:
            try:
                with FakeGcs() as server:
                    results["gcs"] = phase(GcsSides(server, work, env), drtool, main_file, args.size_mb, rss_files, args)
            except FakeGcsUnavailable as e:
                print(f"gcs skipped: {e}", flush=True)
        if "s3" in stores:
            try:
                with SeaweedFS() as server:
                    drtool.env.update({S3_KEY_ENV: server.access_key, S3_SECRET_ENV: server.secret_key})
                    results["s3"] = phase(S3Sides(server, env), drtool, main_file, args.size_mb, rss_files, args)
            except SeaweedFSUnavailable as e:
                print(f"s3 skipped: {e}", flush=True)
        for name, s in results.items():
            summary(name, s, args.size_mb)
    finally:
        if args.workdir:
            print(f"kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
