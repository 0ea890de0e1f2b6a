"""Notification events: things a person must look at even when nobody reads the logs
(a parity sync refused by its thresholds, …).

Each event is appended as one JSON line to ``<state dir>/events.jsonl`` (``drtool
events`` lists them) and logged at WARNING. When ``DRTOOL_NOTIFY_COMMAND`` names a
program, it also runs with the event as JSON on stdin (mail, Apprise's CLI, a
healthchecks ping script); a failing notifier is logged and never hides the
failure it reports.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
from datetime import datetime
from pathlib import Path
from typing import Any

from . import exec as ex
from .errors import DrtoolError
from .secrets import mask

log = logging.getLogger("drtool.notify")
EVENTS_FILE = "events.jsonl"


def emit(state_dir: Path, kind: str, *, now: datetime, message: str, **fields: Any) -> dict[str, Any]:
    event = {"time": now.isoformat(), "event": kind, "message": mask(message), **fields}
    line = mask(json.dumps(event, sort_keys=True, default=str))
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / EVENTS_FILE, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    log.warning("event %s: %s", kind, event["message"])
    command = os.environ.get("DRTOOL_NOTIFY_COMMAND")
    if command:
        try:
            ex.run(shlex.split(command), stdin=(line + "\n").encode(), timeout=60, check=True)
        except DrtoolError as exc:
            log.error("the notify command failed (the event is still in %s): %s", state_dir / EVENTS_FILE, exc)
    return event


def read_events(state_dir: Path, limit: int = 50) -> list[dict[str, Any]]:
    path = state_dir / EVENTS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()[-limit:]
    out = []
    for ln in lines:
        try:
            out.append(json.loads(ln))
        except ValueError:
            continue
    return out
