"""The `nightrec` command as a user types it (typer's runner, in-process)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from nightrec.flows.cli import app
from nightrec.settings import Settings
from nightrec.storage.lake import Lake
from tests.conftest import tree_digest


@pytest.mark.movielens
def test_ingest_movielens_100k_lands_every_event(home, movielens_100k):
    result = CliRunner().invoke(app, ["ingest", "--events", str(movielens_100k)])
    assert result.exit_code == 0, result.output
    lake = Lake(Settings().lake_root)
    events = lake.scan_events().collect()
    assert (events.height, events["user_id"].n_unique(), events["item_id"].n_unique()) == (100_000, 943, 1682)
    assert lake.read_items().height == 1682 and lake.read_users().height == 943
    again = CliRunner().invoke(app, ["ingest", "--events", str(movielens_100k)])
    assert again.exit_code == 0 and lake.scan_events().collect().height == 100_000  # re-ingest is idempotent


def test_refused_file_is_named_and_exit_code_is_2(home, tmp_path):
    good = tmp_path / "events.csv"
    good.write_text("user_id,item_id,timestamp\nu1,i1,2026-01-02T00:00:00Z\n")
    assert CliRunner().invoke(app, ["ingest", "--events", str(good)]).exit_code == 0
    before = tree_digest(home / "lake")
    bad = tmp_path / "broken.csv"
    bad.write_text("user,item\nu1,i1\n")
    result = CliRunner().invoke(app, ["ingest", "--events", str(bad)])
    assert result.exit_code == 2
    assert "broken.csv" in result.output and "missing required column" in result.output
    assert tree_digest(home / "lake") == before


def test_ingest_without_files_is_a_usage_error(home):
    result = CliRunner().invoke(app, ["ingest"])
    assert result.exit_code == 2 and "nothing to ingest" in result.output


def test_evaluate_names_a_missing_dataset(home, tmp_path):
    result = CliRunner().invoke(app, ["evaluate", "--dataset", "no-such-set", "--datasets-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no-such-set" in result.output and str(tmp_path) in result.output


def test_a_header_only_events_file_is_refused_in_one_line(home, tmp_path):
    header_only = tmp_path / "header.csv"
    header_only.write_text("user_id,item_id,timestamp\n")
    result = CliRunner().invoke(app, ["ingest", "--events", str(header_only)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"refused: {header_only}: no rows (a header only, or an empty file); nothing was written"
    ]
    assert not (home / "lake" / "events").exists()


def test_a_night_without_a_catalogue_is_refused_before_it_starts(home):
    result = CliRunner().invoke(app, ["nightly", "--date", "2026-04-01"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refused: no item catalogue in the lake"), result.output
    assert not (home / "prefect").exists()  # no flow (nor its temporary server) was started


def test_a_backfill_ending_before_it_starts_is_refused_in_one_line(home):
    result = CliRunner().invoke(app, ["backfill", "--start", "2026-04-03", "--end", "2026-04-01"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["refused: --end 2026-04-01 is before --start 2026-04-03"]
