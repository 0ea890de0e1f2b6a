"""Drill files: validated like policies, every error with file:line, field and fix."""
from __future__ import annotations

from textwrap import dedent

import pytest

from drtool.drill.load import load_drill
from drtool.drill.model import topo_order
from drtool.policy.loader import PolicyError

GOOD = dedent("""\
    version: 1
    name: lab
    targets: {rto: 1h, rpo: 24h}
    steps:
      - name: etcd
        restore: {policy: etcd, from: offsite}
        checks: [{etcd: {sample: 4}}]
      - name: vault
        restore: {policy: vault, point: latest-verified}
        checks: [{vault: {}}]
      - name: apps
        needs: [etcd, vault]
        restore: {policy: app, point: random}
        checks:
          - tree-compare: {mode: full}
          - http: {url: "http://127.0.0.1:8080/", body_regex: "ok", latency_ms: 200}
            required: false
""")


def _errors(tmp_path, text: str) -> list[str]:
    f = tmp_path / "d.yaml"
    f.write_text(text)
    with pytest.raises(PolicyError) as exc:
        load_drill(f)
    return [str(i) for i in exc.value.issues]


def test_good_drill_loads(tmp_path):
    f = tmp_path / "d.yaml"
    f.write_text(GOOD)
    d = load_drill(f)
    assert [s.name for s in d.steps] == ["etcd", "vault", "apps"]
    assert d.steps[0].restore.from_ == "offsite"
    assert d.steps[2].checks[1].kind == "http" and not d.steps[2].checks[1].required
    assert topo_order(d.steps) == ["etcd", "vault", "apps"]


@pytest.mark.parametrize("old,new,expected", [
    ("needs: [etcd, vault]", "needs: [etcd, valt]", "needs 'valt', which is not a step of this drill"),
    ("  - name: etcd\n", "  - name: etcd\n    needs: [apps]\n", "form a cycle"),
    ("checks: [{etcd: {sample: 4}}]", "checks: [{etcd: {}, vault: {}}]", "a check is exactly one of"),
    ("point: random", "pont: random", "unknown field 'pont' (did you mean 'point'?)"),
    ("targets: {rto: 1h, rpo: 24h}", "targets: {rto: soon, rpo: 24h}", "targets.rto"),
    ('body_regex: "ok"', 'body_regex: "(ok"', "not a valid regular expression"),
    ("restore: {policy: app, point: random}", "restore: {policy: app, point: random}\n    pvc: {size: 10Gi}",
     "restore into a PVC: set 'scratch: kubernetes'"),
    ("restore: {policy: app, point: random}", "pvc: {size: 10Gi}", "'pvc' is where a restic point goes: give 'restore'"),
    ("restore: {policy: app, point: random}", "restore: {policy: app}\n    pvc: {size: lots}", "pvc.size"),
])
def test_drill_errors_name_line_field_and_fix(tmp_path, old, new, expected):
    assert old in GOOD
    errs = _errors(tmp_path, GOOD.replace(old, new, 1))
    assert any(expected in e for e in errs), errs
    assert all(e.startswith(str(tmp_path / "d.yaml") + ":") for e in errs)
    assert all(":0:" not in e.split(" ")[0] for e in errs)


def test_a_gpu_inference_check_is_chat_or_embeddings(tmp_path):
    text = GOOD.replace("checks: [{vault: {}}]", 'checks: [{gpu-inference: {url: "http://x/v1", model: m}}]')
    errs = _errors(tmp_path, text)
    assert any("give either 'prompt' (chat) or 'embedding_input'" in e for e in errs), errs


def test_a_step_that_crashes_fails_the_drill_never_passes(tmp_path, monkeypatch):
    """An unexpected exception inside a step (a bug, not a DrtoolError) is a failed step
    with its reason, and the drill's verdict is fail."""
    from types import SimpleNamespace

    from drtool.catalog.store import Catalog
    from drtool.drill import runner
    from drtool.drill.model import Drill

    drill = Drill.model_validate({"name": "crash", "targets": {"rto": "1h", "rpo": "1d"},
                                  "steps": [{"name": "boom", "checks": [{"command": {"argv": ["true"]}}]}]})

    def boom(self, step):
        raise KeyError("surprise")

    monkeypatch.setattr(runner._Runner, "step", boom)
    from datetime import datetime, timezone

    ctx = SimpleNamespace(state_dir=tmp_path, now=lambda: datetime.now(timezone.utc), cfg=SimpleNamespace(),
                          catalog=Catalog.open(f"sqlite:///{tmp_path}/c.db"), warm_catalog=lambda: None)
    out = runner.run_drill(ctx, drill, "crash.yaml")
    assert out.verdict == "fail" and out.exit_code == 1
    assert out.steps[0].status == "failed" and "internal error: KeyError" in out.steps[0].message
    assert any("step boom failed" in r for r in out.reasons)
