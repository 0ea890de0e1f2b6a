"""The drtool command line. Thin: parse, call the engine, render, map to an exit code."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import ConfigError, DrtoolError, ExitCode, exit_code_for
from .secrets import MaskingFilter, mask

log = logging.getLogger("drtool")


class _LazyConsole:
    """A rich Console created on first use: --json runs never pay for importing rich."""

    def __init__(self, **kw: Any) -> None:
        self._kw, self._console = kw, None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._kw)
        return getattr(self._console, name)


out_console: Any = _LazyConsole(soft_wrap=True)  # stdout: human output; long lines are not cut
err_console: Any = _LazyConsole(stderr=True)


class Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = int(code)


def _setup_logging(debug: bool, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(MaskingFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("drtool")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug or verbose else logging.WARNING)
    root.propagate = False


def _emit_json(doc: Any) -> None:
    text = json.dumps(doc, indent=2, default=str, sort_keys=False)
    click.echo(mask(text))


class State:
    def __init__(self, config: str | None, json_out: bool, debug: bool) -> None:
        self.config = config
        self.json = json_out
        self.debug = debug
        self._cfg = None
        self._ctx = None

    def cfg(self):
        from .policy.loader import load_config

        if self._cfg is None:
            self._cfg = load_config(self.config)
        return self._cfg

    def ctx(self):
        if self._ctx is None:
            from .engine import Context
            from .paths import state_dir
            from .ui import UI

            sd = Path(state_dir())
            sd.mkdir(parents=True, exist_ok=True)
            self._ctx = Context(cfg=self.cfg(), state_dir=sd, ui=UI(enabled=sys.stderr.isatty()))
        return self._ctx


pass_state = click.make_pass_decorator(State)


def json_option(f: Callable) -> Callable:
    def cb(ctx: click.Context, _p: Any, value: bool) -> bool:
        if value:
            ctx.find_object(State).json = True
        return value

    return click.option("--json", "json_flag", is_flag=True, expose_value=False, callback=cb, help="Print one JSON document on stdout; logs go to stderr.")(f)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", envvar="DRTOOL_CONFIG", default=None, help="Policy file or directory (default ./policies, or $DRTOOL_CONFIG).")
@click.option("--json", "json_out", is_flag=True, help="Print one JSON document on stdout; logs go to stderr.")
@click.option("--debug", is_flag=True, help="Debug logging; tracebacks for internal errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log every external command (masked).")
@click.version_option(__version__, prog_name="drtool")
@click.pass_context
def cli(ctx: click.Context, config: str | None, json_out: bool, debug: bool, verbose: bool) -> None:
    """drtool: backups you can prove. 3-2-1-1-0 from live inventory, verified copies, tested restores."""
    _setup_logging(debug, verbose)
    ctx.obj = State(config, json_out, debug)


# ------------------------------------------------------------------ policy


@cli.group()
def policy() -> None:
    """Validate, explain and document policy files."""


@policy.command("validate")
@click.argument("paths", nargs=-1, type=click.Path())
@json_option
@pass_state
def policy_validate(st: State, paths: tuple[str, ...]) -> None:
    """Validate policy files; report every error as file:line: field: message."""
    from .policy.loader import PolicyError, load_config

    try:
        cfg = load_config(st.config, paths=paths)
    except PolicyError as exc:
        if st.json:
            _emit_json({"valid": False, "errors": [i.__dict__ for i in exc.issues]})
        else:
            for issue in exc.issues:
                click.echo(str(issue), err=True)
            click.echo(f"{len(exc.issues)} error(s)", err=True)
        raise Exit(ExitCode.USAGE)
    if st.json:
        _emit_json({"valid": True, "files": cfg.files, "locations": sorted(cfg.locations), "policies": sorted(cfg.policies)})
    else:
        click.echo(f"ok: {len(cfg.files)} file(s), {len(cfg.locations)} location(s), {len(cfg.policies)} polic{'y' if len(cfg.policies) == 1 else 'ies'}")


@policy.command("schema")
def policy_schema() -> None:
    """Print the policy file JSON Schema (for yaml-language-server)."""
    from .policy.schema import json_schema

    click.echo(json.dumps(json_schema(), indent=2))


@policy.command("sample")
def policy_sample() -> None:
    """Print a commented sample policy file."""
    from .policy.schema import commented_sample

    click.echo(commented_sample(), nl=False)


@policy.command("explain")
@click.option("--policy", "policy_name", help="Only this policy.")
@json_option
@pass_state
def policy_explain(st: State, policy_name: str | None) -> None:
    """Static 3-2-1-1-0 analysis: which copies count, and why the others do not."""
    from .policy.rules import assess
    from .status import store_facts

    ctx = st.ctx()
    facts = store_facts(ctx, policy_name)  # immutability is read from object stores, never taken on trust
    results = [assess(p, ctx.cfg, facts=facts) for p in ctx.cfg.select(policy_name)]
    if st.json:
        _emit_json({"policies": [r.to_dict() for r in results]})
        return
    for r in results:
        _render_assessment(r)


def _render_assessment(r: Any) -> None:
    verdict = {True: "[green]compliant[/]", False: "[red]NOT compliant[/]", None: "[yellow]compliant so far (0 errors is checked live)[/]"}[r.compliant]
    out_console.print(f"[bold]{r.policy}[/]: {verdict}")
    out_console.print("  copies:")
    for c in r.copies:
        mark = "[green]counts[/]" if c.counts else "[red]does not count[/]"
        out_console.print(f"    {c.label} ({c.media}, site {c.site}, domain {c.failure_domain}): {mark}: {c.reason}", highlight=False)
        for prot in getattr(c, "protection", None) or []:
            style = "green" if prot.get("ok") else "red"
            out_console.print(f"        [{style}]protected by {prot['leg']}[/]: {prot.get('summary') or '; '.join(prot.get('problems', []))}",
                              highlight=False)
        if c.live:
            age = c.live["age"] or "never"
            out_console.print(f"        {c.live['points']} point(s), newest {age} old; last passing verification: "
                              f"{c.live['last_verified'] or 'never'} ({c.live['verified_level'] or '-'})", highlight=False)
    out_console.print("  rules:")
    for rule in r.rules:
        mark = {True: "[green]✓[/]", False: "[red]✗[/]", None: "[yellow]?[/]"}[rule.ok]
        out_console.print(f"    {mark} {rule.rule}: {rule.detail}", highlight=False)
    out_console.print()


# ------------------------------------------------------------------ run / verify / prune


def _phase_exit(phases: list[str]) -> int:
    done = [p for p in phases if p != "skipped"]
    if not phases:
        return ExitCode.OK
    if not done:
        return ExitCode.LOCKED
    failed = sum(p == "failed" for p in done)
    if failed == 0:
        return ExitCode.PARTIAL if "partially_failed" in done else ExitCode.OK
    return ExitCode.FAILURE if failed == len(done) else ExitCode.PARTIAL


def _select_legs(cfg: Any, policy_name: str | None, leg_name: str | None) -> list[tuple[Any, Any]]:
    pols = cfg.select(policy_name)
    pairs = []
    for p in pols:
        for leg in p.legs:
            if leg_name is None or leg.leg_name == leg_name:
                pairs.append((p, leg))
    if leg_name and not pairs:
        known = sorted({leg.leg_name for p in pols for leg in p.legs})
        raise ConfigError(f"no leg named {leg_name!r} (known: {', '.join(known)})")
    return pairs


@cli.command("run")
@click.option("--policy", "policy_name", help="Only this policy.")
@click.option("--leg", "leg_name", help="Only this leg.")
@click.option("--dry-run", is_flag=True, help="Show what would run; change nothing.")
@click.option("--no-verify", is_flag=True, help="Do not run verifications that are due after the legs.")
@click.option("--force", is_flag=True, help="Let a leg overwrite a diverged target (zfs: receive -F). Data there is lost.")
@click.option("--force-sync", is_flag=True, help="parity legs: sync even though the removed/updated files exceed the thresholds (after review).")
@json_option
@pass_state
def run_cmd(st: State, policy_name: str | None, leg_name: str | None, dry_run: bool, no_verify: bool, force: bool,
            force_sync: bool) -> None:
    """Run policy legs now, then the verifications that are due."""
    from .engine import run_leg
    from .verify import verify_due, verify_leg

    ctx = st.ctx()
    ctx.force, ctx.force_sync = force, force_sync
    # no early warm_catalog(): each leg opens the catalog once its tool is working
    # (rec.start()). Opened here, its import fought the leg's own set-up for the GIL
    # (an S3 client took 0.9 s to create instead of 0.2 s).
    results, verifications = [], []
    for pol, leg in _select_legs(ctx.cfg, policy_name, leg_name):
        r = run_leg(ctx, pol, leg, dry_run=dry_run)
        results.append(r)
        if not st.json:
            _line(r.phase, f"{r.policy}/{r.leg}", r.message)
        if r.phase == "succeeded" and not no_verify and verify_due(ctx, pol, leg):
            v = verify_leg(ctx, pol, leg)
            verifications.append(v)
            if not st.json:
                _line("skipped" if v.skipped else ("succeeded" if v.ok else "failed"), f"{v.policy}/{v.leg} verify {v.level}", v.message)
    phases = [r.phase for r in results] + [("skipped" if v.skipped else "succeeded" if v.ok else "failed") for v in verifications]
    code = ExitCode.OK if dry_run and all(r.phase == "planned" for r in results) else _phase_exit(phases)
    if st.json:
        _emit_json({"results": [r.to_dict() for r in results], "verifications": [v.to_dict() for v in verifications], "exit_code": int(code)})
    raise Exit(code)


def _line(phase: str, what: str, message: str) -> None:
    style = {"succeeded": "green", "failed": "red", "partially_failed": "magenta", "skipped": "yellow", "planned": "cyan"}.get(phase, "white")
    out_console.print(f"[{style}]{phase:>9}[/] {what}: {message}", highlight=False, soft_wrap=True)


@cli.command("verify")
@click.option("--policy", "policy_name", help="Only this policy.")
@click.option("--leg", "leg_name", help="Only this leg.")
@click.option("--level", type=click.Choice(["exists", "integrity", "sample", "full"]), help="Override the declared level.")
@json_option
@pass_state
def verify_cmd(st: State, policy_name: str | None, leg_name: str | None, level: str | None) -> None:
    """Prove copies are restorable, at the declared (or given) depth."""
    from .verify import verify_leg

    ctx = st.ctx()
    results = []
    from .legs import supported

    for pol, leg in _select_legs(ctx.cfg, policy_name, leg_name):
        if not supported(ctx, pol, leg):
            continue
        v = verify_leg(ctx, pol, leg, level=level)
        results.append(v)
        if not st.json:
            _line("skipped" if v.skipped else ("succeeded" if v.ok else "failed"), f"{v.policy}/{v.leg} {v.level}", v.message)
    code = _phase_exit([("skipped" if v.skipped else "succeeded" if v.ok else "failed") for v in results])
    if st.json:
        _emit_json({"verifications": [v.to_dict() for v in results], "exit_code": int(code)})
    raise Exit(code)


@cli.command("prune")
@click.option("--policy", "policy_name", help="Only this policy.")
@click.option("--leg", "leg_name", help="Only this leg.")
@click.option("--dry-run", is_flag=True, help="Show the plan; delete nothing.")
@json_option
@pass_state
def prune_cmd(st: State, policy_name: str | None, leg_name: str | None, dry_run: bool) -> None:
    """Apply retention: only to points drtool made, never the newest or last verified."""
    from .prune import prune_leg

    ctx = st.ctx()
    results = []
    for pol, leg in _select_legs(ctx.cfg, policy_name, leg_name):
        r = prune_leg(ctx, pol, leg, dry_run=dry_run)
        results.append(r)
        if not st.json:
            _line("skipped" if r.skipped else "planned" if dry_run else ("succeeded" if r.ok else "failed"), f"{r.policy}/{r.leg}", r.message)
            if r.plan:
                for d in r.plan.decisions:
                    verb = "keep  " if d.keep else "REMOVE"
                    out_console.print(f"    {verb} {d.point_id[:12]} {d.time.isoformat()}  {', '.join(d.reasons)}", highlight=False)
    code = _phase_exit(["skipped" if r.skipped else "succeeded" if r.ok else "failed" for r in results])
    if st.json:
        _emit_json({"dry_run": dry_run, "prunes": [r.to_dict() for r in results], "exit_code": int(code)})
    raise Exit(code)


@cli.command("restore")
@click.option("--policy", "policy_name", required=True, help="The policy whose data to restore.")
@click.option("--leg", "leg_name", help="Which leg's points to restore from; optional when the policy has one leg.")
@click.option("--point", "selector", default="latest", show_default=True, help="latest, latest-verified, or a point id (prefix) or snapshot name.")
@click.option("--target", help="restic: an empty directory; zfs: a new dataset (clone, or receive from a replica); parity: a data disk to rebuild.")
@click.option("--include", multiple=True, help="restic: restore only this absolute path; parity: fix this file (repeatable). "
              "parity legs with neither --target nor --include fix the bad blocks a scrub found.")
@click.option("--rollback", is_flag=True, help="zfs snapshot legs: roll the source dataset back in place (guarded).")
@click.option("--destroy-newer", is_flag=True, help="With --rollback: allow destroying snapshots newer than the point.")
@click.option("--dry-run", is_flag=True, help="Show which point would be restored where; change nothing.")
@click.option("--force", is_flag=True, help="restic: restore into a non-empty target (files there may be overwritten).")
@json_option
@pass_state
def restore_cmd(st: State, policy_name: str, leg_name: str | None, selector: str, target: str | None, include: tuple[str, ...],
                rollback: bool, destroy_newer: bool, dry_run: bool, force: bool) -> None:
    """Restore a recovery point, then prove what came back."""
    from .restore import restore_point

    ctx = st.ctx()
    pol = ctx.cfg.policy(policy_name)
    legs = [leg for leg in pol.legs if leg_name is None or leg.leg_name == leg_name]
    if len(legs) != 1:
        names = ", ".join(leg.leg_name for leg in pol.legs)
        raise ConfigError(f"choose the leg to restore from with --leg (one of: {names})" if not leg_name else f"no leg named {leg_name!r} (known: {names})")
    from .legs import driver_for

    if not target and not rollback and driver_for(ctx, pol, legs[0]).needs_target:
        raise ConfigError("give --target (a directory, or a new dataset for zfs), or --rollback for an in-place zfs rollback")
    if not dry_run:
        ctx.warm_catalog()  # while the restore starts (restic picks "latest" itself)
    r = restore_point(ctx, pol, legs[0], selector=selector, target=target, include=include, dry_run=dry_run, force=force,
                      rollback=rollback, destroy_newer=destroy_newer)
    if st.json:
        _emit_json(r.to_dict())
    else:
        _line("planned" if dry_run else "succeeded" if r.ok else "failed", f"{r.policy}/{r.leg}", r.message)
    raise Exit(ExitCode.OK if r.ok else ExitCode.FAILURE)


# ------------------------------------------------------------------ inventory / status


@cli.command("inventory")
@click.option("--location", help="Only this location.")
@json_option
@pass_state
def inventory_cmd(st: State, location: str | None) -> None:
    """List recovery points as they exist in the storage systems now."""
    from .engine import inventory

    ctx = st.ctx()
    inv = inventory(ctx, location)
    if st.json:
        _emit_json({"locations": {n: {"error": v["error"], "points": [p.to_dict() for p in v["points"]]} for n, v in inv.items()}})
    else:
        for name, v in inv.items():
            out_console.print(f"[bold]{name}[/]: " + (f"[red]{v['error']}[/]" if v["error"] else f"{len(v['points'])} point(s)"))
            for p in v["points"]:
                out_console.print(f"  {p.id[:12]}  {p.time.isoformat()}  {p.policy or '-'}/{p.leg or '-'}  {' '.join(p.paths)}", highlight=False)
    errors = [n for n, v in inv.items() if v["error"]]
    raise Exit(ExitCode.FAILURE if errors and len(errors) == len(inv) else ExitCode.PARTIAL if errors else ExitCode.OK)


@cli.command("status")
@click.option("--policy", "policy_name", help="Only this policy.")
@json_option
@pass_state
def status_cmd(st: State, policy_name: str | None) -> None:
    """3-2-1-1-0 per policy, computed from the live inventory and the catalog. Exit 4 when not compliant."""
    from .status import live_assessments

    ctx = st.ctx()
    results = live_assessments(ctx, policy_name)
    compliant = all(r.compliant for r in results)
    if st.json:
        _emit_json({"now": ctx.now().isoformat(), "compliant": compliant, "policies": [r.to_dict() for r in results]})
    else:
        for r in results:
            _render_assessment(r)
    raise Exit(ExitCode.OK if compliant else ExitCode.NONCOMPLIANT)


@cli.command("runs")
@click.option("--policy", "policy_name", help="Only this policy.")
@click.option("--limit", default=20, show_default=True)
@json_option
@pass_state
def runs_cmd(st: State, policy_name: str | None, limit: int) -> None:
    """Recent runs from the catalog."""
    runs = st.ctx().catalog.runs(policy=policy_name, limit=limit)
    if st.json:
        _emit_json({"runs": [_run_dict(r) for r in runs]})
        return
    for r in runs:
        _line(r.phase, f"{r.kind} {r.policy or '-'}/{r.leg or '-'} {r.started_at:%Y-%m-%d %H:%M:%S}", "; ".join(r.errors or r.warnings or []) or (r.recovery_point or "")[:12])


@cli.command("events")
@click.option("--limit", default=20, show_default=True)
@json_option
@pass_state
def events_cmd(st: State, limit: int) -> None:
    """Notification events (e.g. a parity sync refused by its thresholds), newest last."""
    from .notify import read_events
    from .paths import state_dir

    events = read_events(state_dir(), limit=limit)
    if st.json:
        _emit_json({"events": events})
        return
    for e in events:
        _line("failed" if e.get("event", "").endswith(("refused", "failed")) else "skipped", f"{e.get('time', '?')[:19]} {e.get('event')}",
              e.get("message", ""))


# ------------------------------------------------------------------ drills


@cli.group()
def drill() -> None:
    """DR exercises: restore into scratch, check, measure RTO/RPO against targets, always tear down, keep evidence."""


@drill.command("run")
@click.argument("file", type=click.Path())
@click.option("--dry-run", is_flag=True, help="Validate the drill and show which point each step would restore; restore nothing.")
@json_option
@pass_state
def drill_run(st: State, file: str, dry_run: bool) -> None:
    """Run a drill file. Exit 0 pass, 1 fail, 3 partial (only optional checks failed)."""
    from .drill.load import load_drill
    from .drill.runner import _pick_leg, check_references, run_drill

    d = load_drill(file)
    ctx = st.ctx()
    if dry_run:
        from .restore import resolve_point

        problems = check_references(ctx.cfg, d)
        if problems:
            raise ConfigError(f"{file}: " + "; ".join(problems))
        plan = []
        for step in d.steps:
            if step.restore is None:
                v = step.velero
                what = (f"Velero backup {v.backup or 'newest completed of schedule ' + str(v.schedule)} of {', '.join(v.namespaces)} "
                        "into scratch namespaces") if v else "nothing to restore"
                plan.append({"step": step.name, "needs": step.needs, "policy": "velero" if v else None, "leg": None, "point": what,
                             "checks": [c.label for c in step.checks]})
                continue
            pol, leg = _pick_leg(ctx.cfg, step)
            try:
                p = resolve_point(ctx, pol, leg, step.restore.point if step.restore.point != "random" else "latest")
                what = f"{step.restore.point}: {p.id} ({p.time:%Y-%m-%d %H:%M}Z)" if step.restore.point != "random" else "a random point"
            except DrtoolError as exc:
                what = f"cannot resolve: {exc}"
            plan.append({"step": step.name, "needs": step.needs, "policy": pol.name, "leg": leg.leg_name, "point": what,
                         "checks": [c.label for c in step.checks]})
        if st.json:
            _emit_json({"drill": d.name, "dry_run": True, "steps": plan})
        else:
            for p in plan:
                what = p["point"] if p["policy"] == "velero" else f"restore {p['policy']}/{p['leg']} {p['point']}" if p["policy"] else "no restore"
                _line("planned", f"{d.name}/{p['step']}", f"{what}; checks: {', '.join(p['checks']) or 'none'}")
        raise Exit(ExitCode.OK)
    res = run_drill(ctx, d, file)
    if st.json:
        _emit_json(res.to_dict())
    else:
        from .drill.runner import format_duration_s

        for s in res.steps:
            _line({"passed": "succeeded", "partial": "partially_failed"}.get(s.status, s.status), f"{d.name}/{s.name}", s.message)
        _line({"pass": "succeeded", "partial": "partially_failed"}.get(res.verdict, "failed"), f"drill {d.name}",
              f"{res.verdict.upper()}: RTO {format_duration_s(res.rto_s)} (target {d.targets.rto}), "
              f"RPO {format_duration_s(res.rpo_s)} (target {d.targets.rpo})" + (f"; {'; '.join(res.reasons)}" if res.reasons else ""))
        out_console.print(f"evidence: {res.evidence.get('html', '-')}", highlight=False)
    raise Exit(res.exit_code)


@drill.command("list")
@click.argument("directory", required=False, type=click.Path())
@json_option
@pass_state
def drill_list(st: State, directory: str | None) -> None:
    """Drill files (./drills, or $DRTOOL_DRILLS) with their last verdict."""
    from .drill.load import drill_files, load_drill

    ctx = st.ctx()
    last = {}
    for r in ctx.catalog.runs(kind="drill", limit=500):
        last.setdefault(r.leg, r)
    rows = []
    for f in drill_files(directory):
        try:
            d = load_drill(f)
            name, err = d.name, None
        except DrtoolError as exc:
            name, err = f.stem, str(exc)
        r = last.get(name)
        rows.append({"file": str(f), "drill": name, "error": err, "last_verdict": (r.detail or {}).get("verdict") if r else None,
                     "last_run": r.started_at.isoformat() if r else None, "last_rto_s": (r.detail or {}).get("rto_s") if r else None})
    if st.json:
        _emit_json({"drills": rows})
    else:
        for row in rows:
            what = row["error"] or (f"last: {row['last_verdict']} at {row['last_run'][:19]}, RTO {row['last_rto_s']}s" if row["last_run"] else "never run")
            _line("failed" if row["error"] else "planned", f"{row['drill']} ({row['file']})", what)


@drill.command("show")
@click.argument("ident")
@json_option
@pass_state
def drill_show(st: State, ident: str) -> None:
    """One drill's evidence, by run uuid (or a unique prefix)."""
    ctx = st.ctx()
    found = [r for r in ctx.catalog.runs(kind="drill", limit=1000) if r.uuid.startswith(ident)]
    if len(found) != 1:
        raise ConfigError(f"{ident!r} matches {len(found)} drill runs: see `drtool drill history`")
    doc = found[0].detail or {}
    if st.json:
        _emit_json(doc)
        return
    _line({"pass": "succeeded", "partial": "partially_failed"}.get(doc.get("verdict"), "failed"), f"drill {doc.get('drill')}",
          f"{doc.get('verdict')} at {doc.get('started_at')}: RTO {doc.get('rto_s')}s / {doc.get('rto_target_s')}s, "
          f"RPO {doc.get('rpo_s')}s / {doc.get('rpo_target_s')}s")
    for s in doc.get("steps", []):
        _line({"passed": "succeeded"}.get(s["status"], s["status"]), s["name"], s["message"])
    for r in doc.get("reasons", []):
        out_console.print(f"  reason: {r}", highlight=False)
    out_console.print(f"evidence: {doc.get('evidence', {}).get('html', '-')}", highlight=False)


@drill.command("history")
@click.option("--drill", "drill_name", help="Only this drill.")
@click.option("--limit", default=20, show_default=True)
@json_option
@pass_state
def drill_history(st: State, drill_name: str | None, limit: int) -> None:
    """Past drills, newest first, with the RTO trend per drill."""
    ctx = st.ctx()
    runs = [r for r in ctx.catalog.runs(kind="drill", limit=1000) if drill_name is None or r.leg == drill_name][:limit]
    rows = [{"uuid": r.uuid, "drill": r.leg, "started_at": r.started_at.isoformat(), "verdict": (r.detail or {}).get("verdict"),
             "rto_s": (r.detail or {}).get("rto_s"), "rto_target_s": (r.detail or {}).get("rto_target_s"),
             "rpo_s": (r.detail or {}).get("rpo_s")} for r in runs]
    trend: dict[str, list[float]] = {}
    for row in reversed(rows):  # oldest first
        if row["rto_s"] is not None:
            trend.setdefault(row["drill"], []).append(row["rto_s"])
    if st.json:
        _emit_json({"drills": rows, "rto_trend": trend})
        return
    for row in rows:
        _line({"pass": "succeeded", "partial": "partially_failed"}.get(row["verdict"], "failed"), f"{row['drill']} {row['started_at'][:19]}",
              f"{row['verdict']}: RTO {row['rto_s']}s (target {row['rto_target_s']}s) [{row['uuid'][:8]}]")
    for name, values in trend.items():
        out_console.print(f"RTO trend {name}: " + " → ".join(f"{v:.1f}s" for v in values), highlight=False)


# ------------------------------------------------------------------ break-glass


@cli.group()
def breakglass() -> None:
    """The age-encrypted bundle of everything a restore needs (unseal keys, Talos secrets, passwords, credentials, catalog)."""


@breakglass.command("build")
@click.option("--dry-run", is_flag=True, help="Resolve every item and show what would go in; write nothing.")
@click.option("--allow-missing", is_flag=True, help="Write the bundle even when some items cannot be read (exit 3).")
@json_option
@pass_state
def breakglass_build(st: State, dry_run: bool, allow_missing: bool) -> None:
    """Build the bundle and write it to every offsite object store."""
    from . import breakglass as bg
    from .notify import emit

    ctx = st.ctx()
    try:
        res = bg.build(ctx, allow_missing=allow_missing, dry_run=dry_run)
    except DrtoolError as exc:
        if not dry_run:
            emit(ctx.state_dir, "breakglass.build_failed", now=ctx.now(), message=str(exc))
        raise
    if st.json:
        _emit_json({"dry_run": dry_run, **res.to_dict()})
    else:
        _line("dry-run" if dry_run else "succeeded", "break-glass items", ", ".join(res.items) or "none")
        for name, why in res.missing.items():
            _line("failed", "missing", why)
        for loc, key in res.written.items():
            _line("succeeded", f"written to {loc}", key)
        for loc, err in res.errors.items():
            _line("failed", f"not written to {loc}", err)
    if res.errors:
        emit(ctx.state_dir, "breakglass.build_failed", now=ctx.now(), message="; ".join(f"{k}: {v}" for k, v in res.errors.items()))
    if res.errors and not res.written and not dry_run:
        raise Exit(ExitCode.FAILURE)
    raise Exit(ExitCode.PARTIAL if res.errors or res.missing else ExitCode.OK)


@breakglass.command("verify")
@json_option
@pass_state
def breakglass_verify(st: State) -> None:
    """Decrypt the newest bundle in every store with the offline identity and check it is whole and complete."""
    from . import breakglass as bg

    res = bg.verify(st.ctx())
    if st.json:
        _emit_json(res)
    else:
        for loc, e in res["locations"].items():
            what = f"{loc} {e.get('stamp', '')}".strip()
            detail = "; ".join([*e["problems"], *(f"missing {m}" for m in e["missing"]), *(f"stale {s}" for s in e["stale"])])
            _line("succeeded" if e["ok"] else "failed", what, detail or f"{e.get('items', 0)} items, complete")
    raise Exit(ExitCode.OK if res["ok"] else ExitCode.FAILURE)


def _run_dict(r: Any) -> dict[str, Any]:
    keys = ("uuid", "kind", "policy", "leg", "leg_kind", "location", "phase", "dry_run", "started_at", "ended_at", "bytes_processed",
            "recovery_point", "warnings", "errors", "detail", "command_log", "host", "pid")
    return {k: getattr(r, k) for k in keys}


# ------------------------------------------------------------------ entry point


def run_cli(argv: list[str] | None = None) -> int:
    """Run the CLI in-process and return its exit code (the one exception → exit-code table)."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="drtool", standalone_mode=False)
        return ExitCode.OK
    except Exit as e:
        return e.code
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C/SIGTERM into Abort
        from . import exec as ex

        ex.terminate_all()
        click.echo("drtool: interrupted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return ExitCode.USAGE
    except DrtoolError as e:
        click.echo(f"drtool: {mask(str(e))}", err=True)
        return exit_code_for(e)
    except Exception as e:  # internal error
        click.echo(f"drtool: internal error: {mask(type(e).__name__ + ': ' + str(e))}" + ("" if debug else " (run with --debug for a traceback)"), err=True)
        if debug:
            click.echo(mask(traceback.format_exc()), err=True)
        return ExitCode.FAILURE


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    # SIGTERM (systemd, Kubernetes, timeout) is handled like Ctrl-C: children are
    # stopped, the run is recorded as interrupted, nothing is deleted.
    signal.signal(signal.SIGTERM, _interrupt)
    code = int(run_cli(argv))
    # Everything is committed and flushed by now; skip the interpreter's module
    # teardown (SQLAlchemy's alone costs ~0.2 s, paid on every scheduled run).
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
