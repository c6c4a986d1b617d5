"""The popularity prior: a weight per history-length bucket, fitted on calibration users held out of training."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace

import numpy as np
import polars as pl
import pytest
from safetensors.torch import load_file, save_file

from nightrec.model import Recommender, TrainConfig
from nightrec.model.recommender import POPULARITY_BUCKETS, history_bucket
from nightrec.tasks.train import fit_recommender

START = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
CONFIG = TrainConfig(
    dim=8, epochs=8, batch_users=64, lr=2e-2, seed=3, dropout=0.0, threads=1, cold_below=0, sequence_part=False
)


def _frame(histories: list[list[int]]) -> pl.DataFrame:
    rows = [
        (f"u{u}", f"i{i}", START + dt.timedelta(minutes=t)) for u, h in enumerate(histories) for t, i in enumerate(h)
    ]
    return pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")


def popular_events(n_users: int = 300, n_items: int = 40, seed: int = 0) -> pl.DataFrame:
    """Every user draws 3-12 items by a Zipf law over the catalogue, no other structure: popularity is the signal."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_items + 1) ** 1.2
    p /= p.sum()
    return _frame([list(rng.choice(n_items, size=rng.integers(3, 13), replace=False, p=p)) for _ in range(n_users)])


def block_events(n_users: int = 300, seed: int = 0) -> pl.DataFrame:
    """Four blocks of 10 items; two users in three take block 0, the rest spread over blocks 1-3 (globally unpopular
    items), each user all of their own block in random order: every item of a block is as popular as the next, so
    once a user has one item, the block is the whole signal and popularity can only pull the wrong block up."""
    rng = np.random.default_rng(seed)
    blocks = np.where(rng.random(n_users) < 2 / 3, 0, rng.integers(1, 4, size=n_users))
    return _frame([list(rng.permutation(10) + 10 * b) for b in blocks])


ITEMS = [f"i{i}" for i in range(40)]
TEXT = np.random.default_rng(1).normal(size=(len(ITEMS), 4)).astype(np.float32)  # text carries no signal


@pytest.fixture(scope="module")
def popular() -> Recommender:
    return fit_recommender(popular_events(), ITEMS, TEXT, None, replace(CONFIG, use_id=False))


@pytest.fixture(scope="module")
def blocks() -> Recommender:
    return fit_recommender(block_events(), ITEMS, TEXT, None, replace(CONFIG, epochs=30))


def _weights(recommender: Recommender) -> dict[int, float]:
    return {b: recommender.meta[f"popularity_weight_{key}"] for b, key in _keys(recommender)}


def _keys(recommender: Recommender):
    for b in range(len(POPULARITY_BUCKETS)):
        lo = POPULARITY_BUCKETS[b]
        key = f"n{lo}" if b < 6 else ("n6_10" if b == 6 else "n11_20" if b == 7 else "n21up")
        if f"popularity_weight_{key}" in recommender.meta:
            yield b, key


def test_buckets_by_history_length():
    assert history_bucket([0, 1, 5, 6, 10, 11, 20, 21, 500]).tolist() == [0, 1, 5, 6, 6, 7, 7, 8, 8]


def test_a_user_with_no_history_gets_the_most_popular_items_first(popular):
    counts = popular_events().group_by("item_id").len().sort("len", descending=True)["item_id"].to_list()
    scores = popular.score_histories([np.zeros(0, np.int64)])[0]
    top = [ITEMS[i] for i in np.argsort(-scores)[:5]]
    assert top == counts[:5]
    assert popular.prior_weights([0])[0] > 0


def test_the_prior_is_fitted_where_popularity_is_the_signal(popular):
    assert popular.meta["popularity_calibration_users"] == 30
    weights = _weights(popular)
    assert weights[0] >= 1 and weights[1] >= 1 and weights[3] >= 1, weights


def test_the_prior_stays_near_zero_where_the_history_is_the_signal(blocks):
    weights = _weights(blocks)
    assert weights[0] > 0, weights  # no history: block 0, the popular block, is the best guess
    assert set(np.argsort(-blocks.score_histories([np.zeros(0, np.int64)])[0])[:10]) == set(range(10))
    assert all(weights[b] <= 0.25 for b in (1, 2, 3, 4, 5, 6)), weights


def test_served_vectors_carry_the_prior_as_one_more_inner_product_dimension(blocks):
    histories = [np.zeros(0, np.int64), np.array([11, 12]), np.arange(30, 37)]
    base = blocks.score_histories(histories, prior=False)
    prior = blocks.prior_weights([len(h) for h in histories])[:, None] * blocks.popularity[None, :]
    np.testing.assert_allclose(blocks.score_histories(histories), base + prior, rtol=1e-5, atol=1e-5)
    assert blocks.item_matrix().shape[1] % 2 == 0  # padded even for product quantisers


def test_the_prior_can_be_turned_off():
    off = fit_recommender(
        popular_events(), ITEMS, TEXT, None, replace(CONFIG, use_id=False, popularity_prior=False, item_item_part=False)
    )
    assert not off.has_prior and off.item_matrix().shape[1] == CONFIG.dim + 1
    assert off.meta["trained_users"] == 300


def test_save_load_round_trips_the_prior(blocks, tmp_path):
    loaded = Recommender.load(blocks.save(tmp_path / "m"))
    np.testing.assert_array_equal(loaded.popularity_beta, blocks.popularity_beta)
    np.testing.assert_array_equal(loaded.popularity, blocks.popularity)
    histories = [np.zeros(0, np.int64), np.array([3, 4, 5])]
    np.testing.assert_allclose(loaded.score_histories(histories), blocks.score_histories(histories), rtol=1e-6)


def test_a_model_saved_before_the_prior_loads_without_it(blocks, tmp_path):
    folder = blocks.save(tmp_path / "old")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["popularity"], tensors["popularity_beta"]
    save_file(tensors, str(folder / "model.safetensors"))
    header = json.loads((folder / "model.json").read_text())
    del header["popularity_buckets"]
    (folder / "model.json").write_text(json.dumps(header))
    old = Recommender.load(folder)
    assert not old.has_prior
    histories = [np.zeros(0, np.int64), np.array([3, 4, 5])]
    np.testing.assert_allclose(
        old.score_histories(histories), blocks.score_histories(histories, prior=False), rtol=1e-6
    )
    assert old.item_matrix().shape[1] == CONFIG.dim + 1
