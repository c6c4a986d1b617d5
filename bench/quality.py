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


def _cold_warm(metrics: dict) -> dict:
    keys = ("warm_ndcg_at_10", "warm_recall_at_20", "cold_k1_ndcg_at_20", "cold_k3_ndcg_at_20", "cold_k5_ndcg_at_20")
    return {k: round(metrics[k], 4) for k in keys}


def ablations(dataset, vectors: np.ndarray, seed: int, epochs: int) -> dict[str, dict]:
    """Same chronological split, nightrec variants only: what each component and warm starting buys."""
    import dataclasses
    import tempfile

    from nightrec.tasks import evaluate, train

    item_ids = dataset.items["item_id"].to_list()
    _, seqs = train.user_sequences(dataset.events, {item: i for i, item in enumerate(item_ids)})
    split = evaluate.chronological_split([s for s in seqs if len(s)], seed)
    base = train.TrainConfig(seed=seed, epochs=epochs)
    rows: dict[str, dict] = {}

    def run(name: str, config, histories=None, ids=item_ids, text=vectors, **kw):
        started = time.perf_counter()
        scorer = evaluate.fit_nightrec(histories or split.train, ids, text, config, **kw)
        seconds = time.perf_counter() - started
        if ids is not item_ids:
            return scorer
        metrics, _ = evaluate.evaluate_split({"m": scorer}, split)
        rows[name] = {**_cold_warm(metrics["m"]), "train_s": round(seconds, 1)}
        print(name, rows[name], file=sys.stderr, flush=True)
        return scorer

    variants = {
        "full model": {},
        "no inner steps (no meta-learning)": {"inner_steps": 0},
        "no LM features": {"use_text": False},
        "no ID embedding": {"use_id": False},
        "inner steps = 1": {"inner_steps": 1},
        "inner steps = 3": {"inner_steps": 3},
        "inner steps = 5": {"inner_steps": 5},
    }
    for name, change in variants.items():
        run(name, dataclasses.replace(base, **change))
    short = dataclasses.replace(base, epochs=max(1, epochs // 3))
    with tempfile.TemporaryDirectory() as tmp:
        # nightly incremental: yesterday's champion saw each user's first 70 %; tonight adds the rest
        older = [s[: max(1, int(len(s) * 0.7))] for s in split.train]
        champion = evaluate.fit_nightrec(older, item_ids, vectors, base).recommender.save(Path(tmp) / "champion")
        run(f"scratch, {short.epochs} epochs", short)
        run(f"from champion, {short.epochs} epochs", short, init_from=champion)
        # transfer: a model trained on another catalogue (the even items, renamed so no item row maps by id)
        even = np.arange(0, len(item_ids), 2)
        remap = np.full(len(item_ids), -1)
        remap[even] = np.arange(len(even))
        source_hist = [remap[s[np.isin(s, even)]] for s in split.train]
        source_hist = [h for h in source_hist if len(h) >= 2]
        source_ids = [f"other-{item_ids[i]}" for i in even]
        source = run("source", base, source_hist, source_ids, vectors[even]).recommender.save(Path(tmp) / "source")
        run(f"transfer from another catalogue, {short.epochs} epochs", short, init_from=source)
        run("transfer, 0 epochs (text adaptor only)", dataclasses.replace(base, epochs=0), init_from=source)
    return rows


def main() -> None:
    from nightrec.sources import movielens
    from nightrec.tasks import evaluate, train

    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--ablations", action="store_true", help="nightrec variants and warm start instead of peers")
    args = parser.parse_args()
    dataset = movielens.load(DATASET)
    vectors = ml100k_vectors(dataset)
    if args.ablations:
        rows = ablations(dataset, vectors, args.seed, args.epochs or train.TrainConfig().epochs)
        columns = list(next(iter(rows.values())))
        print("| variant | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
        for name, values in rows.items():
            print(f"| {name} | " + " | ".join(str(values[c]) for c in columns) + " |")
        print(json.dumps(rows))
        return
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
