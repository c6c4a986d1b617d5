"""Ingest: each validation rule quarantines with its reason; a refused file is named and the lake stays as it was."""

from __future__ import annotations

import datetime as dt
import json

import polars as pl
import pytest

from nightrec.settings import Settings
from nightrec.storage.lake import Lake
from nightrec.tasks import ingest
from tests.conftest import tree_digest

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
HEADER = "user_id,item_id,timestamp,event_type,value\n"
GOOD = "u1,i1,2026-11-20T10:00:00Z,click,\nu2,i2,1795168800,purchase,9.5\n"


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(home=tmp_path / "home", max_bad_fraction=0.5)


@pytest.fixture
def lake(settings) -> Lake:
    return Lake(settings.lake_root)


def write(tmp_path, name: str, text: str | bytes):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def quarantine(lake: Lake) -> pl.DataFrame:
    return lake.read_quarantine()


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (",i9,2026-11-20,view,", "missing user_id"),
        ("u9,  ,2026-11-20,view,", "missing item_id"),
        ("u9,i9,,view,", "missing timestamp"),
        ("u9,i9,last tuesday,view,", "unparseable timestamp 'last tuesday'"),
        ("u9,i9,2031-01-01T00:00:00Z,view,", "timestamp in the future"),
        ("u9,i9,1969-07-20T20:17:00Z,view,", "timestamp before 1970-01-01"),
        ("u9,i9,2026-11-20,teleport,", "unknown event_type 'teleport'"),
        ("u9,i9,2026-11-20,rating,five", "value is not a number: 'five'"),
        ("u9,i9,2026-11-20,rating,inf", "value is not finite"),
        (f"{'u' * 300},i9,2026-11-20,view,", "user_id longer than 256 characters"),
    ],
)
def test_each_rule_quarantines_the_row_with_its_reason(tmp_path, settings, lake, row, reason):
    path = write(tmp_path, "events.csv", HEADER + GOOD + row + "\n")
    report = ingest.ingest_events_file(lake, path, settings, now=NOW)
    assert (report.rows, report.valid, report.quarantined) == (3, 2, 1)
    assert report.reasons == {reason: 1}
    bad = quarantine(lake)
    assert bad["reason"].to_list() == [reason]
    assert bad["source_file"].to_list() == [str(path)]
    assert lake.scan_events().collect().height == 2


def test_valid_rows_are_typed_utc_and_partitioned_by_event_date(tmp_path, settings, lake):
    text = HEADER + "u1,i1,2026-11-20T23:30:00-02:00,Click,\nu2,i2,1795168800,,4\nu3,i3,2026-11-19 08:00:00,view,\n"
    ingest.ingest_events_file(lake, write(tmp_path, "e.csv", text), settings, now=NOW)
    assert lake.event_dates() == [dt.date(2026, 11, 19), dt.date(2026, 11, 20), dt.date(2026, 11, 21)]
    events = lake.scan_events().collect().sort("user_id")
    assert events["timestamp"].dtype == pl.Datetime("us", "UTC")
    # -02:00 at 23:30 is 01:30 UTC the next day; a missing event_type defaults to "view"; types are lower-cased
    assert events.row(0, named=True)["timestamp"] == dt.datetime(2026, 11, 21, 1, 30, tzinfo=dt.UTC)
    assert events["event_type"].to_list() == ["click", "view", "view"]
    assert events["value"].to_list() == [None, 4.0, None]


def test_reingest_is_idempotent_and_exact_repeats_are_dropped(tmp_path, settings, lake):
    path = write(tmp_path, "e.csv", HEADER + GOOD + GOOD + "u9,i9,nope,view,\n")
    first = ingest.ingest_events_file(lake, path, settings, now=NOW)
    assert first.duplicates == 2
    before = tree_digest(lake.root)
    ingest.ingest_events_file(lake, path, settings, now=NOW)
    assert tree_digest(lake.root) == before  # same partitions, same quarantine file, byte for byte
    assert lake.scan_events().collect().height == 2


def test_a_second_file_for_the_same_day_adds_to_the_partition(tmp_path, settings, lake):
    ingest.ingest_events_file(lake, write(tmp_path, "a.csv", HEADER + GOOD), settings, now=NOW)
    later = HEADER + "u3,i3,2026-11-20T12:00:00Z,like,\n"
    ingest.ingest_events_file(lake, write(tmp_path, "b.csv", later), settings, now=NOW)
    assert sorted(lake.scan_events().collect()["user_id"].to_list()) == ["u1", "u2", "u3"]


def test_jsonl_and_parquet_inputs_land_the_same_rows(tmp_path, settings, lake):
    rows = [
        {"user_id": "u1", "item_id": "i1", "timestamp": "2026-11-20T10:00:00Z", "event_type": "click"},
        {"user_id": 7, "item_id": 8, "timestamp": 1795168800, "event_type": "view", "value": 1.5},
    ]
    jsonl = write(tmp_path, "e.jsonl", "\n".join(json.dumps(r) for r in rows))
    ingest.ingest_events_file(lake, jsonl, settings, now=NOW)
    from_json = lake.scan_events().collect().drop("date").sort("user_id")
    other = Lake(tmp_path / "other")
    parquet = tmp_path / "e.parquet"
    frame = pl.DataFrame(
        {
            "user_id": ["u1", "7"],
            "item_id": ["i1", "8"],
            "timestamp": [
                dt.datetime(2026, 11, 20, 10),
                dt.datetime.fromtimestamp(1795168800, dt.UTC).replace(tzinfo=None),
            ],
            "event_type": ["click", "view"],
            "value": [None, 1.5],
        }
    )
    frame.write_parquet(parquet)
    ingest.ingest_events_file(other, parquet, settings, now=NOW)
    assert other.scan_events().collect().drop("date").sort("user_id").equals(from_json)


def test_column_mapping_renames_source_columns(tmp_path, lake):
    settings = Settings(home=tmp_path / "h", event_columns={"user_id": "visitor", "item_id": "sku", "timestamp": "ts"})
    path = write(tmp_path, "e.csv", "visitor,sku,ts\nv1,s1,2026-11-20T10:00:00Z\n")
    ingest.ingest_events_file(lake, path, settings, now=NOW)
    assert lake.scan_events().collect()[["user_id", "item_id"]].row(0) == ("v1", "s1")


# --- refused files: one clear line naming the file, and the lake untouched ------------------------------------------
def _seed_lake(tmp_path, settings, lake):
    ingest.ingest_events_file(lake, write(tmp_path, "seed.csv", HEADER + GOOD), settings, now=NOW)
    return tree_digest(lake.root)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("e.parquet", "user_id,item_id\nu1,i1\n", "not a Parquet file"),
        ("e.csv", b"\x00\x01\x02PK\x03\x04 binary", "binary content"),
        ("e.csv", "user_id,item\nu1,i1\n", "missing required column(s) item_id, timestamp"),
        ("e.xlsx", "whatever", "unsupported file type '.xlsx'"),
        ("e.jsonl", '{"user_id": "u1", "item_id": \n', "cannot be read as JSONL"),
        ("e.csv", 'user_id,item_id,timestamp\n"u1,i1,2026-11-20\n', "cannot be read as CSV"),
        ("e.csv", HEADER, "no rows (a header only, or an empty file)"),
        ("e.jsonl", "\n\n", "no line holds a JSON object"),
    ],
)
def test_refused_files_name_the_file_and_leave_the_lake_unchanged(tmp_path, settings, lake, name, content, message):
    before = _seed_lake(tmp_path, settings, lake)
    path = write(tmp_path, name, content)
    with pytest.raises(ingest.IngestError) as err:
        ingest.ingest_events_file(lake, path, settings, now=NOW)
    assert str(path) in str(err.value)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert tree_digest(lake.root) == before


def test_too_many_bad_rows_refuses_the_file_and_writes_nothing(tmp_path, lake):
    settings = Settings(home=tmp_path / "h", max_bad_fraction=0.2)
    before = _seed_lake(tmp_path, settings, lake)
    path = write(tmp_path, "e.csv", HEADER + GOOD + "u9,i9,nope,view,\nu8,i8,nope,view,\n")
    with pytest.raises(ingest.IngestError, match=r"2 of 4 rows \(50.0%\) failed validation, above the 20.0% threshold"):
        ingest.ingest_events_file(lake, path, settings, now=NOW)
    assert tree_digest(lake.root) == before


def test_missing_file_is_refused(tmp_path, settings, lake):
    with pytest.raises(ingest.IngestError, match="no such file"):
        ingest.ingest_events_file(lake, tmp_path / "absent.csv", settings, now=NOW)


# --- catalogue ----------------------------------------------------------------------------------------------------
def test_items_keep_the_latest_version_and_parse_genres(tmp_path, settings, lake):
    first = "item_id,title,genres,updated_at\ni1,Old title,Drama|War,2026-01-01\ni2,Other,,\n"
    ingest.ingest_items_file(lake, write(tmp_path, "a.csv", first), settings, now=NOW)
    second = (
        "item_id,title,genres,updated_at,available\ni1,New title,Drama,2026-06-01,false\ni1,Stale,Drama,2025-01-01,\n"
    )
    report = ingest.ingest_items_file(lake, write(tmp_path, "b.csv", second), settings, now=NOW)
    assert report.duplicates == 1
    items = lake.read_items().sort("item_id")
    assert items["title"].to_list() == ["New title", "Other"]
    assert items["genres"].to_list() == [["Drama"], []]
    assert items["available"].to_list() == [False, None]


def test_items_without_title_are_quarantined(tmp_path, settings, lake):
    path = write(tmp_path, "i.csv", "item_id,title\ni1,A\ni2,\ni3,C\n")
    report = ingest.ingest_items_file(lake, path, settings, now=NOW)
    assert (report.valid, report.quarantined, report.reasons) == (2, 1, {"missing title": 1})
    assert quarantine(lake)["item_id"].to_list() == ["i2"]


@pytest.mark.movielens
def test_movielens_100k_lands_exactly(movielens_100k, tmp_path):
    from nightrec.sources import movielens

    settings = Settings(home=tmp_path / "h")
    lake = Lake(settings.lake_root)
    data = movielens.load(movielens_100k)
    ingest.ingest_items_frame(lake, ingest.as_text_frame(data.items), settings, "ml-100k")
    report = ingest.ingest_events_frame(lake, ingest.as_text_frame(data.events), settings, "ml-100k")
    events = lake.scan_events().collect()
    assert (report.quarantined, events.height) == (0, 100_000)
    assert (events["user_id"].n_unique(), events["item_id"].n_unique(), lake.read_items().height) == (943, 1682, 1682)


# --- robustness found by the property tests -------------------------------------------------------------------------
def test_jsonl_with_a_broken_line_and_changing_types_quarantines_only_those_lines(tmp_path, lake):
    settings = Settings(home=tmp_path / "home", max_bad_fraction=1.0)
    lines = [
        '{"user_id": "u1", "item_id": "i1", "timestamp": "2026-11-20T10:00:00Z"}',
        '{"user_id": {"id": 7}, "item_id": "i2", "timestamp": 1795168800, "value": [1, 2]}',
        '["not", "an", "object"]',
        '{"user_id": 9, "item_id": "i3", "timestamp": "2026-11-20T11:00:00Z", "meta": {"os": "ios"}}',
        '{"user_id": "u4", "item_id": "i4", "timest',  # a writer killed mid-line
        '{"user_id": ' + "[" * 100_000 + "]" * 100_000 + ', "item_id": "i5", "timestamp": "2026-11-20"}',
    ]
    report = ingest.ingest_events_file(lake, write(tmp_path, "e.jsonl", "\n".join(lines)), settings, now=NOW)
    assert (report.rows, report.valid, report.quarantined) == (6, 2, 4)
    assert report.reasons == {
        "line 3 is not a JSON object": 1,
        "line 6 is nested too deeply": 1,
        "line 5 is not valid JSON (Invalid control character at)": 1,
        "value is not a number: '[1, 2]'": 1,
    }
    assert sorted(lake.scan_events().collect()["user_id"].to_list()) == ["9", "u1"]
    assert quarantine(lake).filter(pl.col("reason").str.starts_with("line 5"))["_raw_line"].to_list() == [lines[4]]


def test_source_columns_named_like_ours_are_kept_apart(tmp_path, settings, lake):
    text = "user_id,item_id,timestamp,reason,_ts,source_file\nu1,i1,2026-11-20T10:00:00Z,r,t,s\nu2,,2026-11-20,r,t,s\n"
    report = ingest.ingest_events_file(lake, write(tmp_path, "e.csv", text), settings, now=NOW)
    assert (report.valid, report.reasons) == (1, {"missing item_id": 1})
    bad = quarantine(lake)
    assert bad.select("reason", "reason_source", "_ts_source", "source_file_source").row(0) == (
        "missing item_id",
        "r",
        "t",
        "s",
    )


def test_a_stray_nul_quarantines_its_row_but_a_binary_file_is_refused(tmp_path, settings, lake):
    text = HEADER + GOOD + "u\x009,i9,2026-11-20,view,\n" + "u5,i5,2026-11-20,view,\n" * 10
    report = ingest.ingest_events_file(lake, write(tmp_path, "e.csv", text), settings, now=NOW)
    assert report.reasons == {"user_id contains control characters": 1}
    with pytest.raises(ingest.IngestError, match="binary content"):
        ingest.ingest_events_file(lake, write(tmp_path, "f.csv", text.encode("utf-16")), settings, now=NOW)


def test_a_refusal_quoting_the_data_stays_one_line(tmp_path, lake):
    settings = Settings(home=tmp_path / "h", max_bad_fraction=0.0)
    path = write(tmp_path, "e.csv", HEADER + 'u1,i1,"12:00\nnoon\u2028x",view,\n')
    with pytest.raises(ingest.IngestError) as err:
        ingest.ingest_events_file(lake, path, settings, now=NOW)
    assert "\n" not in str(err.value) and "\u2028" not in str(err.value)
    assert "unparseable timestamp '12:00\\nnoon\\u2028x'" in str(err.value)


# --- ids stored as numbers ----------------------------------------------------------------------------------------
def test_float_ids_from_parquet_become_integers_or_are_quarantined(tmp_path, settings, lake):
    """Parquet writers store numeric ids as floats when a column has a null: 1.0 is the id "1"; 2.5 and NaN are
    no id at all (before: "1.0", "2.5" and "NaN" landed as ids)."""
    frame = pl.DataFrame(
        {
            "user_id": [1.0, 2.5, float("nan"), 4.0, 1e300],
            "item_id": [10.0, 11.0, 12.0, float("inf"), 13.0],
            "timestamp": ["2026-11-20T10:00:00Z"] * 5,
            "value": [1.5, 2.0, 3.0, 4.0, 5.0],  # not an id: stays a float
        }
    )
    path = tmp_path / "e.parquet"
    frame.write_parquet(path)
    settings = Settings(home=settings.home, max_bad_fraction=1.0)
    report = ingest.ingest_events_file(lake, path, settings, now=NOW)
    assert (report.rows, report.valid, report.quarantined) == (5, 1, 4)
    landed = lake.scan_events().collect()
    assert landed.select("user_id", "item_id", "value").rows() == [("1", "10", 1.5)]
    bad = quarantine(lake).sort("user_id")
    assert sorted(bad["reason"]) == [
        "item_id is a number that is not an integer: inf",
        "user_id is a number that is not an integer: 1e+300",
        "user_id is a number that is not an integer: 2.5",
        "user_id is a number that is not an integer: NaN",
    ]


def test_float_item_ids_in_a_parquet_catalogue_become_integers(tmp_path, settings, lake):
    path = tmp_path / "items.parquet"
    pl.DataFrame({"item_id": [10.0, 10.5], "title": ["Ten", "Half"]}).write_parquet(path)
    report = ingest.ingest_items_file(lake, path, Settings(home=settings.home, max_bad_fraction=1.0), now=NOW)
    assert (report.valid, report.quarantined) == (1, 1)
    assert lake.read_items()["item_id"].to_list() == ["10"]


# --- users --------------------------------------------------------------------------------------------------------
def test_a_header_only_users_file_is_refused_and_adds_no_columns(tmp_path, lake):
    ingest.ingest_users_file(lake, write(tmp_path, "users.csv", "user_id,age\nu1,31\n"))
    before = tree_digest(lake.root)
    header_only = write(tmp_path, "more.csv", "user_id,gender,occupation,zip,city\n")
    with pytest.raises(ingest.IngestError, match="no user rows"):
        ingest.ingest_users_file(lake, header_only)
    assert tree_digest(lake.root) == before
    assert lake.read_users().columns == ["user_id", "age"]
