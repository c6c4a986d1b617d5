"""Published recommendation lists: the ``recommendations`` Delta table, partitioned by ``run_date`` (docs/contract.md).

One night's publish is ONE commit that replaces that run date: its Parquet parts are streamed to the table's folder
(invisible until committed), checked, then committed with a partition overwrite whose commit metadata names the MLflow
run and model version (also columns of every row). The night a consumer reads is the newest ``run_date`` of one table
version (snapshot), so a reader sees the old night or the new one, never a mix, and a backfill of an older date never
hides tonight's lists. No ``LATEST`` file: the table's log is the pointer, with no second write to fail between.

A crash before the commit leaves the table as it was plus orphaned parts, which ``VACUUM`` (:func:`apply_retention`)
deletes once older than the retention.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nightrec.storage import delta
from nightrec.storage.failpoints import failpoint
from nightrec.storage.lake import CorruptPartitionError, Lake, verify_file
from nightrec.storage.schemas import RECOMMENDATIONS, RECOMMENDATIONS_TABLE

SPEC = RECOMMENDATIONS_TABLE


class NothingPublishedError(FileNotFoundError):
    """No run date published yet (or not the requested one)."""


@dataclass
class WrittenParts:
    """A night's parts in the table folder, written but not committed: what a checker reads before publication."""

    uri: str
    day: dt.date
    paths: list[str]
    options: dict = field(default_factory=dict)
    actions: list = field(default_factory=list)

    def describe(self) -> dict:
        """Plain data (for a task result crossing processes): the parts' add actions."""
        fields = ("path", "size", "partition_values", "modification_time", "data_change", "stats")
        return {"actions": [{f: getattr(a, f) for f in fields} for a in self.actions]}

    def read(self, filters=None) -> pa.Table:
        fs = delta.filesystem(self.uri, self.options)
        tables = [pq.read_table(path, filesystem=fs, filters=filters) for path in self.paths]
        table = pa.concat_tables(tables) if tables else SPEC.file_schema.empty_table()
        run_date = pa.array([self.day] * table.num_rows, pa.date32())
        return table.append_column("run_date", run_date).select(SPEC.schema.names).cast(SPEC.schema)


@dataclass
class ShardParts:
    """Parts already written by several writers (Ray shards), with their row and user counts: :func:`publish` checks
    and commits them instead of streaming batches."""

    parts: list[WrittenParts]
    rows: int
    users: int

    @classmethod
    def from_descriptions(cls, lake: Lake, day: dt.date, described: Sequence[dict]) -> ShardParts:
        from deltalake.transaction import AddAction

        parts = []
        for item in described:
            actions = [AddAction(**a) for a in item["actions"]]
            parts.append(
                WrittenParts(lake.recommendations_uri, day, [a.path for a in actions], lake.storage_options, actions)
            )
        return cls(parts, sum(int(d["rows"]) for d in described), sum(int(d["users"]) for d in described))


def _provenance(pointer: dict) -> dict[str, str]:
    return {key: str(value) for key, value in pointer.items() if key != "date" and value is not None}


def write_parts(
    lake: Lake, day: dt.date, batches: Iterable[pa.RecordBatch], pointer: dict, name: str = ""
) -> tuple[WrittenParts, int, int]:
    """Stream ``batches`` (RECOMMENDATIONS rows) into one uncommitted part of ``day``: parts, rows, users.
    Memory stays bounded by one batch. Ray shards call this with their own ``name`` and the flow commits them all."""
    run_id = str(pointer.get("mlflow_run_id") or "")
    writer = delta.PartWriter(lake.recommendations_uri, SPEC, {"run_date": day.isoformat()}, lake.storage_options, name)
    rows = users = 0
    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            table = pa.Table.from_batches([batch]).select(RECOMMENDATIONS.names).cast(RECOMMENDATIONS)
            table = table.append_column("mlflow_run_id", pa.array([run_id] * table.num_rows, pa.string()))
            writer.write(table)
            failpoint("publish:mid-write")  # rows in the store, footer not yet: a torn, uncommitted part
            rows += table.num_rows
            users += int(pc.sum(pc.equal(table["rank"], 1)).as_py() or 0)  # one rank-1 row per user list
        action = writer.close()
    except BaseException:
        writer.abort()
        raise
    parts = WrittenParts(lake.recommendations_uri, day, [action.path], lake.storage_options, [action])
    return parts, rows, users


def publish(
    lake: Lake,
    day: dt.date,
    batches: Iterable[pa.RecordBatch] | ShardParts,
    pointer: dict,
    *,
    check: Callable[[WrittenParts], None] | None = None,
    keep_nights: int | None = None,
) -> dict:
    """Write ``batches`` as the run date's lists and publish them in one commit. Returns rows, users, bytes,
    table_version and latest (whether ``day`` is now the newest run date, the one consumers read).

    ``check`` is called with the written, uncommitted parts; if it raises, nothing is published and the date's
    previous lists stay as they were. ``batches`` may instead be :class:`ShardParts` that other processes wrote (a
    Ray night): they are checked and committed the same way. With ``keep_nights`` old run dates and table versions
    are then expired (:func:`apply_retention`).
    """
    if isinstance(batches, ShardParts):  # written by the shards already: check and commit them
        shards = batches
        return commit(
            lake, day, shards.parts, pointer, rows=shards.rows, users=shards.users, check=check, keep_nights=keep_nights
        )
    parts, rows, users = write_parts(lake, day, batches, pointer)
    return commit(lake, day, [parts], pointer, rows=rows, users=users, check=check, keep_nights=keep_nights)


def commit(
    lake: Lake,
    day: dt.date,
    parts: Sequence[WrittenParts],
    pointer: dict,
    *,
    rows: int,
    users: int,
    check: Callable[[WrittenParts], None] | None = None,
    keep_nights: int | None = None,
) -> dict:
    """Check the night's parts (all shards' together) and commit them as ``day``'s lists in ONE transaction."""
    merged = WrittenParts(
        lake.recommendations_uri,
        day,
        [p for part in parts for p in part.paths],
        lake.storage_options,
        [a for part in parts for a in part.actions],
    )
    if check is not None:
        check(merged)
    failpoint("publish:before-swap")
    metadata = {
        **{f"nightrec.{k}": v for k, v in _provenance(pointer).items()},
        "nightrec.run_date": day.isoformat(),
        "nightrec.rows": str(rows),
    }
    version = delta.commit_parts(
        lake.recommendations_uri, SPEC, merged.actions, {"run_date": [day.isoformat()]}, metadata, lake.storage_options
    )
    failpoint("publish:after-commit")  # committed: the lists are readable, retention not yet applied
    dates = published_dates(lake, version)
    stats = {
        "rows": rows,
        "users": users,
        "bytes": sum(a.size for a in merged.actions),
        "table_version": version,
        "latest": bool(dates) and dates[-1] == day,
    }
    if keep_nights is not None:
        stats["expired_run_dates"] = len(apply_retention(lake, keep_nights))
    return stats


# --- reading ----------------------------------------------------------------------------------------------------
def _table(lake: Lake, version: int | None = None):
    table = delta.open_table(lake.recommendations_uri, lake.storage_options, version)
    if table is None:
        raise NothingPublishedError(f"nothing published yet ({lake.recommendations_uri} is not a table)")
    return table


def _dates(table) -> list[dt.date]:
    return sorted(dt.date.fromisoformat(p["run_date"]) for p in table.partitions())


def published_dates(lake: Lake, version: int | None = None) -> list[dt.date]:
    """Run dates in the table (at ``version``, default the newest), oldest first; empty when none."""
    try:
        return _dates(_table(lake, version))
    except NothingPublishedError:
        return []


def _newest_date(table) -> dt.date:
    dates = _dates(table)
    if not dates:
        raise NothingPublishedError(f"nothing published yet ({table.table_uri} has no run date)")
    return dates[-1]


def _read(table, filters) -> pa.Table:
    try:
        return delta.table_arrow(table, filters=filters).select(SPEC.schema.names).cast(SPEC.schema)
    except Exception as exc:  # a part deleted or damaged behind the log's back
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptPartitionError(f"{table.table_uri}: unreadable: {first}") from exc


def _pointer(table, day: dt.date, sample: pa.Table | None = None) -> dict:
    if sample is None or sample.num_rows == 0:
        sample = delta.table_arrow(table, filters=[("run_date", "=", day)], columns=["mlflow_run_id", "model_version"])
    return {
        "date": day.isoformat(),
        "mlflow_run_id": sample["mlflow_run_id"][0].as_py() if sample.num_rows else None,
        "model_version": sample["model_version"][0].as_py() if sample.num_rows else None,
        "table_version": table.version(),
    }


def newest(lake: Lake) -> dict | None:
    """The night consumers read: {"date", "mlflow_run_id", "model_version", "table_version"}, or None."""
    try:
        table = _table(lake)
        return _pointer(table, _newest_date(table))
    except NothingPublishedError:
        return None


def verify_partition(lake: Lake, day: dt.date, deep: bool = True) -> list[str]:
    """The run date's files after checking each against its commit (size, footer rows; with ``deep`` every page
    against its checksum)."""
    table = _table(lake)
    if day not in _dates(table):
        raise NothingPublishedError(f"no recommendations published for {day} ({lake.recommendations_uri})")
    fs = delta.filesystem(lake.recommendations_uri, lake.storage_options)
    actions = pa.table(table.get_add_actions(flatten=True))
    checked = []
    for path, size, records in zip(
        actions["path"].to_pylist(), actions["size_bytes"].to_pylist(), actions["num_records"].to_pylist(), strict=True
    ):
        if f"run_date={day.isoformat()}/" in path:
            checked.append(verify_file(fs, lake.recommendations_uri, path, size, records, deep))
    return checked


def read_latest(lake: Lake) -> tuple[dict, pa.Table]:
    """The newest night's pointer and its whole lists (one table version: never a mix of two nights)."""
    table = _table(lake)
    day = _newest_date(table)
    verify_partition(lake, day, deep=False)
    lists = _read(table, [("run_date", "=", day)])
    return _pointer(table, day, lists), lists


def read_latest_head(lake: Lake, users: int) -> tuple[dict, pa.Table]:
    """The newest night's pointer and the whole lists of its first ``users`` users (by user id), read file by file
    with row-group skipping: memory stays near one row group, however many users the night published."""
    table = _table(lake)
    day = _newest_date(table)
    fs = delta.filesystem(lake.recommendations_uri, lake.storage_options)
    paths = [p for p in delta.file_sizes(table) if f"run_date={day.isoformat()}/" in p]
    batches: list[pa.RecordBatch] = []
    seen: set[str] = set()
    for path in paths:  # in commit order: a sharded night's parts are in user-range order
        for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=8192):
            batches.append(batch)
            seen.update(pc.unique(batch["user_id"]).to_pylist())
            if len(seen) > users:
                break  # lists are written in user order: the first ``users`` lists are complete
        if len(seen) > users:
            break
    lists = pa.Table.from_batches(batches) if batches else SPEC.file_schema.empty_table()
    lists = lists.append_column("run_date", pa.array([day] * lists.num_rows, pa.date32()))
    lists = lists.select(SPEC.schema.names).cast(SPEC.schema)
    first = pc.unique(lists["user_id"])[:users]
    return _pointer(table, day, lists), lists.filter(pc.is_in(lists["user_id"], value_set=first))


def read_user_range(parts: WrittenParts | Path, lo: str | None, hi: str | None) -> pa.Table:
    """The rows of the written ``parts`` (or of one local Parquet file of lists) for users ``lo <= user_id < hi``
    (None = open end). Lists are written in user order, so row-group statistics skip the rest of the files: memory
    holds the range, not the night."""
    bounds = [("user_id", ">=", lo)] if lo is not None else []
    bounds += [("user_id", "<", hi)] if hi is not None else []
    if isinstance(parts, WrittenParts):
        return parts.read(filters=bounds or None)
    return pq.read_table(parts, filters=bounds or None)


def read_day(lake: Lake, day: dt.date, version: int | None = None) -> pa.Table:
    """All lists of run date ``day`` (at table ``version``, default the newest)."""
    table = _table(lake, version)
    if day not in _dates(table):
        raise NothingPublishedError(f"no recommendations published for {day} ({lake.recommendations_uri})")
    return _read(table, [("run_date", "=", day)])


def read_user_list(lake: Lake, user_id: str, day: dt.date | None = None) -> pl.DataFrame:
    """One user's list (rank order) from ``day`` or the newest night; empty frame for an unknown user."""
    table = _table(lake)
    day = day or _newest_date(table)
    if day not in _dates(table):
        raise NothingPublishedError(f"no recommendations published for {day} ({lake.recommendations_uri})")
    lists = _read(table, [("run_date", "=", day), ("user_id", "=", user_id)])
    return pl.from_arrow(lists).sort("rank")


# --- retention ----------------------------------------------------------------------------------------------------
def apply_retention(lake: Lake, keep_nights: int) -> list[dt.date]:
    """Remove run dates older than ``keep_nights`` before the newest (one delete commit), then ``VACUUM`` every table
    of the lake so that data files no version of the last ``keep_nights`` days needs are deleted (also orphaned
    parts of killed writers as old). Returns the run dates removed."""
    if keep_nights < 1:
        raise ValueError(f"keep_nights must be at least 1, got {keep_nights}")
    table = _table(lake)
    dates = _dates(table)
    removed: list[dt.date] = []
    if dates:
        cutoff = dates[-1] - dt.timedelta(days=keep_nights)
        removed = [d for d in dates if d <= cutoff]
        if removed:
            table.delete(f"run_date <= '{cutoff.isoformat()}'")
    for uri in (lake.recommendations_uri, lake.events_uri, lake.items_uri, lake.users_uri, lake.quarantine_uri):
        other = delta.open_table(uri, lake.storage_options)
        if other is not None:
            delta.vacuum(other, keep_hours=24 * keep_nights)
    return removed
