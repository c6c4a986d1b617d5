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

from nightrec.model import Recommender
from nightrec.ranking import per_user_metrics
from nightrec.tasks.evaluate import holdout_metrics, rank_holdout

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
    """Every model and popularity on the holdout users (a seeded sample of ``max_users`` of them), overall and per
    history segment, plus per-user NDCG@k; the catalogue is ranked once per model and user."""
    ranking = rank_holdout(dict(models), train_events, holdout_events, item_ids, k, max_users, seed)
    report = holdout_metrics(ranking, k)
    segment_of = np.array([history_segment(len(h)) for h in ranking.seen], dtype=object)
    for segment in SEGMENTS:
        members = segment_of == segment
        part = holdout_metrics(ranking, k, members) if members.any() else {name: {"users": 0.0} for name in report}
        for name, metrics in part.items():
            report[name] |= {f"{segment}_{metric}": value for metric, value in metrics.items()}
    ndcg = {name: per_user_metrics(top, ranking.relevant, k)["ndcg"] for name, top in ranking.tops.items()}
    return HoldoutEvidence(report, ndcg, ranking.users, dict(zip(ranking.users, segment_of.tolist(), strict=True)))
