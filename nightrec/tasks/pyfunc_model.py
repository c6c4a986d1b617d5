"""The recommender as an MLflow pyfunc model with a signature, so the registry shows its schema and any MLflow user can
``mlflow.pyfunc.load_model("models:/nightrec-recommender@champion").predict(...)``.

Input: one row per user, ``history`` = the item ids the user interacted with, oldest first. Param ``k`` (default 10).
Output: ``item_ids`` and ``scores``, the user's top-k unseen items, best first.

Saved as "models from code" (:mod:`nightrec.tasks.pyfunc_entry` is the model file): nothing is pickled; the weights stay
in the safetensors + JSON folder that :meth:`Recommender.save` writes, under ``artifacts/recommender``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

ARTIFACT = "recommender"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the nightrec package, shipped with the model as code


class HistoryRecommender(PythonModel):
    """Top-k unseen items for each input history, scored by the meta-trained model (adapted on that history)."""

    def load_context(self, context) -> None:
        from nightrec.model import Recommender

        self.recommender = Recommender.load(Path(context.artifacts[ARTIFACT]))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        k = int((params or {}).get("k", 10))
        return recommend_for_histories(self.recommender, [list(h) for h in model_input["history"]], k)


def recommend_for_histories(recommender, histories: list[list[str]], k: int) -> pd.DataFrame:
    """Scoring behind :class:`HistoryRecommender`: unknown ids are ignored, seen items never returned."""
    from nightrec.ranking import top_k_unseen

    index = recommender.item_index
    rows = [np.array([index[i] for i in h if i in index], dtype=np.int64) for h in histories]
    scores = recommender.score_histories(rows)
    top = top_k_unseen(scores, rows, k)  # -1 pads a row with fewer than k unseen items
    item_ids = np.asarray(recommender.item_ids, dtype=object)
    picked = [t[t >= 0] for t in top]
    return pd.DataFrame(
        {
            "item_ids": [item_ids[t].tolist() for t in picked],
            "scores": [scores[r, t].astype(float).tolist() for r, t in enumerate(picked)],
        }
    )


def signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(Array(DataType.string), "history")]),
        outputs=Schema([ColSpec(Array(DataType.string), "item_ids"), ColSpec(Array(DataType.double), "scores")]),
        params=ParamSchema([ParamSpec("k", DataType.long, 10)]),
    )


# What the packaged model imports at load and predict time (nightrec's own code travels inside the model folder).
# MLflow adds itself (``mlflow==<this version>``).
RUNTIME_PACKAGES = ("torch", "safetensors", "numpy", "pandas", "polars")


def pip_requirements() -> list[str]:
    """``RUNTIME_PACKAGES`` pinned to the versions this environment runs, as a package index names them.

    The local label is dropped (``torch 2.13.0+cpu`` -> ``torch==2.13.0``): no index serves a local version, so a
    pinned ``+cpu`` makes the model uninstallable. ``torch==2.13.0`` still matches the CPU build where pip is given
    one (a find-links folder, or ``--extra-index-url https://download.pytorch.org/whl/cpu``); plain PyPI serves the
    default (CUDA) build of the same release."""
    import importlib.metadata as md

    from packaging.version import Version

    return [f"{name}=={Version(md.version(name)).public}" for name in RUNTIME_PACKAGES]


def pyfunc_spec(recommender_dir: Path) -> dict:
    """The keyword arguments of ``mlflow.pyfunc.save_model``/``log_model`` that define the model for the
    safetensors + JSON folder ``recommender_dir``: models from code, weights as an artifact, signature, example."""
    import json

    items = json.loads((Path(recommender_dir) / "model.json").read_text())["item_ids"]
    return {
        "python_model": str(Path(__file__).with_name("pyfunc_entry.py")),
        "artifacts": {ARTIFACT: str(recommender_dir)},
        "code_paths": [str(PACKAGE_DIR)],
        "signature": signature(),
        "input_example": (pd.DataFrame({"history": [items[:3]]}), {"k": 10}),
        "pip_requirements": pip_requirements(),  # explicit: inferring them would run the model in a subprocess
    }


def save_pyfunc(recommender_dir: Path, dst: Path) -> Path:
    """Write the MLflow model folder (MLmodel + signature, code, weights) for ``recommender_dir`` at ``dst``."""
    import mlflow.pyfunc

    mlflow.pyfunc.save_model(path=str(dst), **pyfunc_spec(recommender_dir))
    return dst


def recommender_dir(model_dir: Path) -> Path:
    """The safetensors + JSON folder inside an MLflow model folder (or ``model_dir`` itself for a bare one)."""
    model_dir = Path(model_dir)
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.exists():
        return model_dir
    import yaml

    spec = yaml.safe_load(mlmodel.read_text())
    relative = spec["flavors"]["python_function"]["artifacts"][ARTIFACT]["path"]
    return model_dir / relative
