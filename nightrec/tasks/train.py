"""The recommender's training loop: meta-training over users as tasks, warm start from a previous model.

The model itself (what it computes, how it is saved) lives in :mod:`nightrec.model`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from nightrec.model import MetaRecModel, Recommender, TrainConfig, pad_histories, user_sequences
from nightrec.model.config import cold_config
from nightrec.model.recommender import POPULARITY_BUCKETS, bucket_key, history_bucket
from nightrec.ranking import per_user_metrics, top_k_unseen

# Popularity prior weights tried per bucket, in units of (median per-user std of the model's scores) / std(p): 0 is
# the model alone, 64 is popularity with the model breaking its ties.
PRIOR_GRID = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)
# Users with no history and no profile all get one list: it is popularity (the model only breaks its near-ties),
# whatever a small calibration set says (on 36 Gift Cards calibration users, the fitted weight left it below).
PRIOR_NO_HISTORY_MIN = 16.0
PRIOR_MIN_USERS = 20  # a bucket with fewer calibration users takes the next shorter bucket's weight (same model)
PRIOR_COLD_QUERY = 50  # short buckets: history = first n interactions, target = the next up to 50 (the protocol's)
PRIOR_WARM_SHARE = 0.8  # longer buckets: history = the first 80 %, target = the rest


def _sample_tasks(lengths: np.ndarray, config: TrainConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Support size and query end per user: a cold share with 1-5 support items, the rest log-uniform up to n-1."""
    n = lengths
    cold = rng.random(len(n)) < config.cold_support_share
    cold_s = rng.integers(1, 6, size=len(n))
    warm_s = np.exp(rng.uniform(0.0, np.log(np.maximum(n - 1, 1)))).astype(np.int64)
    support = np.where(cold, cold_s, warm_s)
    support = np.clip(support, 1, np.maximum(n - 1, 1))
    query_end = np.minimum(n, support + config.max_query)
    return support, query_end


def _batch_tensors(
    seqs: list[np.ndarray], support_len: np.ndarray, query_end: np.ndarray, max_history: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    support, mask = pad_histories([s[:k] for s, k in zip(seqs, support_len, strict=True)], max_history)
    query, qmask = pad_histories([s[k:e] for s, k, e in zip(seqs, support_len, query_end, strict=True)], max_len=10**9)
    return support, mask, query, qmask


def _query_loss(
    u: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor,
    support: torch.Tensor,
    mask: torch.Tensor,
    query: torch.Tensor,
    qmask: torch.Tensor,
) -> torch.Tensor:
    """Full-softmax cross-entropy of the query items with the support (already seen) items masked out."""
    logits = u @ out.T + bias
    seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, support, mask)
    logits = logits.masked_fill(seen, float("-inf"))
    logp = torch.log_softmax(logits, dim=1).gather(1, query)
    qmaskf = qmask.to(logp.dtype)
    per_user = -(logp.masked_fill(~qmask, 0.0) * qmaskf).sum(1) / qmaskf.sum(1).clamp(min=1.0)
    return per_user[qmask.any(1)].mean()


def _sampled_query_loss(
    u: torch.Tensor,
    out: torch.Tensor,
    bias: torch.Tensor,
    support: torch.Tensor,
    mask: torch.Tensor,
    query: torch.Tensor,
    qmask: torch.Tensor,
    generator: torch.Generator,
    n_negatives: int,
) -> torch.Tensor:
    """Sampled softmax for large catalogues: candidates = the batch's query items + shared uniform negatives."""
    negatives = torch.randint(0, out.shape[0], (n_negatives,), generator=generator)
    cand = torch.unique(torch.cat([query[qmask], negatives]))
    logits = u @ out[cand].T + bias[cand]
    pos = torch.searchsorted(cand, query)
    seen = torch.zeros(u.shape[0], out.shape[0], dtype=torch.bool).scatter_(1, support, mask)[:, cand]
    logits = logits.masked_fill(seen, float("-inf"))
    logp = torch.log_softmax(logits, dim=1).gather(1, pos)
    qmaskf = qmask.to(logp.dtype)
    per_user = -(logp.masked_fill(~qmask, 0.0) * qmaskf).sum(1) / qmaskf.sum(1).clamp(min=1.0)
    return per_user[qmask.any(1)].mean()


def _warm_start(model: MetaRecModel, previous: Recommender, item_ids: list[str]) -> dict:
    """Copy the previous model's shared weights, and its item rows for items that keep their id."""
    state = model.state_dict()
    old = previous.model.state_dict()
    item_tables = {"item_id.weight", "history_id.weight", "id_bias.weight", "known"}
    copied, mapped = 0, 0
    for name, value in old.items():
        if name in item_tables or name not in state or state[name].shape != value.shape:
            continue
        state[name] = value.clone()
        copied += 1
    new_rows = [i for i, item in enumerate(item_ids) if item in previous.item_index]
    old_rows = [previous.item_index[item_ids[i]] for i in new_rows]
    if new_rows:
        for name in ("item_id.weight", "history_id.weight", "id_bias.weight"):
            if state[name].shape[1] == old[name].shape[1]:
                state[name][new_rows] = old[name][old_rows]
        mapped = len(new_rows)
    model.load_state_dict(state)
    return {"warm_start_tensors": copied, "warm_start_items": mapped}


def fit_recommender(
    events: pl.DataFrame,
    item_ids: list[str],
    item_text_vectors: np.ndarray,
    user_profile_vectors: dict[str, np.ndarray] | None,
    config: TrainConfig,
    init_from: Path | None = None,
) -> Recommender:
    """Meta-train on ``events`` (user_id, item_id, timestamp) over the catalogue ``item_ids``.

    ``item_text_vectors`` are the items' language-model embeddings (row i for ``item_ids[i]``). Items without events
    still get a (text-only) vector. ``init_from`` is a saved :class:`Recommender` folder: the nightly champion (its item
    rows are carried over by id) or a model from another catalogue (only the text adaptors, prior and step sizes carry).
    """
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        if config.popularity_prior:
            return _fit_with_prior(events, item_ids, item_text_vectors, user_profile_vectors, config, init_from)
        return _fit(events, item_ids, item_text_vectors, user_profile_vectors, config, init_from)
    finally:
        torch.set_num_threads(threads_before)  # the caller's setting, not ours, outlives the call


def _fit(
    events: pl.DataFrame,
    item_ids: list[str],
    item_text_vectors: np.ndarray,
    user_profile_vectors: dict[str, np.ndarray] | None,
    config: TrainConfig,
    init_from: Path | None,
) -> Recommender:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    started = time.perf_counter()

    item_index = {item: i for i, item in enumerate(item_ids)}
    users, seqs = user_sequences(events, item_index)
    keep = [i for i, s in enumerate(seqs) if len(s) >= 2]  # a task needs a support and a query
    users, seqs = [users[i] for i in keep], [seqs[i] for i in keep]
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)

    profile_dim = None
    profiles = None
    if user_profile_vectors:
        profile_dim = len(next(iter(user_profile_vectors.values())))
        profiles = np.stack(
            [np.asarray(user_profile_vectors.get(u, np.zeros(profile_dim)), dtype=np.float32) for u in users]
        )
    text = torch.from_numpy(np.ascontiguousarray(item_text_vectors, dtype=np.float32))
    model = MetaRecModel(len(item_ids), text.shape[1], config, profile_dim)
    known = np.zeros(len(item_ids), dtype=bool)
    if seqs:
        known[np.concatenate(seqs)] = True
    model.known.copy_(torch.from_numpy(known))
    meta: dict = {"trained_users": len(users), "trained_items": int(known.sum())}
    if init_from is not None:
        meta.update(_warm_start(model, Recommender.load(init_from), item_ids))
        meta["init_from"] = str(init_from)

    sampled = len(item_ids) > config.sampled_softmax_above
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    losses: list[float] = []
    model.train()
    for _epoch in range(config.epochs if users else 0):
        order = rng.permutation(len(users))[: config.max_users_per_epoch]  # a prefix of a permutation: a sample
        support_len, query_end = _sample_tasks(lengths, config, rng)
        epoch_loss = 0.0
        for start in range(0, len(order), config.batch_users):
            batch = order[start : start + config.batch_users]
            support, mask, query, qmask = _batch_tensors(
                [seqs[i] for i in batch], support_len[batch], query_end[batch], config.max_history
            )
            prof = None if profiles is None else torch.from_numpy(profiles[batch])
            out, bias, hist = model.item_tables(text)
            aux = None
            if config.prior != "pooled" and config.seq_aux_weight > 0 and not sampled:
                states, seq, valid = model.sequence_states(hist, support, mask)  # once for the prior and the aux
                u0 = model.prior_vectors(hist, support, mask, prof, states=states)
                aux = model.sequence_aux_loss(states, seq, valid, out, bias)
            else:
                u0 = model.prior_vectors(hist, support, mask, prof)
            u = model.adapt(u0, out, bias, support, mask)
            if sampled:
                loss = _sampled_query_loss(u, out, bias, support, mask, query, qmask, generator, config.n_negatives)
            else:
                loss = _query_loss(u, out, bias, support, mask, query, qmask)
            if aux is not None:
                loss = loss + config.seq_aux_weight * aux
            if config.id_l2:
                loss = loss + config.id_l2 * (model.item_id.weight.pow(2).sum() + model.history_id.weight.pow(2).sum())
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            epoch_loss += float(loss.detach()) * len(batch)
        losses.append(epoch_loss / len(order))
    meta.update(
        {
            "train_seconds": round(time.perf_counter() - started, 2),
            "final_loss": losses[-1] if losses else None,
            "epochs": len(losses),
            "losses": [round(x, 5) for x in losses],  # per-epoch meta-training query loss, for the lead's plot
        }
    )
    cold_model = None
    if config.cold_below > 0 and config.use_id and users:
        cold = _fit(events, item_ids, item_text_vectors, user_profile_vectors, cold_config(config), init_from)
        cold_model = cold.model
        meta["cold_losses"] = cold.meta["losses"]
        meta["train_seconds"] = round(time.perf_counter() - started, 2)
    return Recommender(
        model=model,
        item_ids=list(item_ids),
        item_text_vectors=item_text_vectors,
        config=config,
        meta=meta,
        cold_model=cold_model,
    )


def _fit_with_prior(
    events: pl.DataFrame,
    item_ids: list[str],
    item_text_vectors: np.ndarray,
    user_profile_vectors: dict[str, np.ndarray] | None,
    config: TrainConfig,
    init_from: Path | None,
) -> Recommender:
    """Meta-train without a seeded share of the users (calibration users), then fit the popularity prior's weight per
    history-length bucket on them: their histories cut to each bucket's length, the rest of them the target."""
    item_index = {item: i for i, item in enumerate(item_ids)}
    users, seqs = user_sequences(events, item_index)
    eligible = np.flatnonzero([len(s) >= 2 for s in seqs])
    n_cal = min(config.calibration_max_users, int(round(len(eligible) * config.calibration_share)))
    if n_cal < PRIOR_MIN_USERS:
        recommender = _fit(events, item_ids, item_text_vectors, user_profile_vectors, config, init_from)
        recommender.meta["popularity_calibration_users"] = 0  # too few users to fit it on: no prior
        return recommender
    chosen = np.sort(np.random.default_rng([config.seed, 31]).choice(eligible, size=n_cal, replace=False))
    is_cal = np.zeros(len(seqs), dtype=bool)
    is_cal[chosen] = True
    cal_users = [users[i] for i in chosen]
    train_events = events.filter(~pl.col("user_id").is_in(cal_users))
    recommender = _fit(train_events, item_ids, item_text_vectors, user_profile_vectors, config, init_from)
    n_items = len(item_ids)
    rest = [s for s, c in zip(seqs, is_cal, strict=True) if not c]
    fit_counts = np.bincount(np.concatenate(rest) if rest else np.zeros(0, np.int64), minlength=n_items)
    profiles = recommender._profile_matrix(cal_users, user_profile_vectors)
    beta, info = _calibrate_prior(recommender, [seqs[i] for i in chosen], np.log1p(fit_counts), profiles)
    if config.calibration_refit:  # the final model sees every user; the weights were fitted on its 90 % twin
        calibrated_on = recommender.meta
        recommender = _fit(events, item_ids, item_text_vectors, user_profile_vectors, config, init_from)
        recommender.meta["train_seconds"] = round(recommender.meta["train_seconds"] + calibrated_on["train_seconds"], 2)
    all_counts = np.bincount(np.concatenate(seqs) if seqs else np.zeros(0, np.int64), minlength=n_items)
    recommender.popularity = np.log1p(all_counts).astype(np.float32)  # served: every training user's counts
    recommender.popularity_beta = beta
    recommender.meta.update({"popularity_calibration_users": n_cal, **info})
    return recommender


def _prior_cases(seqs: list[np.ndarray]) -> dict[int, tuple[list[np.ndarray], list[np.ndarray], list[int]]]:
    """Bucket -> (histories, targets, user rows) of the calibration users: the one-length buckets (n = 0..5) cut
    each user at n, the longer ones at 80 % of the user's history (the bucket of that length)."""
    last = len(POPULARITY_BUCKETS) - 1
    single = {b for b in range(last) if POPULARITY_BUCKETS[b + 1] == POPULARITY_BUCKETS[b] + 1}
    cases: dict[int, tuple[list, list, list]] = {b: ([], [], []) for b in range(len(POPULARITY_BUCKETS))}
    for row, s in enumerate(seqs):
        for b in sorted(single):
            n = POPULARITY_BUCKETS[b]
            if len(s) > n:
                cases[b][0].append(s[:n])
                cases[b][1].append(s[n : n + PRIOR_COLD_QUERY])
                cases[b][2].append(row)
        cut = max(1, int(np.floor(len(s) * PRIOR_WARM_SHARE)))
        b = int(history_bucket([cut])[0])
        if b not in single and cut < len(s):
            cases[b][0].append(s[:cut])
            cases[b][1].append(s[cut:])
            cases[b][2].append(row)
    return cases


def _calibrate_prior(
    recommender: Recommender,
    seqs: list[np.ndarray],
    popularity: np.ndarray,
    profiles: np.ndarray | None,
    batch: int = 512,
) -> tuple[np.ndarray, dict]:
    """One weight per bucket from :data:`PRIOR_GRID` (times a scale that makes ``popularity`` comparable with the
    model's scores), by the calibration users' NDCG@20 (one-length buckets, n <= 5) or NDCG@10 (longer ones)."""
    config = recommender.config
    spread = float(popularity.std())
    beta = np.zeros(len(POPULARITY_BUCKETS), dtype=np.float32)
    info: dict = {}

    def served_by_cold(b: int) -> bool:
        return recommender.cold_model is not None and POPULARITY_BUCKETS[b] < config.cold_below

    for b, (hist, target, owner) in _prior_cases(seqs).items():
        name = bucket_key(b)
        if len(hist) < PRIOR_MIN_USERS or spread == 0:
            # too few users to fit on: the shorter bucket's weight where the same model serves both, else none
            same_model = b > 0 and served_by_cold(b) == served_by_cold(b - 1)
            beta[b] = beta[b - 1] if same_model and spread > 0 else 0.0
            info[f"popularity_beta_{name}"] = float(beta[b])
            continue
        short = POPULARITY_BUCKETS[b] < 6
        k = 20 if short else 10
        floor = PRIOR_NO_HISTORY_MIN if POPULARITY_BUCKETS[b] == 0 and profiles is None else 0.0
        grid = [w for w in PRIOR_GRID if w >= floor]
        ndcg = np.zeros(len(grid))
        scale = None
        for start in range(0, len(hist), batch):
            h, t = hist[start : start + batch], target[start : start + batch]
            prof = None if profiles is None else profiles[owner[start : start + batch]]
            scores = recommender.score_histories(h, prof, prior=False)
            if scale is None:  # from the first batch: the median user's score spread, per unit of popularity spread
                scale = float(np.median(scores.std(axis=1))) / spread
            for g, weight in enumerate(grid):
                top = top_k_unseen(scores + (weight * scale) * popularity[None, :], h, k)
                ndcg[g] += np.nansum(per_user_metrics(top, t, k)["ndcg"])
        best = int(np.argmax(ndcg))  # the first, smallest weight on a tie
        beta[b] = grid[best] * scale
        info[f"popularity_beta_{name}"] = float(beta[b])
        info[f"popularity_weight_{name}"] = float(grid[best])  # in units of the scale
        info[f"popularity_gain_{name}"] = float(
            (ndcg[best] - ndcg[0]) / len(hist)
        )  # NDCG over the smallest weight tried
    return beta, info


def support_loss(recommender: Recommender, histories: list[np.ndarray], steps: int) -> float:
    """Mean support cross-entropy after ``steps`` inner steps (to check that adaptation fits the user's own data)."""
    model = recommender.model
    with torch.inference_mode():
        out, bias, hist = model.item_tables(recommender.text)
        support, mask = pad_histories(histories, recommender.config.max_history)
        u = model.adapt(model.prior_vectors(hist, support, mask, None), out, bias, support, mask, steps=steps)
        logp = torch.log_softmax(u @ out.T + bias, dim=1).gather(1, support)
        maskf = mask.float()
        return float(((-logp * maskf).sum(1) / maskf.sum(1).clamp(min=1)).mean())
