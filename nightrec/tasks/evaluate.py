"""The peers and the nightly holdout report: every method is a *scorer*, fitted on training histories, then asked
for (n_users, n_items) scores given each user's history (item indices in time order). Users are scored from whatever
history they bring, so cold users are folded in the same way by every method. Seen items are removed and the whole
catalogue is ranked (:mod:`nightrec.ranking`). The offline protocol built on these is :mod:`nightrec.tasks.protocol`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp

from nightrec.model import Recommender, TrainConfig, user_sequences
from nightrec.ranking import per_user_metrics, top_k_unseen
from nightrec.tasks.train import fit_recommender

Histories = list[np.ndarray]


# --- scorers ------------------------------------------------------------------------------------------------------
def _user_items(histories: Histories, n_items: int) -> sp.csr_matrix:
    rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) if len(rows) else np.zeros(0, np.int64)
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(histories), n_items))


class Popularity:
    """Items by number of training interactions."""

    def __init__(self, train: Histories, n_items: int) -> None:
        self.counts = np.bincount(np.concatenate(train) if train else [], minlength=n_items).astype(np.float32)

    def score(self, histories: Histories) -> np.ndarray:
        return np.tile(self.counts, (len(histories), 1))


class ItemKNN:
    """Item-item cosine similarity on binary interactions, keeping each item's ``neighbours`` most similar items."""

    def __init__(self, train: Histories, n_items: int, neighbours: int | None = 100) -> None:
        x = _user_items(train, n_items)
        norms = np.sqrt(np.asarray(x.sum(0)).ravel()) + 1e-9
        sim = np.asarray((x.T @ x).todense(), dtype=np.float32) / norms[:, None] / norms[None, :]
        np.fill_diagonal(sim, 0.0)
        if neighbours and neighbours < n_items:
            cut = np.partition(sim, n_items - neighbours, axis=0)[n_items - neighbours]
            sim = np.where(sim >= cut[None, :], sim, 0.0)
        self.sim = sim.astype(np.float32)
        self.popularity = Popularity(train, n_items)

    def score(self, histories: Histories) -> np.ndarray:
        # popularity as a tiny tie-breaker keeps users whose items have no neighbours from getting arbitrary lists
        return _user_items(histories, self.sim.shape[0]) @ self.sim + 1e-6 * _unit(self.popularity.counts)


class EASE:
    """Steck's EASE^R: closed-form item-item weights with an L2 penalty ``lam``."""

    def __init__(self, train: Histories, n_items: int, lam: float = 500.0) -> None:
        x = _user_items(train, n_items)
        gram = np.asarray((x.T @ x).todense(), dtype=np.float64) + lam * np.eye(n_items)
        p = np.linalg.inv(gram)
        b = -p / np.diag(p)[None, :]
        np.fill_diagonal(b, 0.0)
        self.b = b.astype(np.float32)
        self.popularity = Popularity(train, n_items)

    def score(self, histories: Histories) -> np.ndarray:
        return _user_items(histories, self.b.shape[0]) @ self.b + 1e-6 * _unit(self.popularity.counts)


class ALS:
    """implicit's ALS (one BLAS thread); users are folded in by the exact ALS least-squares step on their history."""

    def __init__(
        self,
        train: Histories,
        n_items: int,
        factors: int = 64,
        regularization: float = 0.05,
        alpha: float = 2.0,
        iterations: int = 15,
        seed: int = 42,
    ) -> None:
        from threadpoolctl import threadpool_limits

        from nightrec.extras import require

        AlternatingLeastSquares = require("implicit.cpu.als", "peers", "the ALS peer").AlternatingLeastSquares

        with threadpool_limits(1, "blas"):
            model = AlternatingLeastSquares(
                factors=factors, regularization=regularization, alpha=alpha, iterations=iterations, random_state=seed
            )
            model.fit(_user_items(train, n_items), show_progress=False)
        self.items = np.asarray(model.item_factors, dtype=np.float64)
        self.regularization, self.alpha = regularization, alpha
        self.popularity = Popularity(train, n_items)

    def score(self, histories: Histories) -> np.ndarray:
        y = self.items
        base = y.T @ y + self.regularization * np.eye(y.shape[1])
        users = np.zeros((len(histories), y.shape[1]))
        for row, h in enumerate(histories):  # one small (factors x factors) solve per user
            if len(h):
                yh = y[h]
                users[row] = np.linalg.solve(base + self.alpha * yh.T @ yh, (1.0 + self.alpha) * yh.sum(0))
        scores = (users @ y.T).astype(np.float32)
        empty = np.array([len(h) == 0 for h in histories])
        scores[empty] = self.popularity.counts
        return scores


class TextOnly:
    """Cosine between a user's mean history text embedding and each item's; popularity for users with no history."""

    def __init__(self, train: Histories, n_items: int, text: np.ndarray) -> None:
        self.text = text / (np.linalg.norm(text, axis=1, keepdims=True) + 1e-9)
        self.popularity = Popularity(train, n_items)

    def score(self, histories: Histories) -> np.ndarray:
        x = _user_items(histories, self.text.shape[0])
        counts = np.asarray(x.sum(1)).ravel()
        scores = np.asarray(x @ self.text @ self.text.T, dtype=np.float32) / np.maximum(counts, 1)[:, None]
        scores[counts == 0] = _unit(self.popularity.counts)
        return scores


class NightRec:
    """The meta-learned recommender behind the same interface."""

    def __init__(self, recommender: Recommender) -> None:
        self.recommender = recommender

    def score(self, histories: Histories) -> np.ndarray:
        return self.recommender.score_histories(histories)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.abs(x).max() or 1.0)


# --- nightrec as a scorer ----------------------------------------------------------------------------------------
def _histories_frame(histories: Histories, item_ids: list[str]) -> pl.DataFrame:
    """Histories back to an events frame (synthetic increasing timestamps keep their order) for fit_recommender."""
    users = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
    items = np.concatenate(histories) if histories else np.zeros(0, np.int64)
    ids = np.asarray(item_ids, dtype=object)
    return pl.DataFrame(
        {
            "user_id": [f"u{u}" for u in users],
            "item_id": ids[items].tolist(),
            "timestamp": pl.Series(np.arange(len(items)), dtype=pl.Int64).cast(pl.Datetime("us", "UTC")),
        }
    )


def fit_nightrec(train: Histories, item_ids: list[str], text: np.ndarray, config: TrainConfig, **kw) -> NightRec:
    return NightRec(fit_recommender(_histories_frame(train, item_ids), item_ids, text, None, config, **kw))


# --- the nightly holdout ------------------------------------------------------------------------------------------
@dataclass
class HoldoutRanking:
    """Every model's top items for the holdout users, ranked once; metrics for any subset of users derive from it."""

    users: list[str]
    seen: Histories  # training history per user (catalogue indices)
    relevant: Histories  # holdout items per user
    tops: dict[str, np.ndarray]  # method -> (n_users, max(20, k)) top unseen items
    n_items: int


def rank_holdout(
    models: dict[str, Recommender],
    train_events: pl.DataFrame,
    holdout_events: pl.DataFrame,
    item_ids: list[str],
    k: int = 10,
    max_users: int | None = None,
    seed: int = 0,
) -> HoldoutRanking:
    """Each model and popularity ranks the catalogue for the users of ``holdout_events``, from their
    ``train_events`` history.

    Full ranking over ``item_ids`` with seen items removed; a model whose catalogue lacks an item cannot recommend it.
    Users with no training history get each model's prior (popularity for the popularity peer); users whose holdout
    has no catalogue item are left out. With ``max_users``, a seeded sample of that many holdout users is scored (the
    same users for every model); scores are computed a batch of users at a time, so memory is a batch times the
    catalogue, not every user times it.
    """
    index = {item: i for i, item in enumerate(item_ids)}
    users = sorted(set(holdout_events["user_id"].unique().to_list()))
    if max_users is not None and len(users) > max_users:
        users = sorted(np.random.default_rng(seed).choice(users, size=max_users, replace=False).tolist())
    _, everyone = user_sequences(train_events, index)  # popularity counts every training user, not just these
    mine = train_events.filter(pl.col("user_id").is_in(users))
    _, seen = user_sequences(mine, index, users)
    _, relevant = user_sequences(holdout_events.filter(pl.col("user_id").is_in(users)), index, users)
    keep = [i for i, r in enumerate(relevant) if len(r)]
    users, seen, relevant = [users[i] for i in keep], [seen[i] for i in keep], [relevant[i] for i in keep]
    n_items = len(item_ids)
    depth = max(20, k)  # Recall@20 is reported beside the @k metrics
    tops = {}
    for name, model in models.items():
        _, own = user_sequences(mine, model.item_index, users)
        shared = [(index[item], j) for j, item in enumerate(model.item_ids) if item in index]
        cols, own_cols = map(np.asarray, zip(*shared, strict=True)) if shared else (None, None)

        def model_scores(rows: slice, own=own, model=model, cols=cols, own_cols=own_cols) -> np.ndarray:
            scores = np.full((len(own[rows]), n_items), -np.inf, dtype=np.float32)
            if cols is not None and len(own[rows]):
                scores[:, cols] = model.score_histories(own[rows])[:, own_cols]
            return scores

        tops[name] = top_k_in_batches(model_scores, seen, depth, n_items)
    popularity = Popularity(everyone, n_items)
    tops["popularity"] = top_k_in_batches(lambda rows: popularity.score(seen[rows]), seen, depth, n_items)
    return HoldoutRanking(users, seen, relevant, tops, n_items)


def holdout_metrics(
    ranking: HoldoutRanking, k: int = 10, rows: np.ndarray | None = None
) -> dict[str, dict[str, float]]:
    """NDCG@k, Recall@k/20, Precision@k, MAP@k, coverage and user count per method, on ``rows`` (a boolean mask or
    indices into ``ranking.users``; all users when None)."""
    select = np.arange(len(ranking.users)) if rows is None else np.asarray(rows)
    if select.dtype == bool:
        select = np.flatnonzero(select)
    relevant = [ranking.relevant[i] for i in select]
    return {name: _holdout_metrics(top[select], relevant, k, ranking.n_items) for name, top in ranking.tops.items()}


def holdout_report(
    models: dict[str, Recommender],
    train_events: pl.DataFrame,
    holdout_events: pl.DataFrame,
    item_ids: list[str],
    k: int = 10,
    max_users: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """:func:`holdout_metrics` of :func:`rank_holdout`: each model and popularity on the holdout users."""
    return holdout_metrics(rank_holdout(models, train_events, holdout_events, item_ids, k, max_users, seed), k)


def top_k_in_batches(
    score_rows: Callable[[slice], np.ndarray], seen: Histories, k: int, n_items: int, batch: int = 1024
) -> np.ndarray:
    """(n_users, k) top unseen items of ``score_rows(slice)`` (scores of those users), a batch of users at a time."""
    tops = [np.zeros((0, k), np.int64)]
    for start in range(0, len(seen), batch):
        rows = slice(start, min(start + batch, len(seen)))
        tops.append(top_k_unseen(score_rows(rows), seen[rows], k))
    return np.concatenate(tops)


def _holdout_metrics(top: np.ndarray, relevant: Histories, k: int, n_items: int) -> dict[str, float]:
    k20 = max(20, k)
    at_k, at_20 = per_user_metrics(top, relevant, k), per_user_metrics(top, relevant, k20)
    mean = lambda v: float(np.nanmean(v)) if len(v) else float("nan")  # noqa: E731
    head = top[:, :k]
    return {
        f"ndcg_at_{k}": mean(at_k["ndcg"]),
        f"recall_at_{k}": mean(at_k["recall"]),
        f"recall_at_{k20}": mean(at_20["recall"]),
        f"precision_at_{k}": mean(at_k["precision"]),
        f"map_at_{k}": mean(at_k["map"]),
        "coverage": float(np.unique(head[head >= 0]).size / n_items) if n_items else 0.0,
        "users": float(len(relevant)),
    }


def served_ndcg(train_events: pl.DataFrame, holdout: pl.DataFrame, k: int = 10):
    """A function scoring served vectors by holdout NDCG@k (seen = train history), for the compression search.

    Scores a batch of users at a time (memory: a batch times the catalogue)."""
    from nightrec.ranking import ndcg_at_k

    def quality(vectors) -> float:
        item_index = {item: i for i, item in enumerate(vectors.item_ids)}
        users = pl.DataFrame({"user_id": vectors.user_ids})

        def per_user(frame: pl.DataFrame) -> list:
            grouped = dict(
                frame.join(users, on="user_id", how="semi")
                .with_columns(pl.col("item_id").replace_strict(item_index, default=None, return_dtype=pl.Int64))
                .drop_nulls("item_id")
                .group_by("user_id")
                .agg(pl.col("item_id").unique())
                .iter_rows()
            )
            return [grouped.get(u, []) for u in vectors.user_ids]

        def scores(rows: slice):
            return vectors.user_matrix[rows] @ vectors.item_matrix.T

        top = top_k_in_batches(scores, per_user(train_events), k, len(vectors.item_ids))
        return ndcg_at_k(top, per_user(holdout), k)

    return quality
