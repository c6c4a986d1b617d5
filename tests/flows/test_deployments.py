"""`nightrec serve` against a real local Prefect server: deployments exist, the schedule is set, an API-triggered run
of the nightly deployment with a date parameter completes and publishes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from nightrec.settings import Settings
from nightrec.storage.lake import Lake
from tests.flows.conftest import FIRST_NIGHT, demo_home
from tests.flows.processes import EPOCHS, SPEC

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_schedules_nightly_and_runs_it_through_the_api(tmp_path, monkeypatch):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from nightrec.deployments.serve import local_server

    demo_home(tmp_path, monkeypatch, SPEC)  # one night through the API: the schedule's mechanics, not the model
    monkeypatch.setenv("NIGHTREC_TRAIN_EPOCHS", EPOCHS)
    monkeypatch.setenv("NIGHTREC_NIGHTLY_CRON", "30 3 * * *")
    monkeypatch.setenv("NIGHTREC_TIMEZONE", "Europe/Paris")
    settings = Settings()
    settings.prefect_home_dir.mkdir(parents=True, exist_ok=True)
    with local_server(settings, free_port()) as api_url:
        env = {**os.environ, "NIGHTREC_PREFECT_API_URL": api_url, "PREFECT_HOME": str(settings.prefect_home_dir)}
        log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
        serve = subprocess.Popen(
            [sys.executable, "-m", "nightrec.flows.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            with temporary_settings({PREFECT_API_URL: api_url}):
                deployment = wait_for_deployment("nightly/nightly", serve)
                # Prefect 3.x keeps a deployment's limit as a global concurrency limit (the old field reads None).
                limit = deployment.global_concurrency_limit
                assert limit is not None and limit.limit == 1, deployment
                cron = deployment.schedules[0].schedule
                assert (cron.cron, cron.timezone) == ("30 3 * * *", "Europe/Paris")
                run = run_deployment("nightly/nightly", parameters={"run_date": FIRST_NIGHT.isoformat()}, timeout=600)
                assert run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text()[-3000:])
                upcoming = wait_for_scheduled_runs(deployment.id)
                assert upcoming, "the scheduler created no upcoming runs"
                for flow_run in upcoming:
                    local = flow_run.expected_start_time.astimezone(__import__("zoneinfo").ZoneInfo("Europe/Paris"))
                    assert (local.hour, local.minute) == (3, 30)
        finally:
            serve.send_signal(signal.SIGINT)
            try:
                serve.wait(timeout=30)
            except subprocess.TimeoutExpired:
                serve.kill()
            log.close()
    lake = Lake(settings.lake_root)
    assert lake.published_dates() == [FIRST_NIGHT]
    assert lake.read_latest_pointer()["date"] == FIRST_NIGHT.isoformat()


def wait_for_deployment(name: str, serve: subprocess.Popen, timeout: float = 120.0):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert serve.poll() is None, "nightrec serve exited early"
            try:
                return client.read_deployment_by_name(name)
            except Exception:
                time.sleep(1)
    raise TimeoutError(f"deployment {name} not registered after {timeout} s")


def wait_for_scheduled_runs(deployment_id, timeout: float = 90.0) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
                ),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,  # the sync client sends None otherwise, which the API refuses
                limit=20,
            )
            if runs:
                return runs
            time.sleep(2)
    return []
