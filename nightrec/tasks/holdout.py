"""The nightly holdout: the split every stage of a night shares, and the evidence the champion gate decides on.

The split (:func:`split_holdout`), one rule for the train, evaluate-and-gate and compress-and-index stages:

1. Window: hold out the newest ``holdout_days`` days; train on every earlier event.
2. While fewer than ``min_users`` users have both a training history (an event before the cut) and a holdout event,
   move the cut back one day at a time, up to half of the days between the first event and the run date.
3. Still too few: a per-user tail. Every user with at least two interactions holds out the chronologically last
   ``TAIL_SHARE`` of them (at least one); everything earlier trains. This scores every user who could be scored; it
   gives up the global time cut (a user's training events may be later than another user's holdout events), so
   the holdout method is recorded with every decision.
4. No user with two interactions: everything trains and the holdout is empty.

Either way no holdout event is on the training side, and the split is a pure function of the night's events, the
run date and the two settings, so every stage computes the same one. Whether enough users were found is the gate's
question (``HoldoutSplit.enough``; the gate counts the users it actually scored).

The evidence (:func:`holdout_evidence`): :func:`nightrec.tasks.evaluate.holdout_report` on all scored users and on
each history segment (warm: at least ``WARM_FROM`` training interactions, short: 1 to ``WARM_FROM - 1``, no_history:
0), and per-user NDCG@k of every model and popularity on the same users for the gate's paired bootstrap.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from nightrec.ranking import per_user_metrics
from nightrec.tasks.evaluate import Popularity, holdout_report, top_k_in_batches
from nightrec.tasks.train import Recommender, user_sequences

TAIL_SHARE = 0.2
WARM_FROM = 6
SEGMENTS = ("warm", "short", "no_history")


@dataclass(frozen=True)
class HoldoutSplit:
    """Training and holdout events of a night, how they were cut, and how many users can be scored."""

    train: pl.DataFrame
    holdout: pl.DataFrame
    method: str  # "window" | "user-tail" | "none"
    window_days: int | None  # the days held out by a window split
    users: int  # users with a training history and a holdout event
    min_users: int

    @property
    def enough(self) -> bool:
        return self.users >= self.min_users

    @property
    def description(self) -> str:
        if self.method == "window":
            return f"window of the newest {self.window_days} days"
        if self.method == "user-tail":
            return f"per-user tail (each user's last {TAIL_SHARE:.0%} of interactions)"
        return "none"

    def profile(self) -> dict[str, object]:
        return {
            "holdout_method": self.method,
            "holdout_window_days": self.window_days,
            "holdout_users_with_history": self.users,
            "gate_min_users": self.min_users,
        }


def split_holdout(events: pl.DataFrame, run_date: dt.date, holdout_days: int, min_users: int) -> HoldoutSplit:
    """The night's split of ``events`` (columns ``user_id``, ``item_id``, ``timestamp``, ``date``); see the module
    docstring for the rule."""
    if events.is_empty():
        return HoldoutSplit(events, events.clear(), "none", None, 0, min_users)
    spans = events.group_by("user_id").agg(pl.col("date").min().alias("first"), pl.col("date").max().alias("last"))
    first_day = events["date"].min()
    cap = max(holdout_days, (run_date - first_day).days // 2)
    for days in range(holdout_days, cap + 1):
        cut = run_date - dt.timedelta(days=days)
        if cut <= first_day:
            break  # nothing would train
        users = spans.filter((pl.col("first") < cut) & (pl.col("last") >= cut)).height
        if users >= min_users:
            train, holdout = events.filter(pl.col("date") < cut), events.filter(pl.col("date") >= cut)
            return HoldoutSplit(train, holdout, "window", days, users, min_users)
    ranked = events.sort("user_id", "timestamp", "item_id").with_columns(
        pl.int_range(pl.len()).over("user_id").alias("_position"), pl.len().over("user_id").alias("_count")
    )
    held = (pl.col("_count") >= 2) & (
        pl.col("_position") >= pl.col("_count") - (pl.col("_count") * TAIL_SHARE).floor().clip(lower_bound=1)
    )
    ranked = ranked.with_columns(held.alias("_held"))
    holdout = ranked.filter("_held").drop("_position", "_count", "_held")
    if holdout.is_empty():
        return HoldoutSplit(events, events.clear(), "none", None, 0, min_users)
    train = ranked.filter(~pl.col("_held")).drop("_position", "_count", "_held")
    return HoldoutSplit(train, holdout, "user-tail", None, holdout["user_id"].n_unique(), min_users)


@dataclass
class HoldoutEvidence:
    """What the gate sees: metrics per model (overall and ``{segment}_{metric}``), per-user NDCG@k per model on
    ``users`` (the same order for every model), and each user's segment."""

    report: dict[str, dict[str, float]]
    ndcg: dict[str, np.ndarray] = field(default_factory=dict)
    users: list[str] = field(default_factory=list)
    segments: dict[str, str] = field(default_factory=dict)  # user -> segment

    def segment_users(self) -> dict[str, int]:
        counts = dict.fromkeys(SEGMENTS, 0)
        for segment in self.segments.values():
            counts[segment] += 1
        return counts


def history_segment(training_interactions: int) -> str:
    if training_interactions >= WARM_FROM:
        return "warm"
    return "short" if training_interactions > 0 else "no_history"


def holdout_evidence(
    models: Mapping[str, Recommender],
    train_events: pl.DataFrame,
    holdout_events: pl.DataFrame,
    item_ids: list[str],
    k: int = 10,
    max_users: int | None = None,
    seed: int = 0,
) -> HoldoutEvidence:
    """Every model and popularity on the holdout users (a seeded sample of ``max_users`` of them, the same one as
    :func:`~nightrec.tasks.evaluate.holdout_report` draws), overall and per history segment, plus per-user NDCG@k."""
    users = sorted(set(holdout_events["user_id"].unique().to_list()))
    if max_users is not None and len(users) > max_users:
        users = sorted(np.random.default_rng(seed).choice(users, size=max_users, replace=False).tolist())
    holdout_events = holdout_events.filter(pl.col("user_id").is_in(users))
    report = holdout_report(dict(models), train_events, holdout_events, item_ids, k)
    lengths = dict(
        train_events.filter(pl.col("user_id").is_in(users)).group_by("user_id").len().iter_rows()
    )  # training interactions per user
    scored, ndcg = per_user_ndcg(models, train_events, holdout_events, item_ids, k)
    segments = {u: history_segment(lengths.get(u, 0)) for u in scored}
    for segment in SEGMENTS:
        members = [u for u in scored if segments[u] == segment]
        if members:
            part = holdout_report(
                dict(models), train_events, holdout_events.filter(pl.col("user_id").is_in(members)), item_ids, k
            )
        else:
            part = {name: {"users": 0.0} for name in report}
        for name, metrics in part.items():
            report[name] |= {f"{segment}_{metric}": value for metric, value in metrics.items()}
    return HoldoutEvidence(report, ndcg, scored, segments)


def per_user_ndcg(
    models: Mapping[str, Recommender],
    train_events: pl.DataFrame,
    holdout_events: pl.DataFrame,
    item_ids: list[str],
    k: int = 10,
) -> tuple[list[str], dict[str, np.ndarray]]:
    """NDCG@k of each user of ``holdout_events`` for each model and popularity, scored as
    :func:`~nightrec.tasks.evaluate.holdout_report` scores them (full ranking over ``item_ids``, seen items removed,
    the users whose holdout has an item of the catalogue). Returns the users and ``name -> (n_users,)`` arrays."""
    index = {item: i for i, item in enumerate(item_ids)}
    users = sorted(set(holdout_events["user_id"].unique().to_list()))
    _, everyone = user_sequences(train_events, index)
    mine = train_events.filter(pl.col("user_id").is_in(users))
    _, seen = user_sequences(mine, index, users)
    _, relevant = user_sequences(holdout_events, index, users)
    keep = [i for i, r in enumerate(relevant) if len(r)]
    users, seen, relevant = [users[i] for i in keep], [seen[i] for i in keep], [relevant[i] for i in keep]
    n_items = len(item_ids)

    def ndcg(score_rows) -> np.ndarray:
        # the report ranks max(20, k) items (for Recall@20); ties at the cut-off would rank differently with k alone
        top = top_k_in_batches(score_rows, seen, max(20, k), n_items)
        return per_user_metrics(top, relevant, k)["ndcg"]

    out = {}
    for name, model in models.items():
        _, own = user_sequences(mine, model.item_index, users)
        shared = [(index[item], j) for j, item in enumerate(model.item_ids) if item in index]
        cols, own_cols = map(np.asarray, zip(*shared, strict=True)) if shared else (None, None)

        def model_scores(rows: slice, own=own, model=model, cols=cols, own_cols=own_cols) -> np.ndarray:
            # an item outside the model's catalogue can never be recommended by it
            scores = np.full((len(own[rows]), n_items), -np.inf, dtype=np.float32)
            if cols is not None and len(own[rows]):
                scores[:, cols] = model.score_histories(own[rows])[:, own_cols]
            return scores

        out[name] = ndcg(model_scores)
    popularity = Popularity(everyone, n_items)
    out["popularity"] = ndcg(lambda rows: popularity.score(seen[rows]))
    return users, out
