"""What drtool reads from restic's own output (restic 0.14 here; later versions' shapes too)."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from drtool.backends.restic import parse_restic_time, parse_restoring


@pytest.mark.parametrize("line, want", [
    ("restoring <Snapshot 6312d1f6 of [/tmp/rr/src] at 2026-11-28 22:04:08.885679574 +0000 UTC by root@vm> to /tmp/rr/t",
     ("6312d1f6", datetime(2026, 11, 28, 22, 4, 8, 885679, tzinfo=timezone.utc))),
    ("restoring <Snapshot 0a1b2c3d of [/data] at 2026-11-28 23:04:08 +0100 CET by u@h> to /t",
     ("0a1b2c3d", datetime(2026, 11, 28, 22, 4, 8, tzinfo=timezone.utc))),
    ("restoring snapshot 6312d1f6 of [/tmp/rr/src] at 2026-11-28 22:04:08 by root@vm to /tmp/rr/t", ("6312d1f6", None)),
    ("Fatal: no snapshot found", None),
])
def test_the_restored_snapshot_is_read_from_restics_first_line(line, want):
    assert parse_restoring(f"{line}\n") == want


def test_restic_times_keep_microseconds_and_zone():
    assert parse_restic_time("2026-11-28T22:04:08.885679574+01:00") == datetime(2026, 11, 28, 21, 4, 8, 885679, tzinfo=timezone.utc)
