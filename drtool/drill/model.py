"""Drill files (``drills/*.yaml``): validated like policies, one source of truth for
validation and JSON Schema. A drill is a DAG of steps; each step restores one
recovery point into the scratch environment and runs checks on what came back."""
from __future__ import annotations

import re
from datetime import timedelta
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..durations import parse_duration
from ..policy.models import Duration, Name, Strict

POINT_HINT = "latest, latest-verified, random, or a point id"


def http_url(v: str) -> str:
    """An http(s) URL with a host, or a ValueError that says so."""
    if not re.match(r"^https?://[^/\s]+", v):
        raise ValueError(f"url {v!r} is not an http(s) URL")
    return v


def regex(v: str | None, field: str) -> str | None:
    """A regular expression that compiles, or a ValueError naming the field."""
    if v is not None:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"{field} is not a valid regular expression: {exc}") from None
    return v


class Targets(Strict):
    """What the drill must achieve: both are compared with the measured values."""

    rto: Duration = Field(description="Recovery time objective: the drill's measured restore time (all steps, wall clock) must not exceed it.",
                          examples=["30m"])
    rpo: Duration = Field(description="Recovery point objective: every restored point must be younger than this when the drill starts.",
                          examples=["24h"])


class RestoreSpec(Strict):
    """Which recovery point to restore."""

    policy: Name = Field(description="The policy whose data to restore.", examples=["vault"])
    from_: Name | None = Field(None, alias="from", description="The location to restore from (a leg's target, or the source's location for "
                               "snapshot legs). Optional when the policy has one leg.", examples=["offsite-gcs"])
    leg: Name | None = Field(None, description="The leg to restore from, instead of 'from'.", examples=["upload-offsite-gcs"])
    point: str = Field("latest", description=f"Which point: {POINT_HINT}.", examples=["latest-verified"], min_length=1)


class EtcdCheck(Strict):
    """The restored etcd snapshot restores, and its key counts per /registry/ prefix equal those recorded at backup."""

    sample: int = Field(16, ge=0, description="Also start a scratch etcd on it and read this many random keys (0: counts only).")


class VaultCheck(Strict):
    """The restored raft snapshot unseals in a scratch server with the break-glass keys, and the canaries read back."""

    canaries: list[str] | None = Field(None, description="Secrets to read (mount/path#key). Default: the policy's canaries.",
                                       examples=[["secret/drtool/canary#value"]])


class TreeCompareCheck(Strict):
    """Restored files against the BLAKE3 manifest recorded at backup time."""

    mode: Literal["sample", "full"] = Field("sample", description="sample: a random sample of the manifest; full: every entry.")


class HttpCheck(Strict):
    """An HTTP probe against something the drill brought up."""

    url: str = Field(description="The URL to GET.", examples=["http://127.0.0.1:8080/healthz"])
    status: int = Field(200, ge=100, le=599, description="The expected status code.")
    body_regex: str | None = Field(None, description="A regular expression the body must match.", examples=["ok|healthy"])
    latency_ms: int | None = Field(None, ge=1, description="The latency budget in milliseconds.", examples=[500])

    _url = field_validator("url")(lambda cls, v: http_url(v))
    _regex = field_validator("body_regex")(lambda cls, v: regex(v, "body_regex"))


class CommandCheck(Strict):
    """A command (argv, no shell) run in the step's scratch directory ($DRTOOL_SCRATCH)."""

    argv: list[str] = Field(min_length=1, description="The command.", examples=[["pg_restore", "--list", "db.dump"]])
    expect_exit: int = Field(0, description="The exit code that means success.")
    stdout_regex: str | None = Field(None, description="A regular expression stdout must match.")
    timeout: Duration = Field("10m", description="Killed (and failed) after this long.")

    _regex = field_validator("stdout_regex")(lambda cls, v: regex(v, "stdout_regex"))


class GpuComputeCheck(Strict):
    """A matmul on the GPU checked against a CPU reference, and its TFLOP/s against a floor. ROCm/HIP and CUDA go
    through torch.cuda, Intel Arc through torch.xpu (torch: pip install 'drtool[gpu]'). Without a GPU it runs on the
    CPU and is labelled so: never a GPU pass."""

    device: Literal["auto", "cuda", "rocm", "xpu", "cpu"] = Field("auto", description="Which device to use (auto: the first GPU found).")
    size: int = Field(2048, ge=64, le=16384, description="Matrix size n (n×n @ n×n). Without a GPU the CPU fallback runs at most "
                      "2048 in float32 (a GPU-sized half-precision matmul takes minutes on a CPU), and says so.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Element type.")
    min_tflops: float | None = Field(None, gt=0, description="The device's floor: slower fails the check.", examples=[20])
    tolerance: float = Field(1e-2, gt=0, description="Largest allowed relative error against the CPU reference.")


class GpuInferenceCheck(Strict):
    """An OpenAI-compatible endpoint (Ollama, vLLM) answers a fixed prompt at temperature 0 (chat), or an
    embedding endpoint (Immich ML, …) returns a vector close to a golden one."""

    url: str = Field(description="The endpoint's base URL (…/v1).", examples=["http://127.0.0.1:11434/v1"])
    model: str = Field(description="The model name.", examples=["llama3.2:1b"])
    prompt: str | None = Field(None, description="chat: the prompt, sent with temperature 0.", examples=["Reply with the word ready."])
    expect_regex: str | None = Field(None, description="chat: a regular expression the answer must match.", examples=["(?i)ready"])
    embedding_input: str | None = Field(None, description="embeddings: the input text.")
    golden: list[float] | None = Field(None, description="embeddings: the expected vector.")
    min_similarity: float = Field(0.99, ge=-1, le=1, description="embeddings: the lowest cosine similarity to the golden vector.")
    latency_ms: int | None = Field(None, ge=1, description="The latency budget in milliseconds.")

    _url = field_validator("url")(lambda cls, v: http_url(v).rstrip("/"))
    _regex = field_validator("expect_regex")(lambda cls, v: regex(v, "expect_regex"))

    @model_validator(mode="after")
    def _mode(self) -> "GpuInferenceCheck":
        chat, emb = self.prompt is not None, self.embedding_input is not None
        if chat == emb:
            raise ValueError("give either 'prompt' (chat) or 'embedding_input' (embeddings)")
        if emb and not self.golden:
            raise ValueError("an embeddings check needs 'golden': the expected vector")
        return self


class TranscodeCheck(Strict):
    """ffmpeg transcodes a short sample with the device's hardware acceleration; the output's duration and
    frame count are checked."""

    hwaccel: Literal["vaapi", "qsv", "none"] = Field("vaapi", description="The acceleration to use (none: software, labelled so).")
    device: str = Field("/dev/dri/renderD128", description="The render node (vaapi/qsv).")
    input: str | None = Field(None, description="A sample file; a relative path is inside the step's restore (default: a generated "
                              "720p test pattern).")
    seconds: float = Field(5, gt=0, le=600, description="How much to transcode (a file shorter than this fails).")
    codec: Literal["h264", "hevc", "av1"] = Field("h264", description="The output codec.")


class K8sReadyCheck(Strict):
    """kubernetes scratch: the workloads restored into the scratch namespace become ready."""

    kinds: list[Literal["Deployment", "StatefulSet", "DaemonSet", "Job", "PersistentVolumeClaim"]] = Field(
        default_factory=lambda: ["Deployment", "StatefulSet"], description="Which kinds must all be ready (PVCs: Bound; Jobs: Complete).")
    timeout: Duration = Field("15m", description="How long to wait for readiness.")


class K8sGpuCheck(Strict):
    """kubernetes scratch: nodes advertise the GPU resource, and a probe pod that requests one runs to completion."""

    resource: Literal["amd.com/gpu", "gpu.intel.com/i915", "gpu.intel.com/xe", "nvidia.com/gpu"] = Field(
        description="The extended resource the device plugin advertises.", examples=["amd.com/gpu"])
    min_nodes: int = Field(1, ge=1, description="At least this many nodes must advertise (allocatable ≥ 1).")
    probe_image: str = Field("busybox:1.36", description="The probe pod's image.", examples=["rocm/rocm-terminal:6.2"])
    probe_command: list[str] = Field(default_factory=lambda: ["sh", "-c", "ls /dev/dri /dev/kfd 2>/dev/null | grep -q ."],
                                     min_length=1, description="What the probe runs; exit 0 is a pass.")
    timeout: Duration = Field("10m", description="How long the probe may take (scheduling included).")


CHECK_KINDS = ("etcd", "vault", "tree-compare", "http", "command", "gpu-compute", "gpu-inference", "transcode", "k8s-ready", "k8s-gpu")


class Check(Strict):
    """One check: exactly one of the kinds below, plus whether it must pass."""

    etcd: EtcdCheck | None = None
    vault: VaultCheck | None = None
    tree_compare: TreeCompareCheck | None = Field(None, alias="tree-compare")
    http: HttpCheck | None = None
    command: CommandCheck | None = None
    gpu_compute: GpuComputeCheck | None = Field(None, alias="gpu-compute")
    gpu_inference: GpuInferenceCheck | None = Field(None, alias="gpu-inference")
    transcode: TranscodeCheck | None = None
    k8s_ready: K8sReadyCheck | None = Field(None, alias="k8s-ready")
    k8s_gpu: K8sGpuCheck | None = Field(None, alias="k8s-gpu")
    name: str | None = Field(None, description="A label for reports. Default: the kind.")
    required: bool = Field(True, description="A failed required check fails the drill; an optional one makes it partial (exit 3).")

    @model_validator(mode="after")
    def _one(self) -> "Check":
        given = [k for k in CHECK_KINDS if getattr(self, k.replace("-", "_")) is not None]
        if len(given) != 1:
            raise ValueError(f"a check is exactly one of {', '.join(CHECK_KINDS)} (this one has {', '.join(given) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in CHECK_KINDS if getattr(self, k.replace("-", "_")) is not None)

    @property
    def spec(self) -> Strict:
        return getattr(self, self.kind.replace("-", "_"))

    @property
    def label(self) -> str:
        return self.name or self.kind


class VeleroRestoreSpec(Strict):
    """kubernetes scratch: restore a Velero backup's namespace(s) into the drill's scratch namespace
    (a Velero Restore with namespaceMapping)."""

    backup: str | None = Field(None, description="The Velero Backup's name.", examples=["immich-daily-20261127020000"])
    schedule: str | None = Field(None, description="Or: the newest completed backup of this Velero Schedule.", examples=["immich-daily"])
    namespaces: list[str] = Field(min_length=1, description="The backed-up namespace(s) to restore; each is mapped into the scratch "
                                  "namespace (several: into one scratch namespace each).", examples=[["immich"]])
    restore_pvs: bool = Field(True, description="Restore persistent volumes (data), not only the objects.")
    timeout: Duration = Field("2h", description="How long the Restore may take to complete.")

    @model_validator(mode="after")
    def _which(self) -> "VeleroRestoreSpec":
        if (self.backup is None) == (self.schedule is None):
            raise ValueError("give exactly one of 'backup' (a name) or 'schedule' (its newest completed backup)")
        return self


class PvcRestoreSpec(Strict):
    """kubernetes scratch: the step's restic point restored by a Job in the scratch namespace
    into a fresh PersistentVolumeClaim (``restic restore --verify``), the way an app's volume
    comes back after a disaster."""

    name: str = Field("data", description="The new PVC's name.", examples=["library"], pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    size: str = Field(description="Its requested size (a Kubernetes quantity).", examples=["50Gi"],
                      pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
    storage_class: str | None = Field(None, description="Its StorageClass (default: the cluster's default class).", examples=["ceph-block"])
    access_modes: list[Literal["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany", "ReadOnlyMany"]] = Field(
        default_factory=lambda: ["ReadWriteOnce"], min_length=1, description="Its access modes.")
    image: str = Field("docker.io/restic/restic:0.17.3", description="The restic image the Job runs.", min_length=1)
    timeout: Duration = Field("2h", description="How long the Job may run (its activeDeadlineSeconds too).")


class KubernetesScratch(Strict):
    """Where a kubernetes scratch lives: a throw-away namespace per drill, labelled, with a TTL."""

    kubeconfig: str | None = Field(None, description="Kubeconfig path (default: in-cluster config, then ~/.kube/config).")
    context: str | None = Field(None, description="The kubeconfig context to use.")
    namespace_prefix: Name = Field("drtool-drill", description="Scratch namespaces are named <prefix>-<drill>-<random>.")
    ttl: Duration = Field("6h", description="Written on the namespace as drtool.dev/expires-at, so a janitor can remove one that "
                          "survived a crashed drill.")
    velero_namespace: str = Field("velero", description="Where Velero runs (Restore objects are created there).")


class Step(Strict):
    """One restore into the scratch environment, then its checks."""

    name: Name = Field(description="Step name, unique in the drill.", examples=["vault"])
    needs: list[Name] = Field(default_factory=list, description="Steps that must succeed first (a DAG).", examples=[["etcd"]])
    restore: RestoreSpec | None = Field(None, description="What to restore. None: a step of checks only (e.g. GPU checks on the drill host).")
    velero: VeleroRestoreSpec | None = Field(None, description="kubernetes scratch: restore a Velero backup into the scratch namespace.")
    pvc: PvcRestoreSpec | None = Field(None, description="kubernetes scratch: restore the step's restic point with a Job into a fresh PVC "
                                       "in a scratch namespace, instead of onto the drill host.")
    checks: list[Check] = Field(default_factory=list, description="Checks on what came back.")

    @model_validator(mode="after")
    def _something(self) -> "Step":
        if self.restore is None and self.velero is None and not self.checks:
            raise ValueError(f"step {self.name!r} restores nothing and checks nothing: add 'restore' or 'checks'")
        if self.restore is not None and self.velero is not None:
            raise ValueError(f"step {self.name!r}: give 'restore' (a drtool policy) or 'velero' (a Velero backup), not both")
        if self.pvc is not None and self.restore is None:
            raise ValueError(f"step {self.name!r}: 'pvc' is where a restic point goes: give 'restore' (the policy and point) too")
        return self
    timeout: Duration = Field("1h", description="The step is stopped (and failed) after this long.")


class Drill(Strict):
    """A DR exercise: restores into scratch, checks, measured against RTO/RPO targets."""

    version: Literal[1] = Field(1, description="Drill file format version.")
    name: Name = Field(description="Drill name.", examples=["vault"])
    description: str | None = Field(None, description="Free text for reports.")
    scratch: Literal["local", "kubernetes"] = Field("local", description="Where restores go. local: processes, directories and datasets "
                                                    "on this host, removed afterwards; kubernetes: a throw-away namespace, deleted afterwards.")
    kubernetes: KubernetesScratch | None = Field(None, description="kubernetes scratch: the cluster and namespace settings.")
    targets: Targets = Field(description="RTO and RPO to prove.")
    timeout: Duration = Field("4h", description="The whole drill is stopped, torn down and failed after this long.")
    steps: list[Step] = Field(min_length=1, description="The restores and their checks.")

    @model_validator(mode="after")
    def _scratch(self) -> "Drill":
        velero = [s.name for s in self.steps if s.velero is not None]
        if velero and self.scratch != "kubernetes":
            raise ValueError(f"step(s) {', '.join(velero)} restore with Velero: set 'scratch: kubernetes'")
        pvc = [s.name for s in self.steps if s.pvc is not None]
        if pvc and self.scratch != "kubernetes":
            raise ValueError(f"step(s) {', '.join(pvc)} restore into a PVC: set 'scratch: kubernetes'")
        kube = [f"{s.name} ({c.kind})" for s in self.steps for c in s.checks if c.kind in ("k8s-ready", "k8s-gpu")]
        if kube and self.scratch != "kubernetes":
            raise ValueError(f"kubernetes checks (step {', '.join(kube)}) need 'scratch: kubernetes'")
        return self

    @model_validator(mode="after")
    def _dag(self) -> "Drill":
        names = [s.name for s in self.steps]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"step names must be unique: {', '.join(sorted(dup))}")
        for s in self.steps:
            for n in s.needs:
                if n not in names:
                    raise ValueError(f"step {s.name!r} needs {n!r}, which is not a step of this drill")
                if n == s.name:
                    raise ValueError(f"step {s.name!r} needs itself")
        order = topo_order(self.steps)
        if order is None:
            raise ValueError("the steps' 'needs' form a cycle: a drill is a DAG")
        return self

    @property
    def timeout_td(self) -> timedelta:
        return parse_duration(self.timeout)


def topo_order(steps: list[Step]) -> list[str] | None:
    """Step names in an order that respects ``needs``; None on a cycle."""
    deps = {s.name: set(s.needs) for s in steps}
    out: list[str] = []
    while deps:
        ready = sorted(n for n, d in deps.items() if not d)
        if not ready:
            return None
        for n in ready:
            out.append(n)
            del deps[n]
        for d in deps.values():
            d.difference_update(ready)
    return out


def drill_schema() -> dict:
    """The JSON Schema of drill files (docs/drill.schema.json, for editors)."""
    schema = Drill.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://drtool.dev/schema/drill-1.json"
    schema["title"] = "drtool drill file"
    return schema
