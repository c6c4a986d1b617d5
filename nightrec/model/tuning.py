"""The hyper-parameter search of the sequence part (and of the evaluation's SASRec peer): an Optuna study.

The study runs the caller's start points first (the recipe's likeliest settings, or last night's choice: the warm
start), then asks Optuna's TPE sampler (seeded, so a search is repeatable) for further points in :class:`SearchSpace`.
Every trial is early-stopped on the validation by the model itself and reports each validation to the study, so
Optuna's median pruner stops a trial that runs behind the earlier ones at the same epoch. The search ends after
``trials`` trials, once ``budget_s`` seconds have gone (the first trial always runs), or when the first trial scores
below ``give_up_below`` (a part that far behind the rest of the score is not worth a search).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a search runs: the packaged MLflow model serves without optuna installed
    import optuna

# the pruner judges a trial from epoch 10 on (its fifth validation), against the completed trials' values at the same
# epoch, once two have completed: a lower learning rate or a higher dropout starts slower and must not be judged on
# its first epochs (the early-stopped optimum is near epoch 20-50 on the catalogues we have)
PRUNE_AFTER_EPOCHS = 10
PRUNE_AFTER_TRIALS = 2


@dataclass(frozen=True)
class SearchSpace:
    """Where the sampler looks: hidden width, dropout, learning rate (log scale), and the history length read."""

    # around the recipe (hidden 64, dropout 0.5, lr 1e-3): on Gift Cards (3 seeds) every sampled point of a wider
    # space (hidden 32-128, dropout 0.1-0.6, lr 3e-4 to 3e-3) scored below the grid's best, the high learning rates
    # early-stopping by epoch 10 and the low ones pruned
    hidden: tuple[int, ...] = (64, 128)
    dropout: tuple[float, float] = (0.3, 0.7)
    lr: tuple[float, float] = (5e-4, 2e-3)
    max_len: tuple[int, ...] = (50, 100)

    names = ("hidden", "dropout", "lr", "max_len")

    def covering(self, points: list[dict]) -> SearchSpace:
        """This space widened to hold every start point (an enqueued trial must lie inside its distributions)."""

        def values(name: str) -> list:
            return [p[name] for p in points if name in p]

        def span(bounds: tuple[float, float], name: str) -> tuple[float, float]:
            return min([bounds[0], *values(name)]), max([bounds[1], *values(name)])

        return SearchSpace(
            hidden=tuple(sorted({*self.hidden, *values("hidden")})),
            dropout=span(self.dropout, "dropout"),
            lr=span(self.lr, "lr"),
            max_len=tuple(sorted({*self.max_len, *values("max_len")})),
        )

    def suggest(self, trial: optuna.Trial) -> dict:
        return {
            "hidden": trial.suggest_categorical("hidden", self.hidden),
            "dropout": trial.suggest_float("dropout", *self.dropout),
            "lr": trial.suggest_float("lr", *self.lr, log=True),
            "max_len": trial.suggest_categorical("max_len", self.max_len),
        }


Fit = Callable[[dict, Callable[[int, float], None]], tuple[float, object, dict]]


def search(
    fit: Fit,
    starts: list[dict],
    seed: int,
    space: SearchSpace,
    trials: int | None = None,
    budget_s: float | None = None,
    give_up_below: float | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict | None, object, list[dict]]:
    """The best (params, model) of a search, and every trial's record (params, ``validation_ndcg``, ``state``, and
    what ``fit`` adds; start points never run are recorded with ``skipped``).

    ``fit(params, report)`` trains one trial and returns (its validation NDCG, the model, extra fields for its
    record); it calls ``report(epoch, validation_ndcg)`` after each validation, which raises
    :class:`optuna.TrialPruned` when the pruner stops the trial. ``starts`` run first, in order, whole (their keys
    outside the space, e.g. batch size and patience, are shared by the sampled points: those of the first)."""
    import optuna

    total = max(len(starts), trials or len(starts))
    space = space.covering(starts)
    shared = {k: v for k, v in starts[0].items() if k not in SearchSpace.names}
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(len(starts), 2), multivariate=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER_TRIALS, n_warmup_steps=PRUNE_AFTER_EPOCHS - 1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # each trial is logged below, in one line
    study = optuna.create_study(direction="maximize", sampler=sampler, pruner=pruner)
    for point in starts:
        study.enqueue_trial({k: point[k] for k in SearchSpace.names if k in point})
    records: list[dict] = []
    best: dict = {"value": -math.inf, "params": None, "model": None}
    started = time.perf_counter()
    stopped = {"why": None}

    def objective(trial: optuna.Trial) -> float:
        base = starts[trial.number] if trial.number < len(starts) else shared
        params = {**base, **space.suggest(trial)}

        def report(epoch: int, value: float) -> None:
            trial.report(value, epoch)
            if trial.should_prune():
                trial.set_user_attr("pruned_at_epoch", epoch)
                raise optuna.TrialPruned(f"validation NDCG@10 {value:.4f} at epoch {epoch}, behind the median")

        try:
            value, model, extra = fit(params, report)
        except optuna.TrialPruned as pruned:
            log(f"trial {trial.number} {params}: pruned ({pruned})")
            epoch = trial.user_attrs.get("pruned_at_epoch")
            records.append({**params, "state": "pruned", "pruned_at_epoch": epoch, "pruned": str(pruned)})
            raise
        facts = ", ".join(f"{k} {v}" for k, v in extra.items())
        log(f"trial {trial.number} {params}: validation NDCG@10 {value:.4f} ({facts})")
        records.append({**params, "validation_ndcg": round(value, 5), "state": "complete", **extra})
        if value > best["value"]:
            best.update(value=value, params=params, model=model)
        return value

    def stop_when_done(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if budget_s is not None and time.perf_counter() - started >= budget_s:
            stopped["why"] = f"tuning budget of {budget_s:g} s spent"
        elif trial.number == 0 and give_up_below is not None and best["value"] < give_up_below:
            stopped["why"] = f"first trial {best['value']:.4f} below {give_up_below:.4f}"
        if stopped["why"]:
            study.stop()

    study.optimize(objective, n_trials=total, callbacks=[stop_when_done])
    ran = len(records)  # the study also lists the start points still queued
    for point in starts[ran:]:
        records.append({**point, "skipped": stopped["why"]})
    log(f"tuned: {best['params']} (validation NDCG@10 {best['value']:.4f}, {ran} trials)")
    return best["params"], best["model"], records
