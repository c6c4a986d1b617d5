"""A tiny lake in the old Parquet layout (nightrec up to commit 2f074c6, before the Delta tables), written the way that
code's writers wrote it: the same folders, file names, schemas, compression, manifests and ``LATEST`` pointer.

Kept as a generator rather than as data; the migration test builds a home with it and opens it with today's code.
``python -m tests.storage.old_layout FOLDER`` writes one for a look.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nightrec.storage.schemas import EVENTS, ITEMS, RECOMMENDATIONS

DAYS = [dt.date(2026, 2, 27), dt.date(2026, 2, 28)]
RUN_DATES = [dt.date(2026, 3, 1), dt.date(2026, 3, 2)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(path: Path, **extra) -> dict:
    # storage/lake.py file_manifest() of the old code: rows from the footer, bytes, sha256; publication adds more.
    return {
        **extra,
        "file": path.name,
        "rows": pq.read_metadata(path).num_rows,
        "bytes": path.stat().st_size,
        "sha256": _sha256(path),
    }


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")


def events_of(day: dt.date) -> pa.Table:
    start = dt.datetime.combine(day, dt.time(9), tzinfo=dt.UTC)
    users = ["u1", "u2", "u3"] if day == DAYS[0] else ["u1", "u4"]
    return pa.table(
        {
            "user_id": users,
            "item_id": [f"i{n}" for n in range(len(users))],
            "timestamp": [start + dt.timedelta(minutes=n) for n in range(len(users))],
            "event_type": ["view"] * len(users),
            "value": [None] * len(users),
        },
        schema=EVENTS,
    )


def lists_of(day: dt.date, version: str) -> pa.Table:
    rows = [(u, r) for u in ("u1", "u2", "u3", "u4") for r in (1, 2)]
    return pa.Table.from_pylist(
        [
            {
                "user_id": u,
                "rank": r,
                "item_id": f"i{r + 5}",
                "score": 1.0 / r,
                "reasons": [{"item_id": "i0", "title": "Item 0", "weight": 0.5, "phrase": None}],
                "run_date": day,
                "model_version": version,
            }
            for u, r in rows
        ],
        schema=RECOMMENDATIONS,
    )


def write_old_lake(lake: Path) -> dict:
    """Write the old layout under ``lake``; returns what a reader must find after the migration."""
    for day in DAYS:  # lake.py write_events_partition: part-0.parquet + _manifest.json per day
        folder = lake / "events" / f"date={day.isoformat()}"
        _write(events_of(day), folder / "part-0.parquet")
        (folder / "_manifest.json").write_text(json.dumps(_manifest(folder / "part-0.parquet"), indent=2) + "\n")
    # lake.py append_quarantine: one file per batch, every column as text plus reason and source_file
    quarantine = pa.table(
        {
            "user_id": ["u9"],
            "item_id": ["i9"],
            "timestamp": ["not a time"],
            "reason": ["unparseable timestamp"],
            "source_file": ["/data/events-1.csv"],
        }
    )
    _write(quarantine, lake / "quarantine" / f"date={DAYS[0].isoformat()}" / "part-events-0a1b2c3d.parquet")
    items = pa.table(
        {
            "item_id": [f"i{n}" for n in range(8)],
            "title": [f"Item {n}" for n in range(8)],
            "description": [None] * 8,
            "genres": [["Drama"]] * 8,
            "updated_at": [None] * 8,
            "available": [True] * 8,
        },
        schema=ITEMS,
    )
    _write(items, lake / "items" / "items.parquet")
    _write(pa.table({"user_id": ["u1", "u2"], "age": ["31", "47"]}), lake / "users" / "users.parquet")
    for n, day in enumerate(RUN_DATES, start=1):  # publication.py: part-0.parquet + a manifest with the provenance
        folder = lake / "recommendations" / f"date={day.isoformat()}"
        _write(lists_of(day, str(n)), folder / "part-0.parquet")
        manifest = _manifest(
            folder / "part-0.parquet", mlflow_run_id=f"run-{n}", model_version=str(n), users=4, run_date=day.isoformat()
        )
        (folder / "_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    latest = {"date": RUN_DATES[-1].isoformat(), "mlflow_run_id": f"run-{len(RUN_DATES)}", "model_version": "2"}
    (lake / "recommendations" / "LATEST").write_text(json.dumps(latest, indent=2, sort_keys=True) + "\n")
    (lake / "embeddings" / "items").mkdir(parents=True)  # the cache keeps its layout: must be left alone
    (lake / "embeddings" / "items" / "keep.txt").write_text("cache")
    return {"events": 5, "quarantine": 1, "items": 8, "users": 2, "latest": latest}


if __name__ == "__main__":
    print(write_old_lake(Path(sys.argv[1])))
