"""A throwaway single-node Ceph (Pacific, apt ceph-*) on 127.0.0.1 for the RBD/CephFS tests.

``CephCluster.start()`` bootstraps by hand, as plain processes, everything in one temp
dir (on tmpfs ``/dev/shm`` when there is one: the mon's RocksDB syncs):

1. ``ceph.conf`` with the settings that make a one-OSD cluster healthy and quick
   (size 1 pools, ``paxos propose interval``/``mgr stats period`` short, memstore);
   every path (data, keyrings, logs, admin sockets, run dir) points into the dir.
2. cephx keys for mon., client.admin, mgr.x, mds.a and osd.0 are made here (a key is
   16 random bytes behind a small header: no ``ceph-authtool`` run per key); all go
   into the mon's mkfs keyring, so the mon knows them, caps included, from its first
   election (no ``ceph auth get-or-create`` round trips).
3. ``monmaptool --create`` (mon on a free port, msgr2 only), ``ceph-mon --mkfs`` and,
   at the same time, ``ceph-osd --mkfs --no-mon-config`` (memstore needs no mon).
4. mon, mgr and mds start at once (mgr and mds wait for the mon themselves); one
   ``ceph`` process reading commands from stdin then runs ``osd new UUID 0`` (the
   OSD's id: its key came with the mkfs keyring, as ``-i {"cephx_secret": …}`` is
   ignored in that mode), the two CephFS pools and ``fs new cephfs``; the OSD starts.
   The mgr gets a module path of its own: the modules asked for (``rbd_support``)
   and a stub for each other always-on module (a missing one is a HEALTH_ERR);
   importing all of Pacific's ~30 took 13-17 s of a 17 s start on a busy 2-core box.
   ``volumes`` (``ceph fs subvolume …``) is a stub by default: ``CephCluster(volumes=
   True)`` loads the real one (with ``orchestrator``, which it imports) from the start,
   ``enable_volumes()`` swaps it in on a running cluster (the mgr re-executes itself
   after ``ceph mgr fail``), so only the tests that use subvolumes pay for it.
   Measured, three starts each, on an idle 2-core box: default 2.4-2.6 s to ready,
   with volumes 3.5-3.8 s plus ~0.5 s for the first subvolume command (the module's
   own start), ``enable_volumes()`` 3.3-3.9 s; on the same box busy (load 3-4): 5.7-6.4
   s, 7.9-9.8 s + 1.0-1.8 s, 5-10 s. Hence off by default.
5. ``ceph status`` is polled until health is OK (or WARN with only acceptable checks),
   the OSD is up, the mgr available, the CephFS rank active and every PG active+clean.

``stop()`` ends every daemon by PID (SIGTERM; SIGKILL after 2 s: ceph-mds ignores
SIGTERM), waits for /proc to say they are gone and removes the dir; idempotent, also
run at exit. Daemons get PR_SET_PDEATHSIG, so a killed test run does not leave a
cluster holding memory. Memstore keeps the data in RAM: the OSD's "device" is
``memstore_mb`` (1 GiB by default; a full OSD blocks writes, it does not swap).
"""
from __future__ import annotations

import atexit
import base64
import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from drtool.exec import die_with_parent
from services.common import alive, free_port, log_tail

__all__ = ["CephCluster", "CephUnavailable"]

BINARIES = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph-mds", "ceph", "rbd", "monmaptool")
READY_TIMEOUT_S = 60.0
CMD_TIMEOUT_S = 60.0
STOP_GRACE_S = 2.0
# Warnings that say nothing about whether this test cluster works.
ACCEPTABLE_WARNINGS = frozenset({
    "POOL_NO_REDUNDANCY",  # size-1 pools (also silenced in the conf)
    "AUTH_INSECURE_GLOBAL_ID_RECLAIM_ALLOWED",
    "TOO_FEW_OSDS",
    "MON_DISK_LOW",  # a nearly full /dev/shm is the host's business, not the test's
})
MGR_MODULE_PATH = Path("/usr/share/ceph/mgr")
# rbd_support serves `rbd task`/`rbd perf`/trash-purge schedules; VOLUMES_MODULES
# ("volumes" and "orchestrator", which volumes imports) serve `ceph fs subvolume …`.
DEFAULT_MGR_MODULES = ("rbd_support",)
VOLUMES_MODULES = ("volumes", "orchestrator")
# Pacific's always-on modules (the mon's list): a missing one is a HEALTH_ERR
# (MGR_MODULE_ERROR "Not found or unloadable"), so those not in ``mgr_modules`` get a stub.
ALWAYS_ON_MODULES = ("balancer", "crash", "devicehealth", "orchestrator", "pg_autoscaler", "progress",
                     "rbd_support", "status", "telemetry", "volumes")
STUB_MODULE = '''"""A stub (tests/services/ceph.py): an always-on mgr module this test cluster skips
to start quickly; pass its name in CephCluster(mgr_modules=...) for the real one
(volumes: CephCluster(volumes=True) or enable_volumes())."""
from mgr_module import MgrModule


class Module(MgrModule):
    NOTIFY_TYPES = []
'''


class CephUnavailable(RuntimeError):
    """Ceph is not installed, or this is not root. A Ceph that is there but fails to
    come up raises a plain RuntimeError (a real failure)."""


def cephx_key() -> str:
    """A new cephx secret, as ``ceph-authtool --gen-print-key`` makes it: type 1 (AES),
    creation time, length 16, 16 random bytes; base64."""
    now = time.time()
    head = struct.pack("<HIIH", 1, int(now), int((now % 1) * 1e9), 16)
    return base64.b64encode(head + os.urandom(16)).decode()


def keyring_text(name: str, key: str, caps: dict[str, str]) -> str:
    lines = [f"[{name}]", f"\tkey = {key}"]
    lines += [f'\tcaps {svc} = "{cap}"' for svc, cap in caps.items()]
    return "\n".join(lines) + "\n"


def conf_text(root: Path, fsid: str, mon_port: int, memstore_mb: int, mgr_modules: tuple[str, ...]) -> str:
    d = str(root)
    daemon = (f"log file = {d}/log/$name.log\n"
              f"admin socket = {d}/run/$name.asok\n")
    return f"""[global]
fsid = {fsid}
mon host = [v2:127.0.0.1:{mon_port}]
mon initial members = a
public addr = 127.0.0.1
ms bind ipv6 = false
auth allow insecure global id reclaim = false
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = {memstore_mb << 20}
paxos propose interval = 0.1
mgr stats period = 1
mgr tick period = 1
mgr module path = {d}/mgr-modules
mgr initial modules =
mon cluster log file = {d}/log/cluster.log
mon data avail warn = 1
mon data avail crit = 0
keyring = {d}/keys/$name.keyring
run dir = {d}/run
pid file = {d}/run/$name.pid
crash dir = {d}/crash
mon data = {d}/data/$name
mgr data = {d}/data/$name
osd data = {d}/data/$name
mds data = {d}/data/$name
log to stderr = false
err to stderr = true

[mon]
{daemon}
[mgr]
{daemon}
[osd]
{daemon}
osd memory target = 536870912
osd op num shards = 2
osd op num threads per shard = 1

[mds]
{daemon}
mds cache memory limit = 67108864
# Reading a file in a fresh CephFS snapshot that a client changed after it was taken
# waits for the MDS to finish that inode's snap flush, which moves on the MDS tick (5 s
# by default): a test that snapshots, changes the live tree and reads the snapshot at
# once stalled 5-15 s; with 1 s ticks, ~1 s.
mds tick interval = 1

[client]
log file = /dev/null
admin socket =
"""


class CephCluster:
    """One mon, one mgr, one memstore OSD and one MDS (CephFS ``cephfs``); see the
    module docstring. ``conf``/``keyring`` are what a client (``rbd -c CONF --keyring
    KEYRING``) needs; ``make_pool(prefix)`` gives a fresh RBD pool."""

    def __init__(self, *, memstore_mb: int = 1024, mds: bool = True, mgr_modules: tuple[str, ...] = DEFAULT_MGR_MODULES,
                 volumes: bool = False) -> None:
        missing = [b for b in BINARIES + (("ceph-mds",) if mds else ()) if shutil.which(b) is None]
        if missing:
            raise CephUnavailable(f"missing {', '.join(sorted(set(missing)))} "
                                  "(apt install ceph-mon ceph-mgr ceph-osd ceph-mds ceph-common)")
        if os.geteuid() != 0:
            raise CephUnavailable("not root: the Ceph test cluster runs its daemons as root")
        self.memstore_mb = memstore_mb
        self.mgr_modules = tuple(mgr_modules) + tuple(m for m in VOLUMES_MODULES if volumes and m not in mgr_modules)
        self.with_mds = mds
        self.root: Path | None = None
        self.fsid = ""
        self.mon_port: int | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list[Any] = []
        self._pools = 0
        self.timings: dict[str, float] = {}

    # -- paths ---------------------------------------------------------------- #

    @property
    def conf(self) -> str:
        assert self.root is not None, "start() first"
        return str(self.root / "ceph.conf")

    @property
    def keyring(self) -> str:
        assert self.root is not None, "start() first"
        return str(self.root / "keys" / "client.admin.keyring")

    def log_tail(self, name: str = "mon.a", n: int = 20) -> str:
        if self.root is None:
            return "(no log)"
        return log_tail(self.root / "log" / f"{name}.log", n)

    # -- lifecycle ------------------------------------------------------------ #

    def start(self) -> CephCluster:
        atexit.register(self.stop)
        try:
            for attempt in range(3):  # the free mon port can be taken before the mon binds it
                try:
                    self._bootstrap()
                    return self
                except RuntimeError:
                    bound = "Address already in use" in self.log_tail("mon.a", 50)
                    if not bound or attempt == 2:
                        raise
                    self._stop_daemons()
            raise AssertionError("unreachable")
        except BaseException:
            self.stop()
            raise

    def _bootstrap(self) -> None:
        t0 = time.monotonic()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
        shm = "/dev/shm"
        parent = shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None
        self.root = root = Path(tempfile.mkdtemp(prefix="drtool-ceph-", dir=parent))
        for sub in ("keys", "log", "run", "crash", "data/mon.a", "data/mgr.x", "data/mds.a", "data/osd.0"):
            (root / sub).mkdir(parents=True)
        self.fsid, self.mon_port = str(uuid.uuid4()), free_port()
        (root / "ceph.conf").write_text(conf_text(root, self.fsid, self.mon_port, self.memstore_mb, self.mgr_modules))
        self._link_mgr_modules(root / "mgr-modules")

        keys = {name: cephx_key() for name in ("mon.", "client.admin", "mgr.x", "mds.a", "osd.0")}
        caps = {
            "mon.": {"mon": "allow *"},
            "client.admin": {"mon": "allow *", "osd": "allow *", "mds": "allow *", "mgr": "allow *"},
            "mgr.x": {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"},
            "mds.a": {"mon": "allow profile mds", "osd": "allow *", "mds": "allow *", "mgr": "allow profile mds"},
            "osd.0": {"mon": "allow profile osd", "mgr": "allow profile osd", "osd": "allow *"},
        }
        files = {"mon.": "mon.a", "client.admin": "client.admin", "mgr.x": "mgr.x", "mds.a": "mds.a", "osd.0": "osd.0"}
        for name, key in keys.items():
            (root / "keys" / f"{files[name]}.keyring").write_text(keyring_text(name, key, caps[name]))
        mkfs_keyring = root / "keys" / "mkfs.keyring"
        mkfs_keyring.write_text("".join(keyring_text(n, keys[n], caps[n]) for n in keys))

        conf = self.conf
        self._check(["monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]",
                     "--enable-all-features", "--set-min-mon-release", "pacific", str(root / "monmap")])
        osd_uuid = str(uuid.uuid4())
        osd_mkfs = self._spawn("osd-mkfs", ["ceph-osd", "-c", conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid,
                                            "--no-mon-config"])
        self._check(["ceph-mon", "-c", conf, "--mkfs", "-i", "a", "--monmap", str(root / "monmap"),
                     "--keyring", str(mkfs_keyring)])
        self.timings["mkfs"] = time.monotonic() - t0

        self._spawn("mon.a", ["ceph-mon", "-c", conf, "-i", "a", "-f"])
        self._spawn("mgr.x", ["ceph-mgr", "-c", conf, "-i", "x", "-f"])
        if self.with_mds:
            self._spawn("mds.a", ["ceph-mds", "-c", conf, "-i", "a", "-f"])
        # one ceph process for the setup commands (each `ceph` run costs ~0.5 s of start-up)
        # (`ceph` reading commands from stdin ignores `-i FILE`: osd.0's key came with the
        # mkfs keyring above, so `osd new` only has to give the OSD its id)
        script = [f"osd new {osd_uuid} 0"]
        if self.with_mds:
            script += ["osd pool create cephfs_metadata 8", "osd pool create cephfs_data 8",
                       "fs new cephfs cephfs_metadata cephfs_data"]
        res = subprocess.run(["ceph", "-c", conf, "--connect-timeout", "30"], input="\n".join(script) + "\n",
                             capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
        if res.returncode != 0 or "Error" in res.stderr:
            raise RuntimeError(f"ceph setup commands failed ({res.returncode}): {res.stderr.strip()[-800:]}\n"
                               f"mon log: {self.log_tail('mon.a')}")
        self.timings["setup_commands"] = time.monotonic() - t0
        if osd_mkfs.wait(timeout=CMD_TIMEOUT_S) != 0:
            raise RuntimeError(f"ceph-osd --mkfs failed: {log_tail(root / 'log' / 'osd-mkfs.out')}")
        self.procs.pop("osd-mkfs", None)
        self._spawn("osd.0", ["ceph-osd", "-c", conf, "-i", "0", "-f"])
        self._wait_ready(t0)
        self.timings["ready"] = time.monotonic() - t0

    def _link_mgr_modules(self, into: Path) -> None:
        """The mgr imports every module on its path before it becomes available (17 s for
        Pacific's ~30 on a busy 2-core machine): give it only ``mgr_modules``."""
        into.mkdir()
        for entry in MGR_MODULE_PATH.iterdir():
            if entry.is_file() or entry.name in self.mgr_modules:
                (into / entry.name).symlink_to(entry)
        for name in set(ALWAYS_ON_MODULES) - set(self.mgr_modules):
            (into / name).mkdir()
            (into / name / "__init__.py").write_text("from .module import Module\n")
            (into / name / "module.py").write_text(STUB_MODULE)  # the mgr looks for this file

    def _check(self, argv: list[str]) -> None:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
        if res.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({res.returncode}): {(res.stderr or res.stdout).strip()[-800:]}")

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        assert self.root is not None
        out = open(self.root / "log" / f"{name}.out", "ab")
        self._logs.append(out)
        proc = subprocess.Popen(argv, cwd=self.root, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent)
        self.procs[name] = proc
        return proc

    def status(self) -> dict[str, Any]:
        return json.loads(self.ceph("status"))

    def _wait_ready(self, t0: float) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        why = "no status yet"
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode} during start-up: {self.log_tail(name)}\n"
                                       f"{log_tail(self.root / 'log' / f'{name}.out') if self.root else ''}")
            try:
                why = self._not_ready(self.status())
            except (RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
                why = str(e)
            if not why:
                return
            time.sleep(0.1)
        raise RuntimeError(f"ceph did not become healthy in {READY_TIMEOUT_S:.0f}s: {why}\n{self.log_tail('mon.a')}")

    def _not_ready(self, st: dict[str, Any]) -> str:
        """Why the cluster is not ready yet ("" when it is)."""
        health = st.get("health", {})
        bad = set(health.get("checks", {})) - ACCEPTABLE_WARNINGS
        if health.get("status") not in ("HEALTH_OK", "HEALTH_WARN") or bad:
            return f"health {health.get('status')}: {sorted(bad)}"
        osdmap = st.get("osdmap", {})
        if osdmap.get("num_up_osds") != 1 or osdmap.get("num_in_osds") != 1:
            return f"osd not up/in: {osdmap}"
        if not st.get("mgrmap", {}).get("available"):
            return "mgr not available"
        pgmap = st.get("pgmap", {})
        if self.with_mds and not pgmap.get("num_pgs"):  # the mgr's first report (it carries its health checks too)
            return "no PG stats from the mgr yet"
        states = {s["state_name"]: s["count"] for s in pgmap.get("pgs_by_state", [])}
        if pgmap.get("num_pgs", 0) and states.get("active+clean", 0) != pgmap["num_pgs"]:
            return f"pgs: {states}"
        if self.with_mds:
            fsmap = st.get("fsmap", {})
            if fsmap.get("up", 0) < 1 or not any(m.get("status") == "up:active" for m in fsmap.get("by_rank", [])):
                return f"mds not active: {fsmap}"
        return ""

    def stop(self) -> None:
        atexit.unregister(self.stop)
        try:
            self._stop_daemons()
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def _stop_daemons(self) -> None:
        procs, self.procs = list(self.procs.values()), {}
        for proc in procs:  # all at once: the mds ignores SIGTERM, the others need a moment
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        for proc in procs:
            proc.wait(timeout=10)
            gone = time.monotonic() + 5
            while alive(proc.pid) and time.monotonic() < gone:
                time.sleep(0.02)
        for f in self._logs:
            f.close()
        self._logs = []

    def __enter__(self) -> CephCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- use ------------------------------------------------------------------ #

    def ceph(self, *args: str, timeout: float = CMD_TIMEOUT_S) -> str:
        """``ceph -c CONF --format json ARGS`` -> stdout (RuntimeError with stderr on failure)."""
        argv = ["ceph", "-c", self.conf, "--connect-timeout", "30", "--format", "json", *args]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[3:])} failed ({res.returncode}): {res.stderr.strip()[-800:]}")
        return res.stdout

    def rbd(self, *args: str, timeout: float = CMD_TIMEOUT_S, **kw: Any) -> subprocess.CompletedProcess:
        """``rbd -c CONF ARGS`` (checked), for test set-up that is not the backend under test."""
        res = subprocess.run(["rbd", "-c", self.conf, *args], capture_output=True, timeout=timeout, **kw)
        if res.returncode != 0:
            raise RuntimeError(f"rbd {' '.join(args)} failed ({res.returncode}): {res.stderr.decode(errors='replace')[-800:]}")
        return res

    @property
    def has_volumes(self) -> bool:
        return all(m in self.mgr_modules for m in VOLUMES_MODULES)

    def enable_volumes(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Load the real mgr ``volumes`` module (and ``orchestrator``) into the running
        mgr, if it has stubs: the stubs' links are swapped for the real modules and
        ``ceph mgr fail`` makes the mgr re-execute itself (same PID) and import them;
        returns once ``ceph fs subvolume ls`` answers. Idempotent; the time it took is in
        ``timings["enable_volumes"]``."""
        assert self.root is not None, "start() first"
        if self.has_volumes:
            return
        t0 = time.monotonic()
        into = self.root / "mgr-modules"
        for name in VOLUMES_MODULES:
            if (into / name).is_symlink():
                continue
            shutil.rmtree(into / name)
            (into / name).symlink_to(MGR_MODULE_PATH / name)
        self.mgr_modules += tuple(m for m in VOLUMES_MODULES if m not in self.mgr_modules)
        self.ceph("mgr", "fail", "x")
        deadline = time.monotonic() + timeout
        why = ""
        while time.monotonic() < deadline:
            mgr = self.procs.get("mgr.x")
            if mgr is not None and mgr.poll() is not None:
                raise RuntimeError(f"mgr.x exited {mgr.returncode} while reloading its modules: {self.log_tail('mgr.x')}")
            try:  # answers once the new mgr is active with its modules loaded
                self.ceph("fs", "subvolume", "ls", "cephfs" if self.with_mds else "none", timeout=30)
                self.timings["enable_volumes"] = time.monotonic() - t0
                return
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                why = str(e)
                if not self.with_mds and "ENOENT" in why:  # the module answered: no fs is fine
                    self.timings["enable_volumes"] = time.monotonic() - t0
                    return
            time.sleep(0.2)
        raise RuntimeError(f"the mgr volumes module did not answer in {timeout:.0f}s: {why[-300:]}\n"
                           f"{self.log_tail('mgr.x')}")

    def make_pool(self, prefix: str = "rbd") -> str:
        """A fresh replicated pool (size 1, 8 PGs) named ``prefix-N-xxxx``, initialised for RBD."""
        self._pools += 1
        name = f"{prefix}-{self._pools}-{uuid.uuid4().hex[:6]}"
        self.ceph("osd", "pool", "create", name, "8", "8", "replicated", "--size", "1")
        self.rbd("pool", "init", name)
        return name
