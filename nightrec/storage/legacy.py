"""Migration of a lake written in the old Parquet layout (before Delta tables) into the Delta tables.

The old layout (nightrec up to commit 2f074c6): ``events/date=D/part-0.parquet`` (+ ``_manifest.json``),
``quarantine/date=D/part-*.parquet``, ``items/items.parquet``, ``users/users.parquet``,
``recommendations/date=D/part-0.parquet`` (+ ``_manifest.json`` with the MLflow run) and ``recommendations/LATEST``.

The first :class:`~nightrec.storage.lake.Lake` opened on such a folder converts it, table by table, holding an
``flock`` on the lake folder: the old folder is first renamed to ``.legacy-parquet/<table>`` (one rename, so the
new table's folder starts empty), its rows are committed into the Delta table, and a ``<table>.migrated`` marker is
written last. A crash in between is finished by the next open (the half-built Delta table is rebuilt from the kept
old files). The old files stay under ``.legacy-parquet/`` (nothing stored is lost); delete that folder once happy.
The embedding cache keeps its layout and is not touched.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
import os
import re
import shutil
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

log = logging.getLogger("nightrec.migration")

LEGACY_DIR = ".legacy-parquet"
TABLES = ("events", "quarantine", "items", "users", "recommendations")
_DATE_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")


def _is_old(folder: Path) -> bool:
    """A folder of the old layout: it exists, holds Parquet files, and is not a Delta table."""
    if not folder.is_dir() or (folder / "_delta_log").exists():
        return False
    return any(folder.rglob("*.parquet")) or (folder / "LATEST").exists()


def _pending(root: Path) -> list[str]:
    legacy = root / LEGACY_DIR
    names = []
    for name in TABLES:
        half_done = (legacy / name).is_dir() and not (legacy / f"{name}.migrated").exists()
        if _is_old(root / name) or half_done:
            names.append(name)
    return names


def needs_migration(root: Path) -> bool:
    return bool(_pending(Path(root)))


def migrate_if_needed(lake) -> list[str]:
    """Convert every old-layout table of the local ``lake``; returns the tables converted (empty: nothing to do)."""
    root = Path(lake.local_dir)
    if not root.is_dir() or not _pending(root):
        return []
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # one migrator; writers of this lake wait on the same folder's lock
        done = []
        for name in _pending(root):  # again, under the lock: another process may have finished it
            _migrate_table(lake, root, name)
            done.append(name)
        return done
    finally:
        os.close(fd)


def _migrate_table(lake, root: Path, name: str) -> None:
    from nightrec.storage.lake import Lake

    legacy = root / LEGACY_DIR
    legacy.mkdir(exist_ok=True)
    old = legacy / name
    if not old.exists():
        os.rename(root / name, old)
    elif (root / name).exists():
        shutil.rmtree(root / name)  # a half-built Delta table of a killed migration: rebuilt from ``old``
    target = Lake(root, migrate=False)
    rows = _CONVERTERS[name](target, old)
    (legacy / f"{name}.migrated").write_text(json.dumps({"rows": rows, "at": dt.datetime.now(dt.UTC).isoformat()}))
    log.warning("migrated lake table %s from the old Parquet layout (%d rows); old files kept in %s", name, rows, old)


def _dates(folder: Path) -> list[tuple[dt.date, Path]]:
    found = []
    for child in folder.iterdir() if folder.exists() else []:
        match = _DATE_DIR.match(child.name)
        if match and child.is_dir():
            found.append((dt.date.fromisoformat(match.group(1)), child))
    return sorted(found)


def _events(lake, old: Path) -> int:
    total = 0

    def days():
        nonlocal total
        for day, folder in _dates(old):
            frame = pl.read_parquet(folder / "part-0.parquet")
            total += frame.height
            yield day, frame

    lake.write_events_days(days())
    return total


def _quarantine(lake, old: Path) -> int:
    total = 0
    for day, folder in _dates(old):
        for path in sorted(folder.glob("*.parquet")):
            frame = pl.read_parquet(path)
            lake.append_quarantine(day, frame, path.stem)
            total += frame.height
    return total


def _items(lake, old: Path) -> int:
    path = old / "items.parquet"
    if not path.exists():
        return 0
    frame = pl.read_parquet(path)
    lake.upsert_items(frame)
    return frame.height


def _users(lake, old: Path) -> int:
    path = old / "users.parquet"
    if not path.exists():
        return 0
    frame = pl.read_parquet(path)
    lake.write_users(frame)
    return frame.height


def _recommendations(lake, old: Path) -> int:
    from nightrec.storage import publication

    total = 0
    for day, folder in _dates(old):  # oldest first: the newest old date ends up the newest run date, as LATEST had it
        path = folder / "part-0.parquet"
        if not path.exists():
            continue
        manifest_path = folder / "_manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        pointer = {"mlflow_run_id": manifest.get("mlflow_run_id", ""), "model_version": manifest.get("model_version")}
        stats = publication.publish(lake, day, pq.ParquetFile(path).iter_batches(batch_size=65_536), pointer)
        total += stats["rows"]
    return total


_CONVERTERS = {
    "events": _events,
    "quarantine": _quarantine,
    "items": _items,
    "users": _users,
    "recommendations": _recommendations,
}
