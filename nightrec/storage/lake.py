"""The lake (docs/contract.md): Delta tables of events, quarantine, items, users and published lists, on a local
folder or an object store, plus the local caches (embeddings, locks) beside them.

A local lake is a folder; ``s3://bucket/prefix`` (or any store delta-rs speaks) is an object-store lake, whose
credentials and endpoint come from the standard environment variables (``AWS_*``) or ``storage_options``. The
embedding cache and the locks that order one machine's writers stay on local disk: in the lake folder for a local
lake, in a per-lake folder under the system's temporary folder for an object-store one (``local_dir``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import polars as pl
import pyarrow as pa

from nightrec.storage import delta
from nightrec.storage.schemas import EVENTS_TABLE, ITEMS_TABLE, QUARANTINE_TABLE, USERS_TABLE

_DATE_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")


class UnsafePathError(ValueError):
    """A name would place a file outside the lake."""


class CorruptPartitionError(ValueError):
    """A lake file is missing, truncated or does not match the size its table's log recorded; the message names it."""


def _safe_name(name: str) -> str:
    """One path component that cannot climb out of its folder: no separators, no ``..``, no NUL, text only."""
    if not isinstance(name, str):
        raise UnsafePathError(f"refusing non-text path component {name!r}")
    if not name or name in {".", ".."} or "/" in name or "\\" in name or "\x00" in name:
        raise UnsafePathError(f"refusing unsafe path component {name!r}")
    return name


def _day(day: dt.date) -> str:
    # A string here could be "../.."; only a real date becomes a partition name.
    if not isinstance(day, dt.date):
        raise UnsafePathError(f"partition key must be a date, got {day!r}")
    return f"date={day.isoformat()}"


def _check_date(day: dt.date) -> dt.date:
    _day(day)
    return day


class Lake:
    """One lake. ``root``: a local folder or an object-store URI (``s3://bucket/prefix``)."""

    def __init__(
        self,
        root: str | Path,
        *,
        storage_options: Mapping[str, str] | None = None,
        local_dir: str | Path | None = None,
        migrate: bool = True,
    ) -> None:
        text = str(root)
        self.remote = delta.is_remote(text)
        if self.remote:
            self.uri = text.rstrip("/")
            digest = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
            default_local = Path(tempfile.gettempdir()) / f"nightrec-lake-{digest}"
            self.local_dir = Path(local_dir or default_local).expanduser().resolve()
        else:
            self.local_dir = Path(text.removeprefix("file://")).expanduser().resolve()
            self.uri = str(self.local_dir)
        self.storage_options = {**delta.default_storage_options(self.uri), **dict(storage_options or {})}
        if migrate and not self.remote:
            from nightrec.storage import legacy  # only local lakes had the old Parquet layout

            legacy.migrate_if_needed(self)

    def __repr__(self) -> str:
        return f"Lake({self.uri!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Lake) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def root(self) -> Path:
        """The local folder of this lake: the lake itself when local, its caches and locks when on an object store."""
        return self.local_dir

    def _inside(self, *parts: str) -> Path:
        path = self.local_dir.joinpath(*(_safe_name(p) for p in parts))
        if not path.resolve().is_relative_to(self.local_dir):
            raise UnsafePathError(f"{path} is outside the lake {self.local_dir}")
        return path

    def table_uri(self, name: str) -> str:
        _safe_name(name)
        if self.remote:
            return f"{self.uri}/{name}"
        path = self._inside(name)
        return str(path)

    # --- layout -------------------------------------------------------------------------------------------------
    @property
    def events_uri(self) -> str:
        return self.table_uri(EVENTS_TABLE.name)

    @property
    def quarantine_uri(self) -> str:
        return self.table_uri(QUARANTINE_TABLE.name)

    @property
    def items_uri(self) -> str:
        return self.table_uri(ITEMS_TABLE.name)

    @property
    def users_uri(self) -> str:
        return self.table_uri(USERS_TABLE.name)

    @property
    def recommendations_uri(self) -> str:
        return self.table_uri("recommendations")

    @property
    def events_dir(self) -> Path:
        return self._inside("events")

    @property
    def recommendations_dir(self) -> Path:
        """Local folder of the lists (locks live on it); on an object-store lake only the locks."""
        return self._inside("recommendations")

    @property
    def item_embeddings_dir(self) -> Path:
        return self._inside("embeddings", "items")

    def user_embeddings_dir(self, day: dt.date) -> Path:
        return self._inside("embeddings", "users", _day(day))

    def events_partition(self, day: dt.date) -> Path:
        return self._inside("events", _day(day))

    def quarantine_partition(self, day: dt.date) -> Path:
        return self._inside("quarantine", _day(day))

    def recommendations_partition(self, day: dt.date) -> Path:
        return self._inside("recommendations", f"run_date={_check_date(day).isoformat()}")

    def _open(self, uri: str, version: int | None = None):
        return delta.open_table(uri, self.storage_options, version)

    # --- events -------------------------------------------------------------------------------------------------
    def event_dates(self) -> list[dt.date]:
        table = self._open(self.events_uri)
        if table is None:
            return []
        return sorted(dt.date.fromisoformat(p["date"]) for p in table.partitions())

    def scan_events(
        self, before: dt.date | None = None, since: dt.date | None = None, verify: bool = True
    ) -> pl.LazyFrame:
        """Events with ``since <= date < before`` as a lazy frame with a ``date`` column (empty frame if none).

        With ``verify`` every file the scan needs is checked to exist with the size its commit recorded: a deleted or
        truncated file raises CorruptPartitionError naming it, before any row is used.
        """
        table = self._open(self.events_uri)
        empty = pl.from_arrow(EVENTS_TABLE.schema.empty_table()).lazy()
        if table is None:
            return empty
        if verify:
            self._verify(table, self.events_uri, since, before, "date")
        frame = pl.scan_delta(table)
        if before is not None:
            frame = frame.filter(pl.col("date") < pl.lit(before))
        if since is not None:
            frame = frame.filter(pl.col("date") >= pl.lit(since))
        return frame.select(EVENTS_TABLE.schema.names)

    def _verify(self, table, uri: str, since, before, key: str, deep: bool = False) -> list[str]:
        """Check the files of the partitions in ``[since, before)`` against the log: each exists with its committed
        size and its Parquet footer holds the committed row count; with ``deep`` every page is also read against
        its checksum (a flipped byte). Raises CorruptPartitionError naming the first bad file."""
        fs = delta.filesystem(uri, self.storage_options)
        actions = pa.table(table.get_add_actions(flatten=True))
        checked = []
        for path, size, rows in zip(
            actions["path"].to_pylist(),
            actions["size_bytes"].to_pylist(),
            actions["num_records"].to_pylist(),
            strict=True,
        ):
            day = _partition_day(path, key)
            if day is not None and ((since is not None and day < since) or (before is not None and day >= before)):
                continue
            checked.append(verify_file(fs, uri, path, size, rows, deep))
        return checked

    def verify_events(self, deep: bool = True) -> list[str]:
        """Check every events file against the log (see :meth:`_verify`); returns the files checked."""
        table = self._open(self.events_uri)
        return [] if table is None else self._verify(table, self.events_uri, None, None, "date", deep)

    def read_events_partition(self, day: dt.date) -> pl.DataFrame:
        """One day's events (without the ``date`` column), verified against the log first."""
        _check_date(day)
        frame = self.scan_events(since=day, before=day + dt.timedelta(days=1)).drop("date")
        try:
            return frame.collect()
        except Exception as exc:  # bytes that pass the size check can still fail to decode
            raise CorruptPartitionError(f"{self.events_uri} ({day}): unreadable: {_first_line(exc)}") from exc

    def events_partition_sha256(self, day: dt.date) -> str:
        """The day's content key: a digest of the data files the table's log names for it. Data files are never
        rewritten in place (a rewrite is new files and a new commit), so the key changes exactly when the day does."""
        table = self._open(self.events_uri)
        digest = hashlib.sha256(day.isoformat().encode())
        if table is not None:
            for path, size in sorted(delta.file_sizes(table).items()):
                if _partition_day(path, "date") == day:
                    digest.update(f"{path}:{size}".encode())
        return digest.hexdigest()

    def write_events_days(self, days: Iterable[tuple[dt.date, pl.DataFrame]]) -> int | None:
        """Replace each given day whole, all of them in ONE commit (a re-ingest of a day leaves its rows once).

        ``days`` may be a generator: each day is written as a Parquet part when it is produced (memory: one day),
        and the commit that makes them all visible comes after the last. Returns the new table version (None: no day).
        """
        writers: list[delta.PartWriter] = []
        actions, replaced = [], []
        try:
            for day, frame in days:
                _check_date(day)
                writer = delta.PartWriter(
                    self.events_uri, EVENTS_TABLE, {"date": day.isoformat()}, self.storage_options
                )
                writers.append(writer)
                writer.write(frame.with_columns(pl.lit(day).alias("date")).to_arrow())
                actions.append(writer.close())
                replaced.append(day.isoformat())
        except BaseException:
            for writer in writers[len(actions) :]:
                writer.abort()
            raise
        if not actions:
            return None
        return delta.commit_parts(
            self.events_uri,
            EVENTS_TABLE,
            actions,
            {"date": replaced},
            {"nightrec.operation": "ingest-events"},
            self.storage_options,
        )

    def write_events_partition(self, day: dt.date, frame: pl.DataFrame) -> None:
        """Replace the whole partition for ``day`` in one commit: a reader sees the old day or the new day."""
        self.write_events_days([(day, frame)])

    def append_quarantine(self, day: dt.date, frame: pl.DataFrame, batch_id: str) -> str:
        """Rejected rows of one ingest batch (every source column as text, ``reason``, ``source_file``), appended
        under the day they were rejected with their ``batch_id`` (a digest of the source and its rows): a batch
        already in the table is not appended again, so a re-ingest leaves the quarantine as it was. Returns the URI."""
        _safe_name(batch_id)
        _check_date(day)
        existing = self._open(self.quarantine_uri)
        if existing is not None:
            seen = (
                pl.scan_delta(existing)
                .filter((pl.col("date") == pl.lit(day)) & (pl.col("batch_id") == batch_id))
                .head(1)
                .collect()
            )
            if seen.height:
                return self.quarantine_uri
        table = frame.with_columns(
            pl.col(pl.Null).cast(pl.String), pl.lit(batch_id).alias("batch_id"), pl.lit(day).alias("date")
        )
        if "source_file" not in table.columns:
            table = table.with_columns(pl.lit(batch_id).alias("source_file"))
        arrow = table.to_arrow()
        arrow = arrow.cast(pa.schema([_text_or_date(f) for f in arrow.schema]))
        delta.ensure_table(self.quarantine_uri, QUARANTINE_TABLE, self.storage_options)
        from deltalake import CommitProperties, write_deltalake

        write_deltalake(
            self.quarantine_uri,
            arrow,
            mode="append",
            schema_mode="merge",  # every source has its own text columns
            partition_by=list(QUARANTINE_TABLE.partition_by),
            storage_options=self.storage_options,
            commit_properties=CommitProperties(custom_metadata={"nightrec.batch": batch_id}),
        )
        return self.quarantine_uri

    def read_quarantine(self) -> pl.DataFrame:
        table = self._open(self.quarantine_uri)
        return pl.from_arrow(QUARANTINE_TABLE.schema.empty_table()) if table is None else pl.read_delta(table)

    # --- catalogue ----------------------------------------------------------------------------------------------
    def read_items(self) -> pl.DataFrame:
        table = self._open(self.items_uri)
        if table is None:
            raise FileNotFoundError(f"no item catalogue in the lake yet ({self.items_uri}); run `nightrec ingest`")
        return pl.read_delta(table).select(ITEMS_TABLE.schema.names).sort("item_id")

    def has_items(self) -> bool:
        return self._open(self.items_uri) is not None

    def upsert_items(self, rows: pl.DataFrame) -> int | None:
        """Insert or replace (by ``item_id``) the given catalogue rows in one merge commit; returns the version."""
        table = delta.ensure_table(self.items_uri, ITEMS_TABLE, self.storage_options)
        if rows.is_empty():
            return table.version()
        source = rows.select(ITEMS_TABLE.schema.names).to_arrow().cast(ITEMS_TABLE.schema)
        (
            table.merge(source, predicate="t.item_id = s.item_id", source_alias="s", target_alias="t")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute()
        )
        return table.version()

    def replace_items(self, items: pl.DataFrame) -> None:
        """Replace the whole catalogue in one commit (fixtures and benchmarks; ingest upserts instead)."""
        from deltalake import write_deltalake

        delta.ensure_table(self.items_uri, ITEMS_TABLE, self.storage_options)
        source = items.select(ITEMS_TABLE.schema.names).to_arrow().cast(ITEMS_TABLE.schema)
        write_deltalake(self.items_uri, source, mode="overwrite", storage_options=self.storage_options)

    def read_users(self) -> pl.DataFrame | None:
        table = self._open(self.users_uri)
        return None if table is None else pl.read_delta(table).sort("user_id")

    def write_users(self, users: pl.DataFrame) -> None:
        """Replace the user attributes (free-form text columns keyed by ``user_id``) in one commit."""
        from deltalake import write_deltalake

        arrow = users.to_arrow()
        arrow = arrow.cast(pa.schema([_text_or_date(f) for f in arrow.schema]))
        delta.ensure_table(self.users_uri, USERS_TABLE, self.storage_options)
        write_deltalake(
            self.users_uri, arrow, mode="overwrite", schema_mode="overwrite", storage_options=self.storage_options
        )
        table = self._open(self.users_uri)
        if delta.schema_version(table) != USERS_TABLE.version:  # an overwrite of the schema keeps the property
            table.alter.set_table_properties(
                {delta.SCHEMA_VERSION_KEY: str(USERS_TABLE.version)}, raise_if_not_exists=False
            )

    def catalogue_digest(self) -> str:
        """Content key of the catalogue (items): its table's file list, which changes exactly when a commit does."""
        table = self._open(self.items_uri)
        digest = hashlib.sha256(b"items")
        if table is not None:
            for path, size in sorted(delta.file_sizes(table).items()):
                digest.update(f"{path}:{size}".encode())
        return digest.hexdigest()

    # --- published recommendations ------------------------------------------------------------------------------
    def read_latest_pointer(self) -> dict | None:
        """The newest published night: {"date", "mlflow_run_id", "model_version", "table_version"} or None."""
        from nightrec.storage import publication

        return publication.newest(self)

    def published_dates(self) -> list[dt.date]:
        from nightrec.storage import publication

        return publication.published_dates(self)


def verify_file(fs, uri: str, path: str, size: int, rows: int | None, deep: bool) -> str:
    """One data file against what its commit recorded (size, rows; pages with ``deep``); returns its full name."""
    import pyarrow.parquet as pq

    where = f"{uri}/{path}"
    info = fs.get_file_info(path)
    if info.size is None:
        raise CorruptPartitionError(f"{where}: missing (the table's log names it)")
    if info.size != size:
        raise CorruptPartitionError(f"{where}: truncated or replaced ({info.size} bytes; its commit recorded {size})")
    try:
        with fs.open_input_file(path) as handle:
            found = pq.ParquetFile(handle).metadata.num_rows
            if deep:
                pq.read_table(handle, page_checksum_verification=True)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a broken footer or a bad page
        raise CorruptPartitionError(f"{where}: corrupted Parquet ({_first_line(exc)})") from exc
    if rows is not None and found != rows:
        raise CorruptPartitionError(f"{where}: holds {found} rows, its commit recorded {rows}")
    return where


def _partition_day(path: str, key: str) -> dt.date | None:
    match = re.search(rf"(?:^|/){key}=(\d{{4}}-\d{{2}}-\d{{2}})/", path)
    return dt.date.fromisoformat(match.group(1)) if match else None


def _text_or_date(field: pa.Field) -> pa.Field:
    if pa.types.is_date(field.type):
        return field
    return pa.field(field.name, pa.string(), nullable=True)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def partition_dates(parent: Path) -> list[dt.date]:
    """Sorted dates of the ``date=YYYY-MM-DD`` folders directly under ``parent`` (local caches)."""
    if not parent.exists():
        return []
    found = []
    for child in parent.iterdir():
        match = _DATE_DIR.match(child.name)
        if match and child.is_dir():
            found.append(dt.date.fromisoformat(match.group(1)))
    return sorted(found)
