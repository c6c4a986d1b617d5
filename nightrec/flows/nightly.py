"""The DAG: ``nightly(run_date)`` runs every stage for one date; ``backfill(start, end)`` runs it for a range.

Each night gets one MLflow parent run ``nightly-YYYY-MM-DD`` (tags: run date, trigger, Prefect flow-run id) with a
child run per stage, and a work folder ``HOME/runs/DATE/RUN_ID`` through which the stages hand over files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import time
from pathlib import Path
from zoneinfo import ZoneInfo

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from nightrec import logs
from nightrec.flows import plots, recovery, scaleout, stages
from nightrec.flows.locks import date_lock, open_tracking
from nightrec.redaction import redact
from nightrec.settings import Settings
from nightrec.storage import locking, tracking
from nightrec.storage.failpoints import failpoint
from nightrec.storage.lake import Lake
from nightrec.tasks.catalogue import MISSING_METRICS
from nightrec.tasks.pyfunc_model import recommender_dir

NIGHT_LOG = logs.logger("night")
logs.configure()  # wherever the flow runs (CLI, worker, serve, tests): INFO to the API, a readable terminal

KEEP_WORK_FOLDERS = 3  # nights whose work folders (model, vectors, index) stay on disk for inspection


class BackfillError(RuntimeError):
    """A date of a backfill failed; the message names it and how to resume."""


def resolve_run_date(run_date: dt.date | None, timezone: str) -> dt.date:
    """The explicit date, else the scheduled start's date in the configured zone (a late start keeps its day)."""
    if run_date is not None:
        return run_date
    scheduled = flow_run.scheduled_start_time if flow_run.id else None
    moment = scheduled if scheduled is not None else dt.datetime.now(dt.UTC)
    return moment.astimezone(ZoneInfo(timezone)).date()


def _nightly_run_name() -> str:
    """``nightly-YYYY-MM-DD``: the date given, else the one the run resolves (scheduled start in the zone)."""
    date = flow_run.parameters.get("run_date")
    if not date:
        date = resolve_run_date(None, Settings().timezone).isoformat()
    return f"nightly-{date}"


def run_trigger() -> str:
    """What started this run, from the run itself: ``backfill`` (a subflow of the backfill flow), ``schedule``
    (created by the scheduler of a deployment) or ``manual`` (the CLI, a call, a "Run" in the UI, `prefect
    deployment run`)."""
    if not flow_run.id:
        return "manual"
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        parent = flow_run.parent_flow_run_id
        if parent:
            parent_run = client.read_flow_run(parent)
            if client.read_flow(parent_run.flow_id).name == "backfill":
                return "backfill"
        if client.read_flow_run(flow_run.id).auto_scheduled:
            return "schedule"
    return "manual"


# Prefect writes a failed flow's exception to the result storage whatever persist_result says; as JSON, not a
# pickle (nightrec never reads it back; a record naming another serializer would be believed on read).
NO_RESULTS = {"persist_result": False, "result_serializer": "json"}


@flow(name="nightly", flow_run_name=_nightly_run_name, log_prints=True, **NO_RESULTS)
def nightly(run_date: dt.date | None = None) -> dict:
    """Ingest, embed, train, evaluate and gate, compress and index, publish: the lists for ``run_date``."""
    settings = Settings()
    day = resolve_run_date(run_date, settings.timezone)
    settings.home.mkdir(parents=True, exist_ok=True)
    trigger = run_trigger()
    started = time.perf_counter()
    NIGHT_LOG.info("night %s (%s): started", day, trigger)
    with date_lock(settings.home, day), scaleout.shard_plan(settings) as plan, contextlib.ExitStack() as held:
        summary = _run_night(settings, day, trigger, plan, held)
    NIGHT_LOG.info("night %s: done in %.0f s. %s", day, time.perf_counter() - started, night_line(summary))
    return summary


def night_line(summary: dict) -> str:
    """One line on a finished night: what was published, the quarantine, the gate."""
    published, gate = summary["publish"], summary["gate"]
    ingest = summary.get("ingest") or {}
    quarantined = sum(v for k, v in ingest.items() if k.endswith("_quarantined"))
    landed = (
        f"ingested {ingest.get('events_valid', 0):.0f} events, {quarantined:.0f} rows quarantined; " if ingest else ""
    )
    return (
        f"{landed}{published.get('users', 0):.0f} users, {published.get('rows', 0):.0f} rows published; "
        f"model version {gate['model_version']} ({gate['published_model']})"
    )


def _run_night(
    settings: Settings,
    day: dt.date,
    trigger: str,
    plan: scaleout.ShardPlan | None = None,
    held: contextlib.ExitStack | None = None,
) -> dict:
    """The stages in order; from the end of ingest on, ``held`` holds the lake's night-reads lock, so every stage
    reads the same events and catalogue (an ingest that would change them waits for this night)."""
    from nightrec.storage import registry

    client, exp = night_tracking(settings)
    recovery.recover_unfinished_nights(client, exp, settings.registered_model, day)  # under the lock: dead runs
    tags = {
        "nightrec.run_date": day.isoformat(),
        "nightrec.kind": "nightly",
        "nightrec.trigger": trigger,
        "prefect.flow_run_id": str(flow_run.id or ""),
    }
    parent = tracking.start_run(client, exp, f"nightly-{day.isoformat()}", tags)
    tracking.log_night_settings(client, parent, settings)
    night_dir = settings.home / "runs" / day.isoformat()
    workdir = night_dir / parent
    workdir.mkdir(parents=True, exist_ok=True)
    log = contextlib.ExitStack()
    lines = log.enter_context(logs.captured())  # the night's log lines, also as an MLflow artifact of the night
    try:
        summary: dict = {"run_date": day.isoformat(), "mlflow_run_id": parent, "trigger": trigger}
        failpoint("before:ingest")
        if settings.events_source or settings.items_source or settings.users_source:
            summary["ingest"] = stages.ingest_sources(parent)
        if held is not None:
            held.enter_context(locking.night_reads(locking.reads_lock_file(Lake(settings.lake_root)), day))
        failpoint("after:ingest")
        # Each stage waits for the one before (wait_for: Prefect's run graph draws the chain; the stages hand over
        # files, not Python values).
        summary["embed_items"] = scaleout.embed_items(plan, parent, str(workdir), wait_for=_upstream(summary))
        failpoint("after:embed-items")
        summary["embed_users"] = scaleout.embed_users(plan, day, parent, str(workdir), wait_for=_upstream(summary))
        failpoint("after:embed-users")
        champion = registry.champion(client, settings.registered_model)
        train_args = (day, parent, str(night_dir / "models"), str(recommender_dir(champion.path)) if champion else None)
        # content-keyed: a re-run of the night skips training
        summary["train"] = stages.train_model(*train_args, wait_for=_upstream(summary))
        # On the parent at once (a cached train logs nothing), so a night that fails later still shows them.
        tracking.log_metrics(client, parent, {k: summary["train"].get(k, 0) for k in MISSING_METRICS})
        failpoint("after:train")
        summary["gate"] = stages.evaluate_and_gate(
            day, parent, str(workdir), summary["train"]["model_dir"], wait_for=_upstream(summary)
        )
        failpoint("after:evaluate-and-gate")
        summary["index"] = stages.compress_and_index(day, parent, str(workdir), wait_for=_upstream(summary))
        failpoint("after:compress-and-index")
        summary["publish"] = scaleout.publish_lists(plan, day, parent, str(workdir), wait_for=_upstream(summary))
        failpoint("after:publish")
        _report(settings, client, exp, parent, summary)
    except BaseException as exc:
        client.set_tag(parent, "nightrec.error", redact(f"{type(exc).__name__}: {exc}")[:5000])
        _log_lines(client, parent, log, lines)
        tracking.finish_run(client, parent, failed=True)
        raise
    _log_lines(client, parent, log, lines)
    tracking.finish_run(client, parent)
    _prune_work_folders(settings.home / "runs")
    return summary


def _log_lines(client, parent: str, capture: contextlib.ExitStack, lines: list[str]) -> None:
    """Stop capturing and store the night's lines on its MLflow parent run (``logs/night.log``)."""
    capture.close()
    with contextlib.suppress(Exception):  # the log is a convenience: never the reason a night fails
        client.log_text(parent, redact("\n".join(lines)) + "\n", "logs/night.log")


def _upstream(summary: dict) -> list:
    """The last stage's task-run state (of the summary's newest entry), as ``wait_for`` of the next stage.

    The state, not the result: Prefect links a result's values too (strings, floats), so a result dict in wait_for
    can also point at unrelated stages whose values share an ``id``."""
    from prefect.utilities.annotations import quote
    from prefect.utilities.engine import get_state_for_result

    last = list(summary.values())[-1]
    if not isinstance(last, dict):  # no stage ran yet (the summary's run date, run id, trigger)
        return []
    found = get_state_for_result(last)
    # Prefect keeps the state without its data; waiting on it reads the data, so it is put back, quoted: Prefect
    # does not look inside a quote for more upstream runs.
    return [found[0].model_copy(update={"data": quote(last)})] if found is not None else []


def night_tracking(settings: Settings) -> tuple:
    """(MLflow client, the nights' experiment id), opened once per home at a time (:func:`locks.open_tracking`)."""
    return open_tracking(settings.home, settings.tracking_uri, settings.mlflow_experiment, settings.artifact_root)


def _report(settings: Settings, client, exp: str, parent: str, summary: dict) -> None:
    """What a person looks at first: headline metrics, a plot across nights, a sample of lists, a Prefect artifact."""
    gate = summary["gate"]
    headline = {f"{m}_{k}": v for m, metrics in gate["holdout"].items() for k, v in metrics.items()}
    headline.update({"users_published": summary["publish"].get("users", 0), "promoted": int(gate["promoted"])})
    headline["users_without_reasons"] = summary["publish"].get("users_without_reasons", 0)
    tracking.log_metrics(client, parent, headline)
    client.set_tag(parent, "nightrec.model_version", str(gate["model_version"]))
    tracking.log_dict(client, parent, summary, "summary.json")
    _log_history_plot(client, exp, parent)
    sample = _sample_lists(settings)
    if sample:
        client.log_table(parent, data=sample, artifact_file="sample_lists.json")
    create_markdown_artifact(key="nightly-summary", markdown=_markdown(summary, settings, exp), description="nightrec")
    NIGHT_LOG.info("night %s: gate: %s", summary["run_date"], gate["reason"])


def _log_history_plot(client, exp: str, parent: str) -> None:
    runs = client.search_runs(
        [exp], filter_string="tags.`nightrec.kind` = 'nightly' and attributes.status = 'FINISHED'", max_results=200
    )
    rows = sorted(
        ((r.data.tags.get("nightrec.run_date"), r.data.metrics) for r in runs if "model_ndcg_at_10" in r.data.metrics),
        key=lambda row: row[0],
    )
    current = client.get_run(parent)
    if "model_ndcg_at_10" in current.data.metrics:
        rows.append((current.data.tags["nightrec.run_date"], current.data.metrics))
    if not rows:
        return
    dates = [d for d, _ in rows]
    series = {
        name: [m.get(f"{name}_ndcg_at_10", float("nan")) for _, m in rows]
        for name in ("model", "champion", "popularity")
    }
    tracking.log_figure(client, parent, plots.metric_history(dates, series, "holdout NDCG@10"), "plots/history.png")


def _sample_lists(settings: Settings, users: int = 5, k: int = 10) -> dict[str, list]:
    from nightrec.storage import publication

    _, table = publication.read_latest_head(Lake(settings.lake_root), users)  # never the whole night in memory
    items = Lake(settings.lake_root).read_items().select("item_id", "title")
    titles = dict(items.iter_rows())
    sample_users = set(table.column("user_id").to_pylist())
    rows: dict[str, list] = {"user_id": [], "rank": [], "item_id": [], "title": [], "score": [], "because": []}
    for rec in table.to_pylist():
        if rec["user_id"] in sample_users and rec["rank"] <= k:
            rows["user_id"].append(rec["user_id"])
            rows["rank"].append(rec["rank"])
            rows["item_id"].append(rec["item_id"])
            rows["title"].append(titles.get(rec["item_id"], rec["item_id"]))  # not in the catalogue (yet): its id
            rows["score"].append(round(float(rec["score"]), 4))
            rows["because"].append("; ".join(r["title"] or r["item_id"] for r in rec["reasons"][:3]))
    return rows


def _markdown(summary: dict, settings: Settings, exp: str) -> str:
    gate = summary["gate"]
    lines = [
        f"# nightrec {summary['run_date']}",
        f"- published: {summary['publish'].get('users')} users, {summary['publish'].get('rows')} rows",
        f"- model version {gate['model_version']} ({gate['published_model']}); promoted: {gate['promoted']}",
        f"- gate: {gate['reason']}",
        f"- MLflow: experiment {exp}, run `{summary['mlflow_run_id']}` in {redact(settings.tracking_uri)}",
        "",
        "| model | NDCG@10 | Recall@20 |",
        "|---|---|---|",
    ]
    for name, metrics in gate["holdout"].items():
        ndcg, recall = metrics.get("ndcg_at_10", float("nan")), metrics.get("recall_at_20", float("nan"))
        lines.append(f"| {name} | {ndcg:.4f} | {recall:.4f} |")
    return "\n".join(lines)


def _prune_work_folders(runs_root: Path) -> None:
    days = sorted(p for p in runs_root.iterdir() if p.is_dir()) if runs_root.exists() else []
    for old in days[:-KEEP_WORK_FOLDERS]:
        shutil.rmtree(old, ignore_errors=True)


def finished_dates(settings: Settings) -> set[dt.date]:
    """Dates whose lists are in the lake and whose night finished (its MLflow parent run FINISHED).

    A run date in the table alone is not enough: a night killed right after its lists' commit leaves them readable
    and its run RUNNING. A backfill re-runs such a date, which republishes it and closes the dead run (KILLED, by
    recovery)."""
    client, exp = night_tracking(settings)
    runs = client.search_runs(
        [exp],
        filter_string="tags.`nightrec.kind` = 'nightly' and attributes.status = 'FINISHED'",
        max_results=50_000,
    )
    finished = {r.data.tags.get("nightrec.run_date") for r in runs}
    return {day for day in Lake(settings.lake_root).published_dates() if day.isoformat() in finished}


@flow(name="backfill", flow_run_name="backfill-{start}-{end}", **NO_RESULTS)
def backfill(start: dt.date, end: dt.date, force: bool = False) -> dict:
    """Nightly for each date from ``start`` to ``end`` inclusive, oldest first; published dates are skipped unless
    ``force``. A failed date stops the backfill; running the same command again resumes from it."""
    if end < start:
        raise ValueError(f"backfill: end {end} is before start {start}")
    settings = Settings()
    published = finished_dates(settings)
    done, skipped, nights = [], [], []
    day = start
    while day <= end:
        if day in published and not force:
            skipped.append(day.isoformat())
            nights.append(f"{day}: skipped, already published")
        else:
            try:
                summary = nightly(run_date=day)
            except Exception as exc:
                raise BackfillError(
                    f"backfill stopped at {day}: {type(exc).__name__}: {exc}. Finished: {done or 'none'}. "
                    f"Fix the cause and run the same backfill again; it resumes from {day}."
                ) from exc
            done.append(day.isoformat())
            nights.append(f"{day}: {night_line(summary)}")
        # The API's copy; `nightrec backfill` prints these lines once at the end (each night logs its own end line).
        NIGHT_LOG.info("backfill %s", nights[-1], extra={"terminal": False})
        day += dt.timedelta(days=1)
    return {"ran": done, "skipped": skipped, "nights": nights}
