"""What the MLflow run pages show, written through nightrec.storage.tracking and read back through the MLflow client
on a real SQLite store: datasets with schema and their own digests, settings as params, live epoch metrics, the
description, the experiment's type."""

from __future__ import annotations

import datetime as dt
import json
import logging

import polars as pl
import pytest

from nightrec.model import TrainConfig
from nightrec.settings import Settings
from nightrec.storage import tracking
from nightrec.tasks.train import fit_recommender
from tests.tasks.test_train import ITEM_IDS, TEXT, checkerboard_events


@pytest.fixture
def store(tmp_path):
    client = tracking.client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return client, tracking.experiment_id(client, "nightrec", str(tmp_path / "artifacts"))


def _events(users: list[str], day: dt.date) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": users,
            "item_id": [f"i{n}" for n in range(len(users))],
            "timestamp": [dt.datetime(day.year, day.month, day.day, 12)] * len(users),
            "date": [day] * len(users),
        }
    )


def test_training_and_holdout_are_datasets_of_both_runs_with_their_own_digests(store):
    client, exp = store
    parent = tracking.start_run(client, exp, "nightly")
    child = tracking.start_run(client, exp, "train", parent=parent)
    train, holdout = _events(["u1", "u2", "u1"], dt.date(2026, 3, 1)), _events(["u1", "u2"], dt.date(2026, 3, 8))
    digests = {
        context: tracking.log_dataset(
            client, (child, parent), frame, f"events-{context}", "/lake/events", context, {"users": 2}
        )
        for context, frame in (("training", train), ("holdout", holdout))
    }
    assert digests["training"] != digests["holdout"]
    for run_id in (parent, child):
        inputs = client.get_run(run_id).inputs.dataset_inputs
        by_context = {i.tags[0].value: i.dataset for i in inputs}
        assert set(by_context) == {"training", "holdout"}
        for context, dataset in by_context.items():
            assert dataset.name == f"events-{context}" and dataset.digest == digests[context]
            columns = [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]]
            assert columns == ["user_id", "item_id", "timestamp", "date"]
            profile = json.loads(dataset.profile)
            assert profile["num_rows"] == {"training": 3, "holdout": 2}[context] and profile["users"] == 2
    same_rows = tracking.log_dataset(client, (child,), train.clone(), "again", "/lake/events", "training")
    assert same_rows == digests["training"]  # the digest is the rows', not the call's


def test_epoch_metrics_are_in_the_store_while_training_still_runs(store):
    client, exp = store
    run = tracking.start_run(client, exp, "train")
    seen_during: list[int] = []
    epochs: list[int] = []

    def progress(phase: str, epoch: int, values: dict) -> None:
        tracking.log_training_epoch(client, run, phase, epoch, values)
        if phase == "meta":  # read back before training goes on: it is there already
            epochs.append(epoch)
            seen_during.append(len(client.get_metric_history(run, "meta/loss")))

    config = TrainConfig(dim=8, epochs=4, batch_users=32, lr=2e-2, seed=3, dropout=0.0, threads=1, cold_below=0)
    fit_recommender(checkerboard_events(), ITEM_IDS, TEXT, None, config, progress=progress)
    assert seen_during == list(range(1, len(seen_during) + 1)) and len(seen_during) >= 2
    history = client.get_metric_history(run, "meta/loss")
    assert [m.step for m in history] == epochs and epochs == sorted(set(epochs))
    tracking.log_training_epoch(client, run, "meta", 9, {"loss": 1.5, "validation_ndcg": 0.25})  # a validated epoch
    assert client.get_metric_history(run, "meta/validation_ndcg")[0].value == 0.25


def test_settings_are_params_with_credentials_redacted(store, monkeypatch, tmp_path):
    client, exp = store
    monkeypatch.setenv("NIGHTREC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NIGHTREC_MLFLOW_TRACKING_URI", "postgresql://nightrec:s3cret@db:5432/mlflow")
    monkeypatch.setenv("NIGHTREC_TOP_K", "17")
    run = tracking.start_run(client, exp, "nightly")
    tracking.log_night_settings(client, run, Settings())
    params = client.get_run(run).data.params
    assert params["top_k"] == "17" and params["seed"] == "42" and params["holdout_days"] == "7"
    assert "s3cret" not in json.dumps(params) and "db:5432" in params["mlflow_tracking_uri"]
    assert "lake" not in params and params["lake_root"] == str(Settings().lake_root)  # unset: where it resolves to
    assert "s3cret" not in params["tracking_uri"]


def test_description_and_experiment_type(store, tmp_path):
    client, exp = store
    run = tracking.start_run(client, exp, "nightly")
    tracking.set_description(client, run, "new model beats popularity; promoted")
    assert client.get_run(run).data.tags["mlflow.note.content"] == "new model beats popularity; promoted"
    assert client.get_experiment(exp).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    untyped = client.create_experiment("older", artifact_location=(tmp_path / "a").as_uri())
    assert tracking.experiment_id(client, "older", str(tmp_path / "a")) == untyped  # typed when next opened
    assert client.get_experiment(untyped).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"


def test_logging_a_dataset_with_a_date_column_prints_nothing_to_the_terminal(store, caplog):
    """MLflow's schema inference logs a note per Date column on the root logger; the night's terminal stays clean
    and the root logger is left as it was."""
    client, exp = store
    run = tracking.start_run(client, exp, "nightly")
    filters_before = list(logging.getLogger().filters)
    with caplog.at_level(logging.INFO):
        tracking.log_dataset(client, (run,), _events(["u1"], dt.date(2026, 3, 1)), "events", "/lake", "training")
    assert not [r for r in caplog.records if "Data type of Column" in r.getMessage()]
    assert logging.getLogger().filters == filters_before
