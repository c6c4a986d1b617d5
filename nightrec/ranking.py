"""Ranking metrics and top-k with seen items removed, shared by training, evaluation and compression.

Pure numpy (torch tensors are accepted and converted). Conventions follow the Microsoft Recommenders evaluation:
every held-out interaction is relevant (binary relevance), seen items are removed before ranking, and a user with no
relevant items is left out of the averages.

- NDCG@k: DCG = sum over hits of 1 / log2(rank + 1); ideal DCG assumes min(|relevant|, k) hits at the top.
- Recall@k: hits / |relevant|.  Precision@k: hits / k.
- MAP@k: sum of precision at each hit's rank, divided by min(|relevant|, k).
- Coverage: share of the catalogue that appears in at least one user's top-k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

IntLists = Sequence[np.ndarray] | Sequence[Sequence[int]]


def _as_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor, without importing torch here
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _flatten(lists: IntLists) -> tuple[np.ndarray, np.ndarray]:
    """Row index and column index of every entry of a ragged list of int lists."""
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    rows = np.repeat(np.arange(len(lists)), lengths)
    cols = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]) if lengths.sum() else np.zeros(0, np.int64)
    return rows, cols


def top_k_unseen(scores, seen: IntLists | None, k: int) -> np.ndarray:
    """Indices of the k best-scored items per row, best first, never an item in ``seen[row]``.

    Ties are broken by the lower item index so results are deterministic. Rows with fewer than k unseen items are
    padded with -1.
    """
    scores = np.array(_as_numpy(scores), dtype=np.float64, copy=True)
    n_rows, n_items = scores.shape
    if seen is not None and len(seen):
        rows, cols = _flatten(seen)
        scores[rows, cols] = -np.inf
    k_eff = min(k, n_items)
    # argpartition then a stable sort of the candidates: O(n_items) per row instead of a full sort.
    part = (
        np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
        if k_eff < n_items
        else np.tile(np.arange(n_items), (n_rows, 1))
    )
    part.sort(axis=1)  # lower index first among equal scores after the stable sort below
    cand = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-cand, axis=1, kind="stable")
    top = np.take_along_axis(part, order, axis=1)
    top_scores = np.take_along_axis(cand, order, axis=1)
    top[~np.isfinite(top_scores)] = -1
    if k_eff < k:
        top = np.pad(top, ((0, 0), (0, k - k_eff)), constant_values=-1)
    return top


def _hits(top: np.ndarray, relevant: IntLists, k: int) -> np.ndarray:
    """Boolean (n_users, k): whether the item at each rank is relevant."""
    top = _as_numpy(top)[:, :k]
    hits = np.zeros(top.shape, dtype=bool)
    for u, rel in enumerate(relevant):
        if len(rel):
            hits[u] = np.isin(top[u], np.asarray(rel)) & (top[u] >= 0)
    return hits


def _n_relevant(relevant: IntLists) -> np.ndarray:
    return np.fromiter((len(set(np.asarray(r).tolist())) for r in relevant), dtype=np.float64, count=len(relevant))


def per_user_metrics(top, relevant: IntLists, k: int) -> dict[str, np.ndarray]:
    """NDCG, recall, precision and MAP at k for every user (NaN where a user has no relevant items)."""
    hits = _hits(top, relevant, k)
    n_rel = _n_relevant(relevant)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (hits * discounts).sum(1)
    ideal_hits = np.minimum(n_rel, k).astype(np.int64)
    idcg = np.concatenate([[0.0], np.cumsum(discounts)])[ideal_hits]
    n_hits = hits.sum(1)
    precision_at_rank = np.cumsum(hits, 1) / np.arange(1, k + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        valid = n_rel > 0
        return {
            "ndcg": np.where(valid, dcg / idcg, np.nan),
            "recall": np.where(valid, n_hits / n_rel, np.nan),
            "precision": np.where(valid, n_hits / k, np.nan),
            "map": np.where(valid, (precision_at_rank * hits).sum(1) / np.minimum(n_rel, k), np.nan),
        }


def ndcg_at_k(top, relevant: IntLists, k: int) -> float:
    return float(np.nanmean(per_user_metrics(top, relevant, k)["ndcg"]))


def recall_at_k(top, relevant: IntLists, k: int) -> float:
    return float(np.nanmean(per_user_metrics(top, relevant, k)["recall"]))


def precision_at_k(top, relevant: IntLists, k: int) -> float:
    return float(np.nanmean(per_user_metrics(top, relevant, k)["precision"]))


def map_at_k(top, relevant: IntLists, k: int) -> float:
    return float(np.nanmean(per_user_metrics(top, relevant, k)["map"]))


def catalogue_coverage(top, n_items: int) -> float:
    """Share of the ``n_items`` catalogue recommended to at least one user."""
    top = _as_numpy(top)
    return float(np.unique(top[top >= 0]).size / n_items) if n_items else 0.0


def summary(top, relevant: IntLists, ks: Sequence[int] = (10, 20), n_items: int | None = None) -> dict[str, float]:
    """``{"ndcg@10": …, "recall@20": …, "coverage@10": …}`` over users with at least one relevant item."""
    out: dict[str, float] = {}
    top = _as_numpy(top)
    for k in ks:
        for name, values in per_user_metrics(top, relevant, k).items():
            out[f"{name}@{k}"] = float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")
        if n_items:
            out[f"coverage@{k}"] = catalogue_coverage(top[:, :k], n_items)
    return out
