"""Atomic publication: LATEST moves only after a complete partition; crashes and corruption leave readers safe."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pytest

from nightrec.storage import publication
from nightrec.storage.lake import CorruptPartitionError, Lake
from nightrec.storage.schemas import REASON, RECOMMENDATIONS

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


def test_publish_then_read(tmp_path):
    lake = Lake(tmp_path / "lake")
    stats = publication.publish(lake, DAY1, [lists(DAY1, ["a", "b"]), lists(DAY1, ["c"])], {"model_version": "1"})
    assert stats["rows"] == 9 and stats["users"] == 3 and stats["latest"]
    pointer, table = publication.read_latest(lake)
    assert pointer["date"] == "2026-03-01" and table.num_rows == 9
    assert table.schema.field("reasons").type == pa.list_(REASON)
    frame = publication.read_user_list(lake, "b")
    assert frame["rank"].to_list() == [1, 2, 3] and frame["user_id"].unique().to_list() == ["b"]
    assert publication.read_user_list(lake, "nobody").is_empty()


def test_backfill_of_an_older_date_does_not_move_latest(tmp_path):
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY2, [lists(DAY2, ["a"])], {"model_version": "2"})
    stats = publication.publish(lake, DAY1, [lists(DAY1, ["a"])], {"model_version": "1"})
    assert not stats["latest"] and lake.read_latest_pointer()["date"] == "2026-03-02"
    assert publication.read_user_list(lake, "a", DAY1)["run_date"].to_list()[0] == DAY1


def test_exception_mid_write_leaves_previous_lists(tmp_path):
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY1, [lists(DAY1, ["a", "b"])], {"model_version": "1"})

    def failing():
        yield lists(DAY2, ["a"], version="2")
        raise RuntimeError("scoring died")

    with pytest.raises(RuntimeError, match="scoring died"):
        publication.publish(lake, DAY2, failing(), {"model_version": "2"})
    pointer, table = publication.read_latest(lake)
    assert pointer["date"] == "2026-03-01" and table.num_rows == 6
    assert not lake.recommendations_partition(DAY2).exists()
    assert not [p for p in lake.recommendations_dir.iterdir() if p.name.startswith(".staging")]


def test_sigkill_mid_write_leaves_previous_lists_readable(tmp_path):
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY1, [lists(DAY1, ["a", "b"])], {"model_version": "1"})
    publication.publish(lake, DAY2, [lists(DAY2, ["a", "b"], version="2")], {"model_version": "2"})
    marker = tmp_path / "half-written"
    # Re-publish DAY2 (the date LATEST names) and die mid-stream: the old DAY2 lists must survive intact.
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
    assert [p for p in lake.recommendations_dir.iterdir() if p.name.startswith(".staging")], "no half-written staging"
    pointer, table = publication.read_latest(lake)
    assert pointer == {"date": "2026-03-02", "model_version": "2"}
    assert table.num_rows == 6 and set(table["model_version"].to_pylist()) == {"2"}
    publication.publish(lake, DAY2, [lists(DAY2, ["z"], version="4")], {"model_version": "4"})
    assert not [p for p in lake.recommendations_dir.iterdir() if p.name.startswith(".staging")]
    assert publication.read_latest(lake)[0]["model_version"] == "4"


def test_truncated_or_altered_file_raises_naming_it(tmp_path):
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY1, [lists(DAY1, ["a", "b"])], {"model_version": "1"})
    path = publication.partition_file(lake, DAY1)
    data = bytearray(path.read_bytes())
    data[40] ^= 0xFF  # inside the first data page: same size, different bytes: only the checksum can tell
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptPartitionError, match="sha256") as err:
        publication.read_user_list(lake, "a")
    assert str(path) in str(err.value)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CorruptPartitionError, match="part-0.parquet"):
        publication.read_latest(lake)


def test_nothing_published(tmp_path):
    with pytest.raises(publication.NothingPublishedError):
        publication.read_latest(Lake(tmp_path / "lake"))


def test_latest_head_returns_whole_lists_of_the_first_users(tmp_path):
    lake = Lake(tmp_path / "lake")
    day = dt.date(2026, 3, 1)
    users = [f"u{i:05d}" for i in range(3000)]  # several read batches' worth of rows
    publication.publish(lake, day, [lists(day, users[:1500], k=7), lists(day, users[1500:], k=7)], {"date": ""})
    _, head = publication.read_latest_head(lake, 4)
    assert sorted(set(head["user_id"].to_pylist())) == users[:4]
    assert head.num_rows == 4 * 7 and head.schema.equals(RECOMMENDATIONS)
    _, everything = publication.read_latest_head(lake, 10_000)
    assert everything.num_rows == 3000 * 7


def test_failing_check_publishes_nothing_and_keeps_previous_lists(tmp_path):
    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY1, [lists(DAY1, ["a", "b"])], {"model_version": "1"})
    publication.publish(lake, DAY2, [lists(DAY2, ["a", "b"])], {"model_version": "1"})
    checked = []

    def refuse(path):
        checked.append(publication.read_user_range(path, None, None).num_rows)
        raise ValueError("a seen item in a list")

    with pytest.raises(ValueError, match="seen item"):  # a re-run of DAY2 whose lists break an invariant
        publication.publish(lake, DAY2, [lists(DAY2, ["a"], version="2")], {"model_version": "2"}, check=refuse)
    assert checked == [3]  # the check saw the new file, before the swap
    pointer, table = publication.read_latest(lake)
    assert pointer["date"] == "2026-03-02" and table.num_rows == 6  # the earlier DAY2 lists, untouched
    assert set(table["model_version"].to_pylist()) == {"1"}
    assert not [p for p in lake.recommendations_dir.iterdir() if p.name.startswith(".staging")]


def test_user_range_reads_only_that_range(tmp_path, monkeypatch):
    monkeypatch.setattr(publication, "ROW_GROUP_ROWS", 30)  # ten users per row group
    lake = Lake(tmp_path / "lake")
    users = [f"u{i:03d}" for i in range(100)]
    publication.publish(lake, DAY1, [lists(DAY1, users[i : i + 10]) for i in range(0, 100, 10)], {"date": ""})
    path = publication.verify_partition(lake, DAY1)
    middle = publication.read_user_range(path, "u020", "u035")
    assert sorted(set(middle["user_id"].to_pylist())) == users[20:35] and middle.num_rows == 15 * 3
    assert publication.read_user_range(path, None, "u002").num_rows == 6
    assert sorted(set(publication.read_user_range(path, "u098", None)["user_id"].to_pylist())) == ["u098", "u099"]
    assert publication.read_user_range(path, None, None).num_rows == 300


def test_a_dead_writers_staging_of_any_date_is_removed_and_a_live_ones_kept(tmp_path):
    import fcntl

    lake = Lake(tmp_path / "lake")
    publication.publish(lake, DAY1, [lists(DAY1, ["a"])], {"model_version": "1"})
    # a publication of another date killed before its swap (never run again), and one still writing
    dead = lake.recommendations_dir / ".staging-date=2026-03-07-0a1b"
    live = lake.recommendations_dir / ".staging-date=2026-03-09-2c3d"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "part-0.parquet").write_bytes(b"PAR1 torn")
    holder = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # what a live publisher holds on its staging folder
        publication.publish(lake, DAY2, [lists(DAY2, ["a"])], {"model_version": "2"})
        assert not dead.exists() and (live / "part-0.parquet").exists()
    finally:
        os.close(holder)  # the writer dies: the kernel drops its lock
    publication.publish(lake, DAY2, [lists(DAY2, ["b"])], {"model_version": "3"})
    assert not [p for p in lake.recommendations_dir.iterdir() if p.name.startswith((".staging", ".creating"))]
    assert publication.read_latest(lake)[0]["model_version"] == "3"
