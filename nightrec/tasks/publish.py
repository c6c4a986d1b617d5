"""Every known user's top-k from the index, seen and excluded items removed, with reasons; and the list checker.

Seen items are removed *before* cutting to k: the index is queried deeper than k (k + the items a user has seen +
excluded items), and users still short of k after filtering are queried again deeper, so nobody gets fewer than k
items while the catalogue has k items left for them.

Reasons: for each recommended item, the user's history items (the newest ``reason_history``) that add the most to
its score, by the model's own attribution (:mod:`nightrec.model.reasons`: each history item's additive part of the
score); the weight is that part's share of the history's total attribution to the item (sum of |parts| = 1), so
weights spread and sum to at most 1 per item. Vectors without a reason space (saved before it existed) fall back to
cosine similarity in the served item space. A reason gets a short phrase from item data where the catalogue has it
(shared genres, the same series). Users without history get lists without reasons.

Memory is bounded by one batch of ``batch_users`` users (plus the history index, a few bytes per event).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from nightrec.model.reasons import ReasonSpace
from nightrec.shards import shard_bounds
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
    progress=None,
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
    attribution = _attribution(vectors)
    phrases = ReasonPhrases.from_items(items, vectors.item_ids)
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
            _reasons(attribution, rec_vec, seen_offsets, seen_vec, n_reasons, reason_history),
            phrases,
            run_date,
            version,
        )
        if progress is not None:  # a nightrec.logs.Progress counting users
            progress.update(stop - start)


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


def _attribution(vectors: ServedVectors):
    """``f(recs (B, k), hist (B, L) newest first, full history lengths (B,)) -> (B, k, L)`` reason scores and whether
    they are additive parts of the score (the model's reason space) or cosine similarities (the fallback)."""
    space = ReasonSpace.from_arrays(vectors.extra, vectors.meta.get("reason_space"))
    if space is not None:
        return space.contributions, True
    # the folded bias column is left out (a bias is not a likeness)
    matrix = vectors.item_matrix[:, :-1] if vectors.meta.get("bias_folded") else vectors.item_matrix
    unit = (matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def cosine(recs: np.ndarray, hist: np.ndarray, _lengths: np.ndarray) -> np.ndarray:
        return np.einsum("bkd,bld->bkl", unit[np.maximum(recs, 0)], unit[np.maximum(hist, 0)])

    return cosine, False


def _titles(items: pl.DataFrame, item_ids: list[str]) -> pa.Array:
    """Each item's catalogue title; an item the catalogue lacks (it lags the logs) is titled by its id."""
    lookup = pl.DataFrame({"item_id": item_ids}).join(
        items.select("item_id", "title").unique("item_id", keep="last"), on="item_id", how="left", maintain_order="left"
    )
    return lookup.select(pl.col("title").fill_null(pl.col("item_id")))["title"].to_arrow().cast(pa.string())


def _reasons(
    attribution,
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
        return _reasons_chunked(torch, attribution, rec_vec, seen_offsets, seen_vec, n_reasons, reason_history)
    finally:
        torch.set_num_threads(threads)


def _reasons_chunked(torch, attribution, rec_vec, seen_offsets, seen_vec, n_reasons, reason_history):
    score_reasons, additive = attribution
    n, k = rec_vec.shape
    full = np.diff(seen_offsets)
    lengths = np.minimum(full, reason_history)
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
        sims = torch.from_numpy(np.ascontiguousarray(score_reasons(rec_vec[users], hist, full[users]), np.float32))
        padding = (hist_t < 0)[:, None, :]
        if additive:  # each part as a share of the history's whole attribution to the item
            total = sims.abs().masked_fill(padding, 0.0).sum(2, keepdim=True).clamp(min=1e-12)
            sims = sims / total
        sims.masked_fill_(padding, -torch.inf)
        take = min(n_reasons, width)
        # torch's topk is several times faster than argpartition
        top_sims, top = torch.topk(sims, take, dim=2)  # sorted; equal values keep the lower (newer) slot
        chosen = torch.gather(hist_t[:, None, :].expand(-1, recs.shape[1], -1), 2, top)
        valid = (chosen >= 0) & (recs[:, :, None] >= 0)  # padding slots hold -1 (and -inf)
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
    phrases: ReasonPhrases,
    run_date: dt.date,
    version: str,
) -> pa.RecordBatch:
    valid = rec_vec >= 0  # kept items come first in each row, so the valid cells are a prefix
    users = np.nonzero(valid)[0]
    ranks = np.nonzero(valid)[1] + 1
    reason_counts, reason_rows, reason_weights = reasons
    per_row = reason_counts[valid]
    offsets = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int32)
    reason_for = np.repeat(rec_vec[valid], per_row)  # the recommended item each reason explains
    reason_struct = pa.StructArray.from_arrays(
        [
            item_id_arr.take(pa.array(reason_rows)),
            titles.take(pa.array(reason_rows)),
            pa.array(reason_weights),
            phrases.between(reason_for, reason_rows),
        ],
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


@dataclass
class ReasonPhrases:
    """A short phrase per (recommended item, reason item) from catalogue data alone: "same series" when their titles
    share a series stem, else the genres they share ("both Comedy & Romance"), else none. Genres are bit masks (the
    64 most frequent genres), so a night's millions of reasons are phrased with array operations."""

    genre_names: list[str]
    genre_masks: np.ndarray  # (n_items,) uint64
    series: np.ndarray  # (n_items,) int64 series id, -1 = none

    @classmethod
    def from_items(cls, items: pl.DataFrame, item_ids: list[str]) -> ReasonPhrases:
        if "genres" not in items.columns:  # a catalogue without genres: series phrases only
            items = items.with_columns(pl.lit(None, pl.List(pl.String)).alias("genres"))
        lookup = pl.DataFrame({"item_id": item_ids}).join(
            items.select("item_id", "title", "genres").unique("item_id", keep="last"),
            on="item_id",
            how="left",
            maintain_order="left",
        )
        genres = [g or [] for g in lookup["genres"].to_list()]
        counts: dict[str, int] = {}
        for listed in genres:
            for g in listed:
                counts[g] = counts.get(g, 0) + 1
        names = sorted(counts, key=lambda g: (-counts[g], g))[:64]
        bit = {g: np.uint64(1) << np.uint64(b) for b, g in enumerate(names)}
        masks = np.zeros(len(item_ids), np.uint64)
        for row, listed in enumerate(genres):
            for g in listed:
                if g in bit:
                    masks[row] |= bit[g]
        stems = [series_stem(t) for t in lookup["title"].to_list()]
        tally: dict[str, int] = {}
        for st in stems:
            if st:
                tally[st] = tally.get(st, 0) + 1
        ids: dict[str, int] = {}
        series = np.full(len(item_ids), -1, np.int64)
        for row, st in enumerate(stems):
            if st and tally[st] > 1:  # a series needs two items
                series[row] = ids.setdefault(st, len(ids))
        return cls(names, masks, series)

    def between(self, recommended: np.ndarray, reasons: np.ndarray) -> pa.Array:
        if len(reasons) == 0:
            return pa.array([], pa.string())
        recommended, reasons = np.asarray(recommended), np.asarray(reasons)
        same = (self.series[recommended] >= 0) & (self.series[recommended] == self.series[reasons])
        common = self.genre_masks[recommended] & self.genre_masks[reasons]
        values, inverse = np.unique(common, return_inverse=True)
        text = np.array([self._genres_phrase(int(v)) for v in values], dtype=object)[inverse]
        text[same] = "same series"
        return pa.array(text.tolist(), pa.string())

    def _genres_phrase(self, mask: int) -> str | None:
        names = [g for b, g in enumerate(self.genre_names) if mask >> b & 1]
        return "both " + " & ".join(names[:2]) if names else None


_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
_SEQUEL = re.compile(r"(\s*[:\-,]\s*|\s+)(part\s+)?([0-9]+|i{1,3}|iv|v|vi{0,3})$")


def series_stem(title: str | None) -> str | None:
    """A title's series key: lower case, the year, a sequel number ("2", "III", "Part 2") and any subtitle after
    ":" removed; None when too short to mean anything."""
    if not title:
        return None
    stem = _YEAR.sub("", title.strip().lower())
    stem = stem.split(":")[0].strip()
    stem = _SEQUEL.sub("", stem).strip()
    return stem if len(stem) >= 4 else None


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
    stats: dict = field(default_factory=dict)  # what the lists hold (ListStats.summary): coverage, reason weights

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
    stats = ListStats()
    in_range_of = lists if callable(lists) else _table_ranges(lists)
    users = sorted(set(user_ids))
    cite = None if explainable is None else pl.DataFrame({"item_id": list(explainable)}, schema={"item_id": pl.String})
    bounds = [None, *users[chunk_users::chunk_users], None]  # lo inclusive, hi exclusive; the ends are open
    for chunk, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        rows = pl.from_arrow(in_range_of(lo, hi).select(_CHECKED))
        mine = users[chunk * chunk_users : (chunk + 1) * chunk_users]
        stats.add(rows)
        _check_chunk(found, unexplained, rows, history.filter(_user_range(lo, hi)), mine, k, catalogue, cite)
    count, examples = unexplained.get(_UNEXPLAINED, (0, []))
    problems = [f"{n} {what}, e.g. {ex}" for what, (n, ex) in found.items()]
    if users and count / len(users) > max_unexplained_share:
        problems.append(
            f"{count} of {len(users)} users ({count / len(users):.1%}) have history but none of it is an item the "
            f"model can explain, so their lists have no reasons: above max_unexplained_share="
            f"{max_unexplained_share:g} (NIGHTREC_MAX_UNEXPLAINED_SHARE), e.g. {examples}"
        )
    return ListsCheck(problems, len(users), count, examples, stats.summary(len(catalogue) if catalogue else None))


@dataclass
class ListStats:
    """What a night's lists hold, gathered chunk by chunk (memory: one count per item, a fixed histogram): how many
    distinct items they cover, how concentrated they are on one item, how the top reason's weight spreads, and how
    many reasons carry a phrase."""

    item_counts: dict = field(default_factory=dict)
    lists: int = 0
    weight_hist: np.ndarray = field(default_factory=lambda: np.zeros(WEIGHT_BINS, np.int64))
    reasons: int = 0
    phrased: int = 0

    def add(self, rows: pl.DataFrame) -> None:
        if rows.height == 0:
            return
        for item, n in rows.group_by("item_id").len().iter_rows():
            self.item_counts[item] = self.item_counts.get(item, 0) + n
        self.lists += rows["user_id"].n_unique()
        top = rows.select(pl.col("reasons").list.first().struct.field("weight")).drop_nulls().to_series().to_numpy()
        self.weight_hist += np.histogram(np.clip(top, -1, 1), bins=WEIGHT_BINS, range=(-1.0, 1.0))[0]
        flat = rows.select(pl.col("reasons").explode()).drop_nulls()
        self.reasons += flat.height
        if flat.height and "phrase" in flat.schema["reasons"].to_schema():
            self.phrased += flat.select(pl.col("reasons").struct.field("phrase").is_not_null().sum()).item()

    def summary(self, catalogue_size: int | None) -> dict:
        out: dict = {"list_items_distinct": len(self.item_counts)}
        if catalogue_size:
            out["list_coverage"] = len(self.item_counts) / catalogue_size
        if self.lists:
            out["list_top_item_share"] = max(self.item_counts.values(), default=0) / self.lists
        total = int(self.weight_hist.sum())
        if total:
            cdf = np.cumsum(self.weight_hist) / total
            upper_edges = np.linspace(-1, 1, WEIGHT_BINS + 1)[1:]  # a quantile to within one bin (0.05)
            for q in (10, 50, 90):
                out[f"reason_weight_p{q}"] = float(upper_edges[np.searchsorted(cdf, q / 100)])
        if self.reasons:
            out["reason_phrase_share"] = self.phrased / self.reasons
        return out


WEIGHT_BINS = 40


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
