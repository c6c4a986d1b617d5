"""The lake layout (DESIGN.md) and its readers and writers.

Every path is built here and checked to stay inside the lake.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from nightrec.storage import atomic
from nightrec.storage.schemas import EVENTS

_DATE_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
PART_FILE = "part-0.parquet"
MANIFEST_FILE = (
    "_manifest.json"  # beside PART_FILE: {"file", "rows", "bytes", "sha256"}, published with it in one rename
)


class UnsafePathError(ValueError):
    """A name would place a file outside the lake."""


class CorruptPartitionError(ValueError):
    """A lake file is truncated, corrupted or does not match its manifest; the message names the file."""


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


@dataclass(frozen=True)
class Lake:
    """Paths of one lake. ``root`` is a local directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    def _inside(self, *parts: str) -> Path:
        path = self.root.joinpath(*(_safe_name(p) for p in parts))
        if not path.resolve().is_relative_to(self.root):
            raise UnsafePathError(f"{path} is outside the lake {self.root}")
        return path

    # --- layout -------------------------------------------------------------------------------------------------
    @property
    def events_dir(self) -> Path:
        return self._inside("events")

    @property
    def quarantine_dir(self) -> Path:
        return self._inside("quarantine")

    @property
    def items_file(self) -> Path:
        return self._inside("items", "items.parquet")

    @property
    def users_file(self) -> Path:
        return self._inside("users", "users.parquet")

    @property
    def item_embeddings_dir(self) -> Path:
        return self._inside("embeddings", "items")

    def user_embeddings_dir(self, day: dt.date) -> Path:
        return self._inside("embeddings", "users", _day(day))

    @property
    def recommendations_dir(self) -> Path:
        return self._inside("recommendations")

    def recommendations_partition(self, day: dt.date) -> Path:
        return self._inside("recommendations", _day(day))

    @property
    def latest_pointer(self) -> Path:
        return self._inside("recommendations", "LATEST")

    def events_partition(self, day: dt.date) -> Path:
        return self._inside("events", _day(day))

    def quarantine_partition(self, day: dt.date) -> Path:
        return self._inside("quarantine", _day(day))

    # --- events -------------------------------------------------------------------------------------------------
    def event_dates(self) -> list[dt.date]:
        return partition_dates(self.events_dir)

    def scan_events(
        self, before: dt.date | None = None, since: dt.date | None = None, verify: bool = True
    ) -> pl.LazyFrame:
        """Events with ``since <= date < before`` as a lazy frame with a ``date`` column (empty frame if none).

        With ``verify`` each partition's Parquet footer is read and checked against its manifest (rows, bytes):
        a truncated or replaced file raises CorruptPartitionError naming it, before any row is used.
        """
        days = [d for d in self.event_dates() if (before is None or d < before) and (since is None or d >= since)]
        files = [self.events_partition(d) / PART_FILE for d in days]
        if verify:
            for f in files:
                verify_parquet(f)
        if not files:
            return pl.from_arrow(EVENTS.empty_table()).lazy().with_columns(pl.lit(None, pl.Date).alias("date"))
        frames = [pl.scan_parquet(f).with_columns(pl.lit(d).alias("date")) for f, d in zip(files, days, strict=True)]
        return pl.concat(frames, how="vertical")

    def read_events_partition(self, day: dt.date) -> pl.DataFrame:
        """One day's events, verified against its manifest first."""
        path = self.events_partition(day) / PART_FILE
        verify_parquet(path)
        try:
            return pl.read_parquet(path)
        except Exception as exc:  # bytes that pass the footer check can still fail to decode
            raise CorruptPartitionError(f"{path}: unreadable: {str(exc).strip().splitlines()[0]}") from exc

    def events_partition_sha256(self, day: dt.date) -> str:
        """The day's content digest: the manifest's sha256 (no re-read of the data), hashed afresh without one."""
        folder = self.events_partition(day)
        manifest = folder / MANIFEST_FILE
        if manifest.exists():
            try:
                return str(json.loads(manifest.read_text())["sha256"])
            except (ValueError, KeyError):
                pass  # an unreadable manifest: fall back to the bytes themselves
        return atomic.sha256_file(folder / PART_FILE)

    def write_events_partition(self, day: dt.date, frame: pl.DataFrame) -> None:
        """Replace the whole partition for ``day``: the Parquet file and its manifest are written in a staging
        folder and swapped in with one rename, so a reader sees the old pair or the new pair, never a mix."""
        target = self.events_partition(day)
        staging = atomic.new_staging_dir(target.parent, target.name)
        try:
            atomic.write_parquet_atomic(frame.to_arrow(), staging / PART_FILE)
            atomic.write_json_atomic(staging / MANIFEST_FILE, file_manifest(staging / PART_FILE))
            atomic.replace_dir(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # already gone on success (replace_dir moved it)

    def verify_events(self, deep: bool = True) -> list[Path]:
        """Check every events partition (footer, rows, bytes; with ``deep`` also the sha256 of the whole file).
        Returns the files checked; raises CorruptPartitionError naming the first bad one."""
        files = [self.events_partition(d) / PART_FILE for d in self.event_dates()]
        for f in files:
            verify_parquet(f, deep=deep)
        return files

    def append_quarantine(self, day: dt.date, frame: pl.DataFrame, batch_id: str) -> Path:
        """Rejected rows of one ingest batch; each batch gets its own file so nothing earlier is overwritten."""
        path = self.quarantine_partition(day) / f"part-{_safe_name(batch_id)}.parquet"
        atomic.write_parquet_atomic(frame.to_arrow(), path)
        return path

    # --- catalogue ----------------------------------------------------------------------------------------------
    def read_items(self) -> pl.DataFrame:
        if not self.items_file.exists():
            raise FileNotFoundError(f"no item catalogue in the lake yet ({self.items_file}); run `nightrec ingest`")
        return pl.read_parquet(self.items_file)

    def read_users(self) -> pl.DataFrame | None:
        return pl.read_parquet(self.users_file) if self.users_file.exists() else None

    # --- published recommendations ------------------------------------------------------------------------------
    def read_latest_pointer(self) -> dict | None:
        if not self.latest_pointer.exists():
            return None
        return json.loads(self.latest_pointer.read_text())

    def published_dates(self) -> list[dt.date]:
        return partition_dates(self.recommendations_dir)


def partition_dates(parent: Path) -> list[dt.date]:
    """Sorted dates of the ``date=YYYY-MM-DD`` folders directly under ``parent``."""
    if not parent.exists():
        return []
    found = []
    for child in parent.iterdir():
        match = _DATE_DIR.match(child.name)
        if match and child.is_dir():
            found.append(dt.date.fromisoformat(match.group(1)))
    return sorted(found)


def file_manifest(path: Path) -> dict:
    """What a reader checks a Parquet file against: row count from its footer, size and sha256 of its bytes."""
    return {
        "file": path.name,
        "rows": pq.read_metadata(path).num_rows,
        "bytes": path.stat().st_size,
        "sha256": atomic.sha256_file(path),
    }


def verify_parquet(path: Path, deep: bool = False) -> int:
    """Row count of ``path`` after checking its footer and, where a manifest lies beside it, its rows and size
    (and its sha256 with ``deep``). Files written before manifests existed get the footer check only."""
    try:
        rows = pq.read_metadata(path).num_rows
    except FileNotFoundError:
        raise CorruptPartitionError(f"{path}: missing") from None
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for a truncated or overwritten footer
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptPartitionError(f"{path}: truncated or corrupted Parquet ({why})") from exc
    manifest_path = path.parent / MANIFEST_FILE
    if not manifest_path.exists():
        return rows
    try:
        manifest = json.loads(manifest_path.read_text())
        expected_rows, expected_bytes = int(manifest["rows"]), int(manifest["bytes"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptPartitionError(f"{manifest_path}: unreadable manifest for {path}") from exc
    size = path.stat().st_size
    if (rows, size) != (expected_rows, expected_bytes):
        raise CorruptPartitionError(
            f"{path}: does not match its manifest ({rows} rows, {size} bytes; expected {expected_rows} rows, "
            f"{expected_bytes} bytes)"
        )
    if deep and atomic.sha256_file(path) != manifest.get("sha256"):
        raise CorruptPartitionError(f"{path}: sha256 differs from its manifest (bytes changed after writing)")
    return rows
