"""A throwaway OpenSSH server on 127.0.0.1 for tests of drtool's remote (``ssh:``) paths.

``Sshd.start()`` makes a temp dir holding its own config, a fresh host key and a
fresh client key pair (the client's ``.pub`` is the only authorized key), then runs
``sshd -D -f CONF -e`` as a plain process (own session, log in the temp dir) on a
free port bound to 127.0.0.1 only, and waits until the port answers with an SSH
banner. ``stop()`` ends it (SIGTERM, SIGKILL fallback; liveness read from
``/proc/PID/stat``, since zombies answer ``kill -0``) and removes the temp dir.

The login user is the current one (root on our machines: the server has to run
as root to log anyone in, and zfs needs root anyway). A drtool location reaches it
with ``ssh: <user>@127.0.0.1`` and ``ssh_options: <Sshd.ssh_options>`` (port, the
client key, no known_hosts bookkeeping).
"""
from __future__ import annotations

import atexit
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from services.common import LoggedService, free_port

__all__ = ["Sshd", "SshdUnavailable"]

READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
PRIVSEP_DIR = Path("/run/sshd")  # Debian's sshd refuses to start without it


class SshdUnavailable(RuntimeError):
    """sshd cannot run here (openssh-server or -client missing, or not root). A server
    that is there but fails to start raises a plain RuntimeError (a real failure)."""




def _banner(port: int) -> bool:
    """True once 127.0.0.1:port accepts a connection and speaks SSH."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


class Sshd(LoggedService):
    """One sshd on 127.0.0.1; see the module docstring."""

    LOG_NAME = "sshd.log"
    STOP_TIMEOUT_S = STOP_TIMEOUT_S

    def __init__(self) -> None:
        self.sshd_bin = shutil.which("sshd") or next(
            (p for p in ("/usr/sbin/sshd", "/sbin/sshd") if os.access(p, os.X_OK)), None)
        missing = [name for name, path in (("sshd", self.sshd_bin), ("ssh", shutil.which("ssh")),
                                           ("ssh-keygen", shutil.which("ssh-keygen"))) if path is None]
        if missing:
            raise SshdUnavailable(f"{', '.join(missing)} not found (apt-get install openssh-server openssh-client)")
        if os.geteuid() != 0:
            raise SshdUnavailable("sshd has to run as root to log a user in")
        self.user = pwd.getpwuid(os.geteuid()).pw_name
        self.port: int | None = None

    # -- what a client needs ------------------------------------------------- #

    @property
    def host(self) -> str:
        """``user@127.0.0.1``: a drtool location's ``ssh:``."""
        return f"{self.user}@127.0.0.1"

    ssh = host

    @property
    def client_key(self) -> Path:
        assert self.root is not None
        return self.root / "client_ed25519"

    @property
    def ssh_options(self) -> list[str]:
        """A drtool location's ``ssh_options:``: port, identity, no host key bookkeeping."""
        assert self.port is not None, "start() first"
        return ["-p", str(self.port), "-i", str(self.client_key), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR"]

    def ssh_argv(self, *remote: str) -> list[str]:
        """``ssh`` argv running ``remote`` (one shell command line) on this server."""
        return ["ssh", "-o", "BatchMode=yes", *self.ssh_options, self.host, "--", *remote]

    # -- lifecycle ----------------------------------------------------------- #

    def start(self) -> Sshd:
        self.root = Path(tempfile.mkdtemp(prefix="drtool-sshd-"))
        atexit.register(self.stop)
        try:
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
            for key in (self.root / "host_ed25519", self.client_key):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "drtool-test", "-f", str(key)],
                               stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=30)
            shutil.copyfile(self.client_key.with_suffix(".pub"), self.root / "authorized_keys")
            for _ in range(3):  # the free port can be taken before sshd binds it
                if self._launch():
                    return self
                if "Address already in use" not in self.log_tail():
                    break
            raise RuntimeError(f"sshd did not accept connections on 127.0.0.1:{self.port}: {self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _config(self) -> str:
        assert self.root is not None
        return "\n".join([
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.root / 'host_ed25519'}",
            f"PidFile {self.root / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "MaxStartups 100",  # drtool opens one connection per command, two at a time for send|receive
            # Speed only (every zfs command is one login): a classic key exchange instead of
            # the post-quantum default (~0.13 s less per connection on loopback), and SHLVL=1
            # so that bash does not source the login user's ~/.bashrc for each remote command
            # (a developer's pyenv/conda init costs ~0.2 s). The remote PATH is sshd's default.
            "KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org",
            "SetEnv SHLVL=1",
            "LogLevel INFO",
            "",
        ])

    def _launch(self) -> bool:
        """Start sshd on a fresh free port; True once it answers with an SSH banner."""
        assert self.root is not None
        self._stop_proc()
        self.port = free_port()
        conf = self.root / "sshd_config"
        conf.write_text(self._config())
        test = subprocess.run([self.sshd_bin, "-t", "-f", str(conf)], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=30)
        if test.returncode != 0:
            raise RuntimeError(f"sshd -t rejected the config: {test.stderr.strip()}")
        self._popen([self.sshd_bin, "-D", "-f", str(conf), "-e"])  # an absolute path: sshd re-executes itself per connection
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if _banner(self.port):
                return True
            time.sleep(0.02)
        return False
