"""Backfills as an engineer runs them: three dates, a re-run that skips them, --force on one date."""

from __future__ import annotations

import datetime as dt
import shutil

import polars as pl
import pytest
from mlflow.tracking import MlflowClient
from polars.testing import assert_frame_equal
from typer.testing import CliRunner

from nightrec.flows.cli import app
from nightrec.settings import Settings
from nightrec.storage import delta, publication
from nightrec.storage.lake import Lake
from tests.conftest import tree_digest
from tests.flows import processes
from tests.flows.conftest import FIRST_NIGHT, demo_home

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

DATES = [FIRST_NIGHT + dt.timedelta(days=i) for i in range(3)]


def backfill(*extra: str):
    args = ["backfill", "--start", DATES[0].isoformat(), "--end", DATES[-1].isoformat(), *extra]
    return CliRunner().invoke(app, args)


def test_three_day_backfill_then_skip_then_force_one_date(prefect_server, tmp_path, monkeypatch):
    demo_home(tmp_path, monkeypatch, processes.SPEC)  # four nights of the backfill's mechanics, not of the model
    monkeypatch.setenv("NIGHTREC_TRAIN_EPOCHS", processes.EPOCHS)
    first = backfill()
    assert first.exit_code == 0, first.output
    for day in DATES:  # one summary line per night
        assert any(line.startswith(f"{day}: ") and "rows published" in line for line in first.output.splitlines())
    settings = Settings()
    lake = Lake(settings.lake_root)
    assert lake.published_dates() == DATES
    client = MlflowClient(settings.tracking_uri)
    exp = client.get_experiment_by_name(settings.mlflow_experiment).experiment_id
    runs = client.search_runs([exp], filter_string="tags.`nightrec.kind` = 'nightly'")
    assert sorted(r.data.tags["nightrec.run_date"] for r in runs) == [d.isoformat() for d in DATES]
    assert {r.data.tags["nightrec.trigger"] for r in runs} == {"backfill"}
    assert lake.read_latest_pointer()["date"] == DATES[-1].isoformat()

    partitions = {d: tree_digest(lake.recommendations_partition(d)) for d in DATES}
    events = {d: tree_digest(lake.events_partition(d)) for d in lake.event_dates()}
    again = backfill()
    assert again.exit_code == 0 and "skipped 3 already published" in again.output
    assert {d: tree_digest(lake.recommendations_partition(d)) for d in DATES} == partitions
    assert len(client.search_runs([exp], filter_string="tags.`nightrec.kind` = 'nightly'")) == 3

    # Old nights' folders get pruned; a cached training result pointing at a removed model must train again.
    shutil.rmtree(settings.home / "runs" / DATES[1].isoformat() / "models")
    forced = CliRunner().invoke(
        app, ["backfill", "--start", DATES[1].isoformat(), "--end", DATES[1].isoformat(), "--force"]
    )
    assert forced.exit_code == 0, forced.output
    after = {d: tree_digest(lake.recommendations_partition(d)) for d in DATES}
    assert after[DATES[0]] == partitions[DATES[0]] and after[DATES[2]] == partitions[DATES[2]]
    assert after[DATES[1]] != partitions[DATES[1]]  # a new part, committed by the new run
    # ... with the very same lists: the re-run night (which re-ingested the same files) is deterministic
    old_version = delta.open_table(lake.recommendations_uri).version() - 1
    old, new = (pl.from_arrow(publication.read_day(lake, DATES[1], v)) for v in (old_version, None))
    assert_frame_equal(old.select(processes.LIST_COLUMNS), new.select(processes.LIST_COLUMNS))
    assert set(new["mlflow_run_id"]) != set(old["mlflow_run_id"])
    assert new["mlflow_run_id"][0] != lake.read_latest_pointer()["mlflow_run_id"]  # the newest is still DATES[2]
    assert events == {d: tree_digest(lake.events_partition(d)) for d in lake.event_dates()}  # re-ingest: no duplicates
    runs = client.search_runs([exp], filter_string=f"tags.`nightrec.run_date` = '{DATES[1].isoformat()}'")
    assert len([r for r in runs if r.data.tags.get("nightrec.kind") == "nightly"]) == 2


def test_failed_date_stops_the_backfill_and_names_it(prefect_server, tmp_path, monkeypatch):
    demo_home(tmp_path, monkeypatch)
    monkeypatch.setenv("NIGHTREC_EVENTS_SOURCE", str(tmp_path / "not-landed-yet-*.csv"))
    result = backfill()
    assert result.exit_code == 1
    assert f"backfill stopped at {DATES[0]}" in result.output and "resumes from" in result.output
    assert Lake(Settings().lake_root).published_dates() == []


def test_a_night_killed_after_its_commit_is_run_again(prefect_server, tmp_path, monkeypatch):
    """A night killed right after its lists' commit: they are readable, but its run stayed RUNNING. The backfill does
    not skip the date (a date counts as published only once its night finished): it re-runs it and closes the dead
    run."""
    from tests.flows import processes
    from tests.flows.processes import D1, EPOCHS, SPEC

    demo_home(tmp_path, monkeypatch, SPEC)
    monkeypatch.setenv("NIGHTREC_TRAIN_EPOCHS", EPOCHS)
    point, markers, log = "publish:after-commit", tmp_path / "markers", tmp_path / "killed.log"
    env = processes.child_environment(NIGHTREC_FAILPOINT=point, NIGHTREC_FAILPOINT_DIR=str(markers))
    killed = processes.start(["nightly", "--date", D1.isoformat()], env, log)
    processes.wait_for_hit(killed, markers, point, log)
    processes.kill_group(killed)
    settings = Settings()
    lake = Lake(settings.lake_root)
    assert lake.published_dates() == [D1]
    killed_run = lake.read_latest_pointer()["mlflow_run_id"]

    result = CliRunner().invoke(app, ["backfill", "--start", D1.isoformat(), "--end", D1.isoformat()])
    assert result.exit_code == 0, result.output
    assert f"ran 1 date(s): {D1}" in result.output
    client = MlflowClient(settings.tracking_uri)
    exp = client.get_experiment_by_name(settings.mlflow_experiment).experiment_id
    runs = client.search_runs([exp], filter_string="tags.`nightrec.kind` = 'nightly'", order_by=["start_time ASC"])
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"] and runs[0].info.run_id == killed_run
    pointer = lake.read_latest_pointer()
    assert (pointer["date"], pointer["mlflow_run_id"]) == (D1.isoformat(), runs[1].info.run_id)
    again = CliRunner().invoke(app, ["backfill", "--start", D1.isoformat(), "--end", D1.isoformat()])
    assert again.exit_code == 0 and "skipped 1 already published" in again.output
