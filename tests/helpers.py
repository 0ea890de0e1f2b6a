"""Builders shared by integration and e2e tests."""
from __future__ import annotations

import os
import random
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
