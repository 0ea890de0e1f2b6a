"""Everything derived from the models: JSON Schema, commented sample, reference page.

These are generated, never hand-written, so they cannot drift from the code;
tests fail when the committed copies in docs/ are stale (`make docs` refreshes).
"""
from __future__ import annotations

import json
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .models import LOCATION_TYPES, Leg, ParityPlan, Policy, PolicyFile, Retention, Source, UploadSpec, Verify
from ..secrets import SecretRef

SCHEMA_ID = "https://drtool.invalid/schemas/policy-file.json"


def json_schema() -> dict[str, Any]:
    schema = PolicyFile.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = SCHEMA_ID
    return schema


# ------------------------------------------------------------------ commented sample

_HEADER = """\
# drtool policy file: a commented sample (generated from the models: `drtool policy sample`).
# Editors: add this line for completion and checking with yaml-language-server:
# yaml-language-server: $schema=../docs/policy.schema.json
"""


def _comment(text: str | None, indent: str) -> list[str]:
    if not text:
        return []
    words, lines, cur = text.split(), [], ""
    for w in words:
        if len(cur) + len(w) + 1 > 88 - len(indent):
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    if cur:
        lines.append(cur)
    return [f"{indent}# {ln}" for ln in lines]


def _scalar(v: Any) -> str:
    return json.dumps(v) if isinstance(v, str) and (not v or any(c in v for c in ":#*@{}[],&!|>'\"%`") or v.strip() != v) else (
        json.dumps(v) if not isinstance(v, str) else v
    )


def _example(info: FieldInfo) -> Any:
    if info.examples:
        return info.examples[0]
    return None


_SAMPLE_VALUES: dict[tuple[str, str], Any] = {
    ("FilesystemLocation", "media"): "hdd",
    ("FilesystemLocation", "site"): "home",
    ("FilesystemLocation", "failure_domain"): "nas01",
    ("ResticLocation", "media"): "cloud-object",
    ("ResticLocation", "site"): "offsite-friend",
    ("ResticLocation", "failure_domain"): "friend-nas",
    ("ResticLocation", "offline"): None,
    ("ResticLocation", "env"): None,
    ("FilesystemLocation", "immutable"): None,
    ("FilesystemLocation", "offline"): None,
    ("ResticLocation", "immutable"): None,
    ("ZfsLocation", "immutable"): None,
    ("ZfsLocation", "offline"): None,
    ("ZfsLocation", "ssh"): None,
    ("ZfsLocation", "ssh_options"): None,
    ("SnapraidLocation", "immutable"): None,
    ("SnapraidLocation", "offline"): None,
    ("Leg", "parity"): None,  # parity legs only
    ("Leg", "upload"): None,  # upload legs only
    ("GcsLocation", "immutable"): None,
    ("GcsLocation", "offline"): None,
    ("GcsLocation", "endpoint"): None,
    ("GcsLocation", "credentials"): None,
    ("S3Location", "immutable"): None,
    ("S3Location", "offline"): None,
    ("S3Location", "endpoint"): None,
    ("S3Location", "access_key_id"): None,
    ("S3Location", "secret_access_key"): None,
    ("GcsLocation", "media"): "cloud-object",
    ("GcsLocation", "site"): "gcp-us-central1",
    ("GcsLocation", "failure_domain"): "gcp-lab-project",
    ("S3Location", "media"): "cloud-object",
    ("S3Location", "site"): "friend-house",
    ("S3Location", "failure_domain"): "friend-minio",
    ("VaultLocation", "media"): "ssd",
    ("VaultLocation", "site"): "home",
    ("VaultLocation", "failure_domain"): "vault-cluster",
    ("VaultLocation", "immutable"): None,
    ("VaultLocation", "offline"): None,
    ("VaultLocation", "approle"): None,  # a token or an AppRole
    ("VaultLocation", "unseal_keys"): None,
    ("VaultLocation", "server_binary"): None,
    ("TalosLocation", "media"): "nvme",
    ("TalosLocation", "site"): "home",
    ("TalosLocation", "failure_domain"): "k8s-lab",
    ("TalosLocation", "immutable"): None,
    ("TalosLocation", "offline"): None,
    ("TalosLocation", "etcd"): None,
    ("TalosLocation", "machine_configs"): None,
    ("TalosLocation", "secrets_bundle"): None,
    ("Source", "canaries"): None,  # vault sources only
    ("Source", "image"): None,  # ceph-rbd sources only
    ("CephRbdLocation", "media"): "nvme",
    ("CephRbdLocation", "site"): "home",
    ("CephRbdLocation", "failure_domain"): "ceph-lab",
    ("CephRbdLocation", "immutable"): None,
    ("CephRbdLocation", "offline"): None,
    ("CephRbdLocation", "keyring"): None,
    ("CephFsLocation", "media"): "nvme",
    ("CephFsLocation", "site"): "home",
    ("CephFsLocation", "failure_domain"): "ceph-lab",
    ("CephFsLocation", "immutable"): None,
    ("CephFsLocation", "offline"): None,
    ("CephFsLocation", "keyring"): None,
    ("CephFsLocation", "subvolume"): None,  # a path or a subvolume
    ("CephFsLocation", "group"): None,
}


def _emit_model(model: type[BaseModel], indent: str, lines: list[str], *, first_prefix: str | None = None) -> None:
    first = True
    fields = sorted(model.model_fields.items(), key=lambda kv: kv[0] != "type")  # the discriminator first
    for name, info in fields:
        pre = first_prefix if (first and first_prefix is not None) else indent
        first = False
        key = (model.__name__, name)
        ann = info.annotation
        value: Any = _SAMPLE_VALUES.get(key, _example(info))
        if key in _SAMPLE_VALUES and _SAMPLE_VALUES[key] is None:
            lines.extend(_comment(info.description, indent))
            default = info.get_default(call_default_factory=True)
            lines.append(f"{indent}# {name}: {json.dumps(default) if not isinstance(default, dict) or default else '{}'}")
            continue
        lines.extend(_comment(info.description, indent))
        sub = _submodel(ann)
        if name == "type" and value is None:
            value = get_args(ann)[0] if get_args(ann) else None
        if ann is SecretRef or sub is SecretRef:
            lines.append(f"{pre}{name}: {{env: RESTIC_PASSWORD}}")
        elif sub is not None and get_origin(ann) is list:
            lines.append(f"{pre}{name}:")
            _emit_model(sub, indent + "    ", lines, first_prefix=indent + "  - ")
        elif sub is not None:
            lines.append(f"{pre}{name}:")
            _emit_model(sub, indent + "  ", lines)
        elif value is None:
            default = info.get_default(call_default_factory=True)
            if default is None or default == [] or default == {}:
                lines.append(f"{pre}# {name}:")
            else:
                lines.append(f"{pre}{name}: {_scalar(default)}")
        elif isinstance(value, list):
            lines.append(f"{pre}{name}: [{', '.join(_scalar(v) for v in value)}]")
        else:
            lines.append(f"{pre}{name}: {_scalar(value)}")
        if pre != indent:
            pre = indent


def _submodel(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for a in get_args(ann):
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def commented_sample() -> str:
    lines = [_HEADER.rstrip("\n"), "version: 1", ""]
    lines.extend(_comment(PolicyFile.model_fields["locations"].description, ""))
    lines.append("locations:")
    for cls in LOCATION_TYPES:
        lines.extend(_comment(cls.__doc__, "  "))
        lines.append(f"  {cls.sample_name}:")
        _emit_model(cls, "    ", lines)
    lines.append("")
    lines.extend(_comment(PolicyFile.model_fields["policies"].description, ""))
    lines.append("policies:")
    _emit_model(Policy, "    ", lines, first_prefix="  - ")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ reference page


def _pretty(ann: Any, metadata: list[Any] = ()) -> str:  # type: ignore[assignment]
    """A reader's name for a type: 'name', 'duration', 'list of Leg', 'one of a, b'."""
    from typing import Annotated, Literal, Union

    from ..durations import DURATION_PATTERN
    from .models import NAME_PATTERN

    for m in metadata:
        pattern = getattr(m, "pattern", None)
        if pattern == NAME_PATTERN:
            return "name"
        if pattern == DURATION_PATTERN:
            return "duration"
    origin = get_origin(ann)
    args = get_args(ann)
    if origin is Annotated:
        base, *meta = args
        for m in meta:
            if getattr(m, "discriminator", None):
                return " or ".join(_pretty(a) for a in get_args(base)) + " (by `type`)"
            inner = getattr(m, "metadata", [])
            name = _pretty(base, inner)
            if name != _pretty(base):
                return name
        return _pretty(base, [x for m in meta for x in getattr(m, "metadata", [])])
    if origin is Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args) if len(args) > 1 else f"`{args[0]}`"
    if origin in (Union, getattr(__import__("types"), "UnionType", Union)):
        parts = [a for a in args if a is not type(None)]
        return " or ".join(_pretty(a) for a in parts)
    if origin is list:
        return f"list of {_pretty(args[0])}"
    if origin is dict:
        return f"map of {_pretty(args[0])} to {_pretty(args[1])}"
    if isinstance(ann, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(ann.__name__, ann.__name__)
    return str(ann)


def _type_text(info: FieldInfo) -> str:
    return _pretty(info.annotation, list(info.metadata))


def _model_section(model: type[BaseModel], title: str, out: list[str]) -> None:
    out.append(f"## {title}")
    out.append("")
    if model.__doc__:
        out.append(" ".join(model.__doc__.split()))
        out.append("")
    out.append("| field | type | required | default | description |")
    out.append("|---|---|---|---|---|")
    for name, info in model.model_fields.items():
        required = "yes" if info.is_required() else "no"
        value = None if info.is_required() else info.get_default(call_default_factory=True)
        if isinstance(value, BaseModel):
            value = value.model_dump(exclude_none=True)
        default = "" if info.is_required() else json.dumps(value, default=str)
        desc = (info.description or "").replace("|", "\\|")
        if info.examples:
            desc += f" Example: `{json.dumps(info.examples[0])}`."
        default_cell = f"`{default}`" if default else ""
        type_cell = _type_text(info).replace("|", "\\|")
        out.append(f"| `{name}` | {type_cell} | {required} | {default_cell} | {desc} |")
    out.append("")


def reference_markdown() -> str:
    out = [
        "# Policy file reference",
        "",
        "<!-- Generated from drtool/policy/models.py by `make docs` (drtool.policy.schema.reference_markdown). Do not edit. -->",
        "",
        "A configuration is one YAML file or a directory of them (`-c/--config`, `$DRTOOL_CONFIG`, default `./policies`).",
        "Location and policy names are global across the files. Unknown keys are errors. Durations are written like "
        "`90s`, `30m`, `24h`, `7d`, `2w`, `1h30m`. The JSON Schema is in [policy.schema.json](policy.schema.json).",
        "",
    ]
    _model_section(PolicyFile, "Top level", out)
    for cls in LOCATION_TYPES:
        _model_section(cls, f"Location `type: {cls.model_fields['type'].annotation.__args__[0]}`", out)  # type: ignore[union-attr]
    _model_section(SecretRef, "Secret reference", out)
    _model_section(Policy, "Policy", out)
    _model_section(Source, "Source", out)
    _model_section(Leg, "Leg", out)
    _model_section(Retention, "Retention", out)
    _model_section(Verify, "Verify", out)
    _model_section(ParityPlan, "Parity plan (parity legs)", out)
    _model_section(UploadSpec, "Upload (upload legs)", out)
    return "\n".join(out).rstrip() + "\n"
