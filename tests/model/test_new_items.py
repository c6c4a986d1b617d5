"""New items (text, no events) get their event-learned tables predicted from text: known answers."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import numpy as np
import polars as pl
import pytest

from nightrec.model import Recommender, TrainConfig
from nightrec.model.new_items import fill_rows, new_item_mask, ridge_from_text
from nightrec.tasks.train import fit_recommender

BLOCK = 12  # items 0-11 cluster A, 12-23 cluster B; item 24 is new, its text in cluster A
NEW = 2 * BLOCK
ITEMS = [f"i{i}" for i in range(2 * BLOCK + 1)]


def _text(seed: int = 1) -> np.ndarray:
    """Each cluster's texts scatter around its own direction; the new item's text is cluster A's."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2, 16))
    cluster = np.r_[np.zeros(BLOCK, int), np.ones(BLOCK, int), 0]
    return (centres[cluster] + 0.3 * rng.normal(size=(len(cluster), 16))).astype(np.float32)


def _events(n_users: int = 240, seed: int = 0) -> pl.DataFrame:
    """Users of one cluster take a few of its items, the popular ones first (a skewed pick inside the cluster)."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, BLOCK + 1)
    rows, start = [], dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for u in range(n_users):
        block = u % 2
        picks = rng.choice(BLOCK, size=rng.integers(4, 8), replace=False, p=weights / weights.sum())
        for t, item in enumerate(picks):
            rows.append((f"u{u}", f"i{item + block * BLOCK}", start + dt.timedelta(minutes=t)))
    return pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")


# one sequence member: new items are tested here, not the ensemble (tests/tasks/test_train.py)
CONFIG = TrainConfig(
    dim=16, epochs=30, batch_users=32, lr=2e-2, seed=3, dropout=0.0, threads=1, cold_below=0, sequence_members=1
)


def test_ridge_recovers_a_linear_map_and_predicts_the_mean_from_noise():
    rng = np.random.default_rng(0)
    text = rng.normal(size=(300, 8))
    target = text @ rng.normal(size=(8, 3)) + 2.0
    fit = np.arange(300) < 250
    predicted = ridge_from_text(text, target, fit)
    assert np.abs(predicted[~fit] - target[~fit]).max() < 0.05  # held-out rows, nearly exact
    noise = rng.normal(size=(300, 1)) + 5.0  # the text says nothing about it
    flat = ridge_from_text(text, noise, fit)
    assert np.abs(flat[~fit] - noise[fit].mean()).max() < 0.25  # shrunk to the mean, not fitted to the noise


def test_only_untrained_items_with_text_are_filled():
    text = np.ones((4, 2))
    text[3] = 0.0  # an item known only from the logs: no text to predict from
    mask = new_item_mask(np.array([True, True, False, False]), text)
    assert mask.tolist() == [False, False, True, False]
    table = np.arange(8, dtype=np.float32).reshape(4, 2)
    filled = fill_rows(table, text, np.array([True, True, False, False]), mask)
    assert (filled[:2] == table[:2]).all() and (filled[3] == table[3]).all() and (filled[2] != table[2]).any()


@pytest.fixture(scope="module")
def fitted() -> dict[str, Recommender]:
    events, text = _events(), _text()
    return {
        flag: fit_recommender(events, ITEMS, text, None, replace(CONFIG, new_items_from_text=flag))
        for flag in (True, False)
    }


def _rank_of_new_item(recommender: Recommender, cluster: int) -> tuple[np.ndarray, np.ndarray]:
    """The new item's rank (1 = first) among each cluster user's unseen items, and how many items of their own
    cluster each has not seen."""
    events = _events()
    users = [u for u in events["user_id"].unique(maintain_order=True).to_list() if int(u[1:]) % 2 == cluster][:40]
    vectors = recommender.served_vectors(events.filter(pl.col("user_id").is_in(users)), users)
    scores = vectors.user_matrix @ vectors.item_matrix.T
    index, unseen = recommender.item_index, []
    for row, user in enumerate(vectors.user_ids):
        seen = events.filter(pl.col("user_id") == user)["item_id"].to_list()
        scores[row, [index[i] for i in seen]] = -np.inf
        unseen.append(BLOCK - len(seen))
    return 1 + (scores > scores[:, [NEW]]).sum(1), np.array(unseen)


def test_a_new_item_whose_text_matches_a_popular_cluster_reaches_that_clusters_lists(fitted):
    """The new item's text is cluster A's: A's users get it near the top of their unseen items, B's users do not;
    without the text-predicted tables it ranks below every known item of the cluster."""
    model = fitted[True]
    assert model.meta["new_items_from_text"] == 1
    (rank_a, _), (rank_b, unseen_b) = _rank_of_new_item(model, 0), _rank_of_new_item(model, 1)
    assert np.median(rank_a) <= 5, rank_a
    assert (rank_b > unseen_b).mean() >= 0.9, (rank_b, unseen_b)  # below the unseen items of B's own cluster
    before, _ = _rank_of_new_item(fitted[False], 0)
    assert np.median(before) > np.median(rank_a) + 2, (before, rank_a)


def test_filled_tables_survive_save_and_load(fitted, tmp_path):
    model = fitted[True]
    loaded = Recommender.load(model.save(tmp_path / "m"))
    assert np.allclose(loaded.item_matrix(), model.item_matrix(), atol=1e-6)
    assert bool(loaded.model.known[NEW]) and (not model.has_sequence or loaded.sequence.text_rows[NEW])


def _wide_case(seed: int = 0):
    """30 clusters of 10 items, text by cluster; users take a skewed pick inside one cluster; item 0 of every cluster
    gets no events (a new item)."""
    rng = np.random.default_rng(seed)
    n_clusters, size = 30, 10
    centres = rng.normal(size=(n_clusters, 16))
    cluster = np.repeat(np.arange(n_clusters), size)
    text = (centres[cluster] + 0.3 * rng.normal(size=(len(cluster), 16))).astype(np.float32)
    weights = 1.0 / np.arange(1, size)
    rows, start = [], dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for u in range(600):
        c = u % n_clusters
        picks = rng.choice(np.arange(1, size), size=rng.integers(3, 7), replace=False, p=weights / weights.sum())
        for t, item in enumerate(picks):
            rows.append((f"u{u}", f"i{c * size + item}", start + dt.timedelta(minutes=t)))
    events = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")
    return events, [f"i{i}" for i in range(len(cluster))], text, np.arange(n_clusters) * size


def test_the_new_item_offset_is_calibrated_on_validation_and_served(tmp_path):
    """The offset is the grid step with the best validation NDCG (recorded per step), the same under the same seed.
    Here the text already places new items well (77 % of validation lists hold a pseudo-new item without an offset)
    and every offset costs NDCG, so none is served; an offset, where there is one, is added to the new items' bias
    column and to nothing else, and survives save and load."""
    events, item_ids, text, new = _wide_case()
    config = replace(CONFIG, epochs=8, sequence_part=False, item_item_part=False)
    model = fit_recommender(events, item_ids, text, None, config)
    again = fit_recommender(events, item_ids, text, None, config)
    meta = model.meta
    assert meta["new_items_from_text"] == len(new) and meta["new_item_offset_pseudo_items"] == 27  # 10 % of 270
    ndcg = meta["new_item_offset_ndcg"]
    assert float(meta["new_item_offset_step"]) == float(max(ndcg, key=lambda step: (ndcg[step], -float(step))))
    assert meta["new_item_offset"] == again.meta["new_item_offset"] and ndcg == again.meta["new_item_offset_ndcg"]
    assert meta["new_item_offset"] == 0.0 and model.item_offset is None
    assert ndcg["0.0"] > ndcg["1.0"] and meta["new_item_offset_in_lists"]["0.0"] > 0.5
    without = model.item_matrix()
    model.item_offset = np.zeros(len(item_ids), dtype=np.float32)
    model.item_offset[new] = 0.5
    served = model.item_matrix()
    bias_column = model.model.config.dim
    np.testing.assert_allclose(served[:, bias_column] - without[:, bias_column], model.item_offset, atol=1e-5)
    others = np.delete(np.arange(served.shape[1]), bias_column)
    np.testing.assert_allclose(served[:, others], without[:, others])
    loaded = Recommender.load(model.save(tmp_path / "m"))
    np.testing.assert_allclose(loaded.item_matrix(), served, atol=1e-6)
