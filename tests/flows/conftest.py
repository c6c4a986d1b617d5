"""A real Prefect server (temporary, SQLite) for the flow tests, and a small demo home shared by a module."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from nightrec.sources.demo import DemoSpec, write_demo_files

SMALL = DemoSpec(users=150, items=240, events=6000, days=60, end=dt.date(2026, 3, 31), seed=11)
FIRST_NIGHT = SMALL.end + dt.timedelta(days=1)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def demo_home(root: Path, monkeypatch: pytest.MonkeyPatch, spec: DemoSpec = SMALL) -> Path:
    """Demo files written and configured as the nightly's sources; a few epochs keep training quick."""
    home = root / "home"
    paths = write_demo_files(root / "input", spec)
    monkeypatch.setenv("NIGHTREC_HOME", str(home))
    monkeypatch.setenv("NIGHTREC_EVENTS_SOURCE", str(paths["events"]))
    monkeypatch.setenv("NIGHTREC_ITEMS_SOURCE", str(paths["items"]))
    monkeypatch.setenv("NIGHTREC_USERS_SOURCE", str(paths["users"]))
    monkeypatch.setenv("NIGHTREC_TRAIN_EPOCHS", "8")
    monkeypatch.setenv("NIGHTREC_TOP_K", "20")
    return home
