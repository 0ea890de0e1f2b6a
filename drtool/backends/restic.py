"""restic: the first ``Repository`` backend.

All restic calls go through ``drtool.exec.run``. The password reaches restic by
an inherited pipe (``RESTIC_PASSWORD_FILE=/dev/fd/N``), never argv or disk.
Snapshots drtool makes carry the tags ``drtool``, ``drtool:policy=<p>`` and
``drtool:leg=<l>``; listing for prune only ever returns those.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

from pydantic import SecretStr

from .. import exec as ex
from ..errors import BackendError, ConfigError, LockHeld
from ..policy.models import ResticLocation
from ..secrets import resolve
from .base import BackupResult, CheckResult, ProgressFn, RecoveryPoint

log = logging.getLogger("drtool.restic")

OWNER_TAG = "drtool"


def restic_bin() -> str:
    """The restic binary: $DRTOOL_RESTIC, else ``restic`` on PATH."""
    return os.environ.get("DRTOOL_RESTIC") or "restic"

_LOCKED_RE = re.compile(r"repository is already locked|unable to create lock", re.I)
# the line `restic restore` starts with: "restoring <Snapshot 6312d1f6 of [/src] at 2026-11-28 22:04:08.885679574 +0000 UTC by …> to …"
# (0.14; later versions print "restoring snapshot 6312d1f6 of …", their time perhaps without a zone: then it is looked up)
_RESTORING_RE = re.compile(r"^restoring <?[Ss]napshot ([0-9a-f]{8,}) of (.*)$", re.M)
_RESTORED_TIME_RE = re.compile(r" at (\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2})(\.\d+)? ([+-]\d{2})(\d{2}) ")
_NO_SNAPSHOT_RE = re.compile(r"no snapshot found|latest snapshot for criteria not found", re.I)
_NOT_FOUND_RE = re.compile(r"unable to open config file|Is there a repository at the following location|repository does not exist", re.I)


def policy_tag(policy: str) -> str:
    return f"drtool:policy={policy}"


def leg_tag(leg: str) -> str:
    return f"drtool:leg={leg}"


def parse_restic_time(text: str) -> datetime:
    """restic writes RFC 3339 with nanoseconds and a zone; Python takes microseconds."""
    m = re.match(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})$", text.strip())
    if not m:
        raise ValueError(f"unexpected restic time {text!r}")
    base, frac, zone = m.groups()
    frac = (frac or ".0")[:7]
    zone = "+00:00" if zone == "Z" else zone
    return datetime.fromisoformat(f"{base}{frac}{zone}").astimezone(timezone.utc)


def parse_restoring(stdout: str) -> tuple[str, datetime | None] | None:
    """The snapshot `restic restore` names in its first line: (short id, time in UTC, or
    None when printed without a zone), or None when there is no such line."""
    m = _RESTORING_RE.search(stdout)
    if not m:
        return None
    short, rest = m.groups()
    t = _RESTORED_TIME_RE.search(rest)
    if t is None:
        return short, None
    day, clock, frac, zh, zm = t.groups()
    return short, datetime.fromisoformat(f"{day}T{clock}{(frac or '.0')[:7]}{zh}:{zm}").astimezone(timezone.utc)


def _restore_args(point: str, target: str, include: Iterable[str], *, verify: bool = False, tags: Iterable[str] = ()) -> list[str]:
    """``restic restore`` of ``point`` (an id, or "latest" among snapshots with all ``tags``)."""
    args = ["restore", point, *(["--tag", ",".join(tags)] if tags else []), "--target", target]
    for inc in include:
        args += ["--include", inc]
    return args + (["--verify"] if verify else [])


class ResticRepository:
    """A restic repository named by a ``type: restic`` location."""

    def __init__(self, name: str, loc: ResticLocation, *, timeout: float | None = None) -> None:
        self.name = name
        self.loc = loc
        self.timeout = timeout
        self._password: SecretStr | None = None
        self._env: dict[str, SecretStr] | None = None
        self.commands: list[dict[str, Any]] = []

    # -- plumbing -------------------------------------------------------------

    def secrets(self) -> tuple[SecretStr, dict[str, SecretStr]]:
        """(password, env), resolved on first use."""
        if self._password is None:
            self._password = resolve(self.loc.password, what=f"location {self.name}: password")
            self._env = {k: resolve(v, what=f"location {self.name}: env.{k}") for k, v in self.loc.env.items()}
        assert self._env is not None
        return self._password, self._env

    @property
    def local_path(self) -> str | None:
        """The repository directory when it is a plain local path (no restic URL)."""
        repo = self.loc.repository
        return repo if repo.startswith("/") else None

    def _run(self, args: list[str], *, parse: str | None = None, check: bool = True, retry_stale: bool = True,
             env: dict[str, str] | None = None, **kw: Any) -> ex.CommandResult:
        password, secret_env = self.secrets()
        argv = [restic_bin(), "--repo", self.loc.repository, *args]
        try:
            res = ex.run(
                argv,
                tool="restic",
                secret_files={"RESTIC_PASSWORD_FILE": password},
                secret_env=secret_env,
                env={"RESTIC_PROGRESS_FPS": "1", **(env or {})},
                parse=parse,
                check=False,
                timeout=kw.pop("timeout", self.timeout),
                **kw,
            )
        except ex.CommandTimeout as exc:
            self.commands.append(exc.result.log_entry())
            raise
        self.commands.append(res.log_entry())
        if res.outcome is not ex.Outcome.OK:
            locked = next((ln for ln in res.stderr_lines if _LOCKED_RE.search(ln)), None)
            if res.outcome is ex.Outcome.LOCKED or locked:
                # Optimistic locking: only when restic says "locked" do we look for
                # stale locks, clear them, and try once more.
                if retry_stale and self.clear_stale_locks():
                    return self._run(args, parse=parse, check=check, retry_stale=False, env=env, **kw)
                raise LockHeld(f"restic repository {self.name} is locked by a live process: {locked or res.stderr_tail(3)}")
            if check and any(_NOT_FOUND_RE.search(ln) for ln in res.stderr_lines):
                raise BackendError(f"restic repository {self.loc.repository} (location {self.name}) does not exist: "
                                   "set `init: true` on the location, or run `restic init`")
            if check:
                raise ex.CommandError(res)
        return res

    # -- Repository -------------------------------------------------------------

    def exists(self) -> bool:
        if self.local_path:  # no restic call (and no key derivation) needed
            return os.path.isfile(os.path.join(self.local_path, "config"))
        res = self._run(["cat", "config", "--no-lock"], check=False, retry_stale=False)
        if res.ok:
            return True
        if _NOT_FOUND_RE.search(res.stderr_tail(5)):
            return False
        raise ex.CommandError(res)

    def ensure_ready(self, *, create: bool) -> None:
        if not self.exists():
            if not create:
                raise ConfigError(
                    f"restic repository {self.loc.repository} (location {self.name}) does not exist: "
                    "create it with `restic init`, or set `init: true` on the location"
                )
            if self.local_path:
                os.makedirs(os.path.dirname(self.local_path.rstrip("/")) or "/", exist_ok=True)
            log.info("initialising restic repository %s (location %s)", self.loc.repository, self.name)
            self._run(["init"])
        if self.local_path:
            # A local repository shows its locks as files: clear stale ones up front
            # (a killed backup's lock would otherwise linger until an exclusive op).
            locks = os.path.join(self.local_path, "locks")
            if os.path.isdir(locks) and os.listdir(locks):
                self.clear_stale_locks()

    def locks(self) -> list[dict[str, Any]]:
        ids = self._run(["list", "locks", "--no-lock"], retry_stale=False).stdout or ""
        out = []
        for lock_id in ids.split():
            res = self._run(["cat", "lock", lock_id, "--no-lock"], check=False, parse="json", retry_stale=False)
            if res.ok and isinstance(res.parsed, dict):
                out.append({"id": lock_id, **res.parsed})
        return out

    def clear_stale_locks(self) -> list[dict[str, Any]]:
        """Remove locks left by a dead restic on this host; a live lock is left alone.

        restic's own ``unlock`` removes only stale locks (dead PID on the same host, or
        older than 30 minutes), so it is safe to call once we have seen one.
        """
        host = socket.gethostname()
        stale = [
            lk for lk in self.locks()
            if lk.get("hostname") == host and isinstance(lk.get("pid"), int) and not ex.pid_alive(lk["pid"])
        ]
        if stale:
            self._run(["unlock"], retry_stale=False)
            for lk in stale:
                log.warning("removed stale restic lock %s on %s: PID %s on %s is dead (lock from %s)",
                            lk["id"][:8], self.name, lk.get("pid"), host, lk.get("time"))
        return stale

    def backup(self, paths: list[str], *, policy: str, leg: str, excludes: Iterable[str] = (), progress: ProgressFn | None = None,
               cwd: str | os.PathLike | None = None, time: datetime | None = None, parent: str | None = None,
               tags: Iterable[str] = ()) -> BackupResult:
        """``cwd`` + ``paths=["."]`` stores the directory's content at the snapshot's root
        (a CephFS snapshot: restored without the mount's path); ``time``: the snapshot's
        time when the data is older than now (a file-system snapshot's creation);
        ``parent``: the snapshot to compare with (restic picks one by equal paths)."""
        # drtool sets the snapshot time (what restic would use: the start of the backup)
        # so that a local repository's new point is known without listing it again.
        started = (time or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(microsecond=0)
        args = ["backup", "--json", "--time", started.strftime("%Y-%m-%d %H:%M:%S"),
                "--tag", OWNER_TAG, "--tag", policy_tag(policy), "--tag", leg_tag(leg)]
        for tag in tags:
            args += ["--tag", tag]
        if parent:
            args += ["--parent", parent]
        for pattern in excludes:
            args += ["--exclude", pattern]
        args += ["--", *paths]
        summary: dict[str, Any] = {}
        errors: list[str] = []

        def on_line(line: str) -> None:
            if not line.startswith("{"):
                return
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                return
            kind = msg.get("message_type")
            if kind == "summary":
                summary.update(msg)
            elif kind == "error":
                err = msg.get("error", {})
                errors.append(f"{msg.get('item', '?')}: {err.get('message', err) if isinstance(err, dict) else err}")
            elif kind == "status" and progress:
                progress(msg)

        res = self._run(args, on_stdout_line=on_line, check=False, env={"TZ": "UTC"}, cwd=cwd)  # --time is read in restic's local zone
        if res.outcome is ex.Outcome.PARTIAL:
            raise BackendError(
                f"restic backup to {self.name} could not read all source files (exit 3); "
                f"snapshot {summary.get('snapshot_id', '?')} is incomplete and the run is failed: "
                + ("; ".join(errors[:5]) or res.stderr_tail(5))
            )
        if not res.ok:
            raise ex.CommandError(res)
        short = summary.get("snapshot_id")
        if not short:
            raise BackendError(f"restic backup to {self.name} exited 0 but reported no snapshot id: {res.stderr_tail(3)}")
        point = self._local_point(short, started, [os.path.join(cwd, p) if cwd else p for p in paths], policy, leg, tags)
        if point is None:
            points = [p for p in self.list_points(policy=policy, leg=leg) if p.id.startswith(short)]
            if len(points) != 1:
                raise BackendError(f"restic reported snapshot {short} but listing {self.name} found {len(points)} matching snapshots")
            point = points[0]
        return BackupResult(
            point=point,
            bytes_processed=summary.get("total_bytes_processed"),
            bytes_added=summary.get("data_added"),
            files=summary.get("total_files_processed"),
            warnings=errors,
        )

    def _local_point(self, short: str, time: datetime, paths: list[str], policy: str, leg: str, extra_tags: Iterable[str] = ()) -> RecoveryPoint | None:
        """The new snapshot of a local repository, found by its file name (its full id)."""
        if not self.local_path:
            return None
        try:
            ids = [n for n in os.listdir(os.path.join(self.local_path, "snapshots")) if n.startswith(short)]
        except OSError:
            return None
        if len(ids) != 1:
            return None
        tags = [OWNER_TAG, policy_tag(policy), leg_tag(leg), *extra_tags]
        return RecoveryPoint(id=ids[0], time=time, location=self.name, policy=policy, leg=leg, paths=tuple(os.path.normpath(p) for p in paths),
                             meta={"short_id": short, "hostname": socket.gethostname(), "tags": tags, "owned": True})

    def list_points(self, *, policy: str | None = None, leg: str | None = None, owned_only: bool = True) -> list[RecoveryPoint]:
        tags = [OWNER_TAG] if owned_only else []
        if policy:
            tags.append(policy_tag(policy))
        if leg:
            tags.append(leg_tag(leg))
        args = ["snapshots", "--json", "--no-lock"]
        if tags:
            args += ["--tag", ",".join(tags)]  # one --tag with commas = all of these
        res = self._run(args, parse="json")
        points = []
        for snap in res.parsed or []:
            tagset = snap.get("tags") or []
            pol = next((t.split("=", 1)[1] for t in tagset if t.startswith("drtool:policy=")), None)
            lg = next((t.split("=", 1)[1] for t in tagset if t.startswith("drtool:leg=")), None)
            points.append(RecoveryPoint(
                id=snap["id"], time=parse_restic_time(snap["time"]), location=self.name, policy=pol, leg=lg,
                paths=tuple(snap.get("paths") or ()),
                meta={"short_id": snap.get("short_id"), "hostname": snap.get("hostname"), "tags": tagset, "owned": OWNER_TAG in tagset},
            ))
        points.sort(key=lambda p: p.time)
        return points

    def check(self, *, read_data_percent: float) -> CheckResult:
        pct = f"{read_data_percent:g}%"
        res = self._run(["check", f"--read-data-subset={pct}"], check=False)
        if res.ok:
            return CheckResult(True, "integrity", f"restic check read {pct} of pack data: no errors", {"read_data_subset": pct})
        if res.outcome is ex.Outcome.LOCKED:
            raise LockHeld(f"restic repository {self.name} is locked")
        problems = [ln for ln in res.stderr_lines + (res.stdout or "").splitlines() if re.search(r"error|fatal|damaged|invalid|mismatch|does not match", ln, re.I)]
        return CheckResult(False, "integrity", f"restic check found errors in {self.name}: " + (" | ".join(problems[:5]) or res.stderr_tail(5)),
                           {"read_data_subset": pct, "returncode": res.returncode, "problems": problems[:50]})

    def restore(self, point_id: str, target: str, *, include: Iterable[str] = (), verify: bool = False, progress: ProgressFn | None = None) -> None:
        self._run(_restore_args(point_id, target, include, verify=verify))

    def restore_latest(self, target: str, *, policy: str, leg: str, include: Iterable[str] = ()) -> tuple[str, datetime | None] | None:
        """Restore drtool's newest snapshot of ``policy``/``leg``, chosen by restic itself
        (``restore latest`` with the owner, policy and leg tags: no listing process, and no
        key derivation, before the restore). Returns the snapshot's short id and time (None
        when restic did not print it with its zone), from the line restic starts its restore
        with; None when the repository has no such snapshot."""
        res = self._run(_restore_args("latest", target, include, tags=(OWNER_TAG, policy_tag(policy), leg_tag(leg))), check=False)
        if not res.ok:
            if any(_NO_SNAPSHOT_RE.search(ln) for ln in res.stderr_lines):
                return None
            raise ex.CommandError(res)
        said = parse_restoring(res.stdout or "")
        if said is None:
            raise BackendError(f"restic restore of {self.name} succeeded without naming the snapshot it restored: {(res.stdout or '')[:200]!r}")
        return said

    def read_file(self, point_id: str, path: str, on_chunk: Callable[[bytes], None]) -> None:
        """Stream one file's content out of a snapshot (constant memory)."""
        self._run(["dump", point_id, path], on_stdout_chunk=on_chunk)

    def forget(self, point_ids: list[str]) -> None:
        if not point_ids:
            return
        self._run(["forget", "--prune", *point_ids])
