"""A deterministic error is not retried: the stage fails once, the night at once. (What a completed night leaves in
Prefect -- its logs, the run graph's chain, its name and trigger -- is asserted on the shared night in
test_nightly.py.)"""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from nightrec.settings import Settings
from tests.flows.conftest import FIRST_NIGHT

pytestmark = pytest.mark.prefect


def test_a_deterministic_error_fails_the_stage_once(prefect_server, tmp_path, monkeypatch):
    """No catalogue in the lake: the first stage that reads it fails at once, with no retry."""
    monkeypatch.setenv("NIGHTREC_HOME", str(tmp_path / "empty-home"))
    for name in ("NIGHTREC_EVENTS_SOURCE", "NIGHTREC_ITEMS_SOURCE", "NIGHTREC_USERS_SOURCE"):
        monkeypatch.delenv(name, raising=False)
    from nightrec.flows.nightly import nightly

    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match="no item catalogue"):
        nightly(run_date=FIRST_NIGHT)
    client = MlflowClient(Settings().tracking_uri)
    exp = client.get_experiment_by_name("nightrec").experiment_id
    tries = client.search_runs([exp], filter_string="attributes.run_name = 'embed-items'")
    assert [r.info.status for r in tries] == ["FAILED"]  # retried, there would be 3 (2 retries)
    assert time.monotonic() - started < 60  # the retries' 2 + 10 s delays would have been waited


def test_transient_errors_are_told_from_deterministic_ones():
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from nightrec.flows.retries import SourceNotYetThereError, is_transient

    locked = OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))
    assert is_transient(SourceNotYetThereError("source 'x' matches no file"))
    assert is_transient(ConnectionRefusedError(111, "refused"))
    assert not is_transient(RuntimeError("could not log"))
    try:
        try:
            raise locked
        except OperationalError as inner:
            raise RuntimeError("MLflow failed") from inner
    except RuntimeError as wrapped:
        assert is_transient(wrapped)
    assert not is_transient(FileNotFoundError("no item catalogue in the lake yet"))
    assert not is_transient(ValueError("end before start"))
    assert not is_transient(OperationalError("SELECT", {}, sqlite3.OperationalError("no such table: runs")))
