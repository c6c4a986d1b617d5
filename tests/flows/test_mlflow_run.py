"""One real night (a temporary Prefect server, a SQLite MLflow store) and what its MLflow pages show, read through
the MLflow client: the parent run's params, datasets, description and Logged Model; the train run's live epochs."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from nightrec.settings import Settings
from tests.flows.conftest import FIRST_NIGHT, demo_home

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


@pytest.fixture(scope="module")
def night(prefect_server, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        demo_home(tmp_path_factory.mktemp("night"), mp)
        from nightrec.flows.nightly import nightly

        summary = nightly(run_date=FIRST_NIGHT)
        settings = Settings()
        client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
        yield settings, summary, client


def test_the_parent_run_carries_settings_datasets_description_and_the_logged_model(night):
    settings, summary, client = night
    parent = client.get_run(summary["mlflow_run_id"])
    params = parent.data.params
    assert params["top_k"] == "20" and params["holdout_days"] == str(settings.holdout_days)
    assert params["seed"] == str(settings.seed) and params["train_epochs"] == "8"
    assert parent.data.tags["mlflow.note.content"] == summary["gate"]["reason"]

    datasets = {i.tags[0].value: i.dataset for i in parent.inputs.dataset_inputs}
    assert set(datasets) == {"training", "holdout"} and len(parent.inputs.dataset_inputs) == 2
    train_run = client.get_run(summary["train"]["train_run_id"])
    assert {i.dataset.digest for i in train_run.inputs.dataset_inputs} == {d.digest for d in datasets.values()}
    assert datasets["training"].digest != datasets["holdout"].digest
    for context, dataset in datasets.items():
        profile = json.loads(dataset.profile)
        assert profile["num_rows"] == summary["train"][f"{'train' if context == 'training' else 'holdout'}_events"]
        assert [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]][:2] == ["user_id", "item_id"]

    (output,) = parent.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == parent.info.run_id
    version = client.get_model_version(settings.registered_model, str(summary["gate"]["candidate_version"]))
    assert version.source == f"models:/{logged.model_id}" and version.run_id == parent.info.run_id
    assert float(version.tags["holdout_ndcg_at_10"]) == pytest.approx(summary["gate"]["holdout"]["model"]["ndcg_at_10"])
    assert not any(key.startswith("holdout.") for key in version.tags)
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_train_run_logged_each_epoch_as_it_ended(night):
    _, summary, client = night
    history = client.get_metric_history(summary["train"]["train_run_id"], "meta/loss")
    assert [m.step for m in history] == list(range(1, 9))  # NIGHTREC_TRAIN_EPOCHS=8
    stamps = [m.timestamp for m in history]
    assert stamps == sorted(stamps) and len(set(stamps)) > 1  # one write per epoch, not one batch at the end
