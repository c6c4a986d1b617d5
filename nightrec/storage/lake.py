"""The lake layout (DESIGN.md) and its readers and writers. Every path is built here and checked to stay inside the lake."""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from nightrec.storage import atomic
from nightrec.storage.schemas import EVENTS

_DATE_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
PART_FILE = "part-0.parquet"


class UnsafePathError(ValueError):
    """A name would place a file outside the lake."""


def _safe_name(name: str) -> str:
    if not name or name in {".", ".."} or "/" in name or "\\" in name or "\x00" in name:
        raise UnsafePathError(f"refusing unsafe path component {name!r}")
    return name


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
        return self._inside("embeddings", "users", f"date={day.isoformat()}")

    @property
    def recommendations_dir(self) -> Path:
        return self._inside("recommendations")

    def recommendations_partition(self, day: dt.date) -> Path:
        return self._inside("recommendations", f"date={day.isoformat()}")

    @property
    def latest_pointer(self) -> Path:
        return self._inside("recommendations", "LATEST")

    def events_partition(self, day: dt.date) -> Path:
        return self._inside("events", f"date={day.isoformat()}")

    def quarantine_partition(self, day: dt.date) -> Path:
        return self._inside("quarantine", f"date={day.isoformat()}")

    # --- events -------------------------------------------------------------------------------------------------
    def event_dates(self) -> list[dt.date]:
        return partition_dates(self.events_dir)

    def scan_events(self, before: dt.date | None = None, since: dt.date | None = None) -> pl.LazyFrame:
        """Events with ``since <= date < before`` as a lazy frame with a ``date`` column (empty frame if none)."""
        days = [d for d in self.event_dates() if (before is None or d < before) and (since is None or d >= since)]
        files = [self.events_partition(d) / PART_FILE for d in days]
        if not files:
            return pl.from_arrow(EVENTS.empty_table()).lazy().with_columns(pl.lit(None, pl.Date).alias("date"))
        frames = [pl.scan_parquet(f).with_columns(pl.lit(d).alias("date")) for f, d in zip(files, days, strict=True)]
        return pl.concat(frames, how="vertical")

    def write_events_partition(self, day: dt.date, frame: pl.DataFrame) -> None:
        """Replace the whole partition for ``day`` atomically (one file, ``os.replace``)."""
        atomic.write_parquet_atomic(frame.to_arrow(), self.events_partition(day) / PART_FILE)

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
