"""What every leg driver provides. A driver binds one policy leg to the backend that
carries it out (restic for backup legs, zfs for snapshot/replicate legs, …); the
engine, verify, prune, status and restore talk only to this interface.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..backends.base import RecoveryPoint
from ..policy.models import Leg, Policy

if TYPE_CHECKING:
    from ..engine import Context, _RunRecord


@dataclass
class LegOutcome:
    point: RecoveryPoint
    message: str
    bytes_processed: int | None = None
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # the point was made but part of the work failed: partially_failed
    detail: dict[str, Any] = field(default_factory=dict)


class LegDriver:
    """Base class: subclasses implement the backend operations for one leg kind."""

    #: verification levels this driver implements beyond ``exists``
    levels: tuple[str, ...] = ()
    #: restore needs --target (or --rollback); parity legs fix in place without one
    needs_target: bool = True

    def __init__(self, ctx: "Context", policy: Policy, leg: Leg) -> None:
        self.ctx, self.policy, self.leg = ctx, policy, leg

    @property
    def location(self) -> str:
        """The location holding this leg's recovery points."""
        return self.leg.to or self.policy.source.location

    # -- to implement ------------------------------------------------------------

    def describe(self) -> str:
        """One line for --dry-run: what a run would do."""
        raise NotImplementedError

    def run(self, rec: "_RunRecord") -> LegOutcome:
        """Make one recovery point. Call ``rec.start()`` once the backend is working."""
        raise NotImplementedError

    def points(self) -> list[RecoveryPoint]:
        """This leg's own points (made by drtool for this policy and leg), oldest first."""
        raise NotImplementedError

    def restore_points(self) -> list[RecoveryPoint]:
        """The points a restore picks from (``latest``, ``random``, an id), oldest first:
        ``points()`` unless the driver can prove them faster."""
        return self.points()

    def location_points(self) -> list[RecoveryPoint]:
        """Every drtool point at this leg's location (for the inventory cache)."""
        return self.points()

    def delete(self, point_ids: list[str]) -> list[str] | None:
        """Delete points; may return the ids the store refused (retention, lock): blocked, kept."""
        raise NotImplementedError

    def pins(self, points: list[RecoveryPoint]) -> dict[str, str]:
        """Points the backend says must not be deleted (held, replication bases)."""
        return {}

    def exists_check(self, points: list[RecoveryPoint]) -> dict[str, Any] | None:
        """The ``exists`` check, when the driver knows better than "the newest point is
        younger than the RPO" (None: that generic check)."""
        return None

    def protection(self, points: list[RecoveryPoint]) -> dict[str, Any] | None:
        """For ``status``: how this leg protects the production copy in place (parity),
        when it does ({leg, ok, summary, problems, …}); None for copy legs."""
        return None

    def restore_plan(self, point: RecoveryPoint, target: str | None, include: tuple[str, ...]) -> tuple[str, dict[str, Any]] | None:
        """What a restore would do, for --dry-run, when the driver can say more than
        "would restore POINT into TARGET" (None: the generic line)."""
        return None

    def check(self, level: str, points: list[RecoveryPoint]) -> dict[str, Any]:
        """One verification check at ``level`` (one of ``levels``): {level, ok, message, …}."""
        raise NotImplementedError

    def restore_preflight(self, target: str | None, *, force: bool = False, rollback: bool = False) -> None:
        """Refuse a restore that cannot or must not start (a usage error, not a run)."""

    def restore(self, point: RecoveryPoint, target: str | None, *, include: tuple[str, ...] = (), force: bool = False,
                rollback: bool = False, destroy_newer: bool = False) -> LegOutcome:
        """Bring ``point`` back into ``target`` (a directory, or a dataset for ZFS) and
        prove what came back. ``rollback``: in place, where the backend can (guarded)."""
        raise NotImplementedError(f"{self.leg.kind} legs cannot be restored by this drtool version")

    def restore_latest(self, target: str | None, *, include: tuple[str, ...] = (), force: bool = False) -> tuple[RecoveryPoint, LegOutcome] | None:
        """Restore the newest point as the backend itself picks it, when it can do that as
        fast as a named point (restic: ``restore latest``): (the point, the outcome). None:
        it cannot, and nothing was done; the point is resolved first."""
        return None

    def commands(self) -> list[dict[str, Any]]:
        """Drain the command log of the backends this driver used (argv masked)."""
        return []
