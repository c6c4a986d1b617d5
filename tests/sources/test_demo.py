"""Demo generator: the default files stay byte for byte what they were; the chunked scale path is seeded,
consistent across chunks and lands cleanly."""

from __future__ import annotations

import datetime as dt
import hashlib

import polars as pl
import pytest

from nightrec.settings import Settings
from nightrec.sources.demo import DemoSpec, write_demo_files
from nightrec.storage.lake import Lake
from nightrec.tasks import ingest

# sha256 of the default spec's files; other tests and the README's demo output depend on these exact bytes.
DEFAULT_DIGESTS = {
    "events.csv": "b4c4ac3d4e94edb9c9b0596e47281cfaf6c812083acf251b3d6d92b103e51f10",
    "items.jsonl": "3c597edb1599e2984745b951d3e822ad24b9c36f20e24fa8dc651929aacc51c9",
    "users.csv": "1e7898806701dd37538dfe1e07d95c1b668e87828539c6fa9af50e3ad8151ddc",
}
SMALL = DemoSpec(users=900, items=300, events=9_000, days=30, bad_row_fraction=0.01, seed=3)


def digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_default_output_is_unchanged(tmp_path):
    paths = write_demo_files(tmp_path, DemoSpec())
    assert {k: p.name for k, p in paths.items()} == {
        "events": "events.csv",
        "items": "items.jsonl",
        "users": "users.csv",
    }
    assert digests(tmp_path) == DEFAULT_DIGESTS


@pytest.fixture(scope="module")
def chunked(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chunked")
    return folder, write_demo_files(folder, SMALL, chunk_users=250)


def test_chunked_files_are_one_per_chunk_of_users(chunked):
    _, paths = chunked
    files = sorted(paths["events"].glob("*.csv"))
    assert [f.name for f in files] == [f"events-{i:05d}.csv" for i in range(4)]  # 250, 250, 250, 150 users
    users = pl.read_csv(paths["users"], infer_schema=False)
    assert users.height == SMALL.users and users["user_id"].n_unique() == SMALL.users
    assert users["user_id"][0] == "u00000" and users["user_id"][-1] == "u00899"
    for i, f in enumerate(files):  # each file holds only its own chunk's users
        ids = pl.read_csv(f, infer_schema=False)["user_id"].drop_nulls()
        numbers = ids.str.slice(1).cast(pl.Int64)
        assert numbers.min() >= 250 * i and numbers.max() < 250 * (i + 1)


def test_chunked_events_have_the_spec_size_and_range(chunked):
    _, paths = chunked
    events = pl.read_csv(paths["events"] / "*.csv", infer_schema=False)
    assert (
        SMALL.events <= events.height <= SMALL.events * 1.1 + SMALL.users
    )  # at least one event per user, plus bad rows
    items = pl.read_ndjson(paths["items"])
    assert set(events["item_id"].unique().to_list()) <= set(items["item_id"].to_list())
    stamps = events["timestamp"].str.to_datetime("%Y-%m-%dT%H:%M:%SZ", strict=False).drop_nulls()
    first = dt.datetime.combine(SMALL.end - dt.timedelta(days=SMALL.days - 1), dt.time())
    assert stamps.min() >= first and stamps.max() < first + dt.timedelta(days=SMALL.days)


def test_chunked_output_is_seeded_and_a_rerun_leaves_no_stale_files(tmp_path, chunked):
    folder, _ = chunked
    write_demo_files(tmp_path, SMALL, chunk_users=250)
    assert digests(tmp_path) == digests(folder)
    write_demo_files(tmp_path, SMALL, chunk_users=900)  # fewer, bigger chunks: the old files must go
    assert sorted(p.name for p in (tmp_path / "events").iterdir()) == ["events-00000.csv"]


def test_chunked_files_land_with_only_the_planted_bad_rows_quarantined(tmp_path, chunked):
    _, paths = chunked
    settings = Settings(home=tmp_path / "home")
    lake = Lake(settings.lake_root)
    now = dt.datetime.combine(SMALL.end + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    reports = [ingest.ingest_events_file(lake, f, settings, now=now) for f in sorted(paths["events"].glob("*.csv"))]
    rows, valid = sum(r.rows for r in reports), sum(r.valid for r in reports)
    quarantined = sum(r.quarantined for r in reports)
    assert quarantined == sum(int(r.rows / (1 + SMALL.bad_row_fraction) * SMALL.bad_row_fraction) for r in reports)
    assert lake.scan_events().collect().height == valid == rows - quarantined - sum(r.duplicates for r in reports)
    assert ingest.ingest_items_file(lake, paths["items"], settings, now=now).valid == SMALL.items


def test_chunk_size_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="chunk_users"):
        write_demo_files(tmp_path, SMALL, chunk_users=0)
