"""The registered model as an MLflow pyfunc: saved with a signature, loaded by MLflow alone, same lists as ours."""

from __future__ import annotations

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
