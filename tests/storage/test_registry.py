"""The champion gate (pure rules) and the MLflow registry helpers on a real SQLite store."""

from __future__ import annotations

import pytest

from nightrec.storage import registry, tracking


@pytest.mark.parametrize(
    ("new", "champ", "pop", "promote", "publish"),
    [
        (0.30, None, 0.20, True, "new"),  # first model that beats popularity
        (0.30, 0.30, 0.20, True, "new"),  # as good
        (0.295, 0.30, 0.20, True, "new"),  # 1.7 % worse: within 2 %
        (0.29, 0.30, 0.20, False, "champion"),  # 3.3 % worse: deliberately worse model is not promoted
        (0.35, 0.30, 0.20, True, "new"),  # better
        (0.19, 0.30, 0.20, False, "champion"),  # loses to popularity: champion serves
        (0.19, None, 0.20, True, "new"),  # loses to popularity, no champion: nothing else to serve, first champion
        (float("nan"), 0.30, 0.20, False, "champion"),  # unmeasured model is never promoted
        (0.30, float("nan"), 0.20, True, "new"),  # champion without figures counts as none
        (0.0, None, 0.0, True, "new"),  # 0.0 vs 0.0: a tie with popularity, not a win
        (0.0, 0.0, 0.0, True, "new"),  # ties everywhere: not worse, promoted
    ],
)
def test_gate(new, champ, pop, promote, publish):
    decision = registry.gate(new, champ, pop, tolerance=0.02)
    assert (decision.promote, decision.publish) == (promote, publish)
    assert "NDCG@10" in decision.reason


def test_gate_reason_says_why():
    assert "popularity" in registry.gate(0.1, 0.3, 0.2, 0.02).reason
    assert "worse than the champion" in registry.gate(0.25, 0.3, 0.2, 0.02).reason
    assert "loses to popularity" in registry.gate(0.1, None, 0.2, 0.02).reason
    tie = registry.gate(0.0, None, 0.0, 0.02)
    assert tie.outcome_vs_popularity == "tie" and "beats" not in tie.reason and "ties with popularity" in tie.reason
    win = registry.gate(0.3, 0.2, 0.1, 0.02)
    assert (win.outcome_vs_popularity, win.outcome_vs_champion) == ("beats", "beats")
    assert registry.gate(0.3, None, 0.1, 0.02).outcome_vs_champion == "no champion"


def test_paired_gate_needs_enough_users_before_it_decides():
    import numpy as np

    pop = np.full(300, 0.2)
    assert registry.gate_paired(pop + 0.1, pop, pop, 0.02, min_users=200).outcome_vs_popularity == "beats"
    few = registry.gate_paired(pop[:199] + 0.1, pop[:199], pop[:199], 0.02, min_users=200)
    assert few.outcome_vs_popularity == "too few holdout users to decide (199 < 200)"
    assert (few.promote, few.publish) == (False, "champion")


@pytest.fixture
def client(tmp_path):
    mlflow_client = tracking.client_for(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.experiment_id(mlflow_client, "test", str(tmp_path / "artifacts"))
    return mlflow_client, exp


def _model_dir(tmp_path, name: str, payload: str):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "model.json").write_text(payload)
    return folder


def test_register_promote_and_worse_model_keeps_champion(tmp_path, client):
    mlflow_client, exp = client
    name = "nightrec-recommender"
    assert registry.champion(mlflow_client, name) is None
    run1 = tracking.start_run(mlflow_client, exp, "night-1")
    v1 = registry.register_model(
        mlflow_client, name, _model_dir(tmp_path, "m1", '{"m": 1}'), run1, {"holdout_ndcg_at_10": 0.3}
    )
    decision = registry.gate(0.3, None, 0.2, 0.02)
    assert decision.promote
    registry.promote(mlflow_client, name, v1)
    champ = registry.champion(mlflow_client, name)
    assert champ.version == v1 and champ.run_id == run1 and champ.ndcg_at_10 == pytest.approx(0.3)
    assert (champ.path / "model.json").read_text() == '{"m": 1}'

    run2 = tracking.start_run(mlflow_client, exp, "night-2")
    v2 = registry.register_model(
        mlflow_client, name, _model_dir(tmp_path, "m2", '{"m": 2}'), run2, {"holdout_ndcg_at_10": 0.2}
    )
    assert v2 != v1
    decision = registry.gate(0.2, champ.ndcg_at_10, 0.1, 0.02)
    assert not decision.promote and decision.publish == "champion"
    assert registry.champion(mlflow_client, name).version == v1  # alias untouched
    tags = mlflow_client.get_model_version(name, v2).tags
    assert float(tags["holdout_ndcg_at_10"]) == pytest.approx(0.2)  # named plainly, no "holdout." prefix
    copy = registry.champion(mlflow_client, name, dst=tmp_path / "dl")
    assert (copy.path / "model.json").exists()


def test_a_registered_folder_is_a_logged_model_of_its_run(tmp_path, client):
    mlflow_client, exp = client
    run = tracking.start_run(mlflow_client, exp, "night")
    version = registry.register_model(
        mlflow_client, "m", _model_dir(tmp_path, "m1", "{}"), run, {"holdout_ndcg_at_10": 0.25, "note": "x"}
    )
    registered = mlflow_client.get_model_version("m", version)
    (output,) = mlflow_client.get_run(run).outputs.model_outputs  # the run page lists it under "Logged models"
    logged = mlflow_client.get_logged_model(output.model_id)
    assert registered.source == f"models:/{logged.model_id}" and registered.run_id == run == logged.source_run_id
    assert {m.key: m.value for m in logged.metrics} == {"holdout_ndcg_at_10": 0.25}
    assert mlflow_client.get_run(run).info.status == "RUNNING"  # logging a model never closes the night's run


def test_versions_tagged_the_old_way_still_give_the_champions_figure(tmp_path, client):
    mlflow_client, exp = client
    run = tracking.start_run(mlflow_client, exp, "night")
    version = registry.register_model(mlflow_client, "m", _model_dir(tmp_path, "m1", "{}"), run, {})
    mlflow_client.set_model_version_tag("m", version, "holdout.holdout_ndcg_at_10", "0.31")
    registry.promote(mlflow_client, "m", version)
    assert registry.champion(mlflow_client, "m").ndcg_at_10 == pytest.approx(0.31)
