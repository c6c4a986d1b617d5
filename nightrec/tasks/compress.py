"""Compression of the served artifacts (user vectors + item index), each configuration's quality measured, not assumed.

What is served is the user vectors and the item index; their bytes are what we shrink:

- lower dimension: a pair of projections (user side, item side; d -> r) that keep the score matrix. They start from
  the best rank-r approximation of the scores (closed form: QR of both sides, then an SVD of the small core), then
  are refined by distillation: the projected scores' softmax over items is fitted to the full model's (KL), which
  spends the r dimensions on the top of each list rather than on the long tail of scores nobody sees.
- int8 user vectors: one symmetric scale per user (a list's order does not depend on a user's scale).
- item codecs in the index: float16, int8 or int4 scalar quantisation (FAISS ``SQfp16``/``SQ8``/``SQ4``) and product
  quantisation (``PQ{m}x{bits}``; 8-bit codebooks only when there are enough items to train them).

Every configuration is measured with the caller's ``quality`` (NDCG@10 on the night's evaluation split) on the vectors
as they would be served (quantised and decoded); the smallest within ``tolerance`` relative NDCG loss wins. Bytes:
user vectors as stored (float32, or int8 + a float32 scale per user) plus the serialised FAISS index with that codec;
the projections are applied offline and not served. Id lists are the same in every configuration and left out.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import faiss
import numpy as np

from nightrec.storage.vectors import ServedVectors

DIMS = (64, 48, 32, 24, 16, 12, 8)
ITEM_CODECS = ("Flat", "SQfp16", "SQ8", "SQ4")
MAX_FIT_USERS = 4096
MAX_FIT_ITEMS = 50_000
# Distillation fits a softmax over (a sample of) the items every step, users x items per step: the sample bounds a
# step whatever the catalogue (at 0.1x scale, 4096 users x 10k items took over 20 minutes for the 7 dimensions).
# The fitted projection is then measured on the real vectors like every other configuration, so a weaker fit shows.
MAX_DISTILL_ITEMS = 4096
PQ8_MIN_ITEMS = 39 * 256  # FAISS's advice: at least 39 training points per centroid


@dataclass
class Projection:
    """Score-keeping projections: ``(u @ user) . (v @ item)`` approximates ``u . v``."""

    user: np.ndarray  # (d, r)
    item: np.ndarray  # (d, r)
    method: str


@dataclass
class Config:
    dim: int | None  # None: no projection
    method: str  # "none", "svd" or "distilled"
    users: str  # "float32" or "int8"
    codec: str  # FAISS item codec

    @property
    def name(self) -> str:
        dim = "full" if self.dim is None else f"{self.method}{self.dim}"
        return f"{dim}/users-{self.users}/items-{self.codec}"


@dataclass
class CompressionResult:
    vectors: ServedVectors  # the input vectors in the chosen configuration (items before the index codec)
    codec: str  # item codec for index.build_checked_index
    table: list[dict]
    chosen: str
    projection: Projection | None = None
    users_int8: bool = False
    baseline: dict = field(default_factory=dict)

    def apply(self, vectors: ServedVectors) -> ServedVectors:
        """The chosen transformation applied to other vectors of the same model (e.g. every user's, not the probe's)."""
        return _transform(vectors, self.projection, self.users_int8, self.chosen, self.codec)

    def figure(self):
        """Size (log scale) against NDCG@10 for every configuration, the chosen one marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for users, marker in (("float32", "o"), ("int8", "s")):
            rows = [r for r in self.table if r["users"] == users]
            ax.scatter(
                [r["bytes"] for r in rows],
                [r["ndcg_at_10"] for r in rows],
                marker=marker,
                alpha=0.6,
                label=f"users {users}",
            )
        chosen = next(r for r in self.table if r["config"] == self.chosen)
        ax.scatter(
            [chosen["bytes"]],
            [chosen["ndcg_at_10"]],
            s=160,
            facecolors="none",
            edgecolors="red",
            label=f"chosen: {self.chosen}",
        )
        base = self.baseline.get("ndcg_at_10")
        if base is not None:
            ax.axhline(
                base * (1 - self.baseline.get("tolerance", 0.0)), color="grey", ls="--", lw=1, label="tolerance floor"
            )
        ax.set(
            xscale="log",
            xlabel="served bytes (user vectors + item index)",
            ylabel="NDCG@10",
            title="Compression: size vs quality",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        plt.close(fig)
        return fig


# --- building blocks -------------------------------------------------------------------------------------------------
def _fit_rows(matrix: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if len(matrix) <= limit:
        return matrix.astype(np.float64)
    return matrix[np.sort(rng.choice(len(matrix), limit, replace=False))].astype(np.float64)


def svd_projection(users: np.ndarray, items: np.ndarray, dim: int) -> Projection:
    """Projections giving the best rank-``dim`` approximation (Frobenius) of ``users @ items.T``."""
    _, r_u = np.linalg.qr(users)
    _, r_v = np.linalg.qr(items)
    a, s, bt = np.linalg.svd(r_u @ r_v.T, full_matrices=False)
    if dim > len(s):
        raise ValueError(f"cannot project to {dim} dimensions: the scores have rank at most {len(s)}")
    root = np.sqrt(s[:dim])
    user = np.linalg.pinv(r_u) @ (a[:, :dim] * root)
    item = np.linalg.pinv(r_v) @ (bt[:dim].T * root)
    return Projection(user.astype(np.float32), item.astype(np.float32), "svd")


def distill_projection(
    users: np.ndarray, items: np.ndarray, start: Projection, steps: int = 200, lr: float = 0.01, seed: int = 42
) -> Projection:
    """Refine ``start`` so the projected scores' softmax over items matches the full scores' (mean KL over users)."""
    import torch

    threads = torch.get_num_threads()
    if users.shape[0] * items.shape[0] < 10_000_000:
        torch.set_num_threads(1)  # small matmuls: thread start-up and contention cost more than they save
    try:
        return _distill(users, items, start, steps, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _distill(users: np.ndarray, items: np.ndarray, start: Projection, steps: int, lr: float, seed: int) -> Projection:
    import torch

    torch.manual_seed(seed)
    u = torch.from_numpy(users.astype(np.float32))
    v = torch.from_numpy(items.astype(np.float32))
    with torch.no_grad():
        teacher = torch.log_softmax(u @ v.T, dim=1)
        target = teacher.exp()
    w_u = torch.nn.Parameter(torch.from_numpy(start.user.copy()))
    w_v = torch.nn.Parameter(torch.from_numpy(start.item.copy()))
    opt = torch.optim.Adam([w_u, w_v], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        student = torch.log_softmax((u @ w_u) @ (v @ w_v).T, dim=1)
        loss = (target * (teacher - student)).sum(1).mean()
        loss.backward()
        opt.step()
    return Projection(w_u.detach().numpy().copy(), w_v.detach().numpy().copy(), "distilled")


def int8_roundtrip(matrix: np.ndarray) -> np.ndarray:
    """Symmetric per-row int8 quantisation, decoded back to float32 (what a reader of the int8 file would get)."""
    scale = np.abs(matrix).max(axis=1, keepdims=True) / 127.0
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    return (np.clip(np.rint(matrix / scale), -127, 127).astype(np.int8) * scale).astype(np.float32)


def user_bytes(n_users: int, dim: int, users: str) -> int:
    return n_users * (dim + 4) if users == "int8" else n_users * dim * 4


def codec_roundtrip(items: np.ndarray, codec: str, seed: int = 42) -> tuple[np.ndarray, int]:
    """(decoded item vectors, serialised index bytes) of a flat FAISS index storing ``items`` with ``codec``."""
    data = np.ascontiguousarray(items, dtype=np.float32)
    index = faiss.index_factory(data.shape[1], codec, faiss.METRIC_INNER_PRODUCT)
    if hasattr(index, "pq"):
        index.pq.cp.seed = seed
        index.do_polysemous_training = False  # we never search in Hamming space; it costs seconds per codec
    with _threads(1 if len(data) < 100_000 else None):  # OpenMP on small k-means is slower than one thread
        if not index.is_trained:
            index.train(data)
        index.add(data)
    return index.reconstruct_n(0, index.ntotal), int(len(faiss.serialize_index(index)))


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    if n is not None:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def item_codecs(dim: int, n_items: int) -> list[str]:
    """Scalar codecs, plus PQ with 2 and 4 dimensions per sub-quantiser (8-bit codebooks only with enough items)."""
    codecs = list(ITEM_CODECS)
    bits = 8 if n_items >= PQ8_MIN_ITEMS else 4
    if n_items >= 39 * 2**bits:
        codecs += [f"PQ{dim // sub}x{bits}" for sub in (2, 4) if dim % sub == 0 and dim // sub >= 1]
    return codecs


def _transform(
    vectors: ServedVectors, projection: Projection | None, users_int8: bool, name: str, codec: str
) -> ServedVectors:
    users, items = vectors.user_matrix, vectors.item_matrix
    if projection is not None:
        users, items = users @ projection.user, items @ projection.item
    if users_int8:
        users = int8_roundtrip(users)
    meta = dict(vectors.meta)
    meta.update({"compression": name, "item_codec": codec, "users_int8": users_int8})
    if projection is not None:
        meta.update({"bias_folded": False, "dim": int(projection.user.shape[1]), "projection": projection.method})
    return ServedVectors(
        list(vectors.user_ids),
        np.ascontiguousarray(users, np.float32),
        list(vectors.item_ids),
        np.ascontiguousarray(items, np.float32),
        meta,
        extra=dict(vectors.extra),  # the reason space explains the model's own vectors, compressed or not
    )


# --- the search ------------------------------------------------------------------------------------------------------
def sample_users(holdout, max_users: int | None, seed: int) -> list[str]:
    """The holdout's users (sorted), or a seeded sample of ``max_users`` of them: the compression search measures
    every configuration on these, so on a million users it costs a sample, not the whole night again."""
    users = sorted(set(holdout["user_id"].to_list()))
    if max_users is None or len(users) <= max_users:
        return users
    return sorted(np.random.default_rng(seed).choice(users, size=max_users, replace=False).tolist())


def compress_served(
    vectors: ServedVectors,
    quality: Callable[[ServedVectors], float],
    tolerance: float = 0.02,
    seed: int = 42,
    *,
    dims: tuple[int, ...] = DIMS,
    distill_steps: int = 200,
    max_dims_combined: int = 3,
    progress=None,
) -> CompressionResult:
    """Measure every configuration with ``quality`` and choose the smallest within ``tolerance`` relative loss.

    Dimension first (float32 users, float32 items: SVD and distilled projections for each r below the full
    dimension), then, for the full dimension and the ``max_dims_combined`` smallest dimensions that pass, every
    combination of int8 users and item codec. Returns the measured table (one row per configuration).
    ``progress`` (a :class:`nightrec.logs.Progress`) is updated after each measured configuration.
    """
    rng = np.random.default_rng(seed)
    n_users, full_dim = vectors.user_matrix.shape
    fit_users = _fit_rows(vectors.user_matrix, MAX_FIT_USERS, rng)
    fit_items = _fit_rows(vectors.item_matrix, MAX_FIT_ITEMS, rng)
    distill_items = _fit_rows(fit_items, MAX_DISTILL_ITEMS, rng)
    table: list[dict] = []
    cache: dict[tuple, tuple[np.ndarray, int]] = {}

    def measure(config: Config, projection: Projection | None) -> dict:
        items = vectors.item_matrix if projection is None else vectors.item_matrix @ projection.item
        key = (config.dim, config.method, config.codec)
        if key not in cache:
            cache[key] = codec_roundtrip(items, config.codec, seed)
        decoded_items, index_bytes = cache[key]
        served = _transform(vectors, projection, config.users == "int8", config.name, config.codec)
        served.item_matrix = np.ascontiguousarray(decoded_items, np.float32)
        dim = full_dim if config.dim is None else config.dim
        row = {
            "config": config.name,
            "dim": dim,
            "projection": config.method,
            "users": config.users,
            "codec": config.codec,
            "user_bytes": user_bytes(n_users, dim, config.users),
            "index_bytes": index_bytes,
            "ndcg_at_10": float(quality(served)),
        }
        row["bytes"] = row["user_bytes"] + row["index_bytes"]
        table.append(row)
        if progress is not None:
            progress.update(1, ndcg_at_10=row["ndcg_at_10"])
        return row

    base = measure(Config(None, "none", "float32", "Flat"), None)
    floor = base["ndcg_at_10"] * (1.0 - tolerance)
    projections: dict[tuple, Projection | None] = {(None, "none"): None}
    passing_dims: list[tuple] = []
    # a projection cannot keep more dimensions than there are users or items to fit it on
    max_dim = min(full_dim, len(fit_users), len(fit_items))
    for dim in sorted((d for d in dims if d < max_dim), reverse=True):
        svd = svd_projection(fit_users, fit_items, dim)
        candidates = [svd]
        if distill_steps:
            candidates.append(distill_projection(fit_users, distill_items, svd, steps=distill_steps, seed=seed))
        for projection in candidates:
            row = measure(Config(dim, projection.method, "float32", "Flat"), projection)
            projections[(dim, projection.method)] = projection
            if row["ndcg_at_10"] >= floor:
                passing_dims.append((dim, projection.method))
    smallest = sorted({d for d, _ in passing_dims})[:max_dims_combined]
    combined = [(None, "none")] + [key for key in passing_dims if key[0] in smallest]
    for dim, method in combined:
        for users in ("float32", "int8"):
            for codec in item_codecs(full_dim if dim is None else dim, len(vectors.item_ids)):
                if (users, codec) == ("float32", "Flat"):
                    continue  # measured above
                measure(Config(dim, method, users, codec), projections[(dim, method)])

    measurable = math.isfinite(base["ndcg_at_10"])  # e.g. no user with held-out items: keep everything as it is
    for row in table:
        row["relative_loss"] = (base["ndcg_at_10"] - row["ndcg_at_10"]) / max(base["ndcg_at_10"], 1e-12)
        row["size_ratio"] = base["bytes"] / row["bytes"]
        row["within_tolerance"] = bool(row["ndcg_at_10"] >= floor) if measurable else row is base
    best = min((r for r in table if r["within_tolerance"]), key=lambda r: (r["bytes"], -r["ndcg_at_10"]))
    projection = projections[(None if best["projection"] == "none" else best["dim"], best["projection"])]
    result = CompressionResult(
        vectors=vectors,
        codec=best["codec"],
        table=table,
        chosen=best["config"],
        projection=projection,
        users_int8=best["users"] == "int8",
        baseline={"ndcg_at_10": base["ndcg_at_10"], "bytes": base["bytes"], "tolerance": tolerance},
    )
    result.vectors = result.apply(vectors)
    return result
