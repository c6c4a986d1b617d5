"""Shared fixtures: an isolated NIGHTREC_HOME per test, and MovieLens-100K when ../shared/datasets has it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# `make test` runs two xdist workers on two cores: one OpenMP/BLAS thread each (the nights they start inherit it),
# or each worker's torch spins a thread per core and the two fight over both cores
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, "1")


def datasets_root() -> Path:
    return Path(os.environ.get("NIGHTREC_DATASETS", REPO.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def movielens_100k() -> Path:
    folder = datasets_root() / "movielens-100k"
    if not (folder / "u.data").exists():
        pytest.skip(f"MovieLens-100K not found at {folder} (set NIGHTREC_DATASETS to the folder holding it)")
    return folder


@pytest.fixture(scope="session")
def gift_cards() -> Path:
    folder = datasets_root() / "amazon2018-gift-cards"
    if not (folder / "Gift_Cards_5.json.gz").exists() or not (folder / "meta_Gift_Cards.json.gz").exists():
        pytest.skip(f"Amazon 2018 Gift Cards not found at {folder} (set NIGHTREC_DATASETS to the folder holding it)")
    return folder


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh NIGHTREC_HOME; Settings() built inside the test reads it."""
    path = tmp_path / "home"
    monkeypatch.setenv("NIGHTREC_HOME", str(path))
    return path


def tree_digest(root: Path) -> dict[str, str]:
    """Path -> sha256 of every file under ``root``: compare before/after to prove nothing changed."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# The longest files, longest first, as measured with `make test` (seconds in one xdist worker, 2 cores, 2026-12-02):
# each worker takes whole files, so these start first and the many short files fill in at the end. Without an order
# (xdist's default reorders files by their number of tests) the long files, which have few tests, came last.
LONGEST_FILES = [
    "tests/flows/test_crash.py",  # 214 s
    "tests/flows/test_concurrency.py",  # 173 s
    "tests/flows/test_ray.py",  # 166 s
    "tests/flows/test_backfill.py",  # 134 s
    "tests/flows/test_worker.py",  # 125 s
    "tests/flows/test_shutdown.py",  # 93 s
    "tests/flows/test_object_store.py",  # 90 s
    "tests/flows/test_deployments.py",  # 77 s
    "tests/tasks/test_pyfunc_model.py",  # 76 s
    "tests/tasks/test_evaluate.py",  # 58 s
]


def pytest_collection_modifyitems(config, items):
    """The longest files first (LONGEST_FILES), then the other files with slow tests, then the rest, each in
    collection order: `make test`'s two xdist workers take whole files in this order (`--no-loadscope-reorder`), so
    the long files start at once and the short ones fill in at the end instead of one worker finishing a long file
    alone."""
    rank = {REPO / name: n for n, name in enumerate(LONGEST_FILES)}
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (rank.get(item.path, len(rank)), item.path not in slow_files))
