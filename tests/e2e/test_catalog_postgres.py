"""End-to-end: the drtool CLI with its catalog on a real PostgreSQL server.

Users set ``DRTOOL_CATALOG_URL=postgresql+psycopg://...``; the first command
creates the schema (Alembic), later ones reuse it.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

from drtool.catalog import Catalog

DRTOOL = str(Path(sys.executable).parent / "drtool")
T0 = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


def test_cli_runs_with_postgres_catalog(postgres_server, tmp_path):
    url = postgres_server.create_database()
    config = tmp_path / "policy.yaml"
    config.write_text(
        "version: 1\nlocations:\n"
        "  laptop: {type: filesystem, media: ssd, site: home, failure_domain: laptop}\n"
    )
    state = tmp_path / "state"
    # the autouse fixture removed DRTOOL_CATALOG_URL from os.environ: set it for the CLI only
    env = {**os.environ, "DRTOOL_CATALOG_URL": url, "DRTOOL_STATE_DIR": str(state)}

    def runs() -> dict:
        proc = subprocess.run([DRTOOL, "-c", str(config), "runs", "--json"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        return json.loads(proc.stdout)

    assert runs() == {"runs": []}  # first command: opens the empty database and migrates it
    with postgres_server.connect(url.rsplit("/", 1)[1]) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (Catalog.head_revision(),)
        ]
        tables = {r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"alembic_version", "runs", "recovery_points", "verifications"} <= tables

    with Catalog.open(url) as cat:  # a row written elsewhere shows up in the CLI
        run = cat.start_run("verify", policy="docs", now=T0)
        cat.finish_run(run, "succeeded", now=T0 + dt.timedelta(minutes=1))

    doc = runs()  # second command: schema at head, reused
    assert [(r["uuid"], r["phase"]) for r in doc["runs"]] == [(run.uuid, "succeeded")]
    assert not (state / "catalog.sqlite3").exists()  # nothing fell back to SQLite
    postgres_server.drop_database(url)
