"""One nightly run per date at a time: an OS file lock that dies with its process (no stale locks after a crash)."""

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
