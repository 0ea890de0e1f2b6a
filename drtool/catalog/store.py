"""The :class:`Catalog`: a small, session-per-call facade over the catalog DB.

Design rules:

* Every public method opens a short session, commits (for writes) and returns
  *detached* ORM objects (``expire_on_commit=False``), so callers never hold a
  session or a database lock.
* Time is always passed in (``now``, ``started_at`` ...); the catalog never
  reads the clock.  Naive datetimes are rejected.
* On SQLite, SQLAlchemy (not the ``sqlite3`` module) emits ``BEGIN``; writes use
  ``BEGIN IMMEDIATE`` so concurrent drtool processes serialize on the write
  lock up front (waiting up to the 30 s busy timeout) instead of failing when a
  read transaction is upgraded.  The database runs in WAL mode, synchronous=NORMAL.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import socket
import sqlite3
import time
import uuid as uuidlib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from enum import Enum
from pathlib import Path, PurePath
from typing import Any

from sqlalchemy import ColumnElement, create_engine, event, exists, select, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.pool import StaticPool

from .models import (
    RUN_KINDS,
    VERIFICATION_LEVELS,
    RecoveryPointRow,
    Run,
    RunPhase,
    Verification,
)
from ..paths import default_catalog_url

__all__ = ["Catalog", "MIGRATIONS_DIR", "alembic_config"]

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
# The newest migration. Opening a catalog already at this revision skips Alembic
# entirely (importing and running it costs ~0.35 s per command); a test asserts
# this matches Alembic's own head, so a new migration cannot forget to bump it.
HEAD_REVISION = "0001"

SQLITE_BUSY_TIMEOUT_S = 30

# Execution option marking a connection whose transaction will write.
_WRITE_OPT = "drtool_write"
# Arbitrary constant key for the PostgreSQL advisory lock taken while migrating.
_PG_MIGRATION_LOCK_KEY = 0x64727431  # "drt1"


# --------------------------------------------------------------------------- #
# helpers


def _json_default(o: Any) -> Any:
    if isinstance(o, (dt.datetime, dt.date, dt.time)):
        return o.isoformat()
    if isinstance(o, Enum):
        return o.value
    if isinstance(o, PurePath):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o, key=str)
    if isinstance(o, bytes):
        return o.decode("utf-8", "backslashreplace")
    raise TypeError(f"object of type {type(o).__name__} is not JSON serializable")


def _json_dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default)


def _jsonable(obj: Any) -> Any:
    """``obj`` as it will read back from a JSON column (datetimes -> ISO strings ...)."""
    return json.loads(_json_dumps(obj))


def _aware(value: dt.datetime, name: str) -> dt.datetime:
    if not isinstance(value, dt.datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value!r}")
    return value.astimezone(dt.timezone.utc)


def _eq(column: Any, value: Any) -> ColumnElement[bool]:
    """``column = value``, or ``column IS NULL`` for ``None``."""
    return column.is_(None) if value is None else column == value


def _check_level(level: str) -> str:
    if level not in VERIFICATION_LEVELS:
        raise ValueError(
            f"unknown verification level {level!r}; "
            f"expected one of {', '.join(VERIFICATION_LEVELS)}"
        )
    return level


def levels_at_least(level: str) -> tuple[str, ...]:
    """The verification levels as deep as ``level`` or deeper."""
    return VERIFICATION_LEVELS[VERIFICATION_LEVELS.index(_check_level(level)) :]


def _point_mapping(p: Any) -> Mapping[str, Any]:
    if isinstance(p, Mapping):
        return p
    if dataclasses.is_dataclass(p) and not isinstance(p, type):
        return dataclasses.asdict(p)
    dump = getattr(p, "model_dump", None)  # pydantic models
    if callable(dump):
        return dump()
    raise TypeError(f"recovery point must be a mapping, got {type(p).__name__}")


def alembic_config(connection: Connection | None = None) -> Any:
    """An Alembic ``Config`` for the packaged migrations (no alembic.ini)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _sqlite_database(url: str) -> str | None:
    """The file path of a file-backed SQLite URL, else ``None``."""
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return None
    db = u.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return db


def _enable_wal(dbapi_conn: Any) -> None:
    """Switch a SQLite file to WAL mode (persistent; a no-op once done).

    Changing the journal mode can fail with "database is locked" *without*
    going through the busy handler when several processes race to do it on a
    fresh file, so retry until the busy timeout.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    delay = 0.01
    while True:
        try:
            mode = dbapi_conn.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                dbapi_conn.execute("PRAGMA journal_mode=WAL").fetchone()
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            if time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


def _make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(u, pool_pre_ping=True, json_serializer=_json_dumps)

    db = _sqlite_database(url)
    if db is not None:
        Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            u,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S},
            json_serializer=_json_dumps,
        )
    else:  # in-memory: one shared connection, or each checkout sees an empty DB
        engine = create_engine(
            u,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False},
            poolclass=StaticPool,
            json_serializer=_json_dumps,
        )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
        # Let SQLAlchemy emit BEGIN (see module docstring).
        dbapi_conn.isolation_level = None
        if db is not None:
            _enable_wal(dbapi_conn)
            # A commit appends to the WAL without an fsync (checkpoints still sync): on ext4 an fsync
            # also waits for every other process's freshly written data (data=ordered), so right after
            # restic, SeaweedFS or a restore wrote a GB, one commit cost ~1 s. The database stays
            # consistent; a power cut (not a crash of drtool) can lose the last records: a run then
            # looks missing or unfinished (closed as interrupted), never better than it was (docs/concepts.md).
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")
        dbapi_conn.execute("PRAGMA foreign_keys=ON")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(_WRITE_OPT):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

    return engine


# --------------------------------------------------------------------------- #
# the catalog


class Catalog:
    """Runs, recovery points and verifications, stored via SQLAlchemy.

    Use :meth:`open` (which migrates the schema) rather than the constructor.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessionmaker = sessionmaker(engine, expire_on_commit=False)

    # -- lifecycle ---------------------------------------------------------- #

    @classmethod
    def open(cls, url: str | None = None, *, upgrade: bool = True) -> Catalog:
        """Open the catalog at ``url`` (default :func:`default_catalog_url`).

        Creates the parent directory of a SQLite file and, unless
        ``upgrade=False``, runs ``alembic upgrade head`` (idempotent, safe
        against concurrent openers).
        """
        catalog = cls(_make_engine(url or default_catalog_url()))
        if upgrade and catalog._stored_revision() != HEAD_REVISION:
            try:
                catalog.upgrade()
            except BaseException:
                catalog.close()
                raise
        return catalog

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def upgrade(self, revision: str = "head") -> None:
        """Migrate the schema to ``revision`` in one locked transaction."""
        with self.engine.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                # Batch migrations recreate tables; with FKs enforced, dropping
                # the old table would fire ON DELETE actions.  The pragma is a
                # no-op inside a transaction, so set it on the raw connection.
                raw = conn.connection.driver_connection
                raw.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
            try:
                conn.execution_options(**{_WRITE_OPT: True})
                with conn.begin():
                    if conn.dialect.name == "postgresql":
                        conn.execute(
                            text("SELECT pg_advisory_xact_lock(:k)"),
                            {"k": _PG_MIGRATION_LOCK_KEY},
                        )
                    from alembic import command

                    command.upgrade(alembic_config(conn), revision)
            finally:
                if sqlite:
                    raw.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]

    def _stored_revision(self) -> str | None:
        """The schema revision recorded in the DB, without importing Alembic."""
        try:
            with self.engine.connect() as conn:
                return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except DBAPIError:
            return None  # a new database: no alembic_version table yet

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    @staticmethod
    def head_revision() -> str | None:
        from alembic.script import ScriptDirectory

        return ScriptDirectory.from_config(alembic_config()).get_current_head()

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Catalog({self.url!r})"

    @contextmanager
    def _session(self, *, write: bool = False) -> Iterator[Session]:
        with self._sessionmaker() as session:
            if write:
                session.connection(execution_options={_WRITE_OPT: True})
            yield session
            if write:
                session.commit()

    # -- runs --------------------------------------------------------------- #

    def start_run(
        self,
        kind: str,
        *,
        policy: str | None = None,
        leg: str | None = None,
        leg_kind: str | None = None,
        location: str | None = None,
        dry_run: bool = False,
        now: dt.datetime,
        detail: Mapping[str, Any] | None = None,
    ) -> Run:
        """Record a new run in phase ``running`` and return it (detached)."""
        if kind not in RUN_KINDS:
            raise ValueError(f"unknown run kind {kind!r}; expected one of {sorted(RUN_KINDS)}")
        run = Run(
            uuid=str(uuidlib.uuid4()),
            kind=kind,
            policy=policy,
            leg=leg,
            leg_kind=leg_kind,
            location=location,
            phase=RunPhase.running.value,
            dry_run=bool(dry_run),
            started_at=_aware(now, "now"),
            ended_at=None,
            bytes_processed=None,
            recovery_point=None,
            warnings=[],
            errors=[],
            command_log=[],
            detail=_jsonable(dict(detail or {})),
            host=socket.gethostname(),
            pid=os.getpid(),
        )
        with self._session(write=True) as s:
            s.add(run)
        return run

    def finish_run(
        self,
        run: Run | int,
        phase: RunPhase | str,
        *,
        now: dt.datetime,
        bytes_processed: int | None = None,
        recovery_point: str | None = None,
        warnings: Iterable[str] = (),
        errors: Iterable[str] = (),
        command_log: Iterable[Mapping[str, Any]] = (),
        detail: Mapping[str, Any] | None = None,
    ) -> Run:
        """Close ``run`` with a terminal ``phase``.

        ``warnings``/``errors``/``command_log`` are appended to what the run
        already has; ``detail`` is merged into the existing dict;
        ``bytes_processed``/``recovery_point`` are only set when given.  The
        passed ``Run`` object is updated in place and the fresh row returned.
        """
        phase = RunPhase(phase)
        if not phase.terminal:
            raise ValueError(f"finish_run needs a terminal phase, got {phase.value!r}")
        ended_at = _aware(now, "now")
        run_id = run if isinstance(run, int) else run.id
        with self._session(write=True) as s:
            row = s.get(Run, run_id)
            if row is None:
                raise LookupError(f"no run with id {run_id}")
            row.phase = phase.value
            row.ended_at = ended_at
            if bytes_processed is not None:
                row.bytes_processed = int(bytes_processed)
            if recovery_point is not None:
                row.recovery_point = str(recovery_point)
            row.warnings = [*(row.warnings or []), *(str(w) for w in warnings)]
            row.errors = [*(row.errors or []), *(str(e) for e in errors)]
            row.command_log = [*(row.command_log or []), *_jsonable([dict(c) for c in command_log])]
            if detail:
                row.detail = {**(row.detail or {}), **_jsonable(dict(detail))}
        if isinstance(run, Run) and run is not row:
            for attr in (
                "phase", "ended_at", "bytes_processed", "recovery_point",
                "warnings", "errors", "command_log", "detail",
            ):
                set_committed_value(run, attr, getattr(row, attr))
        return row

    def get_run(self, ident: int | str) -> Run | None:
        """A run by integer id or by uuid."""
        with self._session() as s:
            if isinstance(ident, int):
                return s.get(Run, ident)
            return s.scalars(select(Run).where(Run.uuid == ident)).one_or_none()

    def runs(
        self,
        policy: str | None = None,
        kind: str | None = None,
        limit: int | None = 50,
        *,
        leg: str | None = None,
    ) -> list[Run]:
        """Runs, newest first (by ``started_at``).  ``None`` filters match all."""
        q = select(Run)
        if policy is not None:
            q = q.where(Run.policy == policy)
        if kind is not None:
            q = q.where(Run.kind == kind)
        if leg is not None:
            q = q.where(Run.leg == leg)
        q = q.order_by(Run.started_at.desc(), Run.id.desc())
        if limit is not None:
            q = q.limit(limit)
        with self._session() as s:
            return list(s.scalars(q))

    def last_run(
        self,
        policy: str | None,
        leg: str | None,
        phase: RunPhase | str | Iterable[RunPhase | str] | None = None,
        *,
        kind: str | None = None,
    ) -> Run | None:
        """The newest run of ``policy``/``leg`` (``None`` matches NULL),
        optionally restricted to one phase or a collection of phases."""
        q = select(Run).where(_eq(Run.policy, policy), _eq(Run.leg, leg))
        if phase is not None:
            if isinstance(phase, str):
                q = q.where(Run.phase == RunPhase(phase).value)
            else:
                q = q.where(Run.phase.in_([RunPhase(p).value for p in phase]))
        if kind is not None:
            q = q.where(Run.kind == kind)
        q = q.order_by(Run.started_at.desc(), Run.id.desc()).limit(1)
        with self._session() as s:
            return s.scalars(q).first()

    # -- verifications ------------------------------------------------------ #

    def record_verification(
        self,
        *,
        location: str,
        point_id: str,
        level: str,
        ok: bool,
        started_at: dt.datetime,
        ended_at: dt.datetime,
        policy: str | None = None,
        leg: str | None = None,
        run: Run | int | None = None,
        detail: Mapping[str, Any] | None = None,
        message: str = "",
    ) -> Verification:
        row = Verification(
            run_id=run.id if isinstance(run, Run) else run,
            policy=policy,
            leg=leg,
            location=location,
            point_id=str(point_id),
            level=_check_level(level),
            ok=bool(ok),
            started_at=_aware(started_at, "started_at"),
            ended_at=_aware(ended_at, "ended_at"),
            detail=_jsonable(dict(detail or {})),
            message=message or "",
        )
        with self._session(write=True) as s:
            s.add(row)
        return row

    def last_verification(
        self,
        policy: str | None,
        leg: str | None,
        *,
        location: str | None = None,
        level_at_least: str | None = None,
    ) -> Verification | None:
        """The newest (by ``ended_at``) verification of ``policy``/``leg``.

        Without ``level_at_least`` any outcome at any level counts; with it,
        only *ok* verifications at that level or deeper
        (exists < integrity < sample < full).
        """
        q = select(Verification).where(_eq(Verification.policy, policy), _eq(Verification.leg, leg))
        if location is not None:
            q = q.where(Verification.location == location)
        if level_at_least is not None:
            q = q.where(Verification.ok, Verification.level.in_(levels_at_least(level_at_least)))
        q = q.order_by(Verification.ended_at.desc(), Verification.id.desc()).limit(1)
        with self._session() as s:
            return s.scalars(q).first()

    def verifications(
        self,
        *,
        policy: str | None = None,
        leg: str | None = None,
        location: str | None = None,
        point_id: str | None = None,
        limit: int | None = 50,
    ) -> list[Verification]:
        """Verifications, newest first.  ``None`` filters match all."""
        q = select(Verification)
        for col, val in (
            (Verification.policy, policy),
            (Verification.leg, leg),
            (Verification.location, location),
            (Verification.point_id, point_id),
        ):
            if val is not None:
                q = q.where(col == val)
        q = q.order_by(Verification.ended_at.desc(), Verification.id.desc())
        if limit is not None:
            q = q.limit(limit)
        with self._session() as s:
            return list(s.scalars(q))

    def last_successful_verified_point(
        self,
        location: str,
        policy: str | None = None,
        *,
        level_at_least: str | None = None,
        exclude_gone: bool = True,
    ) -> str | None:
        """``point_id`` of the newest ok verification at ``location``.

        Meant for pinning against prune.  With ``exclude_gone`` (default),
        points the inventory cache knows to be gone are skipped, so the pin
        falls back to the newest verified point that may still exist.
        Points never seen by :meth:`upsert_points` are not excluded.
        """
        V, P = Verification, RecoveryPointRow
        q = select(V.point_id).where(V.location == location, V.ok)
        if policy is not None:
            q = q.where(V.policy == policy)
        if level_at_least is not None:
            q = q.where(V.level.in_(levels_at_least(level_at_least)))
        if exclude_gone:
            q = q.where(
                ~exists().where(
                    P.location == V.location,
                    P.point_id == V.point_id,
                    P.gone_at.is_not(None),
                )
            )
        q = q.order_by(V.ended_at.desc(), V.id.desc()).limit(1)
        with self._session() as s:
            return s.scalars(q).first()

    # -- recovery points (inventory cache) ----------------------------------- #

    def upsert_points(
        self,
        location: str,
        points: Iterable[Mapping[str, Any]],
        *,
        now: dt.datetime,
    ) -> dict[str, int]:
        """Sync the cached inventory of ``location`` with a fresh listing.

        Each point is a mapping with ``point_id`` and optionally ``policy``,
        ``leg``, ``time`` (required for new points), ``size_bytes``,
        ``checksum``, ``meta``.  Keys that are absent leave stored values
        unchanged.  Rows of ``location`` missing from ``points`` get
        ``gone_at=now`` (once); rows that reappear get it cleared.

        Returns counts: ``inserted``, ``updated`` (seen again, including
        reappeared), ``reappeared``, ``gone`` (newly marked) and ``seen``.
        """
        now = _aware(now, "now")
        incoming: dict[str, Mapping[str, Any]] = {}
        for p in points:
            m = _point_mapping(p)
            if m.get("point_id") in (None, ""):
                raise ValueError(f"recovery point without point_id: {m!r}")
            incoming[str(m["point_id"])] = m

        for attempt in range(2):  # retry once on a concurrent insert (PostgreSQL)
            try:
                return self._upsert_points(location, incoming, now)
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _upsert_points(
        self, location: str, incoming: Mapping[str, Mapping[str, Any]], now: dt.datetime
    ) -> dict[str, int]:
        counts = dict(inserted=0, updated=0, reappeared=0, gone=0, seen=len(incoming))
        with self._session(write=True) as s:
            existing = {
                r.point_id: r
                for r in s.scalars(
                    select(RecoveryPointRow).where(RecoveryPointRow.location == location)
                )
            }
            for pid, p in incoming.items():
                row = existing.get(pid)
                if row is None:
                    if p.get("time") is None:
                        raise ValueError(f"new recovery point {pid!r} at {location!r} has no time")
                    s.add(
                        RecoveryPointRow(
                            location=location,
                            point_id=pid,
                            policy=p.get("policy"),
                            leg=p.get("leg"),
                            time=_aware(p["time"], "time"),
                            size_bytes=p.get("size_bytes"),
                            checksum=p.get("checksum"),
                            meta=_jsonable(dict(p.get("meta") or {})),
                            first_seen=now,
                            last_seen=now,
                            gone_at=None,
                        )
                    )
                    counts["inserted"] += 1
                    continue
                for key in ("policy", "leg", "size_bytes", "checksum"):
                    if key in p:
                        setattr(row, key, p[key])
                if p.get("time") is not None:
                    row.time = _aware(p["time"], "time")
                if "meta" in p:
                    row.meta = _jsonable(dict(p["meta"] or {}))
                row.last_seen = now
                if row.gone_at is not None:
                    row.gone_at = None
                    counts["reappeared"] += 1
                counts["updated"] += 1
            for pid, row in existing.items():
                if pid not in incoming and row.gone_at is None:
                    row.gone_at = now
                    counts["gone"] += 1
        return counts

    def points(
        self,
        location: str | None = None,
        policy: str | None = None,
        include_gone: bool = False,
        *,
        leg: str | None = None,
    ) -> list[RecoveryPointRow]:
        """Cached recovery points, newest first (by ``time``)."""
        q = select(RecoveryPointRow)
        if location is not None:
            q = q.where(RecoveryPointRow.location == location)
        if policy is not None:
            q = q.where(RecoveryPointRow.policy == policy)
        if leg is not None:
            q = q.where(RecoveryPointRow.leg == leg)
        if not include_gone:
            q = q.where(RecoveryPointRow.gone_at.is_(None))
        q = q.order_by(
            RecoveryPointRow.time.desc(), RecoveryPointRow.location, RecoveryPointRow.point_id
        )
        with self._session() as s:
            return list(s.scalars(q))
