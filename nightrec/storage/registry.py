"""The MLflow model registry (``nightrec-recommender``) and the champion gate.

Every night's model is logged as an MLflow Logged Model of the night's parent run (the run page lists it, with its
files and requirements) and registered from it as a new version whose tags carry its holdout metrics under their own
names (``holdout_ndcg_at_10``); the alias ``champion`` names the version that serves. :func:`gate_paired` is the
nightly's pure decision rule (per-user NDCG@10, a paired bootstrap, a minimum number of users); :func:`gate` is the
same rule on mean figures alone, for callers without per-user figures.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

CHAMPION = "champion"
MODEL_ARTIFACT = "model"
# Tags of versions registered before metrics were tagged under their own names: still read, never written.
LEGACY_METRIC_TAG_PREFIX = "holdout."
CHAMPION_METRIC = "holdout_ndcg_at_10"
# Where the champion's NDCG@10 is read from, first found wins: the nightly's name, the bare name, the legacy ones.
CHAMPION_METRIC_TAGS = (
    CHAMPION_METRIC,
    "ndcg_at_10",
    f"{LEGACY_METRIC_TAG_PREFIX}{CHAMPION_METRIC}",
    f"{LEGACY_METRIC_TAG_PREFIX}ndcg_at_10",
)
PREVIOUS_CHAMPION_TAG = "nightrec.previous_champion"  # set on promotion: the version this one replaced
BOOTSTRAP_RESAMPLES = 1000
CONFIDENCE = 0.95

Outcome = Literal["beats", "loses", "tie"]


@dataclass(frozen=True)
class ChampionInfo:
    version: str
    path: Path  # local folder holding the model files
    run_id: str | None
    ndcg_at_10: float | None


@dataclass(frozen=True)
class Comparison:
    """The new model against another on the same users: mean NDCG@10 of each and a confidence interval of the mean
    per-user difference ``new - other``. ``outcome`` is "beats" when the interval lies above 0, "loses" when it lies
    below 0, and "tie" when it contains 0 (equal figures, 0.0 vs 0.0 included, are a tie)."""

    new: float
    other: float
    diff: float
    low: float
    high: float
    users: int

    @property
    def outcome(self) -> Outcome:
        if self.low > 0:
            return "beats"
        if self.high < 0:
            return "loses"
        return "tie"

    def as_dict(self) -> dict[str, float | str]:
        return {
            "new": self.new,
            "other": self.other,
            "diff": self.diff,
            "low": self.low,
            "high": self.high,
            "users": self.users,
            "outcome": self.outcome,
        }

    def describe(self) -> str:
        return f"{self.diff:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    publish: Literal["new", "champion"]
    reason: str
    outcome_vs_popularity: str = ""
    outcome_vs_champion: str = ""  # "no champion" when there is none
    users: int | None = None  # holdout users the decision was made on (None: mean figures only)
    vs_popularity: Comparison | None = None
    vs_champion: Comparison | None = None


def paired_bootstrap(
    new: np.ndarray,
    other: np.ndarray,
    resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Comparison:
    """Percentile bootstrap over users of the mean per-user difference ``new - other`` (paired: the same users are
    resampled for both). Users with a non-finite figure on either side are left out. Seeded, so a night's decision is
    reproducible; resampled ``chunk`` rows at a time, so memory stays at a chunk times the users."""
    new, other = np.asarray(new, dtype=np.float64), np.asarray(other, dtype=np.float64)
    both = np.isfinite(new) & np.isfinite(other)
    diff = new[both] - other[both]
    n = len(diff)
    if n == 0:
        nan = float("nan")
        return Comparison(nan, nan, nan, nan, nan, 0)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 2_000_000 // n))
    means = np.concatenate(
        [
            diff[rng.integers(0, n, size=(min(chunk, resamples - start), n))].mean(1)
            for start in range(0, resamples, chunk)
        ]
    )
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    # all-equal figures resample to exactly 0: keep the interval exactly [0, 0] (a tie), whatever the float noise
    if not diff.any():
        low = high = 0.0
    return Comparison(
        float(new[both].mean()), float(other[both].mean()), float(diff.mean()), float(low), float(high), n
    )


def _point(new: float, other: float) -> Comparison:
    """Mean figures alone: a degenerate interval at the difference (no spread is known)."""
    diff = new - other
    return Comparison(new, other, diff, diff, diff, 0)


def gate_paired(
    new: np.ndarray,
    popularity: np.ndarray,
    champion: np.ndarray | None,
    tolerance: float,
    min_users: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> GateDecision:
    """The nightly gate on per-user NDCG@10 of the new model, popularity and the champion (the same users, in the same
    order; ``champion`` None when there is none). See :func:`decide` for the rule."""
    new = np.asarray(new, dtype=np.float64)
    users = int(np.isfinite(new).sum())
    vs_pop = paired_bootstrap(new, popularity, resamples, seed=seed)
    vs_champ = paired_bootstrap(new, champion, resamples, seed=seed + 1) if champion is not None else None
    return decide(vs_pop, vs_champ, tolerance, users=users, min_users=min_users)


def decide(
    vs_popularity: Comparison,
    vs_champion: Comparison | None,
    tolerance: float,
    users: int | None = None,
    min_users: int = 0,
) -> GateDecision:
    """Promote and publish the new model unless the evidence says it is worse.

    - Fewer than ``min_users`` holdout users (``users``): too few to decide either way. With a champion, it keeps
      serving and nothing is promoted; with none, the new model publishes and becomes the first champion, and the
      reason says it was not validated.
    - It loses to popularity (the interval of ``new - popularity`` lies below 0): not promoted; the night publishes
      with the champion. With no champion yet there is nothing else to serve (every user must get a list, and
      popularity lists would carry no reasons), so the new model publishes and becomes the first champion, with the
      loss stated in ``reason``: the version behind ``champion`` is always the one whose lists are published, and
      tomorrow's model must beat both it and popularity to replace it.
    - It loses to the champion beyond ``tolerance``: the interval of ``new - champion`` lies below 0 *and* the mean
      loss is more than ``tolerance`` of the champion's NDCG@10 (relative): not promoted, the champion publishes.
      A tie (the interval contains 0), a win, or a clear loss within the tolerance promotes the new model.
    - No champion: promoted (having not lost to popularity).

    A non-finite new figure (an unmeasured model) counts as a loss to popularity; a champion without figures counts
    as none. Outcomes are "beats", "loses" or "tie", never "beats" on equal figures.
    """
    has_champion = vs_champion is not None  # too few users: a champion keeps serving, figures or not
    if vs_champion is not None and not math.isfinite(vs_champion.other):
        vs_champion = None
    champ_outcome = "no champion" if vs_champion is None else vs_champion.outcome
    measured = f" on {users} holdout users" if users is not None else ""
    figures = (
        f"NDCG@10 new {_fmt(vs_popularity.new)}, champion {_fmt(vs_champion.other if vs_champion else None)}, "
        f"popularity {_fmt(vs_popularity.other)}{measured}"
    )
    if users is not None and vs_popularity.users:
        figures += f"; new - popularity {vs_popularity.describe()}"
        if vs_champion is not None:
            figures += f", new - champion {vs_champion.describe()}"
        figures += f" ({CONFIDENCE:.0%} paired bootstrap)"

    def decision(promote: bool, publish: str, reason: str, pop: str, champ: str) -> GateDecision:
        return GateDecision(promote, publish, reason, pop, champ, users, vs_popularity, vs_champion)

    if users is not None and users < min_users:
        too_few = f"too few holdout users to decide ({users} < {min_users})"
        if has_champion:
            return decision(False, "champion", f"{too_few}; champion kept and published ({figures})", too_few, too_few)
        return decision(
            True,
            "new",
            f"{too_few}; no champion yet: new model published and promoted as the first champion, "
            f"not validated ({figures})",
            too_few,
            "no champion",
        )
    has_champion = vs_champion is not None
    pop = vs_popularity.outcome if math.isfinite(vs_popularity.diff) else "loses"
    if pop == "loses":
        if has_champion:
            return decision(
                False,
                "champion",
                f"new model loses to popularity; champion kept and published ({figures})",
                pop,
                champ_outcome,
            )
        return decision(
            True,
            "new",
            f"new model loses to popularity but there is no champion: promoted as the first champion ({figures})",
            pop,
            champ_outcome,
        )
    verb = {"beats": "beats", "tie": "ties with"}[pop]
    if not has_champion:
        return decision(
            True, "new", f"no champion yet; new model {verb} popularity and is promoted ({figures})", pop, champ_outcome
        )
    margin = tolerance * vs_champion.other
    if vs_champion.outcome == "loses" and vs_champion.diff < -margin:
        return decision(
            False,
            "champion",
            f"new model worse than the champion by more than {tolerance:.1%}; champion published ({figures})",
            pop,
            champ_outcome,
        )
    against = {
        "beats": "beats the champion",
        "tie": "ties with the champion",
        "loses": f"is within {tolerance:.1%} of the champion",
    }[vs_champion.outcome]
    return decision(True, "new", f"new model {against} and {verb} popularity; promoted ({figures})", pop, champ_outcome)


def gate(new_ndcg: float, champion_ndcg: float | None, popularity_ndcg: float, tolerance: float) -> GateDecision:
    """:func:`decide` on mean NDCG@10 figures alone, for callers without per-user figures: no interval is known, so
    any difference counts (equal figures are a tie), and no minimum number of users applies. The nightly uses
    :func:`gate_paired`."""
    vs_champion = None
    if champion_ndcg is not None and math.isfinite(champion_ndcg):
        vs_champion = _point(new_ndcg, champion_ndcg)
    return decide(_point(new_ndcg, popularity_ndcg), vs_champion, tolerance)


def _fmt(value: float | None) -> str:
    if value is None:
        return "none"
    return f"{value:.4f}" if math.isfinite(value) else "unmeasured"


def metric_tags(metrics: Mapping[str, object]) -> dict[str, str]:
    """Numeric metrics as version tags, under their own names (``holdout_ndcg_at_10``)."""
    return {k: str(float(v)) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def log_model(
    client: MlflowClient, name: str, run_id: str, metrics: Mapping[str, object], model: Mapping[str, Any]
) -> str:
    """Log a pyfunc as a Logged Model of ``run_id`` and register it under ``name``; returns the new version.

    ``model``: the keyword arguments of :func:`mlflow.pyfunc.log_model` that define the model (``python_model``,
    ``artifacts``, ``pip_requirements``, ...; see :func:`nightrec.tasks.pyfunc_model.pyfunc_spec`). The Logged Model
    is created first with the run as its source, so the run (never the thread's "active run": Prefect tasks run in
    worker threads) owns it; ``metrics`` go on the model and on the version as tags."""
    import mlflow.pyfunc

    _ensure_registered_model(client, name)
    model_id = _new_logged_model(client, run_id, metrics)
    with _process_uris(client):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, model_id=model_id, registered_model_name=name, tags=metric_tags(metrics), **model
        )
    return str(info.registered_model_version)


def register_model(client: MlflowClient, name: str, model_dir: Path, run_id: str, metrics: dict) -> str:
    """Log a ready folder ``model_dir`` (any files) as a Logged Model of ``run_id`` and register it as a new version;
    returns the version. The nightly logs a pyfunc with :func:`log_model`; this is for folders already written."""
    from mlflow.entities import LoggedModelStatus

    _ensure_registered_model(client, name)
    model_id = _new_logged_model(client, run_id, metrics)
    client.log_model_artifacts(model_id, str(model_dir))
    client.finalize_logged_model(model_id, LoggedModelStatus.READY)
    with _process_uris(client):
        version = client.create_model_version(
            name, f"models:/{model_id}", run_id=run_id, tags=metric_tags(metrics), model_id=model_id
        )
    return str(version.version)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="nightrec meta-learned recommender (served vectors source)")


def _new_logged_model(client: MlflowClient, run_id: str, metrics: Mapping[str, object]) -> str:
    """A Logged Model with ``run_id`` as its source, listed among the run's outputs, its metrics linked to it."""
    from mlflow.entities import LoggedModelOutput, Metric

    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name=MODEL_ARTIFACT, source_run_id=run_id)
    client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    now = int(time.time() * 1000)
    values = [
        Metric(k, float(v), now, 0, model_id=logged.model_id, run_id=run_id)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ]
    if values:
        client.log_batch(run_id, metrics=values)
    return logged.model_id


@contextlib.contextmanager
def _process_uris(client: MlflowClient) -> Iterator[None]:
    """MLflow's log_model and registration of ``models:/`` sources read the process-wide tracking and registry URIs,
    not the client's: point them at the client's store for the call, then put them back."""
    import mlflow

    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    mlflow.set_registry_uri(client._registry_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


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
    ndcg = next((version.tags[key] for key in CHAMPION_METRIC_TAGS if key in version.tags), None)
    value = float(ndcg) if ndcg is not None else None
    return ChampionInfo(
        str(version.version), path, version.run_id, value if value is None or math.isfinite(value) else None
    )


def _local_copy(client: MlflowClient, version, dst: Path | None) -> Path:
    source = version.source
    if source.startswith("models:/m-"):  # a Logged Model: its files are under its artifact location
        source = client.get_logged_model(source.removeprefix("models:/").split("/")[0]).artifact_location
    if source.startswith("file://"):
        from urllib.parse import unquote, urlparse

        local = Path(unquote(urlparse(source).path))
        if local.is_dir():
            return local  # local artifact store: no copy needed
    import mlflow.artifacts

    if dst is not None:
        dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst) if dst else None))
