"""Amazon Review Data 2018 adapter: gzip JSON Lines in, cleaned events and catalogue out, landed by the CLI."""

from __future__ import annotations

import datetime as dt
import gzip
import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from nightrec.flows.cli import app
from nightrec.settings import Settings
from nightrec.sources import amazon, load_dataset
from nightrec.storage.lake import Lake
from tests.conftest import tree_digest

DAY = 86_400
T0 = 1_500_000_000 - 1_500_000_000 % DAY  # 2017-07-14 00:00 UTC: review times have day resolution

REVIEWS = [
    {"overall": 5.0, "verified": True, "reviewTime": "07 14, 2017", "reviewerID": "U1", "asin": "A1",
     "reviewerName": "Ann", "reviewText": "Great", "summary": "Five Stars", "unixReviewTime": T0},
    {"overall": 4.0, "reviewerID": "U1", "asin": "A2", "unixReviewTime": T0 + DAY, "vote": "2",
     "style": {"Gift Amount:": " 25"}},
    {"overall": 3.0, "reviewerID": "U2", "asin": "A1", "unixReviewTime": T0 + 2 * DAY},
    {"overall": 5.0, "reviewerID": "U2", "asin": "A1", "unixReviewTime": T0 + 30 * DAY},  # same pair, later date
    {"overall": 1.0, "reviewerID": "U3", "asin": "GONE", "unixReviewTime": T0 + 3 * DAY},  # asin not in meta
]  # fmt: skip

META = [
    {
        "asin": "A1",
        "title": "  Barnes &amp; Noble Gift Card &#39;Holiday&#39;  ",
        "description": ["<div class=\"aplus\"> <h4>Give <b>more</b></h4>Redeem&nbsp;anywhere.<br/>Never expires.",
                        "  Second   part. "],
        "category": ["Gift Cards", "Gift Cards", "</span></span></span>", "Restaurants", "No expiration, no fees.",
                     "", "Restaurants", "Gift Card Accessories"],
        "brand": " Barnes &amp; Noble ",
        "main_cat": "Gift Cards",
        "feature": ["Redeemable online"],
        "price": "$25.00",
    },
    {
        "asin": "A2",
        "title": "Amazon.com eGift Card",
        "description": [],
        "category": ["Gift Cards", "Handmade with recycled materials in Los Angeles", "Amazon.com"],
        "brand": "",
        "main_cat": "<img src=\"x.png\" alt=\"AMAZON FASHION\"/>",
    },
    {"asin": "NEW", "title": "Never reviewed &gt; 5 &lt; 10", "category": [], "main_cat": "Toys & Games"},
]  # fmt: skip


def write_gz(path: Path, records: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    folder = tmp_path / "amazon-gift-cards"
    folder.mkdir()
    write_gz(folder / "Gift_Cards_5.json.gz", REVIEWS)
    write_gz(folder / "meta_Gift_Cards.json.gz", META)
    return folder


def test_cleaned_items(folder):
    items = amazon.load_items(folder / "meta_Gift_Cards.json.gz").sort("item_id")
    assert items.schema == pl.Schema(amazon.ITEMS_SCHEMA)
    assert items.rows() == [
        (
            "A1",
            "Barnes & Noble Gift Card 'Holiday'",
            "Give more Redeem anywhere. Never expires. Second part.",
            ["Restaurants", "Gift Card Accessories"],
            "Barnes & Noble",
        ),
        ("A2", "Amazon.com eGift Card", None, ["Amazon.com"], None),
        ("NEW", "Never reviewed > 5 < 10", None, [], None),  # decoded text, not tags: kept as written
    ]


def test_events_keep_every_review(folder):
    data = amazon.load(folder / "Gift_Cards_5.json.gz", folder / "meta_Gift_Cards.json.gz")
    assert data.users is None
    assert data.events.schema == pl.Schema(amazon.EVENTS_SCHEMA)
    day0 = dt.datetime(2017, 7, 14, tzinfo=dt.UTC)
    assert data.events.rows() == [
        ("U1", "A1", day0, "rating", 5.0),
        ("U1", "A2", day0 + dt.timedelta(days=1), "rating", 4.0),
        ("U2", "A1", day0 + dt.timedelta(days=2), "rating", 3.0),
        ("U2", "A1", day0 + dt.timedelta(days=30), "rating", 5.0),
        ("U3", "GONE", day0 + dt.timedelta(days=3), "rating", 1.0),
    ]
    assert sorted(data.items["item_id"]) == ["A1", "A2", "NEW"]  # NEW: in the catalogue only; GONE: in the log only


def test_clean_text_and_categories():
    assert amazon.clean_text(["a&amp;b", " <p>c</p>", 3]) == "a&b c"
    assert amazon.clean_text("&lt;br&gt;x&lt;/br&gt;") == "x"  # an escaped tag is a tag too
    assert amazon.clean_text("<script>var x = 1;</script>I <3 it, 5<6") == "I <3 it, 5<6"
    assert amazon.clean_text(None) == ""
    assert amazon.clean_categories(["Gift Cards", "gift cards", "Toys &amp; Games", "Buy now!"], {"Gift Cards"}) == [
        "Toys & Games"
    ]
    assert amazon.clean_categories("not a list") == []
    assert amazon.category_name("meta_Gift_Cards.json.gz") == "Gift Cards"
    assert amazon.category_name("Gift_Cards_5.json.gz") == "Gift Cards"


def test_detect(folder, tmp_path):
    assert amazon.detect_kind(folder / "Gift_Cards_5.json.gz") == "reviews"
    assert amazon.detect_kind(folder / "meta_Gift_Cards.json.gz") == "meta"
    plain = tmp_path / "reviews.jsonl"
    plain.write_text("\n" + json.dumps(REVIEWS[0]) + "\n")
    assert amazon.detect(plain)
    generic = write_gz(tmp_path / "events.jsonl.gz", [{"user_id": "u", "item_id": "i", "timestamp": 1}])
    not_gzip = tmp_path / "broken.json.gz"
    not_gzip.write_bytes(b"\x1f\x8b garbage")
    not_json = tmp_path / "text.json"
    not_json.write_text("hello\n")
    csv = tmp_path / "events.csv"
    csv.write_text("reviewerID,asin,unixReviewTime\n")
    for path in (generic, not_gzip, not_json, csv, tmp_path / "missing.json", folder):
        assert not amazon.detect(path), path
    assert amazon.detect_folder(folder) and not amazon.detect_folder(tmp_path)


def test_load_folder_and_dispatcher(folder, tmp_path):
    via_folder = amazon.load_folder(folder)
    via_dispatch = load_dataset(folder)
    via_pair = load_dataset([folder / "Gift_Cards_5.json.gz", folder / "meta_Gift_Cards.json.gz"])
    for data in (via_dispatch, via_pair):
        assert data.events.equals(via_folder.events) and data.items.equals(via_folder.items)
    movielens = tmp_path / "ml-latest-small"
    movielens.mkdir()
    (movielens / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,4.0,964982703\n")
    (movielens / "movies.csv").write_text("movieId,title,genres\n10,Heat (1995),Action|Crime\n")
    assert load_dataset(movielens).items["genres"].to_list() == [["Action", "Crime"]]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty: not a dataset folder"):
        load_dataset(empty)
    write_gz(empty / "meta_Gift_Cards.json.gz", META)
    with pytest.raises(ValueError, match="empty: not a dataset folder"):
        load_dataset(empty)  # metadata alone is not a dataset
    with pytest.raises(ValueError, match="missing a reviews file"):
        amazon.load_folder(empty)


def test_full_file_and_five_core_side_by_side(folder):
    write_gz(folder / "Gift_Cards.json.gz", REVIEWS + REVIEWS)
    assert amazon.find_files(folder) == (folder / "Gift_Cards_5.json.gz", folder / "meta_Gift_Cards.json.gz")
    write_gz(folder / "Other_5.json.gz", REVIEWS)
    with pytest.raises(ValueError, match="more than one Amazon reviews file"):
        amazon.load_folder(folder)


def test_cli_ingest_gzip_files_lands_events_and_items(home, folder):
    reviews, meta = folder / "Gift_Cards_5.json.gz", folder / "meta_Gift_Cards.json.gz"
    result = CliRunner().invoke(app, ["ingest", "--events", str(reviews), "--items", str(meta)])
    assert result.exit_code == 0, result.output
    assert f"{meta}: 3 rows, 3 landed" in result.output and f"{reviews}: 5 rows, 5 landed" in result.output
    lake = Lake(Settings().lake_root)
    events = lake.scan_events().collect().sort("timestamp")
    assert events.select("user_id", "item_id", "event_type", "value").rows() == [
        ("U1", "A1", "rating", 5.0),
        ("U1", "A2", "rating", 4.0),
        ("U2", "A1", "rating", 3.0),
        ("U3", "GONE", "rating", 1.0),
        ("U2", "A1", "rating", 5.0),
    ]
    assert events["timestamp"][0] == dt.datetime(2017, 7, 14, tzinfo=dt.UTC)
    items = lake.read_items().sort("item_id")
    assert items.select("item_id", "title", "genres").rows() == [
        ("A1", "Barnes & Noble Gift Card 'Holiday'", ["Restaurants", "Gift Card Accessories"]),
        ("A2", "Amazon.com eGift Card", ["Amazon.com"]),
        ("NEW", "Never reviewed > 5 < 10", []),
    ]
    again = CliRunner().invoke(app, ["ingest", "--events", str(folder)])  # the folder form; re-ingest is idempotent
    assert again.exit_code == 0, again.output
    assert lake.scan_events().collect().height == 5 and lake.read_items().height == 3


def test_cli_ingest_meta_alone_and_swapped_files(home, folder):
    meta = folder / "meta_Gift_Cards.json.gz"
    result = CliRunner().invoke(app, ["ingest", "--items", str(meta)])
    assert result.exit_code == 0, result.output
    lake = Lake(Settings().lake_root)
    assert lake.read_items().height == 3 and lake.event_dates() == []
    before = tree_digest(home / "lake")
    swapped = CliRunner().invoke(
        app, ["ingest", "--events", str(meta), "--items", str(folder / "Gift_Cards_5.json.gz")]
    )
    assert swapped.exit_code == 2 and "metadata file given as --events" in swapped.output
    assert tree_digest(home / "lake") == before


@pytest.mark.amazon
def test_real_gift_cards_files(gift_cards):
    data = load_dataset(gift_cards)
    events, items = data.events, data.items
    assert events.height == 2972 and events["user_id"].n_unique() == 458 and events["item_id"].n_unique() == 148
    assert items.height == 1547 and items["item_id"].n_unique() == 1547
    assert events["item_id"].is_in(items["item_id"].implode()).all()
    assert events.null_count().sum_horizontal().item() == 0
    assert (events["timestamp"].min(), events["timestamp"].max()) == (
        dt.datetime(2012, 1, 31, tzinfo=dt.UTC),
        dt.datetime(2018, 8, 22, tzinfo=dt.UTC),
    )
    titles = items["title"]
    assert not titles.str.contains("&#39;|&amp;|<").any()
    assert (titles.str.len_chars() > 0).all() and (titles == titles.str.strip_chars()).all()
    assert not items["description"].drop_nulls().str.contains(r"<[A-Za-z/]|&[a-z]+;|&#").any()
    assert items["description"].drop_nulls().len() == 805
    genres = items["genres"].explode().drop_nulls()
    assert not genres.str.contains("<").any()
    assert "Gift Cards" not in genres.to_list() and "No expiration, no fees." not in genres.to_list()
    assert set(genres) == {"Gift Card Accessories", "Starbucks", "Starbucks Gift Card 25"}


@pytest.mark.amazon
def test_real_gift_cards_land_through_the_cli(home, gift_cards):
    reviews, meta = gift_cards / "Gift_Cards_5.json.gz", gift_cards / "meta_Gift_Cards.json.gz"
    result = CliRunner().invoke(app, ["ingest", "--events", str(reviews), "--items", str(meta)])
    assert result.exit_code == 0, result.output
    lake = Lake(Settings().lake_root)
    events = lake.scan_events().collect()
    # 3 reviews repeat another one's (user, item, day, rating) with a different text: the lake keeps one of each.
    assert "2972 rows, 2969 landed, 3 duplicates" in result.output
    assert (events.height, events["user_id"].n_unique(), events["item_id"].n_unique()) == (2969, 458, 148)
    assert lake.read_items().height == 1547 and len(lake.verify_events()) == len(lake.event_dates())
