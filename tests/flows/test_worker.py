"""The work-pool path beside `nightrec serve`: `prefect deploy` from the repository's prefect.yaml, a process worker,
and the flow runs it executes, against a real local Prefect server. Also the `prefect ... ls` commands (HTTP 422 on
FastAPI >= 0.151, which turned JSON nulls into validation errors where Prefect's client sends `limit: null`)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from mlflow.tracking import MlflowClient

from nightrec.settings import Settings, prefect_environment
from tests.flows.conftest import FIRST_NIGHT, demo_home
from tests.flows.processes import EPOCHS, SPEC
from tests.flows.test_deployments import free_port, wait_for_scheduled_runs

pytestmark = [pytest.mark.prefect, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def prefect_cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("prefect")), "--no-prompt", *args]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A local Prefect server (the one `nightrec serve` starts) and the environment of its clients, shared by the
    module: the `ls` commands ask it before anything is deployed, then the deploy test fills it."""
    from nightrec.deployments.serve import local_server

    with pytest.MonkeyPatch.context() as mp:
        demo_home(tmp_path_factory.mktemp("worker"), mp, SPEC)  # two nights of the work pool's mechanics
        mp.setenv("NIGHTREC_TRAIN_EPOCHS", EPOCHS)
        settings = Settings()
        settings.prefect_home_dir.mkdir(parents=True, exist_ok=True)
        with local_server(settings, free_port()) as api_url:
            env = {**os.environ, **prefect_environment(settings), "PREFECT_API_URL": api_url, "PWD": str(REPO)}
            env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
            yield settings, api_url, env


def test_the_ls_commands_answer(server):
    _, _, env = server
    for args in (("deployment", "ls"), ("flow-run", "ls"), ("work-pool", "ls")):
        result = prefect_cli(*args, env=env)
        assert result.returncode == 0 and "422" not in result.stdout + result.stderr, (args, result)


def test_deploy_and_a_process_worker_run_a_manual_and_a_scheduled_night(server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Scheduled

    settings, api_url, env = server
    created = prefect_cli("work-pool", "create", "nightrec", "--type", "process", env=env)
    assert created.returncode == 0, created
    deployed = prefect_cli("deploy", "--all", env=env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", "nightrec"],
        env=env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("nightly/nightly")
            assert deployment.global_concurrency_limit.limit == 1
            assert (deployment.schedules[0].schedule.cron, deployment.schedules[0].schedule.timezone) == (
                "0 2 * * *",
                "UTC",
            )
            run = prefect_cli("deployment", "run", "nightly/nightly", "--param", f"run_date={FIRST_NIGHT}", env=env)
            assert run.returncode == 0, run
            manual = wait_final(client, newest_run(client, deployment.id, auto_scheduled=False), worker, tmp_path)
            assert manual.state.is_completed(), (manual.state, tail(tmp_path))
            assert manual.name == f"nightly-{FIRST_NIGHT}"

            upcoming = wait_for_scheduled_runs(deployment.id)
            assert upcoming and all(r.auto_scheduled for r in upcoming)
            scheduled = upcoming[0]
            client.set_flow_run_state(scheduled.id, Scheduled(scheduled_time=dt.datetime.now(dt.UTC)), force=True)
            scheduled = wait_final(client, scheduled.id, worker, tmp_path)
            assert scheduled.state.is_completed(), (scheduled.state, tail(tmp_path))
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
        log.close()
    day = scheduled.expected_start_time.astimezone(ZoneInfo("UTC")).date()
    assert scheduled.name == f"nightly-{day}"
    tags = {
        r.data.tags["nightrec.run_date"]: r.data.tags["nightrec.trigger"]
        for r in MlflowClient(settings.tracking_uri).search_runs(
            [MlflowClient(settings.tracking_uri).get_experiment_by_name("nightrec").experiment_id],
            "tags.`nightrec.kind` = 'nightly'",
        )
    }
    assert tags == {FIRST_NIGHT.isoformat(): "manual", day.isoformat(): "schedule"}


def newest_run(client, deployment_id, auto_scheduled: bool, timeout: float = 60):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC,
            limit=50,
            offset=0,
        )
        runs = [r for r in runs if r.auto_scheduled == auto_scheduled]
        if runs:
            return runs[-1].id
        time.sleep(1)
    raise AssertionError("no flow run created")


def wait_final(client, flow_run_id, worker, tmp_path, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        assert worker.poll() is None, f"the worker exited: {tail(tmp_path)}"
        time.sleep(2)
    raise AssertionError(f"flow run not finished in {timeout} s: {tail(tmp_path)}")


def tail(tmp_path) -> str:
    return (tmp_path / "worker.log").read_text(errors="replace")[-4000:]
