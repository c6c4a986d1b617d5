"""The registered model as an MLflow pyfunc: saved with a signature, loaded by MLflow alone, same lists as ours."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from nightrec.model import TrainConfig
from nightrec.tasks import pyfunc_model
from nightrec.tasks.train import fit_recommender
from tests.tasks.test_train import ITEM_IDS, TEXT, checkerboard_events


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    config = TrainConfig(dim=8, epochs=20, batch_users=32, lr=2e-2, seed=3, dropout=0.0, threads=1, cold_below=0)
    recommender = fit_recommender(checkerboard_events(), ITEM_IDS, TEXT, None, config)
    root = tmp_path_factory.mktemp("pyfunc")
    folder = recommender.save(root / "weights")
    return recommender, pyfunc_model.save_pyfunc(folder, root / "mlflow-model")


def test_loaded_pyfunc_recommends_unseen_items_of_the_users_block(saved):
    recommender, folder = saved
    model = mlflow.pyfunc.load_model(str(folder))
    histories = [["i0", "i1", "i2"], ["i12", "i15"], ["i3", "not-in-catalogue"]]
    out = model.predict(pd.DataFrame({"history": histories}), params={"k": 5})
    assert list(out.columns) == ["item_ids", "scores"] and len(out) == 3
    for history, items, scores in zip(histories, out["item_ids"], out["scores"], strict=True):
        assert len(items) == 5 and not set(items) & set(history)
        assert list(scores) == sorted(scores, reverse=True)
    assert all(int(i[1:]) < 10 for i in out["item_ids"][0])  # block A history -> block A items
    assert all(int(i[1:]) >= 10 for i in out["item_ids"][1])
    direct = pyfunc_model.recommend_for_histories(recommender, histories, 5)
    assert out["item_ids"].tolist() == direct["item_ids"].tolist()


def test_signature_is_recorded_and_enforced(saved):
    _, folder = saved
    model = mlflow.pyfunc.load_model(str(folder))
    signature = model.metadata.signature
    assert signature.inputs.input_names() == ["history"]
    assert signature.outputs.input_names() == ["item_ids", "scores"]
    assert signature.params.to_dict()[0]["name"] == "k"
    with pytest.raises(MlflowException):
        model.predict(pd.DataFrame({"user": ["u1"]}))  # a missing input column is refused by the schema


def test_recommender_dir_finds_the_weights_inside_the_mlflow_folder(saved):
    recommender, folder = saved
    inner = pyfunc_model.recommender_dir(folder)
    assert (inner / "model.safetensors").exists()
    assert pyfunc_model.recommender_dir(inner) == inner  # a bare weights folder is returned as is


HISTORIES = [["i0", "i1", "i2"], ["i12", "i15"]]


@pytest.fixture(scope="module")
def registered(saved, tmp_path_factory):
    """The nightly's path: the model logged as a Logged Model of a night's run, registered and promoted."""
    from nightrec.storage import registry, tracking

    recommender, folder = saved
    root = tmp_path_factory.mktemp("store")
    client = tracking.client_for(f"sqlite:///{root / 'mlflow.db'}")
    exp = tracking.experiment_id(client, "test", str(root / "artifacts"))
    run = tracking.start_run(client, exp, "nightly-test")
    weights = pyfunc_model.recommender_dir(folder)
    version = registry.log_model(client, "rec", run, {"holdout_ndcg_at_10": 0.42}, pyfunc_model.pyfunc_spec(weights))
    registry.promote(client, "rec", version)
    return recommender, client, run, version


def test_the_logged_model_belongs_to_the_run_and_serves_as_champion(registered):
    from nightrec.storage import registry

    recommender, client, run, version = registered
    (output,) = client.get_run(run).outputs.model_outputs  # "Logged models" on the run page
    logged = client.get_logged_model(output.model_id)
    assert logged.source_run_id == run and logged.status.to_proto() == 2  # READY
    assert {m.key: m.value for m in logged.metrics} == {"holdout_ndcg_at_10": 0.42}
    registered_version = client.get_model_version("rec", version)
    assert registered_version.source == f"models:/{logged.model_id}" and registered_version.run_id == run
    assert registered_version.tags["holdout_ndcg_at_10"] == "0.42"
    assert client.get_run(run).info.status == "RUNNING"  # the night's run stays open

    champion = registry.champion(client, "rec")
    assert champion.version == version and champion.run_id == run and champion.ndcg_at_10 == pytest.approx(0.42)
    assert (pyfunc_model.recommender_dir(champion.path) / "model.safetensors").exists()
    with registry._process_uris(client):
        model = mlflow.pyfunc.load_model("models:/rec@champion")
    out = model.predict(pd.DataFrame({"history": HISTORIES}), params={"k": 5})
    direct = pyfunc_model.recommend_for_histories(recommender, HISTORIES, 5)
    assert out["item_ids"].tolist() == direct["item_ids"].tolist()


def test_requirements_name_versions_a_package_index_serves():
    from packaging.requirements import Requirement

    requirements = [Requirement(line) for line in pyfunc_model.pip_requirements()]
    assert {r.name for r in requirements} == set(pyfunc_model.RUNTIME_PACKAGES)
    for requirement in requirements:
        (spec,) = requirement.specifier
        assert spec.operator == "==" and "+" not in spec.version  # no local label such as torch's "+cpu"


TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _reachable(url: str) -> bool:
    import socket
    from urllib.parse import urlparse

    try:
        socket.create_connection((urlparse(url).hostname, 443), timeout=3).close()
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_the_logged_model_predicts_in_a_fresh_venv_built_from_its_own_requirements(registered, tmp_path):
    """A user's path: download the champion, build a venv from its requirements.txt alone (no nightrec installed,
    nothing of ours on the path), load it with mlflow.pyfunc and get the same lists. pip's cache and configured
    indexes are used as they are; torch's CPU index is added when reachable, so pip need not fetch CUDA builds."""
    import json
    import subprocess
    import sys

    import mlflow.artifacts

    from nightrec.storage import registry

    recommender, client, _, _ = registered
    with registry._process_uris(client):
        model_dir = mlflow.artifacts.download_artifacts("models:/rec@champion", dst_path=str(tmp_path / "model"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    index = ["--extra-index-url", TORCH_CPU_INDEX] if _reachable(TORCH_CPU_INDEX) else []
    install = [
        python,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-compile",
        "-r",
        str(Path(model_dir) / "requirements.txt"),
        *index,
    ]
    done = subprocess.run(install, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    script = (
        "import importlib.util, json, sys\n"
        "assert importlib.util.find_spec('nightrec') is None, 'nightrec must come from the model folder only'\n"
        "import mlflow.pyfunc, pandas as pd\n"
        "model = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "out = model.predict(pd.DataFrame({'history': json.loads(sys.argv[2])}), params={'k': 5})\n"
        "print(json.dumps(out['item_ids'].tolist()))\n"
    )
    run = subprocess.run(
        [python, "-c", script, model_dir, json.dumps(HISTORIES)],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the repository: nightrec must not be importable from the working directory
        env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(Path.home()), "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    expected = pyfunc_model.recommend_for_histories(recommender, HISTORIES, 5)["item_ids"].tolist()
    assert json.loads(run.stdout.strip().splitlines()[-1]) == expected
