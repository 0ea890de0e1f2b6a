"""The one exception hierarchy and the one exit-code table.

Every user-facing failure is a ``DrtoolError`` subclass carrying its exit code;
the CLI maps exceptions to exit codes here and nowhere else (STYLE #9).
"""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2  # usage or configuration error
    PARTIAL = 3  # some legs/steps failed, others succeeded
    NONCOMPLIANT = 4  # a policy does not meet 3-2-1-1-0
    LOCKED = 75  # lock held: skipped, not failed (EX_TEMPFAIL)


class DrtoolError(Exception):
    """A failure the user can act on. ``str(e)`` is one clear line, secrets masked."""

    exit_code: ExitCode = ExitCode.FAILURE
    #: structured facts for the run record (e.g. the files that tripped a threshold)
    detail: dict | None = None


class ConfigError(DrtoolError):
    exit_code = ExitCode.USAGE


class UsageError(DrtoolError):
    exit_code = ExitCode.USAGE


class SecretError(ConfigError):
    """A secret reference could not be resolved (never includes the value)."""


class LockHeld(DrtoolError):
    exit_code = ExitCode.LOCKED


class SourceError(DrtoolError):
    """The source is missing, empty or unreadable: a failure, never a success."""


class BackendError(DrtoolError):
    pass


class ToolError(BackendError):
    """A storage tool's command failed or was refused; ``stderr`` is its (cleaned) error text."""

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


class VerificationFailed(DrtoolError):
    pass


def exit_code_for(exc: BaseException) -> ExitCode:
    if isinstance(exc, DrtoolError):
        return exc.exit_code
    return ExitCode.FAILURE
