"""Events to item-index histories and histories to padded tensors: what the model reads, for training and evaluation."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch


def pad_histories(histories: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-aligned (B, L) indices and mask of each history's newest ``max_len`` items (time order kept)."""
    length = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    idx = np.zeros((len(histories), length), dtype=np.int64)
    mask = np.zeros((len(histories), length), dtype=bool)
    for row, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-length:]
        idx[row, : len(h)] = h
        mask[row, : len(h)] = True
    return torch.from_numpy(idx), torch.from_numpy(mask)


def user_sequences(
    events: pl.DataFrame, item_index: dict[str, int], user_ids: list[str] | None = None
) -> tuple[list[str], list[np.ndarray]]:
    """Each user's item indices in time order (first interaction per item kept; unknown items dropped)."""
    frame = (
        events.select("user_id", "item_id", "timestamp")
        .with_columns(pl.col("item_id").replace_strict(item_index, default=None, return_dtype=pl.Int64).alias("ix"))
        .drop_nulls("ix")
        .sort(["user_id", "timestamp", "ix"])
        .unique(["user_id", "ix"], keep="first", maintain_order=True)
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("ix"))
    )
    found = dict(zip(frame["user_id"].to_list(), frame["ix"].to_list(), strict=True))
    users = list(found) if user_ids is None else list(user_ids)
    return users, [np.asarray(found.get(u, []), dtype=np.int64) for u in users]


def profile_matrix(
    users: list[str], vectors: dict[str, np.ndarray] | None, dim: int | None = None
) -> np.ndarray | None:
    """(len(users), dim) float32 profile vectors, zeros for users without one; None without any vectors. ``dim``
    defaults to the vectors' own width."""
    if not vectors:
        return None
    dim = dim or len(next(iter(vectors.values())))
    return np.stack([np.asarray(vectors.get(u, np.zeros(dim)), dtype=np.float32) for u in users]).astype(np.float32)
