"""The nightly stages as Prefect tasks. Each takes dates, ids and paths (never frames or tensors, which hash slowly),
reads what it needs from the lake or the night's work folder, calls the pure functions in ``nightrec.tasks`` and logs
a child MLflow run. Stages hand results to each other as files in the work folder, so a retried stage starts clean."""

from __future__ import annotations

import datetime as dt
import functools
import glob
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from nightrec import logs
from nightrec.flows.retries import SourceNotYetThereError, retry_transient
from nightrec.redaction import redact
from nightrec.settings import Settings
from nightrec.storage import atomic, tracking
from nightrec.storage.lake import Lake

# Stages retry transient failures only (a late source file, a locked database: nightrec.flows.retries) with backoff;
# the lake writes are idempotent. No stage persists a Prefect result: a result record names its own serializer
# (cloudpickle by default), so a file planted in the result storage would run code when read back (issue 14).
RETRY = {
    "retries": 2,
    "retry_delay_seconds": [2, 10],
    "retry_condition_fn": retry_transient,
    "cache_policy": NO_CACHE,
    "persist_result": False,
}


# The figures of each stage's end line (from what it logged as MLflow metrics), in this order where present; a name
# ending in * stands for every metric it begins.
KEY_FIGURES = {
    "ingest": ("events_valid", "events_quarantined", "items_valid", "items_quarantined", "users_valid"),
    "embed-items": ("items", "embedded", "reused"),
    "embed-users": ("users", "embedded", "pooled", "reused"),
    "train": ("train_events", "items", "best_epoch", "best_validation_ndcg"),
    "evaluate-and-gate": ("model_ndcg_at_10", "champion_ndcg_at_10", "popularity_ndcg_at_10"),
    "compress-and-index": ("users", "served_bytes_full", "served_bytes", "recall_at_*"),
    "publish": ("users", "rows", "users_without_reasons"),
}
STAGE_LOG = logs.logger("stages")


def key_figures(stage: str, logged: dict) -> dict:
    """The figures of ``stage``'s end line, from the metrics it logged (:data:`KEY_FIGURES`)."""
    shown = {}
    for name in KEY_FIGURES.get(stage, ()):
        shown.update({k: v for k, v in logged.items() if k == name or (name.endswith("*") and k.startswith(name[:-1]))})
    return shown


class _Stage:
    """Opens a child MLflow run of the night's parent run and closes it FINISHED or FAILED; logs one line as the
    stage starts and one as it ends (duration and its key figures)."""

    def __init__(self, parent_run_id: str, stage: str) -> None:
        self.settings = Settings()
        self.lake = Lake(self.settings.lake_root)
        self.client = tracking.client_for(self.settings.tracking_uri)
        exp = self.client.get_run(parent_run_id).info.experiment_id
        self.parent_run_id = parent_run_id
        self.run_id = tracking.start_run(self.client, exp, stage, {"nightrec.stage": stage}, parent=parent_run_id)
        self.stage = stage
        self.logged: dict = {}
        self.started = time.perf_counter()
        STAGE_LOG.info("%s: started", stage)

    def __enter__(self) -> _Stage:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        seconds = time.perf_counter() - self.started
        tracking.log_metrics(self.client, self.run_id, {"stage_seconds": seconds})
        if exc is not None:
            self.client.set_tag(self.run_id, "nightrec.error", redact(f"{exc_type.__name__}: {exc}")[:5000])
            STAGE_LOG.warning("%s: FAILED after %.1f s: %s", self.stage, seconds, redact(f"{exc_type.__name__}: {exc}"))
        else:
            shown = key_figures(self.stage, self.logged)
            STAGE_LOG.info("%s: done in %.1f s%s", self.stage, seconds, f" ({logs.figures(shown)})" if shown else "")
        tracking.finish_run(self.client, self.run_id, failed=exc_type is not None)

    def metrics(self, values: dict, prefix: str = "") -> None:
        named = {f"{prefix}{k}": v for k, v in values.items()}
        self.logged.update(named)
        tracking.log_metrics(self.client, self.run_id, named)


# --- the night's data, shared by several stages -------------------------------------------------------------------
def night_events(lake: Lake, run_date: dt.date) -> pl.DataFrame:
    """Every event strictly before the run date (a list for D uses every event before D)."""
    return lake.scan_events(before=run_date).select("user_id", "item_id", "timestamp", "date").collect()


def night_split(settings: Settings, events: pl.DataFrame, run_date: dt.date):
    """The night's training/holdout split (:func:`nightrec.tasks.holdout.split_holdout`): every stage uses this one."""
    from nightrec.tasks.holdout import split_holdout

    return split_holdout(events, run_date, settings.holdout_days, settings.gate_min_users)


def known_users(lake: Lake, events: pl.DataFrame) -> list[str]:
    """Users with an event before the run date, plus users listed in the user table: every one gets a list."""
    users = set(events["user_id"].unique().to_list())
    table = lake.read_users()
    if table is not None:
        users.update(table["user_id"].to_list())
    return sorted(users)


def _files(pattern: str | None) -> list[Path]:
    if not pattern:
        return []
    matches = sorted(glob.glob(pattern)) or ([pattern] if Path(pattern).exists() else [])
    if not matches:
        raise SourceNotYetThereError(f"source {pattern!r} matches no file")
    return [Path(m) for m in matches]


def _write_state(workdir: Path, name: str, payload: dict) -> None:
    (workdir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))


def read_state(workdir: Path, name: str) -> dict:
    return json.loads((Path(workdir) / f"{name}.json").read_text())


# --- stages -------------------------------------------------------------------------------------------------------
@task(name="ingest", **RETRY)
def ingest_sources(parent_run_id: str) -> dict:
    """Land the configured source files (catalogue first, so events can refer to new items)."""
    from nightrec.tasks import ingest

    with _Stage(parent_run_id, "ingest") as st:
        reports = []
        for path in _files(st.settings.items_source):
            reports.append(("items", ingest.ingest_items_file(st.lake, path, st.settings)))
        for path in _files(st.settings.users_source):
            reports.append(("users", ingest.ingest_users_file(st.lake, path)))
        for path in _files(st.settings.events_source):
            reports.append(("events", ingest.ingest_events_file(st.lake, path, st.settings)))
        totals = {"files": len(reports)}
        for kind, rep in reports:
            for key in ("rows", "valid", "quarantined", "duplicates"):
                totals[f"{kind}_{key}"] = totals.get(f"{kind}_{key}", 0) + getattr(rep, key)
        st.metrics(totals)
        tracking.log_dict(st.client, st.run_id, [r.as_dict() for _, r in reports], "ingest_reports.json")
        return totals


@task(name="embed-items", **RETRY)
def embed_items(parent_run_id: str) -> dict:
    """Language-model vectors for new or changed items (the cache makes a quiet night cheap)."""
    from nightrec.tasks import embed

    with _Stage(parent_run_id, "embed-items") as st:
        tracking.log_params(
            st.client,
            st.run_id,
            {"model": st.settings.embedding_model, "template": st.settings.item_text_template},
        )
        stats = embed.embed_items(st.lake, st.settings)
        st.metrics(stats)
        return stats


@task(name="embed-users", **RETRY)
def embed_users(run_date: dt.date, parent_run_id: str) -> dict:
    """Profile vectors of users whose history or attributes changed."""
    from nightrec.tasks import embed

    with _Stage(parent_run_id, "embed-users") as st:
        stats = embed.embed_users(st.lake, st.settings, run_date)
        st.metrics(stats)
        return stats


def train_inputs_key(run_date: dt.date, champion_dir: str | None) -> str:
    """Content key of everything training reads: events before the date, the catalogue, settings, champion, code."""
    import nightrec.model as model_package
    import nightrec.tasks.catalogue as catalogue_module
    import nightrec.tasks.holdout as holdout_module
    import nightrec.tasks.train as train_module

    settings = Settings()
    lake = Lake(settings.lake_root)
    digest = hashlib.sha256()
    for day in lake.event_dates():
        if day < run_date:
            digest.update(day.isoformat().encode())
            digest.update(lake.events_partition_sha256(day).encode())
    digest.update(lake.catalogue_digest().encode())
    # The code version: the training loop, the model it trains and saves, the holdout rule that decides what trains
    # and the rule that decides which items it trains over.
    model_root = Path(model_package.__file__).parent
    code = [
        Path(train_module.__file__),
        Path(holdout_module.__file__),
        Path(catalogue_module.__file__),
        *sorted(model_root.rglob("*.py")),
    ]
    for path in code:
        digest.update(path.read_bytes())
    for value in (
        run_date,
        settings.holdout_days,
        settings.gate_min_users,
        settings.seed,
        settings.train_epochs,
        settings.train_max_users_per_epoch,
        settings.train_tuning_budget_s,
        settings.train_tuning_trials,
        settings.train_sequence_negatives,
        settings.train_sequence_members,
        settings.warm_start,
        settings.embedding_model,
        settings.item_text_template,
        champion_dir,
    ):
        digest.update(repr(value).encode())
    return digest.hexdigest()[:24]


TRAIN_RECORD = "train-result.json"


def train_record_path(models_root: Path, key: str) -> Path:
    """Where a finished training of inputs ``key`` records its result, beside its model folder (pruned with it)."""
    return Path(models_root) / f"{key}.{TRAIN_RECORD}"


def read_train_record(models_root: Path, key: str) -> dict | None:
    """The recorded result of an earlier training on the same inputs, or None (then the night trains).

    Our own cache instead of a persisted Prefect result: a Prefect result record names its own serializer
    (cloudpickle by default), so a file planted there would run code on load. This one is plain JSON, checked
    field by field; anything else is ignored."""
    path = train_record_path(models_root, key)
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    expected = str(Path(models_root) / key)
    if not isinstance(record, dict) or record.get("model_dir") != expected or not Path(expected).is_dir():
        return None
    if not isinstance(record.get("train_run_id"), str):
        return None
    if not all(isinstance(v, int | float | str) for v in record.values()):  # the stats are scalars
        return None
    return record


@task(
    name="train",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_transient,
    cache_policy=NO_CACHE,
    persist_result=False,
)
def train_model(run_date: dt.date, parent_run_id: str, models_root: str, champion_dir: str | None) -> dict:
    """Meta-train on events before the holdout cut, warm-started from the champion when there is one.

    Cached by the content of its inputs (a re-run of a night after a later stage failed skips training):
    :func:`read_train_record`, never a persisted Prefect result."""
    from nightrec.flows import plots
    from nightrec.model import TrainConfig
    from nightrec.tasks import catalogue, train

    key = train_inputs_key(run_date, champion_dir)  # once: it reads every events manifest
    cached = read_train_record(Path(models_root), key)
    if cached is not None:
        STAGE_LOG.info("train: skipped, a model trained on the same inputs exists (%s)", cached["model_dir"])
        return cached
    with _Stage(parent_run_id, "train") as st:
        events = night_events(st.lake, run_date)
        split = night_split(st.settings, events, run_date)
        train_events, holdout = split.train, split.holdout
        items = catalogue.night_items(st.lake, st.settings, events)
        item_ids, text = items.item_ids, items.text_vectors
        if items.missing:
            get_run_logger().warning(
                "%d item(s) named by %d event(s) are missing from the catalogue; they train by id, e.g. %s",
                len(items.missing),
                items.missing_events,
                items.missing[:5],
            )
        config = TrainConfig(
            seed=st.settings.seed,
            max_users_per_epoch=st.settings.train_max_users_per_epoch,
            tuning_budget_s=st.settings.train_tuning_budget_s,
            tuning_trials=st.settings.train_tuning_trials,
            sequence_negatives=st.settings.train_sequence_negatives,
            sequence_members=st.settings.train_sequence_members,
        )
        if st.settings.train_epochs:
            config.epochs = st.settings.train_epochs
        init_from = Path(champion_dir) if champion_dir and st.settings.warm_start else None
        tracking.log_params(
            st.client, st.run_id, {**config.to_dict(), **split.profile(), "init_from": init_from or "scratch"}
        )
        tracking.log_split(st.client, (st.run_id,), train_events, holdout, str(st.lake.events_dir))
        # No profile vectors: today's profiles include the holdout days, which would leak into the evaluation.
        live = functools.partial(tracking.log_training_epoch, st.client, st.run_id)  # each epoch as it ends
        progress = logs.TrainingProgress(then=live)  # the terminal bar / log lines, then MLflow
        try:
            recommender = train.fit_recommender(
                train_events, item_ids, text, None, config, init_from=init_from, progress=progress
            )
        finally:
            progress.finish()
        if recommender.meta.get("warm_start_skipped"):  # a champion of other data: trained from scratch instead
            get_run_logger().info("not continuing the champion: %s", recommender.meta["warm_start_skipped"])
            tracking.log_params(st.client, st.run_id, {"warm_start_skipped": recommender.meta["warm_start_skipped"]})
        model_dir = recommender.save(Path(models_root) / key)
        losses = recommender.meta.get("losses") or []
        if losses:
            tracking.log_figure(st.client, st.run_id, plots.loss_curve(losses), "plots/train_loss.png")
        _log_model_choices(st, recommender.meta)
        stats = {
            "events": events.height,
            "train_events": train_events.height,
            "holdout_events": holdout.height,
            "items": len(item_ids),
            **items.stats(),
            **{k: v for k, v in recommender.meta.items() if isinstance(v, int | float)},
        }
        st.metrics(stats)
        result = {"model_dir": str(model_dir), "train_run_id": st.run_id, **stats}
    atomic.write_json_atomic(train_record_path(Path(models_root), key), result)  # after the run closed FINISHED
    return result


def _log_model_choices(st: _Stage, meta: dict) -> None:
    """What the training chose on its validation: the validation curves (a metric per epoch), the sequence part's
    trials and chosen parameters (an MLflow table and params), the new-item offset's trials and the weights fitted per
    history bucket."""
    for name in ("validation_ndcg", "cold_validation_ndcg"):
        for epoch, value in enumerate(meta.get(name) or []):
            tracking.log_metrics(st.client, st.run_id, {name: value}, step=epoch)
    if meta.get("sequence_trials"):
        tracking.log_dict(st.client, st.run_id, meta["sequence_trials"], "tuning/sequence_trials.json")
        for number, trial in enumerate(meta["sequence_trials"]):  # the search as a chart: one point per trial
            if "validation_ndcg" in trial:
                tracking.log_metrics(
                    st.client, st.run_id, {"tuning.sequence_trial_ndcg": trial["validation_ndcg"]}, step=number
                )
        states = [trial.get("state", "skipped") for trial in meta["sequence_trials"]]
        counts = {f"tuning.sequence_trials_{s}": states.count(s) for s in ("complete", "pruned", "skipped")}
        tracking.log_metrics(st.client, st.run_id, counts)
    if meta.get("sequence_params"):
        tracking.log_params(
            st.client, st.run_id, {f"chosen.sequence_{k}": v for k, v in meta["sequence_params"].items()}
        )
    if meta.get("item_item_trials"):
        tracking.log_dict(st.client, st.run_id, meta["item_item_trials"], "tuning/item_item_trials.json")
    if meta.get("item_item_params"):
        tracking.log_params(
            st.client, st.run_id, {f"chosen.item_item_{k}": v for k, v in meta["item_item_params"].items()}
        )
    if meta.get("new_item_offset_ndcg"):  # the new-item offset's trials: validation NDCG, its cost, lists reached
        trials = {k: meta[k] for k in meta if k.startswith("new_item_offset")}
        tracking.log_dict(st.client, st.run_id, trials, "tuning/new_item_offset.json")
    if meta.get("best_epoch") is not None:
        tracking.log_params(st.client, st.run_id, {"chosen.epochs": meta["best_epoch"]})


@task(name="evaluate-and-gate", **RETRY)
def evaluate_and_gate(run_date: dt.date, parent_run_id: str, workdir: str, model_dir: str) -> dict:
    """Score the new model, the champion and popularity on the holdout; register, maybe promote, pick what to serve.

    The gate (:func:`nightrec.storage.registry.gate_paired`) decides on a paired bootstrap of per-user NDCG@10 over
    at least ``gate_min_users`` holdout users; metrics per history segment are logged beside the overall ones."""
    from nightrec.flows import plots
    from nightrec.model import Recommender
    from nightrec.storage import registry
    from nightrec.tasks import catalogue, pyfunc_model
    from nightrec.tasks import holdout as holdout_task

    with _Stage(parent_run_id, "evaluate-and-gate") as st:
        name = st.settings.registered_model
        events = night_events(st.lake, run_date)
        split = night_split(st.settings, events, run_date)
        # On the parent here, not in train: a re-run of the night skips a training it already did, never this stage.
        runs = (st.run_id, parent_run_id)
        tracking.log_split(st.client, runs, split.train, split.holdout, str(st.lake.events_dir))
        # Full ranking over the night's items: a champion trained before an item reached the logs cannot rank it.
        item_ids, _ = catalogue.night_item_ids(st.lake.read_items(), events)
        champion = registry.champion(st.client, name)
        champion_weights = pyfunc_model.recommender_dir(champion.path) if champion is not None else None
        models = {"model": Recommender.load(Path(model_dir))}
        if champion_weights is not None:
            models["champion"] = Recommender.load(champion_weights)
        report: dict[str, dict[str, float]] = {}
        ndcg: dict = {}
        new_ndcg = float("nan")
        if split.holdout.height:
            evidence = holdout_task.holdout_evidence(
                models,
                split.train,
                split.holdout,
                item_ids,
                10,
                st.settings.eval_max_users,
                st.settings.seed,
            )
            report, ndcg = evidence.report, evidence.ndcg
            for model_name, metrics in report.items():
                st.metrics(metrics, prefix=f"{model_name}_")
            tracking.log_figure(st.client, st.run_id, plots.model_vs_peers(report), "plots/holdout_vs_peers.png")
            tracking.log_dict(st.client, st.run_id, report, "holdout_report.json")
            new_ndcg = report["model"]["ndcg_at_10"]
        empty = np.zeros(0)
        decision = registry.gate_paired(
            ndcg.get("model", empty),
            ndcg.get("popularity", empty),
            ndcg.get("champion", empty if champion is not None else None),
            st.settings.champion_tolerance,
            st.settings.gate_min_users,
            seed=st.settings.seed,
        )
        comparisons = {"popularity": decision.vs_popularity, "champion": decision.vs_champion}
        for other, comparison in comparisons.items():
            if comparison is not None and comparison.users:
                st.metrics({k: v for k, v in comparison.as_dict().items() if k != "outcome"}, f"gate_vs_{other}_")
        tracking.log_dict(
            st.client,
            st.run_id,
            {
                "split": {**split.profile(), "description": split.description},
                "users": decision.users,
                "min_users": st.settings.gate_min_users,
                "promote": decision.promote,
                "publish": decision.publish,
                "reason": decision.reason,
                **{f"vs_{k}": c.as_dict() if c is not None else None for k, c in comparisons.items()},
            },
            "gate_decision.json",
        )
        # A Logged Model of the night (a pyfunc with a signature) registered from it: anyone can load it.
        spec = pyfunc_model.pyfunc_spec(Path(model_dir))
        version = registry.log_model(st.client, name, parent_run_id, {"holdout_ndcg_at_10": new_ndcg}, spec)
        tracking.set_description(st.client, parent_run_id, decision.reason)
        tracking.set_description(st.client, st.run_id, decision.reason)
        if decision.promote:
            registry.promote(st.client, name, version)
        serve_new = decision.publish == "new" or champion is None
        result = {
            "model_version": version if serve_new else champion.version,
            "serving_model_dir": model_dir if serve_new else str(champion_weights),
            "candidate_version": version,
            "promoted": decision.promote,
            "published_model": "new" if serve_new else "champion",
            "reason": decision.reason,
            "outcome_vs_popularity": decision.outcome_vs_popularity,
            "outcome_vs_champion": decision.outcome_vs_champion,
            "holdout_users": decision.users,
            "holdout_method": split.description,
            "holdout": report,
        }
        tagged = (
            "promoted",
            "published_model",
            "reason",
            "candidate_version",
            "outcome_vs_popularity",
            "outcome_vs_champion",
            "holdout_users",
            "holdout_method",
        )
        for key in tagged:
            st.client.set_tag(st.run_id, f"nightrec.gate.{key}", str(result[key]))
            st.client.set_tag(parent_run_id, f"nightrec.gate.{key}", str(result[key]))
        _write_state(Path(workdir), "gate", result)
        return result


@task(name="compress-and-index", **RETRY)
def compress_and_index(run_date: dt.date, parent_run_id: str, workdir: str) -> dict:
    """Served vectors for every known user, compressed within the quality tolerance, and a recall-checked index."""
    from nightrec.model import Recommender
    from nightrec.storage.vectors import save_served_vectors
    from nightrec.tasks import catalogue, compress, evaluate, index

    with _Stage(parent_run_id, "compress-and-index") as st:
        gate = read_state(Path(workdir), "gate")
        recommender = Recommender.load(Path(gate["serving_model_dir"]))
        events = night_events(st.lake, run_date)
        users = known_users(st.lake, events)
        full = recommender.served_vectors(events, users)
        # Night items the served model lacks (a champion older than them): not recommendable tonight, and a user
        # whose history holds only such items gets a list without reasons (counted by publish).
        item_ids, _ = catalogue.night_item_ids(st.lake.read_items(), events)
        served = set(full.item_ids)
        st.metrics({"items_not_served": sum(item not in served for item in item_ids)})
        full.meta.update({"model_version": gate["model_version"], "embedding_model": st.settings.embedding_model})
        chosen, codec = full, "Flat"
        split = night_split(st.settings, events, run_date)
        train_events, holdout = split.train, split.holdout
        if holdout.height:
            # Compression is judged on vectors adapted without the holdout, then applied to everyone's full vectors.
            holdout_users = compress.sample_users(holdout, st.settings.compression_max_users, st.settings.seed)
            probe = recommender.served_vectors(train_events, holdout_users)
            quality = evaluate.served_ndcg(train_events, holdout, k=10)
            with logs.Progress("compression search", unit="config") as progress:
                result = compress.compress_served(
                    probe, quality, st.settings.champion_tolerance, st.settings.seed, progress=progress
                )
            chosen, codec = result.apply(full), result.codec
            tracking.log_dict(st.client, st.run_id, result.table, "compression_table.json")
            tracking.log_figure(st.client, st.run_id, result.figure(), "plots/compression_tradeoff.png")
            st.client.set_tag(st.run_id, "nightrec.compression", result.chosen)
        vectors_dir = save_served_vectors(chosen, Path(workdir) / "vectors")
        stats = index.build_checked_index(
            chosen.item_matrix,
            chosen.item_ids,
            chosen.user_matrix,
            Path(workdir) / "index",
            k=st.settings.top_k,
            min_recall=st.settings.min_index_recall,
            codec=codec,
            embedding_model=st.settings.embedding_model,
            seed=st.settings.seed,
        )
        tracking.log_params(st.client, st.run_id, {"factory": stats["factory"], "codec": codec})
        st.metrics({k: v for k, v in stats.items() if k != "search_params"})
        st.metrics({"served_bytes_full": full.nbytes(), "served_bytes": chosen.nbytes(), "users": len(users)})
        st.client.log_artifacts(st.run_id, str(Path(workdir) / "index"), "index")
        _write_state(Path(workdir), "index", {"vectors_dir": str(vectors_dir), **stats})
        return stats


@task(name="publish", **RETRY)
def publish_lists(run_date: dt.date, parent_run_id: str, workdir: str) -> dict:
    """Top-k with reasons for every known user, checked, then published in one Delta commit (docs/contract.md)."""
    from nightrec.storage.vectors import load_served_vectors

    with _Stage(parent_run_id, "publish") as st:
        vectors = load_served_vectors(Path(workdir) / "vectors")
        history = night_events(st.lake, run_date)
        with logs.Progress("publish", len(vectors.user_ids), unit="user") as progress:
            batches = night_lists(st.settings, st.lake, run_date, Path(workdir), vectors, history, progress=progress)
            return publish_checked(st, run_date, Path(workdir), batches, history, vectors.user_ids, vectors.item_ids)


def night_lists(
    settings: Settings,
    lake: Lake,
    run_date: dt.date,
    workdir: Path,
    vectors,
    history: pl.DataFrame,
    shard: int = 0,
    shards: int = 1,
    progress=None,
):
    """Record batches of the night's lists for the users of range ``shard`` of ``shards``."""
    from nightrec.tasks import catalogue, publish

    gate = read_state(workdir, "gate")
    items = catalogue.night_catalogue(lake.read_items(), history)  # titles for items the catalogue lacks: their ids
    exclude = None
    if settings.exclude_unavailable:
        exclude = set(items.filter(pl.col("available").eq(False))["item_id"].to_list())
    return publish.build_lists(
        vectors,
        workdir / "index",
        history,
        items,
        k=settings.top_k,
        run_date=run_date,
        model_version=str(gate["model_version"]),
        exclude_items=exclude,
        shard=shard,
        shards=shards,
        progress=progress,
    )


def publish_checked(
    st: _Stage,
    run_date: dt.date,
    workdir: Path,
    batches,
    history: pl.DataFrame,
    user_ids: list[str],
    item_ids: list[str],
) -> dict:
    """Write ``batches`` as the date's lists, read the written file back and check it, user range by user range,
    and only then publish it (one Delta commit): lists that fail the checker are never published.

    ``item_ids`` are the served items (what reasons can cite). Users whose history holds none of them get lists
    without reasons: counted (``users_without_reasons``) and logged, failing the night only above
    ``max_unexplained_share`` of the users."""
    from nightrec.storage import publication
    from nightrec.tasks import publish

    gate = read_state(workdir, "gate")
    pointer = {"date": run_date.isoformat(), "mlflow_run_id": st.parent_run_id, "model_version": gate["model_version"]}
    counted: dict = {}

    def check(path: Path) -> None:
        in_range = functools.partial(publication.read_user_range, path)
        result = publish.check_lists(
            in_range,
            history,
            user_ids,
            st.settings.top_k,
            explainable=item_ids,
            max_unexplained_share=st.settings.max_unexplained_share,
        )
        counted["users_without_reasons"] = result.unexplained_users
        st.metrics({"problems": len(result.problems), "users_without_reasons": result.unexplained_users})
        coverage = {"list_coverage": result.stats.get("list_items_distinct", 0) / max(len(item_ids), 1)}
        st.metrics({**result.stats, **coverage})  # what is about to be published: coverage, reason weights
        if result.problems:
            raise ListsCheckError(f"lists for {run_date} failed the checker, not published: {result.problems[:5]}")
        if result.unexplained_users:
            get_run_logger().warning(
                "%d of %d users (%.2f%%, allowed up to %.2f%%) have history but none of it is known to the served "
                "model: their lists have no reasons, e.g. %s",
                result.unexplained_users,
                result.users,
                100 * result.unexplained_share,
                100 * st.settings.max_unexplained_share,
                result.unexplained_examples,
            )

    keep = st.settings.lake_retention_nights
    stats = {**publication.publish(st.lake, run_date, batches, pointer, check=check, keep_nights=keep), **counted}
    st.metrics(stats)
    return stats


class ListsCheckError(RuntimeError):
    """The night's lists broke an invariant (a missing user, a seen item, ...); the previous lists stay published."""
