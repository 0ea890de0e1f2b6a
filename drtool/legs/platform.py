"""Platform sources for upload legs: a Vault/OpenBao raft snapshot, a Talos (or any)
etcd snapshot, and Talos machine configuration.

Each source writes its artifact to a work directory and PROVES it before it is
uploaded: a raft snapshot must pass the offline SHA256SUMS check (Vault can return an
incomplete snapshot with HTTP 200, vault#13234); an etcd snapshot must report a
revision, and its key counts per /registry/ prefix are recorded at that revision.
Verification later re-proves the downloaded copy: ``integrity`` offline (raft) or by
restoring it into a scratch data dir and counting keys (etcd: ``snapshot status``
passes corrupted files, only a restore catches them); ``sample`` by starting a scratch
server on the restored data and reading from it (Vault: unseal with the ORIGINAL keys
and read the canaries).
"""
from __future__ import annotations

import logging
import shutil
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

from .. import exec as ex
from ..errors import BackendError, SourceError, UsageError
from ..secrets import resolve

if TYPE_CHECKING:
    from .upload import UploadLeg

log = logging.getLogger("drtool.legs.platform")


class PlatformSource:
    """One kind of platform artifact. ``produce`` writes it to ``workdir/<name>`` and
    returns the facts recorded in the manifest as ``source_point``."""

    kind = "?"
    levels_note = ""

    def __init__(self, leg: "UploadLeg") -> None:
        self.leg = leg
        self.ctx = leg.ctx
        self.policy = leg.policy
        self.loc: Any = leg.ctx.cfg.location(leg.policy.source.location)

    @property
    def what(self) -> str:
        raise NotImplementedError

    def default_name(self) -> str:
        raise NotImplementedError

    def produce(self, path: Path) -> dict[str, Any]:
        raise NotImplementedError

    def integrity(self, path: Path, doc: dict[str, Any], workdir: Path) -> tuple[list[str], str]:
        """(problems, what was proved) for a downloaded copy whose SHA-256 already matched."""
        raise NotImplementedError

    def sample(self, path: Path, doc: dict[str, Any], workdir: Path) -> tuple[list[str], str]:
        return self.integrity(path, doc, workdir)

    def restore_hint(self, path: Path) -> str:
        return ""


# --------------------------------------------------------------------------- vault


class VaultRaftSource(PlatformSource):
    kind = "vault-raft"

    @property
    def what(self) -> str:
        return f"the raft snapshot of {self.loc.address}"

    def default_name(self) -> str:
        return "vault.snap"

    def _conn(self, address: str | None = None) -> Any:
        from ..backends.vault import VaultConn

        loc = self.loc
        kw: dict[str, Any] = {}
        if loc.token is not None:
            kw["token"] = resolve(loc.token, what=f"location {self.policy.source.location} token")
        else:
            kw["role_id"] = resolve(loc.approle.role_id, what=f"location {self.policy.source.location} approle.role_id")
            kw["secret_id"] = resolve(loc.approle.secret_id, what=f"location {self.policy.source.location} approle.secret_id")
        return VaultConn(address=address or loc.address, cacert=loc.ca_cert if address is None else None, **kw)

    def produce(self, path: Path) -> dict[str, Any]:
        from ..backends.vault import VaultApi, check_snapshot

        api = VaultApi(self._conn())
        canaries: dict[str, int | None] = {}
        for ref in self.policy.source.canaries:
            try:
                canaries[ref] = api.kv_version(ref)
            except BackendError as exc:
                raise SourceError(f"canary {ref} cannot be read on {self.loc.address}: {exc}") from None
        with open(path, "wb") as out:
            n = api.snapshot(out)
        if n == 0:
            raise SourceError(f"{self.loc.address} returned an empty raft snapshot")
        with open(path, "rb") as f:
            check = check_snapshot(f)
        if not check["ok"]:
            # vault#13234: an incomplete snapshot can come back with HTTP 200
            raise SourceError(f"the raft snapshot from {self.loc.address} is not whole: {'; '.join(check['problems'])}")
        return {"location": self.policy.source.location, "address": self.loc.address, "meta": check.get("meta", {}),
                "members": check.get("members", {}), "canaries": canaries}

    def integrity(self, path: Path, doc: dict[str, Any], workdir: Path) -> tuple[list[str], str]:
        from ..backends.vault import check_snapshot

        with open(path, "rb") as f:
            check = check_snapshot(f)
        problems = list(check["problems"])
        want = (doc.get("source_point") or {}).get("meta", {})
        got = check.get("meta", {})
        for k in ("index", "term"):
            if k in want and got.get(k) != want[k]:
                problems.append(f"meta.json {k} {got.get(k)} ≠ {want[k]} recorded at backup")
        members = ", ".join(f"{n} ({s} B)" for n, s in sorted(check.get("members", {}).items()))
        return problems, f"SHA256SUMS match meta.json and state.bin ({members}); raft index {got.get('index')}"

    def _unseal_keys(self) -> tuple[list[SecretStr], str]:
        from ..breakglass import unseal_keys_from_bundle

        keys = unseal_keys_from_bundle(self.ctx, self.policy.source.location)
        if keys:
            return keys, "the break-glass bundle"
        if not self.loc.unseal_keys:
            raise UsageError(f"location {self.policy.source.location}: a sample verify unseals the restored copy: give 'unseal_keys', "
                             "or build a break-glass bundle (drtool breakglass build) with an identity to read it")
        return [resolve(r, what=f"location {self.policy.source.location} unseal key") for r in self.loc.unseal_keys], \
            f"location {self.policy.source.location}'s unseal_keys"

    def sample(self, path: Path, doc: dict[str, Any], workdir: Path, canaries: list[str] | None = None) -> tuple[list[str], str]:
        """Restore into a scratch server, unseal with the original keys, read every canary
        (``canaries``: these instead of the policy's)."""
        from ..backends.vault import ScratchVault, VaultApi

        problems, proved = self.integrity(path, doc, workdir)
        if problems:
            return problems, proved
        keys, origin = self._unseal_keys()
        recorded = (doc.get("source_point") or {}).get("canaries", {})
        wanted = self.policy.source.canaries if canaries is None else canaries
        read = 0
        with ScratchVault(workdir / "vault", binary=self.loc.server_binary) as scratch:
            scratch.start()
            scratch.restore(path, keys)
            api = VaultApi(self._conn(scratch.address))
            for ref in wanted:
                try:
                    api.read(ref)
                    version = api.kv_version(ref)
                except BackendError as exc:
                    problems.append(f"canary {ref} cannot be read from the restored snapshot: {exc}")
                    continue
                read += 1
                want = recorded.get(ref)
                if want is not None and (version is None or version < want):
                    problems.append(f"canary {ref} is at version {version} in the restore, {want} was recorded at backup")
        return problems, (f"restored into a scratch server, unsealed with the keys from {origin}, "
                          f"{read}/{len(wanted)} canaries read")

    def restore_hint(self, path: Path) -> str:
        return (f"to restore: `bao operator raft snapshot restore -force {path}` (or vault …) on the recovered cluster, "
                "then unseal it with the original keys")


# --------------------------------------------------------------------------- etcd


def talosctl_etcd_snapshot_args(talosctl: str, node: str, path: str) -> list[str]:
    """``talosctl -n NODE etcd snapshot PATH``; the talosconfig travels in $TALOSCONFIG."""
    return [talosctl, "--nodes", node, "etcd", "snapshot", path]


def talosctl_machineconfig_args(talosctl: str, node: str) -> list[str]:
    """``talosctl -n NODE get machineconfig -o yaml`` (stdout)."""
    return [talosctl, "--nodes", node, "get", "machineconfig", "--output", "yaml"]


class _Talos(PlatformSource):
    def _talosctl(self) -> str | None:
        if not self.loc.nodes:
            return None
        found = shutil.which(self.loc.talosctl)
        if found is None and self.loc.etcd is None:
            raise SourceError(f"{self.loc.talosctl} is not installed and location {self.policy.source.location} has no 'etcd' "
                              "endpoint to fall back to: install talosctl, or add 'etcd:' with client certificates")
        return found

    def _talos_env(self) -> dict[str, SecretStr]:
        return {"TALOSCONFIG": resolve(self.loc.talosconfig, what=f"location {self.policy.source.location} talosconfig")}


class EtcdSnapshotSource(_Talos):
    kind = "etcd"

    @property
    def what(self) -> str:
        via = f"talosctl on {self.loc.nodes[0]}" if self.loc.nodes else f"etcdctl on {', '.join(self.loc.etcd.endpoints)}"
        return f"an etcd snapshot ({via}, or etcdctl when talosctl is missing)"

    def default_name(self) -> str:
        return "etcd.db"

    def _etcd(self) -> Any:
        from ..backends.etcd import EtcdCli, EtcdConn

        e = self.loc.etcd
        return EtcdCli(EtcdConn(endpoints=list(e.endpoints), cacert=e.ca_cert, cert=e.cert, key=e.key,
                                etcdctl=self.loc.etcdctl, etcd=self.loc.etcd_binary))

    def produce(self, path: Path) -> dict[str, Any]:
        from ..backends.etcd import snapshot_key_counts, snapshot_status, verify_snapshot

        talosctl = self._talosctl()
        if talosctl:
            res = ex.run(talosctl_etcd_snapshot_args(talosctl, self.loc.nodes[0], str(path)), secret_files=self._talos_env(),
                         check=False, timeout=3600)
            if not res.ok:
                raise SourceError(f"talosctl etcd snapshot on {self.loc.nodes[0]} failed: {res.stderr_tail(3)}")
            via = f"talosctl:{self.loc.nodes[0]}"
        else:
            self._etcd().snapshot_save(path)
            via = "etcdctl:" + ",".join(self.loc.etcd.endpoints)
        status = snapshot_status(path, etcdctl=self.loc.etcdctl)
        if status.total_keys == 0:
            raise SourceError(f"the etcd snapshot ({via}) holds no keys: an empty etcd is not a recovery point")
        if self.loc.etcd is not None:
            try:
                counts = self._etcd().key_counts("/registry/", revision=status.revision)
                counted = "live etcd at the snapshot's revision"
            except BackendError as exc:
                if "compacted" not in str(exc):
                    raise
                # the API server compacted past the snapshot's revision meanwhile (every 5 min by default)
                counts = snapshot_key_counts(path).counts
                counted = "the snapshot file (live etcd had compacted past its revision)"
        else:  # talosctl only: no etcd API here; count what the snapshot holds (a restore proves it whole now)
            out = verify_snapshot(path, None, workdir=path.parent, etcdctl=self.loc.etcdctl, etcd=self.loc.etcd_binary)
            if not out["ok"]:
                raise SourceError(f"the etcd snapshot ({via}) does not restore: {'; '.join(out['problems'])}")
            counts = out["counts"]
            counted = "a restore of the fresh snapshot"
        return {"location": self.policy.source.location, "via": via, "revision": status.revision, "hash": status.hash,
                "total_keys": status.total_keys, "key_counts": counts, "counted_from": counted}

    def _verify(self, path: Path, doc: dict[str, Any], workdir: Path, sample: int) -> tuple[list[str], str]:
        from ..backends.etcd import verify_snapshot

        sp = doc.get("source_point") or {}
        out = verify_snapshot(path, sp.get("key_counts"), workdir=workdir, sample=sample, etcdctl=self.loc.etcdctl, etcd=self.loc.etcd_binary)
        problems = list(out["problems"])
        if out.get("revision") is not None and sp.get("revision") is not None and out["revision"] < sp["revision"]:
            problems.append(f"the restore is at revision {out['revision']}, older than {sp['revision']} recorded at backup")
        counts = out.get("counts") or {}
        proved = (f"restored into a scratch data dir (etcd's own hash check passed); {sum(counts.values())} keys under /registry/ in "
                  f"{len(counts)} prefixes match the counts recorded at backup")
        if sample:
            proved += f"; a scratch etcd serves the same counts, {out.get('keys_read', 0)} random keys read back"
        return problems, proved

    def verify_file(self, path: Path, doc: dict[str, Any], workdir: Path, sample: int) -> tuple[list[str], str]:
        """Restore + key counts against the backup-time record, and ``sample`` random keys read from a scratch etcd."""
        return self._verify(path, doc, workdir, sample)

    def integrity(self, path: Path, doc: dict[str, Any], workdir: Path) -> tuple[list[str], str]:
        return self._verify(path, doc, workdir, 0)

    def sample(self, path: Path, doc: dict[str, Any], workdir: Path) -> tuple[list[str], str]:
        return self._verify(path, doc, workdir, self.leg.leg.verify.sample_files)

    def restore_hint(self, path: Path) -> str:
        return (f"to restore: `talosctl -n <node> bootstrap --recover-from={path}` on a fresh control plane, "
                f"or `etcdctl snapshot restore {path} --data-dir …` for a plain etcd")


class MachineConfigSource(_Talos):
    kind = "machineconfig"

    @property
    def what(self) -> str:
        if self.loc.machine_configs:
            return f"the machine configs in {self.loc.machine_configs} (tar)"
        return f"the machine config of {self.loc.nodes[0] if self.loc.nodes else '?'} (talosctl get machineconfig)"

    def default_name(self) -> str:
        return "machineconfig.tar" if self.loc.machine_configs else "machineconfig.yaml"

    def produce(self, path: Path) -> dict[str, Any]:
        src = self.loc.machine_configs
        if src:
            root = Path(src)
            files = [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
            if not files:
                raise SourceError(f"{src} holds no machine config files")
            with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
                tar.add(str(root), arcname=root.name or "machineconfig")
            return {"location": self.policy.source.location, "via": f"files:{src}", "files": len(files)}
        if not self.loc.nodes:
            raise UsageError(f"location {self.policy.source.location}: machine configs come from 'nodes' (talosctl) or 'machine_configs' (files)")
        talosctl = shutil.which(self.loc.talosctl)
        if talosctl is None:
            raise SourceError(f"{self.loc.talosctl} is not installed: it is needed to read the machine config from {self.loc.nodes[0]} "
                              "(or point 'machine_configs' at the files in git)")
        with open(path, "wb") as out:
            res = ex.run(talosctl_machineconfig_args(talosctl, self.loc.nodes[0]), stdout=out, secret_files=self._talos_env(),
                         check=False, timeout=600)
        if not res.ok:
            raise SourceError(f"talosctl get machineconfig on {self.loc.nodes[0]} failed: {res.stderr_tail(3)}")
        if path.stat().st_size == 0:
            raise SourceError(f"talosctl returned an empty machine config for {self.loc.nodes[0]}")
        return {"location": self.policy.source.location, "via": f"talosctl:{self.loc.nodes[0]}"}

    def integrity(self, path: Path, doc: dict[str, Any], workdir: Path) -> tuple[list[str], str]:
        if path.suffix == ".tar":
            try:
                with tarfile.open(path) as tar:
                    n = sum(1 for m in tar if m.isfile())
            except tarfile.TarError as exc:
                return [f"the tar does not read back: {exc}"], ""
            want = (doc.get("source_point") or {}).get("files")
            if want is not None and n != want:
                return [f"{n} files in the tar, {want} recorded at backup"], ""
            return [], f"the tar reads back with {n} files"
        return [], "SHA-256 matches the manifest"

    def restore_hint(self, path: Path) -> str:
        return f"to restore: `talosctl apply-config --insecure -n <node> --file {path}` on a node in maintenance mode"


def platform_source(leg: "UploadLeg") -> PlatformSource | None:
    """The platform source an upload leg streams, or None for files/commands/zfs."""
    ltype = getattr(leg.ctx.cfg.location(leg.policy.source.location), "type", "")
    if ltype == "vault":
        return VaultRaftSource(leg)
    if ltype == "talos":
        content = leg.leg.upload.content if leg.leg.upload else None
        return MachineConfigSource(leg) if content == "machineconfig" else EtcdSnapshotSource(leg)
    return None
