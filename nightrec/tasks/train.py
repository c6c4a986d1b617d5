"""The recommender's training loop: meta-training over users as tasks, warm start from a previous model.

The model itself (what it computes, how it is saved) lives in :mod:`nightrec.model`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from nightrec.model import MetaRecModel, Recommender, TrainConfig, pad_histories, user_sequences
from nightrec.model.config import cold_config, scaled_patience
from nightrec.model.itemitem import ItemItem
from nightrec.model.new_items import calibrate_new_item_offset, fill_new_items, new_item_mask
from nightrec.model.recommender import POPULARITY_BUCKETS, bucket_key, history_bucket
from nightrec.model.sasrec import EpochCallback, SASRec, SASRecEnsemble, best_sasrec, default_grid, sequence_members
from nightrec.model.sequences import profile_matrix
from nightrec.ranking import per_user_metrics, top_k_unseen

# Popularity prior weights tried per bucket, in units of (median per-user std of the model's scores) / std(p): 0 is
# the model alone, 64 is popularity with the model breaking its ties.
Progress = Callable[[str, int, dict[str, float]], None]  # (phase, epoch, values): see fit_recommender

PRIOR_GRID = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)
# Users with no history and no profile all get one list: it is popularity (the model only breaks its near-ties),
# whatever a small calibration set says (on 36 Gift Cards calibration users, the fitted weight left it below).
PRIOR_NO_HISTORY_MIN = 16.0
# Sequence part weights tried per bucket, in units of (median per-user std of the meta-learned scores) / (that of the
# sequence part's): 0 is the meta-learned model alone, 64 the sequence part with the rest breaking its ties.
SEQUENCE_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 64.0)
SEQUENCE_GIVE_UP = 0.8  # share of the meta-learned part's validation NDCG below which the sequence grid stops
PRIOR_MIN_USERS = 20  # a bucket with fewer calibration users takes the next shorter bucket's weight (same model)
PRIOR_COLD_QUERY = 50  # short buckets: history = first n interactions, target = the next up to 50 (the protocol's)
PRIOR_WARM_SHARE = 0.8  # longer buckets: history = the first 80 %, target = the rest


def _phase(progress: Progress | None, phase: str) -> EpochCallback | None:
    """``progress`` bound to one training phase, as a per-epoch callback."""
    if progress is None:
        return None
    return lambda epoch, values: progress(phase, epoch, values)


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


def _warm_start(model: MetaRecModel, source: MetaRecModel, source_index: dict[str, int], item_ids: list[str]) -> dict:
    """Copy ``source``'s shared weights, and its item rows for items that keep their id."""
    state = model.state_dict()
    old = source.state_dict()
    item_tables = {"item_id.weight", "history_id.weight", "id_bias.weight", "known"}
    copied, mapped = 0, 0
    for name, value in old.items():
        if name in item_tables or name not in state or state[name].shape != value.shape:
            continue
        state[name] = value.clone()
        copied += 1
    new_rows = [i for i, item in enumerate(item_ids) if item in source_index]
    old_rows = [source_index[item_ids[i]] for i in new_rows]
    if new_rows:
        for name in ("item_id.weight", "history_id.weight", "id_bias.weight"):
            if state[name].shape[1] == old[name].shape[1]:
                state[name][new_rows] = old[name][old_rows]
        mapped = len(new_rows)
    model.load_state_dict(state)
    return {"warm_start_tensors": copied, "warm_start_items": mapped}


@dataclass
class Validation:
    """Users held out of training, for early stopping: histories (item indices, time order), what came next, the
    profile rows of those users (or None) and the NDCG cut-off."""

    histories: list[np.ndarray]
    targets: list[np.ndarray]
    profiles: np.ndarray | None = None
    k: int = 10

    def __len__(self) -> int:
        return len(self.histories)


def validation_ndcg(model: MetaRecModel, text: torch.Tensor, validation: Validation, batch: int = 512) -> float:
    """Mean NDCG@k of the network alone (no popularity prior) on ``validation``, seen items excluded."""
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.inference_mode():
            out, bias, hist = model.item_tables(text)
            for start in range(0, len(validation), batch):
                histories = validation.histories[start : start + batch]
                support, mask = pad_histories(histories, model.config.max_history)
                prof = validation.profiles
                prof = None if prof is None else torch.from_numpy(prof[start : start + batch])
                u = model.adapt(model.prior_vectors(hist, support, mask, prof), out, bias, support, mask)
                top = top_k_unseen((u @ out.T + bias).numpy(), histories, validation.k)
                total += float(
                    np.nansum(per_user_metrics(top, validation.targets[start : start + batch], validation.k)["ndcg"])
                )
    finally:
        model.train(was_training)
    return total / max(len(validation), 1)


@dataclass
class _Data:
    """The training users' histories as item indices, with what the network needs from them."""

    users: list[str]
    seqs: list[np.ndarray]
    profiles: np.ndarray | None
    known: np.ndarray  # items with at least one training event

    @classmethod
    def from_events(cls, events, item_ids, user_profile_vectors) -> _Data:
        users, seqs = user_sequences(events, {item: i for i, item in enumerate(item_ids)})
        keep = [i for i, s in enumerate(seqs) if len(s) >= 2]  # a task needs a support and a query
        users, seqs = [users[i] for i in keep], [seqs[i] for i in keep]
        known = np.zeros(len(item_ids), dtype=bool)
        if seqs:
            known[np.concatenate(seqs)] = True
        return cls(users, seqs, profile_matrix(users, user_profile_vectors), known)


def _train(
    data: _Data,
    text: torch.Tensor,
    config: TrainConfig,
    start: tuple[MetaRecModel, dict[str, int]] | None,
    item_ids: list[str],
    validation: Validation | None,
    on_epoch: EpochCallback | None = None,
    patience: int | None = None,
) -> tuple[MetaRecModel, dict]:
    """Meta-train one network over ``data``'s users as tasks: a fixed ``config.epochs``, or (``epochs=None`` with a
    ``validation``) until the validation NDCG@10 has not improved for ``patience`` (default ``config.patience``)
    epochs, best epoch kept."""
    if patience is None:
        tasks = len(data.users) if config.max_users_per_epoch is None else config.max_users_per_epoch
        steps = math.ceil(min(tasks, len(data.users)) / config.batch_users)
        patience = scaled_patience(steps, config.patience)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    profile_dim = None if data.profiles is None else data.profiles.shape[1]
    model = MetaRecModel(len(item_ids), text.shape[1], config, profile_dim)
    model.known.copy_(torch.from_numpy(data.known))
    meta: dict = {}
    if start is not None:
        meta.update(_warm_start(model, start[0], start[1], item_ids))
    early = config.epochs is None and validation is not None and len(validation) > 0
    epochs = (
        config.max_epochs if early else config.epochs if config.epochs is not None else config.epochs_without_validation
    )
    batch_users = config.batch_users
    lengths = np.array([len(s) for s in data.seqs], dtype=np.int64)
    sampled = len(item_ids) > config.sampled_softmax_above
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    losses: list[float] = []
    curve: list[float] = []
    best_value, best_epoch, best_state = -1.0, 0, None
    if early and start is not None:  # the starting point may already be the best: then no epoch is kept
        best_value, best_state = validation_ndcg(model, text, validation), copy.deepcopy(model.state_dict())
        curve.append(round(best_value, 5))
    model.train()
    for epoch in range(1, (epochs if data.users else 0) + 1):
        losses.append(_epoch(model, data, text, config, batch_users, lengths, sampled, optimiser, rng, generator))
        if not early:
            if on_epoch is not None:
                on_epoch(epoch, {"loss": losses[-1]})
            continue
        value = validation_ndcg(model, text, validation)
        curve.append(round(value, 5))
        if on_epoch is not None:
            on_epoch(epoch, {"loss": losses[-1], "validation_ndcg": value})
        if value > best_value + config.min_delta:
            best_value, best_epoch, best_state = value, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= patience:
            break
    if early and best_state is not None:
        model.load_state_dict(best_state)
        meta.update({"best_epoch": best_epoch, "best_validation_ndcg": round(best_value, 5)})
        meta.update({"validation_ndcg": curve, "validation_users": len(validation)})
    meta.update(
        {
            "final_loss": losses[-1] if losses else None,
            "epochs": len(losses),
            "patience": patience,
            "batch_users": batch_users,
            "losses": [round(x, 5) for x in losses],  # per-epoch meta-training query loss, for the lead's plot
        }
    )
    return model, meta


def _epoch(model, data, text, config, batch_users, lengths, sampled, optimiser, rng, generator) -> float:
    """One pass over a (sampled) permutation of the users; the mean query loss."""
    order = rng.permutation(len(data.users))[: config.max_users_per_epoch]  # a prefix of a permutation: a sample
    support_len, query_end = _sample_tasks(lengths, config, rng)
    epoch_loss = 0.0
    for begin in range(0, len(order), batch_users):
        batch = order[begin : begin + batch_users]
        support, mask, query, qmask = _batch_tensors(
            [data.seqs[i] for i in batch], support_len[batch], query_end[batch], config.max_history
        )
        prof = None if data.profiles is None else torch.from_numpy(data.profiles[batch])
        id_keep = None
        if config.id_dropout > 0:  # the text path must carry an item alone some of the time (new items)
            id_keep = torch.rand(len(data.known), generator=generator) >= config.id_dropout
        out, bias, hist = model.item_tables(text, id_keep)
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
    return epoch_loss / max(len(order), 1)


def fit_recommender(
    events: pl.DataFrame,
    item_ids: list[str],
    item_text_vectors: np.ndarray,
    user_profile_vectors: dict[str, np.ndarray] | None,
    config: TrainConfig,
    init_from: Path | None = None,
    progress: Progress | None = None,
) -> Recommender:
    """Meta-train on ``events`` (user_id, item_id, timestamp) over the catalogue ``item_ids``.

    ``item_text_vectors`` are the items' language-model embeddings (row i for ``item_ids[i]``). Items without events
    still get a (text-only) vector. ``init_from`` is a saved :class:`Recommender` folder, the nightly champion: where it
    was trained on (nearly) tonight's events and catalogue (:data:`UNCHANGED_SHARE`) the night continues it (its item
    rows carried over by id, early stopping with the warm start's patience, its sequence part resumed with its chosen
    parameters); any other champion is not continued, and the meta's ``warm_start_skipped`` says why.

    A seeded share of the users (validation users) is held out first: the first fit early-stops on them and the
    popularity prior is fitted on them, then the model is refitted on every user for the epochs the first fit chose.

    ``progress(phase, epoch, values)`` is called after every epoch of every network (phases ``meta``, ``cold``,
    ``sequence``, and ``refit_meta``, ``refit_cold``, ``refit_sequence``; values ``loss`` and, where validated,
    ``validation_ndcg``), so a caller can show and log training live.
    """
    threads_before = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        recommender = _fit_validated(
            events, item_ids, item_text_vectors, user_profile_vectors, config, init_from, progress
        )
        if config.new_items_from_text:
            seen = set(events["item_id"].unique().to_list())
            trained = np.fromiter((item in seen for item in item_ids), dtype=bool, count=len(item_ids))
            rows = fill_new_items(recommender, trained)
            recommender.meta["new_items_from_text"] = len(rows)
            offset = recommender.meta.get("new_item_offset", 0.0)
            if len(rows) and offset:
                recommender.item_offset = np.zeros(len(item_ids), dtype=np.float32)
                recommender.item_offset[rows] = offset
        recommender.meta["fit_events"] = events.height  # tomorrow's warm start compares its events with these
        return recommender
    finally:
        torch.set_num_threads(threads_before)  # the caller's setting, not ours, outlives the call


def _fit(
    events: pl.DataFrame,
    item_ids: list[str],
    item_text_vectors: np.ndarray,
    user_profile_vectors: dict[str, np.ndarray] | None,
    config: TrainConfig,
    init_from: Path | None,
    validation: Validation | None = None,
    cold_validation: Validation | None = None,
    cold_epochs: int | None = None,
    progress: Progress | None = None,
    phase: str = "",
    start_from: Recommender | None = None,
    quick_stop: bool = False,
) -> Recommender:
    """The network (and, with ``cold_below``, the cold network) on ``events``, without the popularity prior.

    Starts from ``start_from`` (a model in memory: the validated twin the refit continues) or else from the model
    saved at ``init_from``; with ``quick_stop`` (a champion trained on the same data) early stopping uses
    ``config.warm_start_patience``."""
    started = time.perf_counter()
    data = _Data.from_events(events, item_ids, user_profile_vectors)
    text = torch.from_numpy(np.ascontiguousarray(item_text_vectors, dtype=np.float32))
    previous = start_from
    if previous is None and init_from is not None:
        previous = Recommender.load(init_from)
    start = None if previous is None else (previous.model, previous.item_index)
    patience = None
    if quick_stop and previous is not None:
        patience = min(config.patience, config.warm_start_patience)  # a champion at its plateau: find out fast
    on_meta = _phase(progress, f"{phase}meta")
    model, meta = _train(data, text, config, start, item_ids, validation, on_meta, patience)
    meta = {"trained_users": len(data.users), "trained_items": int(data.known.sum()), **meta}
    if init_from is not None:
        meta["init_from"] = str(init_from)
    cold_model = None
    if config.cold_below > 0 and config.use_id and data.users:
        cold = dataclasses.replace(cold_config(config), epochs=config.epochs if cold_epochs is None else cold_epochs)
        cold_start = start
        if previous is not None and previous.cold_model is not None:
            cold_start = (previous.cold_model, previous.item_index)  # like for like: the champion's cold network
        on_cold = _phase(progress, f"{phase}cold")
        cold_model, cold_meta = _train(data, text, cold, cold_start, item_ids, cold_validation, on_cold, patience)
        meta["cold_losses"] = cold_meta["losses"]
        meta.update(
            {
                f"cold_{k}": v
                for k, v in cold_meta.items()
                if k in ("best_epoch", "best_validation_ndcg", "validation_ndcg", "epochs")
            }
        )
    meta["train_seconds"] = round(time.perf_counter() - started, 2)
    return Recommender(
        model=model,
        item_ids=list(item_ids),
        item_text_vectors=item_text_vectors,
        config=config,
        meta=meta,
        cold_model=cold_model,
    )


def _fit_validated(
    events: pl.DataFrame,
    item_ids: list[str],
    item_text_vectors: np.ndarray,
    user_profile_vectors: dict[str, np.ndarray] | None,
    config: TrainConfig,
    init_from: Path | None,
    progress: Progress | None = None,
) -> Recommender:
    """Meta-train without a seeded share of the users (validation users), early-stopping on them when
    ``config.epochs`` is None; fit the popularity prior's weight per history-length bucket on them (their histories
    cut to each bucket's length, the rest of them the target); then refit on every user."""
    item_index = {item: i for i, item in enumerate(item_ids)}
    quick = init_from is not None and _unchanged_since(init_from, events, item_ids)
    skipped = None
    if init_from is not None and not quick:
        # a champion of other data is not continued: from a champion of 70 % of the events, its networks and its
        # sequence choice cost Gift Cards warm NDCG@10 0.021 ± 0.007 (3 seeds; the meta networks on one seed, the
        # sequence choice on two), and the fit from scratch loses nothing
        skipped, init_from = str(init_from), None
    users, seqs = user_sequences(events, item_index)
    eligible = np.flatnonzero([len(s) >= 2 for s in seqs])
    n_cal = min(config.calibration_max_users, int(round(len(eligible) * config.calibration_share)))
    wanted = config.popularity_prior or config.sequence_part or config.item_item_part or config.epochs is None
    if not wanted or n_cal < PRIOR_MIN_USERS:
        recommender = _fit(
            events, item_ids, item_text_vectors, user_profile_vectors, config, init_from, progress=progress
        )
        recommender.meta["popularity_calibration_users"] = 0  # none held out (too few users, or nothing to fit)
        return _note_skipped(recommender, skipped)
    chosen = np.sort(np.random.default_rng([config.seed, 31]).choice(eligible, size=n_cal, replace=False))
    is_cal = np.zeros(len(seqs), dtype=bool)
    is_cal[chosen] = True
    cal_users = [users[i] for i in chosen]
    cal_seqs = [seqs[i] for i in chosen]
    cal_profiles = profile_matrix(cal_users, user_profile_vectors)
    cal_val, cold_val = _validations(cal_seqs, cal_profiles)
    train_events = events.filter(~pl.col("user_id").is_in(cal_users))
    warm_val = None
    if config.epochs is None:
        # Early stopping on the training users' own next items (their newest 20 % held out), the case a night
        # serves: users held out whole stop far too early (Gift Cards: warm NDCG@10 0.173 against 0.201 at 30 epochs).
        rest = np.flatnonzero(~is_cal)
        warm_val, tails = _tail_validation(
            [users[i] for i in rest], [seqs[i] for i in rest], item_ids, user_profile_vectors, config
        )
        train_events = train_events.join(tails, on=["user_id", "item_id"], how="anti")
    clock = _PhaseClock()
    recommender = _fit(
        train_events,
        item_ids,
        item_text_vectors,
        user_profile_vectors,
        config,
        init_from,
        warm_val,
        cold_val,
        progress=progress,
        quick_stop=quick,
    )
    clock.lap("validation_fit")
    beta, info = None, {"warm_quick_stop": quick}
    n_items = len(item_ids)
    # New users (the calibration users cut at n) and known users' next items (the tail validation) in each bucket:
    # fitted on new users alone, the popularity prior cut Gift Cards' warm NDCG@10 from 0.194 to 0.123, since a
    # known user with 3 interactions is not a new user with 3
    cases, case_profiles = _calibration_cases(cal_seqs, cal_profiles, warm_val, warm_from=1)
    sequence, sequence_weight, item_item, item_item_weight = None, None, None, None
    parts: dict = {}  # name -> (score function, its own validation NDCG)
    _, train_seqs = user_sequences(train_events, item_index)
    if config.sequence_part and n_items <= config.sampled_softmax_above:
        # warm start (a champion of the same data): last night's sequence part and its chosen parameters, one trial
        seq_start, seq_given = _sequence_start(init_from, item_ids)  # None unless quick
        # no grid search for a part whose first trial is far behind the meta-learned part on the same validation
        # (the demo: 0.087 against 0.126, and its calibrated weight for known users came out 0)
        behind = recommender.meta.get("best_validation_ndcg")
        give_up = None if behind is None else SEQUENCE_GIVE_UP * behind
        sequence, seq_params, seq_trials = _fit_sequence(
            train_seqs, n_items, config, warm_val, seq_given, seq_start, _phase(progress, "sequence"), give_up, quick
        )
        info.update({"sequence_params": seq_params, "sequence_trials": seq_trials})
        info["sequence_warm_start"] = seq_start is not None
        info.update({"sequence_best_epoch": sequence.best_epoch, "sequence_seconds": round(sequence.fit_seconds, 2)})
        recommender.sequence = sequence
        items = sequence.item_vectors()
        strength = max((t.get("validation_ndcg", 0.0) for t in seq_trials), default=0.0)
        parts["sequence"] = (lambda h: sequence.states(h) @ items.T, strength)
        clock.lap("sequence_search")
    if config.item_item_part and n_items <= config.sampled_softmax_above:
        pair = None if warm_val is None else (warm_val.histories, warm_val.targets)
        item_item = ItemItem.fit(train_seqs, n_items, pair)
        recommender.item_item = item_item
        info["item_item_params"] = {"rank": item_item.rank, "shrink": item_item.shrink}
        info["item_item_trials"] = item_item.trials
        info["item_item_seconds"] = round(item_item.fit_seconds, 2)
        strength = max((t["validation_ndcg"] for t in item_item.trials), default=0.0)
        parts["item_item"] = (item_item.score, strength)
        clock.lap("item_item")
    info.update(_calibrate_parts(recommender, parts, cases, case_profiles))
    sequence_weight, item_item_weight = recommender.sequence_weight, recommender.item_item_weight
    if sequence is not None and not sequence_weight.any():  # it helps nobody: not refitted, not served
        sequence, recommender.sequence, recommender.sequence_weight = None, None, None
        info["sequence_dropped"] = "calibrated weight 0 for every history length"
    if item_item is not None and not item_item_weight.any():
        item_item, recommender.item_item, recommender.item_item_weight = None, None, None
        info["item_item_dropped"] = "calibrated weight 0 for every history length"
    if config.popularity_prior:
        rest = [s for s, c in zip(seqs, is_cal, strict=True) if not c]
        fit_counts = np.bincount(np.concatenate(rest) if rest else np.zeros(0, np.int64), minlength=n_items)
        beta, prior_info = _calibrate_prior(recommender, cases, np.log1p(fit_counts), case_profiles)
        info.update(prior_info)
        recommender.popularity, recommender.popularity_beta = np.log1p(fit_counts).astype(np.float32), beta
    if config.new_items_from_text and _has_new_items(events, item_ids, item_text_vectors):
        # tonight has items with text and no events: the offset that lets them compete, on the validated twin, on
        # the known users' next items (or, without early stopping, the calibration users')
        trained = np.zeros(n_items, dtype=bool)
        trained[np.concatenate(train_seqs) if train_seqs else np.zeros(0, np.int64)] = True
        val = warm_val if warm_val is not None else cal_val
        offset, offset_info = calibrate_new_item_offset(
            recommender, trained, val.histories, val.targets, val.profiles, config.seed
        )
        info.update({"new_item_offset": round(float(offset), 6), **offset_info})
    clock.lap("calibration")
    if config.calibration_refit:  # the final model sees every user; the choices were made on its held-out twin
        first = recommender.meta
        epochs = first.get("best_epoch", config.epochs_without_validation)
        epochs = config.epochs if config.epochs is not None else epochs
        cold_epochs = first.get("cold_best_epoch", epochs)
        validated = recommender if config.refit_share is not None else None
        if validated is not None:  # continue the validated networks on every event for a share of their epochs
            epochs, cold_epochs = _refit_epochs(epochs, config), _refit_epochs(cold_epochs, config)
        recommender = _fit(
            events,
            item_ids,
            item_text_vectors,
            user_profile_vectors,
            dataclasses.replace(config, epochs=epochs),
            init_from,
            cold_epochs=cold_epochs,
            progress=progress,
            phase="refit_",
            start_from=validated,
        )
        clock.lap("refit")
        if sequence is not None:  # every user, for the epochs its validation chose, from scratch: continuing the
            # validated SASRec instead cost Gift Cards 3 % warm NDCG@10 (0.232 against 0.240, 3 seeds)
            seq_epochs = seq_params["epochs"] if config.epochs is None else config.epochs
            if seq_start is not None:  # resumed from the champion: the new events are learned whatever it chose
                seq_epochs = max(seq_epochs, config.warm_sequence_epochs)
            _, all_seqs = user_sequences(events, item_index)
            sequence = _refit_sequence(
                all_seqs, n_items, dataclasses.replace(config, epochs=seq_epochs), seq_params, seq_start, progress
            )
            info["sequence_members"] = len(sequence_members(sequence))
            info["sequence_seconds"] = round(info["sequence_seconds"] + sequence.fit_seconds, 2)
            clock.lap("sequence_refit")
        recommender.meta.update({k: first[k] for k in first if "validation" in k or "best_epoch" in k})
        recommender.meta["validation_fit_epochs"] = first.get("epochs")
        recommender.meta["train_seconds"] = round(recommender.meta["train_seconds"] + first["train_seconds"], 2)
    if item_item is not None:  # refitted on every event with the chosen rank and shrinkage
        _, all_seqs = user_sequences(events, item_index)
        item_item = ItemItem.fit(all_seqs, n_items, rank=item_item.rank, shrink=item_item.shrink)
        recommender.item_item, recommender.item_item_weight = item_item, item_item_weight
        clock.lap("item_item_refit")
    if sequence is not None:
        recommender.sequence, recommender.sequence_weight = sequence, sequence_weight
    parts_seconds = info.get("sequence_seconds", 0.0) + info.get("item_item_seconds", 0.0)
    recommender.meta["train_seconds"] = round(recommender.meta["train_seconds"] + parts_seconds, 2)
    recommender.meta["popularity_calibration_users"] = n_cal if config.popularity_prior else 0
    recommender.meta.update(info)
    recommender.meta["phase_seconds"] = clock.seconds
    if beta is not None:
        all_counts = np.bincount(np.concatenate(seqs) if seqs else np.zeros(0, np.int64), minlength=n_items)
        recommender.popularity = np.log1p(all_counts).astype(np.float32)  # served: every training user's counts
        recommender.popularity_beta = beta
    return _note_skipped(recommender, skipped)


def _note_skipped(recommender: Recommender, champion: str | None) -> Recommender:
    """Record in the model's meta (and so in MLflow) a champion that was not continued because its data differs."""
    if champion is not None:
        recommender.meta["warm_start_skipped"] = (
            f"{champion}: trained on other data (events or items changed more than {UNCHANGED_SHARE:.0%})"
        )
    return recommender


class _PhaseClock:
    """Wall seconds per phase of a fit, in order: where a night's training time goes (the model's meta, MLflow)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self._last, 2)
        self._last = now


def _has_new_items(events: pl.DataFrame, item_ids: list[str], text: np.ndarray) -> bool:
    """Whether some item has text and no event (an item the night must serve from its text alone)."""
    seen = set(events["item_id"].unique().to_list())
    trained = np.fromiter((item in seen for item in item_ids), dtype=bool, count=len(item_ids))
    return bool(new_item_mask(trained, text).any())


# A champion whose events are within this share of tonight's (and whose catalogue is tonight's up to it) counts as
# trained on the same data: the night continues it and its early stopping stops quickly. Any other champion is not
# continued (the night trains from scratch). The ablation's champion, trained on 70 % of the events, lost Gift Cards
# 21 % warm NDCG@10 when it stopped quickly (0.205 against 0.260 from scratch, seed 0), and 8 % when continued with
# the usual patience (0.245 against 0.266, 3 seeds).
UNCHANGED_SHARE = 0.05


def _unchanged_since(init_from: Path, events: pl.DataFrame, item_ids: list[str]) -> bool:
    """Whether the model saved at ``init_from`` was fitted on (nearly) these events over (nearly) this catalogue."""
    header = json.loads((Path(init_from) / "model.json").read_text())
    seen = header.get("meta", {}).get("fit_events")
    if not seen or not events.height:
        return False
    same_items = len(set(header["item_ids"]) & set(item_ids)) >= (1 - UNCHANGED_SHARE) * len(item_ids)
    return same_items and abs(events.height - seen) <= UNCHANGED_SHARE * events.height


def _refit_epochs(epochs: int, config: TrainConfig) -> int:
    """Epochs of a refit that continues a validated network: ``refit_share`` of them, at least one (none for 0)."""
    return int(np.ceil(config.refit_share * epochs)) if epochs else 0


def _fit_sequence(
    seqs: list[np.ndarray],
    n_items: int,
    config: TrainConfig,
    validation: Validation | None,
    params: dict | None = None,
    start: tuple[SASRec | SASRecEnsemble, np.ndarray] | None = None,
    on_epoch: EpochCallback | None = None,
    give_up_below: float | None = None,
    quick_stop: bool = False,
) -> tuple[SASRec, dict, list[dict]]:
    """The sequence part. With ``validation``: the search (:func:`nightrec.model.sasrec.best_sasrec`, an Optuna
    study): the SASRec grid first (:func:`nightrec.model.sasrec.default_grid`: dropout {0.5, 0.2}, max_len {50, 100}
    where histories are that long, the batch from the user count) or, with ``params`` (last night's choice: the warm
    start), that one point, then sampled points up to ``config.tuning_trials``, every trial early-stopped and pruned
    when it runs behind, the best kept. The evaluation's SASRec peer is tuned by the same search, so on every catalogue
    the sequence part is as good as that peer. With ``quick_stop`` (the catalogue has not changed materially) last
    night's choice alone, continued with the warm start's patience: no search. Without validation: ``params`` for
    ``config.epochs`` epochs (or ``epochs_without_validation``). ``start``: (last night's sequence part, each item's
    row in it) to start from. Returns (model, chosen params, trials)."""
    if start is not None:  # an ensemble's trials start from its first member
        start = (sequence_members(start[0])[0], start[1])
    n_trials = config.tuning_trials
    if params is None:
        if config.sequence_dropout is not None:  # one trial: the configured dropout and length
            base = default_grid(len(seqs))[0]
            grid, n_trials = [{**base, "dropout": config.sequence_dropout, "max_len": config.sequence_max_len}], 1
        else:
            grid = default_grid(len(seqs), max((len(x) for x in seqs), default=0) - 1)
        grid = [{**g, "hidden": config.sequence_hidden, "lr": config.sequence_lr} for g in grid]
    else:  # last night's choice (the refit's, or a warm start's on unchanged data, early-stopped with the warm
        # start's patience: an evaluation every 2 epochs)
        # (a choice saved before the search sampled the width and learning rate has neither: the configured ones)
        grid = [{"hidden": config.sequence_hidden, "lr": config.sequence_lr, **params}]
        grid[0].pop("epochs", None)
        if quick_stop:
            grid[0]["patience"], n_trials = max(1, int(np.ceil(config.warm_start_patience / 2))), 1
    if config.sequence_negatives is not None:
        grid = [{**g, "negatives": config.sequence_negatives} for g in grid]
    if validation is not None:
        pair = (validation.histories, validation.targets)
        budget = config.tuning_budget_s
        chosen, model, trials = best_sasrec(
            seqs,
            n_items,
            pair,
            config.seed,
            grid,
            log=lambda _m: None,
            init=start,
            budget_s=budget,
            on_epoch=on_epoch,
            give_up_below=give_up_below,
            trials=n_trials,
        )
        return model, chosen, trials
    chosen = {**grid[0], "epochs": config.epochs if config.epochs is not None else config.epochs_without_validation}
    return SASRec(seqs, n_items, seed=config.seed, init=start, on_epoch=on_epoch, **chosen), chosen, []


def _refit_sequence(
    seqs: list[np.ndarray],
    n_items: int,
    config: TrainConfig,
    params: dict,
    start: tuple[SASRec | SASRecEnsemble, np.ndarray] | None,
    progress: Progress | None,
) -> SASRec | SASRecEnsemble:
    """The served sequence part: ``config.sequence_members`` fits of ``params`` for ``config.epochs`` from seeds
    seed, seed + 100, ... (their mean score, :class:`SASRecEnsemble`; one fit alone when 1). With ``start``, member
    k continues last night's member k (its first where it had fewer)."""
    members = []
    previous = [] if start is None else sequence_members(start[0])
    for k in range(max(1, config.sequence_members)):
        member_start = None if start is None else (previous[min(k, len(previous) - 1)], start[1])
        member_config = dataclasses.replace(config, seed=config.seed + 100 * k)
        on_epoch = _phase(progress, "refit_sequence" if k == 0 else f"refit_sequence_{k + 1}")
        members.append(_fit_sequence(seqs, n_items, member_config, None, params, member_start, on_epoch)[0])
    return members[0] if len(members) == 1 else SASRecEnsemble(members)


def _sequence_start(
    init_from: Path | None, item_ids: list[str]
) -> tuple[tuple[SASRec | SASRecEnsemble, np.ndarray] | None, dict | None]:
    """(last night's sequence part with each item's row in it, its chosen parameters), or (None, None)."""
    if init_from is None:
        return None, None
    header = json.loads((Path(init_from) / "model.json").read_text())  # the header first: is there a part?
    params = header.get("meta", {}).get("sequence_params")
    if header.get("sequence") is None or not params:  # it served no sequence part
        return None, None
    previous = Recommender.load(init_from)
    rows = np.array([previous.item_index.get(item, -1) for item in item_ids], dtype=np.int64)
    return (previous.sequence, rows), params


def _tail_validation(
    users: list[str],
    seqs: list[np.ndarray],
    item_ids: list[str],
    user_profile_vectors: dict[str, np.ndarray] | None,
    config: TrainConfig,
) -> tuple[Validation, pl.DataFrame]:
    """A seeded sample of users (at most ``calibration_max_users``, each with 3 or more items): the first 80 % of
    their history as the input, the rest as the targets (NDCG@10); and the (user_id, item_id) pairs to hold out."""
    eligible = np.flatnonzero([len(s) >= 3 for s in seqs])
    size = min(len(eligible), config.calibration_max_users)
    chosen = np.sort(np.random.default_rng([config.seed, 37]).choice(eligible, size=size, replace=False))
    histories, targets, held_users, held_items = [], [], [], []
    for row in chosen:
        s = seqs[row]
        cut = max(2, int(np.floor(len(s) * PRIOR_WARM_SHARE)))
        histories.append(s[:cut])
        targets.append(s[cut:])
        held_users += [users[row]] * (len(s) - cut)
        held_items += [item_ids[i] for i in s[cut:]]
    profiles = profile_matrix([users[r] for r in chosen], user_profile_vectors)
    tails = pl.DataFrame(
        {"user_id": held_users, "item_id": held_items}, schema={"user_id": pl.String, "item_id": pl.String}
    )
    return Validation(histories, targets, profiles, k=10), tails


def _validations(seqs: list[np.ndarray], profiles: np.ndarray | None) -> tuple[Validation, Validation]:
    """(warm, cold) validation sets from the held-out users: warm = every user's history cut at 80 % (NDCG@10), cold
    = histories cut at 1-5 interactions, the next up to 50 the targets (NDCG@20, the protocol's cold cut-off)."""
    warm: tuple[list, list, list] = ([], [], [])
    cold: tuple[list, list, list] = ([], [], [])
    for row, s in enumerate(seqs):
        cut = max(1, int(np.floor(len(s) * PRIOR_WARM_SHARE)))
        if cut < len(s):
            warm[0].append(s[:cut]), warm[1].append(s[cut:]), warm[2].append(row)
        for n in range(1, 6):
            if len(s) > n:
                cold[0].append(s[:n]), cold[1].append(s[n : n + PRIOR_COLD_QUERY]), cold[2].append(row)

    def made(part, k):
        prof = None if profiles is None else profiles[np.asarray(part[2], dtype=np.int64)]
        return Validation(part[0], part[1], prof, k=k)

    return made(warm, 10), made(cold, 20)


def _calibration_cases(
    cal_seqs: list[np.ndarray], cal_profiles: np.ndarray | None, warm: Validation | None, warm_from: int = 1
) -> tuple[dict, np.ndarray | None]:
    """Bucket -> (histories, targets, profile rows) to fit the per-bucket weights on: the calibration users cut at
    n = 0..5 and at 80 %, plus (buckets from ``warm_from`` interactions up) the training users' held-out newest items
    -- the case a night serves for most of its users, and far more users than the calibration share on a small
    catalogue (Gift Cards: ~37 calibration users, too few to fit any bucket above 5; 314 training users)."""
    cases = _prior_cases(cal_seqs)
    profiles = cal_profiles
    if warm is None or len(warm) == 0:
        return cases, profiles
    offset = len(cal_seqs)
    for row, b in enumerate(history_bucket([len(h) for h in warm.histories])):
        if POPULARITY_BUCKETS[b] >= warm_from:
            cases[int(b)][0].append(warm.histories[row])
            cases[int(b)][1].append(warm.targets[row])
            cases[int(b)][2].append(offset + row)
    if profiles is not None and warm.profiles is not None:
        profiles = np.concatenate([profiles, warm.profiles])
    return cases, profiles


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
    recommender: Recommender, cases: dict, popularity: np.ndarray, profiles: np.ndarray | None
) -> tuple[np.ndarray, dict]:
    """The popularity prior's weight per bucket (:func:`_calibrate_weights`), on top of the model's whole score."""

    def grid(b: int) -> list[float]:
        floor = PRIOR_NO_HISTORY_MIN if POPULARITY_BUCKETS[b] == 0 and profiles is None else 0.0
        return [w for w in PRIOR_GRID if w >= floor]

    return _calibrate_weights(
        recommender,
        cases,
        profiles,
        base=lambda h, prof: recommender.score_histories(h, prof, prior=False),
        extra=lambda h: np.broadcast_to(popularity[None, :], (len(h), len(popularity))),
        grid=grid,
        name="popularity",
    )


def _calibrate_parts(recommender: Recommender, parts: dict, cases: dict, profiles: np.ndarray | None) -> dict:
    """Each additive part's weights (``recommender.<name>_weight``) on top of the meta-learned score and the other
    parts, by coordinate ascent: the part stronger on its own validation first, then the next on top of it, then the
    first again on top of the rest -- fitted one after the other in a fixed order, the first part fitted takes what
    the second would do better (demo, seed 0: warm NDCG@10 0.118 with the sequence part first, 0.141 without it)."""
    order = sorted(parts, key=lambda name: -parts[name][1])
    info: dict = {}
    for name in order + order[:-1]:
        weight, part_info = _calibrate_part(
            recommender,
            name,
            parts[name][0],
            lambda h, prof, name=name: recommender.score_histories(h, prof, prior=False, **{name: False}),
            cases,
            profiles,
        )
        setattr(recommender, f"{name}_weight", weight)
        info.update(part_info)
    return info


def _calibrate_part(
    recommender: Recommender, name: str, part_scores, base, cases: dict, profiles: np.ndarray | None
) -> tuple[np.ndarray, dict]:
    """An additive part's weight (the sequence part's, the item-item part's) on top of ``base(histories,
    profiles)``: one weight for the users each meta-learned network serves (1 to cold_below - 1 interactions, and
    cold_below up), not one per bucket -- a bucket of a small catalogue holds a few dozen users, too few to fit on
    (Gift Cards seed 1: 0 at n = 1, 2.0 at n = 3). None for users without history (a part has nothing to add)."""
    cold_below = recommender.config.cold_below if recommender.cold_model is not None else 1
    groups = [b for b in range(1, len(POPULARITY_BUCKETS)) if POPULARITY_BUCKETS[b] < cold_below]
    groups = [g for g in (groups, [b for b in range(1, len(POPULARITY_BUCKETS)) if b not in groups]) if g]
    pooled = {}
    for group in groups:
        hist, target, owner = [], [], []
        for b in group:
            hist += cases[b][0]
            target += cases[b][1]
            owner += cases[b][2]
        pooled[group[0]] = (hist, target, owner)
    fitted, info = _calibrate_weights(
        recommender,
        pooled,
        profiles,
        base=base,
        extra=part_scores,
        grid=lambda b: list(SEQUENCE_GRID),
        name=name,
        k_of=lambda b: 10,
    )
    weights = np.zeros(len(POPULARITY_BUCKETS), dtype=np.float32)
    names = {}
    for group in groups:
        weights[group] = fitted[group[0]]
        lo, hi = POPULARITY_BUCKETS[group[0]], POPULARITY_BUCKETS[group[-1]]
        names[bucket_key(group[0])] = f"n{lo}up" if group[-1] == len(POPULARITY_BUCKETS) - 1 else f"n{lo}_{hi}"
    renamed = {}
    for key, value in info.items():  # keys name the group, not its first bucket
        kind, bucket = key.removeprefix(f"{name}_").split("_", 1)
        renamed[f"{name}_{kind}_{names.get(bucket, bucket)}"] = value
    return weights, renamed


def _calibrate_weights(
    recommender: Recommender,
    cases: dict,
    profiles: np.ndarray | None,
    base,
    extra,
    grid,
    name: str,
    batch: int = 512,
    k_of=None,
) -> tuple[np.ndarray, dict]:
    """One weight per history-length bucket for adding ``extra(histories)`` to ``base(histories, profiles)``: the
    grid's value (times a scale that makes the two comparable: the median user's spread of each) where the
    calibration NDCG@20 (one-length buckets, n <= 5) or NDCG@10 (longer ones) peaks, chosen by :func:`bagged_choice`
    over the calibration users."""
    config = recommender.config
    weights = np.zeros(len(POPULARITY_BUCKETS), dtype=np.float32)
    info: dict = {}

    def served_by_cold(b: int) -> bool:
        return recommender.cold_model is not None and POPULARITY_BUCKETS[b] < config.cold_below

    for b, (hist, target, owner) in cases.items():
        key = bucket_key(b)
        options = grid(b)
        owner = np.asarray(owner, dtype=np.int64)
        if len(hist) < PRIOR_MIN_USERS or options == [0.0]:
            # too few users to fit on: the shorter bucket's weight where the same model serves both, else none
            same_model = b > 0 and served_by_cold(b) == served_by_cold(b - 1) and options != [0.0]
            weights[b] = weights[b - 1] if same_model else 0.0
            info[f"{name}_beta_{key}"] = float(weights[b])
            continue
        k = k_of(b) if k_of else 20 if POPULARITY_BUCKETS[b] < 6 else 10
        ndcg = np.zeros((len(hist), len(options)))
        scale = None
        for start in range(0, len(hist), batch):
            h, t = hist[start : start + batch], target[start : start + batch]
            prof = None if profiles is None else profiles[owner[start : start + batch]]
            scores, added = base(h, prof), extra(h)
            if scale is None:  # from the first batch; flat base scores (e.g. no history, no text): absolute units
                spread = float(np.median(added.std(axis=1)))
                base_spread = float(np.median(scores.std(axis=1))) or 1.0
                scale = base_spread / spread if spread > 0 else 0.0
            for g, weight in enumerate(options):
                top = top_k_unseen(scores + (weight * scale) * added, h, k)
                ndcg[start : start + len(h), g] = np.nan_to_num(per_user_metrics(top, t, k)["ndcg"])
        best = bagged_choice(ndcg, seed=config.seed + b)
        ndcg = ndcg.sum(axis=0)
        weights[b] = options[best] * scale
        info[f"{name}_beta_{key}"] = float(weights[b])
        info[f"{name}_weight_{key}"] = float(options[best])  # in units of the scale
        info[f"{name}_gain_{key}"] = float((ndcg[best] - ndcg[0]) / len(hist))  # NDCG over the smallest weight tried
    return weights, info


BAGGING_ROUNDS = 200  # bootstrap resamples of the calibration users per weight (a few ms per bucket)


def bagged_choice(per_user: np.ndarray, seed: int, rounds: int = BAGGING_ROUNDS) -> int:
    """The grid position to take from ``per_user`` (users x options, each user's NDCG at each option): the median,
    over bootstrap resamples of the users, of each resample's best position (the smallest on a tie).

    On a few hundred users the plain argmax swings with who was drawn (Gift Cards' sequence weight for 6+: 2.2 to
    374 across seeds); the median of resampled argmaxes is the bagged estimate of where the curve peaks. Gift Cards,
    3 seeds: warm NDCG@10 +1.7 %, cold k=5 +4.8 %; MovieLens-100K and the demo unchanged (docs/quality.md)."""
    n = len(per_user)
    if n == 0:
        return 0
    rng = np.random.default_rng([seed, 97])
    picks = np.empty(rounds, dtype=np.int64)
    for r in range(rounds):
        picks[r] = int(np.argmax(per_user[rng.integers(0, n, size=n)].sum(axis=0)))
    return int(np.sort(picks)[(rounds - 1) // 2])  # the median; the lower one for an even count


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
