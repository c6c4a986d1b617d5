"""SASRec-CE peer: a known-answer sequence task, early stopping restores the best state, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nightrec.model.sasrec import SASRecEnsemble, sequence_from_arrays, sequence_members
from nightrec.ranking import top_k_unseen
from nightrec.tasks.sasrec import SASRec, tune_sasrec

N_ITEMS = 30
SMALL = {"hidden": 32, "blocks": 1, "max_len": 16, "dropout": 0.1, "lr": 3e-3, "batch_size": 64, "threads": 1}


def cycles(n_users: int, seed: int) -> list[np.ndarray]:
    """Item i is always followed by (i + 1) % 30; random start, 5-15 items (shorter than the cycle, so the next item
    is never already in the history)."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(N_ITEMS) + np.arange(rng.integers(5, 16))) % N_ITEMS for _ in range(n_users)]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_learns_the_next_item_of_a_deterministic_sequence():
    model = SASRec(cycles(200, seed=0), N_ITEMS, epochs=20, **SMALL)
    held_out = cycles(100, seed=1)
    top = top_k_unseen(model.score(held_out), held_out, 1)[:, 0]
    truth = np.array([(h[-1] + 1) % N_ITEMS for h in held_out])
    assert (top == truth).mean() >= 0.9
    assert model.epochs_run == model.best_epoch == 20  # no validation: every epoch runs


def test_sampled_softmax_learns_the_chain_and_falls_back_to_the_full_one_on_a_small_catalogue():
    held_out = cycles(100, seed=1)
    truth = np.array([(h[-1] + 1) % N_ITEMS for h in held_out])
    sampled = SASRec(cycles(200, seed=0), N_ITEMS, epochs=20, negatives=8, **SMALL)
    top = top_k_unseen(sampled.score(held_out), held_out, 1)[:, 0]
    assert (top == truth).mean() >= 0.9  # 8 of 29 wrong items per batch are enough to learn the successor
    full = SASRec(cycles(200, seed=0), N_ITEMS, epochs=2, **SMALL)
    assert not np.allclose(
        SASRec(cycles(200, seed=0), N_ITEMS, epochs=2, negatives=8, **SMALL).score(held_out), full.score(held_out)
    )  # a different loss, not the full softmax under another name
    as_many = SASRec(cycles(200, seed=0), N_ITEMS, epochs=2, negatives=N_ITEMS, **SMALL)
    np.testing.assert_allclose(as_many.score(held_out), full.score(held_out), rtol=1e-5)


def test_early_stopping_restores_the_best_validation_state():
    rng = np.random.default_rng(2)
    histories = cycles(60, seed=2)
    # the true next item plus random noise: validation NDCG rises, then wanders, so the last state is not the best
    relevant = [np.array([(h[-1] + 1) % N_ITEMS, *rng.choice(N_ITEMS, 3)]) for h in histories]
    model = SASRec(
        cycles(200, seed=0), N_ITEMS, epochs=60, validation=(histories, relevant), patience=2, eval_every=1, **SMALL
    )
    epochs, values = zip(*model.history, strict=True)
    assert 1 < model.best_epoch == epochs[int(np.argmax(values))] < model.epochs_run < 60
    assert model.epochs_run - model.best_epoch == 2  # stopped after exactly `patience` evaluations without gain
    assert values[-1] < max(values)  # so restoring matters
    assert model.validation_ndcg(histories, relevant) == pytest.approx(max(values), abs=1e-12)


def test_same_seed_same_scores_and_empty_histories_get_popularity():
    train = cycles(60, seed=3)
    train.append(np.full(40, 5))  # item 5 by far the most popular
    a, b = (SASRec(train, N_ITEMS, epochs=3, seed=7, **SMALL) for _ in range(2))
    c = SASRec(train, N_ITEMS, epochs=3, seed=8, **SMALL)
    queries = [np.array([1, 2, 3]), np.array([], dtype=np.int64), np.arange(40) % N_ITEMS]  # last one > max_len
    sa, sb, sc = a.score(queries), b.score(queries), c.score(queries)
    assert sa.shape == (3, N_ITEMS) and sa.dtype == np.float32 and np.isfinite(sa).all()
    np.testing.assert_array_equal(sa, sb)
    assert not np.array_equal(sa, sc)
    np.testing.assert_array_equal(sa[1], a.popularity)
    # a batch is cut to its longest history: scored alone (3 columns) or beside a long one (16), same scores
    np.testing.assert_allclose(a.score(queries[:1])[0], sa[0], rtol=1e-5, atol=1e-5)
    assert int(np.argmax(sa[1])) == 5


def test_tune_returns_constructor_arguments_with_the_early_stopped_epochs():
    histories = cycles(40, seed=4)
    relevant = [np.array([(h[-1] + 1) % N_ITEMS]) for h in histories]
    grid = [{**SMALL, "epochs": 6, "dropout": d} for d in (0.1, 0.3)]
    logged: list[str] = []
    params = tune_sasrec(
        cycles(100, seed=0), N_ITEMS, (histories, relevant), seed=0, grid=grid, log=logged.append, trials=3
    )
    assert 1 <= params["epochs"] <= 6 and params["blocks"] == 1  # the grid's keys outside the search space kept
    assert len(logged) == 4  # one line per trial, then the choice
    SASRec(cycles(20, seed=5), N_ITEMS, seed=0, **{**params, "epochs": 1})  # the result is valid constructor input


def test_patience_is_counted_in_optimiser_steps_within_its_epoch_bounds():
    """Small catalogues (a few steps an epoch) keep the full patience; one whose epoch holds many steps stops sooner
    (the 400,000-event demo: ~47 steps an epoch, 10 epochs of patience were 470 steps of a flat curve)."""
    from nightrec.model.config import PATIENCE_STEPS, scaled_patience
    from nightrec.model.sasrec import SEQUENCE_PATIENCE, default_grid

    assert [scaled_patience(s, 10) for s in (1, 3, 20, 47, 100, 10_000)] == [10, 10, 10, 5, 3, 3]
    assert all(scaled_patience(s, 10) * s >= min(PATIENCE_STEPS, 10 * s) for s in range(1, 300))
    # SASRec's grid: validations every 2 epochs, 5 up to ~2,600 users (batch 128), fewer above
    by_users = {n: {g["patience"] for g in default_grid(n)} for n in (314, 750, 2_700, 6_030, 1_000_000)}
    assert by_users == {314: {SEQUENCE_PATIENCE}, 750: {5}, 2_700: {5}, 6_030: {3}, 1_000_000: {2}}


def test_an_ensemble_serves_the_mean_of_its_members_as_one_inner_product_and_saves_each_member():
    train = cycles(120, seed=0)
    members = [SASRec(train, N_ITEMS, epochs=4, seed=s, **SMALL) for s in (0, 100)]
    ensemble = SASRecEnsemble(members)
    users = cycles(20, seed=1)
    first, second = (m.score(users) for m in members)
    assert not np.allclose(first, second)  # two seeds, two different fits
    mean = (first + second) / 2
    np.testing.assert_allclose(ensemble.score(users), mean, rtol=1e-5, atol=1e-5)
    served = ensemble.states(users) @ ensemble.item_vectors().T  # what the FAISS index computes
    np.testing.assert_allclose(served, mean, rtol=1e-4, atol=1e-4)
    assert ensemble.hidden == 64 and ensemble.fit_seconds == pytest.approx(sum(m.fit_seconds for m in members))
    tensors, header = ensemble.arrays()
    assert {k for k in tensors if k.startswith("sequence.")} == {f"sequence.{k}" for k in members[0].net.state_dict()}
    loaded = sequence_from_arrays(tensors, header, N_ITEMS)
    assert len(sequence_members(loaded)) == 2
    np.testing.assert_allclose(loaded.score(users), mean, rtol=1e-5, atol=1e-5)
    single_tensors, single_header = members[0].arrays()  # a single model's file loads as one SASRec, as before
    assert isinstance(sequence_from_arrays(single_tensors, single_header, N_ITEMS), SASRec)
