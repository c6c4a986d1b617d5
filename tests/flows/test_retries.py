"""A transient failure (the day's log file lands a moment late) is retried and the night completes."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from nightrec.settings import Settings
from nightrec.storage.lake import Lake
from tests.flows.conftest import FIRST_NIGHT, demo_home
from tests.flows.processes import EPOCHS, SPEC

pytestmark = pytest.mark.prefect


def land_after_first_failure(source, target, timeout: float = 120.0) -> None:
    client = MlflowClient(Settings().tracking_uri)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name("nightrec")
        if exp and client.search_runs(
            [exp.experiment_id], "attributes.run_name = 'ingest' and attributes.status = 'FAILED'"
        ):
            break
        time.sleep(0.2)
    shutil.copy(source, target)


def test_ingest_retries_until_the_late_file_arrives(prefect_server, tmp_path, monkeypatch):
    demo_home(tmp_path, monkeypatch, SPEC)
    monkeypatch.setenv("NIGHTREC_TRAIN_EPOCHS", EPOCHS)
    landed = tmp_path / "late" / "events.csv"
    landed.parent.mkdir()
    monkeypatch.setenv("NIGHTREC_EVENTS_SOURCE", str(landed))
    # The first attempt finds no file; the file lands as soon as that attempt has failed, before the retry (2 s later).
    lands = threading.Thread(target=land_after_first_failure, args=(tmp_path / "input" / "events.csv", landed))
    lands.start()
    from nightrec.flows.nightly import nightly

    summary = nightly(run_date=FIRST_NIGHT)
    lands.join()
    assert Lake(Settings().lake_root).published_dates() == [FIRST_NIGHT]
    assert summary["ingest"]["events_valid"] > 0
    client = MlflowClient(Settings().tracking_uri)
    exp = client.get_experiment_by_name("nightrec").experiment_id
    ingest_runs = client.search_runs([exp], filter_string="attributes.run_name = 'ingest'")
    assert sorted(r.info.status for r in ingest_runs) == ["FAILED", "FINISHED"]  # one failed try, then success
