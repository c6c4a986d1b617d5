"""Offline evaluation: the DESIGN.md protocol, the peers on the same split, and the nightly holdout report.

Every method is a *scorer*: fitted on training histories, then asked for (n_users, n_items) scores given each user's
history (item indices in time order). Users are scored from whatever history they bring, so cold users are folded in
the same way by every method. Seen items are removed and the whole catalogue is ranked (:mod:`nightrec.ranking`).

Splits (seeded):
- warm: each user's chronological last 20 % is the test set; a seeded 20 % of users are held out as cold users.
- cold: a cold user's first k in {1, 3, 5} interactions are their history, their next up to 50 the test set; cold users
  never appear in training, so this is a true cold start for every method.
- strat: the random 75/25 split stratified by item (each item's interactions split 75/25), for published tables.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import scipy.sparse as sp

from nightrec.ranking import per_user_metrics, top_k_unseen
from nightrec.tasks.train import Recommender, TrainConfig, fit_recommender, user_sequences

COLD_KS = (1, 3, 5)
COLD_SHARE = 0.2
COLD_QUERY = 50
PEERS = ("popularity", "itemknn", "ease", "als", "text")
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
        from implicit.cpu.als import AlternatingLeastSquares
        from threadpoolctl import threadpool_limits

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


# --- splits -------------------------------------------------------------------------------------------------------
@dataclass
class Split:
    """Training histories for fitting, and per segment: (users' scoring histories, their relevant items)."""

    train: Histories
    segments: dict[str, tuple[Histories, Histories]]
    # (inner training histories, validation histories, their relevant items), carved from train for tuning
    validation: tuple[Histories, Histories, Histories] | None = None


def chronological_split(seqs: Histories, seed: int, test_share: float = 0.2) -> Split:
    """Warm users: last ``test_share`` of each history is test. Cold users (seeded 20 %): first k, next up to 50."""
    rng = np.random.default_rng(seed)
    cold = rng.random(len(seqs)) < COLD_SHARE
    train, warm_hist, warm_rel, cold_seqs = [], [], [], []
    for s, is_cold in zip(seqs, cold, strict=True):
        if is_cold:
            cold_seqs.append(s)
            continue
        cut = max(1, math.floor(len(s) * (1 - test_share)))
        train.append(s[:cut])
        if cut < len(s):
            warm_hist.append(s[:cut])
            warm_rel.append(s[cut:])
    segments = {"warm": (warm_hist, warm_rel)}
    for k in COLD_KS:
        usable = [s for s in cold_seqs if len(s) > k]
        segments[f"cold_k{k}"] = ([s[:k] for s in usable], [s[k : k + COLD_QUERY] for s in usable])
    # validation for the peers' hyper-parameters: the same chronological cut inside the training histories
    inner, val_hist, val_rel = [], [], []
    for s in train:
        cut = max(1, math.floor(len(s) * (1 - test_share)))
        inner.append(s[:cut])
        if cut < len(s):
            val_hist.append(s[:cut])
            val_rel.append(s[cut:])
    return Split(train=train, segments=segments, validation=(inner, val_hist, val_rel))


def stratified_split(seqs: Histories, n_items: int, seed: int, test_share: float = 0.25) -> Split:
    """Random split stratified by item: each item's interactions go 75/25 to train/test (time order kept per user)."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(len(seqs)), [len(s) for s in seqs])
    items = np.concatenate(seqs)
    position = np.concatenate([np.arange(len(s)) for s in seqs])
    test = np.zeros(len(items), dtype=bool)
    order = np.lexsort((rng.random(len(items)), items))  # shuffled within each item
    starts = np.searchsorted(items[order], np.arange(n_items + 1))
    for i in range(n_items):
        block = order[starts[i] : starts[i + 1]]
        test[block[: int(round(len(block) * test_share))]] = True
    train, hist, rel = [], [], []
    for u in range(len(seqs)):
        sel = users == u
        tr = items[sel & ~test][np.argsort(position[sel & ~test])]
        te = items[sel & test]
        train.append(tr)
        if len(te):
            hist.append(tr)
            rel.append(te)
    return Split(train=train, segments={"strat": (hist, rel)})


# --- metrics ------------------------------------------------------------------------------------------------------
def segment_metrics(scores: np.ndarray, histories: Histories, relevant: Histories, segment: str) -> dict[str, float]:
    """Warm/strat: NDCG@10, Recall@10/20, Precision@10, MAP@10, coverage@10. Cold: NDCG@20, Recall@20 (+@10)."""
    top = top_k_unseen(scores, histories, 20)
    at10, at20 = per_user_metrics(top, relevant, 10), per_user_metrics(top, relevant, 20)
    n_items = scores.shape[1]
    out = {
        "ndcg_at_10": float(np.nanmean(at10["ndcg"])),
        "recall_at_10": float(np.nanmean(at10["recall"])),
        "recall_at_20": float(np.nanmean(at20["recall"])),
        "ndcg_at_20": float(np.nanmean(at20["ndcg"])),
    }
    if not segment.startswith("cold"):
        out |= {
            "precision_at_10": float(np.nanmean(at10["precision"])),
            "map_at_10": float(np.nanmean(at10["map"])),
            "coverage": float(np.unique(top[:, :10][top[:, :10] >= 0]).size / n_items),
        }
    return {f"{segment}_{k}": v for k, v in out.items()}


def _score_in_batches(scorer, histories: Histories, batch: int = 2048) -> np.ndarray:
    return np.concatenate([scorer.score(histories[i : i + batch]) for i in range(0, max(len(histories), 1), batch)])


def _ndcg10(scorer, histories: Histories, relevant: Histories) -> float:
    top = top_k_unseen(_score_in_batches(scorer, histories), histories, 10)
    return float(np.nanmean(per_user_metrics(top, relevant, 10)["ndcg"]))


def tune_peers(split: Split, n_items: int, text: np.ndarray, seed: int, log: Callable[[str], None]) -> dict:
    """Pick each peer's hyper-parameters by validation NDCG@10 (validation carved from training, chronologically)."""
    inner_train, hist, rel = split.validation
    grids = {
        "itemknn": [{"neighbours": n} for n in (20, 50, 100, 200, None)],
        "ease": [{"lam": lam} for lam in (50.0, 100.0, 200.0, 400.0, 800.0, 1600.0)],
        "als": [
            {"factors": f, "regularization": r, "alpha": a, "seed": seed}
            for f in (32, 64, 128)
            for r in (0.01, 0.1)
            for a in (1.0, 5.0)
        ],
    }
    makers = {"itemknn": ItemKNN, "ease": EASE, "als": ALS}
    chosen = {}
    for name, grid in grids.items():
        results = [(_ndcg10(makers[name](inner_train, n_items, **p), hist, rel), i) for i, p in enumerate(grid)]
        best_value, best = max(results)
        chosen[name] = grid[best]
        log(f"tuned {name}: {grid[best]} (validation NDCG@10 {best_value:.4f})")
    return chosen


def fit_peers(train: Histories, n_items: int, text: np.ndarray, params: dict) -> dict:
    return {
        "popularity": Popularity(train, n_items),
        "itemknn": ItemKNN(train, n_items, **params.get("itemknn", {})),
        "ease": EASE(train, n_items, **params.get("ease", {})),
        "als": ALS(train, n_items, **params.get("als", {})),
        "text": TextOnly(train, n_items, text),
    }


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


# --- the protocol -------------------------------------------------------------------------------------------------
@dataclass
class ProtocolResult:
    """Metrics per method (``method -> {"warm_ndcg_at_10": …}``), NDCG@10 per history-length bucket, timings."""

    metrics: dict[str, dict[str, float]]
    by_history: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> bucket -> warm NDCG@10
    info: dict = field(default_factory=dict)

    def to_markdown(self) -> str:
        columns = [c for c in _TABLE_COLUMNS if any(c in m for m in self.metrics.values())]
        lines = [
            "| method | " + " | ".join(_label(c) for c in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        best = {c: max(m.get(c, float("-inf")) for m in self.metrics.values()) for c in columns}
        for method, values in self.metrics.items():
            cells = []
            for c in columns:
                v = values.get(c, float("nan"))
                cells.append(f"**{v:.4f}**" if v == best[c] else f"{v:.4f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def figures(self) -> dict:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figures = {}
        methods = list(self.metrics)
        shown = [c for c in _BAR_COLUMNS if all(c in self.metrics[m] for m in methods)]
        fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.6), squeeze=False)
        for ax, column in zip(axes[0], shown, strict=True):
            values = [self.metrics[m][column] for m in methods]
            colours = ["#2f6db5" if m == "nightrec" else "#999999" for m in methods]
            ax.bar(methods, values, color=colours)
            ax.set_title(_label(column), fontsize=9)
            ax.tick_params(axis="x", rotation=60, labelsize=8)
        fig.suptitle("nightrec vs peers (MovieLens protocol)")
        fig.tight_layout()
        plt.close(fig)
        figures["model_vs_peers"] = fig

        fig, ax = plt.subplots(figsize=(5, 3.6))
        for m in methods:
            ys = [self.metrics[m].get(f"cold_k{k}_ndcg_at_20", float("nan")) for k in COLD_KS]
            ax.plot(COLD_KS, ys, marker="o", label=m, linewidth=2.5 if m == "nightrec" else 1.2)
        ax.set(xlabel="interactions known (k)", ylabel="NDCG@20", title="Cold start", xticks=list(COLD_KS))
        ax.legend(fontsize=8)
        fig.tight_layout()
        plt.close(fig)
        figures["cold_start"] = fig

        if self.by_history:
            fig, ax = plt.subplots(figsize=(6, 3.6))
            for m, buckets in self.by_history.items():
                ax.plot(
                    list(buckets),
                    list(buckets.values()),
                    marker="o",
                    label=m,
                    linewidth=2.5 if m == "nightrec" else 1.2,
                )
            ax.set(xlabel="training interactions of the user", ylabel="NDCG@10", title="Warm users by history length")
            ax.legend(fontsize=8)
            fig.tight_layout()
            plt.close(fig)
            figures["ndcg_by_history"] = fig
        return figures


_TABLE_COLUMNS = (
    "warm_ndcg_at_10",
    "warm_recall_at_10",
    "warm_recall_at_20",
    "warm_precision_at_10",
    "warm_map_at_10",
    "warm_coverage",
    "cold_k1_ndcg_at_20",
    "cold_k1_recall_at_20",
    "cold_k3_ndcg_at_20",
    "cold_k3_recall_at_20",
    "cold_k5_ndcg_at_20",
    "cold_k5_recall_at_20",
    "strat_ndcg_at_10",
    "strat_recall_at_10",
)
_BAR_COLUMNS = ("warm_ndcg_at_10", "cold_k1_ndcg_at_20", "cold_k3_ndcg_at_20", "cold_k5_ndcg_at_20", "strat_ndcg_at_10")
_BUCKETS = ((1, 20), (20, 50), (50, 100), (100, 200), (200, 10**9))


def _label(column: str) -> str:
    return column.replace("_at_", "@").replace("_", " ")


def _by_history(scores: np.ndarray, histories: Histories, relevant: Histories) -> dict[str, float]:
    ndcg = per_user_metrics(top_k_unseen(scores, histories, 10), relevant, 10)["ndcg"]
    lengths = np.array([len(h) for h in histories])
    out = {}
    for lo, hi in _BUCKETS:
        sel = (lengths >= lo) & (lengths < hi)
        if sel.any():
            out[f"{lo}-{hi - 1}" if hi < 10**9 else f"{lo}+"] = float(np.nanmean(ndcg[sel]))
    return out


def evaluate_split(scorers: dict, split: Split) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    metrics: dict[str, dict[str, float]] = {name: {} for name in scorers}
    by_history: dict[str, dict[str, float]] = {}
    for name, scorer in scorers.items():
        for segment, (hist, rel) in split.segments.items():
            scores = _score_in_batches(scorer, hist)
            metrics[name] |= segment_metrics(scores, hist, rel, segment)
            if segment == "warm":
                by_history[name] = _by_history(scores, hist, rel)
    return metrics, by_history


def run_protocol(
    dataset,
    item_text_vectors: np.ndarray,
    config: TrainConfig | None = None,
    seed: int = 42,
    progress: Callable[[str], None] | None = None,
    stratified: bool = True,
) -> ProtocolResult:
    """The DESIGN.md protocol on ``dataset`` (events, items): nightrec and the peers, same splits, same run."""
    log = progress or (lambda _msg: None)
    config = config or TrainConfig(seed=seed)
    item_ids = dataset.items["item_id"].to_list()
    n_items = len(item_ids)
    index = {item: i for i, item in enumerate(item_ids)}
    _, seqs = user_sequences(dataset.events, index)
    seqs = [s for s in seqs if len(s)]
    info: dict = {"users": len(seqs), "items": n_items, "seed": seed}

    split = chronological_split(seqs, seed)
    started = time.perf_counter()
    params = tune_peers(split, n_items, item_text_vectors, seed, log)
    info["peer_params"] = params
    info["tune_seconds"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    scorers = {"nightrec": fit_nightrec(split.train, item_ids, item_text_vectors, config)}
    info["nightrec_train_seconds"] = round(time.perf_counter() - started, 1)
    log(f"nightrec trained in {info['nightrec_train_seconds']} s")
    scorers |= fit_peers(split.train, n_items, item_text_vectors, params)
    metrics, by_history = evaluate_split(scorers, split)
    info["segment_users"] = {seg: len(h) for seg, (h, _) in split.segments.items()}
    if stratified:
        strat = stratified_split(seqs, n_items, seed)
        strat_scorers = {"nightrec": fit_nightrec(strat.train, item_ids, item_text_vectors, config)}
        strat_scorers |= fit_peers(strat.train, n_items, item_text_vectors, params)
        strat_metrics, _ = evaluate_split(strat_scorers, strat)
        for name, values in strat_metrics.items():
            metrics[name] |= values
        log("stratified split done")
    return ProtocolResult(metrics=metrics, by_history=by_history, info=info)


# --- the nightly holdout ------------------------------------------------------------------------------------------
def holdout_report(
    models: dict[str, Recommender],
    train_events: pl.DataFrame,
    holdout_events: pl.DataFrame,
    item_ids: list[str],
    k: int = 10,
    max_users: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Each model and popularity on the users of ``holdout_events``, scored from their ``train_events`` history.

    Full ranking over ``item_ids`` with seen items removed; a model whose catalogue lacks an item cannot recommend it.
    Users with no training history get each model's prior (popularity for the popularity peer). With ``max_users``,
    a seeded sample of that many holdout users is scored (the same users for every model); scores are computed a
    batch of users at a time, so memory is a batch times the catalogue, not every user times it.
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
    report = {}
    for name, model in models.items():
        _, own = user_sequences(mine, model.item_index, users)
        shared = [(index[item], j) for j, item in enumerate(model.item_ids) if item in index]
        cols, own_cols = map(np.asarray, zip(*shared, strict=True)) if shared else (None, None)

        def model_scores(rows: slice, own=own, model=model, cols=cols, own_cols=own_cols) -> np.ndarray:
            scores = np.full((len(own[rows]), n_items), -np.inf, dtype=np.float32)
            if cols is not None and len(own[rows]):
                scores[:, cols] = model.score_histories(own[rows])[:, own_cols]
            return scores

        report[name] = _holdout_metrics(model_scores, seen, relevant, k, n_items)
    popularity = Popularity(everyone, n_items)
    report["popularity"] = _holdout_metrics(lambda rows: popularity.score(seen[rows]), seen, relevant, k, n_items)
    return report


def top_k_in_batches(
    score_rows: Callable[[slice], np.ndarray], seen: Histories, k: int, n_items: int, batch: int = 1024
) -> np.ndarray:
    """(n_users, k) top unseen items of ``score_rows(slice)`` (scores of those users), a batch of users at a time."""
    tops = [np.zeros((0, k), np.int64)]
    for start in range(0, len(seen), batch):
        rows = slice(start, min(start + batch, len(seen)))
        tops.append(top_k_unseen(score_rows(rows), seen[rows], k))
    return np.concatenate(tops)


def _holdout_metrics(
    score_rows: Callable[[slice], np.ndarray], seen: Histories, relevant: Histories, k: int, n_items: int
) -> dict[str, float]:
    k20 = max(20, k)
    top = top_k_in_batches(score_rows, seen, k20, n_items)
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
