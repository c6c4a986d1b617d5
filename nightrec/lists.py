"""The published lists in one call, for the services that read them (docs/contract.md).

    from nightrec.lists import read_lists
    lists = read_lists()                                  # the newest night, every user, as polars
    mine = read_lists(user="u42", date="2026-03-01")      # one user's list of a given run date
    table = read_lists("s3://bucket/lake", as_="arrow")   # an object-store lake, as Arrow

Importing this module loads polars, pyarrow and deltalake, never torch or the pipeline: a consumer needs only the
storage layer. Every read is of one table version (snapshot): a publish running meanwhile is either wholly seen
(when committed before the read began) or not at all.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from nightrec.storage import delta, publication
from nightrec.storage.lake import Lake

__all__ = ["newest_night", "read_lists"]


def _lake(lake: str | Path | Lake | None, storage_options: Mapping[str, str] | None) -> Lake:
    if isinstance(lake, Lake):
        return lake
    if lake is None:
        from nightrec.settings import Settings  # the configured lake: NIGHTREC_LAKE, else NIGHTREC_HOME/lake

        lake = Settings().lake_root
    return Lake(lake, storage_options=storage_options)


def _date(value: str | dt.date | None) -> dt.date | None:
    if value is None or isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(value)


def newest_night(
    lake: str | Path | Lake | None = None, *, storage_options: Mapping[str, str] | None = None
) -> dict | None:
    """{"date", "mlflow_run_id", "model_version", "table_version"} of the newest published night, or None."""
    return publication.newest(_lake(lake, storage_options))


def read_lists(
    lake: str | Path | Lake | None = None,
    *,
    date: str | dt.date | None = None,
    user: str | None = None,
    version: int | None = None,
    as_: Literal["polars", "arrow"] = "polars",
    storage_options: Mapping[str, str] | None = None,
) -> pl.DataFrame | pa.Table:
    """The lists of run date ``date`` (default: the newest run date of the table), for ``user`` (default: all),
    sorted by user and rank, as a polars DataFrame or an Arrow table (``as_``).

    ``version`` reads the table as of that Delta version (time travel: the lists as they were before a later
    publish). ``lake`` is a local folder, an object-store URI (``s3://bucket/prefix``; credentials and endpoint from
    the standard ``AWS_*`` variables or ``storage_options``) or a :class:`Lake`; default: the configured lake.
    Raises :class:`~nightrec.storage.publication.NothingPublishedError` when there is no such night.
    """
    if as_ not in ("polars", "arrow"):
        raise ValueError(f"as_ must be 'polars' or 'arrow', got {as_!r}")
    where = _lake(lake, storage_options)
    table = delta.open_table(where.recommendations_uri, where.storage_options, version)
    if table is None:
        raise publication.NothingPublishedError(f"nothing published yet ({where.recommendations_uri})")
    dates = sorted(dt.date.fromisoformat(p["run_date"]) for p in table.partitions())
    day = _date(date) or (dates[-1] if dates else None)
    if day is None or day not in dates:
        raise publication.NothingPublishedError(f"no lists for run date {day} in {where.recommendations_uri}")
    filters = [("run_date", "=", day)] + ([("user_id", "=", user)] if user is not None else [])
    lists = delta.table_arrow(table, filters=filters).select(publication.SPEC.schema.names)
    lists = lists.cast(publication.SPEC.schema)
    order = pc.sort_indices(lists, sort_keys=[("user_id", "ascending"), ("rank", "ascending")])
    lists = lists.take(order)
    return lists if as_ == "arrow" else pl.from_arrow(lists)
