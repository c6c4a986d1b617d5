"""The night's item list: the catalogue, plus every item the night's events name that the catalogue lacks.

A real catalogue lags its logs: an item is clicked before its catalogue row lands. Such an item is still trained,
evaluated, indexed and recommended, by its id: it is appended after the catalogue (sorted, so catalogue rows keep
their positions), gets a zero text vector and its id as its title. Train, evaluate-and-gate, compress-and-index and
publish all take their item list from here, so they agree on it.

Why a zero text vector rather than the encoder's vector of an empty text: an empty text still has an embedding, one
point of the text space shared by every such item, at some arbitrary likeness to real items with short texts, so the
text adaptor would place all of them near those items. A zero vector carries no likeness to anything (the adaptor
gives every such item the same constant, its bias) and the item is told apart by its learned ID embedding alone,
which is what its events train. It also needs no encoder in the training stage and does not change when the encoder
or its text template does. When the item's catalogue row arrives, embed-items embeds its text and the next night uses
it (a champion's ID row for the item carries over by id).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import polars as pl

from nightrec.settings import Settings
from nightrec.storage.lake import Lake

MISSING_METRICS = ("items_missing_from_catalogue", "events_on_missing_items")


class NightItems(NamedTuple):
    """The night's items: ``item_ids`` (catalogue order, then ``missing``), their text vectors (rows in that order,
    zero for the missing ones), the ids of events absent from the catalogue (sorted) and how many events name them."""

    item_ids: list[str]
    text_vectors: np.ndarray
    missing: list[str]
    missing_events: int

    def stats(self) -> dict[str, int]:
        """The counts for the night's summary (MLflow metrics :data:`MISSING_METRICS`)."""
        return dict(zip(MISSING_METRICS, (len(self.missing), self.missing_events), strict=True))


def night_item_ids(items: pl.DataFrame, events: pl.DataFrame) -> tuple[list[str], list[str]]:
    """(every item id of the night, the ids among them absent from the catalogue): the catalogue's ids in its order,
    then the ids ``events`` name that the catalogue lacks, sorted."""
    catalogue = items["item_id"].unique(maintain_order=True)
    missing = (
        events.select(pl.col("item_id").unique())
        .filter(~pl.col("item_id").is_in(catalogue.implode()))
        .sort("item_id")["item_id"]
        .to_list()
    )
    return catalogue.to_list() + missing, missing


def night_items(lake: Lake, settings: Settings, events: pl.DataFrame) -> NightItems:
    """The night's items with their text vectors: the catalogue's from the embedding cache (run embed-items first),
    zeros for items the events name that the catalogue lacks."""
    from nightrec.tasks.embed import load_item_embeddings

    items = lake.read_items()
    item_ids, missing = night_item_ids(items, events)
    known = item_ids[: len(item_ids) - len(missing)]
    text = load_item_embeddings(lake, settings, known)
    vectors = np.vstack([text, np.zeros((len(missing), text.shape[1]), dtype=np.float32)]).astype(np.float32)
    missing_events = events.filter(pl.col("item_id").is_in(missing)).height if missing else 0
    return NightItems(item_ids, vectors, missing, missing_events)


def night_catalogue(items: pl.DataFrame, events: pl.DataFrame) -> pl.DataFrame:
    """The catalogue plus a row per item the events name that it lacks (title = the item id, other columns null):
    what publish joins lists with for titles and availability."""
    _, missing = night_item_ids(items, events)
    if not missing:
        return items
    extra = pl.DataFrame({"item_id": missing, "title": missing}, schema={"item_id": pl.String, "title": pl.String})
    return pl.concat([items, extra], how="diagonal_relaxed")
