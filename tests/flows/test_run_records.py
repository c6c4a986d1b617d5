"""What a night leaves in Prefect for a person to look at: its logs (each stage's start and end) retrievable from the
API, the run graph's chain of stages, the run's name and trigger; and a deterministic error is not retried."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from nightrec.settings import Settings
from tests.flows.conftest import FIRST_NIGHT, demo_home

pytestmark = pytest.mark.prefect

CHAIN = ["ingest", "embed-items", "embed-users", "train", "evaluate-and-gate", "compress-and-index", "publish"]


def flow_run_logs(flow_run_id, expected: str, timeout: float = 60.0) -> list[str]:
    """The run's log messages from the API, waiting until ``expected`` is among them (logs are sent in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=0
            )  # None: 422
            messages = [log.message for log in logs]
            if any(expected in m for m in messages) or time.monotonic() > deadline:
                return messages
            time.sleep(1)


def test_a_night_is_logged_to_the_api_chained_named_and_tagged_manual(prefect_server, tmp_path, monkeypatch):
    demo_home(tmp_path, monkeypatch)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    from nightrec.flows.nightly import nightly

    summary = nightly(run_date=FIRST_NIGHT)
    client = MlflowClient(Settings().tracking_uri)
    parent = client.get_run(summary["mlflow_run_id"])
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    assert parent.data.tags["nightrec.trigger"] == "manual"
    night_log = client.download_artifacts(parent.info.run_id, "logs/night.log", str(tmp_path))
    assert "publish: done in" in Path(night_log).read_text()  # the night's lines are on its MLflow run too

    messages = flow_run_logs(flow_run_id, f"night {FIRST_NIGHT}: done in")
    for stage in CHAIN:
        assert f"{stage}: started" in messages, (stage, messages)
        assert any(m.startswith(f"{stage}: done in ") for m in messages), (stage, messages)
    assert any(m.startswith("train meta: ") and "epoch(s), loss" in m for m in messages), messages
    assert any("rows quarantined" in m for m in messages if m.startswith(f"night {FIRST_NIGHT}: done"))

    with get_client(sync_client=True) as prefect:
        run = prefect.read_flow_run(flow_run_id)
        assert run.name == f"nightly-{FIRST_NIGHT}"
        tasks = prefect.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,  # the sync client sends None otherwise, refused by the API
            limit=50,
        )
    by_id = {t.id: t for t in tasks}
    by_name = {t.name.rsplit("-", 1)[0]: t for t in tasks}  # task runs are named TASK-N
    assert sorted(by_name) == sorted(CHAIN)
    for before, after in zip(CHAIN, CHAIN[1:], strict=False):
        upstream = {by_id[i.id].name.rsplit("-", 1)[0] for i in by_name[after].task_inputs.get("wait_for", [])}
        assert upstream == {before}, (after, upstream)


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
