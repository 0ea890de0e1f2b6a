"""The ONE subprocess runner. Every external command goes through ``run()``.

Contract (DESIGN.md): argv lists only, never a shell; a timeout; the whole
process group is killed on timeout or cancellation; children die with drtool
(PR_SET_PDEATHSIG); stderr is streamed to the log; secrets travel by pipe file
descriptor or environment, are refused in argv, and are masked in every log
line, error and command-log entry; exit codes are interpreted per tool.
"""
from __future__ import annotations

import collections
import ctypes
import json
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable, Mapping

from pydantic import SecretStr

from .errors import BackendError, DrtoolError, LockHeld
from .secrets import mask

log = logging.getLogger("drtool.exec")

KILL_GRACE_S = 3.0
STDERR_TAIL = 200


class Outcome(str, Enum):
    OK = "ok"
    PARTIAL = "partial"
    FAILED = "failed"
    LOCKED = "locked"


@dataclass(frozen=True)
class ToolExitCodes:
    """How one tool's exit codes read. Unknown non-zero codes are failures."""

    ok: frozenset[int] = frozenset({0})
    partial: frozenset[int] = frozenset()
    locked: frozenset[int] = frozenset()
    meanings: Mapping[int, str] = field(default_factory=dict)

    def outcome(self, code: int) -> Outcome:
        if code in self.ok:
            return Outcome.OK
        if code in self.partial:
            return Outcome.PARTIAL
        if code in self.locked:
            return Outcome.LOCKED
        return Outcome.FAILED


# Per-tool tables. restic: 3 = snapshot made but some source files unreadable;
# 10/11/12 exist from restic 0.17 (older versions exit 1 and say so on stderr).
TOOLS: dict[str, ToolExitCodes] = {
    "restic": ToolExitCodes(
        partial=frozenset({3}),
        locked=frozenset({11}),
        meanings={
            1: "fatal error",
            3: "source data could not be read completely (incomplete snapshot)",
            10: "repository does not exist",
            11: "repository is locked",
            12: "wrong password",
            130: "interrupted",
        },
    ),
}
DEFAULT_CODES = ToolExitCodes()


class CommandError(BackendError):
    """A command failed. The message is masked and names the tool, code and cause."""

    def __init__(self, result: "CommandResult", message: str | None = None) -> None:
        self.result = result
        tail = result.stderr_tail(5)
        meaning = result.meaning
        text = message or (
            f"{result.argv[0]} exited {result.returncode}"
            + (f" ({meaning})" if meaning else "")
            + (f": {tail}" if tail else "")
        )
        super().__init__(mask(text))


class CommandTimeout(CommandError):
    pass


class CommandNotFound(DrtoolError):
    pass


@dataclass
class CommandResult:
    argv: list[str]  # masked
    returncode: int
    outcome: Outcome
    duration_s: float
    stdout: str | bytes | None
    stderr_lines: list[str]  # masked, last STDERR_TAIL lines
    timed_out: bool = False
    meaning: str | None = None
    parsed: Any = None

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    def stderr_tail(self, n: int = 10) -> str:
        lines = [ln for ln in self.stderr_lines if ln.strip()][-n:]
        return " | ".join(lines)

    def log_entry(self) -> dict[str, Any]:
        """What goes into a run record: masked argv, code, duration. No output."""
        return {"argv": self.argv, "returncode": self.returncode, "duration_s": round(self.duration_s, 3)}


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (zombies answer ``kill -0``; PID 1 in
    containers reaps slowly). Used to tell stale locks and orphaned runs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return False


_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()


def terminate_all() -> int:
    """Kill the process group of every command still running (any thread). Called when
    drtool is interrupted (SIGINT/SIGTERM) so that no child outlives the interruption;
    restic, given SIGTERM first, removes its own lock."""
    with _live_lock:
        procs = list(_live)
    for proc in procs:
        _kill_group(proc)
    return len(procs)


def _secret_values(secrets: Iterable[SecretStr | str]) -> tuple[str, ...]:
    out = []
    for s in secrets:
        v = s.get_secret_value() if isinstance(s, SecretStr) else s
        if v:
            out.append(v)
    return tuple(out)


_libc = None


def die_with_parent() -> None:
    """preexec: the child gets SIGKILL when drtool dies, so a killed drtool never leaves
    a backup running unattended (the next run then finds a stale lock it can clear)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # pragma: no cover - non-Linux
        pass


def _kill_group(proc: subprocess.Popen, grace: float = KILL_GRACE_S) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also reaps grandchildren that ignored TERM
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:  # pragma: no cover
        log.warning("process group %d did not die after SIGKILL", proc.pid)


def run(
    argv: list[str],
    *,
    tool: str | None = None,
    env: Mapping[str, str] | None = None,
    secret_env: Mapping[str, SecretStr] | None = None,
    secret_files: Mapping[str, SecretStr] | None = None,
    secrets: Iterable[SecretStr | str] = (),
    timeout: float | None = None,
    cwd: str | os.PathLike | None = None,
    stdin: bytes | int | None = None,
    stdout: Any = None,
    parse: str | None = None,
    on_stdout_line: Callable[[str], None] | None = None,
    on_stdout_chunk: Callable[[bytes], None] | None = None,
    on_stderr_line: Callable[[str], None] | None = None,
    check: bool = True,
    log_level: int = logging.DEBUG,
) -> CommandResult:
    """Run ``argv`` and wait for it.

    - ``env``: extra environment (merged over os.environ).
    - ``secret_env``: NAME -> secret, passed in the environment (not visible in ``ps``).
    - ``secret_files``: NAME -> secret; the secret is written to a pipe whose read end
      the child inherits, and NAME is set to ``/dev/fd/N``. Nothing touches disk.
    - ``stdout``: a binary file object to stream stdout into (constant memory), else
      stdout is captured as text, or fed line by line to ``on_stdout_line``, or in
      binary chunks to ``on_stdout_chunk`` (an exception there kills the command).
    - ``parse``: ``"json"`` or ``"jsonl"`` to parse captured stdout.
    - ``check``: raise ``CommandError`` unless the outcome is OK (LOCKED raises ``LockHeld``).
    """
    if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, str) for a in argv):
        raise TypeError("argv must be a non-empty list of str")
    codes = TOOLS.get(tool or os.path.basename(argv[0]), DEFAULT_CODES)
    secret_env = dict(secret_env or {})
    secret_files = dict(secret_files or {})
    values = _secret_values([*secrets, *secret_env.values(), *secret_files.values()])
    for a in argv:
        for v in values:
            if v in a:
                raise DrtoolError(f"refusing to run {argv[0]}: a secret would appear in argv (pass it by file or environment)")
    shown = [mask(a, values) for a in argv]

    child_env = dict(os.environ)
    child_env.update(env or {})
    for name, s in secret_env.items():
        child_env[name] = s.get_secret_value()
    pass_fds: list[int] = []
    to_close: list[int] = []
    for name, s in secret_files.items():
        data = s.get_secret_value().encode()
        if len(data) >= 65536:  # pipe buffer: writing more would block before the child reads
            raise DrtoolError(f"secret for {name} is too large to pass through a pipe")
        r, w = os.pipe()
        os.write(w, data)
        os.close(w)
        pass_fds.append(r)
        to_close.append(r)
        child_env[name] = f"/dev/fd/{r}"

    stdin_arg: Any
    stdin_bytes: bytes | None = None
    if isinstance(stdin, bytes):
        stdin_arg, stdin_bytes = subprocess.PIPE, stdin
    elif stdin is None:
        stdin_arg = subprocess.DEVNULL
    else:
        stdin_arg = stdin

    log.log(log_level, "run: %s", " ".join(shown))
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=stdin_arg,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=child_env,
            pass_fds=pass_fds,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
    except FileNotFoundError:
        raise CommandNotFound(f"{argv[0]}: command not found (run scripts/install-deps.sh, or set the tool path)") from None
    finally:
        for fd in to_close:
            os.close(fd)
    with _live_lock:
        _live.add(proc)

    stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
    out_lines: list[str] = []
    pump_errors: list[BaseException] = []
    threads: list[threading.Thread] = []

    def pump_stderr() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = mask(raw.decode(errors="replace").rstrip("\n"), values)
            stderr_tail.append(line)
            log.log(log_level, "%s: %s", shown[0], line)
            if on_stderr_line:
                try:
                    on_stderr_line(line)
                except Exception:  # a progress callback must never kill the run
                    log.debug("stderr callback failed", exc_info=True)

    def pump_stdout() -> None:
        assert proc.stdout is not None
        if on_stdout_chunk:
            try:
                while chunk := proc.stdout.read1(1 << 20):
                    on_stdout_chunk(chunk)
            except Exception as exc:  # the consumer failed: stop the producer
                pump_errors.append(exc)
                _kill_group(proc, grace=1.0)
            return
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if on_stdout_line:
                try:
                    on_stdout_line(line)
                except Exception:
                    log.debug("stdout callback failed", exc_info=True)
            else:
                out_lines.append(line)

    threads.append(threading.Thread(target=pump_stderr, daemon=True))
    if stdout is None:
        threads.append(threading.Thread(target=pump_stdout, daemon=True))
    for t in threads:
        t.start()
    if stdin_bytes is not None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(stdin_bytes)
            proc.stdin.close()
        except BrokenPipeError:
            pass

    # A blocking wait returns the moment the child exits (Popen.wait(timeout=…) polls with
    # sleeps of up to 50 ms: a tax on every short zfs/snapraid call); a timer enforces
    # the timeout by killing the group, which ends the wait.
    expired = threading.Event()

    def on_timeout() -> None:
        expired.set()
        log.warning("%s: timed out after %ss, killing its process group", shown[0], timeout)
        _kill_group(proc)

    timer = threading.Timer(timeout, on_timeout) if timeout else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        proc.wait()
    except BaseException:  # KeyboardInterrupt, SystemExit from a signal handler, …
        _kill_group(proc)
        raise
    finally:
        if timer is not None:
            timer.cancel()
        for t in threads:
            t.join(timeout=10)
        with _live_lock:
            _live.discard(proc)
        # Close our pipe ends now: an exception's traceback can keep this frame (and
        # so the pipes) alive, and a writer blocked on an unread pipe (zfs-fuse's
        # send thread) would hold its dataset busy until garbage collection.
        for pipe in (proc.stdout, proc.stderr, proc.stdin):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
    duration = time.monotonic() - start
    timed_out = expired.is_set()

    streamed = stdout is not None or on_stdout_line is not None or on_stdout_chunk is not None
    stdout_text: str | None = None if streamed else "\n".join(out_lines)
    rc = proc.returncode
    outcome = Outcome.FAILED if timed_out else codes.outcome(rc)
    result = CommandResult(
        argv=shown,
        returncode=rc,
        outcome=outcome,
        duration_s=duration,
        stdout=stdout_text,
        stderr_lines=list(stderr_tail),
        timed_out=timed_out,
        meaning="timed out" if timed_out else codes.meanings.get(rc),
    )
    if parse and stdout_text is not None and outcome is not Outcome.FAILED:
        try:
            result.parsed = parse_json(stdout_text) if parse == "json" else parse_json_lines(stdout_text)
        except ValueError as exc:
            raise CommandError(result, f"{shown[0]}: could not parse its {parse} output: {exc}") from None
    if pump_errors:
        raise pump_errors[0]
    if timed_out:
        raise CommandTimeout(result, f"{shown[0]} timed out after {timeout}s and was killed")
    if check and outcome is not Outcome.OK:
        if outcome is Outcome.LOCKED:
            raise LockHeld(mask(f"{shown[0]}: {result.meaning or 'locked'}: {result.stderr_tail(2)}", values))
        raise CommandError(result)
    return result


def parse_json(text: str) -> Any:
    text = text.strip()
    if not text:
        return None
    return json.loads(text)


def parse_json_lines(text: str) -> list[Any]:
    """Parse JSON lines; non-JSON lines (some tools mix in plain text) are skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] not in "{[":
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class Spawned:
    """A long-running server started by ``spawn()`` (a scratch etcd or Vault for a
    verify or drill): its output goes to ``log_path``; ``stop()`` kills its whole process
    group (TERM, then KILL after ``grace``) and is idempotent; it also dies with drtool."""

    def __init__(self, proc: subprocess.Popen, argv: list[str], log_path: str, log_file: Any) -> None:
        self.proc, self.argv, self.log_path, self._log = proc, argv, log_path, log_file

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 10) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return mask("\n".join(f.read().splitlines()[-n:]))
        except OSError:
            return "(no log)"

    def stop(self, grace: float = KILL_GRACE_S) -> None:
        if self.proc.poll() is None:
            _kill_group(self.proc, grace)
        with _live_lock:
            _live.discard(self.proc)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "Spawned":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn(argv: list[str], *, log_path: str | os.PathLike, env: Mapping[str, str] | None = None,
          secret_env: Mapping[str, SecretStr] | None = None, cwd: str | os.PathLike | None = None) -> Spawned:
    """Start ``argv`` in the background (no shell, own process group, dies with drtool,
    killed by ``terminate_all()`` on SIGINT/SIGTERM), stdout and stderr appended to
    ``log_path``. Secrets go by environment only and are refused in argv."""
    if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, str) for a in argv):
        raise TypeError("argv must be a non-empty list of str")
    values = _secret_values((secret_env or {}).values())
    if any(v in a for a in argv for v in values):
        raise DrtoolError(f"refusing to start {argv[0]}: a secret would appear in argv (pass it by environment)")
    child_env = dict(os.environ)
    child_env.update(env or {})
    for name, s in (secret_env or {}).items():
        child_env[name] = s.get_secret_value()
    log.debug("spawn: %s", " ".join(mask(a, values) for a in argv))
    log_file = open(log_path, "ab")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, cwd=cwd,
                                env=child_env, start_new_session=True, preexec_fn=die_with_parent)
    except FileNotFoundError:
        log_file.close()
        raise CommandNotFound(f"{argv[0]}: command not found (run scripts/install-deps.sh, or set the tool path)") from None
    with _live_lock:
        _live.add(proc)
    return Spawned(proc, list(argv), str(log_path), log_file)
