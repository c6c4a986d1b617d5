"""One real nightly run (Prefect server, MLflow SQLite store, the packaged language model, FAISS) on small demo data."""

from __future__ import annotations

import polars as pl
import pytest
from typer.testing import CliRunner

from nightrec.settings import Settings
from nightrec.storage import publication
from nightrec.storage.lake import Lake
from tests.flows.conftest import FIRST_NIGHT, demo_home

pytestmark = pytest.mark.prefect

STAGES = {"ingest", "embed-items", "embed-users", "train", "evaluate-and-gate", "compress-and-index", "publish"}


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
    from mlflow.tracking import MlflowClient

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
    import json
    from pathlib import Path

    sample = json.loads(Path(client.download_artifacts(parent.info.run_id, "sample_lists.json")).read_text())
    rows = [dict(zip(sample["columns"], row, strict=True)) for row in sample["data"]]
    assert len({r["user_id"] for r in rows}) == 5 and len(rows) == 5 * 10  # five whole top-10 lists, with titles
    assert all(r["title"] for r in rows)


def test_first_model_becomes_champion_and_produced_the_lists(night):
    settings, summary = night
    from mlflow.tracking import MlflowClient

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
