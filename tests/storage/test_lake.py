"""Lake: paths never leave the lake, a day is replaced in one commit, and a damaged events file is caught naming it."""

from __future__ import annotations

import ast
import datetime as dt
import os
from pathlib import Path

import polars as pl
import pytest
from prefect.cache_policies import NO_CACHE

from nightrec.settings import Settings
from nightrec.storage import atomic, delta
from nightrec.storage.lake import CorruptPartitionError, Lake, UnsafePathError
from nightrec.tasks import ingest
from tests.conftest import REPO, tree_digest

DAY = dt.date(2026, 11, 20)
NOW = dt.datetime(2026, 11, 22, 12, tzinfo=dt.UTC)


def events(n: int, day: dt.date = DAY) -> pl.DataFrame:
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)
    return pl.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(n)],
            "item_id": [f"i{i % 7}" for i in range(n)],
            "timestamp": [start + dt.timedelta(seconds=i) for i in range(n)],
            "event_type": ["view"] * n,
            "value": [float(i) for i in range(n)],
        }
    ).with_columns(pl.col("timestamp").dt.cast_time_unit("us"))


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(tmp_path / "home" / "lake")


# --- paths --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "batch_id", ["../../etc/passwd", "/etc/passwd", "..", ".", "", "a/b", "a\\b", "a\x00b", "../../../../tmp/x"]
)
def test_unsafe_batch_ids_are_refused(lake, batch_id):
    with pytest.raises(UnsafePathError):
        lake.append_quarantine(DAY, pl.DataFrame({"reason": ["x"]}), batch_id)
    assert not lake.root.exists() or not any(lake.root.rglob("*.parquet"))


@pytest.mark.parametrize("key", ["../../etc", "2026-11-20/../../x", "/etc", None, 20261120])
def test_partition_keys_must_be_dates(lake, key):
    for helper in (lake.events_partition, lake.quarantine_partition, lake.recommendations_partition):
        with pytest.raises(UnsafePathError, match="must be a date"):
            helper(key)


def test_a_symlink_out_of_the_lake_is_refused(tmp_path, lake):
    outside = tmp_path / "outside"
    outside.mkdir()
    lake.root.mkdir(parents=True)
    (lake.root / "events").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="outside the lake"):
        lake.events_partition(DAY)


def test_hostile_ids_stay_data_and_never_become_paths(tmp_path):
    """Ids that look like paths land as values (or are quarantined); no file appears outside the home."""
    settings = Settings(home=tmp_path / "home", max_bad_fraction=1.0)
    lake = Lake(settings.lake_root)
    hostile = [
        "../../etc/passwd",
        "/etc/shadow",
        "..",
        "C:\\Windows",
        "~root",
        "a\x00b",
        "%2e%2e%2f",
        "date=2026-01-01",
    ]
    rows = "".join(f'"{h}","{h}",2026-11-20T10:00:00Z,view,\n' for h in hostile)
    path = tmp_path / "e.csv"
    path.write_bytes(("user_id,item_id,timestamp,event_type,value\n" + rows).encode())
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(settings.home)}
    report = ingest.ingest_events_file(lake, path, settings, now=NOW)
    after = {p for p in tmp_path.rglob("*") if not p.is_relative_to(settings.home)}
    assert after == before
    assert (report.valid, report.quarantined) == (len(hostile) - 1, 1)  # the NUL one: control characters
    landed = set(lake.scan_events().collect()["user_id"].to_list())
    assert "../../etc/passwd" in landed and "/etc/shadow" in landed
    files = {str(p.relative_to(lake.root)) for p in lake.root.rglob("*") if p.is_file()} - {".reads.lock"}
    allowed = (
        "events/_delta_log/",
        "events/date=2026-11-20/part-",
        "quarantine/_delta_log/",
        "quarantine/date=2026-11-22/",
    )
    assert files and all(f.startswith(allowed) for f in files), files


def test_no_pickle_loading_in_the_package():
    """Nothing under nightrec/ unpickles: no pickle/joblib/dill loads, torch.load only with weights_only=True,
    numpy loads without allow_pickle, no pandas read_pickle."""
    offenders = []
    for source in sorted((REPO / "nightrec").rglob("*.py")):
        tree = ast.parse(source.read_text(), filename=str(source))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in {"pickle", "cPickle", "dill", "cloudpickle", "joblib"} for n in names):
                    offenders.append(f"{source}:{node.lineno} imports a pickle library")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                keywords = {k.arg: k.value for k in node.keywords}
                name = node.func.attr
                if name == "read_pickle":
                    offenders.append(f"{source}:{node.lineno} read_pickle")
                if name == "load" and getattr(node.func.value, "id", "") == "torch":
                    weights_only = keywords.get("weights_only")
                    if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                        offenders.append(f"{source}:{node.lineno} torch.load without weights_only=True")
                allow = keywords.get("allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                    offenders.append(f"{source}:{node.lineno} allow_pickle")
    assert offenders == []


def _our_prefect_objects():
    """Every Prefect task and flow the package defines (the stages, the shards, the nightly and backfill flows)."""
    from prefect import Flow, Task

    from nightrec.flows import nightly, scaleout, stages

    return [
        obj for module in (stages, scaleout, nightly) for obj in vars(module).values() if isinstance(obj, Task | Flow)
    ]


def test_no_prefect_task_or_flow_persists_a_result():
    """A persisted Prefect result names its own serializer (cloudpickle by default) and runs code when read back:
    none of ours persists one, caches by a Prefect key, or names a pickle serializer."""
    from prefect import Task

    found = _our_prefect_objects()
    assert {o.name for o in found} >= {"ingest", "train", "publish", "publish-shard", "nightly", "backfill"}
    for obj in found:
        assert obj.persist_result is False, f"{obj.name} persists its result"
        assert "pickle" not in repr(obj.result_serializer).lower(), obj.name
        if isinstance(obj, Task):
            assert obj.cache_key_fn is None and obj.cache_policy in (None, NO_CACHE), f"{obj.name} caches in Prefect"
        else:  # a failed flow's exception is written whatever persist_result says: as JSON
            assert obj.result_serializer == "json", obj.name


def test_the_prefect_defaults_we_configure_do_not_pickle(home):
    """The environment the CLI exports (apply_environment) turns Prefect's own persistence and pickle default off,
    even where the user's environment turned them on."""
    from prefect.settings import Settings as PrefectSettings

    from nightrec.settings import NO_PICKLE_PREFECT, apply_environment

    saved = dict(os.environ)
    try:
        for key in NO_PICKLE_PREFECT:
            os.environ.pop(key, None)
        assert PrefectSettings().results.default_serializer == "pickle"  # what we are protecting against
        os.environ["PREFECT_RESULTS_PERSIST_BY_DEFAULT"] = "true"
        apply_environment(Settings())
        prefect = PrefectSettings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert prefect.results.default_serializer == "json"
    assert prefect.results.persist_by_default is False and prefect.tasks.default_persist_result is False


# --- integrity ----------------------------------------------------------------------------------------------------
def _day_files(lake: Lake, day: dt.date) -> list[Path]:
    return sorted(lake.events_partition(day).glob("part-*.parquet"))


def test_a_day_is_written_as_one_commit_of_one_file(lake):
    lake.write_events_partition(DAY, events(50))
    table = delta.open_table(lake.events_uri)
    assert table.version() == 1  # 0 created the table with its schema version
    assert delta.schema_version(table) == 1
    assert lake.scan_events().collect().height == 50
    assert lake.verify_events(deep=True) == [
        f"{lake.events_uri}/{_day_files(lake, DAY)[0].relative_to(lake.events_dir)}"
    ]
    assert not [p for p in lake.root.iterdir() if p.name.startswith(".staging")], "staging left behind"


def test_a_reingest_of_a_day_leaves_exactly_that_days_rows_once(tmp_path, lake):
    """Through the ingest: the same file twice, then a file overlapping it and reaching into the next day."""
    settings = Settings(home=tmp_path / "home")
    header = "user_id,item_id,timestamp,event_type,value\n"
    first = tmp_path / "a.csv"
    first.write_text(header + "u1,i1,2026-11-20T10:00:00Z,view,\nu2,i2,2026-11-20T11:00:00Z,view,\n")
    second = tmp_path / "b.csv"
    second.write_text(header + "u2,i2,2026-11-20T11:00:00Z,view,\nu3,i3,2026-11-21T09:00:00Z,view,\n")
    ingest.ingest_events_file(lake, first, settings, now=NOW)
    version = delta.open_table(lake.events_uri).version()
    ingest.ingest_events_file(lake, first, settings, now=NOW)
    assert delta.open_table(lake.events_uri).version() == version, "an unchanged day was rewritten"
    ingest.ingest_events_file(lake, second, settings, now=NOW)
    table = delta.open_table(lake.events_uri)
    assert table.version() == version + 1, "both days of one file land in ONE commit"
    assert table.history(1)[0]["operationParameters"]["mode"] == "Overwrite"
    rows = lake.scan_events().collect().sort("user_id")
    assert rows.select("user_id", "date").rows() == [("u1", DAY), ("u2", DAY), ("u3", DAY + dt.timedelta(days=1))]
    assert len(_day_files(lake, DAY)) >= 1 and len(lake.verify_events()) == 2  # one live file per day


def test_rewriting_a_day_replaces_it_and_leaves_the_other_days(lake):
    other = DAY + dt.timedelta(days=1)
    lake.write_events_days([(DAY, events(50)), (other, events(5, other))])
    lake.write_events_partition(DAY, events(20))
    assert lake.read_events_partition(DAY).height == 20
    assert lake.read_events_partition(other).height == 5
    # Time travel: the version before the rewrite still has the old day (until VACUUM removes it).
    old = delta.open_table(lake.events_uri, version=1)
    assert pl.read_delta(old).filter(pl.col("date") == DAY).height == 50


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte_in_the_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_the_footer_magic(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-4] + b"XXXX")


def _delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(
    ("damage", "message", "cheap"),
    [
        (_truncate, "truncated or replaced", True),
        (_delete, "missing", True),
        (_drop_the_footer_magic, "corrupted Parquet", True),
        (_flip_a_byte_in_the_middle, "corrupted Parquet", False),
    ],
)
def test_damaged_files_are_named_when_read(lake, damage, message, cheap):
    lake.write_events_partition(DAY, events(5000))
    lake.write_events_partition(DAY + dt.timedelta(days=1), events(5, DAY + dt.timedelta(days=1)))
    damaged = _day_files(lake, DAY)[0]
    damage(damaged)
    with pytest.raises(CorruptPartitionError, match=message) as err:
        lake.verify_events(deep=True)
    assert damaged.name in str(err.value)
    if cheap:  # size, footer and rows are checked on every scan; every page's checksum only by verify_events
        with pytest.raises(CorruptPartitionError, match=message):
            lake.scan_events()
        with pytest.raises(CorruptPartitionError):
            lake.read_events_partition(DAY)
    # The healthy neighbour still reads on its own.
    assert lake.scan_events(since=DAY + dt.timedelta(days=1)).collect().height == 5


def test_ingest_refuses_to_merge_into_a_damaged_day_and_commits_nothing(tmp_path, lake):
    settings = Settings(home=tmp_path / "home", max_bad_fraction=1.0)
    lake.write_events_partition(DAY, events(100))
    damaged = _day_files(lake, DAY)[0]
    _truncate(damaged)
    before = tree_digest(lake.events_dir / "_delta_log")
    path = tmp_path / "e.csv"
    path.write_text("user_id,item_id,timestamp\nu1,i1,2026-11-20T10:00:00Z\n")
    with pytest.raises(CorruptPartitionError, match=damaged.name):
        ingest.ingest_events_file(lake, path, settings, now=NOW)
    assert tree_digest(lake.events_dir / "_delta_log") == before


def test_a_crash_before_the_commit_leaves_the_old_day(lake, monkeypatch):
    lake.write_events_partition(DAY, events(10))
    before = tree_digest(lake.events_dir / "_delta_log")

    def crash(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(delta, "commit_parts", crash)
    with pytest.raises(OSError, match="disk full"):
        lake.write_events_partition(DAY, events(99))
    assert tree_digest(lake.events_dir / "_delta_log") == before
    assert lake.scan_events().collect().height == 10


def test_quarantine_keeps_every_source_column_reason_and_file_once_per_batch(lake):
    rows = pl.DataFrame({"user_id": ["u1"], "when": ["yesterday"], "reason": ["bad"], "source_file": ["a.csv"]})
    lake.append_quarantine(DAY, rows, "events-1")
    lake.append_quarantine(DAY, rows, "events-1")  # a re-ingest of the same batch
    other = pl.DataFrame({"item_id": ["i1"], "reason": ["worse"], "source_file": ["b.csv"]})
    lake.append_quarantine(DAY, other, "items-2")
    found = lake.read_quarantine().sort("batch_id")
    assert found.select("reason", "source_file", "batch_id").rows() == [
        ("bad", "a.csv", "events-1"),
        ("worse", "b.csv", "items-2"),
    ]
    assert found["when"].to_list() == ["yesterday", None] and found["item_id"].to_list() == [None, "i1"]


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 << 20))
    assert atomic.sha256_file(path, chunk=1 << 16) == hashlib.sha256(path.read_bytes()).hexdigest()
