"""The recommender's parameters and differentiable forward pass (:class:`MetaRecModel`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nightrec.model.attention import CausalBlock
from nightrec.model.config import TrainConfig


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


def right_aligned(support: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's newest ``length`` items of a left-aligned (B, L) batch, right-aligned: column ``length - 1`` is the
    newest item, column ``length - 1 - a`` the one ``a`` steps older; (indices, valid) of shape (B, length)."""
    count = mask.sum(1, keepdim=True)
    source = count - length + torch.arange(length).unsqueeze(0)  # (B, length) column in the left-aligned batch
    valid = source >= 0
    seq = support.gather(1, source.clamp(min=0, max=max(support.shape[1] - 1, 0)))
    return seq.masked_fill(~valid, 0), valid


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
        if not config.use_text:  # no text to start from: all-zero vectors would get zero gradients and never move
            nn.init.normal_(self.item_id.weight, std=d**-0.5)
            nn.init.normal_(self.history_id.weight, std=d**-0.5)
        self.prior = nn.Parameter(torch.zeros(d))
        if config.prior in ("sequence", "both"):
            # learned positions counted from the newest item (0 = newest), causal pre-LN blocks, a final LayerNorm
            # (pre-LN leaves the residual stream un-normalised) and a linear map into user space
            self.seq_positions = nn.Embedding(config.seq_max_len, d)
            nn.init.normal_(self.seq_positions.weight, std=d**-0.5)
            self.seq_blocks = nn.ModuleList(
                CausalBlock(d, config.seq_heads, config.dropout, ffn_width=2 * d, activation=nn.GELU)
                for _ in range(config.seq_blocks)
            )
            self.seq_norm = nn.LayerNorm(d)
            self.seq_out = nn.Linear(d, d)
        if config.prior in ("pooled", "both"):
            self.pool = nn.Linear(2 * d, d)
            self.recency = nn.Parameter(torch.tensor(math.log(0.05)))  # log decay rate per position from the newest
        self.profile = nn.Linear(profile_dim, d, bias=False) if profile_dim else None
        init = math.log(config.inner_lr_init)
        self.log_alpha = nn.Parameter(torch.full((max(config.inner_steps, 1), d), init))
        self.dropout = nn.Dropout(config.dropout)
        self.register_buffer("known", torch.ones(n_items, dtype=torch.bool))

    # --- items --------------------------------------------------------------------------------------------------
    def item_tables(
        self, text: torch.Tensor, id_keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output vectors, biases, history-side vectors) for every item; ``id_keep`` (n_items,) bool switches the ID
        parts off where False (ID dropout in training: those items are scored by their text alone)."""
        known = self.known if id_keep is None else self.known & id_keep
        known = known.unsqueeze(1).to(text.dtype)
        use_text = 1.0 if self.config.use_text else 0.0
        use_id = known if self.config.use_id else torch.zeros_like(known)
        out = use_text * self.item_adaptor(text) + use_id * self.item_id.weight
        bias = use_text * self.text_bias(text).squeeze(1) + (use_id * self.id_bias.weight).squeeze(1)
        hist = use_text * self.history_adaptor(text) + use_id * self.history_id.weight
        return out, bias, hist

    # --- users --------------------------------------------------------------------------------------------------
    def prior_vectors(
        self,
        hist_table: torch.Tensor,
        support: torch.Tensor,
        mask: torch.Tensor,
        profile: torch.Tensor | None,
        states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The users' starting vectors from the support: ``support`` (B, L) item indices, newest last; ``mask`` (B, L).

        ``config.prior`` "pooled": a long-term and a recency-weighted mean of history-side vectors; "sequence": the
        sequence encoder's state at the newest item (:meth:`sequence_states`, or its ``states`` when given); "both":
        their sum. A user with no history starts from the learned prior (plus the profile)."""
        u = self.prior
        if self.config.prior in ("pooled", "both"):
            maskf = mask.to(hist_table.dtype)
            count = maskf.sum(1, keepdim=True)
            # position from the newest valid interaction (0 = newest), for the recency-weighted mean
            age = (count - torch.cumsum(maskf, 1)).clamp(min=0.0)
            weights = torch.exp(-self.recency.exp() * age) * maskf
            h = self.dropout(hist_table)
            mean = _pool(support, maskf / count.clamp(min=1.0), h)
            recent = _pool(support, weights / weights.sum(1, keepdim=True).clamp(min=1e-6), h)
            u = u + self.pool(torch.cat([mean, recent], dim=1))
        if self.config.prior in ("sequence", "both"):
            if states is None:
                states = self.sequence_states(hist_table, support, mask)[0]
            u = u + states[:, -1]  # zero for a user with no history
        if self.profile is not None and profile is not None:
            u = u + self.profile(profile)
        return u

    def sequence_states(
        self, hist_table: torch.Tensor, support: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The causal encoder over each user's newest ``seq_max_len`` support items: (states (B, T, d) in user space,
        item indices (B, T), valid (B, T)), right-aligned, so ``states[:, -1]`` has read the whole (cut) history and
        ``states[:, t]`` only items up to column ``t``. Padding is never attended to and its states are zero."""
        length = max(1, min(self.config.seq_max_len, support.shape[1]))
        seq, valid = right_aligned(support, mask, length)
        age = torch.arange(length - 1, -1, -1)  # column t is (length - 1 - t) steps older than the newest
        x = self.dropout(hist_table[seq] + self.seq_positions(age).unsqueeze(0)) * valid.unsqueeze(-1)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        attend = (causal & valid[:, None, :]) | torch.eye(length, dtype=torch.bool)  # self: no all -inf rows
        attend = attend.unsqueeze(1)
        for block in self.seq_blocks:
            x = block(x, attend) * valid.unsqueeze(-1)
        return self.seq_out(self.seq_norm(x)) * valid.unsqueeze(-1), seq, valid

    def sequence_aux_loss(
        self, states: torch.Tensor, seq: torch.Tensor, valid: torch.Tensor, out_table: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """SASRec's dense next-item objective on :meth:`sequence_states`' output: every support position's state (plus
        the prior) predicts the next support item, full-softmax cross-entropy over the catalogue."""
        pairs = valid[:, :-1] & valid[:, 1:]
        if not bool(pairs.any()):
            return out_table.sum() * 0.0
        h = self.prior + states[:, :-1][pairs]
        return F.cross_entropy(h @ out_table.T + bias, seq[:, 1:][pairs])

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
