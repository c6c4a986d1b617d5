"""An ingest waits for a running night of a later date before changing what that night reads; nothing else waits
(issue 14: an ingest during a night changed the events between training and publishing)."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading

import polars as pl
import pytest

from nightrec.settings import Settings
from nightrec.storage import locking
from nightrec.storage.lake import Lake
from nightrec.tasks import ingest

NIGHT = dt.date(2026, 11, 21)
NOW = dt.datetime(2026, 11, 22, 12, tzinfo=dt.UTC)
HOLD = """
import datetime as dt, sys
from pathlib import Path
from nightrec.storage import locking
with locking.night_reads(Path(sys.argv[1]), dt.date.fromisoformat(sys.argv[2])):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def lake_and_settings(tmp_path):
    settings = Settings(home=tmp_path / "home")
    return Lake(settings.lake_root), settings


def events(day: dt.date, users: range) -> pl.LazyFrame:
    stamp = f"{day.isoformat()}T10:00:00Z"
    frame = pl.DataFrame({"user_id": [f"u{u}" for u in users], "item_id": "i1", "timestamp": stamp})
    return frame.lazy()


class Night:
    """A night of ``NIGHT`` in another process, holding its reads until :meth:`finish`."""

    def __init__(self, lake: Lake) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(locking.reads_lock_file(lake)), NIGHT.isoformat()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "held"

    def finish(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


def in_thread(func) -> threading.Thread:
    thread = threading.Thread(target=func, daemon=True)
    thread.start()
    return thread


def test_an_ingest_into_a_day_a_night_reads_waits_for_it(lake_and_settings):
    lake, settings = lake_and_settings
    before = NIGHT - dt.timedelta(days=1)
    ingest.ingest_events_frame(lake, events(before, range(3)), settings, "first", now=NOW)
    night = Night(lake)
    try:
        # Unchanged (a re-ingest) and a day the night does not read: no wait.
        ingest.ingest_events_frame(lake, events(before, range(3)), settings, "again", now=NOW)
        ingest.ingest_events_frame(lake, events(NIGHT, range(5)), settings, "tonight", now=NOW)
        new_rows = in_thread(lambda: ingest.ingest_events_frame(lake, events(before, range(3, 7)), settings, "x", NOW))
        new_rows.join(timeout=3)
        assert new_rows.is_alive(), "changed a day under a running night"
        assert lake.read_events_partition(before).height == 3  # what the night reads, still
    finally:
        night.finish()
    new_rows.join(timeout=30)
    assert not new_rows.is_alive() and lake.read_events_partition(before).height == 7


def test_a_catalogue_change_waits_for_a_running_night(lake_and_settings, tmp_path):
    lake, settings = lake_and_settings
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\ni1,One\n")
    ingest.ingest_items_file(lake, items, settings, now=NOW)
    night = Night(lake)
    try:
        ingest.ingest_items_file(lake, items, settings, now=NOW)  # the same file: nothing changes, no wait
        items.write_text("item_id,title\ni1,One\ni2,Two\n")
        change = in_thread(lambda: ingest.ingest_items_file(lake, items, settings, now=NOW))
        change.join(timeout=3)
        assert change.is_alive() and lake.read_items().height == 1
    finally:
        night.finish()
    change.join(timeout=30)
    assert not change.is_alive() and lake.read_items().height == 2
