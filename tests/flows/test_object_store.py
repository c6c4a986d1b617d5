"""The nightly with its lake on an S3-compatible server (moto, its own process on 127.0.0.1), configured the way a
user does it: ``NIGHTREC_LAKE=s3://bucket/prefix`` and the standard AWS_* variables. A night publishes to the store;
the next night, SIGKILLed with its lists written to the store but not committed, leaves readers on the first night;
its re-run publishes."""

from __future__ import annotations

import uuid

import polars as pl
import pytest

from nightrec.lists import read_lists
from nightrec.settings import Settings
from nightrec.storage import publication
from nightrec.storage.lake import Lake
from tests.flows import processes
from tests.flows.conftest import demo_home
from tests.flows.processes import D1, D2, EPOCHS, SPEC
from tests.s3server import create_bucket, list_keys, moto_server

pytestmark = [pytest.mark.prefect, pytest.mark.slow]
BUCKET = "nightrec-night"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as env:
        create_bucket(env, BUCKET)
        yield env


def test_a_night_on_the_store_then_a_kill_before_the_commit_then_the_rerun(prefect_server, s3, tmp_path, monkeypatch):
    from nightrec.flows.nightly import nightly

    home = demo_home(tmp_path, monkeypatch, SPEC)
    monkeypatch.setenv("NIGHTREC_TRAIN_EPOCHS", EPOCHS)
    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    prefix = f"lake-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("NIGHTREC_LAKE", f"s3://{BUCKET}/{prefix}")

    first = nightly(run_date=D1)
    lake = Lake(Settings().lake_root)
    assert lake.remote and not (home / "lake").exists(), "the lake's tables went to local disk"
    keys = list_keys(s3, BUCKET, prefix)
    for table in ("events", "items", "users", "recommendations"):
        assert any(k.startswith(f"{prefix}/{table}/_delta_log/") for k in keys), f"no {table} table in the store"
    assert lake.read_latest_pointer()["mlflow_run_id"] == first["mlflow_run_id"]
    lists = read_lists()
    history = lake.scan_events(before=D1).collect()
    assert set(lists["user_id"]) == set(history["user_id"]) | set(lake.read_users()["user_id"])
    assert lists.group_by("user_id").len()["len"].min() == Settings().top_k
    seen = lists.join(history.select("user_id", "item_id").unique(), on=["user_id", "item_id"], how="inner")
    assert seen.is_empty(), "an already-seen item was recommended"

    point, markers, log = "publish:before-swap", tmp_path / "markers", tmp_path / "killed.log"
    env = processes.child_environment(NIGHTREC_FAILPOINT=point, NIGHTREC_FAILPOINT_DIR=str(markers))
    killed = processes.start(["nightly", "--date", D2.isoformat()], env, log)
    processes.wait_for_hit(killed, markers, point, log)
    processes.kill_group(killed)
    written = [k for k in list_keys(s3, BUCKET, f"{prefix}/recommendations/") if f"run_date={D2}/part-" in k]
    assert written, "the killed night's checked parts should be in the store, uncommitted"
    assert lake.published_dates() == [D1]
    assert read_lists()["run_date"].unique().to_list() == [D1]
    publication.verify_partition(lake, D1, deep=True)

    again = nightly(run_date=D2)
    assert lake.published_dates() == [D1, D2]
    newest = read_lists()
    assert newest["run_date"].unique().to_list() == [D2] and set(newest["mlflow_run_id"]) == {again["mlflow_run_id"]}
    assert pl.read_delta(lake.recommendations_uri, storage_options=lake.storage_options).height == (
        lists.height + newest.height
    )
