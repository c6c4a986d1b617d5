"""Lake-wide writer locks: OS ``flock`` on a lake directory, released by the kernel when the holder dies.

Two writers of the same read-modify-write (an events day merged with new rows, the catalogue merged with a new file,
the ``LATEST`` pointer compared and replaced) would each read the old bytes and the second rename would drop the
first one's rows. These locks serialise them. They lock the directory itself (no lock file), so a lake's bytes are
the same with or without a lock having been taken, and a SIGKILLed holder leaves nothing stale behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from nightrec.storage import atomic
from nightrec.storage.lake import Lake

log = logging.getLogger("nightrec.locks")


def try_lock_directory(folder: Path) -> int | None:
    """A descriptor holding an exclusive lock on ``folder`` (close it to release), or None when another process holds
    the lock or the folder is gone. Never waits."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@contextlib.contextmanager
def directory_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if missing); wait, with one message, while another holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = try_lock_directory(folder)
    if fd is None:
        log.warning("waiting for another %s in %s to finish (pid %s)", what, folder, os.getpid())
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        log.warning("the other %s in %s finished; going on (pid %s)", what, folder, os.getpid())
    try:
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


@contextlib.contextmanager
def ingest_lock(lake: Lake) -> Iterator[None]:
    """One ingest at a time per lake. The holder first removes what a killed ingest left (staging folders,
    ``.tmp`` files): with the lock held, no live writer can own them."""
    with directory_lock(lake.root, "ingest"):
        for folder in (lake.root, lake.events_dir, lake.items_file.parent, lake.users_file.parent):
            atomic.remove_stale_staging(folder)
        yield


@contextlib.contextmanager
def pointer_lock(lake: Lake) -> Iterator[None]:
    """One ``LATEST`` compare-and-replace at a time (two dates publishing at once must not move it back)."""
    with directory_lock(lake.recommendations_dir, "publication of LATEST"):
        yield
