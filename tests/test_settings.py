"""Settings refuse what the lake cannot honour, with a message that says why."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nightrec.settings import Settings


@pytest.mark.parametrize("variable", ["NIGHTREC_LAKE", "NIGHTREC_HOME"])
def test_object_store_uris_are_refused_not_taken_for_local_folders(monkeypatch, tmp_path, variable):
    monkeypatch.setenv("NIGHTREC_HOME", str(tmp_path))
    monkeypatch.setenv(variable, "s3://bucket/nightrec")
    with pytest.raises(ValidationError, match="object-store URIs are not supported"):
        Settings()


def test_a_local_lake_resolves_to_an_absolute_path(monkeypatch, tmp_path):
    monkeypatch.setenv("NIGHTREC_HOME", str(tmp_path))
    monkeypatch.setenv("NIGHTREC_LAKE", "relative-lake")
    assert Settings().lake_root.is_absolute() and Settings().lake_root.name == "relative-lake"
