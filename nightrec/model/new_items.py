"""Vectors for items that have text but no training events (new items), predicted from their text.

Every per-item parameter the model learns from events (the ID embeddings and bias of each network, the sequence
part's item embedding, the popularity prior's count) is zero or untrained for an item nobody has interacted with yet,
so such an item could never reach a list: its text-adaptor vector alone scores below every known item. Here each of
those tables is regressed on the language-model text vectors of the trained items (ridge, its strength chosen by
generalised cross-validation), and the new items get the prediction: an item whose text looks like a cluster of items
gets that cluster's typical vectors, shrunk towards the average item where the text says little. The same idea as the
"mapping" approaches to cold-start items (DeepMusic, DropoutNet's text path), done once per night in closed form.

A regression shrinks towards the average item, and an average item is in nobody's top 20, so the filled items also
get one score offset, calibrated on validation by :func:`calibrate_new_item_offset`: a seeded share of the trained
items is made new (their tables predicted from text, their events removed from the inputs), and the offset that
ranks the validation users' next items best, new and known together, is the one served.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np
import torch

from nightrec.model.sasrec import sequence_members
from nightrec.ranking import per_user_metrics, top_k_unseen

if TYPE_CHECKING:
    from nightrec.model.recommender import Recommender

ALPHAS = np.logspace(-4, 2, 13)  # ridge strengths, relative to the text's largest squared singular value


def ridge_from_text(text: np.ndarray, targets: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """``targets`` (n, k) predicted for every row of ``text`` (n, d), from a ridge regression (with intercept) fitted
    on ``fit_rows`` (bool (n,) or indices). The ridge strength is the generalised-cross-validation minimum over
    :data:`ALPHAS` (times the largest squared singular value), so a text that carries no signal predicts the mean."""
    text = np.asarray(text, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64).reshape(len(text), -1)
    x, y = text[fit_rows], targets[fit_rows]
    n = len(x)
    if n < 2:
        return np.broadcast_to(y.mean(0) if n else np.zeros(targets.shape[1]), targets.shape).copy()
    x_mean, y_mean = x.mean(0), y.mean(0)
    u, s, vt = np.linalg.svd(x - x_mean, full_matrices=False)
    uty = u.T @ (y - y_mean)
    scale = float(s[0] ** 2) if len(s) and s[0] > 0 else 1.0
    best, best_score = None, np.inf
    for alpha in ALPHAS * scale:
        shrink = s**2 / (s**2 + alpha)
        fitted = u @ (shrink[:, None] * uty)
        residual = float(((y - y_mean - fitted) ** 2).sum())
        dof = float(shrink.sum())
        if n - dof <= 1e-9:
            continue
        score = n * residual / (n - dof) ** 2  # GCV: leave-one-out error without n refits
        if score < best_score:
            best, best_score = shrink, score
    if best is None:
        return np.broadcast_to(y_mean, targets.shape).copy()
    coef = vt.T @ ((best / np.where(s > 0, s, 1.0))[:, None] * uty)
    return (text - x_mean) @ coef + y_mean


def new_item_mask(trained: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Items to fill: not trained, with a text vector (an item known only from the logs has an all-zero text)."""
    has_text = np.abs(np.asarray(text)).sum(1) > 0
    return ~np.asarray(trained, dtype=bool) & has_text


def fill_rows(table: np.ndarray, text: np.ndarray, trained: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """``table`` (n, ...) with the ``fill`` rows replaced by their prediction from ``text``, fitted on the trained
    items that have text."""
    table = np.array(table, copy=True)
    fit = np.asarray(trained, dtype=bool) & (np.abs(np.asarray(text)).sum(1) > 0)
    if not fill.any() or fit.sum() < 2:
        return table
    flat = table.reshape(len(table), -1)
    predicted = ridge_from_text(text, flat, fit)
    flat[fill] = predicted[fill].astype(table.dtype)
    return flat.reshape(table.shape)


# Offsets tried for new items, in units of the median per-user standard deviation of the validation scores
OFFSET_GRID = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
PSEUDO_NEW_SHARE = 0.1  # share of the trained items made new for the calibration
# the most an offset may cost the validation's other targets (relative NDCG@k): pseudo-new items are drawn from items
# people took, tonight's real new items may be ones nobody will (Gift Cards, seed 1: without this bound the best
# validation NDCG lifted new items into 99.7 % of the lists and cut test warm NDCG@10 from 0.227 to 0.118)
OFFSET_MAX_COST = 0.01
OFFSET_MIN_ITEMS = 10  # fewer pseudo-new items than this: no offset (the validation says nothing)


@torch.no_grad()
def fill_new_items(recommender: Recommender, trained: np.ndarray) -> np.ndarray:
    """Give the items with text and no training events every event-learned table predicted from their text: each
    network's ID embeddings and bias (those items then count as known), the sequence part's embedding, the item-item
    part's rows and the popularity count. Returns the filled item indices."""
    text = recommender.item_text_vectors
    fill = new_item_mask(trained, text)
    if not fill.any():
        return np.zeros(0, dtype=np.int64)
    rows = np.flatnonzero(fill)
    for model in recommender._models():
        for table in (model.item_id, model.id_bias, model.history_id):
            weight = table.weight.detach().numpy()
            table.weight.copy_(torch.from_numpy(fill_rows(weight, text, trained, fill)))
        model.known[torch.from_numpy(rows)] = True
    for member in sequence_members(recommender.sequence) if recommender.has_sequence else []:
        vectors = member.net.items.weight[: member.n_items].detach().numpy()
        member.set_item_rows(rows, fill_rows(vectors, text, trained, fill)[rows])
    if recommender.has_item_item:
        part = recommender.item_item
        part.history = fill_rows(part.history, text, trained, fill)
        part.items = fill_rows(part.items, text, trained, fill)
    if recommender.popularity is not None:
        predicted = fill_rows(recommender.popularity[:, None], text, trained, fill)[:, 0]
        recommender.popularity = np.maximum(predicted, 0.0).astype(np.float32)
    return rows


def calibrate_new_item_offset(
    recommender: Recommender,
    trained: np.ndarray,
    histories: list[np.ndarray],
    targets: list[np.ndarray],
    profiles: np.ndarray | None,
    seed: int,
    k: int = 20,
    batch: int = 256,
) -> tuple[float, dict]:
    """The score offset for new items (absolute score units) and what the calibration saw.

    A seeded :data:`PSEUDO_NEW_SHARE` of the ``trained`` items with text is filled from text in a copy of
    ``recommender`` as if it were new, and removed from the validation ``histories`` (a new item is in nobody's
    history); then each offset of :data:`OFFSET_GRID` (times the median per-user std of the scores) is added to the
    scores of every item serving would lift (those and tonight's real new items: where the catalogue holds many items
    nobody takes, lifting them all costs the lists, and the validation sees that cost), and the one with the best
    NDCG@k over every target, new and known, is kept (ties: the smaller) among those that cost the other targets at
    most :data:`OFFSET_MAX_COST` of their NDCG."""
    text = recommender.item_text_vectors
    candidates = np.flatnonzero(np.asarray(trained, dtype=bool) & (np.abs(text).sum(1) > 0))
    # a tenth, but 20 where a tenth is fewer and a fifth of the items allows it (Gift Cards: ~130 trained items)
    size = max(int(round(PSEUDO_NEW_SHARE * len(candidates))), min(2 * OFFSET_MIN_ITEMS, len(candidates) // 5))
    if size < OFFSET_MIN_ITEMS or not histories:
        return 0.0, {"new_item_offset_skipped": f"{size} pseudo-new items (fewer than {OFFSET_MIN_ITEMS})"}
    pseudo = np.sort(np.random.default_rng([seed, 41]).choice(candidates, size=size, replace=False))
    twin = copy.deepcopy(recommender)
    as_new = np.array(trained, dtype=bool, copy=True)
    as_new[pseudo] = False
    lifted = np.zeros(len(text), dtype=bool)  # what serving lifts: tonight's new items and the pseudo-new ones
    lifted[fill_new_items(twin, as_new)] = True
    is_pseudo = np.zeros(len(text), dtype=bool)
    is_pseudo[pseudo] = True
    inputs = [h[~is_pseudo[h]] for h in histories]
    totals = np.zeros(len(OFFSET_GRID))
    rest = np.zeros(len(OFFSET_GRID))  # NDCG of the targets that are not pseudo-new: what the lift costs them
    hits = np.zeros(len(OFFSET_GRID))
    spreads = []
    for begin in range(0, len(inputs), batch):
        chunk = inputs[begin : begin + batch]
        prof = None if profiles is None else profiles[begin : begin + batch]
        spreads.append(twin.score_histories(chunk, prof).std(axis=1))
    scale = float(np.median(np.concatenate(spreads))) if spreads else 0.0
    for begin in range(0, len(inputs), batch):
        chunk, wanted = inputs[begin : begin + batch], targets[begin : begin + batch]
        others = [t[~is_pseudo[t]] for t in wanted]
        prof = None if profiles is None else profiles[begin : begin + batch]
        scores = twin.score_histories(chunk, prof)
        for g, step in enumerate(OFFSET_GRID):
            top = top_k_unseen(scores + (step * scale) * lifted[None, :], chunk, k)
            totals[g] += float(np.nansum(per_user_metrics(top, wanted, k)["ndcg"]))
            rest[g] += float(np.nansum(per_user_metrics(top, others, k)["ndcg"]))
            hits[g] += float(is_pseudo[top].any(axis=1).sum())
    allowed = rest >= (1.0 - OFFSET_MAX_COST) * rest[0]  # step 0 always is
    best = int(np.argmax(np.where(allowed, totals, -np.inf)))  # the first maximum: the smallest offset among ties
    steps = [str(g) for g in OFFSET_GRID]
    info = {
        "new_item_offset_step": OFFSET_GRID[best],
        "new_item_offset_pseudo_items": size,
        "new_item_offset_ndcg": {g: round(float(t) / len(inputs), 5) for g, t in zip(steps, totals, strict=True)},
        "new_item_offset_other_ndcg": {g: round(float(r) / len(inputs), 5) for g, r in zip(steps, rest, strict=True)},
        "new_item_offset_in_lists": {g: round(float(h) / len(inputs), 4) for g, h in zip(steps, hits, strict=True)},
    }
    return float(OFFSET_GRID[best] * scale), info
