"""The night's item list: the catalogue in its order, then the items the events name that it lacks."""

from __future__ import annotations

import numpy as np
import polars as pl

from nightrec.settings import Settings
from nightrec.tasks import catalogue

ITEMS = pl.DataFrame(
    {"item_id": ["m3", "m1", "m2"], "title": ["Three", "One", "Two"], "available": [True, None, False]}
)
EVENTS = pl.DataFrame(
    {
        "user_id": ["a", "a", "b", "c", "c", "c"],
        "item_id": ["m1", "zz-new", "m2", "aa-new", "zz-new", "m3"],
    }
)


class _Lake:
    def read_items(self) -> pl.DataFrame:
        return ITEMS


def test_catalogue_order_is_kept_and_missing_items_are_appended_sorted():
    item_ids, missing = catalogue.night_item_ids(ITEMS, EVENTS)
    assert item_ids == ["m3", "m1", "m2", "aa-new", "zz-new"] and missing == ["aa-new", "zz-new"]
    assert catalogue.night_item_ids(ITEMS, EVENTS.filter(pl.col("item_id").str.starts_with("m"))) == (
        ["m3", "m1", "m2"],
        [],
    )


def test_missing_items_get_zero_text_rows_and_are_counted(monkeypatch):
    text = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    asked = []

    def cached(lake, settings, item_ids):
        asked.append(list(item_ids))
        return text[[["m3", "m1", "m2"].index(i) for i in item_ids]]

    monkeypatch.setattr("nightrec.tasks.embed.load_item_embeddings", cached)
    night = catalogue.night_items(_Lake(), Settings(), EVENTS)
    assert asked == [["m3", "m1", "m2"]]  # only catalogue items are looked up in the embedding cache
    assert night.item_ids == ["m3", "m1", "m2", "aa-new", "zz-new"] and night.missing == ["aa-new", "zz-new"]
    assert night.text_vectors.dtype == np.float32 and night.text_vectors.shape == (5, 4)
    np.testing.assert_array_equal(night.text_vectors[:3], text)
    assert not night.text_vectors[3:].any()
    assert night.stats() == {"items_missing_from_catalogue": 2, "events_on_missing_items": 3}


def test_night_catalogue_titles_missing_items_by_id_and_never_marks_them_unavailable():
    table = catalogue.night_catalogue(ITEMS, EVENTS)
    assert table["item_id"].to_list() == ["m3", "m1", "m2", "aa-new", "zz-new"]
    assert table["title"].to_list()[3:] == ["aa-new", "zz-new"]
    unavailable = table.filter(pl.col("available").eq(False))["item_id"].to_list()  # the exclude_unavailable rule
    assert unavailable == ["m2"]
    assert catalogue.night_catalogue(ITEMS, EVENTS.filter(pl.col("item_id") == "m1")) is ITEMS
