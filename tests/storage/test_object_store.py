"""The lake on an S3-compatible server (moto, its own process on 127.0.0.1): tables, concurrent commits from several
processes, a reader during publishes, and the consumer reads, all through the standard AWS_* variables."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap
import threading
import uuid

import polars as pl
import pytest

from nightrec.lists import read_lists
from nightrec.storage import delta, publication
from nightrec.storage.lake import Lake
from tests.conftest import REPO
from tests.s3server import create_bucket, list_keys, moto_server
from tests.storage.test_lake import events
from tests.storage.test_publication import lists

DAY1, DAY2 = dt.date(2026, 3, 1), dt.date(2026, 3, 2)
BUCKET = "nightrec-lake"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as env:
        create_bucket(env, BUCKET)
        yield env


@pytest.fixture
def lake(s3, monkeypatch, tmp_path) -> Lake:
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    return Lake(f"s3://{BUCKET}/{uuid.uuid4().hex}", local_dir=tmp_path / "local")


def test_commits_go_to_the_store_with_a_conditional_put(lake, s3):
    assert lake.storage_options == {"conditional_put": "etag"}
    lake.write_events_days([(DAY1, events(30, DAY1)), (DAY2, events(5, DAY2))])
    publication.publish(lake, DAY1, [lists(DAY1, ["a", "b"])], {"mlflow_run_id": "r1", "model_version": "1"})
    prefix = lake.uri.removeprefix(f"s3://{BUCKET}/")
    keys = list_keys(s3, BUCKET, prefix)
    assert any(k.startswith(f"{prefix}/events/_delta_log/") for k in keys)
    assert any(k.startswith(f"{prefix}/events/date=2026-03-01/part-") for k in keys)
    assert any(k.startswith(f"{prefix}/recommendations/run_date=2026-03-01/part-") for k in keys)
    assert not any(p.is_file() and "events" in p.parts for p in lake.local_dir.rglob("*")), "table bytes on local disk"
    assert lake.scan_events().collect().height == 35 and lake.event_dates() == [DAY1, DAY2]
    lake.verify_events(deep=True)
    assert lake.read_latest_pointer()["mlflow_run_id"] == "r1"


RACER = textwrap.dedent(
    """
    import datetime as dt, sys
    from nightrec.storage import publication
    from nightrec.storage.lake import Lake
    from tests.storage.test_publication import lists
    uri, day, rounds = sys.argv[1], dt.date.fromisoformat(sys.argv[2]), int(sys.argv[3])
    for i in range(rounds):
        users = [f"{sys.argv[2]}-u{j}" for j in range(10 + i)]
        publication.publish(Lake(uri), day, [lists(day, users, version=str(i))], {"mlflow_run_id": f"{day}-{i}"})
    """
)


def test_concurrent_publishes_from_several_processes_all_commit(lake, s3):
    """Three processes publish their own dates 4 times each, all at once: every commit lands (a lost race is retried
    on the conditional put), and each date ends with its last publish."""
    publication.publish(lake, DAY1, [lists(DAY1, ["seed"])], {"mlflow_run_id": "seed"})
    days = [DAY1, DAY2, DAY2 + dt.timedelta(days=1)]
    env = {**s3, "PATH": "/usr/bin:/bin"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, lake.uri, d.isoformat(), "4"],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for d in days
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    table = delta.open_table(lake.recommendations_uri, lake.storage_options)
    assert table.version() == 1 + 3 * 4  # version 0 created it, 1 the seed, then twelve publishes: none lost
    publishes = [c for c in table.history() if "nightrec.run_date" in c]
    assert sorted(c["nightrec.mlflow_run_id"] for c in publishes) == sorted(
        ["seed"] + [f"{d}-{i}" for d in days for i in range(4)]
    )
    assert lake.published_dates() == days
    for day in days:
        last = pl.from_arrow(publication.read_day(lake, day))
        assert set(last["mlflow_run_id"]) == {f"{day}-3"} and last["user_id"].n_unique() == 13


def test_a_reader_during_publishes_sees_one_whole_night(lake):
    sizes = {str(v): 20 + 5 * v for v in range(6)}
    publication.publish(lake, DAY1, [lists(DAY1, [f"u{i}" for i in range(sizes["0"])], version="0")], {})
    seen, stop, errors = [], threading.Event(), []

    def reader() -> None:
        try:
            while not stop.is_set():
                got = read_lists(lake)
                seen.append((tuple(sorted(set(got["model_version"]))), got.height))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for v in range(1, 6):
            batches = [lists(DAY1, [f"u{i}" for i in range(sizes[str(v)])], version=str(v))]
            publication.publish(lake, DAY1, batches, {"model_version": str(v)})
    finally:
        stop.set()
        thread.join()
    assert errors == [] and len(seen) >= 2
    for versions, rows in seen:
        assert len(versions) == 1 and rows == 3 * sizes[versions[0]], (versions, rows)


def test_consumers_read_the_store_with_polars_and_read_lists(lake):
    publication.publish(lake, DAY1, [lists(DAY1, ["a", "b"], version="1")], {"mlflow_run_id": "r1"})
    publication.publish(lake, DAY2, [lists(DAY2, ["a", "c"], version="2")], {"mlflow_run_id": "r2"})
    newest = read_lists(lake.uri)
    assert set(newest["run_date"]) == {DAY2} and newest["user_id"].unique().sort().to_list() == ["a", "c"]
    direct = pl.read_delta(lake.recommendations_uri, storage_options=lake.storage_options)
    assert direct.filter(pl.col("run_date") == DAY2).height == newest.height
    assert read_lists(lake.uri, version=1)["run_date"].unique().to_list() == [DAY1]  # the table as of last night


def test_retention_vacuums_the_store(lake):
    for d in range(1, 5):
        day = dt.date(2026, 3, d)
        publication.publish(lake, day, [lists(day, ["a"])], {}, keep_nights=1 if d == 4 else None)
    assert lake.published_dates() == [dt.date(2026, 3, 4)]


def test_commit_safety_is_conditional_put_unless_the_user_chose_otherwise():
    assert delta.default_storage_options("s3://b/p", {}) == {"conditional_put": "etag"}
    assert delta.default_storage_options("s3://b/p", {"AWS_S3_LOCKING_PROVIDER": "dynamodb"}) == {}
    assert delta.default_storage_options("s3://b/p", {"AWS_S3_ALLOW_UNSAFE_RENAME": "true"}) == {}
    assert delta.default_storage_options("gs://b/p", {}) == {} and delta.default_storage_options("/local", {}) == {}
    assert Lake("s3://b/p", storage_options={"conditional_put": "none"}).storage_options == {"conditional_put": "none"}
