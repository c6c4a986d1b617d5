"""Settings refuse what the lake cannot honour, with a message that says why; the lake may be an object store."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nightrec.settings import Settings


def test_an_object_store_home_is_refused_not_taken_for_a_local_folder(monkeypatch):
    monkeypatch.setenv("NIGHTREC_HOME", "s3://bucket/nightrec")
    with pytest.raises(ValidationError, match="the home must be a local"):
        Settings()


def test_an_object_store_lake_is_kept_as_its_uri(monkeypatch, tmp_path):
    monkeypatch.setenv("NIGHTREC_HOME", str(tmp_path))
    monkeypatch.setenv("NIGHTREC_LAKE", "s3://bucket/nightrec/")
    assert Settings().lake_root == "s3://bucket/nightrec"


@pytest.mark.parametrize(("uri", "message"), [("ftp://host/lake", "unknown lake scheme"), ("s3://", "needs a bucket")])
def test_a_lake_uri_the_store_cannot_take_is_refused(monkeypatch, tmp_path, uri, message):
    monkeypatch.setenv("NIGHTREC_HOME", str(tmp_path))
    monkeypatch.setenv("NIGHTREC_LAKE", uri)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_a_local_lake_resolves_to_an_absolute_path(monkeypatch, tmp_path):
    monkeypatch.setenv("NIGHTREC_HOME", str(tmp_path))
    monkeypatch.setenv("NIGHTREC_LAKE", "relative-lake")
    assert Settings().lake_root.is_absolute() and Settings().lake_root.name == "relative-lake"
