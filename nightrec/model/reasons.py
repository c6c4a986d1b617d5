"""Reasons that explain the score the model computed: each history item's additive part of a recommended item's score.

With the pooled prior the user vector is linear in the history before the inner steps' softmax term, so a
recommended item i's score ``u . v_i`` holds, for each history item j (n of them, j at age a_j, 0 = newest)::

    c_ij = (A_j / n + w_j B_j) . v_i,   A_j = W_mean h_j + (sum_t alpha_t) * v_j,   B_j = W_recent h_j

``h_j`` the history-side vector, ``v_j`` the output vector, ``W_mean``/``W_recent`` the two halves of the pooling map,
``w_j = exp(-lambda a_j) / sum_a exp(-lambda a)`` the learned recency weight and ``alpha_t`` the Meta-SGD step sizes
(the support term ``+alpha_t * mean_j v_j`` of each inner step). What is left of the score -- the learned prior, the
profile, the inner steps' softmax term, the item bias and the popularity prior -- belongs to no single history item.
A sequence prior is not linear in its inputs: only the inner steps' part is attributed there (``B = 0``).
The item-item part (:mod:`nightrec.model.itemitem`) is linear in the (distinct) history items: it adds
``w(n) * p_j . q_i`` exactly (a :class:`LinearPart`). The sequence part (SASRec) is not attributed.

The exported arrays (:meth:`ReasonSpace.arrays`) travel with the served vectors, so publishing needs no model.
:func:`deletion_test` measures fidelity: removing the top reason from a history must lower that item's score (and
rank) more than removing a random history item.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ReasonBlock:
    """One network's attribution arrays; it serves users with ``min_history <= n < max_history`` interactions
    (``max_history`` None: no bound). ``items`` are the network's own output vectors, uncompressed: reasons explain
    the model's score, which the served (possibly compressed) score approximates within the compression tolerance."""

    items: np.ndarray  # (n_items, d): v_i
    mean: np.ndarray  # (n_items, d): A_j
    recent: np.ndarray  # (n_items, d): B_j
    decay: float  # lambda of the recency weights (0 when the network has no pooled prior)
    min_history: int = 0
    max_history: int | None = None


@dataclass
class LinearPart:
    """A part of the score that is a weighted sum over the distinct history items: history item j adds
    ``weight[bucket(n)] * history[j] . items[i]`` to item i (``weight`` per :data:`POPULARITY_BUCKETS` bucket)."""

    history: np.ndarray  # (n_items, r)
    items: np.ndarray  # (n_items, r)
    weight: np.ndarray  # (n_buckets,)


@dataclass
class ReasonSpace:
    """Every served network's :class:`ReasonBlock`, the support length the networks read (``support_cap``) and the
    linear parts added on top of the networks' scores."""

    blocks: list[ReasonBlock]
    support_cap: int
    linear: list[LinearPart] = field(default_factory=list)

    def block_of(self, lengths: np.ndarray) -> np.ndarray:
        """Index of the block that serves each history length (-1: none)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        out = np.full(len(lengths), -1, np.int64)
        for b, block in enumerate(self.blocks):
            upper = np.iinfo(np.int64).max if block.max_history is None else block.max_history
            out[(lengths >= block.min_history) & (lengths < upper)] = b
        return out

    def contributions(self, recs: np.ndarray, hist: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """(B, k, L) c_ij for users' recommended items ``recs`` (B, k; -1 = none) and history slots ``hist`` (B, L;
        newest first, -1 = padding); ``lengths`` = each user's full history length (n, before any cut to L)."""
        import torch

        n_users, k = recs.shape
        out = np.zeros((n_users, k, hist.shape[1]), np.float32)
        blocks = self.block_of(lengths)
        n = np.minimum(np.asarray(lengths, dtype=np.int64), self.support_cap).astype(np.float32)
        ages = np.arange(hist.shape[1], dtype=np.float32)
        for b, block in enumerate(self.blocks):
            users = np.flatnonzero(blocks == b)
            if len(users) == 0:
                continue
            items = torch.from_numpy(block.items)
            h = torch.from_numpy(np.maximum(hist[users], 0))
            nu = n[users][:, None]
            if block.decay > 0:
                # normaliser sum_{a < n} exp(-lambda a), in closed form
                z = np.expm1(-block.decay * nu) / np.expm1(-block.decay)
                w = np.exp(-block.decay * ages[None, :]) / z
            else:
                w = np.zeros((len(users), hist.shape[1]), np.float32)
            a = torch.from_numpy(block.mean)[h] / torch.from_numpy(nu)[:, :, None]
            r = a + torch.from_numpy(w.astype(np.float32))[:, :, None] * torch.from_numpy(block.recent)[h]
            v = items[torch.from_numpy(np.maximum(recs[users], 0))]
            c = torch.bmm(v, r.transpose(1, 2)).numpy()
            c[(hist[users] < 0)[:, None, :].repeat(k, axis=1)] = 0.0
            c[(recs[users] < 0)[:, :, None].repeat(hist.shape[1], axis=2)] = 0.0
            out[users] = c
        for part in self.linear:
            out += self._linear(part, recs, hist, lengths)
        return out

    @staticmethod
    def _linear(part: LinearPart, recs: np.ndarray, hist: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        from nightrec.model.recommender import history_bucket

        weight = np.asarray(part.weight, np.float32)[history_bucket(np.asarray(lengths))]
        v = part.items[np.maximum(recs, 0)]  # (B, k, r)
        h = part.history[np.maximum(hist, 0)]  # (B, L, r)
        c = np.einsum("bkr,blr->bkl", v, h) * weight[:, None, None]
        c[np.broadcast_to((hist < 0)[:, None, :], c.shape)] = 0.0
        c[np.broadcast_to((recs < 0)[:, :, None], c.shape)] = 0.0
        # a repeated history item counts once in the part: its share goes to its newest slot
        for row, slots in enumerate(hist):
            _, first = np.unique(slots, return_index=True)
            repeated = np.setdiff1d(np.flatnonzero(slots >= 0), first)
            c[row][:, repeated] = 0.0
        return c

    # --- travels with the served vectors (plain named arrays, no pickle) -------------------------------------
    def arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        tensors, blocks = {}, []
        for b, block in enumerate(self.blocks):
            tensors[f"reason_items_{b}"] = np.ascontiguousarray(block.items, np.float32)
            tensors[f"reason_mean_{b}"] = np.ascontiguousarray(block.mean, np.float32)
            tensors[f"reason_recent_{b}"] = np.ascontiguousarray(block.recent, np.float32)
            blocks.append(
                {
                    "decay": block.decay,
                    "min_history": block.min_history,
                    "max_history": block.max_history,
                }
            )
        for p, part in enumerate(self.linear):
            tensors[f"reason_linear_history_{p}"] = np.ascontiguousarray(part.history, np.float32)
            tensors[f"reason_linear_items_{p}"] = np.ascontiguousarray(part.items, np.float32)
            tensors[f"reason_linear_weight_{p}"] = np.ascontiguousarray(part.weight, np.float32)
        return tensors, {"blocks": blocks, "support_cap": self.support_cap, "linear": len(self.linear)}

    @classmethod
    def from_arrays(cls, tensors: dict[str, np.ndarray], header: dict | None) -> ReasonSpace | None:
        if not header or any(f"reason_mean_{b}" not in tensors for b in range(len(header["blocks"]))):
            return None
        blocks = [
            ReasonBlock(
                items=tensors[f"reason_items_{b}"],
                mean=tensors[f"reason_mean_{b}"],
                recent=tensors[f"reason_recent_{b}"],
                decay=float(spec["decay"]),
                min_history=int(spec["min_history"]),
                max_history=spec["max_history"],
            )
            for b, spec in enumerate(header["blocks"])
        ]
        linear = [
            LinearPart(
                history=tensors[f"reason_linear_history_{p}"],
                items=tensors[f"reason_linear_items_{p}"],
                weight=tensors[f"reason_linear_weight_{p}"],
            )
            for p in range(int(header.get("linear", 0)))
        ]
        return cls(blocks, int(header["support_cap"]), linear)


def newest_first(histories: list[np.ndarray], width: int) -> np.ndarray:
    """(B, width) the newest ``width`` items of each history, newest first, -1 padded."""
    out = np.full((len(histories), max(width, 1)), -1, np.int64)
    for row, h in enumerate(histories):
        newest = np.asarray(h, dtype=np.int64)[::-1][:width]
        out[row, : len(newest)] = newest
    return out


@dataclass
class Fidelity:
    """Deletion test over (user, recommended item) pairs: how the item's score and rank move when its top reason is
    removed from the history, against removing one random other history item."""

    pairs: int
    share_top_lowers_more: float  # share of pairs where the top reason's removal lowers the score more
    share_lists: float  # share of lists where that holds for most of the list's items
    mean_rank_drop_top: float  # positions the item falls (among unseen items) without its top reason
    mean_rank_drop_random: float
    mean_score_drop_top: float
    mean_score_drop_random: float

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def deletion_test(recommender, histories: list[np.ndarray], k: int = 10, seed: int = 0, by: str = "parts") -> Fidelity:
    """The fidelity of :meth:`Recommender.reason_space` reasons on ``histories`` (users with >= 2 items): for each of
    a user's top-k items, remove its top reason (then, separately, a random other history item) and re-score with the
    full model (popularity prior included). ``by="cosine"``: the top reason by cosine similarity of the served item
    vectors instead (what nightrec published before), for comparison."""
    from nightrec.ranking import top_k_unseen

    histories = [np.asarray(h, dtype=np.int64) for h in histories if len(h) >= 2]
    rng = np.random.default_rng(seed)
    space = recommender.reason_space()
    base = recommender.score_histories(histories)
    tops = top_k_unseen(base, histories, k)
    width = max(len(h) for h in histories)
    slots = newest_first(histories, width)
    lengths = np.array([len(h) for h in histories])
    if by == "cosine":
        matrix = recommender.item_matrix(prior=False)[:, :-1]
        unit = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        contrib = np.einsum("bkd,bld->bkl", unit[np.maximum(tops, 0)], unit[np.maximum(slots, 0)])
    else:
        contrib = space.contributions(tops, slots, lengths)  # (B, k, L)
    contrib[slots[:, None, :].repeat(k, axis=1) < 0] = -np.inf
    best_slot = contrib.argmax(axis=2)  # (B, k)
    variants_top, variants_random, owners, cols, random_slots = [], [], [], [], []
    for u, h in enumerate(histories):
        for r in range(k):
            if tops[u, r] < 0:
                continue
            drop = h[::-1][best_slot[u, r]]
            other = rng.choice(np.flatnonzero(h != drop))
            variants_top.append(h[h != drop])
            variants_random.append(np.delete(h, other))
            owners.append(u), cols.append(r), random_slots.append(other)
    owners, cols = np.asarray(owners), np.asarray(cols)
    item = tops[owners, cols]
    drops = {}
    for name, variant in (("top", variants_top), ("random", variants_random)):
        scores = recommender.score_histories(variant)
        own = scores[np.arange(len(item)), item]
        # rank among the items unseen in the *original* history (the removed item stays excluded)
        seen = np.zeros_like(scores, dtype=bool)
        for row, u in enumerate(owners):
            seen[row, histories[u]] = True
        rank_after = ((scores > own[:, None]) & ~seen).sum(axis=1)
        drops[name] = (base[owners, item] - own, rank_after - cols)
    lowers_more = drops["top"][0] > drops["random"][0]
    per_list = np.bincount(owners, weights=lowers_more, minlength=len(histories)) / np.maximum(
        np.bincount(owners, minlength=len(histories)), 1
    )
    listed = np.bincount(owners, minlength=len(histories)) > 0
    return Fidelity(
        pairs=int(len(item)),
        share_top_lowers_more=float(lowers_more.mean()),
        share_lists=float((per_list[listed] > 0.5).mean()),
        mean_rank_drop_top=float(drops["top"][1].mean()),
        mean_rank_drop_random=float(drops["random"][1].mean()),
        mean_score_drop_top=float(drops["top"][0].mean()),
        mean_score_drop_random=float(drops["random"][0].mean()),
    )
