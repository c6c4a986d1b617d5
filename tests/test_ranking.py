"""Ranking metrics against hand-computed values; top-k never returns a seen item."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nightrec.ranking import (
    catalogue_coverage,
    map_at_k,
    ndcg_at_k,
    per_user_metrics,
    precision_at_k,
    recall_at_k,
    summary,
    top_k_unseen,
)


def test_top_k_unseen_removes_seen_and_breaks_ties_by_index():
    scores = np.array([[0.9, 0.9, 0.5, 0.1], [1.0, 2.0, 3.0, 4.0]])
    top = top_k_unseen(scores, [[0], [3, 2]], k=3)
    assert top[0].tolist() == [1, 2, 3]
    assert top[1].tolist() == [1, 0, -1]  # only two unseen items: padded


def test_top_k_unseen_accepts_torch_and_pads_small_catalogues():
    torch = pytest.importorskip("torch")
    top = top_k_unseen(torch.tensor([[0.1, 0.3]]), None, k=4)
    assert top.tolist() == [[1, 0, -1, -1]]


def test_metrics_match_hand_computed_values():
    # user 0: ranks 1 and 3 are hits, 3 relevant items; user 1: no hit; user 2: no relevant items (left out)
    top = np.array([[5, 1, 6, 2], [0, 1, 2, 3], [0, 1, 2, 3]])
    relevant = [[5, 6, 9], [7], []]
    k = 4
    dcg = 1 / math.log2(2) + 1 / math.log2(4)
    idcg = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(top, relevant, k) == pytest.approx((dcg / idcg + 0.0) / 2)
    assert recall_at_k(top, relevant, k) == pytest.approx((2 / 3 + 0.0) / 2)
    assert precision_at_k(top, relevant, k) == pytest.approx((2 / 4 + 0.0) / 2)
    assert map_at_k(top, relevant, k) == pytest.approx(((1 / 1 + 2 / 3) / 3 + 0.0) / 2)
    assert np.isnan(per_user_metrics(top, relevant, k)["ndcg"][2])


def test_ideal_dcg_caps_at_k_and_coverage_counts_distinct_items():
    top = np.array([[0, 1], [0, -1]])
    assert ndcg_at_k(top[:1], [[0, 1, 2, 3]], 2) == pytest.approx(1.0)
    assert catalogue_coverage(top, 4) == pytest.approx(0.5)
    out = summary(top[:1], [[0, 1, 2, 3]], ks=(2,), n_items=4)
    assert out["recall@2"] == pytest.approx(0.5) and out["coverage@2"] == pytest.approx(0.5)
