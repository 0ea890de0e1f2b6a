"""parity legs: SnapRAID diff → thresholds → sync → scrub, on an array pooled by mergerfs.

The order is the safety: the disks are checked first (a missing disk would make its
files look deleted), then ``snapraid diff`` counts removed and changed files; above
the policy's thresholds the sync is refused, recorded as a failed run with the file
list, and an event is emitted, so a mass deletion or ransomware never reaches the
parity. ``drtool run --force-sync`` syncs after review.

Parity is protection, not a copy: it keeps one state (the last sync), so the leg
has one recovery point, "the parity as of the last time SnapRAID saved its state",
and nothing to prune. Restore is ``snapraid fix`` for files, a whole disk, or the
bad blocks a scrub found, followed by modes and owners (which SnapRAID does not keep)
and a ``check`` that proves the fixed files match the parity.
"""
from __future__ import annotations

import fnmatch
import logging
import os
from datetime import datetime, timedelta
from typing import Any

from .. import notify
from ..backends import mergerfs
from ..backends.base import RecoveryPoint
from ..backends.filemeta import FileMeta
from ..backends.snapraid import LIST_CAP, ArrayStatus, Changes, SnapraidCli, filter_for
from ..errors import BackendError, SourceError, UsageError
from ..policy.models import SnapraidLocation
from .base import LegDriver, LegOutcome

log = logging.getLogger("drtool.legs.parity")


class ThresholdExceeded(BackendError):
    """diff found more removed/updated files than the policy allows: the sync was refused."""


class SnapraidParityLeg(LegDriver):
    levels = ("integrity",)
    needs_target = False

    @property
    def loc(self) -> SnapraidLocation:
        return self.ctx.cfg.location(self.policy.source.location)  # type: ignore[return-value]

    def _cli(self) -> SnapraidCli:
        return self.ctx.backend(f"snapraid:{self.loc.config}", lambda: SnapraidCli(self.loc.config))

    def _meta(self, cli: SnapraidCli) -> FileMeta:
        return FileMeta(self.ctx.state_dir / "parity" / f"{self.policy.source.location}.sqlite", cli.conf.data)

    def describe(self) -> str:
        p = self.leg.parity_plan
        limits = ", ".join(x for x in (
            f"{p.max_removed} removed" if p.max_removed is not None else "",
            f"{p.max_removed_percent:g}% removed" if p.max_removed_percent is not None else "",
            f"{p.max_updated} updated" if p.max_updated is not None else "",
            f"{p.max_updated_percent:g}% updated" if p.max_updated_percent is not None else "") if x) or "no limits"
        scrub = f"scrub {p.scrub_percent:g}% of blocks older than {p.scrub_older_than_days} days" if p.scrub_percent else "no scrub"
        return (f"would check the disks of {self.loc.config}, run snapraid diff, refuse the sync above ({limits}), "
                f"then sync and {scrub}")

    # -- health ------------------------------------------------------------------

    def _problems(self, cli: SnapraidCli) -> list[str]:
        return mergerfs.check_branches(self.loc.pool, cli.conf.data)

    # -- run ---------------------------------------------------------------------

    def run(self, rec: Any) -> LegOutcome:
        cli = self._cli()
        problems = self._problems(cli)
        if problems:
            raise SourceError("the array is not whole: " + "; ".join(problems) + ". Sync refused: SnapRAID would take the missing "
                              "disk's files for deleted. Fix: mount the disk; if it is lost, replace it and run "
                              f"`drtool restore --policy {self.policy.name} --leg {self.leg.leg_name} --target <disk name>`")
        rec.start()
        plan = self.leg.parity_plan
        counted: dict[str, list[str]] = {"removed": [], "updated": []}
        totals = {"removed": 0, "updated": 0}

        def count(kind: str, disk: str, path: str) -> None:
            if kind in totals and not any(fnmatch.fnmatch(path, pat) for pat in plan.threshold_ignore):
                totals[kind] += 1
                if len(counted[kind]) < LIST_CAP:
                    counted[kind].append(f"{disk}:{path}")

        changes = cli.diff(count)
        crossed = _crossed(plan, totals, changes)
        detail: dict[str, Any] = {"diff": changes.counts, "counted": totals, "thresholds": plan.model_dump()}
        warnings: list[str] = []
        if crossed and not self.ctx.force_sync:
            why = "; ".join(crossed)
            msg = (f"sync refused: {why}. Parity is untouched. Review the files (drtool runs --json shows them), then run "
                   f"`drtool run --policy {self.policy.name} --leg {self.leg.leg_name} --force-sync` if the changes are wanted")
            files = {k: v[:200] for k, v in counted.items() if v}
            notify.emit(self.ctx.state_dir, "parity.sync_refused", now=self.ctx.now(), message=msg, policy=self.policy.name,
                        leg=self.leg.leg_name, location=self.policy.source.location, counted=totals, files=files)
            exc = ThresholdExceeded(msg)
            exc.detail = {**detail, "files": counted}
            raise exc
        if crossed:
            warnings.append(f"--force-sync: synced although {'; '.join(crossed)}")
        # no differences, yet a sync may have been cut short (the scan was saved, parity not)
        interrupted = not changes.any and cli.status().unsynced
        meta = self._meta(cli)
        try:
            if meta.empty():
                meta.rebuild(skip=cli.conf.content)
            if changes.any or interrupted:
                with self.ctx.ui.task(f"{self.policy.name}/{self.leg.leg_name}: snapraid sync"):
                    # --force-sync is the reviewed sync: SnapRAID's own "a disk is now empty" refusal is
                    # lifted too (the disks were just checked to be mounted)
                    _, sync_out = cli.sync(force_empty=self.ctx.force_sync, on_file=meta.change)
                detail["sync"] = sync_out.summary
                if sync_out.exit not in ("ok", ""):
                    raise BackendError(f"snapraid sync ended with '{sync_out.exit}': " + "; ".join(sync_out.errors[:5]))
        finally:
            meta.close()
        errors: list[str] = []
        if plan.scrub_percent > 0:
            with self.ctx.ui.task(f"{self.policy.name}/{self.leg.leg_name}: snapraid scrub {plan.scrub_percent:g}%"):
                scrub = cli.scrub(plan.scrub_percent, plan.scrub_older_than_days)
            detail["scrub"] = {**scrub.summary, "errors": scrub.errors[:50]}
            if scrub.exit not in ("ok", "") or scrub.errors:
                errors.append(f"scrub found errors ({_error_counts(scrub.summary)}), e.g. {'; '.join(scrub.errors[:3])}. Fix: "
                              f"`drtool restore --policy {self.policy.name} --leg {self.leg.leg_name}` repairs the bad blocks")
        status = cli.status() if plan.scrub_percent > 0 else None  # after a scrub: the bad blocks it marked
        if status is not None:
            detail["status"] = _status_dict(status, self.ctx.now())
        point = self._point(cli, status)
        if point is None:
            raise BackendError(f"snapraid reported success but wrote no content file ({', '.join(map(str, cli.conf.content))})")
        what = ("synced " + ", ".join(f"{n} {k}" for k, n in changes.counts.items() if n and k != "equal") if changes.any else
                "completed an interrupted sync" if interrupted else "parity already covered every file")
        scrubbed = f"; scrubbed {plan.scrub_percent:g}% of blocks older than {plan.scrub_older_than_days}d" if plan.scrub_percent else ""
        return LegOutcome(point=point, message=f"{what}{scrubbed}", warnings=warnings, errors=errors, detail=detail)

    # -- points --------------------------------------------------------------------

    def _point(self, cli: SnapraidCli, status: ArrayStatus | None = None) -> RecoveryPoint | None:
        saved = cli.content_mtime()
        if saved is None:
            return None
        meta: dict[str, Any] = {"kind": "parity", "config": str(cli.conf.path), "disks": sorted(cli.conf.data)}
        if status is not None:
            meta.update(_status_dict(status, self.ctx.now()))
        return RecoveryPoint(id=f"parity-{saved:%Y%m%dT%H%M%SZ}", time=saved, location=self.policy.source.location,
                             policy=self.policy.name, leg=self.leg.leg_name, meta=meta)

    def points(self) -> list[RecoveryPoint]:
        point = self._point(self._cli())
        return [point] if point else []

    def delete(self, point_ids: list[str]) -> None:
        raise UsageError("parity keeps one state (the last sync): there is nothing to prune")

    def pins(self, points: list[RecoveryPoint]) -> dict[str, str]:
        return {p.id: "the array's only parity state" for p in points}

    def protection(self, points: list[RecoveryPoint]) -> dict[str, Any]:
        """The array's parity as the protection of this policy's source: last sync, the
        disks holding the source paths (mergerfs), disk problems. No snapraid command runs."""
        cli = self._cli()
        problems = self._problems(cli)
        where = mergerfs.map_paths(self.loc.pool, self.policy.source.paths, cli.conf.data) if self.loc.pool else {}
        last = points[-1].time if points else None
        age = _ago(self.ctx.now() - last) if last else None
        disks = sorted({d for ds in where.values() for d in ds})
        summary = (f"parity of {cli.conf.path}: " + (f"state saved {age} ago" if age else "never synced")
                   + (f"; source on disk(s) {', '.join(disks)}" if disks else "")
                   + ("; " + "; ".join(problems) if problems else "; all disks mounted"))
        return {"leg": self.leg.leg_name, "ok": not problems and last is not None, "last_sync": last.isoformat() if last else None,
                "source_disks": where, "problems": problems, "summary": summary}

    # -- verify --------------------------------------------------------------------

    def exists_check(self, points: list[RecoveryPoint]) -> dict[str, Any]:
        """Sync age against the RPO, and the disks: every data disk mounted and in the pool."""
        cli = self._cli()
        problems = self._problems(cli)
        if problems:
            return {"level": "exists", "ok": False, "message": "the array is not whole: " + "; ".join(problems)}
        changes = cli.diff()
        if not changes.any:
            return {"level": "exists", "ok": True, "message": f"parity covers all {changes.counts['equal']} files (snapraid diff: no differences)"}
        age = self.ctx.now() - points[-1].time
        fresh = age <= self.policy.rpo_td
        pending = ", ".join(f"{n} {k}" for k, n in changes.counts.items() if n and k != "equal")
        return {"level": "exists", "ok": fresh, "changes": changes.counts,
                "message": f"{pending} since the last sync {_ago(age)} ago" + ("" if fresh else f": older than the RPO {self.policy.rpo}")}

    def check(self, level: str, points: list[RecoveryPoint]) -> dict[str, Any]:
        if level != "integrity":
            raise UsageError(f"parity legs have no {level} check")
        status = self._cli().status()
        now = self.ctx.now()
        horizon = self._scrub_horizon()
        behind = status.share_older_than(horizon, now)
        problems = []
        if status.bad_blocks:
            problems.append(f"{status.bad_blocks} bad blocks (a scrub or check found errors): run `drtool restore --policy "
                            f"{self.policy.name} --leg {self.leg.leg_name}` to fix them")
        if status.unsynced:
            problems.append("a sync was interrupted: parity does not cover everything")
        if behind > 0:
            problems.append(f"{behind:.1f}% of blocks were not scrubbed within {_ago(horizon)} (the scrub plan covers the array in that time)")
        msg = "; ".join(problems) or (f"no bad blocks; every block scrubbed or synced within {_ago(horizon)}"
                                       + (f", last scrub {_ago(now - status.last_scrub)} ago" if status.last_scrub else ""))
        return {"level": "integrity", "ok": not problems, "message": msg, **_status_dict(status, now)}

    def _scrub_horizon(self) -> timedelta:
        """How old a block may get under the plan: it waits ``scrub_older_than_days``, then
        each run scrubs ``scrub_percent`` oldest first, so 100/percent runs cover the array;
        one more run of slack."""
        from ..cron import croniter

        plan = self.leg.parity_plan
        if plan.scrub_percent <= 0:
            return timedelta(days=36500)
        it = croniter(self.leg.schedule, self.ctx.now())
        a = it.get_next(datetime)
        interval = it.get_next(datetime) - a
        runs = -(-100 // plan.scrub_percent) + 1
        return timedelta(days=plan.scrub_older_than_days) + interval * runs

    # -- restore -------------------------------------------------------------------

    def _selection(self, target: str | None, include: tuple[str, ...]) -> tuple[list[str], str | None, list[str]]:
        """(snapraid -f filters, -d disk, the disk-relative paths asked for)."""
        cli = self._cli()
        if target and target not in cli.conf.data:
            raise UsageError(f"--target {target!r} is not a data disk of {cli.conf.path} (disks: {', '.join(cli.conf.data)})")
        rels = []
        for p in include:
            rels.append(self._relative(p, cli))
        return [filter_for(r) for r in rels], target, rels

    def _relative(self, path: str, cli: SnapraidCli) -> str:
        pool = self.loc.pool
        if pool and (path == pool or path.startswith(pool.rstrip("/") + "/")):
            return os.path.relpath(path, pool)
        on_disk = cli.conf.disk_of(path)
        if on_disk:
            return on_disk[1]
        if path.startswith("/"):
            raise UsageError(f"{path} is neither inside the pool {pool} nor on a data disk of {cli.conf.path}")
        return path  # already relative to a disk

    def restore_preflight(self, target: str | None, *, force: bool = False, rollback: bool = False) -> None:
        if rollback:
            raise UsageError("parity legs cannot roll back: restore files (--include), a disk (--target DISK) or the bad blocks (neither)")
        self._selection(target, ())

    def restore_plan(self, point: RecoveryPoint, target: str | None, include: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
        """The dry-run listing: what ``snapraid check`` says the selection needs."""
        filters, disk, _ = self._selection(target, include)
        if not filters and not disk:
            status = self._cli().status()
            return f"would fix {status.bad_blocks} bad blocks (snapraid fix -e)", {"bad_blocks": status.bad_blocks}
        found = self._cli().check(filters=filters, disk=disk)
        listing = {k: v for k, v in found.status.items()}
        n = sum(len(v) for k, v in listing.items() if k != "recovered")
        what = f"disk {disk}" if disk else ", ".join(include)
        if not n:
            return f"nothing to fix in {what}: every selected file matches the parity", {"listing": listing}
        return (f"would fix {n} file(s) in {what}: " + "; ".join(f"{k}: {', '.join(v[:10])}" for k, v in listing.items()),
                {"listing": listing})

    def restore(self, point: RecoveryPoint, target: str | None, *, include: tuple[str, ...] = (), force: bool = False,
                rollback: bool = False, destroy_newer: bool = False) -> LegOutcome:
        cli = self._cli()
        filters, disk, rels = self._selection(target, include)
        # no `check` first (that is --dry-run's listing): fix's own log says what it recovered
        fixed = cli.fix(filters=filters, disk=disk, bad_blocks=not filters and not disk)
        recovered = [tuple(x.split(":", 1)) for x in fixed.status.get("recovered", [])]
        meta = self._meta(cli)
        try:
            restored_modes, meta_problems = meta.apply(recovered)  # type: ignore[arg-type]
        finally:
            meta.close()
        # proof: the selection now reads back as the parity expects (for bad blocks: a
        # scrub of exactly those blocks, which also clears their marks)
        mismatches = [f"{x}: unrecoverable" for x in fixed.status.get("unrecoverable", [])]
        if filters or disk:
            after = cli.check(filters=filters, disk=disk)
            mismatches += [f"{x}: still differs from parity after fix" for k, v in after.status.items() if k != "recovered" for x in v]
        else:
            after = cli.scrub_bad()
            mismatches += [f"{e} (after fix -e)" for e in after.errors]
            remaining = cli.status().bad_blocks
            if remaining:
                mismatches.append(f"{remaining} bad blocks remain after fix -e and a scrub of them")
        msg = (f"fixed {len(recovered)} file(s)" + (f" on disk {disk}" if disk else "") + f", restored mode/owner of {restored_modes}"
               + ("; checked: the fixed data matches the parity" if not mismatches else ""))
        return LegOutcome(point=point, message=msg, warnings=meta_problems,
                          detail={"fixed": fixed.status, "summary": fixed.summary, "mismatches": mismatches,
                                  "asked": rels})

    def commands(self) -> list[dict[str, Any]]:
        try:
            cli = self._cli()
        except Exception:  # noqa: BLE001 - an unreadable config ran no command
            return []
        out, cli.commands = cli.commands, []
        return out


def _crossed(plan: Any, totals: dict[str, int], changes: Changes) -> list[str]:
    base = changes.known
    out = []
    for kind in ("removed", "updated"):
        n = totals[kind]
        pct = 100.0 * n / base if base else 0.0
        limit, limit_pct = getattr(plan, f"max_{kind}"), getattr(plan, f"max_{kind}_percent")
        if limit is not None and n > limit:
            out.append(f"{n} files {kind} (limit {limit})")
        elif limit_pct is not None and pct > limit_pct:
            out.append(f"{pct:.1f}% of {base} files {kind} (limit {limit_pct:g}%)")
    return out


def _error_counts(summary: dict[str, str]) -> str:
    keys = [k for k in summary if k.startswith("error")]
    return ", ".join(f"{k}={summary[k]}" for k in keys) or "see the run record"


def _status_dict(status: ArrayStatus, now: datetime) -> dict[str, Any]:
    return {"files": status.files, "blocks": status.blocks, "bad_blocks": status.bad_blocks, "unsynced": status.unsynced,
            "unscrubbed_blocks": status.unscrubbed_blocks,
            "last_scrub": status.last_scrub.isoformat() if status.last_scrub else None,
            "oldest_block": status.oldest_block_time.isoformat() if status.oldest_block_time else None}


def _ago(td: timedelta) -> str:
    from ..durations import format_duration

    return format_duration(td)
