"""The one command runner: secrets, timeouts, process groups, exit-code tables."""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from pydantic import SecretStr

from drtool import exec as ex
from drtool.errors import DrtoolError, LockHeld
from drtool.secrets import register_secret


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait_dead(pid: int, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


SECRET = "hunter2-very-secret-XYZ"


def test_secret_never_in_logs_or_errors(caplog):
    caplog.set_level(logging.DEBUG, logger="drtool")
    with pytest.raises(ex.CommandError) as err:
        ex.run(["sh", "-c", 'echo "bad password: $PW" >&2; echo "$PW"; exit 7'], secret_env={"PW": SecretStr(SECRET)})
    assert SECRET not in str(err.value)
    assert "***" in str(err.value)
    assert SECRET not in caplog.text
    assert "bad password: ***" in caplog.text
    assert SECRET not in repr(err.value.result.log_entry())
    assert all(SECRET not in line for line in err.value.result.stderr_lines)


def test_registered_secret_masked_even_if_not_passed(caplog):
    caplog.set_level(logging.DEBUG, logger="drtool")
    register_secret("another-Registered-secret-77")
    ex.run(["sh", "-c", "echo another-Registered-secret-77 >&2"])
    assert "another-Registered-secret-77" not in caplog.text


def test_secret_in_argv_is_refused():
    with pytest.raises(DrtoolError, match="secret would appear in argv"):
        ex.run(["echo", f"--password={SECRET}"], secret_env={"PW": SecretStr(SECRET)})


def test_secret_file_reaches_child_through_a_pipe_not_disk():
    res = ex.run(["sh", "-c", 'test -p "$PWFILE" && cat "$PWFILE"'], secret_files={"PWFILE": SecretStr(SECRET)})
    assert res.stdout == SECRET
    assert SECRET not in " ".join(res.argv)


def test_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "pids"
    script = f"sleep 300 & echo $! > {pidfile}; sh -c 'sleep 300' & echo $! >> {pidfile}; wait"
    t0 = time.monotonic()
    with pytest.raises(ex.CommandTimeout, match="timed out"):
        ex.run(["sh", "-c", script], timeout=1)
    assert time.monotonic() - t0 < 10
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) == 2
    for pid in pids:
        assert _wait_dead(pid), f"child {pid} survived the timeout"


def test_child_that_ignores_sigterm_is_killed(tmp_path):
    pidfile = tmp_path / "pid"
    script = f"trap '' TERM; echo $$ > {pidfile}; while true; do sleep 0.1; done"
    with pytest.raises(ex.CommandTimeout):
        ex.run(["sh", "-c", script], timeout=0.5)
    assert _wait_dead(int(pidfile.read_text()))


def test_children_die_with_drtool(tmp_path):
    """A SIGKILLed drtool must not leave its backup running (PR_SET_PDEATHSIG)."""
    pidfile = tmp_path / "pid"
    code = textwrap.dedent(f"""
        from drtool import exec as ex
        ex.run(["sh", "-c", "echo $$ > {pidfile}; exec sleep 300"])
    """)
    parent = subprocess.Popen([sys.executable, "-c", code])
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        time.sleep(0.05)
    child = int(pidfile.read_text())
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    assert _wait_dead(child), "child outlived its killed parent"


def test_exit_code_tables():
    codes = ex.TOOLS["restic"]
    assert codes.outcome(0) is ex.Outcome.OK
    assert codes.outcome(3) is ex.Outcome.PARTIAL
    assert codes.outcome(11) is ex.Outcome.LOCKED
    assert codes.outcome(1) is ex.Outcome.FAILED
    assert ex.DEFAULT_CODES.outcome(2) is ex.Outcome.FAILED
    res = ex.run(["sh", "-c", "exit 3"], tool="restic", check=False)
    assert res.outcome is ex.Outcome.PARTIAL and "incomplete" in res.meaning
    with pytest.raises(LockHeld):
        ex.run(["sh", "-c", "echo locked >&2; exit 11"], tool="restic")


def test_json_and_json_lines_parsing():
    res = ex.run(["sh", "-c", 'echo \'{"a": 1, "b": [2]}\''], parse="json")
    assert res.parsed == {"a": 1, "b": [2]}
    res = ex.run(["sh", "-c", 'echo \'{"x":1}\'; echo not json; echo \'{"x":2}\''], parse="jsonl")
    assert [m["x"] for m in res.parsed] == [1, 2]
    with pytest.raises(ex.CommandError, match="could not parse"):
        ex.run(["echo", "{broken"], parse="json")


def test_stdout_streams_in_chunks_and_a_failing_consumer_stops_the_producer():
    seen = bytearray()
    ex.run(["sh", "-c", "head -c 3000000 /dev/zero"], on_stdout_chunk=seen.extend)
    assert len(seen) == 3_000_000

    def boom(_chunk: bytes) -> None:
        raise RuntimeError("consumer failed")

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="consumer failed"):
        ex.run(["sh", "-c", "while true; do head -c 1000000 /dev/zero; done"], on_stdout_chunk=boom)
    assert time.monotonic() - t0 < 10


def test_stdin_bytes_and_missing_command():
    assert ex.run(["cat"], stdin=b"hello").stdout == "hello"
    with pytest.raises(ex.CommandNotFound, match="command not found"):
        ex.run(["definitely-not-a-command-drtool"])
    with pytest.raises(TypeError):
        ex.run("echo hi")  # type: ignore[arg-type]  - a string is never a command line
