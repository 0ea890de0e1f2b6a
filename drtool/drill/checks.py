"""The checks a drill step runs on what it restored. Each returns (ok, message, detail)
and raises nothing for a failed check: a DrtoolError becomes a failed check with its
message. Checks that need a server (etcd, vault) start a scratch one inside the step's
scratch directory and always stop it."""
from __future__ import annotations

import re
import time
import types
from pathlib import Path
from typing import Any

from .. import exec as ex
from ..durations import parse_duration
from ..errors import DrtoolError
from .model import Check

Outcome = tuple[bool, str, dict[str, Any]]


class StepContext:
    """What a check knows about its step: the restored point and where it went."""

    def __init__(self, ctx: Any, policy: Any, leg: Any, point: Any, target: Path, restore_detail: dict[str, Any], work: Path) -> None:
        self.ctx, self.policy, self.leg, self.point = ctx, policy, leg, point
        self.target, self.restore_detail, self.work = target, restore_detail, work
        self.kube: Any = None  # the kubernetes scratch, and the namespaces this step restored into
        self.namespaces: list[str] = []
        self.cancel: Any = None
        self.step: str | None = None

    def artifact(self) -> Path:
        """The one file a platform restore produced (an etcd or raft snapshot)."""
        files = [p for p in self.target.rglob("*") if p.is_file()]
        if len(files) != 1:
            raise DrtoolError(f"expected one restored snapshot file under {self.target}, found {len(files)}")
        return files[0]

    def source_doc(self) -> dict[str, Any]:
        """The backup-time record of the point: an upload's manifest, or a restic run's detail."""
        doc = self.restore_detail.get("manifest")
        if isinstance(doc, dict):
            return doc
        from ..legs.restic_backup import _platform_doc

        return _platform_doc(self.ctx, self.policy.name, self.leg.leg_name, self.point.id)

    def platform(self, cls: type) -> Any:
        return cls(types.SimpleNamespace(ctx=self.ctx, policy=self.policy, leg=self.leg))


def run_check(check: Check, sc: StepContext) -> Outcome:
    fn = {"etcd": _etcd, "vault": _vault, "tree-compare": _tree_compare, "http": _http, "command": _command,
          "gpu-compute": _gpu("gpu_compute"), "gpu-inference": _gpu("gpu_inference"), "transcode": _gpu("transcode"),
          "k8s-ready": _k8s_ready, "k8s-gpu": _k8s_gpu}[check.kind]
    if sc.point is None and check.kind in NEEDS_RESTORE:
        return False, f"a {check.kind} check inspects restored data: give the step a 'restore'", {}
    try:
        return fn(check.spec, sc)
    except DrtoolError as exc:
        return False, str(exc), {}


NEEDS_RESTORE = ("etcd", "vault", "tree-compare")


def _gpu(name: str) -> Any:
    def call(spec: Any, sc: StepContext) -> Outcome:
        from . import gpu

        return getattr(gpu, name)(spec, sc)
    return call


def _k8s_ready(spec: Any, sc: StepContext) -> Outcome:
    if sc.kube is None or not sc.namespaces:
        return False, "a k8s-ready check needs a step that restored with 'velero' (the namespaces to watch)", {}
    return sc.kube.ready(spec, sc.namespaces, cancel=sc.cancel)


def _k8s_gpu(spec: Any, sc: StepContext) -> Outcome:
    """Nodes advertise the resource; a probe pod requesting one runs in the step's scratch
    namespace (created for the step when it restored nothing)."""
    if sc.kube is None:
        return False, "a k8s-gpu check needs 'scratch: kubernetes'", {}
    if not sc.namespaces:
        sc.namespaces.append(sc.kube.create_namespace(sc.step or "gpu"))
    return sc.kube.gpu_probe(spec, sc.namespaces[0], cancel=sc.cancel)


def _etcd(spec: Any, sc: StepContext) -> Outcome:
    from ..legs.platform import EtcdSnapshotSource

    problems, proved = sc.platform(EtcdSnapshotSource).verify_file(sc.artifact(), sc.source_doc(), sc.work, spec.sample)
    return not problems, "; ".join(problems) or proved, {}


def _vault(spec: Any, sc: StepContext) -> Outcome:
    from ..legs.platform import VaultRaftSource

    problems, proved = sc.platform(VaultRaftSource).sample(sc.artifact(), sc.source_doc(), sc.work, canaries=spec.canaries)
    return not problems, "; ".join(problems) or proved, {}


def _tree_compare(spec: Any, sc: StepContext) -> Outcome:
    import random

    from .. import manifest
    from ..legs.restic_backup import full_manifest_of, manifest_of

    entries = manifest_of(sc.ctx, sc.policy.name, sc.leg.leg_name, sc.point.id)
    if not entries:
        return False, f"no backup-time BLAKE3 manifest was recorded for {sc.point.id[:12]} (only restic backup legs record one)", {}
    if spec.mode == "full":
        every = full_manifest_of(sc.ctx, sc.policy.name, sc.leg.leg_name, sc.point.id)
        if every is None:
            return False, (f"a full tree-compare needs every file's backup-time BLAKE3, and {sc.point.id[:12]} recorded a sample only: "
                           "set 'verify: {manifest: full}' on the leg"), {}
        chosen = every
    else:
        chosen = random.Random().sample(entries, min(sc.leg.verify.sample_files, len(entries)))
    bad = manifest.compare_tree(sc.target, chosen)
    if bad:
        return False, f"{len(bad)} of {len(chosen)} files differ from the backup-time manifest: {'; '.join(bad[:5])}", {"mismatches": bad[:50]}
    return True, f"{len(chosen)} files ({spec.mode}) match their backup-time BLAKE3", {"files": len(chosen)}


def _http(spec: Any, sc: StepContext) -> Outcome:
    import urllib.error  # here: urllib.request brings http.client and ssl, which only this check needs
    import urllib.request

    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(spec.url, timeout=30) as resp:  # noqa: S310 - the drill file names the URL
            status, body = resp.status, resp.read(1 << 20)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(1 << 20) if exc.fp else b""
    except OSError as exc:
        return False, f"GET {spec.url} failed: {exc}", {}
    ms = round((time.monotonic() - t0) * 1000, 1)
    problems = []
    if status != spec.status:
        problems.append(f"status {status}, expected {spec.status}")
    if spec.body_regex and not re.search(spec.body_regex, body.decode(errors="replace")):
        problems.append(f"the body does not match /{spec.body_regex}/")
    if spec.latency_ms is not None and ms > spec.latency_ms:
        problems.append(f"{ms} ms, over the {spec.latency_ms} ms budget")
    detail = {"status": status, "latency_ms": ms}
    return not problems, (f"GET {spec.url}: " + ("; ".join(problems) if problems else f"{status} in {ms} ms")), detail


def _command(spec: Any, sc: StepContext) -> Outcome:
    res = ex.run(list(spec.argv), cwd=str(sc.target), env={"DRTOOL_SCRATCH": str(sc.target)}, check=False,
                 timeout=parse_duration(spec.timeout).total_seconds())
    problems = []
    if res.returncode != spec.expect_exit:
        problems.append(f"exit {res.returncode}, expected {spec.expect_exit}: {res.stderr_tail(2) or 'no message'}")
    if spec.stdout_regex and not re.search(spec.stdout_regex, res.stdout or ""):
        problems.append(f"stdout does not match /{spec.stdout_regex}/")
    return not problems, f"{spec.argv[0]}: " + ("; ".join(problems) if problems else f"exit {res.returncode}"), {"exit": res.returncode}
