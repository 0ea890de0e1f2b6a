"""SQLAlchemy models for the drtool catalog.

The catalog records *runs as data*: every execution of a leg, every
verification, prune, drill step or restore becomes a :class:`Run` row.  The
live inventory of each location is cached as :class:`RecoveryPointRow` rows and
each check of a recovery point is a :class:`Verification` row.

Only portable column types are used so the same models work on SQLite and
PostgreSQL.  Datetimes are always timezone-aware UTC in Python (see
:class:`UTCDateTime`).

The hand-written Alembic migration in ``migrations/versions`` must match these
models exactly; ``tests/unit/test_catalog.py`` checks that with
``alembic.autogenerate.compare_metadata``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    JSON,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "Base",
    "UTCDateTime",
    "RunPhase",
    "RUN_KINDS",
    "TERMINAL_PHASES",
    "VERIFICATION_LEVELS",
    "Run",
    "RecoveryPointRow",
    "Verification",
]


# Deterministic constraint names: required for Alembic batch mode on SQLite
# and so that the migration and the models name things identically.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware datetime, always UTC in Python.

    * Binding a naive datetime raises ``ValueError`` (ambiguous times are a
      bug, never silently guessed).
    * On SQLite values are stored as naive UTC (SQLite has no time zone
      support), which also keeps lexical and chronological order identical.
    * On PostgreSQL the column is ``TIMESTAMP WITH TIME ZONE``.
    * Loaded values are always aware and in UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"expected datetime, got {type(value).__name__}")
        if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
            raise ValueError(f"naive datetime not allowed in the catalog: {value!r}")
        value = value.astimezone(dt.timezone.utc)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


from ..phases import TERMINAL_PHASES, RunPhase  # noqa: E402  (re-exported)

RUN_KINDS = frozenset({"leg", "verify", "prune", "drill", "drill-step", "restore"})

#: Verification levels, shallowest first.
VERIFICATION_LEVELS: tuple[str, ...] = ("exists", "integrity", "sample", "full")


class Run(Base):
    __tablename__ = "runs"
    __table_args__ = (Index(None, "policy", "leg", "started_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    policy: Mapped[str | None] = mapped_column(String(255))
    leg: Mapped[str | None] = mapped_column(String(255))
    leg_kind: Mapped[str | None] = mapped_column(String(64))
    location: Mapped[str | None] = mapped_column(String(255))
    phase: Mapped[str] = mapped_column(String(32))
    dry_run: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    bytes_processed: Mapped[int | None] = mapped_column(BigInteger)
    recovery_point: Mapped[str | None] = mapped_column(String(255))
    warnings: Mapped[list[str]] = mapped_column(JSON, default=list)
    errors: Mapped[list[str]] = mapped_column(JSON, default=list)
    command_log: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)

    @property
    def run_phase(self) -> RunPhase:
        return RunPhase(self.phase)

    @property
    def duration_s(self) -> float | None:
        if self.ended_at is None or self.started_at is None:
            return None
        return (self.ended_at - self.started_at).total_seconds()

    def __repr__(self) -> str:
        return (
            f"Run(id={self.id!r}, kind={self.kind!r}, policy={self.policy!r}, "
            f"leg={self.leg!r}, phase={self.phase!r}, started_at={self.started_at!r})"
        )


class RecoveryPointRow(Base):
    __tablename__ = "recovery_points"
    __table_args__ = (UniqueConstraint("location", "point_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    location: Mapped[str] = mapped_column(String(255))
    point_id: Mapped[str] = mapped_column(String(255))
    policy: Mapped[str | None] = mapped_column(String(255))
    leg: Mapped[str | None] = mapped_column(String(255))
    time: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    checksum: Mapped[str | None] = mapped_column(String(255))
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    first_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    gone_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    @property
    def gone(self) -> bool:
        return self.gone_at is not None

    def __repr__(self) -> str:
        return (
            f"RecoveryPointRow(location={self.location!r}, point_id={self.point_id!r}, "
            f"time={self.time!r}, gone_at={self.gone_at!r})"
        )


class Verification(Base):
    __tablename__ = "verifications"
    __table_args__ = (Index(None, "policy", "leg", "level", "ended_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="SET NULL"))
    policy: Mapped[str | None] = mapped_column(String(255))
    leg: Mapped[str | None] = mapped_column(String(255))
    location: Mapped[str] = mapped_column(String(255))
    point_id: Mapped[str] = mapped_column(String(255))
    level: Mapped[str] = mapped_column(String(32))
    ok: Mapped[bool] = mapped_column(Boolean)
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    message: Mapped[str] = mapped_column(Text, default="")

    def __repr__(self) -> str:
        return (
            f"Verification(id={self.id!r}, policy={self.policy!r}, leg={self.leg!r}, "
            f"point_id={self.point_id!r}, level={self.level!r}, ok={self.ok!r}, "
            f"ended_at={self.ended_at!r})"
        )
