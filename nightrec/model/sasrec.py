"""SASRec trained with full-softmax cross-entropy ("SASRec+", "SASRec-CE"): the order-aware part of nightrec's score
(:attr:`nightrec.model.Recommender.sequence`) and, tuned on its own, the evaluation's sequential peer.

Architecture: Kang & McAuley, "Self-Attentive Sequential Recommendation" (ICDM 2018) -- learned positional embeddings,
causal self-attention blocks, item embeddings shared between input and output. Loss: Klenitskiy & Vasilev, "Turning
Dross Into Gold Loss: is BERT4Rec really better than SASRec?" (RecSys 2023) -- every position predicts the next item
with cross-entropy over the whole catalogue instead of SASRec's one sampled negative, which is what makes SASRec the
strongest cheap sequential baseline on chronological splits. Scores are inner products (the last state with each
item's embedding), so they serve from the same FAISS index as the rest of the score.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nightrec.model.attention import CausalBlock
from nightrec.model.config import SEARCH_TRIALS, scaled_patience
from nightrec.model.tuning import SearchSpace, search
from nightrec.ranking import per_user_metrics, top_k_unseen

EVAL_EVERY = 2  # epochs between validations
SEQUENCE_PATIENCE = 5  # validations without improvement before stopping, at most

Histories = list[np.ndarray]
EpochCallback = Callable[[int, dict[str, float]], None]  # (epoch, {"loss": ..., "validation_ndcg": ...})


class _Net(nn.Module):
    def __init__(self, n_items: int, hidden: int, blocks: int, heads: int, dropout: float, max_len: int) -> None:
        super().__init__()
        self.n_items = n_items
        # row n_items is padding: its embedding stays zero and it is never a candidate in the output logits
        self.items = nn.Embedding(n_items + 1, hidden, padding_idx=n_items)
        self.positions = nn.Embedding(max_len, hidden)
        nn.init.normal_(self.items.weight, std=hidden**-0.5)
        nn.init.normal_(self.positions.weight, std=hidden**-0.5)
        with torch.no_grad():
            self.items.weight[n_items].zero_()
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            CausalBlock(hidden, heads, dropout, ffn_width=hidden, activation=nn.ReLU) for _ in range(blocks)
        )
        self.norm = nn.LayerNorm(hidden)  # pre-LN blocks leave the residual stream un-normalised

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """(batch, length <= max_len) left-padded item indices -> (batch, length, hidden) hidden states.

        Positions count back from the most recent item, so a batch cut to its longest sequence (fewer padding
        columns) gives exactly the same states as padding to ``max_len``: padding is never attended to.
        """
        length = seqs.shape[1]
        real = seqs != self.n_items
        # as in SASRec, item embeddings are scaled by sqrt(d) before the positions are added
        x = self.items(seqs) * self.items.embedding_dim**0.5 + self.positions.weight[-length:]
        x = self.drop(x) * real.unsqueeze(-1)
        # causal and never onto padding; every position may see itself, so padded rows are not all -inf (NaN)
        causal = torch.ones(length, length, dtype=torch.bool, device=seqs.device).tril()
        mask = (causal & real[:, None, :]) | torch.eye(length, dtype=torch.bool, device=seqs.device)
        mask = mask.unsqueeze(1)  # (batch, 1 head-broadcast, query, key)
        for block in self.blocks:
            x = block(x, mask) * real.unsqueeze(-1)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.items.weight[: self.n_items].T  # shared input/output embeddings, padding row excluded


def _left_pad(histories: Histories, length: int, pad: int) -> torch.Tensor:
    out = np.full((len(histories), length), pad, dtype=np.int64)
    for row, h in enumerate(histories):
        tail = np.asarray(h, dtype=np.int64)[-length:]
        if len(tail):
            out[row, length - len(tail) :] = tail
    return torch.from_numpy(out)


class _Threads:
    """Temporarily set torch's intra-op thread count (restored afterwards; None leaves it alone)."""

    def __init__(self, threads: int | None) -> None:
        self.threads, self.before = threads, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)

    def __exit__(self, *_exc) -> None:
        torch.set_num_threads(self.before)


class SASRec:
    """SASRec with full-softmax cross-entropy (SASRec+ of Klenitskiy & Vasilev 2023), fitted on construction.

    ``train``: per-user item indices in time order. Each user contributes their most recent ``max_len + 1`` items:
    inputs are the first ``max_len``, and every non-padded position predicts the item after it. With ``validation``
    (histories, relevant items), NDCG@10 with seen items removed is computed every ``eval_every`` epochs; training
    stops after ``patience`` evaluations without improvement and the best weights are restored. Without it, all
    ``epochs`` run (the final fit, with the epoch count found on validation).
    """

    def __init__(
        self,
        train: Histories,
        n_items: int,
        hidden: int = 64,
        blocks: int = 2,
        heads: int = 1,
        dropout: float = 0.2,
        max_len: int = 50,
        epochs: int = 60,
        lr: float = 1e-3,
        batch_size: int = 128,
        seed: int = 42,
        validation: tuple[Histories, Histories] | None = None,
        patience: int = SEQUENCE_PATIENCE,
        eval_every: int = EVAL_EVERY,
        threads: int | None = None,
        init: tuple[SASRec, np.ndarray] | None = None,
        on_epoch: EpochCallback | None = None,
        negatives: int | None = None,
    ) -> None:
        """``negatives``: train with sampled softmax, each batch's positions scored against their own next item
        and this many uniform negatives shared by the batch, instead of the whole catalogue (None, or a count not
        below the catalogue: the full softmax). ``init``: (a trained SASRec, each item's row in it or -1) to start
        from, e.g. last night's: every weight of the same shape is copied, item embeddings by id (new items keep
        their fresh initialisation).
        ``on_epoch(epoch, values)`` is called after every epoch with its mean ``loss`` (and ``validation_ndcg`` when
        it was evaluated), for live progress."""
        self.on_epoch = on_epoch
        self.n_items, self.max_len, self.threads = n_items, max_len, threads
        self.negatives = negatives if negatives is not None and negatives < n_items else None
        flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in train]) if train else np.zeros(0, np.int64)
        self.popularity = np.bincount(flat, minlength=n_items).astype(np.float32)
        self.text_rows = np.zeros(n_items, dtype=bool)  # untrained items given embeddings predicted from text
        self.best_epoch = 0
        self.epochs_run = 0
        self.history: list[tuple[int, float]] = []  # (epoch, validation NDCG@10) at each evaluation
        started = time.perf_counter()
        # fork_rng: the seed governs init and dropout here without disturbing the caller's global torch RNG
        with _Threads(threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = _Net(n_items, hidden, blocks, heads, dropout, max_len)
            self.started_warm = init is not None
            if init is not None:
                self._start_from(*init)
            self._fit(train, epochs, lr, batch_size, seed, validation, patience, eval_every)
        self.net.eval()
        self.fit_seconds = time.perf_counter() - started

    def _start_from(self, source: SASRec, rows: np.ndarray) -> None:
        state, old = self.net.state_dict(), source.net.state_dict()
        for name, value in old.items():
            if name != "items.weight" and name in state and state[name].shape == value.shape:
                state[name] = value.clone()
        if state["items.weight"].shape[1] == old["items.weight"].shape[1]:
            mapped = np.flatnonzero(rows >= 0)
            state["items.weight"][torch.from_numpy(mapped)] = old["items.weight"][torch.from_numpy(rows[mapped])]
        self.net.load_state_dict(state)

    def _fit(self, train, epochs, lr, batch_size, seed, validation, patience, eval_every) -> None:
        windows = [np.asarray(s, dtype=np.int64)[-(self.max_len + 1) :] for s in train if len(s) >= 2]
        if not windows:
            return
        pad = self.n_items
        inputs = _left_pad([w[:-1] for w in windows], self.max_len, pad)
        targets = _left_pad([w[1:] for w in windows], self.max_len, pad)  # aligned: same left padding as inputs
        lengths = torch.tensor([len(w) - 1 for w in windows], dtype=torch.float64)
        optimiser = torch.optim.Adam(self.net.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(seed)
        best_value, best_state, stale = -1.0, None, 0
        if validation is not None and self.started_warm:  # the starting point may already be the best
            best_value, best_state = self.validation_ndcg(*validation), copy.deepcopy(self.net.state_dict())
            self.history.append((0, best_value))
        for epoch in range(1, epochs + 1):
            self.net.train()
            # batches of similar lengths (a length sort jittered afresh each epoch, batches in random order): most
            # histories are far shorter than max_len, and each batch is cut to its longest, so this skips most of
            # the padding (2/3 of the tokens on MovieLens-100K at max_len 200) while batches still vary by epoch
            jitter = 0.75 + 0.5 * torch.rand(len(windows), generator=generator, dtype=torch.float64)
            batches = torch.argsort(lengths * jitter).split(batch_size)
            total, count = 0.0, 0
            for b in torch.randperm(len(batches), generator=generator).tolist():
                batch = batches[b]
                width = int(lengths[batch].max())
                x, y = inputs[batch, -width:], targets[batch, -width:]
                keep = y != pad
                hidden = self.net(x)[keep]  # only real positions: the full softmax is the expensive part
                loss = self._loss(hidden, y[keep], generator)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total, count = total + loss.item() * len(batch), count + len(batch)
            self.epochs_run = epoch
            values = {"loss": total / max(count, 1)}
            if validation is None or (epoch % eval_every and epoch != epochs):
                if self.on_epoch is not None:
                    self.on_epoch(epoch, values)
                continue
            value = self.validation_ndcg(*validation)
            self.history.append((epoch, value))
            if self.on_epoch is not None:
                self.on_epoch(epoch, {**values, "validation_ndcg": value})
            if value > best_value:
                best_value, stale, self.best_epoch = value, 0, epoch
                best_state = copy.deepcopy(self.net.state_dict())
            else:
                stale += 1
                if stale >= patience:
                    break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        else:
            self.best_epoch = self.epochs_run

    def _loss(self, hidden: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Cross-entropy of each position's next item: over the catalogue, or over it and the sampled negatives."""
        if self.negatives is None:
            return F.cross_entropy(self.net.logits(hidden), targets)
        # uniform negatives: their sampling probability is the same for every item, so the sampled softmax needs
        # no log-q correction; a negative that is the position's own target is masked out
        sampled = torch.randint(0, self.n_items, (self.negatives,), generator=generator)
        table = self.net.items.weight
        positive = (hidden * table[targets]).sum(1, keepdim=True)
        negative = (hidden @ table[sampled].T).masked_fill(sampled[None, :] == targets[:, None], float("-inf"))
        logits = torch.cat([positive, negative], dim=1)
        return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long))

    @torch.no_grad()
    def score(self, histories: Histories) -> np.ndarray:
        """(len(histories), n_items) float32: the last position's state dotted with every item's embedding.

        Users with an empty history get the training popularity counts.
        """
        out = np.empty((len(histories), self.n_items), dtype=np.float32)
        was_training = self.net.training
        self.net.eval()
        with _Threads(self.threads):
            for start in range(0, len(histories), 1024):
                chunk = histories[start : start + 1024]
                width = max(1, min(self.max_len, max(len(h) for h in chunk)))
                seqs = _left_pad(chunk, width, self.n_items)
                out[start : start + len(chunk)] = self.net.logits(self.net(seqs)[:, -1]).numpy()
        empty = np.fromiter((len(h) == 0 for h in histories), dtype=bool, count=len(histories))
        out[empty] = self.popularity
        self.net.train(was_training)
        return out

    @torch.no_grad()
    def states(self, histories: Histories, batch: int = 1024) -> np.ndarray:
        """(len(histories), hidden) float32: the state after each history's newest item (zero for no history);
        ``states @ item_vectors().T`` is :meth:`score` for users with history."""
        out = np.zeros((len(histories), self.hidden), dtype=np.float32)
        was_training = self.net.training
        self.net.eval()
        with _Threads(self.threads):
            for start in range(0, len(histories), batch):
                chunk = histories[start : start + batch]
                width = max(1, min(self.max_len, max((len(h) for h in chunk), default=1)))
                out[start : start + len(chunk)] = self.net(_left_pad(chunk, width, self.n_items))[:, -1].numpy()
        out[np.fromiter((len(h) == 0 for h in histories), dtype=bool, count=len(histories))] = 0.0
        self.net.train(was_training)
        return out

    def item_vectors(self) -> np.ndarray:
        """(n_items, hidden): the output embeddings; zero for items never seen in training, whose embeddings only
        ever learned to lose (a new item is left to the rest of the score, which reads its text)."""
        vectors = self.net.items.weight[: self.n_items].detach().numpy().astype(np.float32).copy()
        vectors[(self.popularity == 0) & ~self.text_rows] = 0.0
        return vectors

    @torch.no_grad()
    def set_item_rows(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Give the untrained items ``rows`` these output embeddings (predicted from their text, see
        :mod:`nightrec.model.new_items`), so they are scored like the items their text resembles."""
        rows = np.asarray(rows, dtype=np.int64)
        self.net.items.weight[torch.from_numpy(rows)] = torch.from_numpy(np.asarray(vectors, dtype=np.float32))
        self.text_rows[rows] = True

    @property
    def hidden(self) -> int:
        return self.net.items.embedding_dim

    def arrays(self, prefix: str = "sequence") -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, header) to save it without pickle, every tensor name starting with ``prefix``;
        :meth:`from_arrays` rebuilds it."""
        tensors = {f"{prefix}.{k}": v.detach().contiguous() for k, v in self.net.state_dict().items()}
        tensors[f"{prefix}_popularity"] = torch.from_numpy(self.popularity)
        tensors[f"{prefix}_text_rows"] = torch.from_numpy(self.text_rows.astype(np.uint8))
        blocks = len(self.net.blocks)
        header = {"hidden": self.hidden, "blocks": blocks, "max_len": self.max_len, "best_epoch": self.best_epoch}
        header["heads"] = self.net.blocks[0].heads if blocks else 1
        return tensors, header

    @classmethod
    def from_arrays(
        cls, tensors: dict[str, torch.Tensor], header: dict, n_items: int, prefix: str = "sequence"
    ) -> SASRec:
        self = cls.__new__(cls)
        self.n_items, self.max_len, self.threads, self.negatives = n_items, int(header["max_len"]), None, None
        self.popularity = tensors[f"{prefix}_popularity"].numpy()
        text_rows = tensors.get(f"{prefix}_text_rows")  # absent in a file saved before new items were filled
        self.text_rows = np.zeros(n_items, bool) if text_rows is None else text_rows.numpy().astype(bool)
        self.best_epoch, self.epochs_run, self.history, self.fit_seconds = header.get("best_epoch", 0), 0, [], 0.0
        self.net = _Net(n_items, int(header["hidden"]), int(header["blocks"]), int(header["heads"]), 0.0, self.max_len)
        state = {k.removeprefix(f"{prefix}."): v for k, v in tensors.items() if k.startswith(f"{prefix}.")}
        self.net.load_state_dict(state)
        self.net.eval()
        return self

    def validation_ndcg(self, histories: Histories, relevant: Histories) -> float:
        """Mean NDCG@10 with seen items removed, the evaluation protocol's validation metric."""
        top = top_k_unseen(self.score(histories), histories, 10)
        return float(np.nanmean(per_user_metrics(top, relevant, 10)["ndcg"]))


class SASRecEnsemble:
    """SASRec fits of the same parameters from different seeds, served as one part whose score is the mean of theirs:
    each member's state (divided by the count) and item embeddings side by side, so the part stays an inner product
    in the FAISS index. One seed's SASRec on a small catalogue is noisy (Gift Cards warm NDCG@10 ±0.006-0.01 across
    seeds), and the mean of two fits scored above either fit alone on Gift Cards and MovieLens (docs/quality.md)."""

    def __init__(self, members: list[SASRec]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = list(members)

    @property
    def n_items(self) -> int:
        return self.members[0].n_items

    @property
    def negatives(self) -> int | None:
        return self.members[0].negatives

    @property
    def text_rows(self) -> np.ndarray:
        return self.members[0].text_rows

    @property
    def best_epoch(self) -> int:
        return self.members[0].best_epoch

    @property
    def fit_seconds(self) -> float:
        return sum(m.fit_seconds for m in self.members)

    @property
    def hidden(self) -> int:
        return sum(m.hidden for m in self.members)

    def score(self, histories: Histories) -> np.ndarray:
        return np.mean([m.score(histories) for m in self.members], axis=0)

    def states(self, histories: Histories, batch: int = 1024) -> np.ndarray:
        """Every member's :meth:`SASRec.states` side by side, divided by the member count: ``states @
        item_vectors().T`` is the members' mean score."""
        return np.concatenate([m.states(histories, batch) for m in self.members], axis=1) / len(self.members)

    def item_vectors(self) -> np.ndarray:
        return np.concatenate([m.item_vectors() for m in self.members], axis=1)

    def arrays(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Member 0 under the single model's names (``sequence.*``), member k under ``sequence_m{k}``."""
        tensors, headers = {}, []
        for k, member in enumerate(self.members):
            member_tensors, header = member.arrays(_member_prefix(k))
            tensors |= member_tensors
            headers.append(header)
        return tensors, {**headers[0], "members": headers}

    @classmethod
    def from_arrays(cls, tensors: dict[str, torch.Tensor], header: dict, n_items: int) -> SASRecEnsemble:
        members = header["members"]
        return cls([SASRec.from_arrays(tensors, h, n_items, _member_prefix(k)) for k, h in enumerate(members)])


def _member_prefix(k: int) -> str:
    return "sequence" if k == 0 else f"sequence_m{k}"


def sequence_members(part: SASRec | SASRecEnsemble | None) -> list[SASRec]:
    """The SASRec networks a sequence part is made of (one for a single model, none for no part)."""
    if part is None:
        return []
    return part.members if isinstance(part, SASRecEnsemble) else [part]


def sequence_from_arrays(tensors: dict[str, torch.Tensor], header: dict, n_items: int) -> SASRec | SASRecEnsemble:
    """A saved sequence part: an ensemble where the header lists members, else one SASRec (older files too)."""
    if "members" in header:
        return SASRecEnsemble.from_arrays(tensors, header, n_items)
    return SASRec.from_arrays(tensors, header, n_items)


def default_grid(n_users: int, longest: int | None = None) -> list[dict]:
    """hidden 64 (the recipe's), dropout {0.2, 0.5}, max_len {50, 100}, at most 100 early-stopped epochs.

    A max_len above the ``longest`` training input is the same model as max_len 50 up to its initialisation (every
    sequence fits either way), so it is dropped: a catalogue of short histories tunes two trials, not four.

    The batch size gives at least ~24 optimiser steps per epoch (a power of two in [16, 128]): with 128 a small
    catalogue such as MovieLens-100K (~750 training users) gets 6 steps an epoch and is still under-trained after 60
    epochs, while batch 32 early-stops near epoch 25 at a higher validation NDCG. max_len 200 took twice the time of
    50 on MovieLens-100K (median training history ~40 items) and scored no better, so the grid stops at 100.
    """
    batch = int(np.clip(2 ** round(np.log2(max(n_users, 1) / 24)), 16, 128))
    lengths = _lengths(longest)
    # evaluations (every EVAL_EVERY epochs) without improvement: 5 (10 epochs) up to ~24 steps an epoch, fewer where
    # an epoch holds many steps (the 400,000-event demo: 3)
    patience = math.ceil(scaled_patience(math.ceil(n_users / batch), 2 * SEQUENCE_PATIENCE) / EVAL_EVERY)
    return [
        {"hidden": 64, "dropout": d, "max_len": m, "lr": 1e-3, "batch_size": batch, "epochs": 100, "patience": patience}
        for d in (0.5, 0.2)  # likeliest first, for a search under a time budget (0.5 won on ML-100K and the demo)
        for m in lengths
    ]


def _lengths(longest: int | None) -> tuple[int, ...]:
    """max_len 50 and 100, without 100 where no input is longer than 50 (the same model up to its initialisation)."""
    return tuple(m for m in (50, 100) if longest is None or m == 50 or longest > 50)


def default_space(longest: int | None = None) -> SearchSpace:
    """Where the search samples beyond the grid: :class:`SearchSpace`'s ranges, with the grid's lengths."""
    return SearchSpace(max_len=_lengths(longest))


def tune_sasrec(
    train: Histories,
    n_items: int,
    validation: tuple[Histories, Histories],
    seed: int,
    grid: list[dict] | None = None,
    log: Callable[[str], None] = print,
    threads: int | None = None,
    trials: int | None = SEARCH_TRIALS,
) -> dict:
    """Pick SASRec's parameters by validation NDCG@10, each trial early-stopped on the same validation: the search of
    :func:`best_sasrec` (the grid, then sampled points up to ``trials``), as the sequence part is tuned in a night.

    ``train`` is the inner training histories and ``validation`` is (histories, relevant items) carved from them
    (``Split.validation`` without its first element). The result is constructor keyword arguments, including the
    best trial's early-stopped epoch count as ``epochs``, so the final fit on the full training data can run a fixed
    number of epochs: ``SASRec(split.train, n_items, seed=seed, **params)``.
    """
    return best_sasrec(train, n_items, validation, seed, grid, log, threads, trials=trials)[0]


def best_sasrec(
    train: Histories,
    n_items: int,
    validation: tuple[Histories, Histories],
    seed: int,
    grid: list[dict] | None = None,
    log: Callable[[str], None] = print,
    threads: int | None = None,
    init: tuple[SASRec, np.ndarray] | None = None,
    budget_s: float | None = None,
    on_epoch: EpochCallback | None = None,
    give_up_below: float | None = None,
    trials: int | None = None,
    space: SearchSpace | None = None,
) -> tuple[dict, SASRec, list[dict]]:
    """:func:`tune_sasrec`'s parameters, the best trial's early-stopped model and every trial's record.

    The search (:func:`nightrec.model.tuning.search`) runs ``grid`` (default :func:`default_grid`) first, then
    sampled points of ``space`` (default :func:`default_space`) up to ``trials`` in all (None: the grid alone),
    pruning a trial that runs behind the median. ``init`` is passed to every trial (:class:`SASRec`). With
    ``budget_s``, no trial starts once that many seconds have gone (the first always runs); with ``give_up_below``,
    none after a first trial that scored below it. The grid points never run are recorded as skipped."""
    longest = max((len(s) for s in train), default=0) - 1  # inputs are a history without its last item

    def fit(params: dict, report: Callable[[int, float], None]) -> tuple[float, SASRec, dict]:
        def each_epoch(epoch: int, values: dict[str, float]) -> None:
            if on_epoch is not None:
                on_epoch(epoch, values)
            if "validation_ndcg" in values:
                report(epoch, values["validation_ndcg"])

        model = SASRec(
            train,
            n_items,
            validation=validation,
            init=init,
            on_epoch=each_epoch,
            **{"seed": seed, "threads": threads, **params},
        )
        value = max((v for _, v in model.history), default=model.validation_ndcg(*validation))
        extra = {"best_epoch": model.best_epoch, "epochs_run": model.epochs_run, "seconds": round(model.fit_seconds, 2)}
        return value, model, extra

    starts = grid or default_grid(len(train), longest)
    space = space or default_space(longest)
    params, model, records = search(fit, starts, seed, space, trials, budget_s, give_up_below, log)
    epochs = model.best_epoch if init is not None else max(model.best_epoch, 1)  # warm: 0 = keep the start
    return {**params, "epochs": epochs}, model, records
