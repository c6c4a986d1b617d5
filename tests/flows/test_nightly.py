"""One real nightly run (Prefect server, MLflow SQLite store, the packaged language model, FAISS) on small demo data,
and what it leaves for each of its readers: the published lists; the MLflow pages (read through the MLflow client: the
parent run's params, datasets, description and Logged Model, the train run's live epochs); and what a person finds in
Prefect (its logs, each stage's start and end, retrievable from the API, the run graph's chain of stages, the run's name
and trigger). One night serves every test here: each asserts a different part of it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from nightrec.settings import Settings
from nightrec.storage import publication
from nightrec.storage.lake import Lake
from tests.flows.conftest import FIRST_NIGHT, demo_home

pytestmark = pytest.mark.prefect

CHAIN = ["ingest", "embed-items", "embed-users", "train", "evaluate-and-gate", "compress-and-index", "publish"]
STAGES = set(CHAIN)


@pytest.fixture(scope="module")
def night(prefect_server, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        demo_home(tmp_path_factory.mktemp("night"), mp)
        from nightrec.flows.nightly import nightly

        summary = nightly(run_date=FIRST_NIGHT)
        yield Settings(), summary


def test_every_known_user_gets_k_unseen_items(night):
    settings, summary = night
    lake = Lake(settings.lake_root)
    pointer, table = publication.read_latest(lake)
    assert pointer["date"] == FIRST_NIGHT.isoformat() and pointer["mlflow_run_id"] == summary["mlflow_run_id"]
    lists = pl.from_arrow(table)
    history = lake.scan_events(before=FIRST_NIGHT).collect()
    known = set(history["user_id"]) | set(lake.read_users()["user_id"])
    assert set(lists["user_id"]) == known
    assert lists.group_by("user_id").len()["len"].min() == settings.top_k
    seen = lists.join(history.select("user_id", "item_id").unique(), on=["user_id", "item_id"], how="inner")
    assert seen.is_empty(), "an already-seen item was recommended"
    assert lists["model_version"].unique().to_list() == [str(pointer["model_version"])]


def test_mlflow_has_a_finished_parent_run_with_a_child_per_stage(night):
    settings, summary = night
    client = MlflowClient(settings.tracking_uri)
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.run_name == f"nightly-{FIRST_NIGHT}" and parent.info.status == "FINISHED"
    assert parent.data.tags["nightrec.trigger"] == "manual" and parent.data.tags["prefect.flow_run_id"]
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert {c.info.run_name for c in children} == STAGES
    assert all(c.info.status == "FINISHED" for c in children)
    assert "model_ndcg_at_10" in parent.data.metrics and "popularity_ndcg_at_10" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/history.png" in artifacts
    sample = json.loads(Path(client.download_artifacts(parent.info.run_id, "sample_lists.json")).read_text())
    rows = [dict(zip(sample["columns"], row, strict=True)) for row in sample["data"]]
    assert len({r["user_id"] for r in rows}) == 5 and len(rows) == 5 * 10  # five whole top-10 lists, with titles
    assert all(r["title"] for r in rows)


def test_first_model_becomes_champion_and_produced_the_lists(night):
    settings, summary = night
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
    champion = client.get_model_version_by_alias(settings.registered_model, "champion")
    assert str(summary["gate"]["model_version"]) == str(champion.version)


def test_champion_loads_from_the_registry_as_a_pyfunc_with_a_signature(night):
    settings, _ = night
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{settings.registered_model}@champion")
    assert model.metadata.signature.inputs.input_names() == ["history"]
    history = pl.from_arrow(publication.read_latest(Lake(settings.lake_root))[1])["item_id"][:3].to_list()
    out = model.predict(pd.DataFrame({"history": [history]}), params={"k": 7})
    assert len(out["item_ids"][0]) == 7 and not set(out["item_ids"][0]) & set(history)


def test_recommend_prints_titles_and_reasons(night):
    settings, _ = night
    from nightrec.flows.cli import app

    _, table = publication.read_latest(Lake(settings.lake_root))
    user = table.column("user_id")[0].as_py()
    first_item = pl.from_arrow(table).filter(pl.col("user_id") == user, pl.col("rank") == 1)["item_id"][0]
    title = Lake(settings.lake_root).read_items().filter(pl.col("item_id") == first_item)["title"][0]
    result = CliRunner().invoke(app, ["recommend", "--user", user, "--k", "3"])
    assert result.exit_code == 0, result.output
    assert f"Recommendations for user {user}" in result.output and title in result.output
    assert "because you interacted with:" in result.output
    unknown = CliRunner().invoke(app, ["recommend", "--user", "no-such-user"])
    assert unknown.exit_code != 0


def test_the_parent_run_carries_settings_datasets_description_and_the_logged_model(night):
    settings, summary = night
    client = MlflowClient(settings.tracking_uri, registry_uri=settings.tracking_uri)
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
    settings, summary = night
    client = MlflowClient(settings.tracking_uri)
    history = client.get_metric_history(summary["train"]["train_run_id"], "meta/loss")
    assert [m.step for m in history] == list(range(1, 9))  # NIGHTREC_TRAIN_EPOCHS=8
    stamps = [m.timestamp for m in history]
    assert stamps == sorted(stamps) and len(set(stamps)) > 1  # one write per epoch, not one batch at the end


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


def test_a_night_is_logged_to_the_api_chained_named_and_tagged_manual(night, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    settings, summary = night
    client = MlflowClient(settings.tracking_uri)
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
