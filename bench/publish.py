"""Top-k for every user of a synthetic 200k-user x 50k-item catalogue: our index + publish path against brute force.

Contenders, each in its own process (so peak RSS is its own), on the same vectors and histories:
- ``numpy``: blocked ``U @ V.T`` (BLAS), seen items set to -inf, ``argpartition`` + sort of the top k.
- ``torch``: the same with ``torch.mm`` + ``torch.topk`` (multi-threaded top-k).
- ``ours-search``: the FAISS index chosen by catalogue size (HNSW above 20k items), tuned to recall@k >= 0.99 on
  sampled users, queried through ``publish.top_k_unseen`` (seen items removed before the cut, deeper re-query).
- ``ours-lists``: the whole ``publish.build_lists`` (search + reasons + Arrow batches), batches consumed.
Brute force is timed on a seeded sample of users (its cost per user is constant; throughput = users / s) and is
the exact reference for our recall@k on that sample. Index build + tuning are timed separately.

    python bench/publish.py [--users 200000 --items 50000 --k 50 --peer-users 20000 --work /tmp/nightrec-bench-publish]

``--storage`` instead times only the publication of the lists (200k users x 50 by default, 3 reasons each, streamed
as record batches of 4096 users, as ``build_lists`` yields them), each contender in its own process on a fresh lake:
- ``store-generate``: the synthetic batches alone (the floor both paths pay);
- ``store-parquet``: before: the Parquet partition + manifest + ``LATEST`` pointer of commit 2f074c6 (its code taken
  from git history with ``git archive``, run on its own);
- ``store-delta``: after: today's ``publication.publish`` (uncommitted part, then one Delta commit), then the same
  night published again (a re-run: the partition overwrite).

The last line of stdout is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DIM = 64


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not carry the parent's peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(work: Path, users: int, items: int, seed: int = 0) -> dict:
    """Clustered items; each user's history comes from 1-3 clusters and their vector is its mean plus noise."""
    import polars as pl

    rng = np.random.default_rng(seed)
    n_clusters = 500
    centres = rng.normal(size=(n_clusters, DIM)).astype(np.float32)
    item_cluster = rng.integers(0, n_clusters, items)
    item_vecs = centres[item_cluster] + 0.6 * rng.normal(size=(items, DIM)).astype(np.float32)
    popularity = rng.zipf(1.3, items).clip(max=1000).astype(np.float64)
    bias = (0.3 * np.log(popularity)).astype(np.float32)[:, None]
    by_cluster = np.argsort(item_cluster, kind="stable")
    starts = np.searchsorted(item_cluster[by_cluster], np.arange(n_clusters + 1))
    lengths = np.minimum(rng.zipf(1.6, users) + 4, 300)
    owner = np.repeat(np.arange(users), lengths)
    user_clusters = rng.integers(0, n_clusters, (users, 3))
    cluster = user_clusters[owner, rng.integers(0, 3, len(owner))]
    size = starts[cluster + 1] - starts[cluster]
    picked = by_cluster[starts[cluster] + (rng.random(len(owner)) * size).astype(np.int64)]
    sums = np.zeros((users, DIM), np.float64)
    np.add.at(sums, owner, item_vecs[picked])
    user_vecs = (sums / lengths[:, None] + 0.3 * rng.normal(size=(users, DIM))).astype(np.float32)
    served_users = np.hstack([user_vecs, np.ones((users, 1), np.float32)])
    served_items = np.hstack([item_vecs, bias])
    np.save(work / "users.npy", served_users)
    np.save(work / "items.npy", served_items)
    base_us = int(dt.datetime(2026, 1, 1, tzinfo=dt.UTC).timestamp() * 1_000_000)
    pl.DataFrame(
        {
            "user_id": pl.Series(owner).cast(pl.String).str.pad_start(7, "0"),
            "item_id": pl.Series(picked).cast(pl.String).str.pad_start(6, "0"),
            "timestamp": pl.Series(base_us + (np.arange(len(owner)) % 100_000) * 60_000_000).cast(
                pl.Datetime("us", "UTC")
            ),
        }
    ).with_columns(pl.col("user_id").str.replace(r"^", "u"), pl.col("item_id").str.replace(r"^", "i")).write_parquet(
        work / "history.parquet"
    )
    return {"users": users, "items": items, "dim": DIM + 1, "events": int(len(owner))}


def load(work: Path):
    import polars as pl

    from nightrec.storage.vectors import ServedVectors

    users, items = np.load(work / "users.npy"), np.load(work / "items.npy")
    history = pl.read_parquet(work / "history.parquet")
    vectors = ServedVectors(
        [f"u{i:07d}" for i in range(len(users))],
        users,
        [f"i{j:06d}" for j in range(len(items))],
        items,
        {"bias_folded": True},
    )
    return vectors, history


def seen_csr(vectors, history):
    from nightrec.tasks import publish

    return publish.user_histories(history, vectors.user_ids, vectors.item_ids)


def sample_rows(n_users: int, n: int) -> np.ndarray:
    return np.sort(np.random.default_rng(7).choice(n_users, min(n, n_users), replace=False))


def part_numpy(work: Path, k: int, peer_users: int, block: int = 1024) -> dict:
    vectors, history = load(work)
    offsets, rows = seen_csr(vectors, history)
    sample = sample_rows(len(vectors.user_ids), peer_users)
    rss0 = peak_rss_mb()
    top = np.zeros((len(sample), k), np.int64)
    started = time.perf_counter()
    items_t = np.ascontiguousarray(vectors.item_matrix.T)
    for lo in range(0, len(sample), block):
        users = sample[lo : lo + block]
        scores = vectors.user_matrix[users] @ items_t
        for j, u in enumerate(users):
            scores[j, rows[offsets[u] : offsets[u + 1]]] = -np.inf
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
        top[lo : lo + block] = np.take_along_axis(part, order, axis=1)
    seconds = time.perf_counter() - started
    np.save(work / "exact_top.npy", top)
    return {
        "users": len(sample),
        "seconds": seconds,
        "users_per_s": len(sample) / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_load_mb": rss0,
    }


def part_torch(work: Path, k: int, peer_users: int, block: int = 1024) -> dict:
    import torch

    vectors, history = load(work)
    offsets, rows = seen_csr(vectors, history)
    sample = sample_rows(len(vectors.user_ids), peer_users)
    rss0 = peak_rss_mb()
    items_t = torch.from_numpy(np.ascontiguousarray(vectors.item_matrix.T))
    users_t = torch.from_numpy(vectors.user_matrix)
    started = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(sample), block):
            users = sample[lo : lo + block]
            scores = users_t[torch.from_numpy(users)] @ items_t
            own = np.repeat(np.arange(len(users)), offsets[users + 1] - offsets[users])
            cols = np.concatenate([rows[offsets[u] : offsets[u + 1]] for u in users])
            scores[torch.from_numpy(own), torch.from_numpy(cols)] = -torch.inf
            torch.topk(scores, k, dim=1)
    seconds = time.perf_counter() - started
    return {
        "users": len(sample),
        "seconds": seconds,
        "users_per_s": len(sample) / seconds,
        "threads": torch.get_num_threads(),
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_load_mb": rss0,
    }


def part_index(work: Path, k: int) -> dict:
    from nightrec.tasks import index

    vectors, _ = load(work)
    started = time.perf_counter()
    stats = index.build_checked_index(
        vectors.item_matrix, vectors.item_ids, vectors.user_matrix, work / "index", k=k, min_recall=0.99
    )
    return {**stats, "seconds": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}


def part_search(work: Path, k: int, peer_users: int, batch: int = 4096) -> dict:
    from nightrec.tasks import index, publish

    vectors, history = load(work)
    offsets, rows = seen_csr(vectors, history)
    item_index = index.load_index(work / "index")
    banned = np.zeros(item_index.ntotal, bool)
    rss0 = peak_rss_mb()
    n = len(vectors.user_ids)
    top = np.zeros((n, k), np.int64)
    started = time.perf_counter()
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        found, _, _ = publish.top_k_unseen(
            item_index,
            vectors.user_matrix[lo:hi],
            offsets[lo : hi + 1] - offsets[lo],
            rows[offsets[lo] : offsets[hi]],
            banned,
            k,
        )
        top[lo:hi] = found
    seconds = time.perf_counter() - started
    exact = np.load(work / "exact_top.npy")
    sample = sample_rows(n, len(exact))
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top[sample], exact, strict=True)]))
    return {
        "users": n,
        "seconds": seconds,
        "users_per_s": n / seconds,
        "recall_at_k": recall,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_load_mb": rss0,
    }


def part_lists(work: Path, k: int) -> dict:
    import polars as pl

    from nightrec.tasks import publish

    vectors, history = load(work)
    items = pl.DataFrame({"item_id": vectors.item_ids, "title": [f"Item {i}" for i in vectors.item_ids]})
    rss0 = peak_rss_mb()
    started = time.perf_counter()
    rows = 0
    for batch in publish.build_lists(
        vectors, work / "index", history, items, k=k, run_date=dt.date(2026, 6, 1), model_version="bench"
    ):
        rows += batch.num_rows
    seconds = time.perf_counter() - started
    n = len(vectors.user_ids)
    return {
        "users": n,
        "rows": rows,
        "seconds": seconds,
        "users_per_s": n / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_load_mb": rss0,
    }


OLD_PARQUET_COMMIT = "2f074c6"  # the last commit with the Parquet layout's publication


def synthetic_lists(users: int, k: int, batch_users: int = 4096):
    """Record batches in the RECOMMENDATIONS schema, user order, deterministic: what build_lists yields, minus the
    search (reasons: 3 per row, as the nightly makes them)."""
    import pyarrow as pa

    from nightrec.storage.schemas import RECOMMENDATIONS

    rng = np.random.default_rng(3)
    reason_type = RECOMMENDATIONS.field("reasons").type
    item_names = pa.array([f"i{j:06d}" for j in range(50_000)])
    titles = pa.array([f"Item {j}" for j in range(50_000)])
    day = dt.date(2026, 6, 1)
    for start in range(0, users, batch_users):
        n = min(batch_users, users - start)
        rows = n * k
        names = pa.array([f"u{u:07d}" for u in range(start, start + n)])
        user_ids = names.take(pa.array(np.repeat(np.arange(n), k)))
        items = pa.array(rng.integers(0, 50_000, rows))
        reason_items = pa.array(rng.integers(0, 50_000, rows * 3))
        struct = pa.StructArray.from_arrays(
            [
                item_names.take(reason_items),
                titles.take(reason_items),
                pa.array(rng.random(rows * 3, dtype=np.float32) / 3),
                pa.nulls(rows * 3, pa.string()),
            ],
            fields=list(reason_type.value_type),
        )
        reasons = pa.ListArray.from_arrays(pa.array(np.arange(0, rows * 3 + 1, 3, dtype=np.int32)), struct)
        yield pa.RecordBatch.from_arrays(
            [
                user_ids,
                pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), n)),
                item_names.take(items),
                pa.array(np.sort(rng.random(rows, dtype=np.float32).reshape(n, k), axis=1)[:, ::-1].ravel()),
                reasons.cast(reason_type),
                pa.array(np.full(rows, (day - dt.date(1970, 1, 1)).days, np.int32)).cast(pa.date32()),
                pa.array(["bench"]).take(pa.array(np.zeros(rows, np.int64))),
            ],
            schema=RECOMMENDATIONS,
        )


def part_store(work: Path, users: int, k: int, how: str) -> dict:
    """Publish the synthetic night with this process's nightrec (today's, or the old code on PYTHONPATH)."""
    import shutil

    import nightrec
    from nightrec.storage import publication
    from nightrec.storage.lake import Lake

    lake_dir = work / f"lake-{how}"
    shutil.rmtree(lake_dir, ignore_errors=True)
    rss0 = peak_rss_mb()
    day = dt.date(2026, 6, 1)
    started = time.perf_counter()
    if how == "generate":
        rows = sum(batch.num_rows for batch in synthetic_lists(users, k))
        first = time.perf_counter() - started
        return {"rows": rows, "seconds": first, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": rss0}
    lake = Lake(lake_dir)
    stats = publication.publish(lake, day, synthetic_lists(users, k), {"mlflow_run_id": "bench", "model_version": "1"})
    first = time.perf_counter() - started
    publish_rss = peak_rss_mb()  # before the re-run and the read: what the publication itself needed
    again = None
    if users <= 50_000:  # the re-run of the same night (partition overwrite); skipped at full size to stay short
        started = time.perf_counter()
        publication.publish(lake, day, synthetic_lists(users, k), {"mlflow_run_id": "bench2", "model_version": "1"})
        again = time.perf_counter() - started
    read, read_rows = None, None
    if users <= 200_000:  # the whole night into memory: about 2.4 GB at 200k users
        started = time.perf_counter()
        _, table = publication.read_latest(lake)
        read, read_rows = time.perf_counter() - started, table.num_rows
    return {
        "code": str(Path(nightrec.__file__).parent),
        "rows": stats["rows"],
        "bytes": stats["bytes"],
        "seconds": first,
        "republish_seconds": again,
        "read_latest_seconds": read,
        "read_rows": read_rows,
        "publish_peak_rss_mb": publish_rss,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": rss0,
    }


def old_parquet_code(work: Path) -> Path | None:
    """The old publication's package, from git history (None when this clone lacks the commit)."""
    target = work / f"nightrec-{OLD_PARQUET_COMMIT}"
    if (target / "nightrec").is_dir():
        return target
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "archive", OLD_PARQUET_COMMIT, "nightrec"], cwd=repo, capture_output=True)
    if archive.returncode != 0:
        return None
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def run_storage(args) -> None:
    import os
    import platform

    results = {}
    for how in ("generate", "parquet", "delta"):
        env = dict(os.environ)
        if how == "parquet":
            code = old_parquet_code(args.work)
            if code is None:
                print(f"store-parquet: skipped, commit {OLD_PARQUET_COMMIT} not in this clone", flush=True)
                continue
            env["PYTHONPATH"] = str(code)
        cmd = [sys.executable, __file__, "--part", f"store-{how}", "--work", str(args.work)]
        cmd += ["--users", str(args.users), "--k", str(args.k)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        results[how] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"store-{how}: {json.dumps(results[how])}", flush=True)
    summary = {
        "bench": "publish-storage",
        "users": args.users,
        "k": args.k,
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **{
            f"{how}_{key}": (round(v, 2) if isinstance(v, float) else v)
            for how, r in results.items()
            for key, v in r.items()
            if key not in ("code", "rss_before_mb")
        },
    }
    print(json.dumps(summary))


def run_part(name: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--part",
        name,
        "--work",
        str(args.work),
        "--k",
        str(args.k),
        "--peer-users",
        str(args.peer_users),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--peer-users", type=int, default=20_000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/nightrec-bench-publish"))
    parser.add_argument("--part")
    parser.add_argument("--storage", action="store_true", help="time the publication only: Parquet before, Delta after")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.part and args.part.startswith("store-"):
        print(json.dumps(part_store(args.work, args.users, args.k, args.part.removeprefix("store-")), default=str))
        return
    if args.storage:
        run_storage(args)
        return
    if args.part:
        parts = {
            "numpy": lambda: part_numpy(args.work, args.k, args.peer_users),
            "torch": lambda: part_torch(args.work, args.k, args.peer_users),
            "index": lambda: part_index(args.work, args.k),
            "search": lambda: part_search(args.work, args.k, args.peer_users),
            "lists": lambda: part_lists(args.work, args.k),
        }
        print(json.dumps(parts[args.part](), default=str))
        return
    started = time.perf_counter()
    data = generate(args.work, args.users, args.items)
    print(f"data: {data} in {time.perf_counter() - started:.1f}s", flush=True)
    res = {name: run_part(name, args) for name in ("numpy", "torch", "index", "search", "lists")}
    best_peer = max(res["numpy"]["users_per_s"], res["torch"]["users_per_s"])
    summary = {
        "bench": "publish",
        **data,
        "k": args.k,
        "factory": res["index"]["factory"],
        "search_params": res["index"]["search_params"],
        "index_build_s": round(res["index"]["seconds"], 2),
        "numpy_users_per_s": round(res["numpy"]["users_per_s"], 1),
        "torch_users_per_s": round(res["torch"]["users_per_s"], 1),
        "ours_search_users_per_s": round(res["search"]["users_per_s"], 1),
        "ours_lists_users_per_s": round(res["lists"]["users_per_s"], 1),
        "recall_at_k_vs_exact": round(res["search"]["recall_at_k"], 4),
        "speedup_search_vs_best_peer": round(res["search"]["users_per_s"] / best_peer, 2),
        "speedup_lists_vs_best_peer": round(res["lists"]["users_per_s"] / best_peer, 2),
        "speedup_search_incl_build_vs_best_peer": round(
            (args.users / (args.users / res["search"]["users_per_s"] + res["index"]["seconds"])) / best_peer, 2
        ),
        "peak_rss_mb": {name: round(r["peak_rss_mb"], 1) for name, r in res.items()},
        "rss_after_load_mb": {name: round(r.get("rss_after_load_mb", 0), 1) for name, r in res.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
