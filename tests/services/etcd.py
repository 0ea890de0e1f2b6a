"""A throwaway etcd (3.4, apt etcd-server) on 127.0.0.1 for tests of the etcd backend.

``EtcdServer.start()`` runs ``etcd`` as a plain process: one member, plain HTTP, free
loopback client and peer ports, data dir and log in a temp dir (on tmpfs ``/dev/shm``
when there is one: etcd fsyncs every write). It waits until ``/health`` says true;
``stop()`` ends it by PID (SIGTERM, SIGKILL fallback) and removes the temp dir.

Writes go through etcd's v3 JSON gateway (keys and values base64): ``fill()`` puts
many keys per ``/v3/kv/txn`` request (the server allows 10,000 operations and 64 MiB
per request), so thousands of keys take a fraction of a second.
"""
from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from drtool.backends.etcd import EtcdConn, range_end
from services.common import LoggedService, free_port

__all__ = ["EtcdServer", "EtcdUnavailable"]

READY_TIMEOUT_S = 20.0
MAX_TXN_OPS = 10_000
MAX_REQUEST_BYTES = 64 << 20


class EtcdUnavailable(RuntimeError):
    """etcd or etcdctl is not installed. An etcd that is there but fails to start
    raises a plain RuntimeError (a real failure)."""


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _scratch_parent() -> str | None:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None


class EtcdServer(LoggedService):
    """One etcd member on 127.0.0.1; see the module docstring."""

    LOG_NAME = "etcd.log"
    STOP_TIMEOUT_S = 10.0

    def __init__(self) -> None:
        self.binary = shutil.which("etcd")
        self.etcdctl = shutil.which("etcdctl")
        if self.binary is None or self.etcdctl is None:
            raise EtcdUnavailable("etcd and etcdctl are needed (apt install etcd-server etcd-client)")
        self.port: int | None = None
        self.peer_port: int | None = None

    @property
    def endpoint(self) -> str:
        assert self.port is not None, "start() first"
        return f"http://127.0.0.1:{self.port}"

    @property
    def conn(self) -> EtcdConn:
        assert self.binary is not None and self.etcdctl is not None
        return EtcdConn(endpoints=[self.endpoint], etcdctl=self.etcdctl, etcd=self.binary)

    # -- lifecycle ----------------------------------------------------------- #

    def start(self) -> EtcdServer:
        self.root = Path(tempfile.mkdtemp(prefix="drtool-etcd-", dir=_scratch_parent()))
        atexit.register(self.stop)
        try:
            for _ in range(3):  # the free port can be taken before etcd binds it
                if self._launch():
                    return self
                if "address already in use" not in self.log_tail().lower():
                    break
            raise RuntimeError(f"etcd did not become healthy on {self.endpoint}: {self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _launch(self) -> bool:
        self._stop_proc()
        assert self.root is not None and self.binary is not None
        shutil.rmtree(self.root / "data", ignore_errors=True)
        self.port, self.peer_port = free_port(), free_port()
        peer = f"http://127.0.0.1:{self.peer_port}"
        self._popen([self.binary, "--name=test", f"--data-dir={self.root / 'data'}",
                     f"--listen-client-urls={self.endpoint}", f"--advertise-client-urls={self.endpoint}",
                     f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                     f"--initial-cluster=test={peer}", f"--max-txn-ops={MAX_TXN_OPS}",
                     f"--max-request-bytes={MAX_REQUEST_BYTES}", "--quota-backend-bytes=4294967296"])
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.endpoint}/health", timeout=1.0) as resp:
                    if json.loads(resp.read()).get("health") == "true":
                        return True
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        return False

    # -- use ----------------------------------------------------------------- #

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.endpoint}{path}", data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())

    def put(self, key: str | bytes, value: str | bytes) -> int:
        """Put one key; return the new revision."""
        doc = self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})
        return int(doc["header"]["revision"])

    def revision(self) -> int:
        return int(self._post("/v3/kv/range", {"key": _b64(b"\x00"), "count_only": True})["header"]["revision"])

    def fill(self, counts: dict[str, int], value_size: int = 100, prefix_tag: str = "") -> dict[str, int]:
        """Write ``counts[resource]`` keys ``/registry/<prefix_tag><resource>/ns<i>/obj<j>``
        (Kubernetes-shaped, values of ``value_size`` random bytes), batched into as few
        txn requests as the server's limits allow. Returns the counts per group as
        ``EtcdCli.key_counts`` reports them: {"/registry/<prefix_tag><resource>/": n}."""
        value = _b64(os.urandom(value_size))
        per_op = len(value) + 120
        batch = max(1, min(MAX_TXN_OPS, (MAX_REQUEST_BYTES // 2) // per_op))
        ops: list[dict[str, Any]] = []
        written: dict[str, int] = {}
        for resource, n in counts.items():
            group = f"/registry/{prefix_tag}{resource}/"
            written[group] = written.get(group, 0) + n
            for j in range(n):
                ops.append({"request_put": {"key": _b64(f"{group}ns{j % 7}/obj{j}"), "value": value}})
                if len(ops) >= batch:
                    self._txn(ops)
        if ops:
            self._txn(ops)
        return written

    def _txn(self, ops: list[dict[str, Any]]) -> None:
        doc = self._post("/v3/kv/txn", {"success": ops})
        if not doc.get("succeeded"):
            raise RuntimeError(f"etcd txn of {len(ops)} puts did not succeed: {str(doc)[:300]}")
        ops.clear()

    def delete_prefix(self, prefix: str | bytes) -> int:
        """Delete every key under ``prefix``; return how many were deleted."""
        p = prefix.encode() if isinstance(prefix, str) else prefix
        doc = self._post("/v3/kv/deleterange", {"key": _b64(p), "range_end": _b64(range_end(p))})
        return int(doc.get("deleted", 0))

    def compact(self, revision: int) -> None:
        """Compact history up to ``revision`` (physical: wait until it is done)."""
        self._post("/v3/kv/compaction", {"revision": revision, "physical": True})
