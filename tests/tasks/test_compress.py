"""Compression search: every configuration measured, the smallest within tolerance chosen and applicable to others."""

from __future__ import annotations

import numpy as np
import pytest

from nightrec.storage.vectors import ServedVectors
from nightrec.tasks import compress


def low_rank(n_users=300, n_items=2000, dim=32, rank=6, noise=0.02, seed=0) -> ServedVectors:
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(rank, dim))
    users = rng.normal(size=(n_users, rank)) @ basis + noise * rng.normal(size=(n_users, dim))
    items = rng.normal(size=(n_items, rank)) @ basis + noise * rng.normal(size=(n_items, dim))
    return ServedVectors(
        [f"u{i}" for i in range(n_users)],
        users.astype(np.float32),
        [f"i{j}" for j in range(n_items)],
        items.astype(np.float32),
        {"model": "test"},
    )


def ndcg_against(reference: ServedVectors, k: int = 10):
    """NDCG@10 of a configuration's ranking, with the full model's top-10 as the relevant items."""
    relevant = np.argsort(-(reference.user_matrix @ reference.item_matrix.T), axis=1)[:, :k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))

    def quality(vectors: ServedVectors) -> float:
        scores = vectors.user_matrix @ vectors.item_matrix.T
        part = np.argpartition(-scores, k, axis=1)[:, :k]
        top = np.take_along_axis(part, np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1), axis=1)
        hits = np.array([np.isin(t, r) for t, r in zip(top, relevant, strict=True)])
        return float((hits * discounts).sum(1).mean() / discounts.sum())

    return quality


def test_svd_projection_is_exact_for_low_rank_scores():
    vectors = low_rank(noise=0.0)
    proj = compress.svd_projection(vectors.user_matrix.astype(np.float64), vectors.item_matrix.astype(np.float64), 6)
    full = vectors.user_matrix @ vectors.item_matrix.T
    small = (vectors.user_matrix @ proj.user) @ (vectors.item_matrix @ proj.item).T
    assert np.abs(full - small).max() < 1e-3 * np.abs(full).max()


def test_int8_roundtrip_keeps_rows_close():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(50, 16)).astype(np.float32)
    back = compress.int8_roundtrip(m)
    assert np.abs(back - m).max() <= np.abs(m).max(axis=1).max() / 127 * 0.51 + 1e-6


def test_chooses_smallest_within_tolerance_and_applies_to_other_users():
    vectors = low_rank()
    quality = ndcg_against(vectors)
    result = compress.compress_served(vectors, quality, tolerance=0.02, seed=0, dims=(8, 4), distill_steps=30)
    base = result.table[0]
    assert base["config"] == "full/users-float32/items-Flat" and base["ndcg_at_10"] == pytest.approx(1.0)
    chosen = next(r for r in result.table if r["config"] == result.chosen)
    passing = [r for r in result.table if r["ndcg_at_10"] >= base["ndcg_at_10"] * 0.98]
    assert chosen["bytes"] == min(r["bytes"] for r in passing)
    assert chosen["relative_loss"] <= 0.02 and chosen["size_ratio"] >= 4  # rank-6 data: far smaller is possible
    assert {r["users"] for r in result.table} == {"float32", "int8"}
    assert any(r["codec"].startswith("PQ") for r in result.table) and any(r["dim"] == 4 for r in result.table)
    # what was measured is reproducible: the chosen vectors, through the chosen codec, score what the table says
    decoded, _ = compress.codec_roundtrip(result.vectors.item_matrix, result.codec, seed=0)
    again = ServedVectors(result.vectors.user_ids, result.vectors.user_matrix, result.vectors.item_ids, decoded)
    assert quality(again) == pytest.approx(chosen["ndcg_at_10"], abs=0.02)
    # the same transformation applies to vectors of other users of the same model
    others = ServedVectors(vectors.user_ids[:10], vectors.user_matrix[:10], vectors.item_ids, vectors.item_matrix)
    applied = result.apply(others)
    assert np.allclose(applied.user_matrix, result.vectors.user_matrix[:10], atol=1e-5)
    assert applied.meta["compression"] == result.chosen and applied.dim == chosen["dim"]
    fig = result.figure()
    assert fig.axes[0].get_xscale() == "log"


def test_nothing_compresses_when_every_step_costs_too_much():
    rng = np.random.default_rng(1)
    vectors = ServedVectors(
        [f"u{i}" for i in range(200)],
        rng.normal(size=(200, 16)).astype(np.float32),
        [f"i{j}" for j in range(700)],
        rng.normal(size=(700, 16)).astype(np.float32),
    )
    result = compress.compress_served(vectors, ndcg_against(vectors), tolerance=0.0, dims=(8,), distill_steps=0)
    chosen = next(r for r in result.table if r["config"] == result.chosen)
    assert chosen["ndcg_at_10"] == pytest.approx(1.0) and chosen["dim"] == 16


def test_few_users_and_unmeasurable_quality_keep_the_full_vectors():
    vectors = low_rank(n_users=5, n_items=700)
    result = compress.compress_served(vectors, ndcg_against(vectors), dims=(16, 4), distill_steps=5)
    assert {r["dim"] for r in result.table} <= {32, 4}  # 16 > 5 users: no projection fitted to it
    unmeasured = compress.compress_served(vectors, lambda v: float("nan"), dims=(4,), distill_steps=0)
    assert unmeasured.chosen == "full/users-float32/items-Flat" and unmeasured.codec == "Flat"


def test_the_search_measures_on_a_seeded_sample_of_holdout_users():
    import polars as pl

    holdout = pl.DataFrame({"user_id": [f"u{i % 50:02d}" for i in range(120)]})
    assert compress.sample_users(holdout, None, 0) == [f"u{i:02d}" for i in range(50)]
    assert compress.sample_users(holdout, 50, 0) == compress.sample_users(holdout, None, 0)
    sample = compress.sample_users(holdout, 10, 7)
    assert len(sample) == len(set(sample)) == 10 and sample == sorted(sample)
    assert sample == compress.sample_users(holdout, 10, 7) != compress.sample_users(holdout, 10, 8)


def test_distillation_on_an_item_sample_still_finds_a_small_configuration(monkeypatch):
    monkeypatch.setattr(compress, "MAX_DISTILL_ITEMS", 500)  # a quarter of the 2000 items per distillation step
    vectors = low_rank()
    result = compress.compress_served(
        vectors, ndcg_against(vectors), tolerance=0.02, seed=0, dims=(8,), distill_steps=30
    )
    distilled = next(r for r in result.table if r["projection"] == "distilled")
    assert distilled["within_tolerance"]  # measured on every item, like every configuration
    chosen = next(r for r in result.table if r["config"] == result.chosen)
    assert chosen["relative_loss"] <= 0.02 and chosen["size_ratio"] >= 4
