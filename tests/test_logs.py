"""Where log lines go (nightrec.logs): INFO kept for the Prefect API while the console shows only warnings of
Prefect's own loggers; progress as periodic lines off a terminal."""

from __future__ import annotations

import logging

from nightrec import logs


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_configure_quiets_the_console_handler_not_the_run_loggers(monkeypatch):
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import APILogHandler, PrefectConsoleHandler

    setup_logging()  # what a Prefect process does first: its console handler on the root logger

    logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)  # as PREFECT_LOGGING_LEVEL=WARNING leaves it
    logs.configure()
    logs.configure()  # idempotent
    consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    assert consoles and all(h.level == logging.WARNING for h in consoles)
    assert logging.getLogger("prefect.task_runs").isEnabledFor(logging.INFO)  # INFO still reaches its API handler
    ours = logging.getLogger("nightrec")
    assert ours.isEnabledFor(logging.INFO) and not ours.propagate
    assert [type(h) for h in ours.handlers].count(logs.TerminalHandler) == 1
    assert sum(isinstance(h, APILogHandler) for h in ours.handlers) == 1
    assert not logging.getLogger("alembic").isEnabledFor(logging.INFO)


def test_progress_off_a_terminal_logs_at_most_every_interval(monkeypatch):
    monkeypatch.setenv("NIGHTREC_PROGRESS", "off")
    recorder = Recorder()
    log = logging.getLogger("nightrec.test-progress")
    log.addHandler(recorder)
    now = [0.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    progress = logs.Progress("embed items", total=500, unit="item", every_s=15.0, log=log)
    for now[0] in (1.0, 2.0, 20.0, 21.0, 45.0):  # seconds since the start, at each update
        progress.update(100, loss=0.25)
    assert progress.bar is None
    lines = [r.getMessage() for r in recorder.records]
    assert lines == ["embed items: 300/500 item in 20 s, loss 0.25", "embed items: 500/500 item in 45 s, loss 0.25"]
    assert all(getattr(r, "terminal", True) for r in recorder.records)  # no bar: the lines go to the terminal too


def test_training_progress_sums_up_each_phase_and_passes_values_on(monkeypatch):
    monkeypatch.setenv("NIGHTREC_PROGRESS", "off")
    recorder, seen = Recorder(), []
    log = logging.getLogger("nightrec.test-train")
    log.addHandler(recorder)
    progress = logs.TrainingProgress(then=lambda *call: seen.append(call), log=log)
    for epoch, loss in enumerate([3.0, 2.5]):
        progress("meta", epoch, {"loss": loss, "validation_ndcg": 0.1 * epoch})
    progress("refit_meta", 0, {"loss": 2.4})
    progress.finish()
    lines = [r.getMessage() for r in recorder.records]
    assert lines == [
        "train meta: 2 epoch(s), loss 2.5, validation_ndcg 0.1",
        "train refit_meta: 1 epoch(s), loss 2.4",
    ]
    assert [c[:2] for c in seen] == [("meta", 0), ("meta", 1), ("refit_meta", 0)]
