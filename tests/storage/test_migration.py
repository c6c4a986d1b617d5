"""A lake in the old Parquet layout is converted into the Delta tables the first time today's code opens it; nothing
stored is lost, a crash mid-way is finished by the next open, and the old files stay aside."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap

import polars as pl
import pytest

from nightrec.lists import read_lists
from nightrec.settings import Settings
from nightrec.storage import delta, legacy, publication
from nightrec.storage.lake import Lake
from nightrec.tasks import ingest
from tests.conftest import REPO
from tests.storage import old_layout
from tests.storage.old_layout import DAYS, RUN_DATES, write_old_lake

OLD_COMMIT = "2f074c6"  # the last commit with the Parquet layout's writers


def test_an_old_layout_lake_is_converted_on_first_open(tmp_path):
    root = tmp_path / "lake"
    expected = write_old_lake(root)
    lake = Lake(root)
    assert lake.event_dates() == DAYS and lake.scan_events().collect().height == expected["events"]
    assert lake.read_events_partition(DAYS[1])["user_id"].to_list() == ["u1", "u4"]
    assert lake.read_quarantine()["reason"].to_list() == ["unparseable timestamp"]
    assert lake.read_items().height == expected["items"] and lake.read_users()["age"].to_list() == ["31", "47"]
    assert lake.published_dates() == RUN_DATES
    newest = lake.read_latest_pointer()
    assert {k: newest[k] for k in ("date", "mlflow_run_id", "model_version")} == expected["latest"]
    columns = ["user_id", "rank", "item_id", "score", "reasons", "run_date", "model_version"]
    for n, day in enumerate(RUN_DATES, start=1):
        old = pl.from_arrow(old_layout.lists_of(day, str(n))).sort("user_id", "rank")
        assert read_lists(root, date=day).select(columns).equals(old.select(columns))
    assert (root / "embeddings" / "items" / "keep.txt").read_text() == "cache"
    for table in legacy.TABLES:  # the old files, kept aside, and each table's marker
        assert (root / legacy.LEGACY_DIR / table).is_dir() and (root / legacy.LEGACY_DIR / f"{table}.migrated").exists()
    assert not (root / "recommendations" / "LATEST").exists()

    versions = {t: delta.open_table(lake.table_uri(t)).version() for t in legacy.TABLES}
    again = Lake(root)  # a second open converts nothing
    assert {t: delta.open_table(again.table_uri(t)).version() for t in legacy.TABLES} == versions


def test_a_crash_mid_migration_is_finished_by_the_next_open(tmp_path, monkeypatch):
    root = tmp_path / "lake"
    write_old_lake(root)

    def crash(lake, old):
        raise OSError("power cut")

    monkeypatch.setitem(legacy._CONVERTERS, "recommendations", crash)
    with pytest.raises(OSError, match="power cut"):
        Lake(root)
    monkeypatch.undo()
    lake = Lake(root)
    assert lake.published_dates() == RUN_DATES and publication.read_day(lake, RUN_DATES[0]).num_rows == 8
    assert lake.scan_events().collect().height == 5  # converted once, before the crash; not again


def test_the_converted_lake_takes_new_ingests(tmp_path):
    root = tmp_path / "home" / "lake"
    write_old_lake(root)
    settings = Settings(home=tmp_path / "home")
    lake = Lake(settings.lake_root)
    path = tmp_path / "e.csv"
    path.write_text("user_id,item_id,timestamp\nu1,i0,2026-02-27T09:00:00Z\nu7,i3,2026-02-27T10:00:00Z\n")
    report = ingest.ingest_events_file(lake, path, settings, now=dt.datetime(2026, 3, 3, tzinfo=dt.UTC))
    assert report.valid == 2
    assert lake.read_events_partition(DAYS[0]).height == 4  # u1/i0 at 09:00 was already there


OLD_WRITER = textwrap.dedent(
    """
    import datetime as dt, sys
    from pathlib import Path
    import nightrec, pyarrow as pa
    assert nightrec.__file__.startswith(sys.argv[2]), nightrec.__file__  # the old code, not today's
    from nightrec.settings import Settings
    from nightrec.storage import publication
    from nightrec.storage.lake import Lake
    from nightrec.storage.schemas import RECOMMENDATIONS
    from nightrec.tasks import ingest
    settings = Settings(home=Path(sys.argv[1]))
    lake = Lake(settings.lake_root)
    now = dt.datetime(2026, 3, 3, tzinfo=dt.UTC)
    folder = Path(sys.argv[1]) / "input"
    folder.mkdir(parents=True)
    (folder / "items.csv").write_text("item_id,title\\ni1,One\\ni2,Two\\n")
    (folder / "events.csv").write_text(
        "user_id,item_id,timestamp\\nu1,i1,2026-02-27T09:00:00Z\\nu2,i2,2026-02-28T09:00:00Z\\nu3,i2,yesterday\\n"
    )
    ingest.ingest_items_file(lake, folder / "items.csv", settings, now=now)
    lenient = settings.model_copy(update={"max_bad_fraction": 0.5})
    ingest.ingest_events_file(lake, folder / "events.csv", lenient, now=now)
    day = dt.date(2026, 3, 1)
    lists = pa.table({"user_id": ["u1", "u2"], "rank": pa.array([1, 1], pa.int32()), "item_id": ["i2", "i1"],
                      "score": pa.array([0.5, 0.25], pa.float32()), "reasons": [[], []],
                      "run_date": [day, day], "model_version": ["7", "7"]}, schema=RECOMMENDATIONS)
    publication.publish(lake, day, lists.to_batches(), {"mlflow_run_id": "old-run", "model_version": "7"})
    """
)


def test_a_lake_written_by_the_old_code_itself_is_converted(tmp_path):
    """The old code's own writers (taken from git history, run in their own process) make the home."""
    old_code = tmp_path / "old-code"
    old_code.mkdir()
    archive = subprocess.run(["git", "archive", OLD_COMMIT, "nightrec"], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"commit {OLD_COMMIT} is not in this clone's history: {archive.stderr.decode()[:200]}")
    subprocess.run(["tar", "-x", "-C", str(old_code)], input=archive.stdout, check=True)
    home = tmp_path / "home"
    env = {"PYTHONPATH": str(old_code), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", OLD_WRITER, str(home), str(old_code)], cwd=tmp_path, env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert (home / "lake" / "recommendations" / "LATEST").exists() and (
        home / "lake" / "items" / "items.parquet"
    ).exists()

    lake = Lake(home / "lake")
    assert lake.scan_events().collect().sort("user_id")["user_id"].to_list() == ["u1", "u2"]
    assert lake.read_quarantine()["reason"].to_list() != [] and lake.read_items()["title"].to_list() == ["One", "Two"]
    newest = read_lists(lake)
    assert newest["item_id"].to_list() == ["i2", "i1"] and set(newest["mlflow_run_id"]) == {"old-run"}
    assert lake.read_latest_pointer()["model_version"] == "7"
