"""Data sources: the seeded demo generator and adapters for public dataset layouts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nightrec.sources.movielens import Dataset


def load_dataset(folder_or_paths: str | Path | Sequence[str | Path]) -> Dataset:
    """A public dataset in our input columns, whichever supported layout it has.

    ``folder_or_paths`` is a folder (MovieLens 100K/1M/latest, or an Amazon 2018 category folder with its reviews
    and ``meta_*`` files) or an Amazon (reviews file, metadata file) pair. Raises ValueError naming the folder
    when no adapter recognises it.
    """
    from nightrec.sources import amazon, movielens

    if not isinstance(folder_or_paths, (str, Path)):
        paths = [Path(p) for p in folder_or_paths]
        if len(paths) != 2:
            raise ValueError(f"expected a folder or an (events file, items file) pair, got {len(paths)} path(s)")
        events, items = paths
        if amazon.detect_kind(events) != "reviews" or amazon.detect_kind(items) != "meta":
            raise ValueError(f"{events}, {items}: not an Amazon reviews file and its metadata file")
        return amazon.load(events, items)
    folder = Path(folder_or_paths)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    if movielens.detect_layout(folder) is not None:
        return movielens.load(folder)
    if amazon.detect_folder(folder):
        return amazon.load_folder(folder)
    raise ValueError(
        f"{folder}: not a dataset folder nightrec knows (MovieLens u.data+u.item, ratings.dat+movies.dat or "
        "ratings.csv+movies.csv; Amazon 2018 reviews *.json.gz + meta_*.json.gz)"
    )
