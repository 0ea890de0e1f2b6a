"""SnapRAID log parsing, thresholds and the parity policy rules, on log lines captured
from snapraid 12.2 on this machine (the e2e tests run the real thing)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from drtool.backends.snapraid import SnapraidConf, filter_for, parse_log, parse_status, unescape
from drtool.errors import ConfigError
from drtool.legs.parity import _crossed
from drtool.policy.loader import PolicyError, load_config
from drtool.policy.models import ParityPlan

DIFF_LOG = """\
version:none
command:diff
scan:equal:d1:dir0/a
scan:update:d1:dir2/f5: 184670 1795872297.779139555 -> 184672 1795872348.810389673
scan:add:d3:dir1/f4moved
scan:remove:d1:dir0/f3
scan:remove:d3:odd\\dname
scan:move:d2:old/x:new/x
summary:equal:19
summary:added:1
summary:removed:2
summary:updated:1
summary:moved:1
summary:copied:0
summary:restored:0
summary:exit:diff
"""

FIX_LOG = """\
error:0:d1:dir0/f3: Read error at position 0
fixed:0:d1:dir0/f3: Fixed data error at position 0
status:recovered:d1:dir0/f3
status:unrecoverable:d2:a\\db
summary:error:2
summary:exit:recovered
"""

STATUS_LOG = """\
summary:file_count:20
block_count:22
summary:has_unsynced:0
summary:has_unscrubbed:11
summary:has_rehash:0
summary:has_bad:3:0:0
info_count:22
info_time:1795872304:11:scrubbed
info_time:1795872312:11:new
"""


def test_diff_log_counts_and_files():
    seen = []
    changes, outcome = parse_log(DIFF_LOG.splitlines(True), on_file=lambda *a: seen.append(a))
    assert changes.counts == {"equal": 19, "added": 1, "removed": 2, "updated": 1, "moved": 1, "copied": 0, "restored": 0}
    assert changes.files["updated"] == ["d1:dir2/f5"]  # the size/mtime tail is not part of the path
    assert changes.files["removed"] == ["d1:dir0/f3", "d3:odd:name"]  # "\d" is an escaped ':'
    assert changes.files["moved"] == ["d2:new/x"]
    assert ("removed", "d3", "odd:name") in seen and ("added", "d3", "dir1/f4moved") in seen
    assert changes.known == 19 + 2 + 1 + 1 and changes.any and outcome.exit == "diff"


def test_fix_log_status_lines():
    _, out = parse_log(FIX_LOG.splitlines(True))
    assert out.exit == "recovered" and out.count("error") == 2
    assert out.status == {"recovered": ["d1:dir0/f3"], "unrecoverable": ["d2:a:b"]}
    assert out.errors == ["d1:dir0/f3: Read error at position 0"]


def test_status_summary_and_scrub_ages():
    st = parse_status(STATUS_LOG.splitlines(True))
    assert (st.files, st.blocks, st.bad_blocks, st.unscrubbed_blocks, st.unsynced) == (20, 22, 3, 11, False)
    t_scrub = datetime.fromtimestamp(1795872304, timezone.utc)
    assert st.last_scrub == t_scrub and st.oldest_block_time == t_scrub
    assert st.share_older_than(timedelta(seconds=5), t_scrub + timedelta(seconds=10)) == 50.0
    assert st.share_older_than(timedelta(days=1), t_scrub) == 0.0


def test_status_without_summary_is_an_error():
    with pytest.raises(Exception, match="no summary"):
        parse_status(["msg:fatal: something\n"])


def test_unescape_and_filters():
    assert unescape("a\\db\\\\c\\nd") == "a:b\\c\nd"
    assert filter_for("dir/a*b?.txt") == "/dir/a\\*b\\?.txt"
    assert filter_for("/x") == "/x"


def test_thresholds_count_or_percent():
    plan = ParityPlan(max_removed=5, max_removed_percent=10, max_updated=None, max_updated_percent=None)
    changes, _ = parse_log(DIFF_LOG.splitlines(True))  # 23 files known
    assert _crossed(plan, {"removed": 2, "updated": 900}, changes) == []  # 2 ≤ 5 and 8.7% ≤ 10%; updates unlimited
    assert _crossed(plan, {"removed": 3, "updated": 0}, changes) == ["13.0% of 23 files removed (limit 10%)"]
    assert _crossed(plan, {"removed": 6, "updated": 0}, changes) == ["6 files removed (limit 5)"]


def test_conf_reading(tmp_path: Path):
    conf = tmp_path / "snapraid.conf"
    conf.write_text("# comment\nparity /mnt/p1/snapraid.parity\n2-parity /mnt/p2/a,/mnt/p2/b\ncontent /var/snapraid.content\n"
                    "data d1 /mnt/disk 1/\ndisk d2 /mnt/d2\nexclude *.tmp\n")
    c = SnapraidConf.read(conf)
    assert c.data == {"d1": Path("/mnt/disk 1"), "d2": Path("/mnt/d2")}
    assert c.parity == [Path("/mnt/p1/snapraid.parity"), Path("/mnt/p2/a"), Path("/mnt/p2/b")]
    assert c.disk_of("/mnt/disk 1/x/y") == ("d1", "x/y") and c.disk_of("/elsewhere") is None
    conf.write_text("data d1 /mnt/d1\n")
    with pytest.raises(ConfigError, match="no parity, content line"):
        SnapraidConf.read(conf)


def _write(tmp_path: Path, legs: str, source: str = "{location: array, path: /mnt/pool/media}") -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(f"""\
version: 1
locations:
  array: {{type: snapraid, media: hdd, site: home, failure_domain: nas, config: /etc/snapraid.conf, pool: /mnt/pool}}
  repo: {{type: restic, media: hdd, site: home, failure_domain: usb, repository: /srv/restic, password: {{env: X}}}}
policies:
  - name: media
    source: {source}
    rpo: 1d
    rto: 1d
    legs:
{legs}""")
    return p


def test_parity_policy_rules(tmp_path: Path):
    ok = _write(tmp_path, "      - {kind: parity, schedule: '0 4 * * *', parity: {max_removed: 10}}\n"
                          "      - {kind: backup, to: repo, schedule: '0 5 * * *'}\n")
    cfg = load_config(ok)
    assert cfg.policies["media"].legs[0].parity_plan.max_removed == 10

    bad = _write(tmp_path, "      - {kind: parity, schedule: '0 4 * * *', retention: {keep_last: 3}}\n"
                           "      - {kind: backup, to: repo, schedule: '0 5 * * *', parity: {max_removed: 1}}\n",
                 source="{location: array, path: /elsewhere}")
    with pytest.raises(PolicyError) as err:
        load_config(bad)
    text = str(err.value)
    assert "p.yaml:11: policies[0].legs[0]: a parity leg keeps no history" in text
    assert "'parity' settings belong to parity legs" in text
    assert "is not inside the array's pool '/mnt/pool'" in text
