"""FAISS index stage: type by catalogue size, recall against exact search, loud failure, save/load round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nightrec.tasks import index


def clustered(n_items: int, n_users: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(32, dim))
    items = centres[rng.integers(0, 32, n_items)] + 0.3 * rng.normal(size=(n_items, dim))
    users = centres[rng.integers(0, 32, n_users)] + 0.5 * rng.normal(size=(n_users, dim))
    return items.astype(np.float32), users.astype(np.float32)


def test_factory_by_catalogue_size():
    assert index.choose_factory(1_000, 32) == "Flat"
    assert index.choose_factory(1_000, 32, "SQ8") == "SQ8"
    assert index.choose_factory(50_000, 32) == "IVF894,Flat"
    assert index.choose_factory(50_000, 32, "SQ8", structure="hnsw") == "HNSW32,SQ8"
    assert index.choose_factory(50_000, 32, "PQ16x8").startswith("IVF")
    assert index.choose_factory(5_000_000, 32).endswith(",RFlat")


def test_exact_index_matches_brute_force_and_round_trips(tmp_path):
    items, users = clustered(500, 100)
    ids = [f"i{j}" for j in range(len(items))]
    stats = index.build_checked_index(items, ids, users, tmp_path / "idx", k=10, min_recall=0.99)
    assert stats["factory"] == "Flat" and stats["recall_at_10"] == 1.0
    loaded = index.load_index(tmp_path / "idx")
    assert loaded.item_ids == ids and loaded.dim == 16
    scores, rows = loaded.search(users[:5], 10)
    exact = np.argsort(-(users[:5] @ items.T), axis=1)[:, :10]
    assert (rows == exact).all()
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    meta = json.loads((tmp_path / "idx" / index.META_FILE).read_text())
    assert meta["factory"] == "Flat" and meta["n_items"] == 500


@pytest.mark.parametrize("structure", ["ivf", "hnsw"])
def test_approximate_index_tuned_to_required_recall(tmp_path, structure):
    items, users = clustered(3_000, 300)
    ids = [str(j) for j in range(len(items))]
    stats = index.build_checked_index(
        items,
        ids,
        users,
        tmp_path / "idx",
        k=20,
        min_recall=0.99,
        exact_max_items=1_000,
        sample_users=300,
        structure=structure,
    )
    assert stats["factory"].startswith(structure.upper()) and stats["recall_at_20"] >= 0.99
    reloaded = index.load_index(tmp_path / "idx")
    assert reloaded.search_params == stats["search_params"]
    assert index.measure_recall(reloaded, users, 20) >= 0.99
    _, rows = reloaded.search(users[:3], 2_000)  # a deep query gets what it asks for (enough lists probed)
    assert (rows >= 0).all()


def test_low_recall_fails_loudly_and_saves_nothing(tmp_path):
    items, users = clustered(3_000, 200)
    ids = [str(j) for j in range(len(items))]
    with pytest.raises(index.IndexRecallError, match="recall@20"):
        # a requirement no index can meet: tuning exhausts its knobs, then raises
        item_index = index.build_index(items, ids, "IVF16,PQ4x4")
        index.tune_and_check(item_index, users, 20, min_recall=1.01)
    assert not (tmp_path / "idx").exists()


def test_duplicate_ids_refused():
    items, _ = clustered(10, 1)
    with pytest.raises(ValueError, match="duplicate"):
        index.build_index(items, ["a"] * 10, "Flat")
