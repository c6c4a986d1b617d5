"""Several `nightrec` processes on one home at once: same-date nightly runs, another date alongside, two ingests.

Overlap is made certain, not hoped for: the first process is held inside a failpoint (armed to wait for a release
file, nightrec/storage/failpoints.py) while the others start, so no test depends on timing.
"""

from __future__ import annotations

import datetime as dt
import os

import polars as pl
import pytest

from nightrec.flows.cli import RUN_IN_PROGRESS_EXIT
from nightrec.settings import Settings
from nightrec.storage import publication
from nightrec.storage.lake import Lake
from tests.flows import processes
from tests.flows.conftest import demo_home
from tests.flows.processes import D1, D2, EPOCHS, SPEC

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


def test_same_date_refused_other_date_alongside(prefect_server, tmp_path, monkeypatch):
    demo_home(tmp_path, monkeypatch, SPEC)
    monkeypatch.setenv("NIGHTREC_TRAIN_EPOCHS", EPOCHS)
    hold = "after:embed-items"
    markers = {name: tmp_path / f"markers-{name}" for name in ("first", "other")}
    held = {
        name: processes.child_environment(NIGHTREC_FAILPOINT=hold, NIGHTREC_FAILPOINT_DIR=str(folder))
        for name, folder in markers.items()
    }
    logs = {name: tmp_path / f"{name}.log" for name in ("first", "second", "other")}

    first = processes.start(["nightly", "--date", D1.isoformat()], held["first"], logs["first"])
    processes.wait_for_hit(first, markers["first"], hold, logs["first"])  # holds the D1 lock until released
    second = processes.start(["nightly", "--date", D1.isoformat()], processes.child_environment(), logs["second"])
    other = processes.start(["nightly", "--date", D2.isoformat()], held["other"], logs["other"])
    assert processes.finish(second, logs["second"]) == RUN_IN_PROGRESS_EXIT
    refusal = processes.tail(logs["second"])
    assert f"another nightly run for {D1} is in progress (pid {first.pid})" in refusal, refusal
    processes.wait_for_hit(other, markers["other"], hold, logs["other"])  # both past ingest and embed-items
    for folder in markers.values():  # from here the two dates run side by side
        processes.release(folder, hold)
    for name, proc in (("first", first), ("other", other)):
        assert processes.finish(proc, logs[name]) == 0, processes.tail(logs[name])

    lake = Lake(Settings().lake_root)
    assert lake.published_dates() == [D1, D2]
    assert lake.read_latest_pointer()["date"] == D2.isoformat()  # never moved back by the older date
    users = set(lake.scan_events(before=D1).collect()["user_id"]) | set(lake.read_users()["user_id"])
    for day in (D1, D2):
        publication.verify_partition(lake, day, deep=True)
        lists = pl.from_arrow(publication.read_day(lake, day))
        # Nothing interleaved: one run's rows, one model version, every user once per rank.
        assert lists["run_date"].unique().to_list() == [day]
        assert lists["model_version"].n_unique() == 1
        assert lists.select("user_id", "rank").is_duplicated().sum() == 0
        assert users <= set(lists["user_id"])
    assert processes.leftovers(lake.root) == []


def _events_file(path, users: range, days: int, start: dt.date) -> int:
    rows = [
        f"u{u},i{(u * 7 + d) % 50},{(start + dt.timedelta(days=d)).isoformat()}T0{u % 10}:00:00Z"
        for u in users
        for d in range(days)
    ]
    path.write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    return len(rows)


def test_two_ingests_at_once_land_every_row(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("NIGHTREC_HOME", str(home))
    first_file, second_file = tmp_path / "a.csv", tmp_path / "b.csv"
    # The same ten days in both files: without the lock, each merge reads the day before the other's rename
    # and the second rename drops the first file's rows.
    rows = _events_file(first_file, range(0, 40), 10, dt.date(2026, 1, 1))
    rows += _events_file(second_file, range(40, 80), 10, dt.date(2026, 1, 1))
    markers = tmp_path / "markers"
    hold = "ingest:mid-merge"
    env = processes.child_environment(NIGHTREC_FAILPOINT=hold, NIGHTREC_FAILPOINT_DIR=str(markers))
    logs = {name: tmp_path / f"{name}.log" for name in ("first", "second")}

    first = processes.start(["ingest", "--events", str(first_file)], env, logs["first"])
    processes.wait_for_hit(first, markers, hold, logs["first"])  # one day merged, the lock held
    second = processes.start(["ingest", "--events", str(second_file)], env, logs["second"])
    processes.wait_for_text(second, logs["second"], "waiting for another ingest")
    processes.release(markers, hold)
    for name, proc in (("first", first), ("second", second)):
        assert processes.finish(proc, logs[name]) == 0, processes.tail(logs[name])

    lake = Lake(Settings().lake_root)
    lake.verify_events(deep=True)
    events = lake.scan_events().collect()
    assert events.height == rows
    assert events["user_id"].n_unique() == 80 and len(lake.event_dates()) == 10
    assert processes.leftovers(lake.root) == []


def fresh_home_environment(**extra: str) -> dict[str, str]:
    """No Prefect server configured: each process starts its own temporary one on the home's database."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("NIGHTREC_FAILPOINT", "PREFECT_API", "PREFECT_HOME"))
    }
    return {**env, **extra}


def test_two_dates_on_a_fresh_home_both_complete_and_an_ingest_waits_for_the_night(tmp_path, monkeypatch):
    """Before: the two processes' temporary Prefect servers ran the fresh database's migrations together
    (``duplicate column name``) and both nights failed; and an ingest during a night changed its events between
    training and publishing."""
    demo_home(tmp_path, monkeypatch, SPEC)
    monkeypatch.setenv("NIGHTREC_TRAIN_EPOCHS", EPOCHS)
    hold, markers = "after:ingest", tmp_path / "markers"
    logs = {name: tmp_path / f"{name}.log" for name in ("first", "other", "second", "ingest")}
    held = fresh_home_environment(NIGHTREC_FAILPOINT=hold, NIGHTREC_FAILPOINT_DIR=str(markers))
    first = processes.start(["nightly", "--date", D1.isoformat()], held, logs["first"])
    other = processes.start(["nightly", "--date", D2.isoformat()], fresh_home_environment(), logs["other"])
    processes.wait_for_hit(first, markers, hold, logs["first"])  # D1 ingested and now holds what it reads

    second = processes.start(["nightly", "--date", D1.isoformat()], fresh_home_environment(), logs["second"])
    assert processes.finish(second, logs["second"]) == RUN_IN_PROGRESS_EXIT, processes.tail(logs["second"])
    late = tmp_path / "late.csv"
    late.write_text(
        "user_id,item_id,timestamp\n" + "".join(f"late-u,late-i{i},{SPEC.end}T12:0{i}:00Z\n" for i in range(3))
    )
    late_ingest = processes.start(["ingest", "--events", str(late)], fresh_home_environment(), logs["ingest"])
    processes.wait_for_text(late_ingest, logs["ingest"], "waiting for the running nightly that reads events of")
    processes.release(markers, hold)
    for name, proc in (("first", first), ("other", other), ("ingest", late_ingest)):
        assert processes.finish(proc, logs[name]) == 0, processes.tail(logs[name])

    lake = Lake(Settings().lake_root)
    assert lake.published_dates() == [D1, D2] and lake.read_latest_pointer()["date"] == D2.isoformat()
    assert lake.scan_events(before=D1).filter(pl.col("user_id") == "late-u").collect().height == 3
    # D1 read one lake from its ingest on: the late rows reached neither its training nor its lists.
    assert "late-u" not in set(pl.from_arrow(publication.read_day(lake, D1))["user_id"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(Settings().tracking_uri)
    exp = client.get_experiment_by_name(Settings().mlflow_experiment).experiment_id
    train = client.search_runs([exp], filter_string="attributes.run_name = 'train'")
    by_night = {client.get_run(r.data.tags["mlflow.parentRunId"]).data.tags["nightrec.run_date"]: r for r in train}
    assert by_night[D1.isoformat()].data.metrics["events"] == lake.scan_events(before=D1).collect().height - 3
