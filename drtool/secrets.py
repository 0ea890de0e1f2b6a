"""Secret references, resolved at the last moment and masked everywhere.

A policy never holds a secret value, only a reference: ``{env: NAME}``,
``{file: path}``, ``{command: [argv…]}`` or ``{vault: mount/path#key}``. Resolution returns a
``pydantic.SecretStr`` and registers the value with the process-wide masker,
so every log line, error message and run record passes through ``mask()``.
"""
from __future__ import annotations

import logging
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from .errors import BackendError, SecretError

MASK = "***"


class SecretRef(BaseModel):
    """Where to read a secret from. Exactly one of ``env``, ``file``, ``command``, ``vault``.

    ``vault`` reads a KV secret (v2 or v1, detected) from the Vault or OpenBao server in
    ``VAULT_ADDR`` (or ``BAO_ADDR``) with the token in ``VAULT_TOKEN`` (or ``BAO_TOKEN``),
    trusting the CA bundle in ``VAULT_CACERT`` (or ``BAO_CACERT``) if set, in the
    namespace ``VAULT_NAMESPACE`` (or ``BAO_NAMESPACE``) if set. It needs the hvac
    client library: ``pip install 'drtool[vault]'``."""

    model_config = ConfigDict(
        extra="forbid",
        defer_build=True,  # built on first use (see policy.models.Strict)
        json_schema_extra={"examples": [{"env": "RESTIC_PASSWORD"}, {"file": "/etc/drtool/restic.pass"},
                                        {"vault": "secret/backup/restic#password"}]},
    )

    env: str | None = Field(None, description="Name of an environment variable holding the secret.", examples=["RESTIC_PASSWORD"])
    file: str | None = Field(None, description="Path of a file holding the secret (trailing newline stripped).", examples=["/etc/drtool/restic.pass"])
    command: list[str] | None = Field(
        None,
        min_length=1,
        description="A command (argv list, no shell) whose stdout is the secret, e.g. a password manager CLI.",
        examples=[["pass", "show", "backup/restic"]],
    )
    vault: str | None = Field(
        None,
        description="A key of a Vault/OpenBao KV secret, as mount/path#key (KV v2 or v1, detected), read from the "
        "server in VAULT_ADDR (or BAO_ADDR) with the token in VAULT_TOKEN (or BAO_TOKEN); VAULT_CACERT names a CA "
        "bundle. Needs pip install 'drtool[vault]'.",
        examples=["secret/backup/restic#password"],
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "SecretRef":
        given = [k for k in ("env", "file", "command", "vault") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("a secret reference needs exactly one of env, file, command, vault, e.g. {env: RESTIC_PASSWORD}")
        if self.vault is not None:
            path, _, key = self.vault.rpartition("#")
            if not key or "/" not in path.strip("/"):
                raise ValueError(f"vault: {self.vault!r} is not of the form mount/path#key, e.g. secret/backup/restic#password")
        return self

    def describe(self) -> str:
        """Where the secret comes from, safe to print."""
        if self.env is not None:
            return f"env:{self.env}"
        if self.file is not None:
            return f"file:{self.file}"
        if self.vault is not None:
            return f"vault:{self.vault}"
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
    elif ref.vault is not None:
        value = _read_vault(ref, what)
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


_paths: dict[str, tuple[int, str]] = {}
_paths_lock = threading.Lock()


def secret_path(ref: SecretRef, *, what: str = "secret", suffix: str = "\n", inspect: Any = None) -> str:
    """A path a child process can read the secret from, for tools that take a file name
    (a Ceph keyring): an anonymous in-memory file (memfd) of this process, named
    ``/proc/<pid>/fd/<n>``. Nothing touches disk, and it is gone when drtool exits.
    Resolved once per reference per process; ``inspect(value)`` sees the value then
    (e.g. to register the parts of it that must be masked)."""
    key = ref.model_dump_json()
    with _paths_lock:
        got = _paths.get(key)
        if got is not None and got[0] == os.getpid():
            return got[1]
        value = resolve(ref, what=what).get_secret_value()
        if inspect is not None:
            inspect(value)
        value += suffix
        fd = os.memfd_create("drtool-secret", os.MFD_CLOEXEC)
        os.write(fd, value.encode())
        os.fchmod(fd, 0o400)
        path = f"/proc/{os.getpid()}/fd/{fd}"
        _paths[key] = (os.getpid(), path)
        return path


def _env(*names: str) -> str | None:
    for name in names:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _read_vault(ref: SecretRef, what: str) -> str:
    """``ref.vault`` read through ``drtool.backends.vault.VaultApi`` (hvac, imported only
    here), from the server and with the token the environment names."""
    try:
        import hvac  # noqa: F401
    except ImportError:
        raise SecretError(f"{what}: {ref.describe()} needs the Vault client library hvac: pip install 'drtool[vault]'") from None
    from .backends.vault import VaultApi, VaultConn

    address = _env("VAULT_ADDR", "BAO_ADDR")
    token = _env("VAULT_TOKEN", "BAO_TOKEN")
    if not address:
        raise SecretError(f"{what}: {ref.describe()}: set VAULT_ADDR (or BAO_ADDR) to the server's address")
    if not token:
        raise SecretError(f"{what}: {ref.describe()}: set VAULT_TOKEN (or BAO_TOKEN) to a token that may read it")
    register_secret(token)
    conn = VaultConn(address, cacert=_env("VAULT_CACERT", "BAO_CACERT"), token=SecretStr(token),
                     namespace=_env("VAULT_NAMESPACE", "BAO_NAMESPACE"))
    try:
        return VaultApi(conn).read(ref.vault or "").get_secret_value()
    except (SecretError, BackendError) as exc:
        raise SecretError(mask(f"{what}: {exc}")) from None


class MaskingFilter(logging.Filter):
    """Masks registered secrets in every record that reaches a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        masked = mask(msg)
        if masked != msg or record.args:
            record.msg = masked
            record.args = None
        return True
