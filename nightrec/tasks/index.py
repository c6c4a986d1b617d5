"""FAISS index over the served item vectors: type chosen by catalogue size, recall checked against exact search.

Scores are inner products (the served vectors fold any bias in). The item *codec* (how each vector is stored:
``Flat`` float32, ``SQ8`` int8, ``PQ{m}x{bits}``) comes from compression; the *structure* around it comes from the
catalogue size: exhaustive for small catalogues, HNSW for large ones, IVF for PQ codes or very large catalogues
(with a refine step on exact vectors for IVF-PQ).

Recall is measured against exact search over the vectors the index stores (its own reconstruction), so it measures
the search structure; what a lossy codec costs is measured by compression, on NDCG.

An index is saved as a folder, replaced whole: ``index.faiss`` (faiss.write_index), ``index.json`` (factory,
dimension, search parameters, embedding model id, recall) and ``item_ids.parquet`` (row -> item id). No pickle.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nightrec.storage import atomic

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
IDS_FILE = "item_ids.parquet"

EXACT_MAX_ITEMS = 20_000  # below this an exhaustive scan of all items is cheap enough per user
HNSW_MAX_ITEMS = 2_000_000  # above this HNSW's graph memory is too much; IVF-PQ + refine instead
HNSW_M = 32
MAX_EF_SEARCH = 4096


class IndexRecallError(RuntimeError):
    """The index's recall@k against exact search is below the configured minimum."""


@dataclass
class ItemIndex:
    """A FAISS index with its id mapping and everything needed to query it the same way tomorrow."""

    index: faiss.Index
    factory: str
    item_ids: list[str]
    embedding_model: str | None = None
    search_params: dict = field(default_factory=dict)  # efSearch / nprobe found by tuning
    meta: dict = field(default_factory=dict)  # build stats, recall

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``depth`` (scores, rows) per query; rows are -1 where the index found fewer."""
        depth = min(depth, self.ntotal)
        _apply_params(self.index, self.search_params, depth)
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), depth)

    def item_vectors(self) -> np.ndarray:
        """The item vectors as the index stores them (decoded for SQ/PQ codecs), row-aligned with ``item_ids``."""
        return reconstruct_all(self.index)


def choose_factory(
    n_items: int, dim: int, codec: str = "Flat", exact_max_items: int = EXACT_MAX_ITEMS, structure: str = "ivf"
) -> str:
    """FAISS factory string for a catalogue of ``n_items`` vectors of ``dim`` stored with ``codec``.

    Up to ``exact_max_items``: exhaustive. Up to ``HNSW_MAX_ITEMS``: an inverted file over ``codec`` by default
    (``structure="hnsw"`` for an HNSW graph): on inner-product scores with a folded bias, IVF reached recall@50 0.995
    at about twice HNSW's throughput at recall 0.99 (bench/publish.py, docs/serving.md). Beyond: IVF-PQ + refine.
    """
    if n_items <= exact_max_items:
        return codec
    nlist = _nlist(n_items)
    if codec.startswith("PQ"):
        return f"IVF{nlist},{codec}"
    if n_items <= HNSW_MAX_ITEMS:
        return f"HNSW{HNSW_M},{codec}" if structure == "hnsw" else f"IVF{nlist},{codec}"
    m = _pq_m(dim)
    return f"IVF{nlist},PQ{m}x8,RFlat"


def _nlist(n_items: int) -> int:
    # ~4 sqrt(n) lists, at least 39 training points per centroid (FAISS's minimum advice)
    return int(max(1, min(4 * np.sqrt(n_items), n_items // 39)))


def _pq_m(dim: int) -> int:
    for m in (dim // 2, dim // 4, 16, 8, 4, 2, 1):
        if m >= 1 and dim % m == 0 and dim // m <= 8:
            return m
    return 1


def build_index(
    item_matrix: np.ndarray,
    item_ids: list[str],
    factory: str,
    embedding_model: str | None = None,
    seed: int = 42,
    deterministic: bool = True,
) -> ItemIndex:
    """Train and fill a FAISS inner-product index. ``deterministic`` builds HNSW graphs single-threaded (same bytes)."""
    if item_matrix.shape[0] != len(item_ids):
        raise ValueError(f"{item_matrix.shape[0]} item vectors but {len(item_ids)} item ids")
    if len(set(item_ids)) != len(item_ids):
        raise ValueError("duplicate item ids")
    started = time.perf_counter()
    data = np.ascontiguousarray(item_matrix, dtype=np.float32)
    index = faiss.index_factory(data.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    _seed_training(index, seed)
    threads = faiss.omp_get_max_threads()
    try:
        if deterministic and "HNSW" in factory:
            faiss.omp_set_num_threads(1)  # multi-threaded HNSW insertion order varies run to run
        if not index.is_trained:
            index.train(data)
        index.add(data)
    finally:
        faiss.omp_set_num_threads(threads)
    if isinstance(faiss.try_extract_index_ivf(index), faiss.IndexIVF):
        faiss.extract_index_ivf(index).make_direct_map()  # lets reconstruct() serve the recall reference
    params = {"efSearch": 64} if "HNSW" in factory else {"nprobe": 16} if "IVF" in factory else {}
    meta = {"build_seconds": round(time.perf_counter() - started, 3), "n_items": len(item_ids)}
    return ItemIndex(index, factory, list(item_ids), embedding_model, params, meta)


def _seed_training(index: faiss.Index, seed: int) -> None:
    """Fix k-means seeds of IVF quantisers and PQ codebooks so that a rebuild gives the same index."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        if hasattr(ivf, "pq"):
            ivf.pq.cp.seed = seed
    pq_index = faiss.try_extract_index_ivf(index) or index
    if hasattr(pq_index, "pq") and not isinstance(pq_index, faiss.IndexIVF):
        pq_index.pq.cp.seed = seed
    if hasattr(pq_index, "do_polysemous_training"):
        pq_index.do_polysemous_training = False  # searches are by inner product, never Hamming; it costs seconds


def _apply_params(index: faiss.Index, params: dict, depth: int) -> None:
    """Search parameters live on the index object; a deeper query needs at least ``depth`` HNSW candidates."""
    base = index.base_index if isinstance(index, faiss.IndexRefine) else index
    if "efSearch" in params:
        faiss.downcast_index(base).hnsw.efSearch = int(max(params["efSearch"], depth))
    if "nprobe" in params:
        ivf = faiss.extract_index_ivf(base)
        # a deep query must probe enough lists to hold ``depth`` items (twice the mean list size, to be safe)
        needed = int(np.ceil(2 * depth * ivf.nlist / max(ivf.ntotal, 1)))
        ivf.nprobe = int(min(ivf.nlist, max(params["nprobe"], needed)))
    if isinstance(index, faiss.IndexRefine):
        index.k_factor = float(params.get("k_factor", 4.0))


def reconstruct_all(index: faiss.Index) -> np.ndarray:
    if index.ntotal == 0:
        return np.zeros((0, index.d), np.float32)
    return index.reconstruct_n(0, index.ntotal)


def measure_recall(item_index: ItemIndex, queries: np.ndarray, k: int, reference: np.ndarray | None = None) -> float:
    """Mean recall@k of the index against exact inner-product search over ``reference`` (default: what it stores).

    A returned item counts as a hit when its exact score reaches the k-th exact score, so ties at the cut-off do not
    count as misses.
    """
    if len(queries) == 0:
        return 1.0
    reference = item_index.item_vectors() if reference is None else reference
    k = min(k, len(reference))
    exact_scores = queries @ reference.T
    kth = -np.partition(-exact_scores, k - 1, axis=1)[:, k - 1]
    _, rows = item_index.search(queries, k)
    valid = rows >= 0
    got = np.take_along_axis(exact_scores, np.where(valid, rows, 0), axis=1)
    tolerance = 1e-5 * np.maximum(1.0, np.abs(kth))[:, None]
    hits = (valid & (got >= kth[:, None] - tolerance)).sum(axis=1)
    return float(np.mean(hits / k))


def sample_queries(user_matrix: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(user_matrix), size=min(n, len(user_matrix)), replace=False))
    return np.ascontiguousarray(user_matrix[rows], dtype=np.float32)


def tune_and_check(
    item_index: ItemIndex, queries: np.ndarray, k: int, min_recall: float, max_ef: int = MAX_EF_SEARCH
) -> float:
    """Raise efSearch / nprobe until recall@k on ``queries`` reaches ``min_recall``; fail loudly if it cannot."""
    reference = item_index.item_vectors()
    recall = measure_recall(item_index, queries, k, reference)
    params = item_index.search_params
    while recall < min_recall:
        if "efSearch" in params and params["efSearch"] < max_ef:
            params["efSearch"] = min(max_ef, params["efSearch"] * 2)
        elif "nprobe" in params and params["nprobe"] < faiss.extract_index_ivf(item_index.index).nlist:
            params["nprobe"] = min(faiss.extract_index_ivf(item_index.index).nlist, params["nprobe"] * 2)
        elif "k_factor" not in params and isinstance(item_index.index, faiss.IndexRefine):
            params["k_factor"] = 16.0
        else:
            break
        recall = measure_recall(item_index, queries, k, reference)
    item_index.meta.update({"recall_at_k": recall, "recall_k": k, "recall_queries": len(queries)})
    if recall < min_recall:
        raise IndexRecallError(
            f"index {item_index.factory!r} reaches recall@{k} {recall:.4f} < required {min_recall} "
            f"on {len(queries)} sampled users (search params {params})"
        )
    return recall


def save_index(item_index: ItemIndex, folder: Path) -> Path:
    """Write the index folder whole: a reader sees the old folder or the new one (staging dir + replace_dir)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_staging(folder.parent)
    staging = atomic.new_staging_dir(folder.parent, folder.name)
    try:
        faiss.write_index(item_index.index, str(staging / INDEX_FILE))
        pq.write_table(pa.table({"item_id": pa.array(item_index.item_ids, pa.string())}), staging / IDS_FILE)
        meta = {
            "factory": item_index.factory,
            "dim": item_index.dim,
            "metric": "inner_product",
            "n_items": item_index.ntotal,
            "embedding_model": item_index.embedding_model,
            "search_params": item_index.search_params,
            "meta": item_index.meta,
            "faiss_version": faiss.__version__,
        }
        (staging / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        atomic.replace_dir(staging, folder)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def load_index(folder: Path) -> ItemIndex:
    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text())
    index = faiss.read_index(str(folder / INDEX_FILE))
    item_ids = pq.read_table(folder / IDS_FILE).column("item_id").to_pylist()
    if index.ntotal != len(item_ids) or index.d != meta["dim"]:
        raise ValueError(f"{folder}: index has {index.ntotal}x{index.d}, ids/meta say {len(item_ids)}x{meta['dim']}")
    if isinstance(faiss.try_extract_index_ivf(index), faiss.IndexIVF):
        faiss.extract_index_ivf(index).make_direct_map()
    return ItemIndex(index, meta["factory"], item_ids, meta.get("embedding_model"), meta["search_params"], meta["meta"])


def build_checked_index(
    item_matrix: np.ndarray,
    item_ids: list[str],
    user_matrix: np.ndarray,
    folder: Path,
    *,
    k: int = 50,
    min_recall: float = 0.99,
    codec: str = "Flat",
    embedding_model: str | None = None,
    sample_users: int = 2000,
    seed: int = 42,
    exact_max_items: int = EXACT_MAX_ITEMS,
    structure: str = "ivf",
) -> dict:
    """The nightly stage: choose the type, build, tune search on sampled users, check recall@k, save. Returns stats.

    Raises :class:`IndexRecallError` (nothing is saved) when recall@k stays below ``min_recall``.
    """
    factory = choose_factory(len(item_ids), item_matrix.shape[1], codec, exact_max_items, structure)
    item_index = build_index(item_matrix, item_ids, factory, embedding_model, seed)
    queries = sample_queries(user_matrix, sample_users, seed)
    started = time.perf_counter()
    recall = tune_and_check(item_index, queries, k, min_recall)
    item_index.meta["tune_seconds"] = round(time.perf_counter() - started, 3)
    save_index(item_index, folder)
    return {
        "factory": factory,
        "dim": item_index.dim,
        "n_items": item_index.ntotal,
        f"recall_at_{k}": recall,
        "search_params": dict(item_index.search_params),
        "build_seconds": item_index.meta["build_seconds"],
        "index_bytes": (Path(folder) / INDEX_FILE).stat().st_size,
    }
