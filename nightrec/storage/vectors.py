"""Served vectors: what the trained model hands to the index and the publisher.

Scores are plain inner products ``user_vectors @ item_vectors.T``; a model with item biases folds them in as an extra
dimension (item side: bias, user side: 1). Stored as safetensors (no pickle) plus the id lists as Parquet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from safetensors.numpy import load_file, save_file

from nightrec.storage import atomic


@dataclass
class ServedVectors:
    """User and item vectors whose inner product is the model's score."""

    user_ids: list[str]
    user_matrix: np.ndarray  # (n_users, d) float32
    item_ids: list[str]
    item_matrix: np.ndarray  # (n_items, d) float32
    meta: dict = field(default_factory=dict)  # model id, version, embedding model, ...
    # further named per-item arrays the model exports with its vectors (the reason space: nightrec.model.reasons)
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.user_matrix.shape[0] != len(self.user_ids) or self.item_matrix.shape[0] != len(self.item_ids):
            raise ValueError("ServedVectors: id lists and matrix rows differ in length")
        if self.user_matrix.shape[1] != self.item_matrix.shape[1]:
            raise ValueError(
                f"ServedVectors: user dim {self.user_matrix.shape[1]} != item dim {self.item_matrix.shape[1]}"
            )

    @property
    def dim(self) -> int:
        return int(self.item_matrix.shape[1])

    def nbytes(self) -> int:
        return int(self.user_matrix.nbytes + self.item_matrix.nbytes + sum(a.nbytes for a in self.extra.values()))


def save_served_vectors(vectors: ServedVectors, folder: Path) -> Path:
    """Write into ``folder`` (created); each file is replaced atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic.staged_path(folder / "vectors.safetensors") as tmp:
        save_file(
            {
                "user_matrix": np.ascontiguousarray(vectors.user_matrix),
                "item_matrix": np.ascontiguousarray(vectors.item_matrix),
                **{f"extra.{k}": np.ascontiguousarray(v) for k, v in vectors.extra.items()},
            },
            str(tmp),
        )
    ids = {"user_ids": vectors.user_ids, "item_ids": vectors.item_ids}
    for name, values in ids.items():
        atomic.write_parquet_atomic(pa.table({name: pa.array(values, pa.string())}), folder / f"{name}.parquet")
    atomic.write_json_atomic(folder / "meta.json", vectors.meta)
    return folder


def load_served_vectors(folder: Path) -> ServedVectors:
    import pyarrow.parquet as pq

    tensors = load_file(str(folder / "vectors.safetensors"))
    return ServedVectors(
        user_ids=pq.read_table(folder / "user_ids.parquet").column(0).to_pylist(),
        user_matrix=tensors["user_matrix"],
        item_ids=pq.read_table(folder / "item_ids.parquet").column(0).to_pylist(),
        item_matrix=tensors["item_matrix"],
        meta=json.loads((folder / "meta.json").read_text()),
        extra={k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")},
    )
