"""The champion gate: a paired bootstrap over users, a minimum number of users, and the holdout that finds them."""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl
import pytest

from nightrec.model import TrainConfig
from nightrec.storage import registry
from nightrec.tasks import holdout
from nightrec.tasks.train import fit_recommender

RUN = dt.date(2026, 4, 1)
MIN = 200


def night(rows: list[tuple[str, str, int]]) -> pl.DataFrame:
    """Events from (user, item, days before RUN) rows; a minute apart within a day, in row order."""
    start = dt.datetime.combine(RUN, dt.time(), tzinfo=dt.UTC)
    stamps = [start - dt.timedelta(days=ago) + dt.timedelta(minutes=i % 1000) for i, (_, _, ago) in enumerate(rows)]
    return pl.DataFrame(
        {
            "user_id": [u for u, _, _ in rows],
            "item_id": [i for _, i, _ in rows],
            "timestamp": stamps,
        }
    ).with_columns(pl.col("timestamp").dt.date().alias("date"))


def assert_no_leakage(split: holdout.HoldoutSplit, events: pl.DataFrame) -> None:
    keys = ["user_id", "item_id", "timestamp"]
    assert split.train.height + split.holdout.height == events.height
    assert split.train.join(split.holdout, on=keys, how="semi").is_empty(), "a holdout event is on the training side"
    if split.method == "window":
        assert split.train["date"].max() < split.holdout["date"].min()
    else:  # per user: everything that trains precedes everything held out
        bounds = split.train.group_by("user_id").agg(pl.col("timestamp").max().alias("last_train"))
        joined = split.holdout.join(bounds, on="user_id")
        assert (joined["timestamp"] >= joined["last_train"]).all()


def scored_users(split: holdout.HoldoutSplit) -> int:
    return split.holdout.join(split.train, on="user_id", how="semi")["user_id"].n_unique()


# --- the pure rule ------------------------------------------------------------------------------------------------
def noisy(mean: float, n: int = 400, seed: int = 0) -> np.ndarray:
    return np.clip(np.random.default_rng(seed).normal(mean, 0.2, n), 0.0, 1.0)


def test_zero_against_zero_on_enough_users_is_a_tie_never_beats():
    zeros = np.zeros(300)
    decision = registry.gate_paired(zeros, zeros, None, tolerance=0.02, min_users=MIN)
    assert decision.outcome_vs_popularity == "tie" and decision.vs_popularity.low == decision.vs_popularity.high == 0
    assert decision.promote and decision.publish == "new" and decision.users == 300
    assert "beats" not in decision.reason and "ties with popularity" in decision.reason
    with_champion = registry.gate_paired(zeros, zeros, zeros, tolerance=0.02, min_users=MIN)
    assert (with_champion.outcome_vs_popularity, with_champion.outcome_vs_champion) == ("tie", "tie")
    assert with_champion.promote and "beats" not in with_champion.reason


def test_a_clear_win_beats_both_and_is_promoted():
    pop = noisy(0.2)
    decision = registry.gate_paired(pop + 0.1, pop, pop + 0.05, tolerance=0.02, min_users=MIN, seed=3)
    assert (decision.outcome_vs_popularity, decision.outcome_vs_champion) == ("beats", "beats")
    assert decision.vs_popularity.low > 0 and decision.promote and decision.publish == "new"
    assert "beats the champion and beats popularity" in decision.reason


def test_a_clear_loss_to_popularity_keeps_the_champion():
    new = noisy(0.2, seed=1)
    decision = registry.gate_paired(new, new + 0.05, new, tolerance=0.02, min_users=MIN)
    assert decision.outcome_vs_popularity == "loses" and decision.vs_popularity.high < 0
    assert not decision.promote and decision.publish == "champion"
    assert "loses to popularity" in decision.reason
    first = registry.gate_paired(new, new + 0.05, None, tolerance=0.02, min_users=MIN)
    assert first.promote and first.publish == "new" and "loses to popularity but there is no champion" in first.reason


def test_champion_loss_counts_only_when_clear_and_beyond_the_tolerance():
    champ = noisy(0.3, seed=2)
    pop = champ * 0.5
    beyond = registry.gate_paired(champ - 0.03, pop, champ, tolerance=0.02, min_users=MIN)  # -10 %, clear
    assert beyond.outcome_vs_champion == "loses" and not beyond.promote and beyond.publish == "champion"
    assert "worse than the champion by more than 2.0%" in beyond.reason
    within = registry.gate_paired(champ - 0.003, pop, champ, tolerance=0.02, min_users=MIN)  # -1 %, clear
    assert within.outcome_vs_champion == "loses" and within.promote and "within 2.0% of the champion" in within.reason
    shaky = champ + np.random.default_rng(5).normal(0, 0.3, len(champ))  # big noise: the interval holds 0
    tie = registry.gate_paired(shaky, pop, champ, tolerance=0.02, min_users=MIN)
    assert tie.outcome_vs_champion == "tie" and tie.promote


def test_too_few_users_decides_nothing():
    # the night: one holdout user, model 0.253 vs popularity 0.444
    one = registry.gate_paired(np.array([0.253]), np.array([0.444]), None, tolerance=0.02, min_users=MIN)
    too_few = "too few holdout users to decide (1 < 200)"
    assert one.outcome_vs_popularity == too_few and one.reason.startswith(too_few)
    assert one.promote and one.publish == "new" and "not validated" in one.reason and "beats" not in one.reason
    kept = registry.gate_paired(np.zeros(2), np.zeros(2), np.zeros(2), tolerance=0.02, min_users=MIN)
    assert kept.outcome_vs_popularity == kept.outcome_vs_champion == "too few holdout users to decide (2 < 200)"
    assert not kept.promote and kept.publish == "champion" and "champion kept" in kept.reason
    nothing = registry.gate_paired(np.zeros(0), np.zeros(0), np.zeros(0), tolerance=0.02, min_users=MIN)
    assert not nothing.promote and nothing.publish == "champion" and nothing.users == 0


def test_bootstrap_is_seeded_and_paired():
    a, b = noisy(0.3, seed=7), noisy(0.3, seed=8)
    assert registry.paired_bootstrap(a, b, seed=1) == registry.paired_bootstrap(a, b, seed=1)
    shifted = registry.paired_bootstrap(a + 0.01, a)  # a constant per-user gain: a zero-width interval above 0
    assert shifted.low == pytest.approx(0.01) and shifted.outcome == "beats"
    unpaired = registry.paired_bootstrap(a, b)
    assert unpaired.low < unpaired.diff < unpaired.high and unpaired.users == len(a)


# --- the holdout --------------------------------------------------------------------------------------------------
def test_a_quiet_newest_week_grows_the_window():
    rows = []
    for u in range(400):  # every user starts 85 days ago and was last seen 8..47 days ago
        last = 8 + u % 40
        rows += [(f"u{u}", f"i{u % 30}", 85), (f"u{u}", f"i{(u + 1) % 30}", 60), (f"u{u}", f"i{(u + 2) % 30}", last)]
    rows += [(f"u{u}", "i99", 2) for u in range(3)]  # three active users in the newest week
    events = night(rows)
    week = events.filter(pl.col("date") >= RUN - dt.timedelta(days=7))
    assert week["user_id"].n_unique() < 5
    split = holdout.split_holdout(events, RUN, holdout_days=7, min_users=MIN)
    assert split.method == "window" and 7 < split.window_days <= 42 and split.enough
    assert split.users == scored_users(split) >= MIN
    assert split.window_days == 27  # 3 + 10 users per extra day: the first day reaching 200
    assert_no_leakage(split, events)
    again = holdout.split_holdout(events, RUN, holdout_days=7, min_users=MIN)
    assert again.train.equals(split.train) and again.holdout.equals(split.holdout)  # every stage gets the same split


def test_no_usable_window_falls_back_to_each_users_tail():
    # each user's events fall on one day, 10..89 days ago: no time cut has a user on both sides
    rows = [(f"u{u}", f"i{(u + j) % 50}", 10 + u % 80) for u in range(300) for j in range(5)]
    events = night(rows)
    split = holdout.split_holdout(events, RUN, holdout_days=7, min_users=MIN)
    assert split.method == "user-tail" and split.enough and split.users == scored_users(split) == 300
    assert split.holdout.group_by("user_id").len()["len"].to_list() == [1] * 300  # 20 % of 5
    assert split.holdout.sort("user_id")["item_id"].to_list() == [
        f"i{(u + 4) % 50}" for u in sorted(range(300), key=lambda u: f"u{u}")
    ]  # each user's last interaction
    assert_no_leakage(split, events)


def test_a_catalogue_with_fewer_users_than_the_minimum_says_so():
    rows = [(f"u{u}", f"i{(u + j) % 20}", 30 - j) for u in range(50) for j in range(6)]
    rows += [("lonely", "i0", 3)]  # one interaction: it trains, nothing to hold out
    events = night(rows)
    split = holdout.split_holdout(events, RUN, holdout_days=7, min_users=MIN)
    assert split.method == "user-tail" and split.users == 50 and not split.enough
    assert "lonely" in split.train["user_id"].to_list() and "lonely" not in split.holdout["user_id"].to_list()
    assert_no_leakage(split, events)
    empty = holdout.split_holdout(events.clear(), RUN, 7, MIN)
    assert empty.method == "none" and empty.holdout.is_empty() and empty.users == 0


def test_enough_users_in_the_newest_days_keeps_the_plain_window():
    rows = [(f"u{u}", f"i{(u + j) % 40}", ago) for u in range(250) for j, ago in enumerate((40, 20, 3))]
    events = night(rows)
    split = holdout.split_holdout(events, RUN, holdout_days=7, min_users=MIN)
    assert (split.method, split.window_days, split.users) == ("window", 7, 250)
    assert_no_leakage(split, events)


# --- the evidence -------------------------------------------------------------------------------------------------
def test_evidence_per_segment_and_per_user_agree_with_the_report():
    rng = np.random.default_rng(0)
    item_ids = [f"i{i}" for i in range(20)]
    text = rng.normal(size=(20, 8)).astype(np.float32)
    rows = []
    for u in range(60):
        block = 10 * (u % 2)
        n_train = [0, 2, 8][u % 3]  # one user in three per segment
        items = rng.permutation(10)[: n_train + 2] + block
        rows += [(f"u{u}", f"i{i}", 30 - j if j < n_train else 5) for j, i in enumerate(items)]
    events = night(rows)
    train = events.filter(pl.col("date") < RUN - dt.timedelta(days=20))
    held = events.filter(pl.col("date") >= RUN - dt.timedelta(days=20))
    config = TrainConfig(dim=8, epochs=2, batch_users=16, seed=0, threads=1)
    model = fit_recommender(train, item_ids, text, None, config)
    evidence = holdout.holdout_evidence({"model": model, "champion": model}, train, held, item_ids, k=10)
    report = evidence.report
    assert set(report) == {"model", "champion", "popularity"}
    counts = evidence.segment_users()
    assert counts == {"warm": 20, "short": 20, "no_history": 20} and len(evidence.users) == 60
    for name in report:
        assert sum(report[name][f"{s}_users"] for s in holdout.SEGMENTS) == report[name]["users"] == 60
        assert np.mean(evidence.ndcg[name]) == pytest.approx(report[name]["ndcg_at_10"])
        for segment in holdout.SEGMENTS:
            members = [i for i, u in enumerate(evidence.users) if evidence.segments[u] == segment]
            assert np.mean(evidence.ndcg[name][members]) == pytest.approx(report[name][f"{segment}_ndcg_at_10"])
    np.testing.assert_array_equal(evidence.ndcg["model"], evidence.ndcg["champion"])
    sample = holdout.holdout_evidence({"model": model}, train, held, item_ids, k=10, max_users=25, seed=3)
    assert len(sample.users) == 25 == sample.report["model"]["users"]
    decision = registry.gate_paired(
        sample.ndcg["model"], sample.ndcg["popularity"], None, tolerance=0.02, min_users=MIN
    )
    assert decision.outcome_vs_popularity == "too few holdout users to decide (25 < 200)"
