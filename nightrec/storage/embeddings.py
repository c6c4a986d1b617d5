"""The embedding cache in the lake: Parquet part files of ``key, text_hash, model, vector`` (fixed-size float32 list).

Items: one folder per encoder under ``lake/embeddings/items/``; each night appends part files for new or changed
texts and compacts files that are mostly stale. Users: one complete snapshot per day under
``lake/embeddings/users/date=…/``. Everything is read and written file by file, so memory stays bounded by the
size of one part file, however large the catalogue.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from nightrec.storage import atomic
from nightrec.storage.schemas import embedding_schema

PART_GLOB = "part-*.parquet"
MANIFEST = "encoder.json"


def text_hash(text: str, salt: str = "") -> str:
    """Cache key of one text: sha256 over ``salt`` (the template, prefix, format version) and the text itself."""
    return hashlib.sha256(f"{salt}\x1f{text}".encode()).hexdigest()[:32]


def encoder_folder(root: Path, encoder_key: str) -> Path:
    """``root/<readable slug>--<hash>``: one folder per encoder, so a model change never mixes vectors."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", encoder_key).strip("-.")[:80] or "encoder"
    digest = hashlib.sha256(encoder_key.encode()).hexdigest()[:10]
    return root / f"{slug}--{digest}"


def part_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(PART_GLOB)) if folder.exists() else []


def vectors_table(key: str, model: str, ids: list[str], hashes: list[str], vectors: np.ndarray) -> pa.Table:
    """Rows in :func:`embedding_schema` form; ``vectors`` is (n, dim) and is stored as float32."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(ids) or len(ids) != len(hashes):
        raise ValueError(f"{len(ids)} ids, {len(hashes)} hashes and vectors of shape {vectors.shape} do not match")
    dim = vectors.shape[1]
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    columns = [
        pa.array(ids, pa.string()),
        pa.array(hashes, pa.string()),
        pa.array([model] * len(ids), pa.string()),
        pa.FixedSizeListArray.from_arrays(flat, dim),
    ]
    return pa.Table.from_arrays(columns, schema=embedding_schema(key, dim))


def write_part(folder: Path, table: pa.Table) -> Path:
    """Add one part file atomically; names sort by creation order."""
    path = folder / f"part-{uuid.uuid1().hex}.parquet"
    atomic.write_parquet_atomic(table, path)
    return path


def write_manifest(folder: Path, encoder_key: str, dim: int) -> None:
    if not (folder / MANIFEST).exists():
        atomic.write_json_atomic(folder / MANIFEST, {"encoder": encoder_key, "dim": dim})


def read_index(folder: Path, key: str) -> pl.DataFrame:
    """``key, text_hash, model, file`` of every stored row, without the vectors (cheap on millions of rows)."""
    frames = [
        pl.read_parquet(path, columns=[key, "text_hash", "model"]).with_columns(pl.lit(path.name).alias("file"))
        for path in part_files(folder)
    ]
    if not frames:
        return pl.DataFrame(schema={key: pl.String, "text_hash": pl.String, "model": pl.String, "file": pl.String})
    return pl.concat(frames)


def iter_parts(folder: Path) -> Iterator[pl.DataFrame]:
    for path in part_files(folder):
        yield pl.read_parquet(path)


def read_vectors(
    folder: Path, key: str, wanted: pl.DataFrame, model: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Vectors for ``wanted`` (columns ``key``, ``text_hash``), row i for wanted row i.

    Returns ``(matrix, found)``: ``found[i]`` is False where no stored row matched (that matrix row is zero).
    """
    wanted = wanted.select(key, "text_hash").with_row_index("_pos")
    matrix: np.ndarray | None = None
    found = np.zeros(wanted.height, dtype=bool)
    for part in iter_parts(folder):
        if model is not None:
            part = part.filter(pl.col("model") == model)
        hits = wanted.join(part, on=[key, "text_hash"], how="inner").unique("_pos", keep="first")
        if hits.height == 0:
            continue
        vectors = hits["vector"].to_numpy().astype(np.float32, copy=False)
        if matrix is None:
            matrix = np.zeros((wanted.height, vectors.shape[1]), dtype=np.float32)
        pos = hits["_pos"].to_numpy()
        matrix[pos] = vectors
        found[pos] = True
    if matrix is None:
        matrix = np.zeros((wanted.height, 0), dtype=np.float32)
    return matrix, found


def copy_matching(files: Iterable[Path], key: str, keep: pl.DataFrame, dest: Path, rows_per_file: int) -> int:
    """Copy the stored rows whose (``key``, ``text_hash``) is in ``keep`` into new part files under ``dest``."""
    keep = keep.select(key, "text_hash").unique()
    buffer: list[pa.Table] = []
    buffered = copied = 0
    for path in files:
        table = pq.read_table(path)
        schema = table.schema
        frame = pl.from_arrow(table).join(keep, on=[key, "text_hash"], how="semi").unique([key, "text_hash"])
        if frame.height == 0:
            continue
        buffer.append(frame.to_arrow().cast(schema))
        buffered += frame.height
        if buffered >= rows_per_file:
            write_part(dest, pa.concat_tables(buffer))
            copied += buffered
            buffer, buffered = [], 0
    if buffer:
        write_part(dest, pa.concat_tables(buffer))
        copied += buffered
    return copied


def compact(folder: Path, key: str, live: pl.DataFrame, rows_per_file: int, max_dead: float = 0.5) -> dict[str, int]:
    """Rewrite part files that are mostly stale or small; drop rows whose (key, text_hash) is not in ``live``.

    New files are written before old ones are deleted, so a crash leaves duplicates (harmless), never a loss.
    """
    index = read_index(folder, key)
    if index.height == 0:
        return {"files_rewritten": 0, "rows_dropped": 0}
    live = live.select(key, "text_hash").unique().with_columns(pl.lit(True).alias("_live"))
    per_file = (
        index.join(live, on=[key, "text_hash"], how="left")
        .group_by("file")
        .agg(pl.len().alias("rows"), pl.col("_live").fill_null(False).sum().alias("live"))
    )
    small = rows_per_file // 4
    candidates = per_file.filter(
        (pl.col("live") < pl.col("rows") * (1 - max_dead)) | (pl.col("rows") < small) | (pl.col("live") == 0)
    )
    # A lone small, fully live file is left alone: rewriting it would change nothing.
    if candidates.height == 0 or (candidates.height == 1 and candidates["live"][0] == candidates["rows"][0]):
        return {"files_rewritten": 0, "rows_dropped": 0}
    files = [folder / name for name in candidates["file"].to_list()]
    copied = copy_matching(files, key, live, folder, rows_per_file)
    for path in files:
        path.unlink(missing_ok=True)
    atomic.fsync_dir(folder)
    return {"files_rewritten": len(files), "rows_dropped": int(candidates["rows"].sum()) - copied}


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None
