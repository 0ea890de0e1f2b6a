"""`python -m drtool.policy` regenerates docs/policy.schema.json, docs/policy-reference.md and docs/drill.schema.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .schema import json_schema, reference_markdown


def main(docs: str = "docs") -> None:
    d = Path(docs)
    d.mkdir(exist_ok=True)
    (d / "policy.schema.json").write_text(json.dumps(json_schema(), indent=2) + "\n")
    (d / "policy-reference.md").write_text(reference_markdown())
    from ..drill.model import drill_schema

    (d / "drill.schema.json").write_text(json.dumps(drill_schema(), indent=2) + "\n")
    print(f"wrote {d / 'policy.schema.json'}, {d / 'policy-reference.md'} and {d / 'drill.schema.json'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
