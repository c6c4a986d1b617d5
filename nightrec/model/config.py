"""The hyper-parameters the network and its training share."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

PRIORS = ("pooled", "sequence", "both")
# Early stopping waits this many optimiser steps without a better validation (within its epoch bounds): a small
# catalogue's curve moves by a few steps an epoch and is noisy at the 0.01 level, a large one's by dozens. On
# MovieLens-100K, Gift Cards and the demo (at most ~24 steps an epoch) the epoch bounds decide, as before; the
# 400,000-event demo (~47 steps an epoch) waits 5 epochs instead of 10.
PATIENCE_STEPS = 200
# trials of the sequence part's search: the start points (the recipe's grid: up to 4) and sampled points up to this
SEARCH_TRIALS = 6


def scaled_patience(steps_per_epoch: int, most: int, least: int = 3) -> int:
    """Epochs without improvement before stopping: ``PATIENCE_STEPS`` optimiser steps, within [least, most]."""
    return min(most, max(least, math.ceil(PATIENCE_STEPS / max(steps_per_epoch, 1))))


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`nightrec.tasks.train.fit_recommender` and of the model it trains.

    Defaults were chosen on a validation split carved from training."""

    dim: int = 128  # ML-100K: 128 lifts warm NDCG@10 0.188 -> 0.214 over 64 (and costs cold k=1, see docs/quality.md)
    inner_steps: int = 2
    inner_lr_init: float = 1.0
    use_text: bool = True
    use_id: bool = True
    # None: early stopping on the validation users decides (at most max_epochs, stopping after `patience` epochs
    # without a better validation NDCG@10), then the model is refitted on every user for the best epoch count;
    # an int: exactly that many epochs, no validation (tests, quick runs, `--epochs`)
    epochs: int | None = None
    max_epochs: int = 100
    patience: int = 10  # epochs at most (PATIENCE_STEPS optimiser steps, at least 3 epochs, decide within it)
    # a better validation NDCG@10 by less than this is no improvement: a warm start at its plateau then stops after
    # `patience` epochs instead of creeping up by noise
    min_delta: float = 0.002
    epochs_without_validation: int = 30  # epochs=None on a catalogue too small to hold validation users out
    # Gift Cards (~400 users, 3 steps an epoch at 128): batch 16 made the validation curve swing by 0.05 NDCG from one
    # epoch to the next and early stopping then picked a lucky epoch (test warm NDCG@10 0.151); 128 rises smoothly
    batch_users: int = 128
    # tasks (users) per epoch, a fresh seeded sample each epoch; None = every user. A task costs O(catalogue)
    # (full-softmax inner steps), so on a million users this bounds a night's training, not the data it sees
    max_users_per_epoch: int | None = None
    lr: float = 5e-3
    weight_decay: float = 0.0
    id_l2: float = 1e-5  # L2 on the ID tables, per batch: keeps rarely-seen items from overfitting
    max_history: int = 256  # most recent interactions a user's vector is built from
    # the user prior: "pooled" (mean + recency-weighted mean of the history, FISM-like, order-free) or "sequence"
    # (a causal pre-LN transformer over the ordered history, positions counted from the newest item, the state at
    # the newest position), or "both" (their sum); each followed by the Meta-SGD inner steps
    prior: str = "pooled"
    seq_blocks: int = 2
    seq_heads: int = 1
    seq_max_len: int = 50  # most recent items the sequence prior reads (the inner steps still read max_history)
    # weight of the sequence prior's dense next-item loss (every support position predicts the next support item,
    # full softmax over the catalogue; skipped on sampled-softmax catalogues); 0 turns it off
    seq_aux_weight: float = 0.0
    max_query: int = 50
    cold_support_share: float = 0.5  # share of tasks whose support is 1-5 interactions
    sampled_softmax_above: int = 50_000  # catalogues larger than this train with sampled softmax
    n_negatives: int = 4096
    dropout: float = 0.3
    # share of items whose ID parts (embeddings, bias) are switched off in each training batch, so the text path
    # learns to carry an item alone: what a new item has on its first night
    id_dropout: float = 0.0
    # items with text and no training events get every event-learned table (ID embeddings and biases, the sequence
    # part's embedding, the popularity count) predicted from their text (nightrec.model.new_items), so a new item
    # can reach the lists on its first night
    new_items_from_text: bool = True
    # users with fewer interactions are served by a second, text + bias model (no ID tables), which ML-100K shows is
    # the better cold-start model; 0 turns it off
    cold_below: int = 6
    # a popularity prior in the score, its weight one scalar per history-length bucket (0, 1, ..., 5, 6-10, 11-20,
    # 21+), fitted on a seeded share of the users held out of meta-training (calibration users), so that users with
    # short histories are served at least as well as popularity would serve them (nightrec.tasks.train)
    popularity_prior: bool = True
    calibration_share: float = 0.1
    calibration_max_users: int = 2000
    # then train again on every user (the weights carry over): Gift Cards (~400 users) lost 5 % warm NDCG@10 to the
    # held-out 10 %
    calibration_refit: bool = True
    # the refit continues the validated meta-learned networks on every event for this share of their chosen epochs
    # (at least one) instead of training them again from scratch (Gift Cards, 3 seeds: warm NDCG@10 0.242 against
    # 0.240); None: from scratch. The sequence part is always refitted from scratch
    refit_share: float | None = 0.25
    # early stopping's patience when a night starts from the champion: a champion already at its plateau would
    # otherwise run `patience` epochs to find that out (the nights-after-the-first budget)
    warm_start_patience: int = 3
    # epochs at least of the resumed sequence part on every event, on a night that continues the champion: its
    # validation is no guide there (the champion trained on the validation users' held-out items, so the count it
    # chose was 0, last night's part unchanged, on every Gift Cards seed); with 4, the warm night's warm NDCG@10
    # rose from 0.2531 to 0.2620 (3 seeds; a night from scratch: 0.2660)
    warm_sequence_epochs: int = 4
    # the order-aware part of the score: a SASRec-CE network (nightrec.model.sasrec) trained beside the meta-learned
    # one, early-stopped on the same validation, its score added with one weight per history-length bucket fitted
    # on the calibration users (0 where it does not help); skipped on catalogues above sampled_softmax_above
    sequence_part: bool = True
    # the item-item part (nightrec.model.itemitem): a low-rank shrunk item-item model, its rank and shrinkage tuned
    # on the same validation, added with its own weight per served network; skipped above sampled_softmax_above
    item_item_part: bool = True
    sequence_hidden: int = 64
    # None: tuned on the validation (the grid dropout {0.2, 0.5} x max_len {50, 100} of
    # nightrec.model.sasrec.default_grid, then sampled width, dropout, learning rate and length, tuning_trials in
    # all); a value: one trial with it, sequence_max_len, sequence_hidden and sequence_lr
    sequence_dropout: float | None = None
    sequence_max_len: int = 50
    sequence_lr: float = 1e-3
    # None: the sequence part trains with the full softmax over the catalogue. A count: sampled softmax, each position
    # against its next item and this many uniform negatives shared by the batch. At 6,700 items (the 400,000-event
    # demo) 1,024 negatives made an epoch 2.9x cheaper and cost 5 % validation NDCG@10; at 15 % of the catalogue
    # MovieLens-100K lost 7 % and Gift Cards 1-6 % (docs/quality.md), so the full softmax stays the default
    sequence_negatives: int | None = None
    # the final sequence part is the mean of this many refits from different seeds (the search runs once): one seed's
    # SASRec is noisy on a small catalogue. Two against one, the protocol's 3 seeds (docs/quality.md, seventh
    # session): Gift Cards warm NDCG@10 0.952x against 0.934x the SASRec peer, cold k=5 0.962x against 0.880x;
    # MovieLens-100K warm 1.099x against 1.085x; the demo unchanged. Each member costs one more refit of the part
    sequence_members: int = 2
    # the sequence part's search (nightrec.model.tuning, Optuna): this many trials at most, the grid's first, then
    # sampled ones; it starts no trial after tuning_budget_s seconds (the first always runs); None: no time limit
    tuning_trials: int = SEARCH_TRIALS
    tuning_budget_s: float | None = 300.0
    seed: int = 42
    threads: int | None = None  # torch intra-op threads; None leaves torch's default

    def __post_init__(self) -> None:
        if self.prior not in PRIORS:
            raise ValueError(f"prior {self.prior!r} is not one of {PRIORS}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict) -> TrainConfig:
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in payload.items() if k in known}
        values.setdefault("prior", "pooled")  # saved before the sequence prior existed: the pooled prior
        return cls(**values)


def cold_config(config: TrainConfig) -> TrainConfig:
    """The cold model's config: text + bias only (no ID tables), and no cold model of its own."""
    return dataclasses.replace(config, use_id=False, cold_below=0)
