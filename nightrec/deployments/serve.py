"""`nightrec serve`: a local Prefect server on 127.0.0.1 plus the nightly and backfill deployments, in the foreground.

Schedules need a real server (a temporary one refuses to schedule), so unless NIGHTREC_PREFECT_API_URL points at one,
we start Prefect's server app as a child process (:mod:`nightrec.deployments.server`, which refuses foreign Host and
Origin headers) and stop it on exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

from nightrec.deployments.server import AUTH_SETTING, server_environment
from nightrec.redaction import redact
from nightrec.settings import Settings

DEFAULT_PORT = 4200


def deployments(settings: Settings) -> list:
    """The nightly deployment (cron in the configured zone, one run at a time) and the parameterised backfill."""
    from prefect.schedules import Cron

    from nightrec.flows.nightly import backfill, nightly

    return [
        nightly.to_deployment(
            name="nightly",
            schedule=Cron(settings.nightly_cron, timezone=settings.timezone),
            concurrency_limit=1,
            description="Every stage for the scheduled date (taken from the run's scheduled start time).",
            tags=["nightrec"],
        ),
        backfill.to_deployment(
            name="backfill",
            concurrency_limit=1,
            description="Nightly for each date from start to end, oldest first; published dates skipped unless force.",
            tags=["nightrec"],
        ),
    ]


def wait_healthy(api_url: str, timeout: float = 120.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"Prefect server exited with code {process.returncode} before becoming healthy")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"Prefect server at {api_url} not healthy after {timeout:.0f} s")


def stop_process_group(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM to the process's whole group (a server and any worker it forked), SIGKILL after ``timeout``."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # what is left of the group (a worker that ignored SIGTERM)
    process.wait()


@contextlib.contextmanager
def terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM handled like Ctrl-C (KeyboardInterrupt) while inside, so both stop the same way.

    SIGINT gets Python's own handler back even when it was inherited as ignored: a shell without job control starts
    its background jobs (`nightrec ui &` in a script, CI, cron) with SIGINT ignored, and `kill -INT` then did
    nothing. asyncio.run recognises the default handler and still cancels its main task on Ctrl-C."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous_term = signal.signal(signal.SIGTERM, interrupt)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


@contextlib.contextmanager
def local_server(settings: Settings, port: int = DEFAULT_PORT, host: str | None = None) -> Iterator[str]:
    """Start a Prefect server (:mod:`nightrec.deployments.server`: its own origin only, CSRF on) on ``host``
    (default ``settings.serve_host``, 127.0.0.1) under this home's PREFECT_HOME, in its own process group; yield its
    API URL; stop the whole group on exit."""
    host = host or settings.serve_host
    api_url = f"http://{host}:{port}/api"
    env = {**os.environ, **server_environment(host, port, dict(os.environ))}
    env["PREFECT_HOME"] = str(settings.prefect_home_dir)
    env.pop("PREFECT_API_URL", None)
    log = open(settings.prefect_home_dir / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
    command = [sys.executable, "-m", "nightrec.deployments.server", "--host", host, "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(api_url, process=process)
        yield api_url
    finally:
        stop_process_group(process)
        log.close()


def serve_forever(settings: Settings, port: int = DEFAULT_PORT, host: str | None = None) -> None:
    """Serve the deployments until SIGINT or SIGTERM, then stop the runner, its flow runs and the server."""
    from contextlib import nullcontext

    settings.prefect_home_dir.mkdir(parents=True, exist_ok=True)
    with terminated_as_interrupt():
        try:
            server = nullcontext(settings.prefect_api_url) if settings.prefect_api_url else None
            with server or local_server(settings, port, host) as api_url:
                _run_deployments(settings, api_url)
        except KeyboardInterrupt:
            pass
    print("stopped")


def _run_deployments(settings: Settings, api_url: str) -> None:
    import asyncio

    os.environ["PREFECT_API_URL"] = api_url
    if os.environ.get(AUTH_SETTING):  # our own runner must authenticate like any client
        os.environ.setdefault("PREFECT_API_AUTH_STRING", os.environ[AUTH_SETTING])
    from prefect.runner import Runner

    class InterruptibleRunner(Runner):
        def handle_sigterm(self, *args, **kwargs) -> None:
            # Prefect's own handler calls the async stop() from a signal handler without awaiting it ("coroutine
            # 'Runner.astop' was never awaited") and the process went on for 30 s; stop the way Ctrl-C does.
            raise KeyboardInterrupt

    runner = InterruptibleRunner(pause_on_shutdown=True)
    for deployment in deployments(settings):
        runner.add_deployment(deployment)
    ui = redact(api_url.removesuffix("/api"))
    print(
        f"Prefect UI: {ui}  (nightly cron '{settings.nightly_cron}' {settings.timezone}; Ctrl-C or SIGTERM stops)",
        flush=True,
    )
    asyncio.run(runner.start())
