"""MLflow runs organised for the UI: one parent run per night, one child run per stage. Explicit run ids everywhere,
because Prefect runs tasks in worker threads and MLflow's fluent "active run" is per thread."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

if TYPE_CHECKING:
    import polars as pl

PARENT_TAG = "mlflow.parentRunId"
# The MLflow UI opens an experiment without this tag under its GenAI view (traces, prompts); ours trains models.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"


def client_for(tracking_uri: str) -> MlflowClient:
    # MLflow's SQLite store prints alembic migration logs on first use; keep runs quiet.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_id(client: MlflowClient, name: str, artifact_root: str) -> str:
    """The experiment's id, created with its artifact location under our home on first use, typed for model
    training (an experiment created before it was typed gets the tag now)."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if EXPERIMENT_KIND_TAG not in existing.tags:
            client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return existing.experiment_id
    Path(artifact_root).mkdir(parents=True, exist_ok=True) if "://" not in artifact_root else None
    location = artifact_root if "://" in artifact_root else Path(artifact_root).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})


def start_run(
    client: MlflowClient, exp_id: str, name: str, tags: Mapping[str, str] | None = None, parent: str | None = None
) -> str:
    tags = dict(tags or {})
    if parent:
        tags[PARENT_TAG] = parent
    return client.create_run(exp_id, run_name=name, tags=tags).info.run_id


def finish_run(client: MlflowClient, run_id: str, failed: bool = False) -> None:
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED))


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log numeric entries only (dicts of stats often carry strings too)."""
    now = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    from mlflow.entities import Metric

    batch = [
        Metric(key, float(value), now, step or 0)
        for key, value in metrics.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    ]
    if batch:
        client.log_batch(run_id, metrics=batch)


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, object]) -> None:
    from mlflow.entities import Param

    batch = [Param(key, str(value)[:6000]) for key, value in params.items()]
    if batch:
        client.log_batch(run_id, params=batch)


def log_dict(client: MlflowClient, run_id: str, payload: object, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(json.dumps(payload, indent=2, default=str))
        client.log_artifact(run_id, str(path), str(Path(artifact_file).parent) if "/" in artifact_file else None)


def log_figure(client: MlflowClient, run_id: str, figure, artifact_file: str) -> None:
    client.log_figure(run_id, figure, artifact_file)


def find_parent_runs(client: MlflowClient, exp_id: str, run_date: dt.date) -> list:
    """Finished nightly parent runs for a date, newest first."""
    return client.search_runs(
        [exp_id],
        filter_string=f"tags.nightrec.run_date = '{run_date.isoformat()}' and tags.nightrec.kind = 'nightly'",
        order_by=["attributes.start_time DESC"],
    )


class _DropMessages(logging.Filter):
    """Drops records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def log_dataset(
    client: MlflowClient,
    run_ids: Sequence[str],
    frame: pl.DataFrame,
    name: str,
    source: str,
    context: str,
    profile: Mapping[str, object] | None = None,
) -> str:
    """Record ``frame`` as a dataset input of each run (the run page's "Datasets used": name, digest, schema,
    profile) through :func:`mlflow.data.from_polars`; its digest comes from the rows, so two different frames (the
    night's training and holdout events) never share one. ``profile`` adds figures to MLflow's row counts.
    Returns the digest."""
    import mlflow.data
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    # MLflow's schema inference logs "Data type of Column 'date' ... mapped to DataType.datetime" on the root logger
    # for every Date column, into the user's terminal: a note about its own schema type, not about the night
    quiet = _DropMessages("Data type of Column")
    logging.getLogger().addFilter(quiet)
    try:
        with warnings.catch_warnings():  # MLflow registers its local source type twice, then warns it is ambiguous
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            described = mlflow.data.from_polars(frame, source=source, name=name).to_dict()
    finally:
        logging.getLogger().removeFilter(quiet)
    merged = {**json.loads(described.get("profile") or "{}"), **dict(profile or {})}
    entity = Dataset(
        name=described["name"],
        digest=described["digest"],
        source_type=described["source_type"],
        source=described["source"],
        schema=described.get("schema"),
        profile=json.dumps(merged, default=str),
    )
    for run_id in run_ids:
        client.log_inputs(run_id, [DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])
    return entity.digest


def log_split(
    client: MlflowClient, run_ids: Sequence[str], train: pl.DataFrame, holdout: pl.DataFrame, source: str
) -> None:
    """The night's training and holdout events as the datasets ``events-training`` and ``events-holdout`` of each run
    (contexts ``training`` and ``holdout``), with users, items and the date range in their profiles."""
    for context, frame in (("training", train), ("holdout", holdout)):
        profile = {
            "users": frame["user_id"].n_unique(),
            "items": frame["item_id"].n_unique(),
            "first_date": frame["date"].min(),
            "last_date": frame["date"].max(),
        }
        log_dataset(client, run_ids, frame, f"events-{context}", source, context, profile)


def log_training_epoch(client: MlflowClient, run_id: str, phase: str, epoch: int, values: Mapping[str, float]) -> None:
    """One epoch of one training phase, logged as it ends (the ``progress`` callback of
    :func:`nightrec.tasks.train.fit_recommender`): ``<phase>/<value>`` at step ``epoch``, e.g. ``meta/loss`` and
    ``meta/validation_ndcg``; the MLflow UI groups each phase's curves under its name."""
    log_metrics(client, run_id, {f"{phase}/{key}": value for key, value in values.items()}, step=epoch)


def log_night_settings(client: MlflowClient, run_id: str, settings) -> None:
    """The night's settings (a :class:`nightrec.settings.Settings`) as the run's params, so two nights can be
    compared by what they were told to do: every set field, the places the unset ones resolve to (``lake_root``,
    ``tracking_uri``, ``artifact_root``), credentials redacted."""
    from nightrec.redaction import redact

    values = {key: v for key, v in settings.model_dump(mode="json").items() if v is not None}
    values.update(
        {
            "lake_root": str(settings.lake_root),
            "tracking_uri": settings.tracking_uri,
            "artifact_root": settings.artifact_root,
        }
    )
    params = {key: redact(json.dumps(v) if isinstance(v, dict | list) else str(v)) for key, v in values.items()}
    log_params(client, run_id, params)


DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as the run's description


def set_description(client: MlflowClient, run_id: str, text: str) -> None:
    client.set_tag(run_id, DESCRIPTION_TAG, text[:5000])
