"""Scale-out of the embedding and publish stages: item and user ranges as parallel Prefect tasks, on Ray or here.

With ``task_runner=ray`` the shard tasks are submitted to a Ray cluster through prefect-ray's ``RayTaskRunner`` (a
local Ray instance by default, else ``ray_address``) and run in parallel; with ``local`` they run one after another
in the flow's process, and with one shard the stages are the plain tasks of :mod:`nightrec.flows.stages`.

``wait_for`` is the upstream stage's result, passed on to the plain task so Prefect's run graph draws the edge.

Each stage keeps one MLflow child run, opened and closed by the flow's process, and ends in one combining step there:
the item cache is compacted once, the user snapshot is swapped in once, and the lists go out as ONE atomic
publication streamed from the shards' files. Shards write only their own files and never talk to MLflow, so a shard
retried by Prefect starts clean and the MLflow store sees one writer.

Ray workers are other processes (on a cluster, other machines): they get the flow's resolved settings as
``NIGHTREC_*`` variables through a Ray ``runtime_env`` and read and write under ``NIGHTREC_HOME``, which must
therefore be a filesystem they share with the flow (docs/scale-out.md).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prefect import task

from nightrec.flows import stages
from nightrec.settings import Settings
from nightrec.storage import tracking
from nightrec.storage.lake import Lake

# Variables besides NIGHTREC_* that change what a worker computes or whether it may reach the network.
PASSED_ENV = ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM")
OBJECT_STORE_ENV = ("AWS_", "GOOGLE_", "AZURE_", "DELTA_DYNAMO_")  # what delta-rs reads for the store


def _worker() -> str:
    """Where a shard ran (host:pid), reported in the stage's summary: on a cluster, which node to look at."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _workers(parts: list[dict]) -> list[str]:
    return sorted({part["worker"] for part in parts})


@dataclass
class ShardPlan:
    """How many ranges a sharded stage is cut into, and where their tasks run (``runner`` None: this process)."""

    shards: int = 1
    runner: object | None = None  # a started prefect_ray.RayTaskRunner
    env: dict[str, str] = field(default_factory=dict)
    cpus_per_shard: int = 1  # what Ray reserves for each shard task

    @property
    def sharded(self) -> bool:
        return self.runner is not None or self.shards > 1

    def run(self, shard_task, parameters: list[dict]) -> list:
        """Run ``shard_task`` once per parameter set; results in the same order. Waits for every shard before
        raising the first failure, so no shard is still writing when the stage gives up."""
        if self.runner is None:
            return [shard_task(**p) for p in parameters]
        from prefect.futures import wait
        from prefect_ray.context import remote_options

        with remote_options(num_cpus=self.cpus_per_shard, runtime_env={"env_vars": self.env}):
            futures = [self.runner.submit(shard_task, p) for p in parameters]
        wait(futures)
        return [f.result() for f in futures]

    def ranges(self, **fixed) -> list[dict]:
        return [{**fixed, "shard": shard, "shards": self.shards} for shard in range(self.shards)]


def worker_environment(settings: Settings) -> dict[str, str]:
    """The flow's settings, resolved, as the ``NIGHTREC_*`` variables a worker's ``Settings()`` reads back
    (absolute paths, so a worker's working directory does not matter)."""
    env = {key: value for key, value in os.environ.items() if key.startswith("NIGHTREC_")}  # e.g. failpoints
    for name, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"NIGHTREC_{name.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    env["NIGHTREC_HOME"] = str(settings.home)
    env["NIGHTREC_LAKE"] = str(settings.lake_root)
    env.update({key: os.environ[key] for key in PASSED_ENV if key in os.environ})
    # An object-store lake: the workers write their parts there with the flow's credentials and endpoint.
    env.update({key: value for key, value in os.environ.items() if key.startswith(OBJECT_STORE_ENV)})
    return env


@contextlib.contextmanager
def shard_plan(settings: Settings) -> Iterator[ShardPlan]:
    """The night's plan; with ``task_runner=ray``, Ray is connected (or started) for the night and shut down after."""
    if settings.task_runner != "ray":
        yield ShardPlan(shards=settings.shards or 1)
        return
    from nightrec.extras import require

    ray = require("ray", "ray", "task_runner=ray")
    RayTaskRunner = require("prefect_ray", "ray", "task_runner=ray").RayTaskRunner

    owns = not ray.is_initialized()
    if owns:
        # Initialised here, not by the runner: prefect-ray treats address="auto" as "start a new instance".
        if settings.ray_address:
            ray.init(address=settings.ray_address, namespace="nightrec")
        else:
            ray.init(include_dashboard=False, namespace="nightrec")
    try:
        with RayTaskRunner(address=settings.ray_address) as runner:
            total, largest = _cluster_cpus(ray)
            shards = settings.shards or total
            # Each shard reserves an equal share of the cluster (never more than one node has, or it would wait
            # forever) and, unless threads are configured, embeds with that many threads: no oversubscription.
            cpus = max(1, min(largest, total // shards))
            env = worker_environment(settings)
            if not settings.embedding_threads:
                env["NIGHTREC_EMBEDDING_THREADS"] = str(cpus)  # the thread count does not change the vectors
            yield ShardPlan(shards=shards, runner=runner, env=env, cpus_per_shard=cpus)
    finally:
        if owns:
            ray.shutdown()


def _cluster_cpus(ray) -> tuple[int, int]:
    """(CPUs of the whole cluster, CPUs of its largest live node)."""
    total = max(1, int(ray.cluster_resources().get("CPU", 1)))
    nodes = [int(node.get("Resources", {}).get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
    return total, max(1, max(nodes, default=total))


# --- shard tasks (run on Ray workers or in this process) ------------------------------------------------------------
@task(name="embed-items-shard", task_run_name="embed-items-{shard}-of-{shards}", **stages.RETRY)
def embed_items_shard(todo_file: str, shard: int, shards: int) -> dict:
    """Embed this shard's chunks of the night's item list into the shared cache (own part files only)."""
    import polars as pl

    from nightrec.tasks import embed

    settings = Settings()
    todo = pl.read_parquet(todo_file)
    return {**embed.embed_item_chunks(Lake(settings.lake_root), settings, todo, shard, shards), "worker": _worker()}


@task(name="embed-users-shard", task_run_name="embed-users-{shard}-of-{shards}", **stages.RETRY)
def embed_users_shard(run_date: dt.date, folder: str, shard: int, shards: int) -> dict:
    """Profile vectors of one user range as part files in ``folder`` (emptied first: a retry starts clean)."""
    from nightrec.tasks import embed

    settings = Settings()
    shutil.rmtree(folder, ignore_errors=True)
    stats = embed.embed_user_range(Lake(settings.lake_root), settings, run_date, Path(folder), shard, shards)
    return {**stats, "worker": _worker()}


@task(name="publish-shard", task_run_name="publish-{shard}-of-{shards}", **stages.RETRY)
def publish_shard(run_date: dt.date, workdir: str, parent_run_id: str, shard: int, shards: int) -> dict:
    """The lists of one user range, written by this worker straight into the lake's recommendations table as an
    uncommitted part (local folder or object store alike). Returns the part's description; the flow's process checks
    every shard's part and commits them all at once (:func:`publish_lists`)."""
    from nightrec.storage import publication
    from nightrec.storage.vectors import load_served_vectors

    settings = Settings()
    lake = Lake(settings.lake_root)
    vectors = load_served_vectors(Path(workdir) / "vectors")
    history = stages.night_events(lake, run_date)
    batches = stages.night_lists(settings, lake, run_date, Path(workdir), vectors, history, shard, shards)
    pointer = {"mlflow_run_id": parent_run_id}
    parts, rows, users = publication.write_parts(lake, run_date, batches, pointer, name=f"{shard:05d}-of-{shards:05d}")
    return {**parts.describe(), "rows": rows, "users": users, "worker": _worker()}


# --- the stages, sharded --------------------------------------------------------------------------------------------
def embed_items(plan: ShardPlan | None, parent_run_id: str, workdir: str, wait_for: list | None = None) -> dict:
    """Item vectors: the items to embed listed once, one task per share of their chunks, one cache compaction."""
    if plan is None or not plan.sharded:
        return stages.embed_items(parent_run_id, wait_for=wait_for)
    from nightrec.storage import atomic
    from nightrec.tasks import embed

    with stages._Stage(parent_run_id, "embed-items") as st:
        tracking.log_params(
            st.client,
            st.run_id,
            {"model": st.settings.embedding_model, "template": st.settings.item_text_template, "shards": plan.shards},
        )
        start = time.perf_counter()
        embed.prepare_item_cache(st.lake, st.settings)  # before any shard writes: it removes temporary files
        catalogue, todo = embed.items_to_embed(st.lake, st.settings)
        todo_file = Path(workdir) / "items-to-embed.parquet"
        atomic.write_parquet_atomic(todo.to_arrow(), todo_file)
        parts = plan.run(embed_items_shard, plan.ranges(todo_file=str(todo_file)))
        compaction = embed.finish_item_cache(st.lake, st.settings)
        stats = embed.item_stats(catalogue, parts, compaction, time.perf_counter() - start)
        st.metrics(stats)
        return {**stats, "shards": plan.shards, "workers": _workers(parts)}


def embed_users(
    plan: ShardPlan | None, run_date: dt.date, parent_run_id: str, workdir: str, wait_for: list | None = None
) -> dict:
    """User vectors: one task per user range into the work folder, then one swap of the day's snapshot."""
    if plan is None or not plan.sharded:
        return stages.embed_users(run_date, parent_run_id, wait_for=wait_for)
    from nightrec.tasks import embed

    with stages._Stage(parent_run_id, "embed-users") as st:
        start = time.perf_counter()
        folders = [str(Path(workdir) / "user-embeddings" / f"shard-{i:05d}") for i in range(plan.shards)]
        ranges = [{**r, "folder": folders[r["shard"]]} for r in plan.ranges(run_date=run_date)]
        parts = plan.run(embed_users_shard, ranges)
        embed.publish_user_parts(st.lake, run_date, [Path(f) for f in folders])
        stats = {key: float(sum(p[key] for p in parts)) for key in ("users", "embedded", "pooled", "reused")}
        stats["seconds"] = time.perf_counter() - start
        st.metrics(stats)
        return {**stats, "shards": plan.shards, "workers": _workers(parts)}


def publish_lists(
    plan: ShardPlan | None, run_date: dt.date, parent_run_id: str, workdir: str, wait_for: list | None = None
) -> dict:
    """Lists: one task per user range, each writing its part straight into the lake's table (uncommitted), then the
    flow's process checks all parts and commits them in ONE transaction: readers see the whole night or none of it.
    A retried or re-run shard writes a new part; parts no commit names are deleted by VACUUM (retention)."""
    if plan is None or not plan.sharded:
        return stages.publish_lists(run_date, parent_run_id, workdir, wait_for=wait_for)
    from nightrec.storage import publication
    from nightrec.storage.vectors import load_served_vectors

    with stages._Stage(parent_run_id, "publish") as st:
        ranges = plan.ranges(run_date=run_date, workdir=workdir, parent_run_id=parent_run_id)
        shard_stats = plan.run(publish_shard, ranges)
        written = publication.ShardParts.from_descriptions(st.lake, run_date, shard_stats)
        served = load_served_vectors(Path(workdir) / "vectors")
        history = stages.night_events(st.lake, run_date)
        stats = stages.publish_checked(st, run_date, Path(workdir), written, history, served.user_ids, served.item_ids)
        return {**stats, "shards": plan.shards, "workers": _workers(shard_stats)}
