"""The ``kubernetes`` drill scratch: a throw-away namespace per restore, labelled and with a
TTL, filled by a Velero ``Restore`` with ``namespaceMapping``, checked for readiness, and
always deleted at teardown.

Everything goes through the official Kubernetes Python client (``pip install
'drtool[k8s]'``), imported lazily so that drtool works without it. What is created:

- a ``Namespace`` ``<prefix>-<drill>-<step>-<random>`` per backed-up namespace, labelled
  ``app.kubernetes.io/managed-by=drtool`` and ``drtool.dev/drill=<drill>``, annotated
  ``drtool.dev/expires-at=<now + ttl>`` so a janitor can remove one that survived a
  crashed drill. It is registered for teardown *before* it is created.
- a ``velero.io/v1`` ``Restore`` in Velero's namespace with ``backupName`` (a named
  backup, or the newest Completed backup of a Velero Schedule, resolved here so that its
  completion time is known for the RPO), ``includedNamespaces`` and ``namespaceMapping``
  (original -> scratch), ``restorePVs`` and ``existingResourcePolicy: none`` (a drill
  never overwrites anything). The Restore object is left in Velero's namespace after the
  drill (it is Velero's record of the restore: ``velero restore describe/logs``).

- for a restore step with ``pvc:``, in a new scratch namespace: a ``Secret``
  ``drtool-restic`` (the repository, its password and the location's env, resolved at
  that moment: the values go nowhere else), a fresh ``PersistentVolumeClaim``, and a
  ``Job`` running ``restic restore <id> --target /restore --verify`` with the Secret as
  its environment and the PVC mounted; its pod's reason is reported when it fails.

- for a ``k8s-gpu`` check, a probe ``Pod`` in the step's scratch namespace requesting one
  of the GPU resource (after checking that enough nodes advertise it); it goes with the
  namespace.

Teardown deletes every scratch namespace with ``propagationPolicy: Foreground`` and waits
until the API answers 404 for each; what is still there is reported as a leftover.

Testing: no kube-apiserver and no Velero run on the machines that test drtool, so
tests/integration/test_k8s_scratch.py checks the manifests against official schemas
(kubernetes-validate for the Namespace, a JSON Schema transcribed from Velero's API docs
for the Restore) and the client calls against a recorded-API *stub* HTTP server that
plays the kube-apiserver's REST responses. A real cluster has not exercised this code.
"""
from __future__ import annotations

import json
import logging
import re
import secrets
import threading
import time
from datetime import datetime, timezone
from typing import Any

from ..durations import parse_duration
from ..errors import BackendError, ConfigError, DrtoolError
from .model import K8sGpuCheck, K8sReadyCheck, KubernetesScratch, PvcRestoreSpec, VeleroRestoreSpec

log = logging.getLogger("drtool.drill.k8s")

MANAGED_BY = "app.kubernetes.io/managed-by"
DRILL_LABEL = "drtool.dev/drill"
STEP_LABEL = "drtool.dev/step"
EXPIRES_AT = "drtool.dev/expires-at"
SCHEDULE_LABEL = "velero.io/schedule-name"
VELERO_GROUP, VELERO_VERSION = "velero.io", "v1"

#: Velero Restore phases (velero.io/v1, as documented); an empty phase means New.
RESTORE_TERMINAL = ("Completed", "PartiallyFailed", "Failed", "FailedValidation")
#: Backup phases a drill may restore from when the backup is named explicitly.
BACKUP_RESTORABLE = ("Completed", "PartiallyFailed")

REQUEST_TIMEOUT = 30.0  # seconds, per API call
MAX_TRANSIENT = 5  # consecutive 5xx/429/connection failures tolerated while polling
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class KubeApiError(BackendError):
    """A Kubernetes API call failed. ``status`` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.status, self.reason = status, reason

    @property
    def transient(self) -> bool:
        return self.status is None or self.status == 429 or self.status >= 500


def _kubernetes() -> Any:
    try:
        from kubernetes import client, config
    except ImportError as exc:
        raise ConfigError(f"the kubernetes drill scratch needs the Kubernetes Python client, which is not installed ({exc}): "
                          "pip install 'drtool[k8s]'") from None
    return client, config


def dns_label(*parts: str, suffix: str = "", limit: int = 63) -> str:
    """``parts`` joined with '-' as an RFC 1123 label (lowercase alphanumerics and '-', at most
    ``limit`` characters, alphanumeric at both ends), ``suffix`` always kept whole."""
    stem = re.sub(r"[^a-z0-9]+", "-", "-".join(p for p in parts if p).lower()).strip("-")
    room = limit - (len(suffix) + 1 if suffix else 0)
    stem = stem[:room].strip("-") or "x"
    name = f"{stem}-{suffix}" if suffix else stem
    assert DNS1123_LABEL.match(name) and len(name) <= limit, name
    return name


def label_value(text: str) -> str:
    """A Kubernetes label value: at most 63 of [A-Za-z0-9_.-], alphanumeric at both ends."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def _iso(dt: datetime) -> str:
    return _utc(dt).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return _utc(datetime.fromisoformat(text.replace("Z", "+00:00")))
    except ValueError:
        return None


def _seconds(td_text: str) -> float:
    return parse_duration(td_text).total_seconds()


class KubeScratch:
    """One drill's kubernetes scratch. Thread-safe: a drill's steps may call it in parallel."""

    def __init__(self, spec: KubernetesScratch, drill: str, *, now: datetime, api_client: Any = None) -> None:
        self.spec, self.drill = spec, drill
        self.now = _utc(now)
        self.ttl = parse_duration(spec.ttl)
        self.namespaces: list[str] = []
        self._gone: set[str] = set()
        self._lock = threading.Lock()
        self.request_timeout = REQUEST_TIMEOUT
        client, _ = _kubernetes()
        self._client = client
        self.api = api_client if api_client is not None else self._load_client()
        self.host = getattr(getattr(self.api, "configuration", None), "host", "?")
        self.core = client.CoreV1Api(self.api)
        self.apps = client.AppsV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def _load_client(self) -> Any:
        """spec.kubeconfig/context if given; else in-cluster config; else ~/.kube/config."""
        client, config = _kubernetes()
        if self.spec.kubeconfig or self.spec.context:
            try:
                return config.new_client_from_config(config_file=self.spec.kubeconfig, context=self.spec.context,
                                                     persist_config=False)
            except (config.ConfigException, OSError, ValueError, TypeError) as exc:
                where = self.spec.kubeconfig or "the default kubeconfig (~/.kube/config or $KUBECONFIG)"
                ctx = f", context {self.spec.context!r}" if self.spec.context else ""
                raise ConfigError(f"kubernetes scratch: cannot load {where}{ctx}: {exc}") from None
        try:
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)
            return client.ApiClient(cfg)
        except config.ConfigException:
            pass
        try:
            return config.new_client_from_config(persist_config=False)
        except (config.ConfigException, OSError, ValueError, TypeError) as exc:
            raise ConfigError("kubernetes scratch: not running in a cluster and no usable kubeconfig "
                              f"(~/.kube/config or $KUBECONFIG): {exc}; set 'kubernetes: {{kubeconfig: …}}' in the drill") from None

    def close(self) -> None:
        try:
            self.api.close()
        except Exception:  # noqa: BLE001 - closing a connection pool must not fail a drill
            pass

    # -- API plumbing ----------------------------------------------------------------

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> dict[str, Any]:
        """One API call, its JSON answer as a dict; every failure a KubeApiError naming ``what``."""
        from kubernetes.client.exceptions import ApiException
        import urllib3

        kw.setdefault("_request_timeout", self.request_timeout)
        try:
            resp = fn(*args, _preload_content=False, **kw)
            data = resp.data
        except ApiException as exc:
            raise self._api_error(what, exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise KubeApiError(f"{what}: cannot reach the Kubernetes API at {self.host}: {exc}") from None
        if not data:
            return {}
        try:
            doc = json.loads(data)
        except ValueError:
            raise KubeApiError(f"{what}: the Kubernetes API at {self.host} answered something that is not JSON: {data[:200]!r}") from None
        return doc if isinstance(doc, dict) else {"value": doc}

    def _api_error(self, what: str, exc: Any) -> KubeApiError:
        status = exc.status or None  # 0: the client never got an answer
        reason = exc.reason or ""
        message, api_reason = "", ""
        try:
            body = json.loads(exc.body) if exc.body else {}
            if isinstance(body, dict):
                message, api_reason = str(body.get("message") or ""), str(body.get("reason") or "")
        except (ValueError, TypeError):
            message = str(exc.body)[:300] if exc.body else ""
        text = f"{what}: the Kubernetes API at {self.host} answered {status or 'nothing'} {api_reason or reason}".rstrip()
        if message:
            text += f": {message}"
        if status in (401, 403):
            text += (" (check the kubeconfig's credentials and RBAC: a drill needs to create, get and delete namespaces, "
                     f"list workloads in them, and create/get restores and list/get backups (velero.io) in namespace {self.spec.velero_namespace})")
        return KubeApiError(text, status, api_reason or reason)

    # -- namespaces ------------------------------------------------------------------

    def namespace_manifest(self, name: str, *, step: str | None = None) -> dict[str, Any]:
        """The scratch Namespace (pure)."""
        labels = {MANAGED_BY: "drtool", DRILL_LABEL: label_value(self.drill)}
        if step:
            labels[STEP_LABEL] = label_value(step)
        return {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "labels": labels,
                "annotations": {EXPIRES_AT: _iso(self.now + self.ttl)},
            },
        }

    def create_namespace(self, step: str) -> str:
        """Create a scratch namespace ``<prefix>-<drill>-<step>-<random>``; return its name. It is
        registered for teardown before the request (a timed-out create may still have happened)."""
        for _ in range(3):
            name = dns_label(self.spec.namespace_prefix, self.drill, step, suffix=secrets.token_hex(3))
            with self._lock:
                self.namespaces.append(name)
            body = self._client.V1Namespace.from_dict(self.namespace_manifest(name, step=step))
            try:
                self._call(f"create scratch namespace {name}", self.core.create_namespace, body)
            except KubeApiError as exc:
                if exc.status is not None and 400 <= exc.status < 500 and exc.status != 429:
                    with self._lock:  # refused, so certainly not created; a 409 is not ours: never delete it
                        self.namespaces.remove(name)
                    if exc.status == 409:  # a name collision: try another random suffix
                        continue
                raise
            log.info("kubernetes scratch: created namespace %s (expires %s)", name, _iso(self.now + self.ttl))
            return name
        raise BackendError(f"could not create a scratch namespace for step {step}: three random names were already taken")

    # -- Velero ----------------------------------------------------------------------

    def restore_manifest(self, spec: VeleroRestoreSpec, backup: str, mapping: dict[str, str], name: str) -> dict[str, Any]:
        """The Velero Restore (pure): ``backup``'s namespaces ``mapping``'s keys restored into its values."""
        return {
            "apiVersion": f"{VELERO_GROUP}/{VELERO_VERSION}",
            "kind": "Restore",
            "metadata": {
                "name": name,
                "namespace": self.spec.velero_namespace,
                "labels": {MANAGED_BY: "drtool", DRILL_LABEL: label_value(self.drill)},
            },
            "spec": {
                "backupName": backup,
                "includedNamespaces": list(mapping),
                "namespaceMapping": dict(mapping),
                "restorePVs": spec.restore_pvs,
                "existingResourcePolicy": "none",
            },
        }

    def _velero(self, verb: str, plural: str, *args: Any, **kw: Any) -> dict[str, Any]:
        """A call on Velero's custom resources in its namespace. A 404 that is not "this object
        does not exist" (no such resource type, no such namespace) says Velero is missing."""
        ns = self.spec.velero_namespace
        fn = {"create": self.custom.create_namespaced_custom_object, "get": self.custom.get_namespaced_custom_object,
              "list": self.custom.list_namespaced_custom_object}[verb]
        what = kw.pop("_what")
        try:
            return self._call(what, fn, VELERO_GROUP, VELERO_VERSION, ns, plural, *args, **kw)
        except KubeApiError as exc:
            if exc.status == 404 and (verb != "get" or "could not find the requested resource" in str(exc)):
                raise KubeApiError(f"{exc}. Is Velero installed (the {plural}.velero.io CRD) with namespace {ns}? Set "
                                   "'kubernetes: {velero_namespace: …}' in the drill if it runs elsewhere", 404, "VeleroMissing") from None
            raise

    def resolve_backup(self, spec: VeleroRestoreSpec) -> dict[str, Any]:
        """The backup to restore: ``{name, completed_at, phase}`` of ``spec.backup``, or of the newest
        Completed Backup labelled ``velero.io/schedule-name=<spec.schedule>``."""
        ns = self.spec.velero_namespace
        if spec.backup is not None:
            try:
                doc = self._velero("get", "backups", spec.backup, _what=f"get Velero backup {spec.backup} in namespace {ns}")
            except KubeApiError as exc:
                if exc.status == 404 and exc.reason != "VeleroMissing":
                    raise DrtoolError(f"Velero backup {spec.backup!r} does not exist in namespace {ns} "
                                      "(velero backup get lists them; or use 'schedule:' for the newest of a schedule)") from None
                raise
            phase = (doc.get("status") or {}).get("phase") or "New"
            if phase not in BACKUP_RESTORABLE:
                raise DrtoolError(f"Velero backup {spec.backup!r} in namespace {ns} is {phase}: only a Completed "
                                  "(or PartiallyFailed) backup can be restored")
            when = self._backup_time(doc)
            if when is None:
                raise DrtoolError(f"Velero backup {spec.backup!r} in namespace {ns} has no completion or start time in its status")
            return {"name": spec.backup, "completed_at": when, "phase": phase}
        assert spec.schedule is not None
        doc = self._velero("list", "backups", label_selector=f"{SCHEDULE_LABEL}={spec.schedule}",
                           _what=f"list the Velero backups of schedule {spec.schedule} in namespace {ns}")
        items = doc.get("items") or []
        done = [(self._backup_time(b), b) for b in items if ((b.get("status") or {}).get("phase") == "Completed")]
        done = [(t, b) for t, b in done if t is not None]
        if not done:
            phases: dict[str, int] = {}
            for b in items:
                p = (b.get("status") or {}).get("phase") or "New"
                phases[p] = phases.get(p, 0) + 1
            seen = ", ".join(f"{n} {p}" for p, n in sorted(phases.items())) or "none at all"
            raise DrtoolError(f"no Completed Velero backup of schedule {spec.schedule!r} in namespace {ns} "
                              f"(backups labelled {SCHEDULE_LABEL}={spec.schedule}: {seen}); "
                              "check 'velero schedule get' and 'velero backup get'")
        when, newest = max(done, key=lambda tb: tb[0])
        return {"name": (newest.get("metadata") or {}).get("name", "?"), "completed_at": when, "phase": "Completed"}

    @staticmethod
    def _backup_time(doc: dict[str, Any]) -> datetime | None:
        st = doc.get("status") or {}
        return (_parse_time(st.get("completionTimestamp")) or _parse_time(st.get("startTimestamp"))
                or _parse_time((doc.get("metadata") or {}).get("creationTimestamp")))

    def velero_restore(self, spec: VeleroRestoreSpec, step: str, *, cancel: threading.Event | None = None,
                       poll: float = 2.0) -> dict[str, Any]:
        """Restore ``spec``'s backup into fresh scratch namespaces (one per backed-up namespace) and
        wait for the Restore to end (or ``spec.timeout``, or ``cancel``).

        On a timeout or cancel the Restore is left running: Velero has no documented way to
        stop one, and it may re-create a mapped namespace after teardown deleted it (without
        drtool's labels)."""
        if cancel is not None and cancel.is_set():
            raise DrtoolError("stopped: the drill was cancelled before the Velero restore started")
        backup = self.resolve_backup(spec)
        mapping = {orig: self.create_namespace(step) for orig in dict.fromkeys(spec.namespaces)}
        name = dns_label("drtool", self.drill, step, suffix=secrets.token_hex(3))
        ns = self.spec.velero_namespace
        self._velero("create", "restores", self.restore_manifest(spec, backup["name"], mapping, name),
                     _what=f"create Velero restore {name} in namespace {ns}")
        log.info("kubernetes scratch: Velero restore %s of backup %s: %s", name, backup["name"],
                 ", ".join(f"{a} -> {b}" for a, b in mapping.items()))
        out: dict[str, Any] = {"restore": name, "backup": backup["name"], "backup_phase": backup["phase"],
                               "backup_time": backup["completed_at"].isoformat(), "phase": "New", "namespaces": mapping,
                               "warnings": 0, "errors": 0, "validation_errors": [], "failure_reason": "", "ok": False,
                               "message": ""}
        limit = _seconds(spec.timeout)
        deadline = time.monotonic() + limit
        transient = 0
        while True:
            try:
                doc = self._velero("get", "restores", name, _what=f"get Velero restore {name} in namespace {ns}")
                transient = 0
            except KubeApiError as exc:
                transient += 1
                if not exc.transient or transient > MAX_TRANSIENT:
                    raise
                log.warning("kubernetes scratch: %s (retrying)", exc)
                doc = None
            if doc is not None:
                st = doc.get("status") or {}
                out["phase"] = st.get("phase") or "New"
                out["warnings"], out["errors"] = int(st.get("warnings") or 0), int(st.get("errors") or 0)
                out["validation_errors"] = list(st.get("validationErrors") or [])
                out["failure_reason"] = str(st.get("failureReason") or "")
                if out["phase"] in RESTORE_TERMINAL:
                    break
            if cancel is not None and cancel.is_set():
                out["message"] = f"Velero restore {name} stopped waiting: the drill was cancelled (last phase {out['phase']})"
                return out
            if time.monotonic() >= deadline:
                out["message"] = (f"Velero restore {name} of backup {backup['name']} did not finish within {spec.timeout} "
                                  f"(last phase {out['phase']}); see 'velero restore describe {name} -n {ns}'")
                return out
            if cancel is not None:
                cancel.wait(min(poll, max(0.0, deadline - time.monotonic())))
            else:
                time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        out["ok"] = out["phase"] == "Completed"
        counts = f"{out['errors']} error(s), {out['warnings']} warning(s)"
        if out["ok"]:
            out["message"] = (f"Velero restore {name} of backup {backup['name']} Completed ({counts}) into "
                              + ", ".join(f"{a} -> {b}" for a, b in mapping.items()))
        else:
            why = [counts]
            if out["failure_reason"]:
                why.append(f"failure reason: {out['failure_reason']}")
            if out["validation_errors"]:
                why.append("validation errors: " + "; ".join(out["validation_errors"]))
            out["message"] = (f"Velero restore {name} of backup {backup['name']} ended {out['phase']}: " + ", ".join(why)
                              + f"; see 'velero restore describe {name} --details -n {ns}' and 'velero restore logs {name} -n {ns}'")
        return out

    # -- restic restore Job into a fresh PVC -----------------------------------------

    RESTIC_SECRET = "drtool-restic"
    RESTORE_MOUNT = "/restore"

    def pvc_manifest(self, spec: PvcRestoreSpec, namespace: str) -> dict[str, Any]:
        """The fresh PersistentVolumeClaim the point is restored into (pure)."""
        pvc_spec: dict[str, Any] = {"accessModes": list(spec.access_modes), "resources": {"requests": {"storage": spec.size}}}
        if spec.storage_class:
            pvc_spec["storageClassName"] = spec.storage_class
        return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "metadata": {"name": spec.name, "namespace": namespace, "labels": {MANAGED_BY: "drtool", DRILL_LABEL: label_value(self.drill)}},
                "spec": pvc_spec}

    def restic_secret_manifest(self, namespace: str, values: dict[str, str]) -> dict[str, Any]:
        """The Secret holding the repository, its password and its env (pure; ``restic_restore``
        builds it just before the request and keeps no copy)."""
        return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": self.RESTIC_SECRET, "namespace": namespace,
                             "labels": {MANAGED_BY: "drtool", DRILL_LABEL: label_value(self.drill)}},
                "stringData": dict(values)}

    def restic_job_manifest(self, spec: PvcRestoreSpec, namespace: str, name: str, snapshot_id: str) -> dict[str, Any]:
        """The restore Job (pure): ``restic restore SNAPSHOT --target /restore --verify`` (restic
        re-reads every restored file against the repository) with the repository, password and
        credentials from the Secret as environment, the fresh PVC at /restore, no retries, and
        killed after ``spec.timeout``."""
        labels = {MANAGED_BY: "drtool", DRILL_LABEL: label_value(self.drill)}
        return {
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "backoffLimit": 0,
                "activeDeadlineSeconds": max(1, int(_seconds(spec.timeout))),
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [{
                            "name": "restic",
                            "image": spec.image,
                            "args": ["restore", snapshot_id, "--target", self.RESTORE_MOUNT, "--verify", "--no-cache"],
                            "envFrom": [{"secretRef": {"name": self.RESTIC_SECRET}}],
                            "volumeMounts": [{"name": "data", "mountPath": self.RESTORE_MOUNT}],
                        }],
                        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": spec.name}}],
                    },
                },
            },
        }

    def restic_restore(self, spec: PvcRestoreSpec, step: str, *, snapshot_id: str, env: dict[str, Any],
                       cancel: threading.Event | None = None, poll: float = 2.0) -> dict[str, Any]:
        """Restore restic snapshot ``snapshot_id`` into a fresh PVC in a new scratch namespace with
        a Job, and wait for it (``spec.timeout``, or ``cancel``). ``env`` (RESTIC_REPOSITORY,
        RESTIC_PASSWORD, the location's env; SecretStr values) goes into a Secret in that
        namespace, which teardown deletes with it; no value is logged or returned."""
        if cancel is not None and cancel.is_set():
            raise DrtoolError("stopped: the drill was cancelled before the restore Job started")
        ns = self.create_namespace(step)
        plain = {k: (v.get_secret_value() if hasattr(v, "get_secret_value") else str(v)) for k, v in env.items()}
        self._call(f"create Secret {self.RESTIC_SECRET} in namespace {ns}", self.core.create_namespaced_secret, ns,
                   self.restic_secret_manifest(ns, plain))
        self._call(f"create PVC {spec.name} in namespace {ns}", self.core.create_namespaced_persistent_volume_claim, ns,
                   self.pvc_manifest(spec, ns))
        job = dns_label("drtool-restore", step, suffix=secrets.token_hex(3))
        self._call(f"create Job {job} in namespace {ns}", self.batch.create_namespaced_job, ns,
                   self.restic_job_manifest(spec, ns, job, snapshot_id))
        log.info("kubernetes scratch: restic restore Job %s/%s of %s into PVC %s", ns, job, snapshot_id[:8], spec.name)
        out: dict[str, Any] = {"namespace": ns, "pvc": spec.name, "job": job, "snapshot": snapshot_id, "state": "waiting",
                               "status": "", "ok": False, "message": "", "polls": 0}
        deadline = time.monotonic() + _seconds(spec.timeout)
        transient = 0
        while True:
            out["polls"] += 1
            try:
                doc = self._call(f"get Job {job} in namespace {ns}", self.batch.read_namespaced_job, job, ns)
                transient = 0
                state, text = self._judge("Job", doc)
                out["state"], out["status"] = state, text
                if state != "waiting":
                    break
            except KubeApiError as exc:
                transient += 1
                if not exc.transient or transient > MAX_TRANSIENT:
                    raise
                log.warning("kubernetes scratch: %s (retrying)", exc)
            if cancel is not None and cancel.is_set():
                out["message"] = f"restore Job {ns}/{job} stopped waiting: the drill was cancelled ({out['status'] or 'not started'})"
                return out
            if time.monotonic() >= deadline:
                out["message"] = f"restore Job {ns}/{job} did not finish within {spec.timeout} ({out['status'] or 'not started'})"
                return out
            pause = min(poll, max(0.0, deadline - time.monotonic()))
            if cancel is not None:
                cancel.wait(pause)
            else:
                time.sleep(pause)
        out["ok"] = out["state"] == "ready"
        if out["ok"]:
            out["message"] = f"restic restored {snapshot_id[:8]} into PVC {ns}/{spec.name} (Job {job} Complete; restore --verify re-read every file)"
            return out
        why = ""
        try:
            pods = self._call(f"list the pods of Job {job}", self.core.list_namespaced_pod, ns, label_selector=f"job-name={job}")
            why = "; ".join(t for t in (self._pod_trouble(p) for p in pods.get("items") or []) if t)
        except KubeApiError as exc:
            why = f"(its pods could not be listed: {self._plain(exc)})"
        out["message"] = f"restore Job {ns}/{job} {out['status']}" + (f": {why}" if why else "")
        return out

    # -- readiness -------------------------------------------------------------------

    def _list(self, kind: str, namespace: str) -> list[dict[str, Any]]:
        fn = {"Deployment": self.apps.list_namespaced_deployment, "StatefulSet": self.apps.list_namespaced_stateful_set,
              "DaemonSet": self.apps.list_namespaced_daemon_set, "Job": self.batch.list_namespaced_job,
              "PersistentVolumeClaim": self.core.list_namespaced_persistent_volume_claim}[kind]
        return list(self._call(f"list {kind}s in namespace {namespace}", fn, namespace).get("items") or [])

    @staticmethod
    def _judge(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
        """(state, text): state is ready, waiting or failed."""
        spec, st, meta = obj.get("spec") or {}, obj.get("status") or {}, obj.get("metadata") or {}
        stale = (meta.get("generation") is not None and st.get("observedGeneration") is not None
                 and st["observedGeneration"] < meta["generation"])
        if kind in ("Deployment", "StatefulSet"):
            want = 1 if spec.get("replicas") is None else int(spec["replicas"])
            have = int(st.get("readyReplicas") or 0)
            text = f"{have}/{want} ready"
            return ("ready" if have >= want and not stale else "waiting"), text + (" (status not yet observed)" if stale else "")
        if kind == "DaemonSet":
            want, have = int(st.get("desiredNumberScheduled") or 0), int(st.get("numberReady") or 0)
            return ("ready" if have >= want and not stale else "waiting"), f"{have}/{want} ready"
        if kind == "PersistentVolumeClaim":
            phase = st.get("phase") or "Pending"
            return ("ready" if phase == "Bound" else "failed" if phase == "Lost" else "waiting"), phase
        if kind == "Job":
            conds = {c.get("type"): c for c in st.get("conditions") or [] if c.get("status") == "True"}
            if "Complete" in conds:
                return "ready", "Complete"
            if "Failed" in conds:
                return "failed", "Failed" + (f" ({conds['Failed'].get('reason')})" if conds["Failed"].get("reason") else "")
            return "waiting", f"{int(st.get('succeeded') or 0)} succeeded, {int(st.get('active') or 0)} active"
        raise ValueError(kind)

    def ready(self, check: K8sReadyCheck, namespaces: list[str], *, cancel: threading.Event | None = None,
              poll: float = 2.0) -> tuple[bool, str, dict[str, Any]]:
        """Every workload of ``check.kinds`` in ``namespaces`` ready (Deployments, StatefulSets,
        DaemonSets: ready replicas as desired; PVCs Bound; Jobs Complete) within ``check.timeout``.
        Finding no workload at all fails: nothing was restored."""
        t0 = time.monotonic()
        deadline = t0 + _seconds(check.timeout)
        where = ", ".join(namespaces) or "(no namespaces)"
        detail: dict[str, Any] = {"namespaces": list(namespaces), "kinds": list(check.kinds), "polls": 0, "workloads": {}}
        transient = 0
        last_error = ""
        while True:
            detail["polls"] += 1
            states: dict[str, tuple[str, str]] = {}
            try:
                for ns in namespaces:
                    for kind in check.kinds:
                        for obj in self._list(kind, ns):
                            states[f"{kind} {ns}/{(obj.get('metadata') or {}).get('name', '?')}"] = self._judge(kind, obj)
                transient, last_error = 0, ""
            except KubeApiError as exc:
                transient += 1
                last_error = str(exc)
                if not exc.transient or transient > MAX_TRANSIENT:
                    detail["seconds"] = round(time.monotonic() - t0, 3)
                    return False, f"readiness not known: {exc}", detail
                states = {}
            detail["workloads"] = {k: text for k, (_, text) in states.items()}
            detail["seconds"] = round(time.monotonic() - t0, 3)
            if not last_error:
                if not states:
                    kinds = "/".join(check.kinds)
                    return False, f"nothing was restored: no {kinds} found in {where}", detail
                failed = [f"{k} {text}" for k, (state, text) in states.items() if state == "failed"]
                waiting = [f"{k} {text}" for k, (state, text) in states.items() if state == "waiting"]
                detail["not_ready"] = failed + waiting
                if failed:
                    return False, f"failed: {'; '.join(failed)}" + (f"; not ready: {'; '.join(waiting)}" if waiting else ""), detail
                if not waiting:
                    counts: dict[str, int] = {}
                    for k in states:
                        counts[k.split(" ", 1)[0]] = counts.get(k.split(" ", 1)[0], 0) + 1
                    summary = ", ".join(f"{n} {kind}" for kind, n in counts.items())
                    return True, f"all {len(states)} ready in {where} ({summary}) after {detail['seconds']:.1f}s", detail
            if cancel is not None and cancel.is_set():
                return False, "stopped: the drill was cancelled; not ready: " + ("; ".join(detail.get("not_ready", [])) or last_error), detail
            if time.monotonic() >= deadline:
                what = "; ".join(detail.get("not_ready", [])) or last_error
                return False, f"not ready after {check.timeout}: {what}", detail
            pause = min(poll, max(0.0, deadline - time.monotonic()))
            if cancel is not None:
                cancel.wait(pause)
            else:
                time.sleep(pause)

    # -- GPU probe -------------------------------------------------------------------

    def probe_pod_manifest(self, check: K8sGpuCheck, namespace: str, name: str) -> dict[str, Any]:
        """The GPU probe Pod (pure): one container running ``check.probe_command`` in
        ``check.probe_image`` with one ``check.resource`` requested and limited, never restarted,
        killed by the kubelet after ``check.timeout``, tolerating the GPU nodes' usual taint."""
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {MANAGED_BY: "drtool", DRILL_LABEL: label_value(self.drill)},
            },
            "spec": {
                "restartPolicy": "Never",
                "activeDeadlineSeconds": max(1, int(_seconds(check.timeout))),
                "automountServiceAccountToken": False,  # the probe has no business with the API
                "tolerations": [{"key": check.resource, "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [{
                    "name": "probe",
                    "image": check.probe_image,
                    "command": list(check.probe_command),
                    "resources": {"limits": {check.resource: "1"}, "requests": {check.resource: "1"}},
                    # a failed probe's last log lines become state.terminated.message
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                }],
            },
        }

    @staticmethod
    def _quantity(value: Any) -> float:
        """A resource quantity ("1", "2", "500m", "1k") as a number; anything unparsable is 0."""
        from kubernetes.utils import parse_quantity

        try:
            return float(parse_quantity(value))
        except (ValueError, TypeError, ArithmeticError):
            return 0.0

    @staticmethod
    def _plain(exc: KubeApiError) -> str:
        """``exc`` without the generic RBAC hint _api_error adds (a probe gives its own)."""
        return str(exc).split(" (check the kubeconfig's credentials and RBAC", 1)[0]

    @staticmethod
    def _pod_trouble(doc: dict[str, Any]) -> str:
        """Why a pod is not (yet) running: the PodScheduled=False condition, a waiting container's
        reason, or a terminated container's exit code; "" when nothing is wrong."""
        st = doc.get("status") or {}
        why: list[str] = []
        for c in st.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                text = f"PodScheduled=False ({c.get('reason') or 'no reason'})"
                if c.get("message"):
                    text += f": {c['message']!r}"
                why.append(text)
        for cs in st.get("containerStatuses") or []:
            state = cs.get("state") or {}
            if "terminated" in state:
                t = state["terminated"] or {}
                text = f"container {cs.get('name', '?')} exited with code {t.get('exitCode', '?')}"
                if t.get("reason"):
                    text += f" ({t['reason']})"
                if t.get("signal"):
                    text += f", signal {t['signal']}"
                if t.get("message"):
                    text += f": {str(t['message']).strip()[-500:]!r}"
                why.append(text)
            elif (state.get("waiting") or {}).get("reason"):
                w = state["waiting"]
                text = f"container {cs.get('name', '?')} waiting: {w['reason']}"
                if w.get("message"):
                    text += f": {w['message']!r}"
                why.append(text)
        if st.get("reason"):  # pod-level: DeadlineExceeded, Evicted, …
            why.append(f"pod {st['reason']}" + (f": {st['message']!r}" if st.get("message") else ""))
        return "; ".join(why)

    def gpu_probe(self, check: K8sGpuCheck, namespace: str, *, cancel: threading.Event | None = None,
                  poll: float = 2.0) -> tuple[bool, str, dict[str, Any]]:
        """At least ``check.min_nodes`` nodes advertise ``check.resource`` (allocatable ≥ 1), and a
        probe pod requesting one, created in ``namespace`` (a scratch namespace: teardown removes
        it), runs ``check.probe_command`` to Succeeded within ``check.timeout``. Failures are
        returned as (False, why, detail), never raised."""
        t0 = time.monotonic()
        deadline = t0 + _seconds(check.timeout)
        res = check.resource
        detail: dict[str, Any] = {"resource": res, "min_nodes": check.min_nodes, "nodes": [], "advertising": {},
                                  "namespace": namespace, "pod": None, "phase": None, "node": None, "polls": 0}

        def done(ok: bool, message: str) -> tuple[bool, str, dict[str, Any]]:
            detail["seconds"] = round(time.monotonic() - t0, 3)
            return ok, message, detail

        if cancel is not None and cancel.is_set():
            return done(False, "stopped: the drill was cancelled before the GPU probe started")
        # (1) the nodes that advertise the resource
        try:
            nodes = list(self._call("list nodes", self.core.list_node).get("items") or [])
        except KubeApiError as exc:
            if exc.status == 403:
                return done(False, f"the drill's service account cannot list nodes: grant get/list on nodes (a ClusterRole; "
                                   f"nodes are cluster-scoped) [{self._plain(exc)}]")
            return done(False, f"cannot list the nodes advertising {res}: {exc}")
        have: dict[str, str] = {}
        for node in nodes:
            node_name = (node.get("metadata") or {}).get("name", "?")
            alloc = (node.get("status") or {}).get("allocatable") or {}
            detail["nodes"].append(node_name)
            if self._quantity(alloc.get(res)) >= 1:
                have[node_name] = str(alloc[res])
        detail["advertising"] = have
        if len(have) < check.min_nodes:
            listed = ", ".join(detail["nodes"][:20]) + (f", … ({len(nodes) - 20} more)" if len(nodes) > 20 else "")
            return done(False, f"{len(have)} of {len(nodes)} node(s) advertise {res} (allocatable ≥ 1), {check.min_nodes} needed"
                               + (f": {', '.join(f'{n} ({q})' for n, q in have.items())}" if have else "")
                               + f"; nodes: {listed or 'none at all'}; is the {res} device plugin running on the GPU nodes?")
        # (2) the probe pod
        name = dns_label("drtool-gpu-probe", self.drill, suffix=secrets.token_hex(3))
        detail["pod"] = name
        body = self._client.V1Pod.from_dict(self.probe_pod_manifest(check, namespace, name))
        try:
            self._call(f"create GPU probe pod {name} in namespace {namespace}", self.core.create_namespaced_pod, namespace, body)
        except KubeApiError as exc:
            hint = " (RBAC: grant create/get on pods in the scratch namespaces)" if exc.status == 403 else ""
            return done(False, f"{self._plain(exc)}{hint}")
        log.info("kubernetes scratch: GPU probe pod %s/%s requests one %s", namespace, name, res)
        where = f"probe pod {namespace}/{name}"
        transient, last_error, doc = 0, "", {}
        phase = "Pending"
        while True:
            detail["polls"] += 1
            try:
                doc = self._call(f"get GPU probe pod {name} in namespace {namespace}", self.core.read_namespaced_pod,
                                 name, namespace)
                transient, last_error = 0, ""
            except KubeApiError as exc:
                transient += 1
                last_error = str(exc)
                if exc.status == 404:
                    return done(False, f"{where} disappeared (deleted or evicted and removed) while {phase}")
                if not exc.transient or transient > MAX_TRANSIENT:
                    return done(False, f"{where}: state not known: {exc}")
                log.warning("kubernetes scratch: %s (retrying)", exc)
            if not last_error:
                phase = (doc.get("status") or {}).get("phase") or "Pending"
                detail["phase"] = phase
                detail["node"] = (doc.get("spec") or {}).get("nodeName") or None
                on = f" on node {detail['node']}" if detail["node"] else ""
                if phase == "Succeeded":
                    return done(True, f"{len(have)} node(s) advertise {res} ({', '.join(have)}); {where} Succeeded{on} "
                                      f"after {time.monotonic() - t0:.1f}s")
                if phase == "Failed":
                    why = self._pod_trouble(doc) or "no reason given"
                    return done(False, f"{where} Failed{on}: {why}")
            if cancel is not None and cancel.is_set():
                return done(False, f"stopped: the drill was cancelled; {where} was {phase}")
            if time.monotonic() >= deadline:
                why = self._pod_trouble(doc) if not last_error else last_error
                if phase == "Pending" and not detail["node"] and not why:
                    why = "not scheduled yet"
                on = f" on node {detail['node']}" if detail["node"] else ""
                return done(False, f"{where} still {phase}{on} after {check.timeout}" + (f": {why}" if why else ""))
            pause = min(poll, max(0.0, deadline - time.monotonic()))
            if cancel is not None:
                cancel.wait(pause)
            else:
                time.sleep(pause)

    # -- teardown --------------------------------------------------------------------

    def teardown(self, *, wait: float = 120, poll: float = 1.0) -> dict[str, Any]:
        """Delete every scratch namespace (propagation Foreground) and wait up to ``wait`` seconds
        until each is gone (404). Idempotent; never raises."""
        try:
            return self._teardown(wait, poll)
        except Exception as exc:  # noqa: BLE001 - teardown reports, it never raises
            log.error("kubernetes scratch teardown failed: %s", exc)
            with self._lock:
                left = [n for n in self.namespaces if n not in self._gone]
            return {"ok": False, "deleted": [], "leftovers": left, "reasons": {n: f"teardown failed: {exc}" for n in left}}

    def _teardown(self, wait: float, poll: float) -> dict[str, Any]:
        with self._lock:
            pending = [n for n in dict.fromkeys(self.namespaces) if n not in self._gone]
        reasons: dict[str, str] = {}
        deleted: list[str] = []
        body = self._client.V1DeleteOptions(propagation_policy="Foreground")
        for name in pending:
            try:
                self._call(f"delete scratch namespace {name}", self.core.delete_namespace, name, body=body)
            except KubeApiError as exc:
                if exc.status == 404:
                    self._mark_gone(name)
                    deleted.append(name)
                elif exc.status != 409:  # 409: already being deleted (Terminating)
                    reasons[name] = str(exc)
                    log.error("kubernetes scratch teardown: %s", exc)
        deadline = time.monotonic() + max(0.0, wait)
        waiting = [n for n in pending if n not in self._gone]
        while waiting:
            for name in list(waiting):
                try:
                    doc = self._call(f"get scratch namespace {name}", self.core.read_namespace, name)
                    phase = (doc.get("status") or {}).get("phase") or "present"
                    if name not in reasons or reasons[name].startswith("still "):
                        reasons[name] = f"still {phase} after waiting {wait:g}s for its deletion"
                except KubeApiError as exc:
                    if exc.status == 404:
                        self._mark_gone(name)
                        deleted.append(name)
                        waiting.remove(name)
                    else:
                        reasons[name] = str(exc)
            if not waiting or time.monotonic() >= deadline:
                break
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        for name in waiting:
            log.error("kubernetes scratch teardown: namespace %s is left: %s", name, reasons.get(name))
        return {"ok": not waiting, "deleted": deleted, "leftovers": list(waiting),
                "reasons": {n: reasons.get(n, "") for n in waiting}}

    def _mark_gone(self, name: str) -> None:
        with self._lock:
            self._gone.add(name)

