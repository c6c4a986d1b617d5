"""ML-100K quality: nightrec against popularity, item-kNN, EASE, implicit ALS and text-only, DESIGN.md protocol.

Run: ``/work/venv/bin/python bench/quality.py [--epochs N] [--ablations]``. Prints the markdown table, then ONE JSON
object as the last line (nightrec / best-peer ratios per segment). Item text vectors are cached in tmp/.cache.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASET = Path(os.environ.get("NIGHTREC_DATASETS", REPO.parent / "shared" / "datasets")) / "movielens-100k"
CACHE = REPO / "tmp" / ".cache"


def item_text(title: str, genres: list[str], description: str | None) -> str:
    return f"{title}. Genres: {', '.join(genres or [])}. {description or ''}".strip()


def ml100k_vectors(dataset, cache: Path = CACHE) -> np.ndarray:
    """MiniLM vectors of the ML-100K item texts (row i = dataset.items row i), cached by the texts' digest."""
    texts = [
        item_text(t, g, d)
        for t, g, d in zip(
            dataset.items["title"].to_list(),
            dataset.items["genres"].to_list(),
            dataset.items["description"].to_list(),
            strict=True,
        )
    ]
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = cache / f"ml100k-minilm-{digest}.npy"
    if path.exists():
        return np.load(path)
    from nightrec.tasks.embed import load_encoder

    vectors = load_encoder().encode(texts, batch_size=64)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def main() -> None:
    from nightrec.sources import movielens
    from nightrec.tasks import evaluate, train

    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    dataset = movielens.load(DATASET)
    vectors = ml100k_vectors(dataset)
    config = train.TrainConfig(seed=args.seed)
    if args.epochs:
        config.epochs = args.epochs
    started = time.perf_counter()
    result = evaluate.run_protocol(
        dataset, vectors, config, seed=args.seed, progress=lambda m: print(m, file=sys.stderr)
    )
    print(result.to_markdown())
    m = result.metrics
    peers = [p for p in m if p != "nightrec"]
    summary = {"seconds": round(time.perf_counter() - started, 1)}
    for metric in (
        "warm_ndcg_at_10",
        "cold_k1_ndcg_at_20",
        "cold_k3_ndcg_at_20",
        "cold_k5_ndcg_at_20",
        "strat_ndcg_at_10",
    ):
        best = max(peers, key=lambda p: m[p].get(metric, float("-inf")))
        summary[metric] = round(m["nightrec"][metric], 4)
        summary[f"{metric}_best_peer"] = best
        summary[f"{metric}_ratio"] = round(m["nightrec"][metric] / m[best][metric], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
