"""Published recommendation lists: atomic publish of a date's partition and the ``LATEST`` pointer, and readers.

Layout (DESIGN.md): ``lake/recommendations/date=D/part-0.parquet`` + ``_manifest.json`` (file, rows, bytes, sha256,
users, run_date) and ``lake/recommendations/LATEST`` ({"date", "mlflow_run_id", "model_version"}).

Crash safety, in order: the partition is written into a hidden staging folder beside its final place and fsynced,
then swapped in with one rename (an exchange where the kernel has ``renameat2``), then ``LATEST`` is replaced by an
fsynced temporary file and a rename. A crash before the swap leaves only a staging folder (removed by the next
publish of that date); a crash between the swap and the pointer leaves ``LATEST`` on the previous date, whose
partition is untouched. Readers check the file against its manifest (rows, size and sha256) before using a row.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nightrec.storage import atomic, locking
from nightrec.storage.failpoints import failpoint
from nightrec.storage.lake import MANIFEST_FILE, PART_FILE, CorruptPartitionError, Lake, file_manifest, verify_parquet
from nightrec.storage.schemas import RECOMMENDATIONS

ROW_GROUP_ROWS = 256_000  # row groups of this size let a single-user read skip most of a large file


class NothingPublishedError(FileNotFoundError):
    """No ``LATEST`` pointer (or no partition for the requested date) yet."""


def publish(
    lake: Lake,
    day: dt.date,
    batches: Iterable[pa.RecordBatch],
    pointer: dict,
    *,
    move_latest_back: bool = False,
    check: Callable[[Path], None] | None = None,
) -> dict:
    """Write ``batches`` as the date's partition and point ``LATEST`` at it. Returns rows, users, bytes, sha256.

    ``check`` is called with the written (not yet published) file; if it raises, nothing is published and the date's
    previous partition and ``LATEST`` stay as they were. ``LATEST`` is not moved to a date older than the one it names
    (a backfill of past dates must not hide tonight's lists) unless ``move_latest_back``. Memory stays bounded by one
    batch: rows are streamed to the file.
    """
    target = lake.recommendations_partition(day)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(target.parent)
    with _locked_staging_dir(target.parent, target.name) as staging:
        rows, users, manifest = _write_partition(staging, target, day, batches, pointer, check)
    failpoint("publish:before-latest")
    with locking.pointer_lock(lake):  # compare and replace as one step: two dates publishing at once
        for leftover in lake.latest_pointer.parent.glob(f".{lake.latest_pointer.name}.*.tmp"):
            leftover.unlink(missing_ok=True)  # a killed pointer write; only a pointer-lock holder writes these
        current = lake.read_latest_pointer()
        moved = current is None or move_latest_back or dt.date.fromisoformat(current["date"]) <= day
        if moved:
            atomic.write_json_atomic(lake.latest_pointer, {**pointer, "date": day.isoformat()})
    return {"rows": rows, "users": users, "bytes": manifest["bytes"], "sha256": manifest["sha256"], "latest": moved}


def _write_partition(
    staging: Path,
    target: Path,
    day: dt.date,
    batches: Iterable[pa.RecordBatch],
    pointer: dict,
    check: Callable[[Path], None] | None,
) -> tuple[int, int, dict]:
    """Write, fsync and check the partition in ``staging``, then swap it in for ``target``: rows, users, manifest."""
    try:
        rows, users = _write_batches(staging / PART_FILE, batches)
        # The pointer's provenance (MLflow run, model version) goes into the manifest too, so a partition says
        # which run wrote it even after LATEST has moved on.
        provenance = {key: value for key, value in pointer.items() if key != "date"}
        manifest = {**provenance, **file_manifest(staging / PART_FILE), "users": users, "run_date": day.isoformat()}
        atomic.write_json_atomic(staging / MANIFEST_FILE, manifest)
        atomic.fsync_dir(staging)
        if check is not None:
            check(staging / PART_FILE)
        failpoint("publish:before-swap")
        atomic.replace_dir(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already on success
    return rows, users, manifest


@contextlib.contextmanager
def _locked_staging_dir(parent: Path, name: str) -> Iterator[Path]:
    """A staging folder this process holds an ``flock`` on while it writes, so that a publisher of any date can tell
    a dead writer's folder (lock free: the kernel drops it with the process) from a live one's. It is locked under a
    name no cleaner looks at, then renamed (the lock goes with the folder)."""
    token = uuid.uuid4().hex
    creating = parent / f".creating-{name}-{token}"
    creating.mkdir()
    fd = locking.try_lock_directory(creating)  # a new folder of our own: nobody else holds it
    try:
        staging = parent / f".staging-{name}-{token}"
        os.rename(creating, staging)
        yield staging
    finally:
        os.close(fd)
        if creating.exists():
            creating.rmdir()


def _remove_dead_staging(parent: Path) -> None:
    """Remove every date's staging folder whose writer has died (a killed publication, even of a date never run
    again); a live writer's folder is locked and left alone."""
    for child in parent.glob(".staging-date=*"):
        fd = locking.try_lock_directory(child)
        if fd is None:
            continue  # another date is publishing right now (or another publisher removed it)
        try:
            shutil.rmtree(child, ignore_errors=True)
        finally:
            os.close(fd)


def _write_batches(path: Path, batches: Iterable[pa.RecordBatch]) -> tuple[int, int]:
    rows = users = 0
    with pq.ParquetWriter(path, RECOMMENDATIONS, compression="zstd") as writer:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            table = pa.Table.from_batches([batch]).select(RECOMMENDATIONS.names).cast(RECOMMENDATIONS)
            writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
            failpoint("publish:mid-write")  # rows on disk, footer not yet: a torn file if the process dies here
            rows += table.num_rows
            users += int(pc.sum(pc.equal(table["rank"], 1)).as_py() or 0)  # one rank-1 row per user list
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())
    return rows, users


def partition_file(lake: Lake, day: dt.date) -> Path:
    return lake.recommendations_partition(day) / PART_FILE


def verify_partition(lake: Lake, day: dt.date, deep: bool = True) -> Path:
    """The partition's file after checking it against its manifest (rows, size, and sha256 with ``deep``)."""
    path = partition_file(lake, day)
    if not path.parent.exists():
        raise NothingPublishedError(f"no recommendations published for {day} ({path.parent})")
    if not (path.parent / MANIFEST_FILE).exists():
        raise CorruptPartitionError(f"{path}: manifest {MANIFEST_FILE} is missing")
    verify_parquet(path, deep=deep)
    return path


def _latest_date(lake: Lake) -> tuple[dict, dt.date]:
    pointer = lake.read_latest_pointer()
    if pointer is None:
        raise NothingPublishedError(f"nothing published yet ({lake.latest_pointer} is missing)")
    return pointer, dt.date.fromisoformat(pointer["date"])


def _read(path: Path, filters=None) -> pa.Table:
    try:
        return pq.read_table(path, schema=RECOMMENDATIONS, filters=filters)
    except Exception as exc:  # bytes that pass the manifest check can still fail to decode
        raise CorruptPartitionError(f"{path}: unreadable: {str(exc).strip().splitlines()[0]}") from exc


def read_latest(lake: Lake) -> tuple[dict, pa.Table]:
    """The ``LATEST`` pointer and the whole verified table it names."""
    pointer, day = _latest_date(lake)
    return pointer, _read(verify_partition(lake, day))


def read_latest_head(lake: Lake, users: int) -> tuple[dict, pa.Table]:
    """The ``LATEST`` pointer and the whole lists of its first ``users`` users, read batch by batch: memory stays
    bounded by a batch or two, however many users the night published (a user's rows are written together)."""
    pointer, day = _latest_date(lake)
    batches: list[pa.RecordBatch] = []
    for batch in pq.ParquetFile(verify_partition(lake, day)).iter_batches(batch_size=8192):
        batches.append(batch)
        if len(pc.unique(pa.Table.from_batches(batches)["user_id"])) > users:
            break  # the next user has started: the first ``users`` lists are complete
    table = pa.Table.from_batches(batches, schema=RECOMMENDATIONS) if batches else RECOMMENDATIONS.empty_table()
    first = pc.unique(table["user_id"])[:users]
    return pointer, table.filter(pc.is_in(table["user_id"], value_set=first))


def read_user_range(path: Path, lo: str | None, hi: str | None) -> pa.Table:
    """The rows of ``path`` for users ``lo <= user_id < hi`` (None = open end). Lists are written in user order, so
    row-group statistics skip the rest of the file: memory holds the range, not the night."""
    bounds = [("user_id", ">=", lo)] if lo is not None else []
    bounds += [("user_id", "<", hi)] if hi is not None else []
    return _read(path, filters=bounds or None)


def read_day(lake: Lake, day: dt.date) -> pa.Table:
    return _read(verify_partition(lake, day))


def read_user_list(lake: Lake, user_id: str, day: dt.date | None = None) -> pl.DataFrame:
    """One user's list (rank order) from ``day`` or the latest publication; empty frame for an unknown user."""
    if day is None:
        _, day = _latest_date(lake)
    path = verify_partition(lake, day)
    table = _read(path, filters=[("user_id", "=", user_id)])
    return pl.from_arrow(table).sort("rank")
