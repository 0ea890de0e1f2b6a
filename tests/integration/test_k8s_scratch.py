"""The kubernetes drill scratch (drtool/drill/k8s.py) against official schemas and a recorded-API STUB.

No kube-apiserver and no Velero server run on the machines that test drtool (see
shared/TESTING.md). So this file proves two things, and no more:

1. The objects drtool creates are valid: the scratch Namespace against the official
   Kubernetes OpenAPI schemas, offline (``kubernetes_validate.validate(doc, "1.37.0",
   strict=True)``), and the Velero Restore against tests/data/velero_restore_schema.json,
   a JSON Schema the project transcribed from Velero's documented ``Restore`` API
   (velero.io/v1; its "description" says where from). The stub's own fixtures (workloads,
   Restore statuses) are validated the same way, so the stub speaks the documented shapes.
2. The client calls are the right ones: ``ApiStub`` below is a small local HTTP server on
   127.0.0.1 that plays the kube-apiserver's REST answers for exactly the calls drtool
   makes (create namespace -> 201, create Restore in Velero's namespace -> 201, get Restore
   -> New, InProgress, Completed on successive GETs, list/get Backups, list workloads,
   delete namespace -> 200 then 404), recording every request (method, path, body), so the
   tests assert the exact calls. It is a STUB, not Kubernetes: it does no admission, no
   defaulting, no garbage collection and no Velero work; the real kubernetes Python client
   talks to it over HTTP.

kubernetes, kubernetes-validate and jsonschema come from the test extra
(scripts/install-deps.sh); missing, the tests skip on a laptop and fail under
DRTOOL_TEST_REQUIRE=all.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from conftest import missing
from services.kubestub import ApiStub, backup, deployment, job, pvc, statefulset
from drtool.drill.model import K8sReadyCheck, KubernetesScratch, VeleroRestoreSpec
from drtool.errors import BackendError, ConfigError, DrtoolError

try:
    import jsonschema
    import kubernetes  # noqa: F401 - the client the stub serves
    import kubernetes_validate
except ImportError as _exc:  # pragma: no cover - the verdict is the fixture's
    _MISSING: ImportError | None = _exc
else:
    _MISSING = None

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "data" / "velero_restore_schema.json"
K8S_VERSION = "1.37.0"
NOW = datetime(2026, 11, 27, 9, 30, tzinfo=timezone.utc)
VELERO = "/apis/velero.io/v1/namespaces/velero"


@pytest.fixture(autouse=True)
def _deps():
    if _MISSING is not None:
        missing(_MISSING.name or "kubernetes", f"pip: kubernetes, kubernetes-validate, jsonschema ({_MISSING})")


# ------------------------------------------------------------------------- the stub (tests/services/kubestub.py)


@pytest.fixture
def stub():
    s = ApiStub().start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def restore_schema() -> dict[str, Any]:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def scratch(stub: ApiStub, **kw: Any) -> Any:
    from drtool.drill.k8s import KubeScratch

    return KubeScratch(KubernetesScratch(**kw), "immich-drill", now=NOW, api_client=stub.client())


def validate_k8s(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# ------------------------------------------------------------------- manifests vs schemas


def test_namespace_manifest_is_valid_labelled_and_expires(stub):
    k = scratch(stub, ttl="6h")
    doc = k.namespace_manifest("drtool-drill-immich-drill-app-0a1b2c")
    validate_k8s(doc)  # official Kubernetes 1.37 schema, unknown fields rejected
    assert doc["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "drtool", "drtool.dev/drill": "immich-drill"}
    assert doc["metadata"]["annotations"] == {"drtool.dev/expires-at": "2026-11-27T15:30:00Z"}  # NOW + 6h, UTC
    validate_k8s(k.namespace_manifest("x", step="app"))
    with pytest.raises(kubernetes_validate.ValidationError):  # strict bites: a misspelt field is an error
        validate_k8s({**doc, "metadata": {**doc["metadata"], "label": {"a": "b"}}})


def test_scratch_names_are_dns1123_labels():
    from drtool.drill.k8s import DNS1123_LABEL, dns_label, label_value

    name = dns_label("drtool-drill", "a" * 60, "Step_With.Dots", suffix="0a1b2c")
    assert len(name) <= 63 and DNS1123_LABEL.match(name) and name.endswith("-0a1b2c") and name.startswith("drtool-drill-aaa")
    assert dns_label("drtool-drill", "lab.prod", "db_1", suffix="ff00ff") == "drtool-drill-lab-prod-db-1-ff00ff"
    assert label_value("-x" * 40).startswith("x") and len(label_value("-x" * 40)) <= 63


def test_restore_manifest_matches_the_documented_velero_api(stub, restore_schema):
    k = scratch(stub)
    spec = VeleroRestoreSpec(backup="immich-daily-20261127020000", namespaces=["immich", "immich-db"], restore_pvs=True)
    mapping = {"immich": "drtool-drill-immich-drill-app-aaaaaa", "immich-db": "drtool-drill-immich-drill-app-bbbbbb"}
    doc = k.restore_manifest(spec, "immich-daily-20261127020000", mapping, "drtool-immich-drill-app-cccccc")
    jsonschema.validate(doc, restore_schema, cls=jsonschema.Draft202012Validator)
    assert doc == {
        "apiVersion": "velero.io/v1", "kind": "Restore",
        "metadata": {"name": "drtool-immich-drill-app-cccccc", "namespace": "velero",
                     "labels": {"app.kubernetes.io/managed-by": "drtool", "drtool.dev/drill": "immich-drill"}},
        "spec": {"backupName": "immich-daily-20261127020000", "includedNamespaces": ["immich", "immich-db"],
                 "namespaceMapping": mapping, "restorePVs": True, "existingResourcePolicy": "none"},
    }
    # the schema bites: a misspelt field, a missing backup, a bad phase, a bad target namespace
    bad = [
        {**doc, "spec": {**{k2: v for k2, v in doc["spec"].items() if k2 != "namespaceMapping"}, "namespaceMappings": mapping}},
        {**doc, "spec": {k2: v for k2, v in doc["spec"].items() if k2 != "backupName"}},
        {**doc, "status": {"phase": "Succeeded"}},
        {**doc, "spec": {**doc["spec"], "namespaceMapping": {"immich": "Not_A_Namespace"}}},
        {**doc, "spec": {**doc["spec"], "existingResourcePolicy": "overwrite"}},
    ]
    for d in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(d, restore_schema, cls=jsonschema.Draft202012Validator)
    scheduled = {**doc, "spec": {"scheduleName": "immich-daily", "includedNamespaces": ["immich"]}}
    jsonschema.validate(scheduled, restore_schema, cls=jsonschema.Draft202012Validator)


def test_stub_fixtures_are_valid_kubernetes_objects():
    """The workloads the stub serves are real Kubernetes shapes (spec and status), so the
    readiness tests read what an apiserver would send."""
    for doc in (deployment("server", 1), deployment("server", 0), statefulset("db", 1), pvc("library", "Bound"),
                job("migrate", "Complete"), job("migrate", "Failed"), job("migrate", None)):
        validate_k8s(doc)


# ---------------------------------------------------------------- velero_restore vs the stub


def test_velero_restore_full_flow_makes_exactly_the_expected_calls(stub, restore_schema):
    stub.backups["immich-daily-20261127020000"] = backup("immich-daily-20261127020000", "Completed", "2026-11-27T02:04:11Z")
    k = scratch(stub)
    spec = VeleroRestoreSpec(backup="immich-daily-20261127020000", namespaces=["immich", "immich-db"], timeout="1m")
    out = k.velero_restore(spec, "app", poll=0.01)

    assert out["ok"] is True, out["message"]
    assert out["phase"] == "Completed" and out["backup"] == "immich-daily-20261127020000"
    assert out["backup_time"] == "2026-11-27T02:04:11+00:00"
    assert list(out["namespaces"]) == ["immich", "immich-db"]
    scratch_ns = list(out["namespaces"].values())
    assert k.namespaces == scratch_ns
    for ns in scratch_ns:
        assert ns.startswith("drtool-drill-immich-drill-app-") and len(ns) <= 63
    name = out["restore"]
    assert name.startswith("drtool-immich-drill-app-")
    assert (out["warnings"], out["errors"]) == (0, 0) and "Completed" in out["message"]

    expected_ns_bodies = [k.namespace_manifest(ns, step="app") for ns in scratch_ns]
    expected_restore = k.restore_manifest(spec, "immich-daily-20261127020000", out["namespaces"], name)
    assert stub.requests == [
        ("GET", f"{VELERO}/backups/immich-daily-20261127020000", None),
        ("POST", "/api/v1/namespaces", expected_ns_bodies[0]),
        ("POST", "/api/v1/namespaces", expected_ns_bodies[1]),
        ("POST", f"{VELERO}/restores", expected_restore),
        ("GET", f"{VELERO}/restores/{name}", None),
        ("GET", f"{VELERO}/restores/{name}", None),
        ("GET", f"{VELERO}/restores/{name}", None),
    ]
    assert expected_restore["spec"]["namespaceMapping"] == dict(zip(["immich", "immich-db"], scratch_ns))
    for body in expected_ns_bodies:
        validate_k8s(body)
    for served in [expected_restore, *stub.served_restores]:  # what we sent, and every status we read back
        jsonschema.validate(served, restore_schema, cls=jsonschema.Draft202012Validator)

    stub.requests.clear()
    td = k.teardown(wait=5, poll=0.01)
    assert td == {"ok": True, "deleted": scratch_ns, "leftovers": [], "reasons": {}}
    assert stub.requests == [
        ("DELETE", f"/api/v1/namespaces/{scratch_ns[0]}", {"propagationPolicy": "Foreground"}),
        ("DELETE", f"/api/v1/namespaces/{scratch_ns[1]}", {"propagationPolicy": "Foreground"}),
        ("GET", f"/api/v1/namespaces/{scratch_ns[0]}", None),  # still Terminating
        ("GET", f"/api/v1/namespaces/{scratch_ns[1]}", None),
        ("GET", f"/api/v1/namespaces/{scratch_ns[0]}", None),  # 404: gone
        ("GET", f"/api/v1/namespaces/{scratch_ns[1]}", None),
    ]
    stub.requests.clear()
    assert k.teardown(wait=5, poll=0.01)["ok"] and stub.requests == []  # idempotent: nothing left to do


def test_schedule_resolves_to_the_newest_completed_backup(stub):
    stub.backups.update({b["metadata"]["name"]: b for b in [
        backup("immich-daily-20261125020000", "Completed", "2026-11-25T02:03:00Z"),
        backup("immich-daily-20261126020000", "Completed", "2026-11-26T02:05:00Z"),  # the one
        backup("immich-daily-20261127020000", "PartiallyFailed", "2026-11-27T02:06:00Z"),
        backup("immich-daily-20261127080000", "InProgress", None),
        backup("other-daily-20261127020000", "Completed", "2026-11-27T03:00:00Z", schedule="other-daily"),
        backup("manual-20261127", "Completed", "2026-11-27T04:00:00Z", schedule=None),
    ]})
    k = scratch(stub)
    got = k.resolve_backup(VeleroRestoreSpec(schedule="immich-daily", namespaces=["immich"]))
    assert got == {"name": "immich-daily-20261126020000", "phase": "Completed",
                   "completed_at": datetime(2026, 11, 26, 2, 5, tzinfo=timezone.utc)}
    assert stub.calls() == [("GET", f"{VELERO}/backups?labelSelector=velero.io/schedule-name=immich-daily")]

    out = k.velero_restore(VeleroRestoreSpec(schedule="immich-daily", namespaces=["immich"]), "app", poll=0.01)
    assert out["ok"] and out["backup"] == "immich-daily-20261126020000"
    assert stub.restores[out["restore"]]["spec"]["backupName"] == "immich-daily-20261126020000"


def test_schedule_without_a_completed_backup_is_a_clear_error(stub):
    stub.backups["immich-daily-1"] = backup("immich-daily-1", "Failed", None)
    stub.backups["immich-daily-2"] = backup("immich-daily-2", "InProgress", None)
    k = scratch(stub)
    with pytest.raises(DrtoolError) as e:
        k.resolve_backup(VeleroRestoreSpec(schedule="immich-daily", namespaces=["immich"]))
    msg = str(e.value)
    assert "no Completed Velero backup of schedule 'immich-daily' in namespace velero" in msg
    assert "1 Failed" in msg and "1 InProgress" in msg
    with pytest.raises(DrtoolError, match="none at all"):
        k.resolve_backup(VeleroRestoreSpec(schedule="nightly", namespaces=["immich"]))
    assert k.namespaces == []  # nothing was created


def test_named_backup_missing_or_unfinished_is_a_clear_error(stub):
    k = scratch(stub)
    with pytest.raises(DrtoolError, match="Velero backup 'nope' does not exist in namespace velero"):
        k.velero_restore(VeleroRestoreSpec(backup="nope", namespaces=["immich"]), "app", poll=0.01)
    stub.backups["running"] = backup("running", "InProgress", None)
    with pytest.raises(DrtoolError, match="is InProgress: only a Completed"):
        k.resolve_backup(VeleroRestoreSpec(backup="running", namespaces=["immich"]))
    assert k.namespaces == [] and not any(m == "POST" for m, _ in stub.calls())


def test_velero_not_installed_says_so(stub):
    k = scratch(stub, velero_namespace="backup-system")
    with pytest.raises(BackendError) as e:
        k.resolve_backup(VeleroRestoreSpec(backup="b", namespaces=["immich"]))
    assert "404" in str(e.value) and "Is Velero installed" in str(e.value) and "backup-system" in str(e.value)


@pytest.mark.parametrize("final, reason", [
    ({"phase": "PartiallyFailed", "warnings": 3, "errors": 2}, "2 error(s), 3 warning(s)"),
    ({"phase": "FailedValidation", "validationErrors": ["Invalid included/excluded namespace lists: bad glob"]},
     "validation errors: Invalid included/excluded namespace lists: bad glob"),
    ({"phase": "Failed", "failureReason": "error downloading backup: object storage unreachable"},
     "failure reason: error downloading backup: object storage unreachable"),
])
def test_a_failed_restore_is_not_ok_and_says_why(stub, restore_schema, final, reason):
    stub.backups["b1"] = backup("b1", "Completed", "2026-11-27T02:04:11Z")
    stub.restore_script = [{"phase": "InProgress"}, final]
    k = scratch(stub)
    out = k.velero_restore(VeleroRestoreSpec(backup="b1", namespaces=["immich"]), "app", poll=0.01)
    assert out["ok"] is False and out["phase"] == final["phase"]
    assert reason in out["message"] and f"ended {final['phase']}" in out["message"]
    assert f"velero restore describe {out['restore']}" in out["message"]
    assert out["errors"] == final.get("errors", 0) and out["validation_errors"] == final.get("validationErrors", [])
    for served in stub.served_restores:
        jsonschema.validate(served, restore_schema, cls=jsonschema.Draft202012Validator)
    # teardown after the failure still removes the scratch namespace
    td = k.teardown(wait=5, poll=0.01)
    assert td["ok"] and td["deleted"] == list(out["namespaces"].values())
    assert ("DELETE", f"/api/v1/namespaces/{td['deleted'][0]}") in stub.calls()


def test_restore_timeout_and_cancel(stub):
    stub.backups["b1"] = backup("b1", "Completed", "2026-11-27T02:04:11Z")
    stub.restore_script = [{"phase": "InProgress"}]
    k = scratch(stub)
    t0 = time.monotonic()
    out = k.velero_restore(VeleroRestoreSpec(backup="b1", namespaces=["immich"], timeout="1s"), "app", poll=0.05)
    assert 0.9 < time.monotonic() - t0 < 5
    assert not out["ok"] and "did not finish within 1s (last phase InProgress)" in out["message"]

    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    t0 = time.monotonic()
    out = k.velero_restore(VeleroRestoreSpec(backup="b1", namespaces=["immich"], timeout="1h"), "db", cancel=cancel, poll=5)
    assert time.monotonic() - t0 < 3
    assert not out["ok"] and "cancelled" in out["message"]
    assert len(k.namespaces) == 2 and k.teardown(wait=5, poll=0.01)["ok"]
    stub.requests.clear()
    with pytest.raises(DrtoolError, match="cancelled before the Velero restore started"):
        k.velero_restore(VeleroRestoreSpec(backup="b1", namespaces=["immich"]), "late", cancel=cancel)
    assert stub.requests == []


def test_teardown_after_a_failed_create_removes_what_was_created(stub):
    """The Restore cannot be created (RBAC): velero_restore raises an error naming the object
    and the API status, and teardown still deletes the namespaces created before it."""
    stub.backups["b1"] = backup("b1", "Completed", "2026-11-27T02:04:11Z")
    stub.fail[("POST", f"{VELERO}/restores")] = (403, "Forbidden", 'restores.velero.io is forbidden: User "drill" cannot create '
                                                 'resource "restores" in API group "velero.io" in the namespace "velero"')
    k = scratch(stub)
    with pytest.raises(BackendError) as e:
        k.velero_restore(VeleroRestoreSpec(backup="b1", namespaces=["immich", "immich-db"]), "app", poll=0.01)
    msg = str(e.value)
    assert msg.startswith("create Velero restore drtool-immich-drill-app-") and "in namespace velero" in msg
    assert "403 Forbidden" in msg and 'cannot create resource "restores"' in msg and "RBAC" in msg
    assert len(k.namespaces) == 2
    td = k.teardown(wait=5, poll=0.01)
    assert td["ok"] and td["deleted"] == k.namespaces and not stub.namespaces


def test_a_name_collision_never_adopts_someone_elses_namespace(stub, monkeypatch):
    from drtool.drill import k8s

    tokens = iter(["aaaaaa", "bbbbbb"])
    monkeypatch.setattr(k8s.secrets, "token_hex", lambda n: next(tokens))
    taken = "drtool-drill-immich-drill-app-aaaaaa"
    stub.namespaces[taken] = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": taken}, "status": {"phase": "Active"}}
    k = scratch(stub)
    assert k.create_namespace("app") == "drtool-drill-immich-drill-app-bbbbbb"
    assert k.namespaces == ["drtool-drill-immich-drill-app-bbbbbb"]
    k.teardown(wait=5, poll=0.01)
    assert taken in stub.namespaces and ("DELETE", f"/api/v1/namespaces/{taken}") not in stub.calls()


def test_a_refused_namespace_create_is_a_clear_error_and_not_left_for_teardown(stub):
    stub.fail[("POST", "/api/v1/namespaces")] = (403, "Forbidden", 'namespaces is forbidden: User "drill" cannot create '
                                                 'resource "namespaces" in API group "" at the cluster scope')
    k = scratch(stub)
    with pytest.raises(BackendError) as e:
        k.create_namespace("app")
    msg = str(e.value)
    assert msg.startswith("create scratch namespace drtool-drill-immich-drill-app-") and "403 Forbidden" in msg
    assert "cannot create resource" in msg and "RBAC" in msg
    assert k.namespaces == []  # refused: nothing exists, so nothing to delete (and no false leftover)
    assert k.teardown(wait=1, poll=0.01) == {"ok": True, "deleted": [], "leftovers": [], "reasons": {}}


def test_teardown_reports_a_namespace_that_never_goes_away(stub):
    k = scratch(stub)
    a, b = k.create_namespace("app"), k.create_namespace("db")
    stub.sticky.add(b)  # a finalizer that never finishes
    t0 = time.monotonic()
    td = k.teardown(wait=0.3, poll=0.05)
    assert time.monotonic() - t0 < 3
    assert td["ok"] is False and td["deleted"] == [a] and td["leftovers"] == [b]
    assert "still Terminating" in td["reasons"][b]
    # again: the gone one is not touched; the stuck one is asked again (409: already terminating) and still left
    stub.requests.clear()
    td = k.teardown(wait=0.1, poll=0.05)
    assert td["leftovers"] == [b] and not td["ok"]
    assert all(p.endswith(b) for _, p in stub.calls()) and stub.calls()[0] == ("DELETE", f"/api/v1/namespaces/{b}")


def test_teardown_never_raises_when_the_api_is_gone(stub):
    k = scratch(stub)
    ns = k.create_namespace("app")
    stub.stop()
    k.api.configuration.retries = 0  # no urllib3 retries: fail fast on the closed port
    k.request_timeout = 2
    td = k.teardown(wait=0.2, poll=0.05)
    assert td["ok"] is False and td["leftovers"] == [ns]
    assert "cannot reach the Kubernetes API at http://127.0.0.1:" in td["reasons"][ns]


# ---------------------------------------------------------------------------- readiness


def test_ready_waits_for_a_deployment_to_become_ready(stub):
    stub.workloads[("scratch-a", "deployments")] = [[deployment("server", 0)], [deployment("server", 1)]]
    stub.workloads[("scratch-a", "statefulsets")] = [[statefulset("db", 1)]]
    k = scratch(stub)
    ok, msg, detail = k.ready(K8sReadyCheck(timeout="10s"), ["scratch-a"], poll=0.01)
    assert ok, msg
    assert "all 2 ready in scratch-a (1 Deployment, 1 StatefulSet)" in msg
    assert detail["polls"] == 2 and detail["workloads"] == {"Deployment scratch-a/server": "1/1 ready",
                                                              "StatefulSet scratch-a/db": "1/1 ready"}
    assert stub.calls() == [
        ("GET", "/apis/apps/v1/namespaces/scratch-a/deployments"),
        ("GET", "/apis/apps/v1/namespaces/scratch-a/statefulsets"),
        ("GET", "/apis/apps/v1/namespaces/scratch-a/deployments"),
        ("GET", "/apis/apps/v1/namespaces/scratch-a/statefulsets"),
    ]


def test_ready_with_zero_workloads_fails_nothing_was_restored(stub):
    k = scratch(stub)
    t0 = time.monotonic()
    ok, msg, detail = k.ready(K8sReadyCheck(timeout="10m"), ["scratch-a", "scratch-b"], poll=0.01)
    assert not ok and time.monotonic() - t0 < 2
    assert msg == "nothing was restored: no Deployment/StatefulSet found in scratch-a, scratch-b"
    assert len(stub.requests) == 4  # both kinds in both namespaces, once


def test_ready_times_out_naming_what_is_not_ready(stub):
    stub.workloads[("*", "deployments")] = [[deployment("server", 0), deployment("ml", 2, replicas=2)]]
    k = scratch(stub)
    t0 = time.monotonic()
    ok, msg, detail = k.ready(K8sReadyCheck(kinds=["Deployment"], timeout="1s"), ["scratch-a"], poll=0.05)
    assert not ok and 0.9 < time.monotonic() - t0 < 5
    assert msg == "not ready after 1s: Deployment scratch-a/server 0/1 ready"
    assert detail["not_ready"] == ["Deployment scratch-a/server 0/1 ready"] and detail["polls"] > 2


def test_ready_pvcs_bound_and_jobs_complete(stub):
    stub.workloads[("*", "persistentvolumeclaims")] = [[pvc("library", "Pending")], [pvc("library", "Bound")]]
    stub.workloads[("*", "jobs")] = [[job("migrate", None)], [job("migrate", "Complete")]]
    k = scratch(stub)
    check = K8sReadyCheck(kinds=["PersistentVolumeClaim", "Job"], timeout="10s")
    ok, msg, detail = k.ready(check, ["scratch-a"], poll=0.01)
    assert ok, msg
    assert detail["workloads"] == {"PersistentVolumeClaim scratch-a/library": "Bound", "Job scratch-a/migrate": "Complete"}
    assert ("GET", "/api/v1/namespaces/scratch-a/persistentvolumeclaims") in stub.calls()
    assert ("GET", "/apis/batch/v1/namespaces/scratch-a/jobs") in stub.calls()

    stub.workloads[("*", "jobs")] = [[job("migrate", "Failed")]]
    stub.list_gets.clear()
    ok, msg, _ = k.ready(check, ["scratch-b"], poll=0.01)
    assert not ok and msg.startswith("failed: Job scratch-b/migrate Failed (BackoffLimitExceeded)")


def test_ready_forbidden_is_a_failed_check_not_a_crash(stub):
    stub.fail[("GET", "/apis/apps/v1/namespaces/scratch-a/deployments")] = (
        403, "Forbidden", 'deployments.apps is forbidden: User "drill" cannot list resource "deployments"')
    k = scratch(stub)
    ok, msg, _ = k.ready(K8sReadyCheck(), ["scratch-a"], poll=0.01)
    assert not ok and "list Deployments in namespace scratch-a" in msg and "403 Forbidden" in msg


# ------------------------------------------------------------------- client configuration


def test_a_generated_kubeconfig_reaches_the_stub_with_its_credentials(stub, tmp_path):
    from drtool.drill.k8s import KubeScratch

    cfg = {"apiVersion": "v1", "kind": "Config", "current-context": "other",
           "clusters": [{"name": "stub", "cluster": {"server": stub.url}},
                        {"name": "nowhere", "cluster": {"server": "http://127.0.0.1:1"}}],
           "users": [{"name": "drill", "user": {"token": "stub-token-123"}}],
           "contexts": [{"name": "lab", "context": {"cluster": "stub", "user": "drill"}},
                        {"name": "other", "context": {"cluster": "nowhere", "user": "drill"}}]}
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    k = KubeScratch(KubernetesScratch(kubeconfig=str(path), context="lab"), "immich-drill", now=NOW)
    ns = k.create_namespace("app")
    assert stub.calls() == [("POST", "/api/v1/namespaces")] and ns in stub.namespaces
    assert stub.headers[0]["authorization"] == "Bearer stub-token-123"
    assert k.teardown(wait=5, poll=0.01)["ok"]

    with pytest.raises(ConfigError, match="cannot load .*kubeconfig.*context 'nope'"):
        KubeScratch(KubernetesScratch(kubeconfig=str(path), context="nope"), "d", now=NOW)
    with pytest.raises(ConfigError, match="cannot load"):
        KubeScratch(KubernetesScratch(kubeconfig=str(tmp_path / "missing")), "d", now=NOW)


def test_without_the_kubernetes_client_the_error_says_what_to_install(monkeypatch):
    from drtool.drill.k8s import KubeScratch

    monkeypatch.setitem(sys.modules, "kubernetes", None)
    with pytest.raises(ConfigError, match=r"pip install 'drtool\[k8s\]'"):
        KubeScratch(KubernetesScratch(), "d", now=NOW)


def test_expiry_annotation_is_utc_even_for_a_local_now(stub):
    from drtool.drill.k8s import KubeScratch

    local = datetime(2026, 11, 27, 10, 30, tzinfo=timezone(timedelta(hours=1)))
    k = KubeScratch(KubernetesScratch(ttl="30m"), "d", now=local, api_client=stub.client())
    assert k.namespace_manifest("x")["metadata"]["annotations"]["drtool.dev/expires-at"] == "2026-11-27T10:00:00Z"


# ---------------------------------------------------------------------------- GPU probe

from services.kubestub import node, pod_status  # noqa: E402 - the GPU probe's builders
from drtool.drill.model import Check, K8sGpuCheck  # noqa: E402

GPU = "amd.com/gpu"
UNSCHEDULABLE = ("0/3 nodes are available: 1 node(s) had untolerated taint {node-role.kubernetes.io/control-plane: }, "
                 "2 Insufficient amd.com/gpu. preemption: 0/3 nodes are available: 1 Preemption is not helpful for "
                 "scheduling, 2 No preemption victims found for incoming pod.")


def gpu_scratch(stub: ApiStub) -> tuple[Any, str]:
    """A scratch and its namespace (as checks._k8s_gpu makes one), the requests log cleared."""
    k = scratch(stub)
    ns = k.create_namespace("gpu")
    stub.requests.clear()
    return k, ns


def test_probe_pod_manifest_is_valid_and_minimal(stub):
    k = scratch(stub)
    check = K8sGpuCheck(resource=GPU, probe_image="rocm/rocm-terminal:6.2", probe_command=["rocminfo"], timeout="5m")
    doc = k.probe_pod_manifest(check, "drtool-drill-immich-drill-gpu-0a1b2c", "drtool-gpu-probe-immich-drill-0a1b2c")
    validate_k8s(doc)  # official Kubernetes 1.37 schema, unknown fields rejected
    assert doc == {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "drtool-gpu-probe-immich-drill-0a1b2c", "namespace": "drtool-drill-immich-drill-gpu-0a1b2c",
                     "labels": {"app.kubernetes.io/managed-by": "drtool", "drtool.dev/drill": "immich-drill"}},
        "spec": {
            "restartPolicy": "Never", "activeDeadlineSeconds": 300, "automountServiceAccountToken": False,
            "tolerations": [{"key": GPU, "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "probe", "image": "rocm/rocm-terminal:6.2", "command": ["rocminfo"],
                            "resources": {"limits": {GPU: "1"}, "requests": {GPU: "1"}},
                            "terminationMessagePolicy": "FallbackToLogsOnError"}],
        },
    }
    for resource in ("nvidia.com/gpu", "gpu.intel.com/i915", "gpu.intel.com/xe"):
        validate_k8s(k.probe_pod_manifest(K8sGpuCheck(resource=resource), "ns", "p"))
    with pytest.raises(kubernetes_validate.ValidationError):  # strict bites: a misspelt field is an error
        validate_k8s({**doc, "spec": {**doc["spec"], "restartpolicy": "Never"}})


def test_gpu_stub_fixtures_are_valid_kubernetes_objects(stub):
    """The Nodes and Pod statuses the stub serves are real Kubernetes shapes."""
    validate_k8s(node("gpu-1", {GPU: "1"}))
    validate_k8s(node("cpu-1", {}))
    pod = scratch(stub).probe_pod_manifest(K8sGpuCheck(resource=GPU), "ns", "p")
    for st in (pod_status("Pending"), pod_status("Pending", unschedulable=UNSCHEDULABLE),
               pod_status("Pending", waiting=("ImagePullBackOff", 'Back-off pulling image "busybox:1.36"')),
               pod_status("Running"), pod_status("Succeeded"), pod_status("Failed", exit_code=2, message="no /dev/kfd")):
        validate_k8s({**pod, "status": st})
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s({**pod, "status": {**pod_status("Running"), "phse": "Running"}})


def test_gpu_probe_passes_and_makes_exactly_the_expected_calls(stub):
    stub.nodes = [node("cpu-1", {}), node("gpu-1", {GPU: "1"})]
    stub.pod_script = [pod_status("Pending"), pod_status("Running"), pod_status("Succeeded")]
    k, ns = gpu_scratch(stub)
    check = K8sGpuCheck(resource=GPU, timeout="10s")
    ok, msg, detail = k.gpu_probe(check, ns, poll=0.01)

    assert ok, msg
    name = detail["pod"]
    assert name.startswith("drtool-gpu-probe-immich-drill-") and len(name) <= 63
    assert msg.startswith(f"1 node(s) advertise {GPU} (gpu-1); probe pod {ns}/{name} Succeeded on node gpu-1 after ")
    assert detail["advertising"] == {"gpu-1": "1"} and detail["nodes"] == ["cpu-1", "gpu-1"]
    assert (detail["phase"], detail["node"], detail["namespace"], detail["polls"]) == ("Succeeded", "gpu-1", ns, 3)
    assert 0 <= detail["seconds"] < 5
    manifest = k.probe_pod_manifest(check, ns, name)
    assert stub.requests == [
        ("GET", "/api/v1/nodes", None),
        ("POST", f"/api/v1/namespaces/{ns}/pods", manifest),
        ("GET", f"/api/v1/namespaces/{ns}/pods/{name}", None),
        ("GET", f"/api/v1/namespaces/{ns}/pods/{name}", None),
        ("GET", f"/api/v1/namespaces/{ns}/pods/{name}", None),
    ]
    assert [p["status"]["phase"] for p in stub.served_pods] == ["Pending", "Running", "Succeeded"]
    for served in [manifest, *stub.served_pods]:  # what we sent, and every pod we read back
        validate_k8s(served)
    # the pod lives in the scratch namespace: teardown (the namespace's deletion) is all the cleanup
    stub.requests.clear()
    td = k.teardown(wait=5, poll=0.01)
    assert td["ok"] and td["deleted"] == [ns]
    assert [m for m, p in stub.calls() if "/pods" in p] == []


def test_gpu_probe_without_an_advertising_node_fails_without_creating_a_pod(stub):
    stub.nodes = [node("cp-1", {}), node("worker-1", {GPU: "0"}), node("worker-2", {"nvidia.com/gpu": "1"})]
    k, ns = gpu_scratch(stub)
    ok, msg, detail = k.gpu_probe(K8sGpuCheck(resource=GPU, timeout="10s"), ns, poll=0.01)
    assert not ok
    assert msg.startswith(f"0 of 3 node(s) advertise {GPU} (allocatable ≥ 1), 1 needed; nodes: cp-1, worker-1, worker-2")
    assert "device plugin" in msg
    assert detail["pod"] is None and detail["advertising"] == {}
    assert stub.calls() == [("GET", "/api/v1/nodes")] and stub.pods == {}

    # min_nodes: one advertising node is not two
    stub.nodes = [node("gpu-1", {GPU: "2"}), node("gpu-2", {GPU: "0"})]
    stub.requests.clear()
    ok, msg, detail = k.gpu_probe(K8sGpuCheck(resource=GPU, min_nodes=2), ns, poll=0.01)
    assert not ok and msg.startswith(f"1 of 2 node(s) advertise {GPU} (allocatable ≥ 1), 2 needed: gpu-1 (2); nodes: gpu-1, gpu-2")
    assert stub.calls() == [("GET", "/api/v1/nodes")]

    stub.nodes = []
    ok, msg, _ = k.gpu_probe(K8sGpuCheck(resource=GPU), ns, poll=0.01)
    assert not ok and "0 of 0 node(s)" in msg and "nodes: none at all" in msg


def test_gpu_probe_pod_failed_names_the_exit_code(stub):
    stub.nodes = [node("gpu-1", {GPU: "1"})]
    stub.pod_script = [pod_status("Pending"), pod_status("Failed", exit_code=1, message="ls: /dev/kfd: No such file or directory\n")]
    k, ns = gpu_scratch(stub)
    ok, msg, detail = k.gpu_probe(K8sGpuCheck(resource=GPU, timeout="10s"), ns, poll=0.01)
    assert not ok
    name = detail["pod"]
    assert msg == (f"probe pod {ns}/{name} Failed on node gpu-1: container probe exited with code 1 (Error): "
                   "'ls: /dev/kfd: No such file or directory'")
    assert (detail["phase"], detail["node"], detail["polls"]) == ("Failed", "gpu-1", 2)
    assert len(stub.calls()) == 4  # nodes, create, two GETs
    for served in stub.served_pods:
        validate_k8s(served)


def test_gpu_probe_pending_past_the_timeout_quotes_the_scheduler(stub):
    stub.nodes = [node("gpu-1", {GPU: "1"}), node("gpu-2", {GPU: "1"})]
    stub.pod_script = [pod_status("Pending", unschedulable=UNSCHEDULABLE)]
    k, ns = gpu_scratch(stub)
    t0 = time.monotonic()
    ok, msg, detail = k.gpu_probe(K8sGpuCheck(resource=GPU, timeout="1s"), ns, poll=0.05)
    assert not ok and 0.9 < time.monotonic() - t0 < 5
    assert msg == f"probe pod {ns}/{detail['pod']} still Pending after 1s: PodScheduled=False (Unschedulable): {UNSCHEDULABLE!r}"
    assert "2 Insufficient amd.com/gpu" in msg
    assert detail["phase"] == "Pending" and detail["node"] is None and detail["polls"] > 2
    assert stub.pods[(ns, detail["pod"])]["spec"]["activeDeadlineSeconds"] == 1
    assert [m for m, _ in stub.calls()].count("POST") == 1  # one pod, polled; never re-created

    # scheduled but the image never comes: the waiting reason is named
    stub.pod_script = [pod_status("Pending", waiting=("ImagePullBackOff", 'Back-off pulling image "busybox:1.36"'))]
    ok, msg, detail = k.gpu_probe(K8sGpuCheck(resource=GPU, timeout="1s"), ns, poll=0.05)
    assert not ok and "still Pending on node gpu-1 after 1s: container probe waiting: ImagePullBackOff" in msg


def test_gpu_probe_forbidden_nodes_is_a_clear_failure(stub):
    stub.fail[("GET", "/api/v1/nodes")] = (403, "Forbidden", 'nodes is forbidden: User "system:serviceaccount:drtool:drill" '
                                           'cannot list resource "nodes" in API group "" at the cluster scope')
    k, ns = gpu_scratch(stub)
    ok, msg, detail = k.gpu_probe(K8sGpuCheck(resource=GPU), ns, poll=0.01)
    assert not ok
    assert msg.startswith("the drill's service account cannot list nodes: grant get/list on nodes")
    assert "403 Forbidden" in msg and 'cannot list resource "nodes"' in msg
    assert "create, get and delete namespaces" not in msg  # the generic namespace/Velero hint would mislead
    assert detail["pod"] is None and stub.calls() == [("GET", "/api/v1/nodes")]


def test_gpu_probe_forbidden_pod_create_and_cancel(stub):
    stub.nodes = [node("gpu-1", {GPU: "1"})]
    k, ns = gpu_scratch(stub)
    stub.fail[("POST", f"/api/v1/namespaces/{ns}/pods")] = (403, "Forbidden", 'pods is forbidden: User "drill" cannot create '
                                                            f'resource "pods" in API group "" in the namespace "{ns}"')
    ok, msg, _ = k.gpu_probe(K8sGpuCheck(resource=GPU), ns, poll=0.01)
    assert not ok and msg.startswith("create GPU probe pod drtool-gpu-probe-immich-drill-")
    assert "403 Forbidden" in msg and "grant create/get on pods" in msg
    del stub.fail[("POST", f"/api/v1/namespaces/{ns}/pods")]

    stub.pod_script = [pod_status("Pending", unschedulable=UNSCHEDULABLE)]
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    t0 = time.monotonic()
    ok, msg, _ = k.gpu_probe(K8sGpuCheck(resource=GPU, timeout="1h"), ns, cancel=cancel, poll=5)
    assert not ok and time.monotonic() - t0 < 3 and msg.startswith("stopped: the drill was cancelled;")
    stub.requests.clear()
    ok, msg, _ = k.gpu_probe(K8sGpuCheck(resource=GPU), ns, cancel=cancel)
    assert not ok and "cancelled before the GPU probe started" in msg and stub.requests == []


def test_k8s_gpu_check_runs_the_probe_in_a_fresh_scratch_namespace(stub, tmp_path):
    """checks._k8s_gpu (the contract): a step that restored nothing gets a scratch namespace;
    the probe runs there and teardown removes both."""
    from drtool.drill.checks import StepContext, run_check

    stub.nodes = [node("gpu-1", {GPU: "1"})]
    stub.pod_script = [pod_status("Succeeded")]
    k = scratch(stub)
    sc = StepContext(None, None, None, None, tmp_path, {}, tmp_path)
    sc.kube, sc.step = k, "gpu"
    ok, msg, detail = run_check(Check.model_validate({"k8s-gpu": {"resource": GPU}}), sc)
    assert ok, msg
    assert sc.namespaces == k.namespaces and len(k.namespaces) == 1 and detail["namespace"] == k.namespaces[0]
    assert stub.calls()[:3] == [("POST", "/api/v1/namespaces"), ("GET", "/api/v1/nodes"),
                                ("POST", f"/api/v1/namespaces/{k.namespaces[0]}/pods")]
    assert k.teardown(wait=5, poll=0.01)["ok"] and not stub.namespaces


# ------------------------------------------------------------ restic restore Job into a fresh PVC


def _pvc_spec(**kw: Any) -> Any:
    from drtool.drill.model import PvcRestoreSpec

    return PvcRestoreSpec(**{"name": "library", "size": "20Gi", "storage_class": "ceph-block", "timeout": "1m", **kw})


def test_pvc_restore_manifests_are_valid_kubernetes_objects(stub):
    k = scratch(stub)
    spec = _pvc_spec()
    validate_k8s(k.pvc_manifest(spec, "ns1"))
    validate_k8s(k.restic_secret_manifest("ns1", {"RESTIC_PASSWORD": "p", "RESTIC_REPOSITORY": "s3:http://h/b", "AWS_ACCESS_KEY_ID": "k"}))
    jobdoc = k.restic_job_manifest(spec, "ns1", "drtool-restore-lib-0a1b2c", "f" * 64)
    validate_k8s(jobdoc)
    c = jobdoc["spec"]["template"]["spec"]["containers"][0]
    assert c["args"] == ["restore", "f" * 64, "--target", "/restore", "--verify", "--no-cache"]
    assert c["envFrom"] == [{"secretRef": {"name": "drtool-restic"}}] and "env" not in c  # no value in the Job
    assert jobdoc["spec"]["backoffLimit"] == 0 and jobdoc["spec"]["activeDeadlineSeconds"] == 60
    assert jobdoc["spec"]["template"]["spec"]["volumes"] == [{"name": "data", "persistentVolumeClaim": {"claimName": "library"}}]
    assert "storageClassName" not in k.pvc_manifest(_pvc_spec(storage_class=None), "ns1")["spec"]


def test_pvc_restore_full_flow_secret_values_only_in_the_secret(stub):
    from pydantic import SecretStr

    k = scratch(stub)
    env = {"RESTIC_REPOSITORY": SecretStr("s3:http://10.0.0.5:8333/restic"), "RESTIC_PASSWORD": SecretStr("pw-9f3a-secret"),
           "AWS_SECRET_ACCESS_KEY": SecretStr("aws-secret-77")}
    out = k.restic_restore(_pvc_spec(), "library", snapshot_id="a" * 64, env=env, poll=0.01)
    assert out["ok"] is True and "restore --verify re-read every file" in out["message"], out
    ns, job = out["namespace"], out["job"]
    assert k.namespaces == [ns] and job.startswith("drtool-restore-library-")
    assert [(m, p) for m, p, _ in stub.requests] == [
        ("POST", "/api/v1/namespaces"),
        ("POST", f"/api/v1/namespaces/{ns}/secrets"),
        ("POST", f"/api/v1/namespaces/{ns}/persistentvolumeclaims"),
        ("POST", f"/apis/batch/v1/namespaces/{ns}/jobs"),
        ("GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{job}"),
        ("GET", f"/apis/batch/v1/namespaces/{ns}/jobs/{job}"),
    ]
    secret = stub.created[("secrets", ns, "drtool-restic")]
    validate_k8s(secret)
    assert secret["stringData"] == {"RESTIC_REPOSITORY": "s3:http://10.0.0.5:8333/restic", "RESTIC_PASSWORD": "pw-9f3a-secret",
                                    "AWS_SECRET_ACCESS_KEY": "aws-secret-77"}
    for plural, name in (("persistentvolumeclaims", "library"), ("jobs", job)):
        validate_k8s(stub.created[(plural, ns, name)])
    # the values went to the Secret and nowhere else: not the Job, not the result
    others = json.dumps([b for (plural, _, _), b in stub.created.items() if plural != "secrets"]) + json.dumps(out)
    assert "pw-9f3a-secret" not in others and "aws-secret-77" not in others and "10.0.0.5" not in others
    assert k.teardown(wait=5, poll=0.01)["deleted"] == [ns]


def test_pvc_restore_job_failure_says_why_from_its_pod(stub):
    from pydantic import SecretStr

    from services.kubestub import pod_status

    stub.job_script = [{"active": 1}, {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}]
    stub.job_pods = [{"metadata": {"name": "drtool-restore-x"},
                      "status": pod_status("Failed", exit_code=1, message="Fatal: wrong password or no key found", container="restic")}]
    k = scratch(stub)
    out = k.restic_restore(_pvc_spec(), "library", snapshot_id="b" * 64, env={"RESTIC_PASSWORD": SecretStr("x")}, poll=0.01)
    assert out["ok"] is False and "Failed (BackoffLimitExceeded)" in out["message"], out
    assert "container restic exited with code 1" in out["message"] and "wrong password" in out["message"], out
    assert ("GET", f"/api/v1/namespaces/{out['namespace']}/pods?labelSelector=job-name={out['job']}") in stub.calls()


def test_pvc_restore_timeout_and_cancel(stub):
    from pydantic import SecretStr

    stub.job_script = [{"active": 1}]
    k = scratch(stub)
    out = k.restic_restore(_pvc_spec(timeout="1s"), "slow", snapshot_id="c" * 64, env={"RESTIC_PASSWORD": SecretStr("x")}, poll=0.05)
    assert out["ok"] is False and "did not finish within 1s" in out["message"], out
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(DrtoolError, match="cancelled before the restore Job started"):
        k.restic_restore(_pvc_spec(), "c", snapshot_id="c" * 64, env={}, cancel=cancel)
