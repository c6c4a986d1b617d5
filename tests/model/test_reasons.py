"""Reasons explain the score the model computed: exact linear parts, a deletion test, phrases from catalogue data."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import torch

from nightrec.model import Recommender, TrainConfig, pad_histories, user_sequences
from nightrec.model.reasons import LinearPart, ReasonSpace, deletion_test, newest_first
from nightrec.model.recommender import history_bucket
from nightrec.storage.vectors import load_served_vectors, save_served_vectors
from nightrec.tasks import index, publish
from nightrec.tasks.train import fit_recommender
from tests.tasks.test_train import ITEM_IDS, TEXT, checkerboard_events

CONFIG = TrainConfig(dim=16, epochs=40, batch_users=32, lr=2e-2, seed=3, dropout=0.0, threads=1, cold_below=0)
MIXED = [np.array([0, 1, 2, 10, 11, 12]), np.array([13, 3, 14, 4, 15]), np.array([5, 16, 6, 17, 7, 18, 8])]


@pytest.fixture(scope="module")
def trained() -> Recommender:
    return fit_recommender(checkerboard_events(), ITEM_IDS, TEXT, None, CONFIG)


def test_contributions_are_exactly_the_history_part_of_the_score():
    """Without inner steps the user vector is linear in the history: prior + pooling bias + the sum of the parts."""
    model = fit_recommender(
        checkerboard_events(60),
        ITEM_IDS,
        TEXT,
        None,
        replace(CONFIG, epochs=3, inner_steps=0, popularity_prior=False, item_item_part=False, sequence_part=False),
    )
    net = model.model
    space = model.reason_space()
    recs = np.array([[5, 12, 19], [0, 9, 17], [2, 3, 4]])
    slots = newest_first(MIXED, 7)
    parts = space.contributions(recs, slots, np.array([len(h) for h in MIXED]))
    with torch.inference_mode():
        out, _, hist = net.item_tables(model.text)
        support, mask = pad_histories(MIXED, CONFIG.max_history)
        u0 = net.prior_vectors(hist, support, mask, None)
        history_part = (u0 - net.prior - net.pool.bias).numpy()
    expected = np.einsum("bd,bkd->bk", history_part, out.numpy()[recs])
    np.testing.assert_allclose(parts.sum(axis=2), expected, rtol=1e-4, atol=1e-5)


def test_the_item_item_parts_contributions_sum_to_its_weighted_score():
    """The item-item part is linear in the distinct history items: its reasons add up to exactly its share."""
    histories = [np.array([0, 1, 2, 1]), np.array([13, 3, 14])]  # a repeat counts once, in its newest slot
    lengths = np.array([len(h) for h in histories])
    part = LinearPart(
        history=np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32),
        items=np.random.default_rng(1).normal(size=(20, 4)).astype(np.float32),
        weight=np.linspace(0.5, 2.0, 9).astype(np.float32),
    )
    space = ReasonSpace([], support_cap=50, linear=[part])
    recs = np.array([[5, 12, 19], [0, 9, 17]])
    parts = space.contributions(recs, newest_first(histories, 4), lengths)
    users = np.stack([part.history[np.unique(h)].sum(0) for h in histories])
    weight = part.weight[history_bucket(lengths)]
    expected = weight[:, None] * np.einsum("br,bkr->bk", users, part.items[recs])
    np.testing.assert_allclose(parts.sum(axis=2), expected, rtol=1e-5, atol=1e-5)
    tensors, header = space.arrays()
    again = ReasonSpace.from_arrays(tensors, header)
    np.testing.assert_allclose(again.contributions(recs, newest_first(histories, 4), lengths), parts)


def test_top_reasons_come_from_the_recommended_items_block(trained):
    """Users who mixed both blocks: an item of block A is explained by their block-A items, never by block B."""
    space = trained.reason_space()
    scores = trained.score_histories(MIXED)
    recs = np.array([[i for i in np.argsort(-s) if i not in set(h)][:6] for s, h in zip(scores, MIXED, strict=True)])
    slots = newest_first(MIXED, 7)
    parts = space.contributions(recs, slots, np.array([len(h) for h in MIXED]))
    parts[np.broadcast_to(slots[:, None, :] < 0, parts.shape)] = -np.inf
    top = np.take_along_axis(slots, parts.argmax(axis=2), axis=1)
    assert ((top // 10) == (recs // 10)).all()


def test_removing_the_top_reason_lowers_the_score_more_than_a_random_history_item(trained):
    """Users mostly of one block with a few items of the other: the reasons are the deletions that cost the most.
    (With two inner steps and histories split evenly between two interchangeable blocks, the inner steps' softmax
    term, which no single item owns, dominates and the share falls to 0.42: see docs/quality.md.)"""
    histories = [
        np.array([0, 1, 2, 3, 4, 15, 16]),
        np.array([10, 11, 12, 13, 5, 6]),
        np.array([1, 3, 5, 12, 14, 16, 18]),
    ]
    fidelity = deletion_test(trained, histories * 4, k=5, seed=0)
    assert fidelity.pairs == 60
    assert fidelity.share_top_lowers_more >= 0.7  # the third history is split 3:4 between the blocks
    assert fidelity.mean_rank_drop_top > fidelity.mean_rank_drop_random + 1
    assert fidelity.mean_score_drop_top > fidelity.mean_score_drop_random + 0.3
    cosine = deletion_test(trained, histories * 4, k=5, seed=0, by="cosine")
    assert cosine.mean_score_drop_top < fidelity.mean_score_drop_top


def test_published_reasons_are_the_models_parts_and_their_weights_are_shares(trained, tmp_path):
    events = checkerboard_events(30, seed=5)
    vectors = trained.served_vectors(events, sorted(set(events["user_id"].to_list())))
    save_served_vectors(vectors, tmp_path / "vectors")
    vectors = load_served_vectors(tmp_path / "vectors")  # the reason space travels with the saved vectors
    assert ReasonSpace.from_arrays(vectors.extra, vectors.meta["reason_space"]) is not None
    index.build_checked_index(vectors.item_matrix, vectors.item_ids, vectors.user_matrix, tmp_path / "idx", k=5)
    run = dt.date(2026, 2, 1)
    items = pl.DataFrame({"item_id": ITEM_IDS, "title": [f"T{i}" for i in ITEM_IDS]})
    table = pa.Table.from_batches(
        list(publish.build_lists(vectors, tmp_path / "idx", events, items, k=5, run_date=run, model_version="1"))
    )
    frame = (
        pl.from_arrow(table)
        .explode("reasons")
        .drop_nulls("reasons")
        .with_columns(
            pl.col("reasons").struct.field("item_id").alias("reason_item"),
            pl.col("reasons").struct.field("weight").alias("weight"),
        )
    )
    weights = frame["weight"].to_numpy()
    assert np.abs(weights).max() <= 1.0 + 1e-6
    per_item = frame.group_by("user_id", "rank").agg(pl.col("weight").abs().sum())["weight"].to_numpy()
    assert (per_item <= 1.0 + 1e-5).all()
    assert np.std(weights) > 0.02  # shares, not a wall of 0.99s
    # the reasons are the three largest parts of the model's attribution, computed here independently
    space = ReasonSpace.from_arrays(vectors.extra, vectors.meta["reason_space"])
    users, histories = user_sequences(events, trained.item_index)
    history_of = dict(zip(users, histories, strict=True))
    row = trained.item_index
    for (user, rank), group in frame.group_by("user_id", "rank", maintain_order=True):
        h = history_of[user]
        item = row[group["item_id"][0]]
        parts = space.contributions(np.array([[item]]), newest_first([h], len(h)), np.array([len(h)]))[0, 0]
        expected = [ITEM_IDS[i] for i in h[::-1][np.argsort(-parts, kind="stable")[:3]]]
        assert group["reason_item"].to_list() == expected, (user, rank)


def test_phrases_come_from_catalogue_data():
    items = pl.DataFrame(
        {
            "item_id": ["a", "b", "c", "d", "e"],
            "title": ["Toy Story (1995)", "Toy Story 2 (1999)", "Heat (1995)", "Casino (1995)", "Rocky (1976)"],
            "genres": [["Animation", "Comedy"], ["Animation", "Comedy"], ["Crime", "Thriller"], ["Crime"], ["Drama"]],
        }
    )
    phrases = publish.ReasonPhrases.from_items(items, ["a", "b", "c", "d", "e"])
    got = phrases.between(np.array([1, 3, 4, 2]), np.array([0, 2, 3, 4])).to_pylist()
    assert got == ["same series", "both Crime", None, None]
    assert publish.series_stem("Rocky III (1982)") == publish.series_stem("Rocky (1976)") == "rocky"
    assert publish.series_stem("Up") is None  # too short to be a series
