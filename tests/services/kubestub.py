"""A recorded-API STUB of the kube-apiserver for drtool's kubernetes drill scratch.

No kube-apiserver and no Velero server run on the machines that test drtool. ``ApiStub``
is a small local HTTP server on 127.0.0.1 that plays the kube-apiserver's REST answers
for exactly the calls drtool makes (namespaces, Velero Backups and Restores, workload
lists, nodes and the GPU probe pod), recording every request so tests assert the exact calls. It is NOT Kubernetes:
no admission, no defaulting, no garbage collection, no Velero work. The object builders
below produce documented shapes; tests validate them against the official schemas.
"""
from __future__ import annotations

import copy
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["ApiStub", "backup", "deployment", "job", "node", "pod_status", "pvc", "statefulset", "VELERO"]

VELERO = "/apis/velero.io/v1/namespaces/velero"


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A kube-apiserver error body (a metav1.Status)."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class ApiStub:
    """A recorded-API stub of the kube-apiserver (NOT Kubernetes: see the module docstring).

    State the tests script:
      backups        name -> Backup object (velero ns); lists honour ``labelSelector=k=v``
      restore_script statuses a created Restore shows on its 1st, 2nd, … GET (the last repeats)
      workloads      (namespace or "*", plural) -> successive item lists for its 1st, 2nd, … list (last repeats)
      vanish_after   GETs of a deleted namespace still answered (Terminating) before it is gone (404)
      sticky         namespaces that never go away after DELETE (a stuck finalizer)
      nodes          the Node objects ``GET /api/v1/nodes`` lists (see ``node()``)
      pod_script     statuses a created Pod shows on its 1st, 2nd, … GET (the last repeats; see ``pod_status()``)
      pod_node       the spec.nodeName a Pod shows once its status says it is scheduled
      fail           (method, path) -> (code, reason, message): answer that error instead
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.namespaces: dict[str, dict[str, Any]] = {}
        self.deleted: dict[str, int] = {}
        self.backups: dict[str, dict[str, Any]] = {}
        self.restores: dict[str, dict[str, Any]] = {}
        self.served_restores: list[dict[str, Any]] = []
        self.restore_script: list[dict[str, Any]] = [{"phase": "New"}, {"phase": "InProgress"},
                                                     {"phase": "Completed", "warnings": 0, "errors": 0}]
        self.restore_gets: dict[str, int] = {}
        self.workloads: dict[tuple[str, str], list[list[dict[str, Any]]]] = {}
        self.list_gets: dict[tuple[str, str], int] = {}
        self.vanish_after = 1
        self.sticky: set[str] = set()
        self.fail: dict[tuple[str, str], tuple[int, str, str]] = {}
        self.nodes: list[dict[str, Any]] = []
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.pod_script: list[dict[str, Any]] = [pod_status("Pending"), pod_status("Running"), pod_status("Succeeded")]
        self.pod_gets: dict[tuple[str, str], int] = {}
        self.served_pods: list[dict[str, Any]] = []
        self.pod_node = "gpu-1"
        self.created: dict[tuple[str, str, str], dict[str, Any]] = {}  # (plural, ns, name) -> body of a created Secret/PVC/Job
        self.job_script: list[dict[str, Any]] = [{"active": 1}, {"succeeded": 1, "conditions": [
            {"type": "Complete", "status": "True", "reason": "Completed"}]}]
        self.job_gets: dict[tuple[str, str], int] = {}
        self.job_pods: list[dict[str, Any]] = []  # what listing a Job's pods (labelSelector job-name=…) answers
        self._rv = 1000
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _serve(self, method: str) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                body = json.loads(raw) if raw else None
                url = urllib.parse.urlsplit(self.path)
                query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
                with stub._lock:
                    shown = url.path + (("?" + urllib.parse.unquote(url.query)) if url.query else "")
                    stub.requests.append((method, shown, body))
                    stub.headers.append({k.lower(): v for k, v in self.headers.items()})
                    code, doc = stub.route(method, url.path, query, body)
                data = json.dumps(doc).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_DELETE(self) -> None:
                self._serve("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02},
                                       name="k8s-api-stub", daemon=True)

    def start(self) -> "ApiStub":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def write_kubeconfig(self, path: Any, *, token: str = "stub-token") -> Any:
        """A kubeconfig (JSON is YAML) whose current context ``lab`` points at this stub."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "lab",
            "clusters": [{"name": "stub", "cluster": {"server": self.url}}],
            "users": [{"name": "drill", "user": {"token": token}}],
            "contexts": [{"name": "lab", "context": {"cluster": "stub", "user": "drill"}}]}))
        return path

    def client(self) -> Any:
        import kubernetes

        cfg = kubernetes.client.Configuration(host=self.url)
        return kubernetes.client.ApiClient(cfg)

    # -- the REST routes drtool uses ---------------------------------------------------

    def _meta(self, meta: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        self._rv += 1
        out = dict(meta)
        if namespace:
            out["namespace"] = namespace
        out.update(uid=f"00000000-0000-4000-8000-{self._rv:012d}", resourceVersion=str(self._rv),
                   creationTimestamp="2026-11-27T09:30:01Z")
        return out

    def route(self, method: str, path: str, query: dict[str, str], body: Any) -> tuple[int, dict[str, Any]]:
        if (method, path) in self.fail:
            code, reason, message = self.fail[(method, path)]
            return code, _status(code, reason, message)
        parts = path.strip("/").split("/")
        # core/v1 namespaces
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 3 and method == "POST":
            name = body["metadata"]["name"]
            if name in self.namespaces:
                return 409, _status(409, "AlreadyExists", f'namespaces "{name}" already exists')
            obj = {**body, "metadata": self._meta(body["metadata"]), "spec": {"finalizers": ["kubernetes"]},
                   "status": {"phase": "Active"}}
            self.namespaces[name] = obj
            return 201, obj
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 4:
            name = parts[3]
            obj = self.namespaces.get(name)
            if obj is None:
                return 404, _status(404, "NotFound", f'namespaces "{name}" not found')
            if method == "DELETE":
                if name in self.deleted:
                    return 409, _status(409, "Conflict", f'Operation cannot be fulfilled on namespaces "{name}": The system is '
                                        "ensuring all content is removed from this namespace.  Upon completion, this namespace "
                                        "will automatically be purged by the system.")
                self.deleted[name] = 0
                obj["metadata"]["deletionTimestamp"] = "2026-11-27T09:45:00Z"
                obj["status"] = {"phase": "Terminating"}
                return 200, obj
            if method == "GET":
                if name in self.deleted:
                    self.deleted[name] += 1
                    if name not in self.sticky and self.deleted[name] > self.vanish_after:
                        del self.namespaces[name]
                        return 404, _status(404, "NotFound", f'namespaces "{name}" not found')
                return 200, obj
        # core/v1 nodes (cluster-scoped) and pods
        if parts == ["api", "v1", "nodes"] and method == "GET":
            items = [{k: v for k, v in copy.deepcopy(n).items() if k not in ("apiVersion", "kind")} for n in self.nodes]
            return 200, {"kind": "NodeList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._rv)}, "items": items}
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) in (5, 6) and parts[4] == "pods":
            ns = parts[3]
            if method == "POST" and len(parts) == 5:
                if ns not in self.namespaces:
                    return 404, _status(404, "NotFound", f'namespaces "{ns}" not found')
                if ns in self.deleted:
                    return 403, _status(403, "Forbidden", f'pods "{body["metadata"]["name"]}" is forbidden: unable to create new '
                                        f"content in namespace {ns} because it is being terminated")
                pname = body["metadata"]["name"]
                if (ns, pname) in self.pods:
                    return 409, _status(409, "AlreadyExists", f'pods "{pname}" already exists')
                obj = {**copy.deepcopy(body), "metadata": self._meta(body["metadata"], ns),
                       "status": {"phase": "Pending", "qosClass": "BestEffort"}}
                self.pods[(ns, pname)] = obj
                return 201, obj
            if method == "GET" and len(parts) == 6:
                pname = parts[5]
                if (ns, pname) not in self.pods:
                    return 404, _status(404, "NotFound", f'pods "{pname}" not found')
                i = self.pod_gets.get((ns, pname), 0)
                self.pod_gets[(ns, pname)] = i + 1
                status = copy.deepcopy(self.pod_script[min(i, len(self.pod_script) - 1)])
                obj = copy.deepcopy(self.pods[(ns, pname)])
                obj["status"] = status
                scheduled = any(c.get("type") == "PodScheduled" and c.get("status") == "True" for c in status.get("conditions") or [])
                if scheduled and self.pod_node:
                    obj["spec"]["nodeName"] = self.pod_node
                self.served_pods.append(copy.deepcopy(obj))
                return 200, obj
        # namespaced creates: Secrets, PVCs, Jobs (a restore Job into a fresh PVC); a Job's GET and its pods
        creatable = {("api", "v1", "secrets"), ("api", "v1", "persistentvolumeclaims"), ("apis", "batch/v1", "jobs")}
        if method == "POST" and len(parts) >= 5 and parts[-3] == "namespaces":
            group = "v1" if parts[0] == "api" else "/".join(parts[1:3])
            if (parts[0], group, parts[-1]) in creatable:
                ns, plural = parts[-2], parts[-1]
                if ns not in self.namespaces:
                    return 404, _status(404, "NotFound", f'namespaces "{ns}" not found')
                name = body["metadata"]["name"]
                if (plural, ns, name) in self.created:
                    return 409, _status(409, "AlreadyExists", f'{plural} "{name}" already exists')
                obj = {**copy.deepcopy(body), "metadata": self._meta(body["metadata"], ns)}
                self.created[(plural, ns, name)] = copy.deepcopy(body)
                if plural == "secrets":  # the apiserver folds stringData into data and never returns it
                    obj.pop("stringData", None)
                    obj["data"] = {k: "<redacted by the stub>" for k in (body.get("stringData") or {})}
                return 201, obj
        if parts[:3] == ["apis", "batch", "v1"] and len(parts) == 7 and parts[5] == "jobs" and method == "GET":
            ns, name = parts[4], parts[6]
            if ("jobs", ns, name) not in self.created:
                return 404, _status(404, "NotFound", f'jobs.batch "{name}" not found')
            i = self.job_gets.get((ns, name), 0)
            self.job_gets[(ns, name)] = i + 1
            obj = copy.deepcopy(self.created[("jobs", ns, name)])
            obj["metadata"] = self._meta(obj["metadata"], ns)
            obj["status"] = copy.deepcopy(self.job_script[min(i, len(self.job_script) - 1)])
            return 200, obj
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) == 5 and parts[4] == "pods" and method == "GET":
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": str(self._rv)},
                         "items": copy.deepcopy(self.job_pods)}
        # workload lists
        kinds = {("api", "v1", "persistentvolumeclaims"): "PersistentVolumeClaimList",
                 ("apis", "apps/v1", "deployments"): "DeploymentList", ("apis", "apps/v1", "statefulsets"): "StatefulSetList",
                 ("apis", "apps/v1", "daemonsets"): "DaemonSetList", ("apis", "batch/v1", "jobs"): "JobList"}
        if method == "GET" and len(parts) >= 5 and parts[-3] == "namespaces":
            group = "v1" if parts[0] == "api" else "/".join(parts[1:3])
            kind = kinds.get((parts[0], group, parts[-1]))
            if kind is not None:
                ns, plural = parts[-2], parts[-1]
                script = self.workloads.get((ns, plural)) or self.workloads.get(("*", plural)) or [[]]
                i = self.list_gets.get((ns, plural), 0)
                self.list_gets[(ns, plural)] = i + 1
                items = []
                for obj in script[min(i, len(script) - 1)]:
                    item = {k: v for k, v in copy.deepcopy(obj).items() if k not in ("apiVersion", "kind")}  # as in a real list
                    item["metadata"]["namespace"] = ns
                    items.append(item)
                return 200, {"kind": kind, "apiVersion": "v1" if group == "v1" else group,
                             "metadata": {"resourceVersion": str(self._rv)}, "items": items}
        # velero.io/v1
        if parts[:3] == ["apis", "velero.io", "v1"] and len(parts) >= 6 and parts[3] == "namespaces":
            if parts[4] != "velero" or parts[5] not in ("backups", "restores"):
                return 404, _status(404, "NotFound", "the server could not find the requested resource")
            plural, name = parts[5], (parts[6] if len(parts) > 6 else None)
            if plural == "backups" and method == "GET" and name is None:
                items = list(self.backups.values())
                if "labelSelector" in query:
                    k, v = query["labelSelector"].split("=", 1)
                    items = [b for b in items if (b["metadata"].get("labels") or {}).get(k) == v]
                return 200, {"apiVersion": "velero.io/v1", "kind": "BackupList", "metadata": {"resourceVersion": "7"},
                             "items": items}
            if plural == "backups" and method == "GET":
                if name not in self.backups:
                    return 404, _status(404, "NotFound", f'backups.velero.io "{name}" not found')
                return 200, self.backups[name]
            if plural == "restores" and method == "POST" and name is None:
                rname = body["metadata"]["name"]
                obj = {**body, "metadata": self._meta(body["metadata"])}
                self.restores[rname] = obj
                return 201, obj
            if plural == "restores" and method == "GET" and name is not None:
                if name not in self.restores:
                    return 404, _status(404, "NotFound", f'restores.velero.io "{name}" not found')
                i = self.restore_gets.get(name, 0)
                self.restore_gets[name] = i + 1
                obj = {**self.restores[name], "status": self.restore_script[min(i, len(self.restore_script) - 1)]}
                self.served_restores.append(copy.deepcopy(obj))
                return 200, obj
        return 404, _status(404, "NotFound", "the server could not find the requested resource")

    # -- helpers for assertions ------------------------------------------------------

    def calls(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _ in self.requests]


def backup(name: str, phase: str, completed: str | None, schedule: str | None = "immich-daily") -> dict[str, Any]:
    labels = {"velero.io/storage-location": "default"}
    if schedule:
        labels["velero.io/schedule-name"] = schedule
    status: dict[str, Any] = {"phase": phase, "startTimestamp": "2026-11-20T02:00:00Z", "version": 1}
    if completed:
        status["completionTimestamp"] = completed
    return {"apiVersion": "velero.io/v1", "kind": "Backup",
            "metadata": {"name": name, "namespace": "velero", "labels": labels, "uid": f"uid-{name}"},
            "spec": {"includedNamespaces": ["immich"], "storageLocation": "default", "ttl": "720h0m0s"}, "status": status}


def deployment(name: str, ready: int, replicas: int = 1) -> dict[str, Any]:
    obj = {"apiVersion": "apps/v1", "kind": "Deployment",
           "metadata": {"name": name, "generation": 1, "labels": {"app": name}},
           "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                    "template": {"metadata": {"labels": {"app": name}},
                                 "spec": {"containers": [{"name": name, "image": f"ghcr.io/immich-app/{name}:v2"}]}}},
           "status": {"observedGeneration": 1, "replicas": replicas, "readyReplicas": ready, "availableReplicas": ready}}
    if not ready:
        del obj["status"]["readyReplicas"], obj["status"]["availableReplicas"]  # as the apiserver omits zeroes
    return obj


def statefulset(name: str, ready: int) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name, "generation": 1},
            "spec": {"replicas": 1, "serviceName": name, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": name, "image": "docker.io/library/postgres:16"}]}}},
            "status": {"observedGeneration": 1, "replicas": 1, "readyReplicas": ready, "availableReplicas": ready}}


def pvc(name: str, phase: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}},
            "status": {"phase": phase}}


def job(name: str, condition: str | None) -> dict[str, Any]:
    status: dict[str, Any] = {"active": 1} if condition is None else {
        "conditions": [{"type": condition, "status": "True", "reason": "BackoffLimitExceeded" if condition == "Failed" else "Completed"}]}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": name, "image": "busybox:1.36"}]}}},
            "status": status}


def node(name: str, allocatable: dict[str, str]) -> dict[str, Any]:
    """A Ready Node whose allocatable (and capacity) include ``allocatable`` (e.g. {"amd.com/gpu": "1"})."""
    base = {"cpu": "8", "memory": "32812548Ki", "pods": "110", "ephemeral-storage": "95491020Ki"}
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                                                   "kubernetes.io/arch": "amd64"}},
            "spec": {"podCIDR": "10.244.1.0/24"},
            "status": {"capacity": {**base, **allocatable}, "allocatable": {**base, **allocatable},
                       "addresses": [{"type": "InternalIP", "address": "192.168.10.21"}, {"type": "Hostname", "address": name}],
                       "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                       "message": "kubelet is posting ready status",
                                       "lastHeartbeatTime": "2026-11-27T09:29:50Z", "lastTransitionTime": "2026-11-20T08:00:00Z"}]}}


def pod_status(phase: str, *, exit_code: int | None = None, reason: str | None = None, message: str | None = None,
               unschedulable: str | None = None, waiting: tuple[str, str] | None = None, container: str = "probe",
               image: str = "busybox:1.36") -> dict[str, Any]:
    """A Pod status as the kubelet/scheduler report it.

    Pending: not yet looked at (nothing else); ``unschedulable``: PodScheduled=False with that
    scheduler message; ``waiting=(reason, message)``: scheduled, the container waiting (image pull).
    Running: the container running and ready. Succeeded / Failed: the container terminated
    with ``exit_code`` (0 / 1 unless given), ``reason`` (Completed / Error) and ``message``."""
    t = "2026-11-27T09:30:0{}Z"
    st: dict[str, Any] = {"phase": phase, "qosClass": "BestEffort"}
    if phase == "Pending" and unschedulable is not None:
        st["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable,
                             "lastProbeTime": None, "lastTransitionTime": t.format(2)}]
        return st
    if phase == "Pending" and waiting is None:
        return st
    done = phase in ("Succeeded", "Failed")
    running = phase == "Running"
    cs: dict[str, Any] = {"name": container, "image": f"docker.io/library/{image}", "imageID": "", "ready": running,
                          "restartCount": 0, "started": running}
    if phase == "Pending":
        assert waiting is not None
        cs["state"] = {"waiting": {"reason": waiting[0], "message": waiting[1]}}
    elif running:
        cs["state"] = {"running": {"startedAt": t.format(4)}}
        cs["containerID"] = "containerd://" + "ab" * 32
    else:
        term: dict[str, Any] = {"exitCode": (0 if phase == "Succeeded" else 1) if exit_code is None else exit_code,
                                "reason": reason or ("Completed" if phase == "Succeeded" else "Error"),
                                "startedAt": t.format(4), "finishedAt": t.format(6), "containerID": "containerd://" + "ab" * 32}
        if message:
            term["message"] = message
        cs["state"] = {"terminated": term}
        cs["containerID"] = term["containerID"]
        cs["imageID"] = f"docker.io/library/{image}@sha256:" + "0f" * 32
    if running or done:
        cs["imageID"] = f"docker.io/library/{image}@sha256:" + "0f" * 32
    ready = "True" if running else "False"
    st["conditions"] = [
        {"type": "PodReadyToStartContainers", "status": "False" if done else "True", "lastProbeTime": None,
         "lastTransitionTime": t.format(3)},
        {"type": "Initialized", "status": "True", "lastProbeTime": None, "lastTransitionTime": t.format(2)},
        {"type": "Ready", "status": ready, "lastProbeTime": None, "lastTransitionTime": t.format(5),
         **({} if running else {"reason": "PodCompleted" if done else "ContainersNotReady"})},
        {"type": "ContainersReady", "status": ready, "lastProbeTime": None, "lastTransitionTime": t.format(5),
         **({} if running else {"reason": "PodCompleted" if done else "ContainersNotReady"})},
        {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": t.format(2)},
    ]
    st.update(hostIP="192.168.10.21", hostIPs=[{"ip": "192.168.10.21"}], startTime=t.format(2), containerStatuses=[cs])
    if running or done:
        st.update(podIP="10.244.1.17", podIPs=[{"ip": "10.244.1.17"}])
    return st
