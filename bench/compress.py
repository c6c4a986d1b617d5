"""Compression table on MovieLens-100K: bytes of the served artifacts (user vectors + item index) and NDCG@10 for
every configuration ``compress.compress_served`` measures, against the uncompressed float32 vectors (the peer).

Protocol (docs/design.md): per-user chronological split, each user's last 20 % of interactions are the test set, seen
(training) items removed, full ranking over all items. The model is ``train.fit_recommender`` on the training part
with MiniLM item-text embeddings. The chosen configuration is then served for real (index built with its codec,
top-10 through ``publish.top_k_unseen``) and its NDCG@10 measured again through that path.

    python bench/compress.py [--dataset ../shared/datasets/movielens-100k] [--epochs 120] [--figure /tmp/x.png]

The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

REPO = Path(__file__).resolve().parents[1]


def chronological_split(events: pl.DataFrame, test_share: float = 0.2) -> tuple[pl.DataFrame, pl.DataFrame]:
    ranked = events.sort(["user_id", "timestamp", "item_id"]).with_columns(
        pl.int_range(pl.len()).over("user_id").alias("pos"), pl.len().over("user_id").alias("n")
    )
    cut = (pl.col("n") - (pl.col("n") * test_share).round().cast(pl.Int64).clip(lower_bound=1)).alias("cut")
    ranked = ranked.with_columns(cut)
    return ranked.filter(pl.col("pos") < pl.col("cut")), ranked.filter(pl.col("pos") >= pl.col("cut"))


def ndcg_quality(train: pl.DataFrame, test: pl.DataFrame, k: int = 10):
    """NDCG@k of served vectors on ``test`` with ``train`` items removed (binary relevance, full ranking)."""
    discounts = 1.0 / np.log2(np.arange(2, k + 2))

    def lists(frame: pl.DataFrame, user_ids, item_index) -> list[np.ndarray]:
        grouped = dict(
            frame.with_columns(pl.col("item_id").replace_strict(item_index, default=None, return_dtype=pl.Int64))
            .drop_nulls("item_id")
            .group_by("user_id")
            .agg(pl.col("item_id").unique())
            .iter_rows()
        )
        return [np.asarray(grouped.get(u, []), np.int64) for u in user_ids]

    def ndcg_of_top(top: np.ndarray, relevant: list[np.ndarray]) -> float:
        gains = []
        for row, rel in zip(top, relevant, strict=True):
            if len(rel):
                hits = np.isin(row[:k], rel)
                gains.append((hits * discounts).sum() / discounts[: min(len(rel), k)].sum())
        return float(np.mean(gains))

    def quality(vectors) -> float:
        item_index = {item: i for i, item in enumerate(vectors.item_ids)}
        seen = lists(train, vectors.user_ids, item_index)
        scores = vectors.user_matrix @ vectors.item_matrix.T
        for u, rows in enumerate(seen):
            scores[u, rows] = -np.inf
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        top = np.take_along_axis(part, np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1), axis=1)
        return ndcg_of_top(top, lists(test, vectors.user_ids, item_index))

    quality.lists = lists
    quality.ndcg_of_top = ndcg_of_top
    return quality


def served_through_index(result, train: pl.DataFrame, quality, k: int = 10) -> dict:
    """Build the real index with the chosen codec and rank through the publish path: NDCG@10 and bytes as served."""
    from nightrec.tasks import index, publish

    vectors = result.vectors
    item_index = {item: i for i, item in enumerate(vectors.item_ids)}
    with tempfile.TemporaryDirectory() as tmp:
        stats = index.build_checked_index(
            vectors.item_matrix, vectors.item_ids, vectors.user_matrix, Path(tmp) / "idx", k=50, codec=result.codec
        )
        loaded = index.load_index(Path(tmp) / "idx")
        seen = quality.lists(train, vectors.user_ids, item_index)
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in seen])])
        rows, _, _ = publish.top_k_unseen(
            loaded, vectors.user_matrix, offsets, np.concatenate(seen), np.zeros(loaded.ntotal, bool), k
        )
        ndcg = quality.ndcg_of_top(rows, quality.lists(quality.test, vectors.user_ids, item_index))
    return {"factory": stats["factory"], "index_bytes": stats["index_bytes"], "ndcg_at_10_served": ndcg}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", type=Path, default=REPO.parent / "shared" / "datasets" / "movielens-100k")
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--figure", type=Path, default=Path("/tmp/nightrec-compression.png"))
    args = parser.parse_args()

    from nightrec.model import TrainConfig
    from nightrec.settings import Settings
    from nightrec.sources import movielens
    from nightrec.tasks import compress, embed, train

    started = time.perf_counter()
    data = movielens.load(args.dataset)
    train_events, test_events = chronological_split(data.events)
    items = data.items
    encoder = embed.load_encoder(Settings().embedding_model)
    text = encoder.encode(embed.item_texts(items, Settings().item_text_template), batch_size=64)
    item_ids = items["item_id"].to_list()
    model = train.fit_recommender(train_events, item_ids, text, None, TrainConfig(epochs=args.epochs))
    users = sorted(data.events["user_id"].unique().to_list())
    served = model.served_vectors(train_events, users)
    print(
        f"trained in {time.perf_counter() - started:.0f}s; served vectors {served.user_matrix.shape} users, "
        f"{served.item_matrix.shape} items",
        flush=True,
    )

    quality = ndcg_quality(train_events, test_events)
    quality.test = test_events
    t0 = time.perf_counter()
    result = compress.compress_served(served, quality, tolerance=args.tolerance, seed=42)
    search_s = time.perf_counter() - t0
    print("| configuration | bytes | ratio | NDCG@10 | relative loss |")
    print("|---|---:|---:|---:|---:|")
    for row in sorted(result.table, key=lambda r: r["bytes"], reverse=True):
        mark = " **chosen**" if row["config"] == result.chosen else ""
        print(
            f"| {row['config']}{mark} | {row['bytes']:,} | {row['size_ratio']:.1f}x | {row['ndcg_at_10']:.4f} | "
            f"{row['relative_loss']:+.2%} |"
        )
    result.figure().savefig(args.figure, dpi=110)
    chosen = next(r for r in result.table if r["config"] == result.chosen)
    served_check = served_through_index(result, train_events, quality)
    base = result.table[0]
    print(
        json.dumps(
            {
                "bench": "compress",
                "dataset": "movielens-100k",
                "users": len(served.user_ids),
                "items": len(served.item_ids),
                "configurations": len(result.table),
                "search_seconds": round(search_s, 1),
                "baseline_bytes": base["bytes"],
                "baseline_ndcg_at_10": round(base["ndcg_at_10"], 4),
                "chosen": result.chosen,
                "chosen_bytes": chosen["bytes"],
                "chosen_ndcg_at_10": round(chosen["ndcg_at_10"], 4),
                "size_ratio": round(chosen["size_ratio"], 2),
                "relative_loss": round(chosen["relative_loss"], 4),
                "served_factory": served_check["factory"],
                "served_user_bytes": chosen["user_bytes"],
                "served_index_bytes": served_check["index_bytes"],
                "served_ndcg_at_10": round(served_check["ndcg_at_10_served"], 4),
                "figure": str(args.figure),
            }
        )
    )


if __name__ == "__main__":
    main()
