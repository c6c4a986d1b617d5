"""Vectors for items that have text but no training events (new items), predicted from their text.

Every per-item parameter the model learns from events (the ID embeddings and bias of each network, the sequence
part's item embedding, the popularity prior's count) is zero or untrained for an item nobody has interacted with yet,
so such an item could never reach a list: its text-adaptor vector alone scores below every known item. Here each of
those tables is regressed on the language-model text vectors of the trained items (ridge, its strength chosen by
generalised cross-validation), and the new items get the prediction: an item whose text looks like a cluster of items
gets that cluster's typical vectors, shrunk towards the average item where the text says little. The same idea as the
"mapping" approaches to cold-start items (DeepMusic, DropoutNet's text path), done once per night in closed form.
"""

from __future__ import annotations

import numpy as np

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
