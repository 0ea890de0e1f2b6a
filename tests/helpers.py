"""Builders shared by integration and e2e tests."""
from __future__ import annotations

import hashlib
import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path
from textwrap import dedent

PASSWORD = "s3cret-Pa55-for-tests-9f1c"


def make_tree(root: Path, files: int = 40, max_size: int = 64 * 1024, seed: int = 1) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        sub = root / f"d{i % 5}"
        sub.mkdir(exist_ok=True)
        (sub / f"f{i}.bin").write_bytes(rng.randbytes(rng.randint(1, max_size)))
    return root


def write_policy(path: Path, src: Path, repo_a: Path, repo_b: Path, *, password_file: Path, extra_leg: str = "", verify_a: str = "{level: sample, every: 1d, sample_files: 8}") -> Path:
    password_file.write_text(PASSWORD + "\n")
    path.write_text(dedent(f"""\
        version: 1
        locations:
          laptop: {{type: filesystem, media: ssd, site: home, failure_domain: laptop}}
          repo-a:
            type: restic
            repository: {repo_a}
            password: {{file: {password_file}}}
            init: true
            media: ssd
            site: home
            failure_domain: usb-disk
          repo-b:
            type: restic
            repository: {repo_b}
            password: {{file: {password_file}}}
            init: true
            media: hdd
            site: friend
            failure_domain: friend-nas
            offline: true
        policies:
          - name: docs
            source: {{location: laptop, path: {src}}}
            rpo: 24h
            rto: 4h
            legs:
              - kind: backup
                to: repo-a
                schedule: "0 3 * * *"
                retention: {{keep_last: 2}}
                verify: {verify_a}
              - kind: backup
                to: repo-b
                schedule: "0 4 * * *"
                verify: {{level: integrity, every: 7d, read_data_percent: 100}}
        {extra_leg}"""))
    return path


def env_with_state(state: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["DRTOOL_STATE_DIR"] = str(state)
    return env


# ------------------------------------------------------------------ ZFS end-to-end labs

DRTOOL = str(Path(sys.executable).parent / "drtool")


def zfs_cmd(*args: str) -> str:
    return subprocess.run(["zfs", *args], check=True, capture_output=True, text=True).stdout


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


class ZfsLab:
    """Two pools (source, target), a dataset with a few files, and a policy with a
    snapshot leg and a replicate leg; ``drtool()``/``json()`` run the CLI on it."""

    def __init__(self, zfs, tmp_path: Path, *, remote: str = "", file_name: str = "file{i}.txt",
                 backup_site: str = "home", snapshot_keep_last: int = 2, name: str = "zfs.yaml") -> None:
        src_pool, dst_pool = zfs.make_pool("drsrc"), zfs.make_pool("drdst")
        zfs_cmd("create", f"{src_pool}/docs")
        self.data_dir = zfs.mountpoint(src_pool) / "docs"
        self.file_name = file_name
        for i in range(5):
            (self.data_dir / file_name.format(i=i)).write_text(f"version 1 of file {i}\n" * 100)
        extra = f", {remote}" if remote else ""
        self.config = tmp_path / name
        self.config.write_text(dedent(f"""\
            version: 1
            locations:
              tank: {{type: zfs, dataset: {src_pool}{extra}, media: ssd, site: home, failure_domain: nas01}}
              backup: {{type: zfs, dataset: {dst_pool}{extra}, media: hdd, site: {backup_site}, failure_domain: backup01}}
            policies:
              - name: docs
                source: {{location: tank, dataset: {src_pool}/docs}}
                rpo: 1h
                rto: 1h
                legs:
                  - {{kind: snapshot, schedule: "@hourly", retention: {{keep_last: {snapshot_keep_last}}}, verify: {{level: integrity, every: 1d}}}}
                  - {{kind: replicate, to: backup, schedule: "@daily", retention: {{keep_last: 3}}, verify: {{level: integrity, every: 1d}}}}
            """))
        self.source, self.replica = f"{src_pool}/docs", f"{dst_pool}/docs"
        self.pools = (src_pool, dst_pool)
        self.mount = zfs.mountpoint

    def drtool(self, *args: str, check: int | None = 0) -> subprocess.CompletedProcess:
        proc = subprocess.run([DRTOOL, "-c", str(self.config), *args], capture_output=True, text=True, timeout=300)
        if check is not None:
            assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def json(self, *args: str, check: int | None = 0) -> dict:
        return json.loads(self.drtool(*args, "--json", check=check).stdout)

    def snaps(self, dataset: str) -> list[str]:
        out = zfs_cmd("list", "-H", "-t", "snapshot", "-o", "name", "-r", dataset)
        return [ln for ln in out.splitlines() if ln.startswith(dataset + "@")]


def rbd_diff_stream(size: int, writes: dict[int, bytes], *, from_snap: str | None = None, to_snap: str | None = None) -> bytes:
    """An ``rbd diff v1`` stream (the documented format: ``s`` size, ``w`` offset/length/data,
    ``e``) writing ``writes`` ({offset: data}) into an image of ``size``: fed to ``rbd
    import-diff``, it writes an image's content without a kernel ``rbd map``."""
    import struct

    out = bytearray(b"rbd diff v1\n")
    for tag, name in ((b"f", from_snap), (b"t", to_snap)):
        if name:
            out += tag + struct.pack("<I", len(name)) + name.encode()
    out += b"s" + struct.pack("<Q", size)
    for off in sorted(writes):
        out += b"w" + struct.pack("<QQ", off, len(writes[off])) + writes[off]
    return bytes(out + b"e")


def tree_state(root: Path) -> dict[str, tuple]:
    """Everything under ``root`` (symlinks not followed, ``.snap`` skipped): path ->
    ("dir", mode) | ("file", mode, mtime_ns, sha256) | ("link", target)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != ".snap")
        for name in sorted(dirnames) + sorted(filenames):
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out
