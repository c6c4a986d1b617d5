"""`nightrec evaluate` as a user types it: a catalogue folder in, one MLflow run with its table and plots out."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from nightrec.flows.cli import app
from nightrec.settings import Settings


def _amazon_folder(folder: Path, n_users: int = 90, n_items: int = 24) -> Path:
    """A tiny Amazon 2018 category: users walk the catalogue in order, so the next item follows from the last."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    with gzip.open(folder / "Tiny_5.json.gz", "wt") as reviews:
        for u in range(n_users):
            start = int(rng.integers(0, n_items))
            for t in range(int(rng.integers(5, 10))):
                record = {"reviewerID": f"U{u}", "asin": f"A{(start + t) % n_items}", "overall": 5.0,
                          "unixReviewTime": 1_500_000_000 + 86_400 * t}  # fmt: skip
                reviews.write(json.dumps(record) + "\n")
    with gzip.open(folder / "meta_Tiny.json.gz", "wt") as meta:
        for i in range(n_items):
            record = {"asin": f"A{i}", "title": f"Card number {i}", "description": [f"A card of series {i % 4}."]}
            meta.write(json.dumps(record) + "\n")
    return folder


@pytest.mark.slow
def test_evaluate_logs_a_table_a_summary_and_the_history_plot_per_catalogue(home, tmp_path):
    folder = _amazon_folder(tmp_path / "tiny-shop")
    result = CliRunner().invoke(app, ["evaluate", "--dataset", str(folder), "--seeds", "1", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert "sasrec" in result.output and "ratio (mean ± std over seeds)" in result.output
    client = MlflowClient(Settings().tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("nightrec-offline").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["seeds"] == "[0]"
    artifacts = {a.path for p in ("tables", "plots") for a in client.list_artifacts(run.info.run_id, p)}
    assert {"tables/tiny-shop.json", "tables/tiny-shop.md", "plots/ndcg_by_history.png"} <= artifacts
    assert "| warm ndcg@10 |" in run.data.tags["mlflow.note.content"]  # the ratio table is the run's description
    metrics = run.data.metrics
    for name in ("sasrec_warm_ndcg_at_10", "nightrec_cold_k0_ndcg_at_20", "text_cold_items_ndcg_at_20"):
        assert name in metrics and f"{name}_std" in metrics
    # the sequence is the whole signal here: the sequential peer must find it, popularity cannot
    assert metrics["sasrec_warm_ndcg_at_10"] > 2 * metrics["popularity_warm_ndcg_at_10"]


def test_evaluate_refuses_a_folder_of_no_known_layout(home, tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["evaluate", "--dataset", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "empty" in result.output
