"""The `nightrec` command in its own process, for tests that kill it or run several at once."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from nightrec.sources.demo import DemoSpec
from nightrec.storage import failpoints, publication
from nightrec.storage.lake import Lake

LIST_COLUMNS = ["user_id", "rank", "item_id", "score", "reasons"]

# Smaller than the flows' SMALL demo: every kill costs a process start and a night up to its point.
SPEC = DemoSpec(users=60, items=100, events=2000, days=40, end=dt.date(2026, 3, 31), seed=11)
D1 = SPEC.end + dt.timedelta(days=1)
D2 = D1 + dt.timedelta(days=1)
EPOCHS = "2"


def nightrec_command() -> list[str]:
    """The installed console script beside this interpreter, else the module."""
    script = Path(sys.executable).with_name("nightrec")
    return [str(script)] if script.exists() else [sys.executable, "-m", "nightrec.flows.cli"]


def child_environment(**extra: str) -> dict[str, str]:
    """This process's environment (the fixtures' NIGHTREC_* included) plus the harness's Prefect API URL."""
    from prefect.settings import get_current_settings

    env = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTREC_FAILPOINT")}
    url = get_current_settings().api.url
    if url:
        env["PREFECT_API_URL"] = str(url)
    env.update(extra)
    return env


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """Start ``nightrec ARGS`` in a new process group (so a kill reaches anything it started), output to ``log``."""
    handle = open(log, "w")  # noqa: SIM115 - closed by the child's exit; the test reads the file
    return subprocess.Popen(
        [*nightrec_command(), *args], env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def wait_for_hit(proc: subprocess.Popen, folder: Path, name: str, log: Path, timeout: float = 600.0) -> int:
    """Wait until ``proc`` sits in failpoint ``name``; returns the pid that wrote the marker."""
    marker = failpoints.hit_marker(folder, name)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"nightrec exited ({proc.returncode}) before failpoint {name}:\n{tail(log)}")
        if time.monotonic() > deadline:
            kill_group(proc)
            raise AssertionError(f"failpoint {name} not reached in {timeout} s:\n{tail(log)}")
        time.sleep(0.05)
    return int(marker.read_text())


def wait_for_text(proc: subprocess.Popen, log: Path, text: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never appeared (exit {proc.returncode}):\n{tail(log)}")
        time.sleep(0.05)


def release(folder: Path, name: str) -> None:
    failpoints.release_marker(folder, name).write_text("go")


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process and everything in its group, then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600.0) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"nightrec did not finish in {timeout} s:\n{tail(log)}") from None


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no output)"


def lists(lake: Lake, day) -> pl.DataFrame:
    """A date's published lists in a stable order, with what must match between two runs of the same night."""
    return pl.from_arrow(publication.read_day(lake, day)).select(LIST_COLUMNS).sort("user_id", "rank")


def uncommitted(lake: Lake, table: str) -> list[Path]:
    """Files in a local table's folder that its log does not name: parts of a killed writer, invisible to readers
    and deleted by VACUUM once older than the retention."""
    from nightrec.storage import delta

    folder = Path(lake.table_uri(table))
    opened = delta.open_table(str(folder))
    named = set(delta.file_sizes(opened)) if opened is not None else set()
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and "_delta_log" not in p.parts and str(p.relative_to(folder)) not in named
    )


def leftovers(root: Path) -> list[Path]:
    """Files or folders a killed writer leaves: staging folders, trash, temporary files."""
    return sorted(p for p in root.rglob("*") if p.name.startswith((".staging-", ".trash-")) or p.name.endswith(".tmp"))


def restore(snapshot: Path, home: Path, keep: tuple[str, ...] = ()) -> None:
    """Put ``home`` back to ``snapshot`` at the same absolute path (MLflow stores absolute paths), leaving the
    folders in ``keep`` (relative, e.g. a content-keyed model cache) as they are.

    Files are rewritten in place, never replaced: this process may hold a pooled SQLite connection to
    ``mlflow.db``, which would go on reading a replaced file's old inode. SQLite notices the rewrite (its file
    change counter) and drops its page cache.
    """
    kept = [home / rel for rel in keep]
    wanted = {p.relative_to(snapshot) for p in snapshot.rglob("*")}
    for path in sorted(home.rglob("*"), reverse=True):  # children before their folders
        if path.relative_to(home) in wanted or any(path == k or path.is_relative_to(k) for k in kept):
            continue
        if any(k.is_relative_to(path) for k in kept):
            continue  # a parent of a kept folder
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for source in sorted(snapshot.rglob("*")):
        target = home / source.relative_to(snapshot)
        if source.is_dir():
            target.mkdir(exist_ok=True)
        else:
            shutil.copyfile(source, target)  # opens the existing file for writing: same inode
