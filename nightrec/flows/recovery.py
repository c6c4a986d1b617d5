"""What a killed nightly left behind, tidied by the next run of the same date before it starts.

It runs while holding the date lock (``locks.date_lock``), which a live process of that date would hold: so a run of
this date still marked RUNNING in MLflow or Prefect is a dead one (SIGKILL, OOM kill, power loss). The next run

* marks its MLflow parent run and any child stage run still RUNNING as ``KILLED`` (tag ``nightrec.error`` says why),
* moves its Prefect flow run, and its task runs still running, to ``Crashed`` (the UI otherwise shows them
  running for ever: a local flow run has no heartbeat for the server to miss),
* takes back a promotion made by any unfinished run of this date (killed or failed): the night's training warm
  starts from the champion, so a re-run must start from the champion the night began with to produce the lists
  an uninterrupted night produces.

The publication leaves nothing to tidy but uncommitted parts in the lists' Delta table, invisible to readers and
deleted by ``VACUUM`` once older than the retention (docs/contract.md); a killed ingest's local staging folder is
removed by the ingest lock; the killed run's work folder stays for inspection
until pruned.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid

from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from nightrec.storage import registry

KILLED_MESSAGE = "process died while running (found RUNNING by the next nightly of this date, which holds the lock)"


def unfinished_runs(client: MlflowClient, exp: str, day: dt.date) -> list:
    """Nightly parent runs of ``day`` that did not finish (RUNNING, FAILED or KILLED)."""
    runs = client.search_runs(
        [exp],
        filter_string=f"tags.`nightrec.kind` = 'nightly' and tags.`nightrec.run_date` = '{day.isoformat()}'",
        max_results=1000,
    )
    return [r for r in runs if r.info.status != "FINISHED"]


def recover_unfinished_nights(client: MlflowClient, exp: str, registered_model: str, day: dt.date) -> dict:
    """Close the dead runs of ``day`` and undo their promotions; returns what was done (empty lists: nothing)."""
    runs = unfinished_runs(client, exp, day)
    killed, crashed = [], []
    for run in runs:
        if run.info.status != "RUNNING":
            continue
        _kill(client, run.info.run_id)
        for child in client.search_runs(
            [exp], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and attributes.status = 'RUNNING'"
        ):
            _kill(client, child.info.run_id)
        killed.append(run.info.run_id)
        flow_run_id = run.data.tags.get("prefect.flow_run_id")
        try:
            if flow_run_id and crash_flow_run(flow_run_id):
                crashed.append(flow_run_id)
        except Exception as exc:  # the Prefect UI's tidiness must not stop tonight's run
            _logger().warning("could not mark Prefect flow run %s as crashed: %s", flow_run_id, exc)
    undone = registry.undo_promotions(client, registered_model, {r.info.run_id for r in runs})
    done = {"killed_mlflow_runs": killed, "crashed_flow_runs": crashed, "undone_promotions": undone}
    if killed or undone:
        _logger().warning("nightly %s: tidied after an earlier run of this date that did not finish: %s", day, done)
    return done


def _logger():
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("nightrec.recovery")


def _kill(client: MlflowClient, run_id: str) -> None:
    client.set_tag(run_id, "nightrec.error", KILLED_MESSAGE)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


def crash_flow_run(flow_run_id: str) -> bool:
    """Set a Prefect flow run (and its unfinished task runs) to Crashed unless it already ended; True if changed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort
    from prefect.states import Crashed

    try:
        run_id = uuid.UUID(flow_run_id)
    except ValueError:
        return False
    with get_client(sync_client=True) as client:
        try:
            flow_run = client.read_flow_run(run_id)
        except Exception:  # deleted, or on another server: nothing to tidy
            return False
        if flow_run.state is None or flow_run.state.is_final():
            return False
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_DESC,
            limit=200,
        )
        for task_run in task_runs:
            if task_run.state is not None and not task_run.state.is_final():
                client.set_task_run_state(task_run.id, Crashed(message=KILLED_MESSAGE), force=True)
        client.set_flow_run_state(run_id, Crashed(message=KILLED_MESSAGE), force=True)
    return True
