"""Named kill points for crash and concurrency tests, in the spirit of etcd's gofail and FoundationDB's buggify.

Production code calls ``failpoint("after:train")`` at the moments a crash is most interesting (stage boundaries, the
middle of a write, between a rename and the pointer that publishes it). Unarmed, a failpoint is one environment
lookup and returns: no file, no sleep, no change in behaviour.

A test arms one by name in the child process's environment:

* ``NIGHTREC_FAILPOINT=after:train`` (a comma-separated list arms several) and
* ``NIGHTREC_FAILPOINT_DIR=/some/folder`` (default: the working directory).

When the process reaches an armed point it writes ``<dir>/<name>.hit`` (holding its pid) and then waits: until the
test kills it (SIGKILL at exactly that point), or until the test creates ``<dir>/<name>.release``, when it goes on as
if nothing happened (to hold a process inside a lock while a second one tries it). A failpoint that nobody releases
gives up after ``NIGHTREC_FAILPOINT_TIMEOUT`` seconds (default 600) with :class:`FailpointTimeout`, so a broken test
cannot hang a CI job forever.

The environment is read at call time, never at import (settings rule in DESIGN.md).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV_NAME = "NIGHTREC_FAILPOINT"
ENV_DIR = "NIGHTREC_FAILPOINT_DIR"
ENV_TIMEOUT = "NIGHTREC_FAILPOINT_TIMEOUT"
POLL_SECONDS = 0.05


class FailpointTimeout(RuntimeError):
    """An armed failpoint waited for a kill or a release that never came."""


def armed(name: str) -> bool:
    """Whether ``name`` is armed in this process's environment right now."""
    value = os.environ.get(ENV_NAME)
    return bool(value) and name in {part.strip() for part in value.split(",")}


def file_stem(name: str) -> str:
    """The marker file stem for ``name`` (``after:train`` -> ``after-train``): safe on every filesystem."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def hit_marker(folder: Path, name: str) -> Path:
    return Path(folder) / f"{file_stem(name)}.hit"


def release_marker(folder: Path, name: str) -> Path:
    return Path(folder) / f"{file_stem(name)}.release"


def failpoint(name: str) -> None:
    """Do nothing unless ``name`` is armed; armed, announce the hit and wait to be killed or released."""
    if not armed(name):
        return
    folder = Path(os.environ.get(ENV_DIR) or ".")
    folder.mkdir(parents=True, exist_ok=True)
    marker = hit_marker(folder, name)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, marker)  # the test never sees a half-written marker
    release = release_marker(folder, name)
    deadline = time.monotonic() + float(os.environ.get(ENV_TIMEOUT) or 600)
    while not release.exists():
        if time.monotonic() > deadline:
            raise FailpointTimeout(f"failpoint {name!r} was neither killed nor released ({release} never appeared)")
        time.sleep(POLL_SECONDS)
