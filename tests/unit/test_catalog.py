"""Unit tests for drtool.catalog.

Tests taking the ``db_url``/``cat`` fixtures run twice: on SQLite (a file in a
temp dir) and on a real PostgreSQL server (a fresh database per test on the
session's throwaway server, see tests/services/postgres.py).  Tests about
SQLite specifics (in-memory URLs, the state-dir default URL) stay SQLite-only.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, String, create_engine, inspect

from drtool.catalog import (
    Catalog,
    RecoveryPointRow,
    Run,
    RunPhase,
    Verification,
    default_catalog_url,
    state_dir,
)
from drtool.catalog.models import Base
from drtool.catalog.store import alembic_config

UTC = dt.timezone.utc
T0 = dt.datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
CEST = dt.timezone(dt.timedelta(hours=2))


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path):
    """An empty catalog database: a SQLite file path, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state' / 'catalog.sqlite3'}"
        return
    server = request.getfixturevalue("postgres_server")
    url = server.create_database()
    yield url
    server.drop_database(url)


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


@pytest.fixture
def cat(db_url: str):
    c = Catalog.open(db_url)
    yield c
    c.close()


# --------------------------------------------------------------------------- #
# schema / migrations


def test_open_creates_schema_and_is_idempotent(tmp_path: Path, db_url: str) -> None:
    db_file = tmp_path / "state" / "catalog.sqlite3"
    if _is_sqlite(db_url):
        assert not db_file.parent.exists()
    else:  # PostgreSQL: the database exists but is empty
        with Catalog(create_engine(db_url)) as empty:
            assert inspect(empty.engine).get_table_names() == []
    c1 = Catalog.open(db_url)
    try:
        if _is_sqlite(db_url):
            assert db_file.exists()
        assert c1.current_revision() == Catalog.head_revision() == "0001"
        r = c1.start_run("leg", policy="p", leg="l", now=T0)
    finally:
        c1.close()

    c2 = Catalog.open(db_url)  # second open: no error, data kept
    try:
        assert c2.current_revision() == "0001"
        assert [x.uuid for x in c2.runs()] == [r.uuid]
        tables = set(inspect(c2.engine).get_table_names())
        assert {"runs", "recovery_points", "verifications", "alembic_version"} <= tables
    finally:
        c2.close()

    if _is_sqlite(db_url):
        with sqlite3.connect(db_file) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        c3 = Catalog.open(db_url)  # drtool's own connections commit without an fsync (WAL, synchronous=NORMAL)
        try:
            with c3.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1
        finally:
            c3.close()


def test_migration_matches_models(cat: Catalog) -> None:
    """The hand-written migration must produce exactly the models' schema."""
    with cat.engine.connect() as conn:
        mc = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        diffs = compare_metadata(mc, Base.metadata)
        assert diffs == [], f"migration drifted from models: {diffs}"
        # The comparison is not vacuous: it sees missing tables and column drift.
        assert len(compare_metadata(mc, MetaData())) >= 3
        drifted = MetaData(naming_convention=Base.metadata.naming_convention)
        for table in Base.metadata.sorted_tables:
            table.to_metadata(drifted)
        drifted.tables["runs"].append_column(Column("extra", Integer))
        drifted.tables["verifications"].c.level.type = String(64)
        diffs = compare_metadata(mc, drifted)
        kinds = sorted(d[0][0] if isinstance(d, list) else d[0] for d in diffs)
        assert kinds == ["add_column", "modify_type"]


def test_migration_downgrade_and_upgrade_again(cat: Catalog) -> None:
    with cat.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    assert not {"runs", "recovery_points", "verifications"} & set(
        inspect(cat.engine).get_table_names()
    )
    assert cat.current_revision() is None
    cat.upgrade()
    assert cat.current_revision() == "0001"
    cat.start_run("prune", now=T0)


def test_in_memory_catalog() -> None:
    with Catalog.open("sqlite://") as c:
        c.start_run("verify", now=T0)
        assert len(c.runs()) == 1


# --------------------------------------------------------------------------- #
# runs


def test_run_lifecycle_round_trip(cat: Catalog, db_url: str) -> None:
    run = cat.start_run(
        "leg",
        policy="home",
        leg="nightly",
        leg_kind="backup",
        location="nas",
        dry_run=True,
        now=T0.astimezone(CEST),  # non-UTC aware input is normalised to UTC
    )
    assert isinstance(run, Run)
    assert run.id is not None and len(run.uuid) == 36
    assert run.phase == RunPhase.running
    assert run.host and run.pid > 0
    assert run.started_at == T0 and run.started_at.tzinfo == UTC

    done = cat.finish_run(
        run,
        RunPhase.partially_failed,
        now=at(5),
        bytes_processed=5 * 2**40,  # > 32 bit
        recovery_point="snap-1",
        warnings=["w1"],
        errors=["e1", "e2"],
        command_log=[{"argv": ["restic", "backup", "***"], "returncode": 3, "duration_s": 1.5}],
        detail={"files": 10, "when": at(1)},
    )
    # the caller's object is updated in place too
    assert run.phase == done.phase == "partially_failed"
    assert run.ended_at == at(5)

    with Catalog.open(db_url) as other:  # fresh engine: real round trip
        (got,) = other.runs()
        assert got.uuid == run.uuid
        assert got.run_phase is RunPhase.partially_failed
        assert got.kind == "leg" and got.policy == "home" and got.leg == "nightly"
        assert got.leg_kind == "backup" and got.location == "nas" and got.dry_run is True
        assert got.started_at == T0 and got.started_at.tzinfo == UTC
        assert got.ended_at == at(5) and got.ended_at.tzinfo == UTC
        assert got.duration_s == 300
        assert got.bytes_processed == 5 * 2**40
        assert got.recovery_point == "snap-1"
        assert got.warnings == ["w1"] and got.errors == ["e1", "e2"]
        assert got.command_log == [
            {"argv": ["restic", "backup", "***"], "returncode": 3, "duration_s": 1.5}
        ]
        assert got.detail == {"files": 10, "when": at(1).isoformat()}
        assert other.get_run(run.uuid).id == run.id
        assert other.get_run(run.id).uuid == run.uuid


def test_finish_run_rejects_non_terminal_phase_and_naive_time(cat: Catalog) -> None:
    run = cat.start_run("leg", policy="p", leg="l", now=T0)
    with pytest.raises(ValueError):
        cat.finish_run(run, "running", now=at(1))
    with pytest.raises(ValueError):
        cat.finish_run(run, "succeeded", now=dt.datetime(2024, 5, 1, 12, 0))
    with pytest.raises(ValueError):
        cat.start_run("leg", now=dt.datetime(2024, 5, 1, 12, 0))
    with pytest.raises(ValueError):
        cat.start_run("bogus-kind", now=T0)
    with pytest.raises(LookupError):
        cat.finish_run(9999, "failed", now=at(1))


def test_runs_listing_and_last_run(cat: Catalog) -> None:
    r1 = cat.start_run("leg", policy="p", leg="a", now=at(0))
    cat.finish_run(r1, "succeeded", now=at(1))
    r2 = cat.start_run("leg", policy="p", leg="a", now=at(10))
    cat.finish_run(r2.id, "failed", now=at(11))
    r3 = cat.start_run("leg", policy="p", leg="b", now=at(20))
    cat.finish_run(r3, "skipped", now=at(20))
    r4 = cat.start_run("verify", policy="q", now=at(30))

    assert [r.id for r in cat.runs()] == [r4.id, r3.id, r2.id, r1.id]
    assert [r.id for r in cat.runs(policy="p", limit=2)] == [r3.id, r2.id]
    assert [r.id for r in cat.runs(kind="verify")] == [r4.id]
    assert [r.id for r in cat.runs(leg="a")] == [r2.id, r1.id]

    assert cat.last_run("p", "a").id == r2.id
    assert cat.last_run("p", "a", RunPhase.succeeded).id == r1.id
    assert cat.last_run("p", "a", "succeeded").id == r1.id
    assert cat.last_run("p", "a", ["succeeded", "partially_failed"]).id == r1.id
    assert cat.last_run("p", "b", "succeeded") is None
    assert cat.last_run("q", None).id == r4.id  # None matches NULL leg
    assert cat.last_run("nope", "a") is None


def test_concurrent_writers_same_file(db_url: str) -> None:
    """Several catalogs (own engines) open/migrate and write one file at once.

    On PostgreSQL the same: one fresh database, so the openers race to migrate
    it (serialized by the advisory lock in ``Catalog.upgrade``)."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(n: int) -> None:
        try:
            barrier.wait()
            with Catalog.open(db_url) as c:
                for i in range(10):
                    r = c.start_run("leg", policy="p", leg=f"w{n}", now=at(i))
                    c.finish_run(r, "succeeded", now=at(i + 1))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    with Catalog.open(db_url) as c:
        runs = c.runs(limit=None)
        assert len(runs) == 40
        assert all(r.phase == "succeeded" for r in runs)


# --------------------------------------------------------------------------- #
# recovery points


def _pt(pid: str, minute: float, **kw) -> dict:
    return {
        "point_id": pid,
        "policy": "home",
        "leg": "nightly",
        "time": at(minute),
        "size_bytes": 100,
        "checksum": None,
        "meta": {"tags": ["x"]},
        **kw,
    }


def test_upsert_points_marks_gone_and_reappeared(cat: Catalog) -> None:
    counts = cat.upsert_points("nas", [_pt("a", 0), _pt("b", 1)], now=at(10))
    assert counts == dict(inserted=2, updated=0, reappeared=0, gone=0, seen=2)
    cat.upsert_points("usb", [_pt("a", 0)], now=at(10))  # other location untouched below

    rows = cat.points("nas")
    assert [r.point_id for r in rows] == ["b", "a"]  # newest first
    assert all(isinstance(r, RecoveryPointRow) for r in rows)
    assert rows[0].first_seen == rows[0].last_seen == at(10)
    assert rows[0].time == at(1) and rows[0].time.tzinfo == UTC
    assert rows[0].meta == {"tags": ["x"]}

    # "a" disappears, "b" changes size, "c" is new
    counts = cat.upsert_points("nas", [_pt("b", 1, size_bytes=200), _pt("c", 2)], now=at(20))
    assert counts == dict(inserted=1, updated=1, reappeared=0, gone=1, seen=2)
    assert [r.point_id for r in cat.points("nas")] == ["c", "b"]
    all_rows = {r.point_id: r for r in cat.points("nas", include_gone=True)}
    assert all_rows["a"].gone_at == at(20) and all_rows["a"].gone
    assert all_rows["b"].size_bytes == 200 and all_rows["b"].last_seen == at(20)
    assert all_rows["b"].first_seen == at(10)
    assert [r.point_id for r in cat.points("usb")] == ["a"]  # not marked gone

    # still gone: gone_at is not bumped
    counts = cat.upsert_points("nas", [_pt("b", 1), _pt("c", 2)], now=at(30))
    assert counts["gone"] == 0
    assert {r.point_id: r for r in cat.points("nas", include_gone=True)}["a"].gone_at == at(20)

    # "a" reappears
    counts = cat.upsert_points("nas", [_pt("a", 0), _pt("b", 1), _pt("c", 2)], now=at(40))
    assert counts == dict(inserted=0, updated=3, reappeared=1, gone=0, seen=3)
    a = {r.point_id: r for r in cat.points("nas")}["a"]
    assert a.gone_at is None and a.last_seen == at(40) and a.first_seen == at(10)

    # empty listing marks everything at that location gone
    assert cat.upsert_points("nas", [], now=at(50))["gone"] == 3
    assert cat.points("nas") == []
    assert {r.location for r in cat.points()} == {"usb"}
    assert [r.point_id for r in cat.points(policy="home", include_gone=True, location="nas")] == [
        "c",
        "b",
        "a",
    ]


def test_upsert_points_validation(cat: Catalog) -> None:
    with pytest.raises(ValueError):
        cat.upsert_points("nas", [{"point_id": "x"}], now=T0)  # new point without time
    with pytest.raises(ValueError):
        cat.upsert_points("nas", [{"time": T0}], now=T0)
    with pytest.raises(ValueError):
        cat.upsert_points("nas", [_pt("a", 0)], now=dt.datetime(2024, 1, 1))
    assert cat.points(include_gone=True) == []  # nothing half-written


# --------------------------------------------------------------------------- #
# verifications


def _verify(cat: Catalog, point: str, level: str, ok: bool, minute: float, **kw) -> Verification:
    kw.setdefault("policy", "home")
    kw.setdefault("leg", "nightly")
    kw.setdefault("location", "nas")
    return cat.record_verification(
        point_id=point,
        level=level,
        ok=ok,
        started_at=at(minute - 1),
        ended_at=at(minute),
        **kw,
    )


def test_last_verification_level_at_least(cat: Catalog) -> None:
    assert cat.last_verification("home", "nightly") is None
    run = cat.start_run("verify", policy="home", leg="nightly", now=at(0))
    v_full = _verify(cat, "p1", "full", True, 10, run=run, detail={"n": 1}, message="ok")
    _verify(cat, "p2", "sample", True, 20)
    _verify(cat, "p3", "integrity", True, 30)
    _verify(cat, "p4", "exists", True, 40)
    _verify(cat, "p5", "full", False, 50)  # newest, but failed
    _verify(cat, "p6", "full", True, 60, location="usb")
    _verify(cat, "p7", "full", True, 70, leg="weekly")

    newest = cat.last_verification("home", "nightly")
    assert newest.point_id == "p6" and newest.ended_at == at(60)

    def pick(level: str | None, **kw) -> str | None:
        v = cat.last_verification("home", "nightly", level_at_least=level, **kw)
        return v.point_id if v else None

    assert pick(None, location="nas") == "p5"  # any outcome without a level filter
    assert pick("exists", location="nas") == "p4"
    assert pick("integrity", location="nas") == "p3"
    assert pick("sample", location="nas") == "p2"
    assert pick("full", location="nas") == "p1"
    assert pick("full") == "p6"
    assert pick("full", location="cloud") is None
    with pytest.raises(ValueError):
        pick("bogus")

    got = cat.last_verification("home", "nightly", location="nas", level_at_least="full")
    assert got.id == v_full.id and got.run_id == run.id
    assert got.detail == {"n": 1} and got.message == "ok" and got.ok is True
    assert got.started_at == at(9) and got.ended_at.tzinfo == UTC

    assert [v.point_id for v in cat.verifications(location="usb")] == ["p6"]


def test_last_successful_verified_point(cat: Catalog) -> None:
    assert cat.last_successful_verified_point("nas") is None
    _verify(cat, "p1", "integrity", True, 10)
    _verify(cat, "p2", "exists", True, 20)
    _verify(cat, "p3", "full", False, 30)
    _verify(cat, "q1", "full", True, 40, policy="other")
    _verify(cat, "u1", "full", True, 50, location="usb")

    assert cat.last_successful_verified_point("nas") == "q1"
    assert cat.last_successful_verified_point("nas", "home") == "p2"
    assert cat.last_successful_verified_point("nas", "home", level_at_least="integrity") == "p1"
    assert cat.last_successful_verified_point("usb") == "u1"

    # a point the inventory knows to be gone is not pinned; fall back
    cat.upsert_points("nas", [_pt("p1", 0), _pt("p2", 1)], now=at(60))
    cat.upsert_points("nas", [_pt("p1", 0)], now=at(70))
    assert cat.last_successful_verified_point("nas", "home") == "p1"
    assert cat.last_successful_verified_point("nas", "home", exclude_gone=False) == "p2"


def test_record_verification_rejects_unknown_level(cat: Catalog) -> None:
    with pytest.raises(ValueError):
        _verify(cat, "p", "deep", True, 1)


# --------------------------------------------------------------------------- #
# environment


def test_state_dir_and_url_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("DRTOOL_CATALOG_URL", raising=False)
    monkeypatch.setenv("DRTOOL_STATE_DIR", str(tmp_path / "st"))
    assert state_dir() == tmp_path / "st"
    url = default_catalog_url()
    assert url == f"sqlite:///{(tmp_path / 'st' / 'catalog.sqlite3').as_posix()}"

    with Catalog.open() as c:  # default url -> creates the state dir and file
        c.start_run("leg", now=T0)
    assert (tmp_path / "st" / "catalog.sqlite3").is_file()

    other = f"sqlite:///{tmp_path / 'elsewhere' / 'x.db'}"
    monkeypatch.setenv("DRTOOL_CATALOG_URL", other)
    assert default_catalog_url() == other
    with Catalog.open() as c:
        assert c.runs() == []
    assert (tmp_path / "elsewhere" / "x.db").is_file()


def test_state_dir_default_uses_platformdirs(monkeypatch: pytest.MonkeyPatch) -> None:
    import platformdirs

    monkeypatch.delenv("DRTOOL_STATE_DIR", raising=False)
    monkeypatch.delenv("DRTOOL_CATALOG_URL", raising=False)
    expected = Path(platformdirs.user_state_dir("drtool"))
    assert state_dir() == expected
    assert default_catalog_url().endswith("/catalog.sqlite3")
    assert default_catalog_url().startswith("sqlite:///")
    monkeypatch.setenv("DRTOOL_STATE_DIR", "")  # empty counts as unset
    assert state_dir() == expected


def test_head_revision_constant_matches_alembic():
    """Catalog.open skips Alembic when the DB is at HEAD_REVISION: it must be the real head."""
    from drtool.catalog.store import HEAD_REVISION

    assert Catalog.head_revision() == HEAD_REVISION
