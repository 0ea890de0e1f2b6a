"""Policy loading: every error at once with file:line, field path and fix."""
from __future__ import annotations

import json
from pathlib import Path
from textwrap import dedent

import pytest

from drtool.policy.loader import PolicyError, load_config
from drtool.policy.schema import commented_sample, json_schema, reference_markdown

ROOT = Path(__file__).resolve().parents[2]

GOOD = dedent("""\
    version: 1
    locations:
      laptop: {type: filesystem, media: ssd, site: home, failure_domain: laptop}
      repo-a:
        type: restic
        repository: /srv/restic-a
        password: {env: RESTIC_PW}
        media: hdd
        site: home
        failure_domain: usb
    policies:
      - name: docs
        source: {location: laptop, path: /data/docs}
        rpo: 24h
        rto: 4h
        legs:
          - kind: backup
            to: repo-a
            schedule: "0 3 * * *"
            retention: {keep_daily: 7}
            verify: {level: integrity, every: 7d}
""")


def _errors(tmp_path: Path, text: str, name: str = "p.yaml") -> list[str]:
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(PolicyError) as exc:
        load_config(f)
    return [str(i) for i in exc.value.issues]


def test_good_file_loads(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(GOOD)
    cfg = load_config(f)
    pol = cfg.policy("docs")
    assert pol.legs[0].leg_name == "backup-repo-a"
    assert pol.rpo_td.total_seconds() == 86400
    assert pol.legs[0].verify.every_td.days == 7
    assert cfg.location("repo-a").password.env == "RESTIC_PW"


def test_every_error_at_once_with_line_path_and_fix(tmp_path):
    bad = GOOD.replace("media: hdd", "media: hdd\n    immutible: true") \
              .replace("rpo: 24h", "rpo: 24 hours") \
              .replace('"0 3 * * *"', '"0 3 * *"') \
              .replace("keep_daily: 7", "keep_dayly: 7") \
              .replace("to: repo-a", "to: repo-c")
    errs = _errors(tmp_path, bad)
    text = "\n".join(errs)
    lines = bad.splitlines()

    def line_of(fragment: str) -> int:
        return next(i + 1 for i, ln in enumerate(lines) if fragment in ln)

    assert f"p.yaml:{line_of('immutible')}: locations.repo-a.immutible: unknown field 'immutible' (did you mean 'immutable'?)" in text
    assert f"p.yaml:{line_of('rpo:')}: policies[0].rpo:" in text and "duration like '24h'" in text
    assert f"p.yaml:{line_of('schedule')}: policies[0].legs[0].schedule:" in text and "cron" in text
    assert "policies[0].legs[0].retention.keep_dayly: unknown field 'keep_dayly' (did you mean 'keep_daily'?)" in text
    assert f"p.yaml:{line_of('repo-c')}: policies[0].legs[0].to: unknown location 'repo-c' (did you mean 'repo-a'?)" in text
    assert len(errs) == 5, text


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("password: {env: RESTIC_PW}", "password: {env: A, file: /b}", "exactly one of env, file, command"),
        ("password: {env: RESTIC_PW}", "password: hunter2", "Input should be a valid dictionary"),
        ("repository: /srv/restic-a", "repository: srv/restic-a", "relative path"),
        ("type: restic", "type: tape", "unknown type 'tape'"),
        ("- name: docs", "- name: Docs", "not a valid name"),
        ("path: /data/docs", "path: data/docs", "is relative"),
        ("keep_daily: 7", "keep_daily: -1", "greater than or equal to 0, got -1"),
        ("level: integrity", "level: deep", "got 'deep'"),
        ("    legs:\n", "    legs:\n      - {kind: snapshot, schedule: '@daily'}\n", "not supported on a filesystem source"),
        ("to: repo-a", "to: laptop", "cannot write to 'laptop' (type filesystem)"),
    ],
)
def test_specific_errors_name_the_fix(tmp_path, old, new, expected):
    assert old in GOOD
    errs = _errors(tmp_path, GOOD.replace(old, new, 1))
    assert any(expected in e for e in errs), errs
    assert all(e.startswith(str(tmp_path / "p.yaml") + ":") for e in errs)


ZFS = dedent("""\
    version: 1
    locations:
      tank: {type: zfs, dataset: tank, media: hdd, site: home, failure_domain: nas01}
      backup: {type: zfs, dataset: backup, media: hdd, site: home, failure_domain: backup01}
    policies:
      - name: docs
        source: {location: tank, dataset: tank/docs, recursive: true}
        rpo: 1h
        rto: 1h
        legs:
          - {kind: snapshot, schedule: "@hourly"}
          - {kind: replicate, to: backup, schedule: "@daily"}
""")


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("recursive: true", "recursive: false", None),
        ("", "", "replicating a recursive source (its child datasets) is not supported yet"),
        ("dataset: tank/docs", "dataset: other/docs", "is not under the location's dataset 'tank'"),
        ("      - {kind: snapshot, schedule: \"@hourly\"}\n", "", "a replicate leg sends the policy's own snapshots: add a snapshot leg"),
        ("to: backup", "to: tank", "targets the source's own location"),
        ('{kind: snapshot, schedule: "@hourly"}', '{kind: snapshot, schedule: "@hourly", verify: {level: sample}}',
         "a snapshot leg on a zfs location can verify at: exists, integrity (not 'sample')"),
    ],
)
def test_zfs_policy_checks(tmp_path, old, new, expected):
    assert not old or old in ZFS, "the replacement must change the file"
    text = ZFS.replace(old, new, 1) if old else ZFS
    f = tmp_path / "p.yaml"
    f.write_text(text)
    if expected is None:
        load_config(f)
        return
    errs = _errors(tmp_path, text)
    assert any(expected in e for e in errs), errs


def test_yaml_syntax_error_has_a_line(tmp_path):
    errs = _errors(tmp_path, "version: 1\npolicies:\n  - name: [unclosed\n")
    assert errs[0].startswith(str(tmp_path / "p.yaml") + ":") and "YAML syntax" in errs[0]


def test_directory_config_duplicates_across_files(tmp_path):
    (tmp_path / "a.yaml").write_text(GOOD)
    (tmp_path / "b.yaml").write_text(GOOD.split("policies:")[0])
    with pytest.raises(PolicyError) as exc:
        load_config(tmp_path)
    msgs = [str(i) for i in exc.value.issues]
    assert any("b.yaml:3: locations.laptop: location 'laptop' is already defined at" in m and "a.yaml:3" in m for m in msgs), msgs


def test_references_resolve_across_files(tmp_path):
    locs, pols = GOOD.split("policies:")
    (tmp_path / "locations.yaml").write_text(locs)
    (tmp_path / "policies.yaml").write_text("version: 1\npolicies:" + pols)
    cfg = load_config(tmp_path)
    assert sorted(cfg.locations) == ["laptop", "repo-a"] and list(cfg.policies) == ["docs"]


def test_missing_config_is_a_clear_usage_error(tmp_path):
    from drtool.errors import ConfigError, ExitCode

    with pytest.raises(ConfigError, match="configuration not found") as exc:
        load_config(tmp_path / "nope")
    assert exc.value.exit_code == ExitCode.USAGE


def test_commented_sample_is_valid_and_commented(tmp_path):
    text = commented_sample()
    assert text.count("# ") > 30
    f = tmp_path / "sample.yaml"
    f.write_text(text)
    cfg = load_config(f)
    assert cfg.policies and cfg.locations


def test_schema_validates_the_shape():
    schema = json_schema()
    assert schema["additionalProperties"] is False
    assert "Leg" in schema["$defs"] and "ResticLocation" in schema["$defs"]


def test_committed_docs_are_generated_from_the_models():
    """Fails when docs/ drifts from the models: run `make docs`."""
    assert (ROOT / "docs/policy-reference.md").read_text() == reference_markdown(), "docs/policy-reference.md is stale: run `make docs`"
    committed = json.loads((ROOT / "docs/policy.schema.json").read_text())
    assert committed == json_schema(), "docs/policy.schema.json is stale: run `make docs`"


def test_shipped_policies_validate(monkeypatch):
    monkeypatch.setenv("DEMO_RESTIC_PASSWORD", "x")
    for d in ("policies", "examples"):
        if (ROOT / d).is_dir() and any((ROOT / d).glob("*.yaml")):
            load_config(ROOT / d)


def test_durations():
    from drtool.durations import format_duration, parse_duration

    assert parse_duration("1h30m").total_seconds() == 5400
    assert parse_duration("2w").days == 14
    assert format_duration(parse_duration("1d2h3m")) == "1d2h"
    for bad in ("", "1x", "h", "0s", "-1h", "1.5h"):
        with pytest.raises(ValueError):
            parse_duration(bad)


PLATFORM = dedent("""\
    version: 1
    locations:
      vault-main:
        type: vault
        address: https://vault.lab:8200
        token: {file: /etc/drtool/vault-token}
        unseal_keys: [{file: /etc/drtool/u1}, {file: /etc/drtool/u2}]
        media: ssd
        site: home
        failure_domain: vault
      talos-lab:
        type: talos
        nodes: [10.0.0.2]
        talosconfig: {file: /etc/drtool/talosconfig}
        media: nvme
        site: home
        failure_domain: k8s
      offsite: {type: gcs, bucket: lab-offsite, media: cloud-object, site: gcp, failure_domain: gcp}
      repo: {type: restic, repository: /srv/restic, password: {env: PW}, media: hdd, site: home, failure_domain: nas}
    policies:
      - name: vault
        source: {location: vault-main, canaries: ["secret/drtool/canary#value"]}
        rpo: 24h
        rto: 4h
        legs:
          - {kind: upload, to: offsite, schedule: "0 3 * * *", verify: {level: sample, every: 7d}}
      - name: etcd
        source: {location: talos-lab}
        rpo: 24h
        rto: 4h
        legs:
          - {kind: upload, to: offsite, schedule: "0 */6 * * *", verify: {level: integrity, every: 1d}}
          - {kind: upload, name: machineconfig, to: offsite, schedule: "0 4 * * *", upload: {content: machineconfig}}
    breakglass:
      recipients: ["age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p"]
      identity: {file: /mnt/usb/breakglass.key}
      to: [offsite]
""")


def test_platform_sources_and_breakglass_load(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(PLATFORM)
    cfg = load_config(f)
    assert cfg.location("vault-main").address == "https://vault.lab:8200"
    assert cfg.policy("vault").source.canaries == ["secret/drtool/canary#value"]
    assert cfg.policy("etcd").leg("machineconfig").upload.content == "machineconfig"
    assert cfg.breakglass is not None and cfg.breakglass.to == ["offsite"]


@pytest.mark.parametrize("old,new,expected", [
    ("    token: {file: /etc/drtool/vault-token}\n", "",
     "locations.vault-main: give exactly one of 'token' or 'approle'"),
    ("address: https://vault.lab:8200", "address: vault.lab:8200", "locations.vault-main.address"),
    ('canaries: ["secret/drtool/canary#value"]', 'canaries: ["secret/drtool/canary"]', "is not mount/path#key"),
    ("source: {location: talos-lab}", "source: {location: talos-lab, path: /x}", "a talos source is the whole cluster: remove 'path'"),
    ("    talosconfig: {file: /etc/drtool/talosconfig}\n", "", "talosctl needs 'talosconfig'"),
    ("  to: [offsite]", "  to: [repo]", "breakglass.to[0]: the bundle goes to object stores: 'repo' is a restic location"),
    ("  to: [offsite]", "  to: [ofsite]", "unknown location 'ofsite' (did you mean 'offsite'?)"),
    ('recipients: ["age1', 'recipients: ["agex1', "is not an age public key"),
])
def test_platform_errors_name_the_fix(tmp_path, old, new, expected):
    assert old in PLATFORM
    errs = _errors(tmp_path, PLATFORM.replace(old, new, 1))
    assert any(expected in e for e in errs), errs
    assert all(e.startswith(str(tmp_path / "p.yaml") + ":") for e in errs)


def test_content_belongs_to_talos_sources(tmp_path):
    text = PLATFORM.replace("source: {location: vault-main, canaries", "source: {location: vault-main, canaries", 1).replace(
        "verify: {level: sample, every: 7d}}", "verify: {level: sample, every: 7d}, upload: {content: etcd}}", 1)
    errs = _errors(tmp_path, text)
    assert any("policies[0].legs[0].upload.content" in e and "talos source" in e for e in errs), errs


def test_two_breakglass_sections_are_one_too_many(tmp_path):
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "a.yaml").write_text(PLATFORM)
    (d / "b.yaml").write_text("version: 1\nbreakglass:\n  recipients: [\"age1abc\"]\n")
    with pytest.raises(PolicyError) as exc:
        load_config(d)
    assert any("already defined at" in str(i) and "a.yaml" in str(i) for i in exc.value.issues)


def test_example_drills_load_and_resolve_against_the_lab_example():
    """drills/*.yaml are the seed lab's drills: each validates, and every step names one
    leg of a policy in examples/lab.yaml."""
    from drtool.drill.load import drill_files, load_drill
    from drtool.drill.runner import check_references

    cfg = load_config(ROOT / "examples" / "lab.yaml")
    files = drill_files(ROOT / "drills")
    assert {f.name for f in files} >= {"talos-etcd.yaml", "vault.yaml", "app-data.yaml", "gpu-ai.yaml", "full-lab.yaml"}
    for f in files:
        assert check_references(cfg, load_drill(f)) == [], f


def test_committed_drill_schema_is_generated_from_the_model():
    from drtool.drill.model import drill_schema

    assert json.loads((ROOT / "docs/drill.schema.json").read_text()) == drill_schema(), "docs/drill.schema.json is stale: run `make docs`"


CEPHFS = dedent("""\
    version: 1
    locations:
      fs: {type: cephfs, path: /shares/photos, media: nvme, site: home, failure_domain: ceph-lab}
      repo: {type: restic, repository: /srv/restic, password: {env: RP}, media: hdd, site: home, failure_domain: nas}
    policies:
      - name: photos
        source: {location: fs}
        rpo: 1h
        rto: 1h
        legs:
          - {kind: snapshot, schedule: "@hourly", verify: {level: sample}}
          - {kind: backup, to: repo, schedule: "@daily"}
""")


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("", "", "loads: /shares/photos in CephFS 'cephfs'"),
        ("path: /shares/photos", "subvolume: csi-vol-1, group: csi", "loads: subvolume csi/csi-vol-1 of CephFS 'cephfs'"),
        ("path: /shares/photos", "path: /shares/photos, subvolume: x", "give 'path' (a directory) or 'subvolume'"),
        ("path: /shares/photos", "group: csi", "'group' names a subvolume's group: give 'subvolume' too"),
        ("path: /shares/photos", "path: shares/photos", "is relative: write it from the file system's root"),
        ("path: /shares/photos", "path: /shares/.snap/x", "contains '.', '..' or '.snap'"),
        ("source: {location: fs}", "source: {location: fs, path: /x}", "a cephfs source is the location's tree"),
        ("verify: {level: sample}", "verify: {level: integrity}", "a snapshot leg on a cephfs location can verify at: exists, sample"),
    ],
)
def test_cephfs_policy_checks(tmp_path, old, new, expected):
    assert not old or old in CEPHFS, "the replacement must change the file"
    text = CEPHFS.replace(old, new, 1) if old else CEPHFS
    f = tmp_path / "p.yaml"
    f.write_text(text)
    if expected.startswith("loads: "):
        assert load_config(f).location("fs").tree == expected.removeprefix("loads: ")
        return
    errs = _errors(tmp_path, text)
    assert any(expected in e for e in errs), errs


def test_every_leg_driver_resolves():
    """DRIVERS names each driver as "module:Class" (imported only when a policy uses it): every
    entry must import and be a LegDriver, else that leg kind would fail only when first used."""
    from drtool.legs import DRIVERS, LegDriver, driver_class

    for kind, location_type in DRIVERS:
        cls = driver_class(kind, location_type)
        assert isinstance(cls, type) and issubclass(cls, LegDriver), (kind, location_type, cls)
    assert driver_class("parity", "restic") is None
