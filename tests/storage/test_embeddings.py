"""The embedding cache's files: schema, lookups in request order, compaction that never loses a live vector."""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nightrec.storage import embeddings as store
from nightrec.storage.schemas import embedding_schema

DIM = 8


def _vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _write(folder, ids, hashes, vectors, model="m"):
    return store.write_part(folder, store.vectors_table("item_id", model, ids, hashes, vectors))


def test_part_file_has_the_contract_schema(tmp_path):
    path = _write(tmp_path, ["a", "b"], ["h1", "h2"], _vectors(2, 0))
    schema = pq.read_schema(path)
    assert schema.equals(embedding_schema("item_id", DIM), check_metadata=False)
    vector_type = schema.field("vector").type
    assert isinstance(vector_type, pa.FixedSizeListType)
    assert (vector_type.list_size, vector_type.value_type) == (DIM, pa.float32())


def test_read_vectors_returns_rows_in_request_order_and_flags_misses(tmp_path):
    first, second = _vectors(3, 1), _vectors(2, 2)
    _write(tmp_path, ["a", "b", "c"], ["ha", "hb", "hc"], first)
    _write(tmp_path, ["d", "e"], ["hd", "he"], second)
    wanted = pl.DataFrame({"item_id": ["e", "a", "b", "zz"], "text_hash": ["he", "ha", "stale", "hz"]})
    matrix, found = store.read_vectors(tmp_path, "item_id", wanted)
    assert found.tolist() == [True, True, False, False]
    np.testing.assert_array_equal(matrix[0], second[1])
    np.testing.assert_array_equal(matrix[1], first[0])
    assert not matrix[2:].any()


def test_read_vectors_filters_by_model(tmp_path):
    _write(tmp_path, ["a"], ["ha"], _vectors(1, 3), model="old")
    _, found = store.read_vectors(tmp_path, "item_id", pl.DataFrame({"item_id": ["a"], "text_hash": ["ha"]}), "new")
    assert not found.any()


def test_compaction_drops_stale_rows_and_merges_small_files_without_losing_live_ones(tmp_path):
    vectors = _vectors(6, 4)
    _write(tmp_path, ["a", "b", "c"], ["ha", "hb", "hc"], vectors[:3])
    _write(tmp_path, ["b", "d"], ["hb2", "hd"], vectors[3:5])  # b changed text
    _write(tmp_path, ["e"], ["he"], vectors[5:])
    live = pl.DataFrame({"item_id": ["a", "b", "c", "d"], "text_hash": ["ha", "hb2", "hc", "hd"]})  # e left
    stats = store.compact(tmp_path, "item_id", live, rows_per_file=100)
    assert stats == {"files_rewritten": 3, "rows_dropped": 2}
    assert len(store.part_files(tmp_path)) == 1
    index = store.read_index(tmp_path, "item_id")
    assert sorted(index["item_id"].to_list()) == ["a", "b", "c", "d"]
    matrix, found = store.read_vectors(tmp_path, "item_id", live)
    assert found.all()
    np.testing.assert_array_equal(matrix, vectors[[0, 3, 2, 4]])


def test_compaction_leaves_a_single_live_file_alone(tmp_path):
    path = _write(tmp_path, ["a"], ["ha"], _vectors(1, 5))
    live = pl.DataFrame({"item_id": ["a"], "text_hash": ["ha"]})
    assert store.compact(tmp_path, "item_id", live, rows_per_file=100)["files_rewritten"] == 0
    assert store.part_files(tmp_path) == [path]


def test_text_hash_depends_on_salt_and_text():
    assert store.text_hash("x", "t1") != store.text_hash("x", "t2")
    assert store.text_hash("x", "t1") != store.text_hash("y", "t1")
    assert store.text_hash("x", "t1") == store.text_hash("x", "t1")


def test_encoder_folders_are_distinct_and_stay_inside_the_root(tmp_path):
    a = store.encoder_folder(tmp_path, "org/model|float32|max_length=128")
    b = store.encoder_folder(tmp_path, "org/model|int8|max_length=128")
    evil = store.encoder_folder(tmp_path, "../../etc/passwd")
    assert a != b
    assert {a.parent, b.parent, evil.parent} == {tmp_path}


def test_vectors_table_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="do not match"):
        store.vectors_table("item_id", "m", ["a", "b"], ["h"], _vectors(2, 6))
