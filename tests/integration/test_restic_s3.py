"""restic repositories on S3: the same Repository conformance suite as for local
repositories, against a real S3 server (SeaweedFS, SigV4), credentials passed to restic
by environment from secret references. (restic's gs: backend has no endpoint override,
so GCS repositories cannot be tested against an emulator here.)"""
from __future__ import annotations

import secrets

import pytest

from conformance.repository_suite import RepositoryConformance
from conftest import require
from helpers import PASSWORD, make_tree

from drtool.backends.restic import ResticRepository
from drtool.policy.models import ResticLocation


@pytest.fixture
def make_repo(seaweedfs, monkeypatch):
    require("restic")
    monkeypatch.setenv("TEST_RESTIC_PW", PASSWORD)
    monkeypatch.setenv("TEST_S3_KEY", seaweedfs.access_key)
    monkeypatch.setenv("TEST_S3_SECRET", seaweedfs.secret_key)
    bucket = seaweedfs.make_bucket("restic")

    def factory() -> ResticRepository:
        loc = ResticLocation(type="restic", repository=f"s3:{seaweedfs.endpoint}/{bucket}/repo-{secrets.token_hex(4)}",
                             password={"env": "TEST_RESTIC_PW"}, media="cloud-object", site="offsite", failure_domain="s3",
                             env={"AWS_ACCESS_KEY_ID": {"env": "TEST_S3_KEY"}, "AWS_SECRET_ACCESS_KEY": {"env": "TEST_S3_SECRET"},
                                  "AWS_DEFAULT_REGION": {"env": "TEST_S3_REGION"}})
        return ResticRepository("s3-repo", loc)

    monkeypatch.setenv("TEST_S3_REGION", "us-east-1")
    return factory


@pytest.fixture
def source_tree(tmp_path):
    return make_tree(tmp_path / "src", files=20)


class TestResticOnS3Conformance(RepositoryConformance):
    pass


def test_s3_credentials_stay_out_of_argv_and_errors(make_repo, seaweedfs, monkeypatch):
    repo = make_repo()
    repo.ensure_ready(create=True)
    monkeypatch.setenv("TEST_S3_SECRET", "wrong-" + seaweedfs.secret_key)
    bad = make_repo()
    with pytest.raises(Exception) as err:
        bad.ensure_ready(create=True)
    assert seaweedfs.secret_key not in str(err.value)
    assert bad.commands and all(seaweedfs.secret_key not in " ".join(c["argv"]) for c in bad.commands)
