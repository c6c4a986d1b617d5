"""Which failures a stage retries: the transient ones only (a source file landing late, a locked SQLite database, a
server briefly unreachable). A deterministic error (no catalogue in the lake, a bad setting, wrong lists) fails
the same way on every try, so it fails the night at once with one traceback."""

from __future__ import annotations

import sqlite3


class SourceNotYetThereError(FileNotFoundError):
    """A configured source file is missing: it may still be landing (the upstream export runs late)."""


TRANSIENT = (SourceNotYetThereError, ConnectionError, TimeoutError, BlockingIOError, InterruptedError)
TRANSIENT_MESSAGES = ("database is locked", "database table is locked", "temporarily unavailable", "timed out")


def is_transient(exc: BaseException | None) -> bool:
    """True for an error worth trying again, looking through the chain of causes (MLflow wraps SQLAlchemy's)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TRANSIENT):
            return True
        if _is_database_error(exc) and any(m in str(exc).lower() for m in TRANSIENT_MESSAGES):
            return True
        if type(exc).__name__ == "MlflowException" and any(m in str(exc).lower() for m in TRANSIENT_MESSAGES):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _is_database_error(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.OperationalError):
        return True
    try:
        from sqlalchemy.exc import OperationalError
    except ImportError:  # pragma: no cover - SQLAlchemy comes with MLflow and Prefect
        return False
    return isinstance(exc, OperationalError)


def retry_transient(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: retry the failed try only if its exception is transient."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - the state's own exception, classified here
        return is_transient(exc)
    return False
