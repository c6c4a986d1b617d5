"""Where a night's log lines go, and how long loops show their progress.

Every INFO record of a run (Prefect's own and ours) goes to the Prefect API, so the UI's Logs tab shows the night;
the terminal gets only our lines (one per stage start and end, progress) and every library's warnings. The console
is quieted by its handler's level, never by the loggers' levels: a logger at WARNING would drop INFO before the API
handler sees it.

Progress uses tqdm (already a dependency through transformers, and it writes to stderr beside log lines through
``tqdm.write`` without breaking a bar); rich, which Prefect uses for its console, would need a live display that
takes the terminal over, which does not mix with Prefect's own console handler. Off a terminal (a worker, a pipe, a
log file) a loop logs one line every :data:`PROGRESS_EVERY_S` seconds instead.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping

LOGGER = "nightrec"
PROGRESS_EVERY_S = 15.0  # off a terminal (or to the Prefect API): one progress line this often at most

# Libraries that talk at INFO (alembic's migrations, MLflow's "Validating input example", Hugging Face's loading
# bars): their warnings still show.
QUIET = {"alembic": logging.WARNING, "mlflow": logging.WARNING, "httpx": logging.WARNING, "numba": logging.WARNING}
QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def logger(name: str = "") -> logging.Logger:
    """Our logger (``nightrec`` or ``nightrec.NAME``): to the terminal and, inside a Prefect run, to its API."""
    return logging.getLogger(f"{LOGGER}.{name}" if name else LOGGER)


def on_terminal() -> bool:
    """Progress bars only for a person watching: stderr is a terminal and NIGHTREC_PROGRESS is not ``off``."""
    return os.environ.get("NIGHTREC_PROGRESS", "").lower() not in ("off", "0", "false") and sys.stderr.isatty()


class TerminalHandler(logging.Handler):
    """Our lines on stderr, written around any live progress bar (``tqdm.write``); a record with
    ``extra={"terminal": False}`` (a periodic progress line while a bar shows the same) stays off the terminal."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s | %(message)s", "%H:%M:%S"))

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "terminal", True) and super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # a closed stream at interpreter exit must not raise from logging
            self.handleError(record)


def configure() -> None:
    """Route the logs as described above; idempotent, safe whenever Prefect configured its logging (at its import,
    in a worker's flow-run process, under pytest)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    from prefect.logging.handlers import APILogHandler, PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and handler.level < logging.WARNING:
            handler.setLevel(logging.WARNING)  # Prefect's INFO lines: the API only
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        run_logger = logging.getLogger(name)
        if run_logger.getEffectiveLevel() > logging.INFO:  # e.g. PREFECT_LOGGING_LEVEL=WARNING
            run_logger.setLevel(logging.INFO)
    ours = logging.getLogger(LOGGER)
    ours.setLevel(logging.INFO)
    ours.propagate = False  # not again through the root's console handler
    if not any(isinstance(h, TerminalHandler) for h in ours.handlers):
        ours.addHandler(TerminalHandler())
    if not any(isinstance(h, APILogHandler) for h in ours.handlers):
        ours.addHandler(_in_run_api_handler_class()())
    for name, level in QUIET.items():
        logging.getLogger(name).setLevel(level)


@functools.cache
def _in_run_api_handler_class() -> type:
    """Built on first use: Prefect is imported only by what runs flows, not by every user of :class:`Progress`."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging.handlers import APILogHandler

    class InRunAPIHandler(APILogHandler):
        """Prefect's API handler for records inside a flow or task run; others (the CLI before or after a run, a Ray
        worker) have no run to go to and are dropped quietly instead of warned about."""

        def emit(self, record: logging.LogRecord) -> None:
            if FlowRunContext.get() is None and TaskRunContext.get() is None:
                return
            super().emit(record)

    return InRunAPIHandler


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]) -> None:
        super().__init__(logging.INFO)
        self.lines = lines
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@contextlib.contextmanager
def captured() -> Iterator[list[str]]:
    """The lines our loggers and Prefect's run loggers write while inside (INFO and up), e.g. for an MLflow artifact."""
    lines: list[str] = []
    handler = _Lines(lines)
    loggers = [logging.getLogger(name) for name in (LOGGER, "prefect.flow_runs", "prefect.task_runs")]
    for each in loggers:
        each.addHandler(handler)
    try:
        yield lines
    finally:
        for each in loggers:
            each.removeHandler(handler)


def figures(values: Mapping[str, object]) -> str:
    """``a 1, b 0.123``: a few figures for a log line (floats to 4 significant digits, integers as integers)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
            value = int(value)
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(parts)


class Progress:
    """A loop's progress: a tqdm bar on a terminal, and a log line at most every ``every_s`` seconds (to the Prefect
    API always; to the terminal only when there is no bar). Thread-safe (embedding updates it from a pool)."""

    def __init__(
        self, desc: str, total: int | None = None, unit: str = "it", every_s: float = PROGRESS_EVERY_S, log=None
    ) -> None:
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.log = log or logger("progress")
        self.done = 0
        self.values: dict[str, object] = {}
        self.started = self.last = time.monotonic()
        self.lock = threading.Lock()
        self.bar = None
        if on_terminal():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1, **values) -> None:
        with self.lock:
            self.done += n
            self.values.update(values)
            if self.bar is not None:
                if values:
                    self.bar.set_postfix_str(figures(values), refresh=False)
                self.bar.update(n)
            now = time.monotonic()
            if now - self.last >= self.every_s:
                self.last = now
                self.log.info("%s", self.line(), extra={"terminal": self.bar is None})

    def line(self) -> str:
        done = f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"
        elapsed = time.monotonic() - self.started
        extra = f", {figures(self.values)}" if self.values else ""
        return f"{self.desc}: {done} in {elapsed:.0f} s{extra}"

    def close(self) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.close()
                self.bar = None


class TrainingProgress:
    """``fit_recommender``'s ``progress`` callback: a bar per phase (meta, cold, sequence, refit_*) showing the
    epoch, loss and validation NDCG, and one line when a phase ends. ``then`` is called too (e.g. MLflow metrics)."""

    def __init__(self, then=None, log=None) -> None:
        self.then = then
        self.log = log or logger("train")
        self.phase: str | None = None
        self.progress: Progress | None = None
        self.values: dict = {}

    def __call__(self, phase: str, epoch: int, values: Mapping[str, float]) -> None:
        if phase != self.phase:
            self.finish()
            self.phase = phase
            self.progress = Progress(f"train {phase}", unit="epoch", log=self.log)
        self.values = {k: float(v) for k, v in values.items() if v is not None}
        self.progress.update(1, **self.values)
        if self.then is not None:
            self.then(phase, epoch, values)

    def finish(self) -> None:
        """Close the current phase's bar with its summary line (call once training returned or failed)."""
        if self.progress is None:
            return
        self.progress.close()
        self.log.info("train %s: %d epoch(s), %s", self.phase, self.progress.done, figures(self.values))
        self.progress = None
