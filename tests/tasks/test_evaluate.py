"""Evaluation protocol: splits, peers with known answers, the nightly holdout report."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest

from nightrec.model import TrainConfig
from nightrec.tasks import evaluate
from nightrec.tasks.train import fit_recommender


def events(rows: list[tuple[str, str]]) -> pl.DataFrame:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return pl.DataFrame(
        {
            "user_id": [u for u, _ in rows],
            "item_id": [i for _, i in rows],
            "timestamp": [start + dt.timedelta(minutes=t) for t in range(len(rows))],
        }
    )


def block_histories(n_users: int = 80, seed: int = 0) -> list[np.ndarray]:
    """Two blocks of 10 items; each user takes 6-10 items of one block."""
    rng = np.random.default_rng(seed)
    return [rng.permutation(10)[: rng.integers(6, 11)] + 10 * (u % 2) for u in range(n_users)]


@pytest.mark.parametrize("make", [lambda h: evaluate.ItemKNN(h, 20), lambda h: evaluate.EASE(h, 20, lam=1.0)])
def test_item_item_peers_recommend_the_rest_of_the_block(make):
    scorer = make(block_histories())
    top = evaluate.top_k_unseen(scorer.score([np.arange(5), np.arange(10, 15)]), [range(5), range(10, 15)], 5)
    assert set(top[0]) == set(range(5, 10)) and set(top[1]) == set(range(15, 20))


def test_als_and_text_peers_score_every_item_and_fall_back_to_popularity():
    histories = block_histories()
    text = np.eye(20, dtype=np.float32)
    for scorer in (evaluate.ALS(histories, 20, factors=4, iterations=5), evaluate.TextOnly(histories, 20, text)):
        scores = scorer.score([np.array([0, 1]), np.array([], dtype=np.int64)])
        assert scores.shape == (2, 20) and np.isfinite(scores).all()
        assert np.argmax(scores[1]) == np.argmax(evaluate.Popularity(histories, 20).counts)


def test_holdout_report_hand_computed_popularity_and_missing_catalogue_items():
    item_ids = [f"i{i}" for i in range(20)]
    text = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    train_rows = [(f"u{u}", f"i{i}") for u, h in enumerate(block_histories(40)) for i in h]
    train = events(train_rows + [("a", "i0"), ("b", "i0"), ("c", "i1")])
    holdout = events([("a", "i1"), ("new", "i0"), ("ghost", "nope")])
    config = TrainConfig(dim=8, epochs=2, batch_users=16, seed=0, threads=1)
    full = fit_recommender(train, item_ids, text, None, config)
    older = fit_recommender(train, [i for i in item_ids if i != "i1"], np.delete(text, 1, 0), None, config)
    report = evaluate.holdout_report({"model": full, "champion": older}, train, holdout, item_ids, k=10)
    assert set(report) == {"model", "champion", "popularity"}
    assert set(report["model"]) == {
        "ndcg_at_10",
        "recall_at_10",
        "recall_at_20",
        "precision_at_10",
        "map_at_10",
        "coverage",
        "users",
    }
    assert report["popularity"]["users"] == 2.0  # "ghost" has no item of the catalogue
    # popularity of the training events: i0..i19 from the blocks; "a" saw i0, "new" gets the most popular item
    counts = np.bincount([int(i[1:]) for _, i in train_rows + [("a", "i0"), ("b", "i0"), ("c", "i1")]], minlength=20)
    order = [i for i in np.argsort(-counts, kind="stable")]
    rank_a = [i for i in order if i != 0].index(1) + 1
    rank_new = order.index(0) + 1
    expected = np.mean([1 / np.log2(r + 1) if r <= 10 else 0.0 for r in (rank_a, rank_new)])
    assert report["popularity"]["ndcg_at_10"] == pytest.approx(expected)
    # the champion's catalogue lacks i1, so it can never recommend it
    assert report["champion"]["recall_at_20"] <= 0.5


def test_holdout_report_on_a_seeded_user_sample():
    item_ids = [f"i{i}" for i in range(20)]
    text = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    histories = block_histories(60)
    train = events([(f"u{u}", f"i{i}") for u, h in enumerate(histories) for i in h[:-2]])
    holdout = events([(f"u{u}", f"i{i}") for u, h in enumerate(histories) for i in h[-2:]])
    model = fit_recommender(train, item_ids, text, None, TrainConfig(dim=8, epochs=2, batch_users=16, threads=1))
    whole = evaluate.holdout_report({"model": model}, train, holdout, item_ids, k=10)
    assert evaluate.holdout_report({"model": model}, train, holdout, item_ids, k=10, max_users=1000) == whole
    sample = evaluate.holdout_report({"model": model}, train, holdout, item_ids, k=10, max_users=25, seed=3)
    assert sample["model"]["users"] == sample["popularity"]["users"] == 25.0
    assert sample == evaluate.holdout_report({"model": model}, train, holdout, item_ids, k=10, max_users=25, seed=3)
    assert sample != evaluate.holdout_report({"model": model}, train, holdout, item_ids, k=10, max_users=25, seed=4)


@pytest.mark.movielens
@pytest.mark.slow
def test_movielens_holdout_model_beats_popularity(movielens_100k):
    from nightrec.sources import movielens
    from nightrec.tasks.embed import load_encoder

    dataset = movielens.load(movielens_100k)
    items = dataset.items
    texts = [
        f"{t}. Genres: {', '.join(g or [])}. {d or ''}"
        for t, g, d in zip(*(items[c].to_list() for c in ("title", "genres", "description")), strict=True)
    ]
    vectors = load_encoder().encode(texts, batch_size=64)
    ev = dataset.events
    cut = ev["timestamp"].sort()[int(ev.height * 0.9)]
    train, holdout = ev.filter(pl.col("timestamp") < cut), ev.filter(pl.col("timestamp") >= cut)
    item_ids = items["item_id"].to_list()
    model = fit_recommender(train, item_ids, vectors, None, TrainConfig(epochs=8, seed=0, sequence_members=1))
    # ML-100K users arrive over time: most holdout users of a global time cut are new. Popularity wins for them
    # (docs/quality.md); the model must win for users it has seen at least five interactions of.
    known = train.group_by("user_id").len().filter(pl.col("len") >= 5)["user_id"]
    report = evaluate.holdout_report(
        {"model": model}, train, holdout.filter(pl.col("user_id").is_in(known.to_list())), item_ids
    )
    assert report["model"]["users"] > 20
    assert report["model"]["ndcg_at_10"] > report["popularity"]["ndcg_at_10"]


def test_served_ndcg_scores_the_vectors_on_the_holdout_with_seen_items_removed():
    from nightrec.storage.vectors import ServedVectors
    from nightrec.tasks.evaluate import served_ndcg

    # item a scores highest for both users, then b, then c; u1 has seen a, so its top unseen item is b
    vectors = ServedVectors(
        ["u0", "u1"], np.ones((2, 1), np.float32), ["a", "b", "c"], np.array([[3.0], [2.0], [1.0]], np.float32)
    )
    train = pl.DataFrame({"user_id": ["u1"], "item_id": ["a"]})
    hit = pl.DataFrame({"user_id": ["u0", "u1"], "item_id": ["a", "b"]})  # both holdout items ranked first
    assert served_ndcg(train, hit, k=1)(vectors) == pytest.approx(1.0)
    miss = pl.DataFrame({"user_id": ["u0", "u1"], "item_id": ["c", "a"]})  # c ranked last, a already seen
    assert served_ndcg(train, miss, k=1)(vectors) == pytest.approx(0.0)
