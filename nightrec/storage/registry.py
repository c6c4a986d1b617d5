"""The MLflow model registry (``nightrec-recommender``) and the champion gate.

Every night's model is registered as a new version whose files are the run's ``model/`` artifacts and whose tags carry
its holdout metrics; the alias ``champion`` names the version that serves. :func:`gate` is the pure decision rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CHAMPION = "champion"
MODEL_ARTIFACT = "model"
METRIC_TAG_PREFIX = "holdout."
PREVIOUS_CHAMPION_TAG = "nightrec.previous_champion"  # set on promotion: the version this one replaced


@dataclass(frozen=True)
class ChampionInfo:
    version: str
    path: Path  # local folder holding the model files
    run_id: str | None
    ndcg_at_10: float | None


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    publish: Literal["new", "champion"]
    reason: str


def gate(new_ndcg: float, champion_ndcg: float | None, popularity_ndcg: float, tolerance: float) -> GateDecision:
    """Promote the new model unless it is worse than the champion by more than ``tolerance`` (relative NDCG@10).

    - It loses to popularity: not promoted; the night publishes with the champion. With no champion yet there is
      nothing else to serve (every user must get a list, and popularity lists would carry no reasons), so the new
      model publishes and becomes the first champion, with the loss stated in ``reason``: the version behind
      ``champion`` is always the one whose lists are published, and tomorrow's model must beat both it and
      popularity to replace it.
    - No champion (or no measured champion NDCG): promoted.
    - Otherwise promoted iff ``new >= champion * (1 - tolerance)``; if not, the champion keeps serving.
    """
    if champion_ndcg is not None and not math.isfinite(champion_ndcg):
        champion_ndcg = None
    figures = f"NDCG@10 new {new_ndcg:.4f}, champion {_fmt(champion_ndcg)}, popularity {popularity_ndcg:.4f}"
    if not math.isfinite(new_ndcg) or new_ndcg < popularity_ndcg:
        if champion_ndcg is not None:
            return GateDecision(
                False, "champion", f"new model loses to popularity; champion kept and published ({figures})"
            )
        return GateDecision(
            True,
            "new",
            f"new model loses to popularity but there is no champion: promoted as the first champion ({figures})",
        )
    if champion_ndcg is None:
        return GateDecision(True, "new", f"no champion yet; new model beats popularity and is promoted ({figures})")
    floor = champion_ndcg * (1.0 - tolerance)
    if new_ndcg >= floor:
        return GateDecision(True, "new", f"new model within {tolerance:.1%} of the champion or better ({figures})")
    return GateDecision(
        False,
        "champion",
        f"new model worse than the champion by more than {tolerance:.1%}; champion published ({figures})",
    )


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def register_model(client: MlflowClient, name: str, model_dir: Path, run_id: str, metrics: dict) -> str:
    """Log ``model_dir`` as the run's ``model/`` artifacts and register them as a new version; returns the version.

    Metrics become version tags (``holdout.<name>``) so the gate can read the champion's figures without its run.
    """
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="nightrec meta-learned recommender (served vectors source)")
    client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{MODEL_ARTIFACT}"
    tags = {f"{METRIC_TAG_PREFIX}{k}": str(float(v)) for k, v in metrics.items() if isinstance(v, int | float)}
    version = client.create_model_version(name, source, run_id=run_id, tags=tags)
    return str(version.version)


def promote(client: MlflowClient, name: str, version: str) -> None:
    """Point ``champion`` at ``version``; the version remembers which one it replaced (see ``undo_promotions``)."""
    try:
        previous = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        previous = ""
    client.set_model_version_tag(name, str(version), PREVIOUS_CHAMPION_TAG, previous)
    client.set_registered_model_alias(name, CHAMPION, str(version))


def undo_promotions(client: MlflowClient, name: str, run_ids: set[str]) -> list[str]:
    """While the champion was registered by one of ``run_ids`` (nights that did not finish), point the alias back at
    the version it replaced (or remove it if there was none). Returns the versions taken off, newest first."""
    undone: list[str] = []
    while True:
        try:
            version = client.get_model_version_by_alias(name, CHAMPION)
        except MlflowException:
            return undone
        if version.run_id not in run_ids:
            return undone
        undone.append(str(version.version))
        previous = version.tags.get(PREVIOUS_CHAMPION_TAG, "")
        if previous:
            client.set_registered_model_alias(name, CHAMPION, previous)
        else:
            client.delete_registered_model_alias(name, CHAMPION)
            return undone


def champion(client: MlflowClient, name: str, dst: Path | None = None) -> ChampionInfo | None:
    """The version behind the ``champion`` alias with a local copy of its files, or None when there is none."""
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    path = _local_copy(client, version, dst)
    ndcg = version.tags.get(
        f"{METRIC_TAG_PREFIX}ndcg_at_10", version.tags.get(f"{METRIC_TAG_PREFIX}holdout_ndcg_at_10")
    )
    value = float(ndcg) if ndcg is not None else None
    return ChampionInfo(
        str(version.version), path, version.run_id, value if value is None or math.isfinite(value) else None
    )


def _local_copy(client: MlflowClient, version, dst: Path | None) -> Path:
    source = version.source
    if source.startswith("file://"):
        from urllib.parse import unquote, urlparse

        local = Path(unquote(urlparse(source).path))
        if local.is_dir():
            return local  # local artifact store: no copy needed
    import mlflow.artifacts

    if dst is not None:
        dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst) if dst else None))
