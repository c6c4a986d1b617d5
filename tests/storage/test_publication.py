"""Publication as Delta commits: one commit per night, the newest run date is what readers get, crashes and damage
leave readers safe, retention expires old nights."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from nightrec.storage import delta, publication
from nightrec.storage.lake import CorruptPartitionError, Lake
from nightrec.storage.schemas import RECOMMENDATIONS, RECOMMENDATIONS_TABLE

DAY1, DAY2 = dt.date(2026, 3, 1), dt.date(2026, 3, 2)


def lists(day: dt.date, users: list[str], k: int = 3, version: str = "1") -> pa.RecordBatch:
    rows = [(u, r) for u in users for r in range(1, k + 1)]
    return pa.RecordBatch.from_pydict(
        {
            "user_id": [u for u, _ in rows],
            "rank": [r for _, r in rows],
            "item_id": [f"item{r}" for _, r in rows],
            "score": [1.0 / r for _, r in rows],
            "reasons": [[{"item_id": "h1", "title": "Seen", "weight": 0.5}] for _ in rows],
            "run_date": [day] * len(rows),
            "model_version": [version] * len(rows),
        },
        schema=RECOMMENDATIONS,
    )


def _parts(lake: Lake, day: dt.date) -> list[Path]:
    return sorted(lake.recommendations_partition(day).glob("part-*.parquet"))


def test_publish_then_read(tmp_path):
    lake = Lake(tmp_path / "lake")
    pointer = {"mlflow_run_id": "run-1", "model_version": "1"}
    stats = publication.publish(lake, DAY1, [lists(DAY1, ["a", "b"]), lists(DAY1, ["c"])], pointer)
    assert (stats["rows"], stats["users"], stats["latest"]) == (9, 3, True)
    newest, table = publication.read_latest(lake)
    assert newest == {"date": "2026-03-01", "mlflow_run_id": "run-1", "model_version": "1", "table_version": 1}
    assert table.num_rows == 9 and table.schema.equals(RECOMMENDATIONS_TABLE.schema)
    assert set(table["mlflow_run_id"].to_pylist()) == {"run-1"}
    commit = delta.open_table(lake.recommendations_uri).history(1)[0]
    assert (commit["nightrec.mlflow_run_id"], commit["nightrec.run_date"], commit["nightrec.rows"]) == (
        "run-1",
        "2026-03-01",
        "9",
    )
    frame = publication.read_user_list(lake, "b")
    assert frame["rank"].to_list() == [1, 2, 3] and frame["item_id"].to_list() == ["item1", "item2", "item3"]
    assert publication.read_user_list(lake, "nobody").is_empty()


def test_a_publish_is_one_commit_replacing_only_its_run_date(tmp_path):
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY1, [lists(DAY1, ["a", "b"])], {"model_version": "1"})
    publication.publish(lake, DAY2, [lists(DAY2, ["a"])], {"model_version": "1"})
    before = delta.open_table(lake.recommendations_uri).version()
    publication.publish(lake, DAY2, [lists(DAY2, ["x", "y", "z"], version="2")], {"model_version": "2"})
    assert delta.open_table(lake.recommendations_uri).version() == before + 1
    assert publication.read_day(lake, DAY1).num_rows == 6  # the other date is untouched
    assert publication.read_day(lake, DAY2).num_rows == 9
    assert publication.read_day(lake, DAY2, version=before).num_rows == 3  # yesterday's table, by version


def test_backfill_of_an_older_date_does_not_change_the_newest(tmp_path):
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY2, [lists(DAY2, ["a"])], {"model_version": "2"})
    stats = publication.publish(lake, DAY1, [lists(DAY1, ["a"])], {"model_version": "1"})
    assert not stats["latest"] and lake.read_latest_pointer()["date"] == "2026-03-02"
    assert publication.read_user_list(lake, "a", DAY1)["run_date"].to_list()[0] == DAY1
    assert lake.published_dates() == [DAY1, DAY2]


def test_exception_mid_write_leaves_previous_lists(tmp_path):
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY1, [lists(DAY1, ["a", "b"])], {"model_version": "1"})
    version = delta.open_table(lake.recommendations_uri).version()

    def failing():
        yield lists(DAY2, ["a"], version="2")
        raise RuntimeError("scoring died")

    with pytest.raises(RuntimeError, match="scoring died"):
        publication.publish(lake, DAY2, failing(), {"model_version": "2"})
    pointer, table = publication.read_latest(lake)
    assert pointer["date"] == "2026-03-01" and table.num_rows == 6
    assert delta.open_table(lake.recommendations_uri).version() == version, "nothing was committed"
    assert _parts(lake, DAY2) == [], "the half-written part was not removed"


def test_sigkill_mid_write_leaves_previous_lists_readable(tmp_path):
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY1, [lists(DAY1, ["a", "b"])], {"model_version": "1"})
    publication.publish(lake, DAY2, [lists(DAY2, ["a", "b"], version="2")], {"model_version": "2"})
    marker = tmp_path / "half-written"
    # Re-publish DAY2 (the newest date) and die mid-stream: the old DAY2 lists must survive intact.
    script = textwrap.dedent(
        f"""
        import datetime as dt, pathlib, time
        from nightrec.storage import publication
        from nightrec.storage.lake import Lake
        from tests.storage.test_publication import lists
        def slow():
            for i in range(1000):
                yield lists(dt.date(2026, 3, 2), [f"u{{i}}-{{j}}" for j in range(200)], version="3")
                if i == 5:
                    pathlib.Path({str(marker)!r}).write_text("ok")
                    time.sleep(60)
        publication.publish(Lake({str(lake.root)!r}), dt.date(2026, 3, 2), slow(), {{"model_version": "3"}})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd())
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None, "publisher exited early"
            assert time.time() < deadline, "publisher never reached the middle of its write"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    named = set(delta.file_sizes(delta.open_table(lake.recommendations_uri)))
    on_disk = {
        str(p.relative_to(lake.root / "recommendations")) for p in lake.recommendations_partition(DAY2).iterdir()
    }
    assert on_disk - named, "expected the killed writer's torn part: on disk, named by no commit"
    pointer, table = publication.read_latest(lake)
    assert (pointer["date"], pointer["model_version"]) == ("2026-03-02", "2")
    assert table.num_rows == 6 and set(table["model_version"].to_pylist()) == {"2"}
    publication.verify_partition(lake, DAY2, deep=True)  # the torn orphan is no file of the table
    publication.publish(lake, DAY2, [lists(DAY2, ["z"], version="4")], {"model_version": "4"})
    assert publication.read_latest(lake)[0]["model_version"] == "4"


def test_truncated_or_altered_file_raises_naming_it(tmp_path):
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY1, [lists(DAY1, ["a", "b"])], {"model_version": "1"})
    (path,) = _parts(lake, DAY1)
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF  # inside the first data page: same size, different bytes: only the page checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptPartitionError, match="corrupted Parquet") as err:
        publication.verify_partition(lake, DAY1, deep=True)
    assert path.name in str(err.value)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptPartitionError, match=path.name):
        publication.read_latest(lake)


def test_nothing_published(tmp_path):
    with pytest.raises(publication.NothingPublishedError):
        publication.read_latest(Lake(tmp_path / "lake"))
    assert Lake(tmp_path / "lake").read_latest_pointer() is None


def test_latest_head_returns_whole_lists_of_the_first_users(tmp_path):
    lake = Lake(tmp_path / "lake")
    day = dt.date(2026, 3, 1)
    users = [f"u{i:05d}" for i in range(3000)]  # several read batches' worth of rows
    publication.publish(lake, day, [lists(day, users[:1500], k=7), lists(day, users[1500:], k=7)], {"date": ""})
    _, head = publication.read_latest_head(lake, 4)
    assert sorted(set(head["user_id"].to_pylist())) == users[:4]
    assert head.num_rows == 4 * 7 and head.schema.equals(RECOMMENDATIONS_TABLE.schema)
    _, everything = publication.read_latest_head(lake, 10_000)
    assert everything.num_rows == 3000 * 7


def test_failing_check_publishes_nothing_and_keeps_previous_lists(tmp_path):
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY1, [lists(DAY1, ["a", "b"])], {"model_version": "1"})
    publication.publish(lake, DAY2, [lists(DAY2, ["a", "b"])], {"model_version": "1"})
    checked = []

    def refuse(parts):
        checked.append(publication.read_user_range(parts, None, None).num_rows)
        raise ValueError("a seen item in a list")

    with pytest.raises(ValueError, match="seen item"):  # a re-run of DAY2 whose lists break an invariant
        publication.publish(lake, DAY2, [lists(DAY2, ["a"], version="2")], {"model_version": "2"}, check=refuse)
    assert checked == [3]  # the check saw the new file, before the commit
    pointer, table = publication.read_latest(lake)
    assert pointer["date"] == "2026-03-02" and table.num_rows == 6  # the earlier DAY2 lists, untouched
    assert set(table["model_version"].to_pylist()) == {"1"}


def test_user_range_reads_only_that_range(tmp_path, monkeypatch):
    monkeypatch.setattr(delta.PartWriter, "ROW_GROUP_ROWS", 30)  # ten users per row group
    lake = Lake(tmp_path / "lake")
    users = [f"u{i:03d}" for i in range(100)]
    parts, rows, _ = publication.write_parts(
        lake, DAY1, [lists(DAY1, users[i : i + 10]) for i in range(0, 100, 10)], {}
    )
    middle = publication.read_user_range(parts, "u020", "u035")
    assert sorted(set(middle["user_id"].to_pylist())) == users[20:35] and middle.num_rows == 15 * 3
    assert publication.read_user_range(parts, None, "u002").num_rows == 6
    assert sorted(set(publication.read_user_range(parts, "u098", None)["user_id"].to_pylist())) == ["u098", "u099"]
    assert publication.read_user_range(parts, None, None).num_rows == rows == 300


def test_retention_drops_old_run_dates_and_vacuum_deletes_only_old_orphans(tmp_path):
    lake = Lake(tmp_path / "lake")
    days = [dt.date(2026, 3, d) for d in range(1, 6)]
    for day in days:
        publication.publish(lake, day, [lists(day, ["a"])], {"model_version": "1"})
    # Two orphans of killed writers: one three days old (dead for sure), one fresh (maybe a live writer's part).
    old_orphan, fresh_orphan = (lake.recommendations_partition(days[-1]) / f"part-{n}.zstd.parquet" for n in "ab")
    for orphan in (old_orphan, fresh_orphan):
        orphan.write_bytes(b"PAR1 torn")
    three_days_ago = time.time() - 3 * 86400
    os.utime(old_orphan, (three_days_ago, three_days_ago))
    stats = publication.publish(lake, days[-1], [lists(days[-1], ["b"])], {"model_version": "2"}, keep_nights=2)
    assert stats["expired_run_dates"] == 3
    assert lake.published_dates() == days[-2:]  # the newest and one night before it
    assert not old_orphan.exists() and fresh_orphan.exists()
    assert publication.read_day(lake, days[0], version=1).num_rows == 3  # an old version: until its files age out


def test_concurrent_publishes_of_two_dates_both_commit(tmp_path):
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY1, [lists(DAY1, ["seed"])], {"model_version": "0"})
    errors: list[BaseException] = []

    def run(day: dt.date, version: str) -> None:
        try:
            for _ in range(5):
                publication.publish(Lake(lake.root), day, [lists(day, ["a", "b"], version=version)], {})
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(DAY1, "1")), threading.Thread(target=run, args=(DAY2, "2"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert lake.published_dates() == [DAY1, DAY2] and lake.read_latest_pointer()["date"] == "2026-03-02"
    assert publication.read_day(lake, DAY1).num_rows == 6 and publication.read_day(lake, DAY2).num_rows == 6


def test_a_reader_during_publishes_sees_one_whole_night(tmp_path):
    """A reader loop while the newest date is re-published with other lists: every read is one night's lists."""
    lake = Lake(tmp_path / "lake")
    sizes = {str(v): 50 + 10 * v for v in range(8)}  # model version -> users of that publication
    publication.publish(lake, DAY1, [lists(DAY1, [f"u{i}" for i in range(sizes["0"])], version="0")], {})
    seen, stop = [], threading.Event()

    def reader() -> None:
        while not stop.is_set():
            _, table = publication.read_latest(Lake(lake.root))
            seen.append((tuple(sorted(set(table["model_version"].to_pylist()))), table.num_rows))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for v in range(1, 8):
            batches = [lists(DAY1, [f"u{i}" for i in range(sizes[str(v)])], version=str(v))]
            publication.publish(lake, DAY1, batches, {"model_version": str(v)})
    finally:
        stop.set()
        thread.join()
    assert len(seen) > 3
    for versions, rows in seen:
        assert len(versions) == 1 and rows == 3 * sizes[versions[0]], (versions, rows)
