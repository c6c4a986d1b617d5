"""Contiguous shards of a row range: how the scale-out splits items and users between parallel tasks."""

from __future__ import annotations


def shard_bounds(rows: int, shard: int, shards: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``shard`` (0-based) out of ``shards`` over ``rows`` rows.

    Shards are contiguous, cover every row exactly once and differ in size by at most one row; with ``shards=1``
    the one shard is the whole range.
    """
    if shards < 1 or not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards} is not a valid shard")
    return rows * shard // shards, rows * (shard + 1) // shards
