"""SnapRAID through its CLI: diff, sync, scrub, status, check and fix.

Every command runs through the one runner with ``-c CONF -l LOG``: SnapRAID's log is
its machine-readable output (tagged lines such as ``scan:add:d1:dir/file``,
``summary:added:20``, ``status:recoverable:d1:dir/file``), so drtool reads the log,
never the human text. The log goes to a private temporary file and is read line by
line afterwards, so a diff of millions of files costs constant memory beyond the
capped lists kept for reports.

Exit codes (snapraid 12): ``diff`` exits 2 when there are differences (not an
error); ``check``/``scrub``/``fix`` exit 1 when they found errors, which the log
then details. Other non-zero codes are failures.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .. import exec as ex
from ..errors import BackendError, ConfigError

CMD_TIMEOUT_S = 7 * 24 * 3600.0  # a first sync of a large array takes days
LIST_CAP = 1000  # paths kept per change kind for reports (counts are always exact)
CHANGE_KINDS = ("added", "removed", "updated", "moved", "copied", "restored")
_SCAN_KIND = {"add": "added", "remove": "removed", "update": "updated", "move": "moved", "copy": "copied", "restore": "restored"}


class SnapraidError(BackendError):
    """A snapraid command failed; the message carries its own words."""


# -- snapraid.conf ------------------------------------------------------------


@dataclass(frozen=True)
class SnapraidConf:
    path: Path
    data: dict[str, Path]  # disk name -> mount directory
    parity: list[Path]
    content: list[Path]

    @classmethod
    def read(cls, path: str | os.PathLike) -> "SnapraidConf":
        p = Path(path)
        try:
            lines = p.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read the SnapRAID configuration {p}: {exc.strerror}") from None
        data: dict[str, Path] = {}
        parity: list[Path] = []
        content: list[Path] = []
        for n, raw in enumerate(lines, 1):
            words = raw.split(None, 2)
            if not words or words[0].startswith("#"):
                continue
            key = words[0]
            if key in ("data", "disk"):
                if len(words) < 3:
                    raise ConfigError(f"{p}:{n}: '{raw.strip()}': a data line needs a name and a directory")
                data[words[1]] = Path(words[2].strip())
            elif key.endswith("parity"):  # parity, 2-parity, … z-parity
                parity.extend(Path(x) for x in raw.split(None, 1)[1].strip().split(","))
            elif key == "content":
                content.append(Path(raw.split(None, 1)[1].strip()))
        if not data or not parity or not content:
            missing = [k for k, v in (("data", data), ("parity", parity), ("content", content)) if not v]
            raise ConfigError(f"{p}: no {', '.join(missing)} line: this is not a usable SnapRAID configuration")
        return cls(p, data, parity, content)

    def disk_of(self, path: str | os.PathLike) -> tuple[str, str] | None:
        """(disk name, path relative to the disk) for a path on a data disk."""
        p = os.path.abspath(path)
        for name, root in self.data.items():
            r = os.path.abspath(root)
            if p == r or p.startswith(r.rstrip("/") + "/"):
                return name, os.path.relpath(p, r)
        return None


# -- parsed results -----------------------------------------------------------


@dataclass
class Changes:
    """What ``snapraid diff`` (or the scan inside ``sync``) found."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(("equal", *CHANGE_KINDS), 0))
    files: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in CHANGE_KINDS})  # "disk:path", capped

    @property
    def known(self) -> int:
        """Files in the parity before this change set (the base for percentages)."""
        c = self.counts
        return c["equal"] + c["removed"] + c["updated"] + c["moved"] + c["copied"] + c["restored"]

    @property
    def any(self) -> bool:
        return any(self.counts[k] for k in CHANGE_KINDS)


@dataclass
class Outcome:
    """A sync/scrub/check/fix: the summary counters and the per-file error and status lines."""

    exit: str = ""  # summary:exit: ok, diff, error, recoverable, recovered, unrecoverable, …
    summary: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # "disk:path: message", capped
    status: dict[str, list[str]] = field(default_factory=dict)  # recoverable/recovered/unrecoverable -> ["disk:path"]

    def count(self, key: str) -> int:
        try:
            return int(self.summary.get(key, "0"))
        except ValueError:
            return 0


@dataclass
class ArrayStatus:
    """``snapraid status``: what parity covers and how recently blocks were scrubbed."""

    files: int
    blocks: int
    unsynced: bool  # a sync was interrupted: parity does not cover everything
    unscrubbed_blocks: int  # synced, never scrubbed
    bad_blocks: int
    block_times: list[tuple[datetime, int, str]]  # (last sync/scrub time, blocks, "new"|"scrubbed")

    def share_older_than(self, age: timedelta, now: datetime) -> float:
        """Percentage of blocks whose last scrub (or sync, for never-scrubbed ones) is older than ``age``."""
        total = sum(n for _, n, _ in self.block_times)
        old = sum(n for t, n, _ in self.block_times if now - t > age)
        return 100.0 * old / total if total else 0.0

    @property
    def oldest_block_time(self) -> datetime | None:
        return min((t for t, _, _ in self.block_times), default=None)

    @property
    def last_scrub(self) -> datetime | None:
        return max((t for t, _, kind in self.block_times if kind != "new"), default=None)


def _cap(items: list[str], item: str) -> None:
    if len(items) < LIST_CAP:
        items.append(item)


def unescape(field: str) -> str:
    """Undo SnapRAID's log escaping: \\d is ':', \\n newline, \\r return, \\\\ backslash."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        c = field[i]
        if c == "\\" and i + 1 < len(field):
            out.append({"d": ":", "n": "\n", "r": "\r", "\\": "\\"}.get(field[i + 1], field[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_log(lines: Iterable[str], on_file: Callable[[str, str, str], None] | None = None) -> tuple[Changes, Outcome]:
    """One pass over a SnapRAID log: the scan (``scan:<kind>:<disk>:<path>…``, as ``diff``
    and ``sync`` print it) and the outcome (``summary:``, ``error:``, ``status:`` lines).
    ``on_file(kind, disk, path)`` sees every change, uncapped (e.g. to record file modes)."""
    ch, out = Changes(), Outcome()
    for line in lines:
        line = line.rstrip("\n")
        tag, _, rest = line.partition(":")
        if tag == "scan":
            # fields are ':'-separated, ':' inside names escaped as "\d"; update adds
            # ": <size> <mtime> -> <size> <mtime>", move/copy end with the new path
            parts = rest.split(":", 2)
            kind = _SCAN_KIND.get(parts[0]) if len(parts) == 3 else None
            if kind is None:
                continue
            disk, fields = parts[1], parts[2].split(":")
            path = unescape(fields[-1] if kind in ("moved", "copied") else fields[0])
            _cap(ch.files[kind], f"{disk}:{path}")
            if on_file:
                on_file(kind, disk, path)
        elif tag == "summary":
            key, _, value = rest.partition(":")
            if key in ch.counts:
                with contextlib.suppress(ValueError):
                    ch.counts[key] = int(value)
            out.summary[key] = value
            if key == "exit":
                out.exit = value
        elif tag == "error":  # error:<block>:<disk>:<path>: <message>
            parts = rest.split(":", 3)
            if len(parts) == 4:
                _cap(out.errors, f"{parts[1]}:{unescape(parts[2])}: {parts[3].strip()}")
        elif tag == "status":  # status:<recoverable|recovered|unrecoverable>:<disk>:<path>
            parts = rest.split(":")
            if len(parts) >= 3:
                _cap(out.status.setdefault(parts[0], []), f"{parts[1]}:{unescape(parts[2])}")
    return ch, out


def parse_status(lines: Iterator[str]) -> ArrayStatus:
    summary: dict[str, str] = {}
    times: list[tuple[datetime, int, str]] = []
    blocks = 0
    for line in lines:
        line = line.rstrip("\n")
        if line.startswith("summary:"):
            key, _, value = line[8:].partition(":")
            summary[key] = value
        elif line.startswith("info_time:"):  # info_time:<unix>:<blocks>:<new|scrubbed|bad|…>
            parts = line.split(":")
            with contextlib.suppress(ValueError, IndexError):
                times.append((datetime.fromtimestamp(int(parts[1]), timezone.utc), int(parts[2]), parts[3]))
        elif line.startswith("block_count:"):
            with contextlib.suppress(ValueError):
                blocks = int(line.split(":")[1])

    def num(key: str) -> int:
        try:
            return int(summary.get(key, "0").split(":")[0])
        except ValueError:
            return 0
    if "has_bad" not in summary:
        raise SnapraidError("snapraid status printed no summary: cannot tell the array's state")
    return ArrayStatus(files=num("file_count"), blocks=blocks, unsynced=num("has_unsynced") > 0,
                       unscrubbed_blocks=num("has_unscrubbed"), bad_blocks=num("has_bad"), block_times=times)


# -- the CLI wrapper ----------------------------------------------------------


class SnapraidCli:
    """``snapraid -c CONF`` through the one runner. ``commands`` keeps the exec log entries."""

    def __init__(self, conf: str | os.PathLike, *, binary: str | None = None, timeout: float = CMD_TIMEOUT_S) -> None:
        self.conf = SnapraidConf.read(conf)
        self.binary = binary or os.environ.get("DRTOOL_SNAPRAID") or "snapraid"
        self.timeout = timeout
        self.commands: list[dict] = []

    @contextlib.contextmanager
    def _logged(self, *args: str, ok: tuple[int, ...] = (0,), on_line: Callable[[str], None] | None = None) -> Iterator[Iterator[str]]:
        """Run ``snapraid -c CONF -l LOG args`` and yield the log's lines."""
        tmp = tempfile.mkdtemp(prefix="drtool-snapraid-")
        log = os.path.join(tmp, "snapraid.log")
        try:
            res = ex.run([self.binary, "-c", str(self.conf.path), "-l", log, *args], tool="snapraid", check=False,
                         timeout=self.timeout, on_stdout_line=on_line, env={"LC_ALL": "C"})
            self.commands.append(res.log_entry())
            if res.returncode not in ok:
                raise SnapraidError(f"snapraid {args[0]} exited {res.returncode}: {_why(log, res)}")
            with open(log, errors="replace") as f:
                yield f
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def diff(self, on_file: Callable[[str, str, str], None] | None = None) -> Changes:
        with self._logged("diff", ok=(0, 2)) as lines:
            return parse_log(lines, on_file)[0]

    def sync(self, *, force_empty: bool = False, on_file: Callable[[str, str, str], None] | None = None,
             on_line: Callable[[str], None] | None = None) -> tuple[Changes, Outcome]:
        """Sync parity; the changes it scanned (``on_file`` sees each) and its outcome.
        ``force_empty``: sync even when a whole disk's files are gone (a reviewed deletion)."""
        with self._logged("sync", *(["--force-empty"] if force_empty else []), ok=(0,), on_line=on_line) as lines:
            return parse_log(lines, on_file)

    def scrub(self, percent: float, older_than_days: int, *, on_line: Callable[[str], None] | None = None) -> Outcome:
        """Scrub ``percent`` of the array, oldest blocks first, only blocks older than the
        given days. Exit 1 means errors were found: returned, not raised (``exit`` says)."""
        pct = f"{percent:g}"
        with self._logged("scrub", "-p", pct, "-o", str(older_than_days), ok=(0, 1), on_line=on_line) as lines:
            return parse_log(lines)[1]

    def scrub_bad(self) -> Outcome:
        """Scrub only the blocks marked bad (after ``fix -e``): proves the repair and clears the marks."""
        with self._logged("scrub", "-p", "bad", ok=(0, 1)) as lines:
            return parse_log(lines)[1]

    def status(self) -> ArrayStatus:
        with self._logged("status", ok=(0,)) as lines:
            return parse_status(lines)

    def check(self, *, filters: list[str] = (), disk: str | None = None) -> Outcome:  # type: ignore[assignment]
        """Read-only: which of the selected files are damaged or missing, and recoverable."""
        with self._logged("check", *_selection(filters, disk), ok=(0, 1)) as lines:
            return parse_log(lines)[1]

    def fix(self, *, filters: list[str] = (), disk: str | None = None, bad_blocks: bool = False) -> Outcome:  # type: ignore[assignment]
        args = ["fix", *_selection(filters, disk), *(["-e"] if bad_blocks else [])]
        with self._logged(*args, ok=(0, 1)) as lines:
            return parse_log(lines)[1]

    def content_mtime(self) -> datetime | None:
        """When SnapRAID last saved its state (sync, scrub or fix), from the newest content file."""
        times = [p.stat().st_mtime for p in self.conf.content if p.exists()]
        return datetime.fromtimestamp(max(times), timezone.utc) if times else None


def filter_for(rel_path: str) -> str:
    """A ``-f`` filter matching exactly one disk-relative path (glob characters escaped)."""
    escaped = "".join("\\" + c if c in "*?[]\\" else c for c in rel_path.lstrip("/"))
    return "/" + escaped


def _selection(filters: list[str] | tuple[str, ...], disk: str | None) -> list[str]:
    args: list[str] = []
    for f in filters:
        args += ["-f", f]
    if disk:
        args += ["-d", disk]
    return args


def _why(log: str, res: ex.CommandResult) -> str:
    """The fatal/error messages SnapRAID logged, else its stderr tail."""
    msgs: list[str] = []
    with contextlib.suppress(OSError):
        with open(log, errors="replace") as f:
            for line in f:
                if line.startswith(("msg:fatal:", "msg:error:")):
                    text = line.split(":", 2)[2].strip()
                    if text and text not in msgs:
                        msgs.append(text)
    return " ".join(msgs[-3:]) or res.stderr_tail(3) or "no message"
