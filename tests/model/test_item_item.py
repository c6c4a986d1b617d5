"""The item-item part (nightrec.model.itemitem): known answers on generated co-occurrence."""

from __future__ import annotations

import numpy as np

from nightrec.model.itemitem import ItemItem

BLOCK = 10


def _histories(n_users: int, seed: int) -> list[np.ndarray]:
    """Each user takes 4-8 items of one block (items co-occur only within their block)."""
    rng = np.random.default_rng(seed)
    out = []
    for u in range(n_users):
        block = u % 3
        out.append(rng.permutation(BLOCK)[: rng.integers(4, 9)] + block * BLOCK)
    return out


def test_a_users_unseen_items_of_their_block_outrank_every_other_block():
    part = ItemItem.fit(_histories(300, 0), 3 * BLOCK, rank=8, shrink=0.1)
    for history in _histories(30, 1):
        scores = part.score([history])[0]
        block = history[0] // BLOCK
        own = np.setdiff1d(np.arange(block * BLOCK, (block + 1) * BLOCK), history)
        other = np.setdiff1d(np.arange(3 * BLOCK), np.arange(block * BLOCK, (block + 1) * BLOCK))
        assert scores[own].min() > scores[other].max()


def test_the_score_is_the_served_inner_product_and_sums_over_history_items():
    part = ItemItem.fit(_histories(300, 0), 3 * BLOCK, rank=8, shrink=0.1)
    history = np.array([0, 3, 5])
    one_by_one = sum(part.history[i] for i in history) @ part.items.T
    assert np.allclose(part.score([history])[0], one_by_one, atol=1e-5)  # exact per-item shares (reasons)
    assert np.allclose(part.score([np.array([0, 0, 3, 5])]), part.score([history]))  # a repeat counts once


def test_rank_and_shrink_are_chosen_on_validation_deterministically():
    train, held = _histories(300, 0), _histories(60, 2)
    validation = ([h[:3] for h in held], [h[3:] for h in held])
    first = ItemItem.fit(train, 3 * BLOCK, validation)
    again = ItemItem.fit(train, 3 * BLOCK, validation)
    assert (first.rank, first.shrink) == (again.rank, again.shrink) and first.trials == again.trials
    assert len(first.trials) > 10
    best = max(t["validation_ndcg"] for t in first.trials)
    chosen = next(t for t in first.trials if (t["rank"], t["shrink"]) == (first.rank, first.shrink))
    assert chosen["validation_ndcg"] == best
    # three blocks of co-occurrence: a tiny rank cannot separate them, the chosen one does
    assert first.rank >= 3
