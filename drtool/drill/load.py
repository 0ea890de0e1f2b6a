"""Load drill files with the policy loader's rules: every error at once, each with
file:line, the field path and the fix."""
from __future__ import annotations

import os
from pathlib import Path

from pydantic import ValidationError

from ..errors import ConfigError
from ..policy.loader import Issue, PolicyError, _fix_for, _node_line, _parse, _plain
from .model import Drill

DEFAULT_DIR = "drills"


def load_drill(path: str | os.PathLike) -> Drill:
    f = Path(path)
    if not f.is_file():
        raise ConfigError(f"{f}: no such drill file (see `drtool drill list`)")
    issues: list[Issue] = []
    tree = _parse(f, issues)
    if tree is None:
        raise PolicyError(issues)
    try:
        return Drill.model_validate(_plain(tree))
    except ValidationError as exc:
        fields = sorted({n for m in _models() for n in m.model_fields} | {"from", "tree-compare"})
        for err in exc.errors():
            line, dotted = _node_line(tree, tuple(err["loc"]))
            issues.append(Issue(str(f), line, dotted, _fix_for(err, fields)))
        raise PolicyError(sorted(issues, key=lambda i: i.line)) from None


def _models() -> list[type]:
    from pydantic import BaseModel

    from . import model

    return [o for o in vars(model).values() if isinstance(o, type) and issubclass(o, BaseModel)]


def drill_files(directory: str | os.PathLike | None = None) -> list[Path]:
    d = Path(directory or os.environ.get("DRTOOL_DRILLS") or DEFAULT_DIR)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
