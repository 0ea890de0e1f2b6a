"""Conformance suite for the ``Repository`` Protocol.

A backend's test module imports ``RepositoryConformance`` and provides two
fixtures: ``make_repo`` (a factory returning a fresh, not yet initialised
Repository) and ``source_tree`` (a directory of files). Every backend that
claims ``Repository`` in ``drtool.backends.PROTOCOLS`` must pass it.
"""
from __future__ import annotations

import hashlib
from datetime import timezone
from pathlib import Path

import pytest

from drtool.backends.base import Repository
from drtool.errors import ConfigError


def _digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


class RepositoryConformance:
    def test_satisfies_protocol(self, make_repo):
        assert isinstance(make_repo(), Repository)

    def test_missing_repository_is_not_created_unless_asked(self, make_repo):
        repo = make_repo()
        with pytest.raises(ConfigError, match="does not exist"):
            repo.ensure_ready(create=False)
        repo.ensure_ready(create=True)
        repo.ensure_ready(create=False)  # now it exists

    def test_backup_list_restore_round_trip(self, make_repo, source_tree, tmp_path):
        repo = make_repo()
        repo.ensure_ready(create=True)
        res = repo.backup([str(source_tree)], policy="pol", leg="leg1")
        assert res.point.policy == "pol" and res.point.leg == "leg1"
        assert res.point.time.tzinfo is not None and res.point.time.utcoffset() == timezone.utc.utcoffset(None)
        assert res.bytes_processed and res.bytes_processed > 0
        listed = repo.list_points(policy="pol", leg="leg1")
        assert [p.id for p in listed] == [res.point.id]
        target = tmp_path / "restore"
        repo.restore(res.point.id, str(target))
        restored = target / str(source_tree).lstrip("/")
        assert _digest_tree(restored) == _digest_tree(source_tree)

    def test_listing_filters_by_policy_and_leg(self, make_repo, source_tree):
        repo = make_repo()
        repo.ensure_ready(create=True)
        a = repo.backup([str(source_tree)], policy="a", leg="x").point
        b = repo.backup([str(source_tree)], policy="b", leg="x").point
        c = repo.backup([str(source_tree)], policy="a", leg="y").point
        assert {p.id for p in repo.list_points()} == {a.id, b.id, c.id}
        assert [p.id for p in repo.list_points(policy="a", leg="x")] == [a.id]
        assert {p.id for p in repo.list_points(policy="a")} == {a.id, c.id}
        times = [p.time for p in repo.list_points()]
        assert times == sorted(times)

    def test_read_file_streams_the_backed_up_content(self, make_repo, source_tree):
        repo = make_repo()
        repo.ensure_ready(create=True)
        point = repo.backup([str(source_tree)], policy="p", leg="l").point
        f = next(p for p in sorted(source_tree.rglob("*")) if p.is_file())
        got = bytearray()
        repo.read_file(point.id, str(f), got.extend)
        assert bytes(got) == f.read_bytes()

    def test_check_passes_on_a_healthy_repository(self, make_repo, source_tree):
        repo = make_repo()
        repo.ensure_ready(create=True)
        repo.backup([str(source_tree)], policy="p", leg="l")
        result = repo.check(read_data_percent=100)
        assert result.ok, result.message

    def test_forget_removes_only_the_given_points(self, make_repo, source_tree):
        repo = make_repo()
        repo.ensure_ready(create=True)
        p1 = repo.backup([str(source_tree)], policy="p", leg="l").point
        (source_tree / "new-file").write_bytes(b"change")
        p2 = repo.backup([str(source_tree)], policy="p", leg="l").point
        repo.forget([p1.id])
        assert [p.id for p in repo.list_points()] == [p2.id]
        assert repo.check(read_data_percent=100).ok
