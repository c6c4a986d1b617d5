"""MLflow runs organised for the UI: one parent run per night, one child run per stage. Explicit run ids everywhere,
because Prefect runs tasks in worker threads and MLflow's fluent "active run" is per thread."""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"


def client_for(tracking_uri: str) -> MlflowClient:
    # MLflow's SQLite store prints alembic migration logs on first use; keep runs quiet.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def experiment_id(client: MlflowClient, name: str, artifact_root: str) -> str:
    """The experiment's id, created with its artifact location under our home on first use."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    Path(artifact_root).mkdir(parents=True, exist_ok=True) if "://" not in artifact_root else None
    location = artifact_root if "://" in artifact_root else Path(artifact_root).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


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


def log_dataset(
    client: MlflowClient, run_id: str, name: str, digest: str, source: str, profile: Mapping[str, object], context: str
) -> None:
    """Record a dataset input (shown in the run's "Datasets used" panel): digest, source, row counts, date range."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(
        name=name,
        digest=digest[:36],
        source_type="local" if "://" not in source else source.split("://", 1)[0],
        source=json.dumps({"uri": source}),
        profile=json.dumps(dict(profile), default=str),
    )
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])


DESCRIPTION_TAG = "mlflow.note.content"  # what the MLflow UI shows as the run's description


def set_description(client: MlflowClient, run_id: str, text: str) -> None:
    client.set_tag(run_id, DESCRIPTION_TAG, text[:5000])
