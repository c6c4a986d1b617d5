"""Property-based tests of ingest: whatever bytes arrive, ingest either refuses the file (IngestError naming it, the
lake byte for byte as it was) or lands every row as valid or quarantined with a reason, and the counts add up."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import os
import tempfile
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nightrec.settings import Settings
from nightrec.storage.lake import Lake
from nightrec.tasks import ingest
from tests.conftest import tree_digest

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
LATEST = NOW + dt.timedelta(hours=24)
# NIGHTREC_PROPERTY_EXAMPLES=500 for a deeper local run; the suite keeps 60 so the file stays near 35 s.
PROPERTY = settings(
    derandomize=True,
    max_examples=int(os.environ.get("NIGHTREC_PROPERTY_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
SEED_CSV = "user_id,item_id,timestamp,event_type,value\nu1,i1,2026-11-20T10:00:00Z,click,\nu2,i2,1795168800,like,2\n"

# --- strategies ---------------------------------------------------------------------------------------------------
awkward_chars = st.sampled_from(
    ["\x00", "\x01", "\x1f", "\x7f", "\t", "\n", "\r", '"', "'", ",", ";", "|", "\\", "/", "..", " ", "\u00a0"]
    + ["\u202e", "\u200f", "\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627", "\U0001f600", "\ufeff"]
    + ["\u2028", "é", "ß", "\u0301", "{", "}", "[", "]", "%s", "${x}", "NULL", "null", "None", "NaN"]
)
free_text = st.lists(st.one_of(awkward_chars, st.text(max_size=4)), max_size=5).map("".join)
ids = st.one_of(
    st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True),
    st.sampled_from(["../../etc/passwd", "/etc/passwd", "..", ".", "a/b", "C:\\x", "~root", "a\x00b", "x" * 300]),
    st.integers(-(2**70), 2**70).map(str),
    free_text,
)
timestamps = st.one_of(
    st.datetimes(dt.datetime(1, 1, 1), dt.datetime(9999, 12, 31), timezones=st.just(dt.UTC)).map(
        lambda t: t.isoformat()
    ),
    st.datetimes(dt.datetime(2025, 1, 1), dt.datetime(2026, 11, 23)).map(lambda t: t.strftime("%Y-%m-%d %H:%M:%S")),
    st.integers(-(2**40), 2**45).map(str),  # epoch seconds, negative ones, and milliseconds (far future)
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["2026-11-20", "2026-02-30T00:00:00Z", "2026-11-20T25:00:00Z", "yesterday", "", "  ", "1e9"]),
    free_text,
)
values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(2**80), 2**80).map(str),
    st.sampled_from(["", "nan", "-inf", "1e400", "4.5", " 3 ", "five", "0x10"]),
    free_text,
)
event_types = st.one_of(st.sampled_from(["view", "CLICK", " purchase ", "rating", "teleport", ""]), free_text)
EXTRA_COLUMNS = ["reason", "source_file", "_ts", "note", "value_2"]
# Mostly plausible values, so that most examples land valid rows beside the bad ones (one_of picks branches evenly).
good_ids = st.from_regex(r"[a-z][a-z0-9_-]{0,6}", fullmatch=True)
good_timestamps = st.one_of(
    st.datetimes(dt.datetime(2026, 11, 1), dt.datetime(2026, 11, 22)).map(lambda t: t.isoformat() + "Z"),
    st.integers(1_793_000_000, 1_795_300_000).map(str),
)
good_values = st.one_of(st.just(""), st.floats(-1e6, 1e6).map(repr))
good_event_types = st.sampled_from(["view", "click", "Like", "purchase", ""])


def mostly(good, bad):
    return st.one_of(good, good, good, bad)


FIELDS = {
    "user_id": mostly(good_ids, ids),
    "item_id": mostly(good_ids, ids),
    "timestamp": mostly(good_timestamps, timestamps),
    "event_type": mostly(good_event_types, event_types),
    "value": mostly(good_values, values),
}


@st.composite
def event_rows(draw, max_rows: int = 12) -> tuple[list[str], list[dict[str, str | None]]]:
    """Column names (some required ones may be missing, extra and reserved names may appear) and text rows."""
    columns = ["user_id", "item_id", "timestamp"]
    columns = [c for c in columns if draw(st.integers(0, 19)) > 0]  # a required column is sometimes missing
    columns += draw(st.lists(st.sampled_from(["event_type", "value", *EXTRA_COLUMNS]), unique=True, max_size=4))
    columns = draw(st.permutations(columns))
    row = st.fixed_dictionaries({c: st.one_of(st.none(), FIELDS.get(c, free_text)) for c in columns})
    rows = draw(st.lists(row, max_size=max_rows))
    if rows and draw(st.booleans()):  # exact repeats
        rows += draw(st.lists(st.sampled_from(rows), max_size=4))
    return columns, rows


def csv_bytes(columns, rows) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else row[c] for c in columns])
    return out.getvalue().encode("utf-8", errors="surrogatepass")


def jsonl_bytes(rows, nested) -> bytes:
    lines = []
    for i, row in enumerate(rows):
        if nested and i % 2:
            row = {**row, "meta": {"device": {"os": row.get("user_id")}, "tags": [1, "two", None]}}
        lines.append(json.dumps(row, ensure_ascii=False))
    return "\n".join(lines).encode("utf-8", errors="surrogatepass")


def corrupt(data: bytes, how: str, at: float) -> bytes:
    cut = int(len(data) * at)
    return {
        "none": data,
        "truncate": data[:cut],
        "garbage_tail": data + bytes(range(256)),
        "garbage_middle": data[:cut] + b"\xff\xfe\x00\x80" + data[cut:],
        "empty": b"",
    }[how]


# --- the property -------------------------------------------------------------------------------------------------
def check_ingest(path: Path, lake: Lake, cfg: Settings) -> ingest.IngestReport | None:
    """Ingest ``path`` and assert every invariant; None when the file was refused."""
    before = tree_digest(lake.root)
    rows_before = lake.scan_events().collect().height
    try:
        report = ingest.ingest_events_file(lake, path, cfg, now=NOW)
    except ingest.IngestError as err:
        message = str(err)
        assert str(path) in message and message.splitlines() == [message], message
        assert tree_digest(lake.root) == before, "a refused file changed the lake"
        event("refused: " + message.replace(str(path), "")[:70])
        return None
    assert report.rows == report.valid + report.duplicates + report.quarantined, report
    event(
        "landed: "
        + (
            "valid and quarantined"
            if report.valid and report.quarantined
            else "valid only"
            if report.valid
            else "quarantined only"
            if report.quarantined
            else "no rows"
        )
    )
    assert sum(report.reasons.values()) == report.quarantined
    assert min(report.valid, report.duplicates, report.quarantined) >= 0
    events = lake.scan_events().collect()
    assert events.height == rows_before + report.valid, "the lake grew by something other than the valid rows"
    assert_events_are_clean(events, cfg)
    assert not list(lake.root.rglob("*.tmp")) and not list(lake.root.rglob(".staging-*")), "staging left behind"
    if report.quarantined:
        bad = lake.read_quarantine()
        assert bad.height == report.quarantined and bad["reason"].null_count() == 0
    return report


def assert_events_are_clean(events: pl.DataFrame, cfg: Settings) -> None:
    for column in ("user_id", "item_id"):
        assert events[column].null_count() == 0
        assert (events[column].str.len_chars() > 0).all()
        assert not events[column].str.contains(r"[\x00-\x1f]").any()
    if events.height:
        assert events["timestamp"].min() >= dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        assert events["timestamp"].max() <= LATEST
        assert set(events["event_type"].to_list()) <= set(cfg.event_types)
        assert all(v is None or math.isfinite(v) for v in events["value"].to_list())
        assert (events["timestamp"].dt.date() == events["date"]).all(), "a row sits in the wrong day partition"
    assert events.drop("date").is_duplicated().sum() == 0


def fresh(folder: Path, max_bad_fraction: float, seeded: bool) -> tuple[Lake, Settings]:
    cfg = Settings(home=folder / "home", max_bad_fraction=max_bad_fraction)
    lake = Lake(cfg.lake_root)
    if seeded:  # so that "unchanged" is checked against a lake that holds something
        seed = folder / "seed.csv"
        seed.write_text(SEED_CSV)
        ingest.ingest_events_file(lake, seed, cfg, now=NOW)
    return lake, cfg


bad_fractions = st.sampled_from([0.0, 0.5, 1.0, 1.0])
corruptions = st.sampled_from(["none"] * 12 + ["truncate", "garbage_tail", "garbage_middle", "empty"])


@PROPERTY
@given(data=event_rows(), fraction=bad_fractions, how=corruptions, at=st.floats(0, 1), seeded=st.booleans())
def test_any_csv_lands_or_is_refused_cleanly(data, fraction, how, at, seeded):
    columns, rows = data
    with tempfile.TemporaryDirectory() as tmp:
        lake, cfg = fresh(Path(tmp), fraction, seeded)
        path = Path(tmp) / "events.csv"
        path.write_bytes(corrupt(csv_bytes(columns, rows), how, at))
        report = check_ingest(path, lake, cfg)
        clean = how == "none" and {"user_id", "item_id", "timestamp"} <= set(columns)
        if clean and report is not None:
            # Quotes, separators and newlines inside fields survive: one report row per written row.
            assert report.rows == len(rows)
        if report is not None:  # ingesting the same file again changes nothing, byte for byte
            after = tree_digest(lake.root)
            again = ingest.ingest_events_file(lake, path, cfg, now=NOW)
            assert tree_digest(lake.root) == after and again.valid == report.valid


@PROPERTY
@given(data=event_rows(), fraction=bad_fractions, how=corruptions, at=st.floats(0, 1), nested=st.booleans())
def test_any_jsonl_lands_or_is_refused_cleanly(data, fraction, how, at, nested):
    _, rows = data
    with tempfile.TemporaryDirectory() as tmp:
        lake, cfg = fresh(Path(tmp), fraction, seeded=True)
        path = Path(tmp) / "events.jsonl"
        path.write_bytes(corrupt(jsonl_bytes(rows, nested), how, at))
        check_ingest(path, lake, cfg)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    ids,
    timestamps,
)


@PROPERTY
@given(
    rows=st.lists(
        st.dictionaries(
            st.sampled_from(["user_id", "item_id", "timestamp", "event_type", "value", "extra"]),
            st.one_of(
                json_scalars, st.lists(json_scalars, max_size=2), st.dictionaries(st.text(max_size=3), json_scalars)
            ),
        ),
        max_size=10,
    )
)
def test_jsonl_with_wrong_types_never_crashes(rows):
    """Numbers, booleans, lists and objects where text is expected: rows land, are quarantined, or file refused."""
    with tempfile.TemporaryDirectory() as tmp:
        lake, cfg = fresh(Path(tmp), 1.0, seeded=True)
        path = Path(tmp) / "events.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        check_ingest(path, lake, cfg)


parquet_columns = {
    "user_id": st.sampled_from([pa.string(), pa.int64(), pa.float64()]),
    "item_id": st.sampled_from([pa.string(), pa.int32()]),
    "timestamp": st.sampled_from(
        [pa.string(), pa.int64(), pa.float64(), pa.timestamp("us"), pa.timestamp("ms", "UTC")]
    ),
    "value": st.sampled_from([pa.float64(), pa.string(), pa.int64()]),
}


@st.composite
def parquet_tables(draw) -> pa.Table:
    n = draw(st.integers(0, 8))
    arrays = {}
    for name, type_strategy in parquet_columns.items():
        kind = draw(type_strategy)
        if pa.types.is_string(kind):
            cells = st.one_of(st.none(), FIELDS.get(name, ids))
        elif pa.types.is_timestamp(kind):
            cells = st.one_of(st.none(), st.datetimes(dt.datetime(1965, 1, 1), dt.datetime(2027, 6, 1)))
        elif pa.types.is_floating(kind):
            cells = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))
        else:
            bits = kind.bit_width - 1
            cells = st.one_of(st.none(), st.integers(-(2**bits), 2**bits - 1))
        arrays[name] = pa.array(draw(st.lists(cells, min_size=n, max_size=n)), type=kind)
    return pa.table(arrays)


@PROPERTY
@given(table=parquet_tables(), how=corruptions, at=st.floats(0, 1))
def test_any_parquet_lands_or_is_refused_cleanly(table, how, at):
    with tempfile.TemporaryDirectory() as tmp:
        lake, cfg = fresh(Path(tmp), 1.0, seeded=True)
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        path = Path(tmp) / "events.parquet"
        path.write_bytes(corrupt(buffer.getvalue(), how, at))
        report = check_ingest(path, lake, cfg)
        if how == "none" and table.num_rows:
            assert report is not None and report.rows == table.num_rows
        if how == "none" and not table.num_rows:
            assert report is None  # no rows: refused


@PROPERTY
@given(blob=st.binary(max_size=300), suffix=st.sampled_from([".csv", ".jsonl", ".parquet", ".tsv", ".json"]))
def test_binary_garbage_never_crashes(blob, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        lake, cfg = fresh(Path(tmp), 1.0, seeded=True)
        path = Path(tmp) / f"garbage{suffix}"
        path.write_bytes(blob)
        check_ingest(path, lake, cfg)


@PROPERTY
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {"item_id": st.one_of(st.none(), ids), "title": st.one_of(st.none(), free_text), "genres": free_text}
        )
        | st.fixed_dictionaries({"item_id": ids, "updated_at": timestamps, "available": free_text}),
        max_size=10,
    ),
    fmt=st.sampled_from(["csv", "jsonl"]),
)
def test_any_catalogue_lands_or_is_refused_cleanly(rows, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Settings(home=Path(tmp) / "home", max_bad_fraction=1.0)
        lake = Lake(cfg.lake_root)
        path = Path(tmp) / f"items.{fmt}"
        columns = sorted({k for r in rows for k in r}) or ["item_id", "title"]
        full = [{c: r.get(c) for c in columns} for r in rows]
        path.write_bytes(csv_bytes(columns, full) if fmt == "csv" else jsonl_bytes(full, nested=False))
        before = tree_digest(lake.root)
        try:
            report = ingest.ingest_items_file(lake, path, cfg, now=NOW)
        except ingest.IngestError as err:
            assert str(path) in str(err) and tree_digest(lake.root) == before
            return
        assert report.rows == report.valid + report.duplicates + report.quarantined
        items = lake.read_items()
        assert items.height == report.valid and items["item_id"].n_unique() == items.height
        assert not items["item_id"].str.contains(r"[\x00-\x1f]").any()
