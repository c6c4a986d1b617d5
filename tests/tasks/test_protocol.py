"""The offline protocol: splits (cold users, no-history users, cold items), segment metrics, seeds, SASRec in it."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from nightrec.model import TrainConfig
from nightrec.sources.movielens import Dataset
from nightrec.tasks import protocol


def test_chronological_split_keeps_cold_users_out_of_training():
    seqs = [np.arange(u % 7, u % 7 + 10 + u % 5) for u in range(200)]
    split = protocol.chronological_split(seqs, seed=1)
    hist, rel = split.segments["warm"]
    assert len(split.train) + len(split.segments["cold_k1"][0]) == 200
    assert all(len(h) == int(np.floor((len(h) + len(r)) * 0.8)) for h, r in zip(hist, rel, strict=True))
    for k in protocol.COLD_KS:
        cold_hist, cold_rel = split.segments[f"cold_k{k}"]
        assert all(len(h) == k for h in cold_hist) and all(0 < len(r) <= protocol.COLD_QUERY for r in cold_rel)
    inner, val_hist, val_rel = split.validation
    assert sum(map(len, inner)) + sum(map(len, val_rel)) == sum(map(len, split.train))


def test_stratified_split_holds_out_a_quarter_of_each_item():
    rng = np.random.default_rng(0)
    seqs = [rng.permutation(40)[:20] for _ in range(100)]
    split = protocol.stratified_split(seqs, 40, seed=0)
    train_counts = np.bincount(np.concatenate(split.train), minlength=40)
    test_counts = np.bincount(np.concatenate(split.segments["strat"][1]), minlength=40)
    total = train_counts + test_counts
    assert total.sum() == 2000
    np.testing.assert_allclose(test_counts / total, 0.25, atol=0.02)
    for h, r in zip(*split.segments["strat"], strict=True):
        assert not set(h) & set(r)


def test_cold_items_never_reach_training_and_all_their_interactions_are_scored():
    rng = np.random.default_rng(3)
    seqs = [rng.permutation(60)[: rng.integers(4, 25)] for _ in range(300)]
    cold_items = protocol.pick_cold_items(seqs, 60, seed=5)
    assert len(cold_items) == 6 and len(set(cold_items)) == 6
    split = protocol.chronological_split(seqs, seed=5, cold_items=cold_items)
    seen_in_training = np.concatenate(split.train)
    assert not np.isin(seen_in_training, cold_items).any()
    for segment, (hist, rel) in split.segments.items():
        assert all(not np.isin(h, cold_items).any() for h in hist), segment
        if segment != "cold_items":
            assert all(not np.isin(r, cold_items).any() for r in rel), segment
    hist, rel = split.segments["cold_items"]
    assert rel and all(np.isin(r, cold_items).all() for r in rel)
    # every warm user's interactions with cold items are on the test side, none lost
    cold_users = np.random.default_rng(5).random(len(seqs)) < protocol.COLD_SHARE
    expected = sum(int(np.isin(s, cold_items).sum()) for s, c in zip(seqs, cold_users, strict=True) if not c)
    assert sum(map(len, rel)) == expected
    # the same seed gives the same cold users with or without cold items
    plain = protocol.chronological_split(seqs, seed=5)
    assert len(plain.segments["cold_k0"][0]) == len(split.segments["cold_k0"][0])


def test_no_history_segment_scores_new_users_on_their_first_interactions():
    seqs = [np.arange(u % 9, u % 9 + 8) for u in range(100)]
    split = protocol.chronological_split(seqs, seed=2)
    hist, rel = split.segments["cold_k0"]
    assert hist and all(len(h) == 0 for h in hist)
    assert [len(r) for r in rel] == [8] * len(rel)
    assert len(hist) == len(split.segments["cold_k1"][0])


def test_cold_item_metrics_rank_among_cold_items_and_report_presence_in_lists():
    # 6 items, 2 cold (4, 5); user 0 likes item 5, user 1 likes item 4
    scores = np.array([[9, 8, 7, 6, 1, 2], [9, 8, 7, 6, 5, 1]], dtype=np.float32)
    hist = [np.array([0]), np.array([1])]
    rel = [np.array([5]), np.array([4])]
    out = protocol.segment_metrics(scores, hist, rel, "cold_items", np.array([4, 5]))
    assert out["cold_items_ndcg_at_20"] == pytest.approx(1.0)  # each is first among the cold items
    assert out["cold_items_in_lists"] == pytest.approx(1.0)  # a 6-item catalogue fits in a top-20
    wrong = protocol.segment_metrics(scores[:, ::-1].copy(), hist, rel, "cold_items", np.array([0, 1]))
    assert wrong["cold_items_ndcg_at_20"] == pytest.approx(0.0)


def _result(values: dict[str, list[float]]) -> protocol.SeedsResult:
    runs = []
    for i in range(3):
        metrics = {m: {"warm_ndcg_at_10": v[i]} for m, v in values.items()}
        runs.append(protocol.ProtocolResult(metrics=metrics))
    return protocol.SeedsResult(runs)


def test_seed_summary_makes_a_claim_only_where_the_interval_clears_it():
    clear = _result({"nightrec": [0.30, 0.31, 0.29], "popularity": [0.10, 0.11, 0.09], "ease": [0.20, 0.21, 0.19]})
    entry = clear.summary()["warm_ndcg_at_10"]
    assert entry["best_peer"] == "ease" and entry["verdict"] == "above"
    assert entry["ratio"] == pytest.approx(np.mean([0.30 / 0.20, 0.31 / 0.21, 0.29 / 0.19]), abs=1e-3)
    noisy = _result({"nightrec": [0.22, 0.18, 0.20], "ease": [0.19, 0.21, 0.20]})
    assert noisy.summary()["warm_ndcg_at_10"]["verdict"] == "within noise"
    zero = _result({"nightrec": [0.0, 0.0, 0.0], "ease": [0.0, 0.0, 0.0]})
    assert zero.summary()["warm_ndcg_at_10"]["verdict"].startswith("undefined")
    json.dumps(zero.summary(), allow_nan=False)  # the bench's last line is strict JSON: no NaN
    assert "0.3000 ± 0.0100" in clear.to_markdown()


def _sequential_dataset(n_users: int = 160, n_items: int = 40, seed: int = 0) -> Dataset:
    """Each user walks the catalogue in order from a random start: the next item is the previous one + 1."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        start, length = rng.integers(0, n_items), rng.integers(6, 14)
        rows += [(f"u{u}", f"i{(start + t) % n_items}", t) for t in range(length)]
    events = pl.DataFrame(rows, schema=["user_id", "item_id", "t"], orient="row").with_columns(
        pl.col("t").cast(pl.Int64).mul(60_000_000).cast(pl.Datetime("us", "UTC")).alias("timestamp")
    )
    items = pl.DataFrame({"item_id": [f"i{i}" for i in range(n_items)], "title": [f"item {i}" for i in range(n_items)]})
    return Dataset(events=events.drop("t"), items=items, users=None)


@pytest.mark.slow
def test_protocol_over_seeds_reports_every_segment_and_sasrec_finds_the_sequence():
    dataset = _sequential_dataset()
    text = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    config = TrainConfig(dim=16, epochs=3, batch_users=32, threads=1)
    result = protocol.run_seeds(dataset, text, config, seeds=(0, 1), peers=("popularity", "ease", "sasrec", "text"))
    columns = result.columns()
    for column in ("warm_ndcg_at_10", "cold_k0_ndcg_at_20", "cold_k5_ndcg_at_20", "cold_items_ndcg_at_20"):
        assert column in columns
    summary = result.summary()
    assert summary["warm_ndcg_at_10"]["best_peer"] == "sasrec"
    assert result.mean_std("sasrec", "warm_ndcg_at_10")[0] > 2 * result.mean_std("popularity", "warm_ndcg_at_10")[0]
    assert all(0.0 <= run.info["reasons"]["share_top_lowers_more"] <= 1.0 for run in result.runs)  # deletion test ran
    buckets = list(result.by_history()["sasrec"])
    assert buckets[:4] == ["new, 0", "new, 1", "new, 3", "new, 5"] and buckets[4] == "1-19"  # fewest known first


def test_items_missing_from_the_catalogue_are_ranked_by_id_and_never_cold():
    dataset = _sequential_dataset(n_users=60, n_items=12)
    catalogue = dataset.items.filter(pl.col("item_id") != "i3")  # the logs name i3, the catalogue lags
    lagging = Dataset(events=dataset.events, items=catalogue, users=None)
    text = np.random.default_rng(0).normal(size=(11, 8)).astype(np.float32)
    config = TrainConfig(dim=8, epochs=1, batch_users=32, threads=1, popularity_prior=False)
    result = protocol.run_protocol(lagging, text, config, seed=0, peers=("popularity",), cold_item_share=0.5)
    assert result.info["items"] == 12 and result.info["items_missing_from_catalogue"] == 1
    assert result.info["cold_items"] == 6  # half of the 11 items with text, never the one without
