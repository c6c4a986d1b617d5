"""Every known user's top-k from the index, seen and excluded items removed, with reasons; and the list checker.

Seen items are removed *before* cutting to k: the index is queried deeper than k (k + the items a user has seen +
excluded items), and users still short of k after filtering are queried again deeper, so nobody gets fewer than k
items while the catalogue has k items left for them.

Reasons: for each recommended item, the user's history items (the newest ``reason_history``) closest to it in the
served item space, weighted by cosine similarity. The model builds a user's vector by pooling the vectors of their
history items and stepping towards them, so the history items nearest to a recommended item are the ones that pull
its score up; the weight says how strongly. Users without history get lists without reasons.

Memory is bounded by one batch of ``batch_users`` users (plus the history index, a few bytes per event).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from nightrec.shards import shard_bounds
from nightrec.storage import atomic
from nightrec.storage.schemas import RECOMMENDATIONS
from nightrec.storage.vectors import ServedVectors
from nightrec.tasks.index import ItemIndex, load_index

REASON_CHUNK = 512  # users per reasons matmul: (chunk, k, history) floats stay small


def history_before(history: pl.DataFrame, run_date: dt.date) -> pl.DataFrame:
    """Events strictly before the run date (a list for D uses every event before D, and nothing from D on)."""
    start = dt.datetime.combine(run_date, dt.time(), tzinfo=dt.UTC)
    column = history.schema["timestamp"]
    if isinstance(column, pl.Datetime) and column.time_zone is None:
        start = start.replace(tzinfo=None)
    return history.filter(pl.col("timestamp") < start)


def user_histories(history: pl.DataFrame, user_ids: list[str], item_ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets, item rows) of each user's distinct known items, oldest first (newest occurrence counts)."""
    users = pl.DataFrame({"user_id": user_ids, "u": np.arange(len(user_ids), dtype=np.int64)})
    items = pl.DataFrame({"item_id": item_ids, "i": np.arange(len(item_ids), dtype=np.int64)})
    frame = (
        history.select("user_id", "item_id", "timestamp")
        .join(users, on="user_id", how="inner")
        .join(items, on="item_id", how="inner")
        .sort(["u", "timestamp", "i"])
        .unique(["u", "i"], keep="last", maintain_order=True)
    )
    u = frame["u"].to_numpy()
    offsets = np.searchsorted(u, np.arange(len(user_ids) + 1)).astype(np.int64)
    return offsets, frame["i"].to_numpy().astype(np.int64)


def build_lists(
    vectors: ServedVectors,
    index_folder: Path,
    history: pl.DataFrame,
    items: pl.DataFrame,
    *,
    k: int,
    run_date: dt.date,
    model_version: str,
    exclude_items: set[str] | None = None,
    batch_users: int = 4096,
    n_reasons: int = 3,
    reason_history: int = 256,
    shard: int = 0,
    shards: int = 1,
) -> Iterator[pa.RecordBatch]:
    """Record batches in the RECOMMENDATIONS schema: for every user of ``vectors``, up to k items, rank 1 first.

    With ``shards`` > 1, only the users (rows of ``vectors``) of range ``shard``, so ranges can run in parallel.
    """
    item_index = load_index(index_folder)
    vec_row = {item: i for i, item in enumerate(vectors.item_ids)}
    missing = [item for item in item_index.item_ids if item not in vec_row]
    if missing:
        raise ValueError(f"index {index_folder} has {len(missing)} items the served vectors lack, e.g. {missing[:3]}")
    index_to_vec = np.fromiter((vec_row[item] for item in item_index.item_ids), np.int64, len(item_index.item_ids))
    vec_to_index = np.full(len(vectors.item_ids), -1, np.int64)
    vec_to_index[index_to_vec] = np.arange(len(index_to_vec))
    banned = np.zeros(item_index.ntotal, dtype=bool)
    if exclude_items:
        banned[[i for i, item in enumerate(item_index.item_ids) if item in exclude_items]] = True

    offsets, hist_rows = user_histories(history_before(history, run_date), vectors.user_ids, vectors.item_ids)
    unit = _reason_space(vectors)
    titles = _titles(items, vectors.item_ids)
    item_id_arr = pa.array(vectors.item_ids, pa.string())
    user_id_arr = pa.array(vectors.user_ids, pa.string())
    version = str(model_version)

    first, last = shard_bounds(len(vectors.user_ids), shard, shards)
    for start in range(first, last, batch_users):
        stop = min(start + batch_users, last)
        seen_offsets = offsets[start : stop + 1] - offsets[start]
        seen_vec = hist_rows[offsets[start] : offsets[stop]]
        seen_index = vec_to_index[seen_vec]  # -1 for items outside the index (never returned anyway)
        rows, scores, counts = top_k_unseen(
            item_index, vectors.user_matrix[start:stop], seen_offsets, seen_index, banned, k
        )
        rec_vec = np.where(rows >= 0, index_to_vec[np.maximum(rows, 0)], -1)
        yield _batch(
            user_id_arr,
            item_id_arr,
            titles,
            start,
            rec_vec,
            scores,
            counts,
            _reasons(unit, rec_vec, seen_offsets, seen_vec, n_reasons, reason_history),
            run_date,
            version,
        )


def write_list_part(batches: Iterable[pa.RecordBatch], path: Path) -> int:
    """One user range's lists as a Parquet file (written whole or not at all); returns its row count.

    A parallel publish writes one such part per range, then streams them in order into one atomic publication.
    """
    rows = 0
    with atomic.staged_path(path) as tmp, pq.ParquetWriter(tmp, RECOMMENDATIONS, compression="zstd") as writer:
        for batch in batches:
            writer.write_batch(batch.select(RECOMMENDATIONS.names).cast(RECOMMENDATIONS))
            rows += batch.num_rows
    return rows


def read_list_parts(paths: Iterable[Path]) -> Iterator[pa.RecordBatch]:
    """The record batches of list parts, file after file: memory stays bounded by one batch."""
    for path in paths:
        yield from pq.ParquetFile(path).iter_batches(batch_size=65_536)


def top_k_unseen(
    item_index: ItemIndex,
    queries: np.ndarray,
    seen_offsets: np.ndarray,
    seen_rows: np.ndarray,
    banned: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, scores, counts): each query's best k index rows that are neither seen nor banned, best first.

    Queries ``k + banned + seen`` deep (a typical user's seen count for the whole batch first, then each user still
    short of k again with their own depth, doubling where an approximate index returns fewer).
    """
    n = len(queries)
    seen_counts = np.diff(seen_offsets)
    n_banned = int(banned.sum())
    owner = np.repeat(np.arange(n, dtype=np.int64), seen_counts)
    in_index = seen_rows >= 0
    seen_keys = np.unique(owner[in_index] * item_index.ntotal + seen_rows[in_index])
    typical = int(np.percentile(seen_counts, 90)) if n else 0
    out_rows = np.full((n, k), -1, np.int64)
    out_scores = np.full((n, k), -np.inf, np.float32)
    counts = np.zeros(n, np.int64)
    todo = np.arange(n)
    depth = np.minimum(item_index.ntotal, k + n_banned + typical)
    while len(todo):
        scores, rows = item_index.search(queries[todo], int(depth))
        keys = todo[:, None] * item_index.ntotal + rows
        pos = np.searchsorted(seen_keys, keys)
        is_seen = (
            seen_keys[np.minimum(pos, len(seen_keys) - 1)] == keys if len(seen_keys) else np.zeros_like(keys, bool)
        )
        keep = (rows >= 0) & ~is_seen & ~banned[np.maximum(rows, 0)]
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept first, search order preserved
        got = np.take_along_axis(keep, order, axis=1)
        width = order.shape[1]  # < k only when the whole catalogue is smaller than k
        out_rows[todo, :width] = np.where(got, np.take_along_axis(rows, order, axis=1), -1)
        out_scores[todo, :width] = np.where(got, np.take_along_axis(scores, order, axis=1), -np.inf)
        counts[todo] = got.sum(axis=1)
        if depth >= item_index.ntotal:
            break
        short = counts[todo] < k
        todo = todo[short]
        need = k + n_banned + seen_counts[todo]
        depth = int(min(item_index.ntotal, max(int(need.max(initial=0)), 2 * int(depth))))
    return out_rows, out_scores, counts


def _reason_space(vectors: ServedVectors) -> np.ndarray:
    """Unit-length item vectors for reasons; the folded bias column is left out (a bias is not a likeness)."""
    matrix = vectors.item_matrix[:, :-1] if vectors.meta.get("bias_folded") else vectors.item_matrix
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.maximum(norms, 1e-12)).astype(np.float32)


def _titles(items: pl.DataFrame, item_ids: list[str]) -> pa.Array:
    """Each item's catalogue title; an item the catalogue lacks (it lags the logs) is titled by its id."""
    lookup = pl.DataFrame({"item_id": item_ids}).join(
        items.select("item_id", "title").unique("item_id", keep="last"), on="item_id", how="left", maintain_order="left"
    )
    return lookup.select(pl.col("title").fill_null(pl.col("item_id")))["title"].to_arrow().cast(pa.string())


def _reasons(
    unit: np.ndarray,
    rec_vec: np.ndarray,
    seen_offsets: np.ndarray,
    seen_vec: np.ndarray,
    n_reasons: int,
    reason_history: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-row reason counts, flat history item rows, flat weights) for each (user, rank) of ``rec_vec``.

    Users are processed in chunks of similar history length, so one long history does not pad a whole chunk.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ops here are small: with FAISS's OpenMP pool beside torch's, threads only spin
    try:
        return _reasons_torch(torch, unit, rec_vec, seen_offsets, seen_vec, n_reasons, reason_history)
    finally:
        torch.set_num_threads(threads)


def _reasons_torch(torch, unit, rec_vec, seen_offsets, seen_vec, n_reasons, reason_history):
    n, k = rec_vec.shape
    unit_t = torch.from_numpy(unit)
    lengths = np.minimum(np.diff(seen_offsets), reason_history)
    rows = np.full((n, k, n_reasons), -1, np.int64)
    weights = np.zeros((n, k, n_reasons), np.float32)
    by_length = np.argsort(lengths, kind="stable")
    for lo in range(0, n, REASON_CHUNK):
        users = by_length[lo : lo + REASON_CHUNK]
        width = int(lengths[users].max(initial=0))
        if width == 0:
            continue
        hist = np.full((len(users), width), -1, np.int64)
        for j, user in enumerate(users):
            newest = seen_vec[seen_offsets[user + 1] - lengths[user] : seen_offsets[user + 1]]
            hist[j, : len(newest)] = newest[::-1]  # newest first: ties go to the most recent
        recs = torch.from_numpy(rec_vec[users])
        hist_t = torch.from_numpy(hist)
        # torch for the batched matmul and top-n: multi-threaded, and topk is several times faster than argpartition
        sims = torch.bmm(unit_t[recs.clamp(min=0)], unit_t[hist_t.clamp(min=0)].transpose(1, 2))
        sims.masked_fill_((hist_t < 0)[:, None, :], -torch.inf)
        take = min(n_reasons, width)
        top_sims, top = torch.topk(sims, take, dim=2)  # sorted; equal similarities keep the lower (newer) slot
        chosen = torch.gather(hist_t[:, None, :].expand(-1, recs.shape[1], -1), 2, top)
        valid = (chosen >= 0) & (recs[:, :, None] >= 0)  # padding slots hold -1 (and -inf similarity)
        rows[users, :, :take] = torch.where(valid, chosen, -1).numpy()
        weights[users, :, :take] = torch.where(valid, top_sims, 0.0).numpy()
    present = rows >= 0  # valid reasons come first along the last axis
    return present.sum(axis=2), rows[present], weights[present]


def _batch(
    user_id_arr: pa.Array,
    item_id_arr: pa.Array,
    titles: pa.Array,
    start: int,
    rec_vec: np.ndarray,
    scores: np.ndarray,
    counts: np.ndarray,
    reasons: tuple[np.ndarray, np.ndarray, np.ndarray],
    run_date: dt.date,
    version: str,
) -> pa.RecordBatch:
    valid = rec_vec >= 0  # kept items come first in each row, so the valid cells are a prefix
    users = np.nonzero(valid)[0]
    ranks = np.nonzero(valid)[1] + 1
    reason_counts, reason_rows, reason_weights = reasons
    per_row = reason_counts[valid]
    offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    reason_struct = pa.StructArray.from_arrays(
        [item_id_arr.take(pa.array(reason_rows)), titles.take(pa.array(reason_rows)), pa.array(reason_weights)],
        fields=list(RECOMMENDATIONS.field("reasons").type.value_type),
    )
    n = len(users)
    return pa.RecordBatch.from_arrays(
        [
            user_id_arr.take(pa.array(users + start)),
            pa.array(ranks.astype(np.int32)),
            item_id_arr.take(pa.array(rec_vec[valid])),
            pa.array(scores[valid].astype(np.float32)),
            pa.ListArray.from_arrays(pa.array(offsets), reason_struct),
            pa.array(np.full(n, run_date), pa.date32()) if n else pa.array([], pa.date32()),
            pa.array([version] * n, pa.string()),
        ],
        schema=RECOMMENDATIONS,
    )


ListsInRange = Callable[[str | None, str | None], pa.Table]


@dataclass(frozen=True)
class ListsCheck:
    """What :func:`check_lists` found. ``problems`` mean the lists are wrong (empty = publishable);
    ``unexplained_users`` (with up to 3 examples) have history but none of it is an item the model can cite, so their
    lists carry no reasons: a per-user degradation, a problem only above ``max_unexplained_share`` of ``users``."""

    problems: list[str]
    users: int
    unexplained_users: int = 0
    unexplained_examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unexplained_share(self) -> float:
        return self.unexplained_users / self.users if self.users else 0.0


def check_lists(
    lists: pa.Table | ListsInRange,
    history: pl.DataFrame,
    user_ids: list[str],
    k: int,
    *,
    catalogue: list[str] | None = None,
    explainable: list[str] | None = None,
    max_unexplained_share: float = 0.05,
    chunk_users: int = 10_000,
) -> ListsCheck:
    """Problems with published lists (none = fine): every user present, ranks 1..k without gaps, no seen items, no
    duplicates, reasons present (for users with history the model can explain) and drawn from the user's history,
    scores non-increasing.

    Without ``catalogue`` every list must have exactly k items; with it (the recommendable items), exactly
    min(k, unseen catalogue items) and only catalogue items.

    ``explainable`` are the items reasons can cite (the served model's items; None = every item). A user whose
    history holds none of them (say every item they touched is newer than the served model) cannot get reasons: such
    users are counted, not failed, unless they are more than ``max_unexplained_share`` of the users. A user with an
    explainable history item and a row without reasons is a problem.

    Every check is about one user's rows, so users are checked ``chunk_users`` at a time (ranges of user ids): the
    joins and the exploded reasons hold one chunk, not the night (at 0.1x, 5M rows peaked at 7.4 GB checked whole,
    4.4 GB in chunks of 50,000 users and 1.75 GB in chunks of 10,000, which took 13 s in all). ``lists``
    is the table, or a function giving the rows of users ``lo <= user_id < hi`` (None = open end), such as
    :func:`nightrec.storage.publication.read_user_range`, so that the whole night is never in memory at once.
    """
    found: dict[str, tuple[int, list]] = {}
    unexplained: dict[str, tuple[int, list]] = {}
    in_range_of = lists if callable(lists) else _table_ranges(lists)
    users = sorted(set(user_ids))
    cite = None if explainable is None else pl.DataFrame({"item_id": list(explainable)}, schema={"item_id": pl.String})
    bounds = [None, *users[chunk_users::chunk_users], None]  # lo inclusive, hi exclusive; the ends are open
    for chunk, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        rows = pl.from_arrow(in_range_of(lo, hi).select(_CHECKED))
        mine = users[chunk * chunk_users : (chunk + 1) * chunk_users]
        _check_chunk(found, unexplained, rows, history.filter(_user_range(lo, hi)), mine, k, catalogue, cite)
    count, examples = unexplained.get(_UNEXPLAINED, (0, []))
    problems = [f"{n} {what}, e.g. {ex}" for what, (n, ex) in found.items()]
    if users and count / len(users) > max_unexplained_share:
        problems.append(
            f"{count} of {len(users)} users ({count / len(users):.1%}) have history but none of it is an item the "
            f"model can explain, so their lists have no reasons: above max_unexplained_share="
            f"{max_unexplained_share:g} (NIGHTREC_MAX_UNEXPLAINED_SHARE), e.g. {examples}"
        )
    return ListsCheck(problems, len(users), count, examples)


_UNEXPLAINED = "users with history but no explainable item"


_CHECKED = ["user_id", "rank", "item_id", "score", "reasons"]


def _user_range(lo: str | None, hi: str | None) -> pl.Expr:
    """``lo <= user_id < hi``; None leaves that end open."""
    expr = pl.lit(True)
    if lo is not None:
        expr = expr & (pl.col("user_id") >= lo)
    if hi is not None:
        expr = expr & (pl.col("user_id") < hi)
    return expr


def _table_ranges(table: pa.Table) -> ListsInRange:
    lists = pl.from_arrow(table.select(_CHECKED))
    return lambda lo, hi: lists.filter(_user_range(lo, hi)).to_arrow()


def _check_chunk(
    problems: dict,
    unexplained: dict,
    lists: pl.DataFrame,
    history: pl.DataFrame,
    user_ids: list[str],
    k: int,
    catalogue: list[str] | None,
    explainable: pl.DataFrame | None,
) -> None:
    seen = history.select("user_id", "item_id").unique()
    expected = pl.DataFrame({"user_id": list(user_ids)}).unique()

    missing = expected.join(lists.select("user_id").unique(), on="user_id", how="anti")
    _problem(problems, missing, "users without a list", "user_id")
    unknown = lists.select("user_id").unique().join(expected, on="user_id", how="anti")
    _problem(problems, unknown, "lists for users not in the known-user list", "user_id")

    shape = (
        lists.sort("user_id", "rank")
        .group_by("user_id")
        .agg(
            pl.len().alias("n"),
            (pl.col("rank") == pl.int_range(1, pl.len() + 1)).all().alias("ranks_ok"),
            (pl.col("score").diff().fill_null(0) <= 1e-6).all().alias("scores_ok"),
        )
    )
    _problem(problems, shape.filter(~pl.col("ranks_ok")), "lists whose ranks are not 1..n without gaps", "user_id")
    _problem(problems, shape.filter(~pl.col("scores_ok")), "lists whose scores increase with rank", "user_id")
    if catalogue is None:
        wrong = shape.filter(pl.col("n") != k)
    else:
        cat = pl.DataFrame({"item_id": list(catalogue)}).unique()
        unseen_left = (
            expected.join(seen.join(cat, on="item_id", how="semi"), on="user_id", how="left")
            .group_by("user_id")
            .agg(pl.col("item_id").drop_nulls().n_unique().alias("seen_n"))
            .with_columns(pl.min_horizontal(pl.lit(k), cat.height - pl.col("seen_n")).alias("want"))
        )
        wrong = shape.join(unseen_left, on="user_id", how="inner").filter(pl.col("n") != pl.col("want"))
        _problem(
            problems, lists.join(cat, on="item_id", how="anti"), "recommended items outside the catalogue", "item_id"
        )
    _problem(problems, wrong, f"lists without the expected length (k={k})", "user_id")

    dupes = lists.group_by("user_id", "item_id").len().filter(pl.col("len") > 1)
    _problem(problems, dupes, "duplicate (user, item) pairs", "user_id")
    _problem(
        problems, lists.join(seen, on=["user_id", "item_id"], how="semi"), "already-seen items recommended", "user_id"
    )

    historied = seen.select("user_id").unique()
    explained = historied if explainable is None else seen.join(explainable, on="item_id", how="semi")
    explained = explained.select("user_id").unique()
    _problem(
        problems,
        lists.join(explained, on="user_id", how="semi").filter(pl.col("reasons").list.len() == 0),
        "rows without reasons (user has history the model can explain)",
        "user_id",
    )
    _problem(
        unexplained,
        historied.join(expected, on="user_id", how="semi").join(explained, on="user_id", how="anti").sort("user_id"),
        _UNEXPLAINED,
        "user_id",
    )
    reasons = (
        lists.select("user_id", "reasons")
        .explode("reasons")
        .drop_nulls("reasons")
        .select("user_id", pl.col("reasons").struct.field("item_id").alias("item_id"))
    )
    _problem(
        problems,
        reasons.join(seen, on=["user_id", "item_id"], how="anti"),
        "reasons not from the user's history",
        "user_id",
    )


def _problem(found: dict, frame: pl.DataFrame, what: str, column: str) -> None:
    """Add ``frame``'s rows to the count of ``what`` (kept in first-found order), with up to 3 example values."""
    if frame.height:
        count, examples = found.get(what, (0, []))
        more = [v for v in frame[column].unique(maintain_order=True).head(3).to_list() if v not in examples]
        found[what] = (count + frame.height, (examples + more)[:3])
