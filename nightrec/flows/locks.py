"""One nightly run per date at a time: an OS file lock that dies with its process (no stale locks after a crash).
And one start of the temporary Prefect server per home at a time."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class RunInProgressError(RuntimeError):
    """Another process is running the nightly for the same date."""


@contextlib.contextmanager
def date_lock(home: Path, day: dt.date) -> Iterator[Path]:
    """Hold ``HOME/locks/nightly-DATE.lock`` for the duration; refuse at once if another process holds it."""
    path = Path(home) / "locks" / f"nightly-{day.isoformat()}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunInProgressError(
                f"another nightly run for {day} is in progress (pid {holder}); refusing to run it twice at once"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield path
    finally:
        handle.close()  # closing releases the lock


@contextlib.contextmanager
def home_lock(home: Path, name: str) -> Iterator[None]:
    """Hold ``HOME/locks/NAME.lock`` exclusively, waiting for another holder."""
    path = Path(home) / "locks" / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def start_temporary_prefect_server(home: Path) -> str | None:
    """Start this process's temporary Prefect server now, one process of the home at a time; its API URL, or None
    when a server is configured (PREFECT_API_URL).

    The temporary server creates and migrates the SQLite database under PREFECT_HOME when it starts. Two processes
    starting theirs at once on a fresh home ran the same migrations together (``duplicate column name``) and both
    failed. Prefect keeps one temporary server per process, so the flow run later uses the one started here."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    with home_lock(home, "prefect-server"):  # the next process finds the database created and migrated
        server.start()
    return server.api_url


def open_tracking(home: Path, tracking_uri: str, experiment: str, artifact_root: str) -> tuple:
    """(MLflow client, the experiment's id). The first use of a fresh home creates and migrates its SQLite database
    and creates the experiment: one process of the home at a time (two at once failed on the migrations, or on the
    experiment's unique name)."""
    from nightrec.storage import tracking

    with home_lock(home, "mlflow-store"):
        client = tracking.client_for(tracking_uri)
        return client, tracking.experiment_id(client, experiment, artifact_root)
