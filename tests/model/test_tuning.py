"""The sequence part's search (an Optuna study): start points first, seeded samples, pruning, trial and time budgets."""

from __future__ import annotations

import numpy as np
import pytest

from nightrec.model.sasrec import best_sasrec
from nightrec.model.tuning import SearchSpace, search
from tests.tasks.test_sasrec import N_ITEMS, SMALL, cycles, one_thread  # noqa: F401 (autouse: one torch thread)


def chain_task():
    train = cycles(120, seed=0)
    return train, ([h[:-1] for h in train[:30]], [h[-1:] for h in train[:30]])


GRID = [{**SMALL, "dropout": d, "epochs": 6} for d in (0.1, 0.3)]


def test_the_search_runs_its_start_points_first_then_seeded_samples_and_repeats_under_a_seed():
    train, validation = chain_task()
    params, model, trials = best_sasrec(train, N_ITEMS, validation, seed=0, grid=GRID, trials=5, log=lambda _m: None)
    assert len(trials) == 5
    for trial, point in zip(trials[:2], GRID, strict=True):  # the grid exactly as given, in order
        assert {k: trial[k] for k in point} == point
    sampled = trials[2:]
    assert len({(t["hidden"], round(t["dropout"], 6), round(t["lr"], 8)) for t in sampled}) == 3  # new points
    assert all(t["batch_size"] == SMALL["batch_size"] and t["blocks"] == 1 for t in sampled)  # shared keys kept
    complete = [t for t in trials if t["state"] == "complete"]
    best = max(complete, key=lambda t: t["validation_ndcg"])
    assert {k: params[k] for k in ("hidden", "dropout", "lr")} == {k: best[k] for k in ("hidden", "dropout", "lr")}
    assert model.validation_ndcg(*validation) == pytest.approx(best["validation_ndcg"], abs=1e-5)
    again = best_sasrec(train, N_ITEMS, validation, seed=0, grid=GRID, trials=5, log=lambda _m: None)

    def timeless(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert again[0] == params and timeless(again[2]) == timeless(trials)  # deterministic: same trials, same pick
    other = best_sasrec(train, N_ITEMS, validation, seed=1, grid=GRID, trials=5, log=lambda _m: None)[2]
    assert [t["dropout"] for t in other[2:]] != [t["dropout"] for t in sampled]  # another seed samples elsewhere


def test_the_search_starts_no_trial_once_its_budget_is_spent_and_gives_up_behind_the_rest():
    train, validation = chain_task()
    grid = [{**SMALL, "dropout": d, "epochs": 2} for d in (0.1, 0.2, 0.3)]
    params, model, trials = best_sasrec(train, N_ITEMS, validation, seed=0, grid=grid, budget_s=0.0, trials=6)
    # the first trial always runs; the grid points after it are recorded as skipped, and nothing is sampled
    assert len(trials) == 3 and trials[0]["state"] == "complete" and all("budget" in t["skipped"] for t in trials[1:])
    assert params["dropout"] == 0.1 and model is not None
    _, _, behind = best_sasrec(train, N_ITEMS, validation, seed=0, grid=grid, give_up_below=2.0, trials=6)
    assert len(behind) == 3 and all("below 2.0000" in t["skipped"] for t in behind[1:])


def test_the_pruner_stops_a_trial_that_runs_behind_the_completed_ones():
    """A fake fit: each trial reports a validation every 2 epochs; the third runs far behind from the start."""
    curves = {0.2: 0.5, 0.3: 0.6, 0.4: 0.05}  # dropout -> plateau

    def fit(params, report):
        for epoch in range(2, 31, 2):
            report(epoch, curves[params["dropout"]] * min(1.0, epoch / 10))
        return curves[params["dropout"]], params["dropout"], {"epochs_run": 30}

    starts = [{"dropout": d, "batch_size": 8} for d in curves]
    params, model, trials = search(fit, starts, seed=0, space=SearchSpace(), trials=3, log=lambda _m: None)
    assert [t["state"] for t in trials] == ["complete", "complete", "pruned"]
    assert trials[2]["pruned_at_epoch"] == 10  # judged from epoch 10 on, no sooner
    assert params["dropout"] == 0.3 and model == 0.3


def test_the_space_widens_to_hold_every_start_point():
    space = SearchSpace().covering([{"hidden": 256, "dropout": 0.05, "lr": 1e-2, "max_len": 200}])
    assert 256 in space.hidden and 200 in space.max_len
    assert space.dropout[0] == 0.05 and space.lr[1] == 1e-2
    assert np.isclose(space.dropout[1], SearchSpace().dropout[1])
