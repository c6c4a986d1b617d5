"""The offline evaluation protocol (docs/design.md, docs/quality.md): seeded splits, every segment a night serves, the
peers tuned on validation in the same run, and several seeds reported as mean ± standard deviation.

Segments of the chronological split (per seed):
- ``warm``: each warm user's last 20 % of interactions is the test set (NDCG@10, Recall@10/20, Precision@10, MAP@10,
  coverage of the top-10 lists).
- ``cold_k1/3/5``: a seeded 20 % of users never enter training; their first k interactions are the history every method
  scores them from (fold-in), their next up to 50 the test set (NDCG@20, Recall@20).
- ``cold_k0``: the same users with no history at all: their first up to 50 interactions are the test set.
- ``cold_items``: a seeded 10 % of the items never appear in training; every interaction with one is on the test side,
  scored for the warm users who interacted with it, from their training history: NDCG@20 with the ranking restricted to
  the cold items (can the method order items it has never seen?), Recall@20 of the full ranking, and the share of
  those users whose full top-20 list holds any cold item at all.
- ``strat`` (optional): the random 75/25 split stratified by item of the Microsoft Recommenders tables.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from nightrec.model import TrainConfig, user_sequences
from nightrec.model.reasons import deletion_test
from nightrec.ranking import per_user_metrics, top_k_unseen
from nightrec.tasks.catalogue import night_item_ids
from nightrec.tasks.evaluate import ALS, EASE, Histories, ItemKNN, Popularity, TextOnly, fit_nightrec
from nightrec.tasks.sasrec import SASRec, tune_sasrec

COLD_KS = (1, 3, 5)
COLD_SHARE = 0.2
COLD_QUERY = 50
REASON_USERS = 500  # warm users whose lists the deletion test re-scores (2 x 10 variants each)
COLD_ITEM_SHARE = 0.1
PEERS = ("popularity", "itemknn", "ease", "als", "sasrec", "text")
# The figures a claim is made on (docs/design.md "Evaluation protocol"), in the order the summary reports them.
HEADLINE = (
    "warm_ndcg_at_10",
    "warm_recall_at_20",
    "warm_coverage",
    "cold_k0_ndcg_at_20",
    "cold_k1_ndcg_at_20",
    "cold_k3_ndcg_at_20",
    "cold_k5_ndcg_at_20",
    "cold_items_ndcg_at_20",
    "cold_items_recall_at_20",
    "cold_items_in_lists",
)


# --- splits -------------------------------------------------------------------------------------------------------
@dataclass
class Split:
    """Training histories for fitting, and per segment: (users' scoring histories, their relevant items)."""

    train: Histories
    segments: dict[str, tuple[Histories, Histories]]
    # (inner training histories, validation histories, their relevant items), carved from train for tuning
    validation: tuple[Histories, Histories, Histories] | None = None
    cold_items: np.ndarray | None = None  # items held out of training entirely (the cold-item segment)


def pick_cold_items(
    seqs: Histories, n_items: int, seed: int, share: float = COLD_ITEM_SHARE, has_text: np.ndarray | None = None
) -> np.ndarray:
    """A seeded ``share`` of the items with interactions (and text, where ``has_text`` says) that training never sees.

    Drawn from a stream of its own, so a seed's cold users are the same with or without cold items.
    """
    counts = np.bincount(np.concatenate(seqs) if seqs else np.zeros(0, np.int64), minlength=n_items)
    eligible = counts > 0
    if has_text is not None:
        eligible &= np.asarray(has_text, dtype=bool)
    candidates = np.flatnonzero(eligible)
    n = int(round(len(candidates) * share))
    return np.sort(np.random.default_rng([seed, 10]).choice(candidates, size=n, replace=False)).astype(np.int64)


def chronological_split(
    seqs: Histories, seed: int, test_share: float = 0.2, cold_items: np.ndarray | None = None
) -> Split:
    """Warm users: last ``test_share`` of each history is test. Cold users (seeded 20 %): first k, next up to 50;
    k = 0 is the no-history segment (their first up to 50 interactions are the test set).

    ``cold_items`` never appear in training (nor in the warm/cold-user test sets): every interaction with one moves to
    the ``cold_items`` segment, scored for the warm users who interacted with them, from their training history.
    """
    rng = np.random.default_rng(seed)
    cold = rng.random(len(seqs)) < COLD_SHARE
    held_out = np.zeros(0, np.int64) if cold_items is None else np.asarray(cold_items, dtype=np.int64)
    train, warm_hist, warm_rel, cold_seqs, item_hist, item_rel = [], [], [], [], [], []
    for s, is_cold in zip(seqs, cold, strict=True):
        full = np.asarray(s, dtype=np.int64)
        on_cold_item = np.isin(full, held_out)
        s = full[~on_cold_item]
        if is_cold:
            cold_seqs.append(s)
            continue
        if not len(s):
            continue
        cut = max(1, math.floor(len(s) * (1 - test_share)))
        train.append(s[:cut])
        if cut < len(s):
            warm_hist.append(s[:cut])
            warm_rel.append(s[cut:])
        if on_cold_item.any():
            item_hist.append(s[:cut])
            item_rel.append(full[on_cold_item])
    segments = {"warm": (warm_hist, warm_rel)}
    for k in (0, *COLD_KS):
        usable = [s for s in cold_seqs if len(s) > k]
        segments[f"cold_k{k}"] = ([s[:k] for s in usable], [s[k : k + COLD_QUERY] for s in usable])
    if cold_items is not None:
        segments["cold_items"] = (item_hist, item_rel)
    # validation for the hyper-parameters: the same chronological cut inside the training histories
    inner, val_hist, val_rel = [], [], []
    for s in train:
        cut = max(1, math.floor(len(s) * (1 - test_share)))
        inner.append(s[:cut])
        if cut < len(s):
            val_hist.append(s[:cut])
            val_rel.append(s[cut:])
    return Split(train, segments, (inner, val_hist, val_rel), None if cold_items is None else held_out)


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
def segment_metrics(
    scores: np.ndarray,
    histories: Histories,
    relevant: Histories,
    segment: str,
    cold_items: np.ndarray | None = None,
) -> dict[str, float]:
    """Warm/strat: NDCG@10, Recall@10/20, Precision@10, MAP@10, coverage@10. Cold users: NDCG@20, Recall@20 (+@10).

    Cold items (``cold_items`` given): NDCG@20 of the ranking restricted to the cold items, Recall@20 of the full
    ranking, and ``in_lists``: the share of users whose full top-20 holds any cold item.
    """
    top = top_k_unseen(scores, histories, 20)
    at10, at20 = per_user_metrics(top, relevant, 10), per_user_metrics(top, relevant, 20)
    mean = lambda v: float(np.nanmean(v)) if len(v) else float("nan")  # noqa: E731
    if segment == "cold_items":
        restricted = np.full_like(scores, -np.inf)
        restricted[:, cold_items] = scores[:, cold_items]
        among_cold = per_user_metrics(top_k_unseen(restricted, histories, 20), relevant, 20)
        in_lists = np.isin(top, cold_items).any(axis=1) if len(top) else np.zeros(0)
        out = {"ndcg_at_20": mean(among_cold["ndcg"]), "recall_at_20": mean(at20["recall"]), "in_lists": mean(in_lists)}
        return {f"{segment}_{k}": v for k, v in out.items()}
    out = {
        "ndcg_at_10": mean(at10["ndcg"]),
        "recall_at_10": mean(at10["recall"]),
        "recall_at_20": mean(at20["recall"]),
        "ndcg_at_20": mean(at20["ndcg"]),
    }
    if not segment.startswith("cold"):
        out |= {
            "precision_at_10": mean(at10["precision"]),
            "map_at_10": mean(at10["map"]),
            "coverage": float(np.unique(top[:, :10][top[:, :10] >= 0]).size / scores.shape[1]),
        }
    return {f"{segment}_{k}": v for k, v in out.items()}


def score_in_batches(scorer, histories: Histories, batch: int = 2048) -> np.ndarray:
    """``scorer.score`` a batch of users at a time (memory: a batch times the catalogue)."""
    return np.concatenate([scorer.score(histories[i : i + batch]) for i in range(0, max(len(histories), 1), batch)])


def validation_ndcg(scorer, histories: Histories, relevant: Histories) -> float:
    top = top_k_unseen(score_in_batches(scorer, histories), histories, 10)
    return float(np.nanmean(per_user_metrics(top, relevant, 10)["ndcg"]))


# --- peers ----------------------------------------------------------------------------------------------------------
def tune_peers(
    split: Split,
    n_items: int,
    seed: int,
    log: Callable[[str], None],
    peers: Sequence[str] = PEERS,
    sasrec_trials: int | None = None,
) -> dict:
    """Pick each peer's hyper-parameters by validation NDCG@10 (validation carved from training, chronologically);
    SASRec's by the sequence part's search, with ``sasrec_trials`` trials (default: a night's)."""
    inner_train, hist, rel = split.validation
    grids = {
        "itemknn": [{"neighbours": n} for n in (20, 50, 100, 200, None)],
        "ease": [{"lam": lam} for lam in (10.0, 50.0, 100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0, 6400.0, 12800.0)],
        "als": [
            {"factors": f, "regularization": r, "alpha": a, "seed": seed}
            for f in (32, 64, 128)
            for r in (0.01, 0.1)
            for a in (1.0, 5.0)
        ],
    }
    makers = {"itemknn": ItemKNN, "ease": EASE, "als": ALS}
    chosen: dict = {}
    for name, grid in grids.items():
        if name not in peers:
            continue
        results = [(validation_ndcg(makers[name](inner_train, n_items, **p), hist, rel), i) for i, p in enumerate(grid)]
        best_value, best = max(results)
        chosen[name] = grid[best]
        log(f"tuned {name}: {grid[best]} (validation NDCG@10 {best_value:.4f})")
    if "sasrec" in peers:
        trials = {} if sasrec_trials is None else {"trials": sasrec_trials}
        chosen["sasrec"] = tune_sasrec(inner_train, n_items, (hist, rel), seed=seed, log=log, **trials)
    return chosen


def fit_peers(train: Histories, n_items: int, text: np.ndarray, params: dict, peers: Sequence[str] = PEERS) -> dict:
    """Every peer fitted on ``train`` with its tuned ``params`` (SASRec for the epoch count validation chose)."""
    makers = {
        "popularity": lambda: Popularity(train, n_items),
        "itemknn": lambda: ItemKNN(train, n_items, **params.get("itemknn", {})),
        "ease": lambda: EASE(train, n_items, **params.get("ease", {})),
        "als": lambda: ALS(train, n_items, **params.get("als", {})),
        "sasrec": lambda: SASRec(train, n_items, **params.get("sasrec", {})),
        "text": lambda: TextOnly(train, n_items, text),
    }
    return {name: makers[name]() for name in peers}


# --- one seed -----------------------------------------------------------------------------------------------------
@dataclass
class ProtocolResult:
    """Metrics per method (``method -> {"warm_ndcg_at_10": …}``), NDCG@10 per history length, timings."""

    metrics: dict[str, dict[str, float]]
    by_history: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> history bucket -> NDCG@10
    info: dict = field(default_factory=dict)

    def to_markdown(self) -> str:
        return SeedsResult([self]).to_markdown()


_BUCKETS = ((1, 20), (20, 50), (50, 100), (100, 200), (200, 10**9))


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
    """Every scorer on every segment of ``split``; also NDCG@10 by history length (new users, cold k, warm buckets)."""
    metrics: dict[str, dict[str, float]] = {name: {} for name in scorers}
    by_history: dict[str, dict[str, float]] = {}
    for name, scorer in scorers.items():
        new_users, warm = {}, {}
        for segment, (hist, rel) in split.segments.items():
            if not hist:
                continue
            scores = score_in_batches(scorer, hist)
            metrics[name] |= segment_metrics(scores, hist, rel, segment, split.cold_items)
            if segment.startswith("cold_k"):
                ndcg = per_user_metrics(top_k_unseen(scores, hist, 10), rel, 10)["ndcg"]
                new_users[f"new, {segment.removeprefix('cold_k')}"] = float(np.nanmean(ndcg))
            elif segment == "warm":
                warm = _by_history(scores, hist, rel)
        by_history[name] = new_users | warm  # the plot's x-axis: fewest interactions known first
    return metrics, by_history


def protocol_split(
    dataset, item_text_vectors: np.ndarray, seed: int, cold_item_share: float = COLD_ITEM_SHARE
) -> tuple[list[str], np.ndarray, Histories, Split, dict]:
    """(item ids, their text vectors, every user's history, the seed's chronological split, info) of ``dataset``.

    Items the logs name but the catalogue lacks are trained and ranked by id with an all-zero text, as a night does
    (tasks/catalogue.py); they are never picked as cold items."""
    item_ids, missing = night_item_ids(dataset.items, dataset.events)
    n_items = len(item_ids)
    has_text = np.arange(n_items) < n_items - len(missing)
    if missing:
        pad = np.zeros((len(missing), item_text_vectors.shape[1]), dtype=item_text_vectors.dtype)
        item_text_vectors = np.vstack([item_text_vectors, pad])
    _, seqs = user_sequences(dataset.events, {item: i for i, item in enumerate(item_ids)})
    seqs = [s for s in seqs if len(s)]
    info: dict = {"users": len(seqs), "items": n_items, "items_missing_from_catalogue": len(missing), "seed": seed}
    cold_items = pick_cold_items(seqs, n_items, seed, cold_item_share, has_text) if cold_item_share else None
    return item_ids, item_text_vectors, seqs, chronological_split(seqs, seed, cold_items=cold_items), info


def run_protocol(
    dataset,
    item_text_vectors: np.ndarray,
    config: TrainConfig | None = None,
    seed: int = 42,
    progress: Callable[[str], None] | None = None,
    stratified: bool = False,
    peers: Sequence[str] = PEERS,
    cold_item_share: float = COLD_ITEM_SHARE,
) -> ProtocolResult:
    """The docs/design.md protocol on ``dataset`` (events, items) for one seed: nightrec and the peers, same splits."""
    log = progress or (lambda _msg: None)
    config = config or TrainConfig(seed=seed)
    item_ids, item_text_vectors, seqs, split, info = protocol_split(dataset, item_text_vectors, seed, cold_item_share)
    n_items, cold_items = len(item_ids), split.cold_items
    started = time.perf_counter()
    params = tune_peers(split, n_items, seed, log, peers, config.tuning_trials)  # the same search as the model's
    info["peer_params"] = params
    info["tune_seconds"] = round(time.perf_counter() - started, 1)
    started = time.perf_counter()
    scorers = {"nightrec": fit_nightrec(split.train, item_ids, item_text_vectors, config)}
    info["nightrec_train_seconds"] = round(time.perf_counter() - started, 1)
    log(f"seed {seed}: nightrec trained in {info['nightrec_train_seconds']} s")
    started = time.perf_counter()
    scorers |= fit_peers(split.train, n_items, item_text_vectors, params, peers)
    info["peers_fit_seconds"] = round(time.perf_counter() - started, 1)
    metrics, by_history = evaluate_split(scorers, split)
    info["segment_users"] = {seg: len(h) for seg, (h, _) in split.segments.items()}
    # the published reasons' fidelity: the deletion test on (up to 500) warm users' top-10 lists, the model's own
    # attribution against the cosine similarity nightrec published before
    warm = [h for h in split.segments["warm"][0] if len(h) >= 2][:REASON_USERS]
    if warm:
        recommender = scorers["nightrec"].recommender
        info["reasons"] = deletion_test(recommender, warm, k=10, seed=seed).as_dict()
        info["reasons_cosine"] = deletion_test(recommender, warm, k=10, seed=seed, by="cosine").as_dict()
    info["cold_items"] = 0 if cold_items is None else len(cold_items)
    if stratified:
        strat = stratified_split(seqs, n_items, seed)
        strat_scorers = {"nightrec": fit_nightrec(strat.train, item_ids, item_text_vectors, config)}
        strat_scorers |= fit_peers(strat.train, n_items, item_text_vectors, params, peers)
        strat_metrics, _ = evaluate_split(strat_scorers, strat)
        for name, values in strat_metrics.items():
            metrics[name] |= values
        log(f"seed {seed}: stratified split done")
    return ProtocolResult(metrics=metrics, by_history=by_history, info=info)


# --- several seeds ------------------------------------------------------------------------------------------------
@dataclass
class SeedsResult:
    """One :class:`ProtocolResult` per seed of the split; every figure as mean ± standard deviation over seeds."""

    runs: list[ProtocolResult]
    dataset: str = ""

    @property
    def methods(self) -> list[str]:
        return list(self.runs[0].metrics)

    def values(self, method: str, metric: str) -> np.ndarray:
        return np.array([r.metrics[method].get(metric, np.nan) for r in self.runs], dtype=np.float64)

    def mean_std(self, method: str, metric: str) -> tuple[float, float]:
        v = self.values(method, metric)
        return float(np.nanmean(v)), float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else 0.0

    def columns(self) -> list[str]:
        seen = {c for r in self.runs for m in r.metrics.values() for c in m}
        return [c for c in _TABLE_COLUMNS if c in seen]

    def ratio(self, metric: str, peer: str, method: str = "nightrec") -> tuple[float, float]:
        """Mean ± std over seeds of the per-seed ratio ``method / peer`` (NaN where the peer scored 0)."""
        num, den = self.values(method, metric), self.values(peer, metric)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(den > 0, num / den, np.nan)
        if not np.isfinite(r).any():
            return float("nan"), float("nan")
        return float(np.nanmean(r)), float(np.nanstd(r, ddof=1)) if np.isfinite(r).sum() > 1 else 0.0

    def summary(self, method: str = "nightrec") -> dict:
        """Per headline metric: the method's mean, the best peer by mean, the ratio to it and to popularity."""
        peers = [m for m in self.methods if m != method]
        out: dict = {}
        for metric in HEADLINE:
            if not np.isfinite(self.values(method, metric)).any():
                continue
            scored = [p for p in peers if np.isfinite(self.values(p, metric)).any()]
            best = max(scored, key=lambda p: self.mean_std(p, metric)[0])
            ratio, spread = self.ratio(metric, best, method)
            entry = {
                method: _round(self.mean_std(method, metric)[0], 4),
                "best_peer": best,
                "best_peer_value": _round(self.mean_std(best, metric)[0], 4),
                "ratio": _round(ratio, 3),
                "ratio_std": _round(spread, 3),
                "verdict": _verdict(ratio, spread),
            }
            pop, pop_spread = self.ratio(metric, "popularity", method) if "popularity" in scored else (math.nan,) * 2
            if best != "popularity" and math.isfinite(pop):
                entry |= {"vs_popularity": _round(pop, 3), "vs_popularity_std": _round(pop_spread, 3)}
            out[metric] = entry
        return out

    def to_markdown(self) -> str:
        """Methods × metrics, ``mean ± std`` over seeds, the best mean of each column in bold."""
        columns = self.columns()
        lines = ["| method | " + " | ".join(_label(c) for c in columns) + " |", "|---|" + "---|" * len(columns)]
        best = {c: max(self.mean_std(m, c)[0] for m in self.methods) for c in columns}
        for method in self.methods:
            cells = []
            for c in columns:
                mean, std = self.mean_std(method, c)
                text = f"{mean:.4f}" if len(self.runs) == 1 else f"{mean:.4f} ± {std:.4f}"
                cells.append(f"**{text}**" if mean == best[c] else text)
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def summary_markdown(self, method: str = "nightrec") -> str:
        lines = [
            f"| metric | {method} | best peer | ratio (mean ± std over seeds) | verdict | vs popularity |",
            "|---|---|---|---|---|---|",
        ]
        for metric, e in self.summary(method).items():
            pop = f"{e['vs_popularity']:.3f} ± {e['vs_popularity_std']:.3f}" if "vs_popularity" in e else "—"
            ratio = "—" if e["ratio"] is None else f"{e['ratio']:.3f} ± {e['ratio_std']:.3f}"
            lines.append(
                f"| {_label(metric)} | {e[method]:.4f} | {e['best_peer']} {e['best_peer_value']:.4f} | "
                f"{ratio} | {e['verdict']} | {pop} |"
            )
        return "\n".join(lines)

    def by_history(self) -> dict[str, dict[str, float]]:
        """Mean over seeds of NDCG@10 per history bucket, per method (buckets present in every seed)."""
        out = {}
        for method in self.methods:
            buckets = [
                b for b in self.runs[0].by_history.get(method, {}) if all(b in r.by_history[method] for r in self.runs)
            ]
            out[method] = {b: float(np.mean([r.by_history[method][b] for r in self.runs])) for b in buckets}
        return out

    def figures(self, title: str = "") -> dict:
        """``model_vs_peers`` (headline bars with seed spread) and ``ndcg_by_history`` (model vs each peer)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        methods = self.methods
        shown = [c for c in _BAR_COLUMNS if all(np.isfinite(self.values(m, c)).any() for m in methods)]
        figures = {}
        fig, axes = plt.subplots(1, len(shown), figsize=(3.0 * len(shown), 3.6), squeeze=False)
        for ax, column in zip(axes[0], shown, strict=True):
            stats = [self.mean_std(m, column) for m in methods]
            colours = ["#2f6db5" if m == "nightrec" else "#999999" for m in methods]
            ax.bar(methods, [s[0] for s in stats], yerr=[s[1] for s in stats], color=colours, capsize=2)
            ax.set_title(_label(column), fontsize=9)
            ax.tick_params(axis="x", rotation=60, labelsize=8)
        fig.suptitle(f"nightrec vs peers {title} ({len(self.runs)} seeds)")
        fig.tight_layout()
        plt.close(fig)
        figures["model_vs_peers"] = fig

        fig, ax = plt.subplots(figsize=(7, 3.8))
        for method, buckets in self.by_history().items():
            ax.plot(
                list(buckets),
                list(buckets.values()),
                marker="o",
                label=method,
                linewidth=2.5 if method == "nightrec" else 1.2,
            )
        ax.set(xlabel="interactions known (new users: first k; warm users: training history)", ylabel="NDCG@10")
        ax.set_title(f"NDCG@10 by history length {title}", fontsize=10)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.legend(fontsize=8)
        fig.tight_layout()
        plt.close(fig)
        figures["ndcg_by_history"] = fig
        return figures


def _round(value: float, digits: int) -> float | None:
    """Rounded, or None for NaN (the summary is JSON, which has no NaN)."""
    return round(value, digits) if math.isfinite(value) else None


def _verdict(ratio: float, spread: float) -> str:
    """A claim only where the seed interval (mean ± std) clears 1.0."""
    if not math.isfinite(ratio):
        return "undefined (peer scored 0)"
    if ratio - spread > 1.0:
        return "above"
    if ratio + spread < 1.0:
        return "below"
    return "within noise"


def run_seeds(
    dataset,
    item_text_vectors: np.ndarray,
    config: TrainConfig | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    progress: Callable[[str], None] | None = None,
    name: str = "",
    **kw,
) -> SeedsResult:
    """:func:`run_protocol` once per seed of the split (the model's seed follows the split's)."""
    import dataclasses

    base = config or TrainConfig()
    runs = [
        run_protocol(dataset, item_text_vectors, dataclasses.replace(base, seed=seed), seed, progress, **kw)
        for seed in seeds
    ]
    return SeedsResult(runs, name)


_TABLE_COLUMNS = (
    "warm_ndcg_at_10",
    "warm_recall_at_10",
    "warm_recall_at_20",
    "warm_precision_at_10",
    "warm_map_at_10",
    "warm_coverage",
    "cold_k0_ndcg_at_20",
    "cold_k0_recall_at_20",
    "cold_k1_ndcg_at_20",
    "cold_k1_recall_at_20",
    "cold_k3_ndcg_at_20",
    "cold_k3_recall_at_20",
    "cold_k5_ndcg_at_20",
    "cold_k5_recall_at_20",
    "cold_items_ndcg_at_20",
    "cold_items_recall_at_20",
    "cold_items_in_lists",
    "strat_ndcg_at_10",
    "strat_recall_at_10",
)
_BAR_COLUMNS = (
    "warm_ndcg_at_10",
    "cold_k0_ndcg_at_20",
    "cold_k1_ndcg_at_20",
    "cold_k3_ndcg_at_20",
    "cold_k5_ndcg_at_20",
    "cold_items_ndcg_at_20",
    "strat_ndcg_at_10",
)


def _label(column: str) -> str:
    return column.replace("_at_", "@").replace("_", " ")
