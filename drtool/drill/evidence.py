"""Drill evidence: the catalog record (a run of kind ``drill``) and files under
``<state>/drills/<drill>/<UTC time>/``: ``evidence.json`` and ``report.html``, a
self-contained page (inline CSS, no scripts, no network) with the verdict, the
targets against the measured RTO/RPO, a step timeline and every check's result."""
from __future__ import annotations

import html
import json
from datetime import datetime
from pathlib import Path
from typing import Any

from ..phases import RunPhase
from ..secrets import mask


def record(ctx: Any, out: Any) -> None:
    started = datetime.fromisoformat(out.started_at)
    folder = ctx.state_dir / "drills" / out.drill / f"{started:%Y%m%dT%H%M%SZ}"
    folder.mkdir(parents=True, exist_ok=True)
    out.evidence = {"json": str(folder / "evidence.json"), "html": str(folder / "report.html")}
    run = ctx.catalog.start_run("drill", policy=None, leg=out.drill, now=started, detail={"drill": out.drill, "file": out.file})
    out.run_uuid = run.uuid
    doc = out.to_dict()
    Path(out.evidence["json"]).write_text(mask(json.dumps(doc, indent=1, default=str)))
    Path(out.evidence["html"]).write_text(mask(render_html(doc)))
    phase = {"pass": RunPhase.succeeded, "partial": RunPhase.partially_failed}.get(out.verdict, RunPhase.failed)
    ctx.catalog.finish_run(run, phase, now=ctx.now(), errors=out.reasons if out.verdict != "pass" else [], detail=json.loads(mask(json.dumps(doc, default=str))))


def _h(x: Any) -> str:
    return html.escape(str(x))


def render_html(doc: dict[str, Any]) -> str:
    total = max([s.get("end_s") or 0 for s in doc["steps"]] + [doc.get("rto_s") or 0, 0.001])
    colour = {"pass": "#1a7f37", "partial": "#9a6700", "fail": "#cf222e"}.get(doc["verdict"], "#57606a")
    rows = []
    for s in doc["steps"]:
        start, end = s.get("start_s") or 0, s.get("end_s") or 0
        restore = s.get("restore_s") or end
        left, width = 100 * start / total, max(0.5, 100 * (restore - start) / total)
        cw = max(0.0, 100 * (end - restore) / total)
        bar = (f'<div class="bar"><span class="r" style="left:{left:.2f}%;width:{width:.2f}%"></span>'
               f'<span class="c" style="left:{left + width:.2f}%;width:{cw:.2f}%"></span></div>')
        checks = "".join(
            f'<li class="{"ok" if c["ok"] else ("bad" if c["required"] else "warn")}">{_h(c["name"])} ({_h(c["kind"])}'
            f'{"" if c["required"] else ", optional"}, {c["seconds"]:.1f}s): {_h(c["message"])}</li>' for c in s.get("checks", []))
        rows.append(f"""<tr class="{_h(s['status'])}"><td>{_h(s['name'])}</td><td>{_h(s['status'])}</td>
<td>{_h(s.get('policy'))}/{_h(s.get('leg'))}<br><code>{_h((s.get('point') or '-')[:60])}</code><br>{_h(s.get('point_time') or '')}</td>
<td>{bar}<small>{start:.1f}s → {end:.1f}s</small></td><td>{_h(s.get('message'))}<ul>{checks}</ul></td></tr>""")
    reasons = "".join(f"<li>{_h(r)}</li>" for r in doc.get("reasons", []))
    rto = "?" if doc.get("rto_s") is None else f"{doc['rto_s']:.1f}s"
    rpo = "?" if doc.get("rpo_s") is None else f"{doc['rpo_s']:.0f}s"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>drill {_h(doc['drill'])}: {_h(doc['verdict'])}</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#1f2328}} h1 span{{color:{colour}}}
table{{border-collapse:collapse;width:100%}} td,th{{border-bottom:1px solid #d0d7de;padding:.4em;vertical-align:top;text-align:left}}
.bar{{position:relative;height:12px;background:#f6f8fa;margin-bottom:2px;min-width:200px}}
.bar span{{position:absolute;top:0;height:12px}} .r{{background:#0969da}} .c{{background:#8250df}}
li.ok{{color:#1a7f37}} li.bad{{color:#cf222e}} li.warn{{color:#9a6700}} tr.failed td:nth-child(2){{color:#cf222e}}
tr.passed td:nth-child(2){{color:#1a7f37}} code{{font-size:12px}}
</style></head><body>
<h1>Drill {_h(doc['drill'])}: <span>{_h(doc['verdict'].upper())}</span></h1>
<p>{_h(doc['file'])}: started {_h(doc['started_at'])}, ended {_h(doc['ended_at'])}.</p>
<table><tr><th></th><th>measured</th><th>target</th></tr>
<tr><td>RTO (all restores and checks, wall clock)</td><td>{rto}</td><td>{doc['rto_target_s']:.0f}s</td></tr>
<tr><td>RPO (age of the oldest restored point)</td><td>{rpo}</td><td>{doc['rpo_target_s']:.0f}s</td></tr></table>
{f"<h2>Why not a pass</h2><ul>{reasons}</ul>" if reasons else ""}
<h2>Steps</h2><p><small>timeline: <span style="color:#0969da">■</span> restore <span style="color:#8250df">■</span> checks</small></p>
<table><tr><th>step</th><th>status</th><th>restored point</th><th>timeline</th><th>result</th></tr>
{''.join(rows)}</table>
<h2>Teardown</h2><p>{'clean' if doc.get('teardown', {}).get('ok') else 'NOT clean: ' + _h(doc.get('teardown'))};
{_h(doc.get('teardown', {}).get('processes_killed', 0))} leftover process(es) killed.</p>
</body></html>
"""
