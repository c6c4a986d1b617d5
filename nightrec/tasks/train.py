"""The meta-learned recommender (DESIGN.md "The recommender") and its training loop.

Items: ``v_i = adaptor(text_i) + id_i`` (ID embedding only for items seen in training) and a bias
``b_i = w . text_i + id_bias_i``; a new item with text but no history gets the text part of both.

Users: a prior ``u0`` pooled from the user's history (a long-term mean and a learned recency-weighted mean of
history-side item vectors, FISM-like), plus an optional language-model profile vector, then ``inner_steps`` gradient
steps on the user's own interactions (full-softmax cross-entropy over the catalogue, gradient written in closed form
so every user in a batch adapts at once): ``u <- u - alpha_t * grad``, with ``alpha_t`` one learned step size per
dimension and step (Meta-SGD). The prior, adaptors, item tables and step sizes are meta-learned over users as tasks:
support = a user's first ``s`` interactions (``s`` drawn from 1 upwards so cold users are trained for), query = the
next ones; the query loss is differentiated through the inner steps (second order).

Scores are ``u . v_i + b_i``; :meth:`Recommender.served_vectors` folds the bias in as an extra dimension.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nightrec.storage import atomic
from nightrec.storage.vectors import ServedVectors

FORMAT_VERSION = 1


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`fit_recommender`. Defaults were chosen on a validation split carved from training."""

    dim: int = 128  # ML-100K: 128 lifts warm NDCG@10 0.188 -> 0.214 over 64 (and costs cold k=1, see docs/quality.md)
    inner_steps: int = 2
    inner_lr_init: float = 1.0
    use_text: bool = True
    use_id: bool = True
    epochs: int = 30  # ML-100K: 30 epochs reach the validation NDCG of 120 in a quarter of the time
    batch_users: int = 128
    # tasks (users) per epoch, a fresh seeded sample each epoch; None = every user. A task costs O(catalogue)
    # (full-softmax inner steps), so on a million users this bounds a night's training, not the data it sees
    max_users_per_epoch: int | None = None
    lr: float = 5e-3
    weight_decay: float = 0.0
    id_l2: float = 1e-5  # L2 on the ID tables, per batch: keeps rarely-seen items from overfitting
    max_history: int = 256  # most recent interactions a user's vector is built from
    max_query: int = 50
    cold_support_share: float = 0.5  # share of tasks whose support is 1-5 interactions
    sampled_softmax_above: int = 50_000  # catalogues larger than this train with sampled softmax
    n_negatives: int = 4096
    dropout: float = 0.3
    # users with fewer interactions are served by a second, text + bias model (no ID tables), which ML-100K shows is
    # the better cold-start model; 0 turns it off
    cold_below: int = 6
    seed: int = 42
    threads: int | None = None  # torch intra-op threads; None leaves torch's default

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict) -> TrainConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in payload.items() if k in known})


def _spread(index: torch.Tensor, weights: torch.Tensor, n_items: int) -> torch.Tensor:
    """Dense (B, n_items) matrix with ``weights[b, j]`` added at column ``index[b, j]`` (padding has weight 0)."""
    return torch.zeros(index.shape[0], n_items, dtype=weights.dtype).scatter_add(1, index, weights)


def _pool(index: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(B, d): row b is ``sum_j weights[b, j] * table[index[b, j]]`` (padding has weight 0)."""
    if torch.is_grad_enabled():
        # Training: the dense (B, n_items) @ (n_items, d) product, whose backward is far faster than a gather's.
        return _spread(index, weights, table.shape[0]) @ table
    # Serving and evaluation: a gather reads B x L rows instead of multiplying through the whole catalogue, which
    # made pooling 3 of the 5 catalogue-sized products per user (same sums, in another order).
    return torch.bmm(weights.unsqueeze(1).to(table.dtype), table[index]).squeeze(1)


class MetaRecModel(nn.Module):
    """Parameters and the differentiable forward pass. :class:`Recommender` wraps it with ids and I/O."""

    def __init__(self, n_items: int, text_dim: int, config: TrainConfig, profile_dim: int | None = None) -> None:
        super().__init__()
        d = config.dim
        self.config = config
        self.n_items = n_items
        self.text_dim = text_dim
        hidden = 2 * d
        self.item_adaptor = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.history_adaptor = nn.Sequential(nn.Linear(text_dim, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.item_id = nn.Embedding(n_items, d)
        self.history_id = nn.Embedding(n_items, d)
        self.text_bias = nn.Linear(text_dim, 1)
        self.id_bias = nn.Embedding(n_items, 1)
        for table in (self.item_id, self.history_id, self.id_bias):
            nn.init.zeros_(table.weight)  # text carries the start; IDs learn the residual
        self.prior = nn.Parameter(torch.zeros(d))
        self.pool = nn.Linear(2 * d, d)
        self.recency = nn.Parameter(torch.tensor(math.log(0.05)))  # log decay rate per position from the newest
        self.profile = nn.Linear(profile_dim, d, bias=False) if profile_dim else None
        init = math.log(config.inner_lr_init)
        self.log_alpha = nn.Parameter(torch.full((max(config.inner_steps, 1), d), init))
        self.dropout = nn.Dropout(config.dropout)
        self.register_buffer("known", torch.ones(n_items, dtype=torch.bool))

    # --- items --------------------------------------------------------------------------------------------------
    def item_tables(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output vectors, biases, history-side vectors) for every item."""
        known = self.known.unsqueeze(1).to(text.dtype)
        use_text = 1.0 if self.config.use_text else 0.0
        use_id = known if self.config.use_id else torch.zeros_like(known)
        out = use_text * self.item_adaptor(text) + use_id * self.item_id.weight
        bias = use_text * self.text_bias(text).squeeze(1) + (use_id * self.id_bias.weight).squeeze(1)
        hist = use_text * self.history_adaptor(text) + use_id * self.history_id.weight
        return out, bias, hist

    # --- users --------------------------------------------------------------------------------------------------
    def prior_vectors(
        self, hist_table: torch.Tensor, support: torch.Tensor, mask: torch.Tensor, profile: torch.Tensor | None
    ) -> torch.Tensor:
        """Pool history-side vectors of the support: ``support`` (B, L) item indices, newest last; ``mask`` (B, L)."""
        maskf = mask.to(hist_table.dtype)
        count = maskf.sum(1, keepdim=True)
        # position from the newest valid interaction (0 = newest), for the recency-weighted mean
        age = (count - torch.cumsum(maskf, 1)).clamp(min=0.0)
        weights = torch.exp(-self.recency.exp() * age) * maskf
        h = self.dropout(hist_table)
        mean = _pool(support, maskf / count.clamp(min=1.0), h)
        recent = _pool(support, weights / weights.sum(1, keepdim=True).clamp(min=1e-6), h)
        u = self.prior + self.pool(torch.cat([mean, recent], dim=1))
        if self.profile is not None and profile is not None:
            u = u + self.profile(profile)
        return u

    def adapt(
        self,
        u: torch.Tensor,
        out_table: torch.Tensor,
        bias: torch.Tensor,
        support: torch.Tensor,
        mask: torch.Tensor,
        steps: int | None = None,
    ) -> torch.Tensor:
        """Inner loop: ``steps`` Meta-SGD steps on the support's full-softmax cross-entropy, all users at once.

        d/du of mean_{i in S} -log softmax(u V^T + b)_i is ``softmax(u V^T + b) V - mean_{i in S} V_i``.
        """
        steps = self.config.inner_steps if steps is None else steps
        maskf = mask.to(out_table.dtype)
        count = maskf.sum(1, keepdim=True).clamp(min=1.0)
        target = _pool(support, maskf / count, out_table)
        has_support = (mask.sum(1, keepdim=True) > 0).to(u.dtype)
        for t in range(steps):
            probs = torch.softmax(u @ out_table.T + bias, dim=1)
            grad = probs @ out_table - target
            u = u - has_support * self.log_alpha[min(t, self.log_alpha.shape[0] - 1)].exp() * grad
        return u

    def user_vectors(
        self,
        text: torch.Tensor,
        support: torch.Tensor,
        mask: torch.Tensor,
        profile: torch.Tensor | None = None,
        steps: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, bias, hist = self.item_tables(text)
        u0 = self.prior_vectors(hist, support, mask, profile)
        return self.adapt(u0, out, bias, support, mask, steps), out, bias


# --- batching -----------------------------------------------------------------------------------------------------
def pad_histories(histories: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-aligned (B, L) indices and mask of each history's newest ``max_len`` items (time order kept)."""
    length = max(1, min(max_len, max((len(h) for h in histories), default=1)))
    idx = np.zeros((len(histories), length), dtype=np.int64)
    mask = np.zeros((len(histories), length), dtype=bool)
    for row, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-length:]
        idx[row, : len(h)] = h
        mask[row, : len(h)] = True
    return torch.from_numpy(idx), torch.from_numpy(mask)


def user_sequences(
    events: pl.DataFrame, item_index: dict[str, int], user_ids: list[str] | None = None
) -> tuple[list[str], list[np.ndarray]]:
    """Each user's item indices in time order (first interaction per item kept; unknown items dropped)."""
    frame = (
        events.select("user_id", "item_id", "timestamp")
        .with_columns(pl.col("item_id").replace_strict(item_index, default=None, return_dtype=pl.Int64).alias("ix"))
        .drop_nulls("ix")
        .sort(["user_id", "timestamp", "ix"])
        .unique(["user_id", "ix"], keep="first", maintain_order=True)
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("ix"))
    )
    found = dict(zip(frame["user_id"].to_list(), frame["ix"].to_list(), strict=True))
    users = list(found) if user_ids is None else list(user_ids)
    return users, [np.asarray(found.get(u, []), dtype=np.int64) for u in users]


# --- the recommender ----------------------------------------------------------------------------------------------
@dataclass
class Recommender:
    """A trained :class:`MetaRecModel` with its catalogue: scores, served vectors, save/load."""

    model: MetaRecModel
    item_ids: list[str]
    item_text_vectors: np.ndarray
    config: TrainConfig
    meta: dict = field(default_factory=dict)
    cold_model: MetaRecModel | None = None  # serves users with fewer than config.cold_below interactions

    def __post_init__(self) -> None:
        self.item_index = {item: i for i, item in enumerate(self.item_ids)}
        self.model.eval()
        if self.cold_model is not None:
            self.cold_model.eval()

    @property
    def text(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.item_text_vectors, dtype=np.float32))

    @torch.inference_mode()
    def item_matrix(self) -> np.ndarray:
        """(n_items, dim + 1) item vectors, bias as the last column; the cold model's block appended when present."""
        blocks = []
        for model in self._models():
            out, bias, _ = model.item_tables(self.text)
            blocks += [out, bias.unsqueeze(1)]
        return torch.cat(blocks, dim=1).numpy().astype(np.float32)

    def _models(self) -> list[MetaRecModel]:
        return [self.model] if self.cold_model is None else [self.model, self.cold_model]

    @torch.inference_mode()
    def _adapted(
        self, model: MetaRecModel, histories: list[np.ndarray], profiles: np.ndarray | None, batch: int
    ) -> torch.Tensor:
        out, bias, hist = model.item_tables(self.text)
        rows = [torch.zeros(0, model.config.dim)]
        for start in range(0, len(histories), batch):
            support, mask = pad_histories(histories[start : start + batch], self.config.max_history)
            prof = None if profiles is None else torch.from_numpy(profiles[start : start + batch].astype(np.float32))
            u0 = model.prior_vectors(hist, support, mask, prof)
            rows.append(torch.cat([model.adapt(u0, out, bias, support, mask), torch.ones(len(u0), 1)], dim=1))
        return torch.cat(rows[1:]) if len(rows) > 1 else torch.zeros(0, model.config.dim + 1)

    def user_matrix(
        self, histories: list[np.ndarray], profiles: np.ndarray | None = None, batch: int = 1024
    ) -> np.ndarray:
        """Adapted user vectors with a trailing 1 (the bias dimension); with a cold model, a user gets the warm block
        or the cold block (the other one zero) by the length of their history."""
        if self.cold_model is None:
            return self._adapted(self.model, histories, profiles, batch).numpy().astype(np.float32)
        # Each user is adapted by the one model that serves them (adapting costs O(catalogue) per user).
        short = np.array([len(h) < self.config.cold_below for h in histories], dtype=bool)
        warm_dim = self.model.config.dim + 1
        both = np.zeros((len(histories), warm_dim + self.cold_model.config.dim + 1), dtype=np.float32)
        for model, rows, columns in (
            (self.model, np.flatnonzero(~short), slice(0, warm_dim)),
            (self.cold_model, np.flatnonzero(short), slice(warm_dim, None)),
        ):
            if len(rows):
                own = None if profiles is None else profiles[rows]
                both[rows, columns] = self._adapted(model, [histories[i] for i in rows], own, batch).numpy()
        return both

    def score_histories(self, histories: list[np.ndarray], profiles: np.ndarray | None = None) -> np.ndarray:
        """(n_users, n_items) scores for users given their item-index histories (time order)."""
        return self.user_matrix(histories, profiles) @ self.item_matrix().T

    def served_vectors(
        self,
        events: pl.DataFrame,
        user_ids: list[str],
        user_profile_vectors: dict[str, np.ndarray] | None = None,
    ) -> ServedVectors:
        """Every user's adapted vector from their history in ``events`` (a user with no events gets the prior)."""
        users, histories = user_sequences(events, self.item_index, user_ids)
        profiles = self._profile_matrix(users, user_profile_vectors)
        return ServedVectors(
            user_ids=users,
            user_matrix=self.user_matrix(histories, profiles),
            item_ids=list(self.item_ids),
            item_matrix=self.item_matrix(),
            meta={"model": "nightrec-metarec", "dim": self.item_matrix().shape[1], "bias_folded": True, **self.meta},
        )

    def _profile_matrix(self, users: list[str], vectors: dict[str, np.ndarray] | None) -> np.ndarray | None:
        if self.model.profile is None or not vectors:
            return None
        dim = self.model.profile.in_features
        return np.stack([np.asarray(vectors.get(u, np.zeros(dim)), dtype=np.float32) for u in users])

    # --- persistence (safetensors + json, no pickle) ------------------------------------------------------------
    def save(self, folder: Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().contiguous() for k, v in self.model.state_dict().items()}
        if self.cold_model is not None:
            tensors |= {f"cold_model.{k}": v.detach().contiguous() for k, v in self.cold_model.state_dict().items()}
        tensors["item_text_vectors"] = torch.from_numpy(np.ascontiguousarray(self.item_text_vectors, np.float32))
        with atomic.staged_path(folder / "model.safetensors") as tmp:
            save_file(tensors, str(tmp))
        profile_dim = None if self.model.profile is None else self.model.profile.in_features
        atomic.write_json_atomic(
            folder / "model.json",
            {
                "format_version": FORMAT_VERSION,
                "config": self.config.to_dict(),
                "item_ids": list(self.item_ids),
                "profile_dim": profile_dim,
                "meta": self.meta,
            },
        )
        return folder

    @classmethod
    def load(cls, folder: Path) -> Recommender:
        folder = Path(folder)
        header = json.loads((folder / "model.json").read_text())
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder}: model format {header.get('format_version')} != {FORMAT_VERSION}")
        tensors = load_file(str(folder / "model.safetensors"))
        config = TrainConfig.from_dict(header["config"])
        text = tensors.pop("item_text_vectors").numpy()
        model = MetaRecModel(len(header["item_ids"]), text.shape[1], config, header.get("profile_dim"))
        cold_state = {k.removeprefix("cold_model."): v for k, v in tensors.items() if k.startswith("cold_model.")}
        model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
        cold_model = None
        if cold_state:
            cold_config = _cold_config(config)
            cold_model = MetaRecModel(len(header["item_ids"]), text.shape[1], cold_config, header.get("profile_dim"))
            cold_model.load_state_dict(cold_state)
        return cls(
            model=model,
            item_ids=header["item_ids"],
            item_text_vectors=text,
            config=config,
            meta=header["meta"],
            cold_model=cold_model,
        )


def _cold_config(config: TrainConfig) -> TrainConfig:
    return dataclasses.replace(config, use_id=False, cold_below=0)


# --- training -----------------------------------------------------------------------------------------------------
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
            u = model.adapt(model.prior_vectors(hist, support, mask, prof), out, bias, support, mask)
            if sampled:
                loss = _sampled_query_loss(u, out, bias, support, mask, query, qmask, generator, config.n_negatives)
            else:
                loss = _query_loss(u, out, bias, support, mask, query, qmask)
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
        cold = _fit(events, item_ids, item_text_vectors, user_profile_vectors, _cold_config(config), init_from)
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
