"""Scale-out: the embedding and publish stages as shard tasks on a local Ray cluster give the local runner's output.

Two homes get the same demo data; one night runs with the default local runner (one shard, in the flow's process) on
a local lake, the other with ``task_runner=ray`` and two shards (item chunks, user ranges) on a two-CPU local Ray
instance, with its lake on an S3-compatible server (moto, its own process on 127.0.0.1): the Ray workers write their
list parts straight to the store and the flow commits them once. Both go through the real Prefect server. Vectors and
lists must not depend on where, in how many shards, or on which store they were made.
"""

from __future__ import annotations

import os
import socket
import uuid

import numpy as np
import polars as pl
import pytest
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import TaskRunSort

from nightrec.flows.scaleout import worker_environment
from nightrec.settings import Settings
from nightrec.shards import shard_bounds
from nightrec.sources.demo import DemoSpec
from nightrec.storage import delta, publication
from nightrec.storage.lake import Lake
from nightrec.tasks.embed import chunk_rows
from tests.flows.conftest import FIRST_NIGHT, SMALL, demo_home

# Smaller than the other flow tests' demo: this module runs two whole nights.
SPEC = DemoSpec(users=80, items=120, events=3000, days=40, end=SMALL.end, seed=SMALL.seed)

ray = pytest.importorskip("ray", reason="scale-out needs ray (and prefect-ray)")


def test_shards_cover_every_row_once():
    for rows in (0, 1, 7, 100):
        for shards in range(1, 6):
            bounds = [shard_bounds(rows, shard, shards) for shard in range(shards)]
            assert [row for start, stop in bounds for row in range(start, stop)] == list(range(rows))
    with pytest.raises(ValueError):
        shard_bounds(10, 2, 2)


def test_shards_take_whole_chunks():
    assert [chunk_rows(100, 32, shard, 2) for shard in range(2)] == [(0, 64), (64, 100)]
    assert [chunk_rows(100, 32, shard, 8) for shard in range(8)][-1] == (96, 100)  # 4 chunks for 8 shards
    assert sum(stop - start for start, stop in (chunk_rows(100, 32, s, 8) for s in range(8))) == 100


def test_workers_read_back_the_flows_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NIGHTREC_HOME", "relative-home")  # a worker's working directory is elsewhere
    monkeypatch.setenv("NIGHTREC_EVENT_COLUMNS", '{"user_id": "customer"}')
    monkeypatch.setenv("NIGHTREC_TOP_K", "7")
    flow_settings = Settings()
    env = worker_environment(flow_settings)
    for key in [k for k in os.environ if k.startswith("NIGHTREC_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir("/")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    worker_settings = Settings()
    assert worker_settings.model_dump() == {**flow_settings.model_dump(), "lake": str(flow_settings.lake_root)}
    assert worker_settings.home == tmp_path / "relative-home" and worker_settings.event_columns["user_id"] == "customer"


def run_night(root, **env) -> dict:
    """One nightly in a fresh home under ``root``; its lists, vectors and summary, read back from the lake."""
    from nightrec.flows.nightly import nightly
    from nightrec.tasks import embed

    with pytest.MonkeyPatch.context() as mp:
        demo_home(root, mp, SPEC)
        mp.setenv("NIGHTREC_TRAIN_EPOCHS", "2")  # where the shards run is under test, not the model
        # Shards share out whole chunks of texts to embed: small chunks give both shards work on the demo.
        mp.setenv("NIGHTREC_EMBEDDING_CHUNK_SIZE", "32")
        for key, value in env.items():
            mp.setenv(key, value)
        summary = nightly(run_date=FIRST_NIGHT)
        settings = Settings()
        lake = Lake(settings.lake_root)
        _, table = publication.read_latest(lake)
        commits = delta.open_table(lake.recommendations_uri, lake.storage_options).history()
        item_ids = sorted(lake.read_items()["item_id"].to_list())
        users = embed.load_user_embeddings(lake, settings, FIRST_NIGHT)
        parent = MlflowClient(settings.tracking_uri).get_run(summary["mlflow_run_id"])
        return {
            "flow_run_id": parent.data.tags["prefect.flow_run_id"],
            "summary": summary,
            "lists": pl.from_arrow(table).sort("user_id", "rank"),
            "items": embed.load_item_embeddings(lake, settings, item_ids),
            "users": np.stack([users[u] for u in sorted(users)]),
            "user_ids": sorted(users),
            "publishes": [c for c in commits if c.get("nightrec.run_date") == FIRST_NIGHT.isoformat()],
        }


@pytest.fixture(scope="module")
def nights(prefect_server, tmp_path_factory):
    from tests.s3server import create_bucket, list_keys, moto_server

    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as s3:
        create_bucket(s3, "nightrec-ray")
        # Small enough for a 2-core CI machine; the night connects to it instead of starting its own. The workers
        # get the AWS_* variables from the flow (scaleout.worker_environment).
        ray.init(num_cpus=2, include_dashboard=False, namespace="nightrec-tests")
        try:
            # A fresh prefix: the lake's local caches are keyed by its URI.
            prefix = f"lake-{uuid.uuid4().hex[:8]}"
            store = {**s3, "NIGHTREC_LAKE": f"s3://nightrec-ray/{prefix}"}
            scaled = run_night(tmp_path_factory.mktemp("ray"), NIGHTREC_TASK_RUNNER="ray", NIGHTREC_SHARDS="2", **store)
        finally:
            ray.shutdown()
        scaled["keys"] = list_keys(s3, "nightrec-ray", f"{prefix}/recommendations/")
    local = run_night(tmp_path_factory.mktemp("local"))
    return local, scaled


@pytest.mark.prefect
@pytest.mark.slow
def test_the_shard_tasks_ran_on_ray_workers(nights):
    local, scaled = nights
    assert "shards" not in local["summary"]["embed_items"]  # the default stays the unsharded stage
    here = f"{socket.gethostname()}:{os.getpid()}"
    for stage in ("embed_items", "embed_users", "publish"):
        assert scaled["summary"][stage]["shards"] == 2
        workers = scaled["summary"][stage]["workers"]
        assert workers and here not in workers, f"{stage} ran in the test's process: {workers}"


@pytest.mark.prefect
@pytest.mark.slow
def test_prefect_records_one_task_run_per_shard(nights):
    _, scaled = nights
    flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[scaled["flow_run_id"]]))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=flow_run, sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)
    states = {r.name: r.state.type.value for r in runs}
    for stage in ("embed-items", "embed-users", "publish"):
        for shard in (0, 1):
            assert states.get(f"{stage}-{shard}-of-2") == "COMPLETED", states


@pytest.mark.prefect
@pytest.mark.slow
def test_the_shards_wrote_their_parts_to_the_store_and_the_flow_committed_once(nights):
    _, scaled = nights
    parts = [k for k in scaled["keys"] if f"run_date={FIRST_NIGHT.isoformat()}/part-" in k]
    assert sorted(k.split("/part-")[1][:14] for k in parts) == ["00000-of-00002", "00001-of-00002"], parts
    assert len(scaled["publishes"]) == 1  # one commit for the night, both shards' parts in it


@pytest.mark.prefect
@pytest.mark.slow
def test_item_and_user_embeddings_equal_the_local_run(nights):
    local, scaled = nights
    np.testing.assert_array_equal(scaled["items"], local["items"])
    assert scaled["user_ids"] == local["user_ids"]
    np.testing.assert_array_equal(scaled["users"], local["users"])


@pytest.mark.prefect
@pytest.mark.slow
def test_published_lists_equal_the_local_run(nights):
    local, scaled = nights
    a, b = local["lists"], scaled["lists"]
    assert a.height == b.height > 0
    assert a["user_id"].to_list() == b["user_id"].to_list()
    assert a["rank"].to_list() == b["rank"].to_list()
    assert a["item_id"].to_list() == b["item_id"].to_list()
    np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), rtol=1e-5, atol=1e-6)
    reasons = [pl.col("reasons").list.eval(pl.element().struct.field(f)).alias(f) for f in ("item_id", "title")]
    assert a.select(reasons).to_dicts() == b.select(reasons).to_dicts()
    weights = pl.col("reasons").list.eval(pl.element().struct.field("weight")).explode()
    np.testing.assert_allclose(a.select(weights).to_series(), b.select(weights).to_series(), atol=1e-6)
