"""The consumer contract (docs/contract.md): read_lists returns what a direct read of the table returns, the newest
night by default, a given run date or table version on request; DuckDB and plain polars read the same lists."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import polars as pl
import pyarrow as pa
import pytest
from deltalake import DeltaTable
from polars.testing import assert_frame_equal

from nightrec.lists import newest_night, read_lists
from nightrec.storage import publication
from nightrec.storage.lake import Lake
from tests.conftest import REPO
from tests.storage.test_publication import lists

YESTERDAY, TODAY = dt.date(2026, 3, 1), dt.date(2026, 3, 2)


@pytest.fixture
def lake(tmp_path) -> Lake:
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, YESTERDAY, [lists(YESTERDAY, ["a", "b"], version="1")], {"mlflow_run_id": "r1"})
    publication.publish(lake, TODAY, [lists(TODAY, ["c", "a", "b"], version="2")], {"mlflow_run_id": "r2"})
    # Tonight's lists re-published (a re-run): the version before this one is "yesterday's table".
    publication.publish(lake, TODAY, [lists(TODAY, ["b", "a"], k=2, version="3")], {"mlflow_run_id": "r3"})
    return lake


def _direct(lake: Lake, day: dt.date, version: int | None = None) -> pl.DataFrame:
    table = DeltaTable(lake.recommendations_uri, version=version).to_pyarrow_table()
    return pl.from_arrow(table).filter(pl.col("run_date") == day).sort("user_id", "rank")


def test_read_lists_returns_the_newest_night_as_the_table_has_it(lake):
    got = read_lists(lake.root)
    assert_frame_equal(got, _direct(lake, TODAY).select(got.columns))
    assert set(got["model_version"]) == {"3"} and got["user_id"].to_list() == ["a", "a", "b", "b"]
    assert newest_night(lake.root) == {
        "date": "2026-03-02",
        "mlflow_run_id": "r3",
        "model_version": "3",
        "table_version": 3,
    }


def test_read_lists_by_date_user_version_and_as_arrow(lake):
    older = read_lists(lake.root, date="2026-03-01")
    assert_frame_equal(older, _direct(lake, YESTERDAY).select(older.columns))
    one = read_lists(lake.root, user="b", date=YESTERDAY)
    assert one["user_id"].unique().to_list() == ["b"] and one["rank"].to_list() == [1, 2, 3]
    before_rerun = read_lists(lake.root, version=2)  # the table before tonight's re-publish
    assert_frame_equal(before_rerun, _direct(lake, TODAY, version=2).select(before_rerun.columns))
    assert set(before_rerun["model_version"]) == {"2"} and before_rerun.height == 9
    arrow = read_lists(lake.root, as_="arrow")
    assert isinstance(arrow, pa.Table) and arrow.num_rows == 4
    assert read_lists(lake.root, user="nobody").is_empty()


def test_read_lists_uses_the_configured_lake(lake, monkeypatch, tmp_path):
    monkeypatch.setenv("NIGHTREC_HOME", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("NIGHTREC_LAKE", str(lake.root))
    assert read_lists().height == 4


def test_a_missing_night_is_named(lake, tmp_path):
    with pytest.raises(publication.NothingPublishedError, match="2026-02-01"):
        read_lists(lake.root, date="2026-02-01")
    with pytest.raises(publication.NothingPublishedError, match="nothing published"):
        read_lists(tmp_path / "empty")
    with pytest.raises(ValueError, match="as_"):
        read_lists(lake.root, as_="pandas")


def test_the_reader_imports_without_torch():
    heavy = "{'torch', 'mlflow', 'prefect', 'faiss', 'transformers'}"
    code = f"import sys, nightrec.lists; print([m for m in sys.modules if m.split('.')[0] in {heavy}])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_plain_polars_reads_the_newest_and_yesterdays_lists(lake):
    table = pl.read_delta(lake.recommendations_uri)
    newest = table.filter(pl.col("run_date") == pl.col("run_date").max()).sort("user_id", "rank")
    assert_frame_equal(newest, read_lists(lake.root).select(newest.columns))
    yesterday = pl.read_delta(lake.recommendations_uri, version=2).filter(pl.col("run_date") == TODAY)
    assert set(yesterday["model_version"]) == {"2"}


def _duckdb():
    duckdb = pytest.importorskip("duckdb", reason="duckdb is in the test extra (pip install -e '.[test]')")
    connection = duckdb.connect()
    try:  # the delta extension from the duckdb-extension-delta wheel (no download); its signature is checked
        import pathlib

        import duckdb_extension_delta

        path = next(pathlib.Path(duckdb_extension_delta.__file__).parent.rglob("delta.duckdb_extension"))
        connection.load_extension(str(path))
    except Exception as exc:  # noqa: BLE001 - any failure to load means: skip with the reason
        try:
            connection.sql("INSTALL delta; LOAD delta;")
        except Exception:  # noqa: BLE001
            pytest.skip(f"DuckDB's delta extension cannot be loaded here ({type(exc).__name__}: {exc})")
    return connection


def test_duckdb_reads_the_newest_and_yesterdays_lists(lake):
    duck = _duckdb()
    uri = lake.recommendations_uri
    newest = duck.sql(
        f"SELECT user_id, rank, item_id, model_version FROM delta_scan('{uri}') "
        f"WHERE run_date = (SELECT max(run_date) FROM delta_scan('{uri}')) ORDER BY user_id, rank"
    ).pl()
    expected = read_lists(lake.root).select("user_id", "rank", "item_id", "model_version")
    assert_frame_equal(newest, expected, check_dtypes=False)
    yesterday = duck.sql(
        f"SELECT DISTINCT model_version FROM delta_scan('{uri}', version => 2) WHERE run_date = DATE '{TODAY}'"
    ).fetchall()
    assert yesterday == [("2",)]
