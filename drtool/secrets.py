"""Secret references, resolved at the last moment and masked everywhere.

A policy never holds a secret value, only a reference: ``{env: NAME}``,
``{file: path}`` or ``{command: [argv…]}``. Resolution returns a
``pydantic.SecretStr`` and registers the value with the process-wide masker,
so every log line, error message and run record passes through ``mask()``.
"""
from __future__ import annotations

import logging
import os
import subprocess
import threading
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from .errors import SecretError

MASK = "***"


class SecretRef(BaseModel):
    """Where to read a secret from. Exactly one of ``env``, ``file``, ``command``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"env": "RESTIC_PASSWORD"}, {"file": "/etc/drtool/restic.pass"}]},
    )

    env: str | None = Field(None, description="Name of an environment variable holding the secret.", examples=["RESTIC_PASSWORD"])
    file: str | None = Field(None, description="Path of a file holding the secret (trailing newline stripped).", examples=["/etc/drtool/restic.pass"])
    command: list[str] | None = Field(
        None,
        min_length=1,
        description="A command (argv list, no shell) whose stdout is the secret, e.g. a password manager CLI.",
        examples=[["pass", "show", "backup/restic"]],
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "SecretRef":
        given = [k for k in ("env", "file", "command") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a secret reference needs exactly one of env, file, command, e.g. {env: RESTIC_PASSWORD}")
        return self

    def describe(self) -> str:
        """Where the secret comes from, safe to print."""
        if self.env is not None:
            return f"env:{self.env}"
        if self.file is not None:
            return f"file:{self.file}"
        return f"command:{self.command[0]}"  # type: ignore[index]


class _Masker:
    def __init__(self) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()

    def register(self, value: str) -> None:
        if value:
            with self._lock:
                self._values.add(value)
                # Also mask the value's common single-line forms.
                stripped = value.strip()
                if stripped:
                    self._values.add(stripped)

    def mask(self, text: str, extra: tuple[str, ...] = ()) -> str:
        if not text:
            return text
        values = sorted(self._values.union(v for v in extra if v), key=len, reverse=True)
        for v in values:
            if v in text:
                text = text.replace(v, MASK)
        return text

    def contains_secret(self, text: str) -> bool:
        return any(v in text for v in self._values)


masker = _Masker()


def mask(text: str, extra: tuple[str, ...] = ()) -> str:
    return masker.mask(text, extra)


def register_secret(value: str) -> None:
    masker.register(value)


def resolve(ref: SecretRef, *, what: str = "secret") -> SecretStr:
    """Read the secret now. Errors name the reference, never the value."""
    if ref.env is not None:
        value = os.environ.get(ref.env)
        if value is None:
            raise SecretError(f"{what}: environment variable {ref.env} is not set (export it, or use {{file: …}})")
    elif ref.file is not None:
        path = Path(ref.file).expanduser()
        try:
            value = path.read_text().rstrip("\r\n")
        except OSError as exc:
            raise SecretError(f"{what}: cannot read secret file {path}: {exc.strerror}") from None
    else:
        argv = list(ref.command or [])
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SecretError(f"{what}: secret command {argv[0]!r} failed to run: {type(exc).__name__}") from None
        if proc.returncode != 0:
            raise SecretError(f"{what}: secret command {argv[0]!r} exited {proc.returncode}")
        value = proc.stdout.decode().rstrip("\r\n")
    if not value:
        raise SecretError(f"{what}: {ref.describe()} is empty")
    register_secret(value)
    return SecretStr(value)


class MaskingFilter(logging.Filter):
    """Masks registered secrets in every record that reaches a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        masked = mask(msg)
        if masked != msg or record.args:
            record.msg = masked
            record.args = None
        return True
