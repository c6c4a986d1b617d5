"""Lake-wide writer locks: OS ``flock`` on a lake directory, released by the kernel when the holder dies.

Two writers of the same read-modify-write (an events day merged with new rows, the catalogue merged with a new file)
would each read the old rows and the second commit would drop the first one's rows: Delta's optimistic commits keep
the table consistent but cannot know the rows were derived from a stale read. These locks serialise them on one
machine; they live in the lake's local folder (``Lake.local_dir``: the lake itself, or its local state folder for an
object-store lake). They lock the directory itself (no lock file), so a lake's bytes are
the same with or without a lock having been taken, and a SIGKILLed holder leaves nothing stale behind.
"""

from __future__ import annotations

import contextlib
import datetime as dt
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
    """One ingest at a time per lake. The holder first removes what a killed ingest left (its local staging
    folders, ``.tmp`` files): with the lock held, no live writer can own them. Uncommitted Parquet parts a killed
    ingest left in a table are invisible and go with VACUUM."""
    with directory_lock(lake.root, "ingest"):
        atomic.remove_stale_staging(lake.root)
        yield


# --- what a running night reads, and the ingests that would change it -----------------------------------------------
# One lock file per home, with POSIX byte-range locks (fcntl.lockf) on it: byte 0 is the catalogue (items and users),
# byte ``day.toordinal()`` is that day's events partition. A night of date D holds a shared lock on [0, D) from the
# end of its own ingest until it finishes; an ingest takes an exclusive lock on each thing it is about to change.
# So an ingest that would change what a running night reads waits for that night, and a night never sees half an
# ingest: every stage of one night reads the same lake. An ingest that changes nothing takes no lock.
# POSIX locks belong to the process and die with it (no stale lock after a kill); closing any descriptor of the
# file drops the process's locks on it, so each holder opens it once and closes it once.
CATALOGUE_BYTE = 0  # date.toordinal() starts at 1
READS_LOCK_FILE = ".reads.lock"  # hidden, like staging folders: no reader lists it


def reads_lock_file(lake: Lake) -> Path:
    """The lake's night-reads lock file (empty; only its byte-range locks matter)."""
    return lake.root / READS_LOCK_FILE


def _open_lock_file(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _range_lock(fd: int, kind: int, start: int, length: int, waiting: str) -> None:
    try:
        fcntl.lockf(fd, kind | fcntl.LOCK_NB, length, start)
    except OSError:  # EAGAIN or EACCES: another process holds a conflicting lock
        log.warning("waiting for %s (pid %s)", waiting, os.getpid())
        fcntl.lockf(fd, kind, length, start)
        log.warning("done waiting for %s; going on (pid %s)", waiting, os.getpid())


@contextlib.contextmanager
def night_reads(lock_file: Path, run_date: dt.date) -> Iterator[None]:
    """Hold, for a night of ``run_date``, the catalogue and every events day before it against change."""
    fd = _open_lock_file(lock_file)
    try:
        _range_lock(fd, fcntl.LOCK_SH, CATALOGUE_BYTE, run_date.toordinal(), f"an ingest to finish before {run_date}")
        yield
    finally:
        os.close(fd)


class IngestChanges:
    """The exclusive locks of one ingest on what it changes, taken as it goes and held until :meth:`close`."""

    def __init__(self, lock_file: Path) -> None:
        self.lock_file, self.fd = lock_file, None

    def _lock(self, start: int, what: str) -> None:
        if self.fd is None:
            self.fd = _open_lock_file(self.lock_file)
        _range_lock(self.fd, fcntl.LOCK_EX, start, 1, f"the running nightly that reads {what}")

    def day(self, day: dt.date) -> None:
        self._lock(day.toordinal(), f"events of {day}")

    def catalogue(self) -> None:
        self._lock(CATALOGUE_BYTE, "the catalogue")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
