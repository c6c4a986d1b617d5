"""Crash-safe file operations: a reader sees the old bytes or the new bytes, never a mix."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

_RENAME_EXCHANGE = 2  # linux/fs.h


def fsync_dir(path: Path) -> None:
    """Persist a directory entry change (a rename) so it survives power loss, not only a process crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def staged_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and ``os.replace`` it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (partitions can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: dict) -> None:
    with staged_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    """Write one Parquet file (zstd) so that ``path`` is replaced whole or not at all."""
    with staged_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def _renameat2_exchange(a: Path, b: Path) -> bool:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    at_fdcwd = -100
    rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def replace_dir(staged: Path, target: Path) -> None:
    """Move a fully written directory ``staged`` to ``target``, replacing any old one.

    Where the kernel supports it the two are exchanged in one step (renameat2), so ``target`` is never missing;
    elsewhere the old directory is moved aside first and removed after (a crash between the two renames
    leaves it under a ``.trash-`` name, recoverable, never half-written).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        os.rename(staged, target)
    elif _renameat2_exchange(staged, target):
        shutil.rmtree(staged)  # now holds the old contents
    else:
        trash = target.with_name(f".trash-{target.name}-{uuid.uuid4().hex}")
        os.rename(target, trash)
        os.rename(staged, target)
        shutil.rmtree(trash)
    fsync_dir(target.parent)


def new_staging_dir(parent: Path, name: str) -> Path:
    """A fresh, hidden directory beside where ``name`` will be published (same filesystem, so renames are atomic)."""
    path = parent / f".staging-{name}-{uuid.uuid4().hex}"
    path.mkdir(parents=True)
    return path


def remove_stale_staging(parent: Path) -> list[Path]:
    """Delete what a crashed writer left behind under ``parent``; returns what was removed."""
    removed = []
    if not parent.exists():
        return removed
    for child in parent.iterdir():
        if child.name.startswith((".staging-", ".trash-")) or (child.name.startswith(".") and child.suffix == ".tmp"):
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
            removed.append(child)
    return removed
