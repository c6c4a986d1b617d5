"""A catalogue that lags its logs: one real nightly where a user's every event names an item the catalogue lacks.

Before, ingest accepted the rows, training dropped them and publish failed the whole night ("rows without reasons").
Now such items train and are recommended by their id, and that user gets a list like everyone else."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest
from typer.testing import CliRunner

from nightrec.settings import Settings
from nightrec.sources.demo import DemoSpec
from nightrec.storage import publication
from nightrec.storage.lake import Lake
from tests.flows.conftest import demo_home

pytestmark = pytest.mark.prefect

SPEC = DemoSpec(users=60, items=120, events=2000, days=30, end=dt.date(2026, 11, 20), seed=5)
NIGHT = SPEC.end + dt.timedelta(days=1)
MISSING = [f"not-in-catalogue-{n}" for n in range(3)]


@pytest.fixture(scope="module")
def lagging_night(prefect_server, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("lag")
        demo_home(root, mp, SPEC)
        with open(root / "input" / "events.csv", "a") as events:
            for n, item in enumerate(MISSING):
                events.write(f"newuser,{item},2026-11-1{n + 1}T12:00:00Z,click\n")
        from nightrec.flows.nightly import nightly

        summary = nightly(run_date=NIGHT)
        yield Settings(), summary


def test_the_night_publishes_and_the_user_of_missing_items_gets_a_list(lagging_night):
    settings, summary = lagging_night
    lake = Lake(settings.lake_root)
    pointer, table = publication.read_latest(lake)
    assert pointer["date"] == NIGHT.isoformat() and pointer["mlflow_run_id"] == summary["mlflow_run_id"]
    lists = pl.from_arrow(table)
    history = lake.scan_events(before=NIGHT).collect()
    known = set(history["user_id"]) | set(lake.read_users()["user_id"])
    assert "newuser" in known and set(lists["user_id"]) == known
    assert lists.group_by("user_id").len()["len"].min() == settings.top_k
    assert lists.join(history.select("user_id", "item_id").unique(), on=["user_id", "item_id"]).is_empty()
    mine = lists.filter(pl.col("user_id") == "newuser")
    assert not set(mine["item_id"]) & set(MISSING)  # its own items are seen
    reasons = [r for rs in mine["reasons"].to_list() for r in rs]
    assert reasons and {r["item_id"] for r in reasons} <= set(MISSING)
    assert all(r["title"] == r["item_id"] for r in reasons)  # no catalogue title: the id
    assert summary["publish"]["users_without_reasons"] == 0


def test_missing_items_are_trained_and_counted_in_the_summary(lagging_night):
    settings, summary = lagging_night
    from mlflow.tracking import MlflowClient

    from nightrec.model import Recommender

    model = Recommender.load(summary["train"]["model_dir"])
    catalogue = Lake(settings.lake_root).read_items()["item_id"].to_list()
    assert list(model.item_ids) == catalogue + MISSING  # catalogue order kept, missing ones appended
    client = MlflowClient(settings.tracking_uri)
    parent = client.get_run(summary["mlflow_run_id"]).data.metrics
    train = client.get_run(summary["train"]["train_run_id"]).data.metrics
    for metrics in (parent, train):
        assert metrics["items_missing_from_catalogue"] == 3 and metrics["events_on_missing_items"] == 3
    assert parent["users_without_reasons"] == 0


def test_recommend_shows_items_the_catalogue_lacks_by_id(lagging_night):
    from nightrec.flows.cli import app

    result = CliRunner().invoke(app, ["recommend", "--user", "newuser", "--k", "3"])
    assert result.exit_code == 0, result.output
    assert "because you interacted with: not-in-catalogue-" in result.output
