"""The ``nightrec`` command. Settings come from NIGHTREC_* environment variables; options here override a few."""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from nightrec.redaction import redact
from nightrec.settings import Settings, apply_environment

app = typer.Typer(add_completion=False, no_args_is_help=True, help="nightrec: the nightly recommender pipeline.")

RUN_IN_PROGRESS_EXIT = 75  # EX_TEMPFAIL: another run of the same date holds its lock; try again later
REFUSED_EXIT = 2  # the input was refused (bad file, nothing written), like a usage error: fix it, do not retry
DateOption = Annotated[dt.datetime | None, typer.Option(formats=["%Y-%m-%d"], help="Run date (YYYY-MM-DD).")]


def _settings() -> Settings:
    """Validated settings, exported to the environment Prefect and MLflow read at import (before importing them)."""
    try:
        settings = Settings()
    except Exception as exc:  # pydantic's message names the bad variable
        typer.secho(redact(f"invalid configuration: {exc}"), fg="red", err=True)
        raise typer.Exit(2) from exc
    apply_environment(settings)
    os.environ["NIGHTREC_HOME"] = str(settings.home)  # stages re-read settings inside Prefect tasks
    return settings


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.secho(redact(message), fg="red", err=True)
    return typer.Exit(code)


@app.command()
def ingest(
    events: Annotated[
        Path | None, typer.Option(help="Events file, an Amazon 2018 reviews file, or a MovieLens/Amazon folder.")
    ] = None,
    items: Annotated[Path | None, typer.Option(help="Item catalogue file, or an Amazon 2018 meta_*.json.gz.")] = None,
    users: Annotated[Path | None, typer.Option(help="User attributes file.")] = None,
) -> None:
    """Land files into the lake (catalogue first). A MovieLens folder (100K, 1M, latest), an Amazon Review Data 2018
    folder and Amazon reviews/metadata files (gzip JSON Lines) are recognised as such and converted first."""
    from nightrec.sources import amazon, load_dataset
    from nightrec.storage.lake import Lake
    from nightrec.tasks import ingest as stage

    settings = _settings()
    lake = Lake(settings.lake_root)
    if events is None and items is None and users is None:
        raise _fail("nothing to ingest: give --events, --items and/or --users", 2)
    reports = []
    try:
        if events is not None and events.is_dir():
            data = load_dataset(events)
            reports.append(stage.ingest_items_frame(lake, stage.as_text_frame(data.items), settings, f"{events} items"))
            if data.users is not None:
                reports.append(stage.ingest_users_frame(lake, stage.as_text_frame(data.users), f"{events} users"))
            reports.append(
                stage.ingest_events_frame(lake, stage.as_text_frame(data.events), settings, f"{events} events")
            )
        else:
            events_kind = amazon.detect_kind(events) if events is not None else None
            items_kind = amazon.detect_kind(items) if items is not None else None
            if events_kind == "meta":  # refused before anything is written
                raise ValueError(f"{events}: an Amazon metadata file given as --events; give it as --items")
            if items_kind == "reviews":
                raise ValueError(f"{items}: an Amazon reviews file given as --items; give it as --events")
            if items is not None and items_kind == "meta":
                frame = stage.as_text_frame(amazon.load_items(items))
                reports.append(stage.ingest_items_frame(lake, frame, settings, str(items)))
            elif items is not None:
                reports.append(stage.ingest_items_file(lake, items, settings))
            if users is not None:
                reports.append(stage.ingest_users_file(lake, users))
            if events is not None and events_kind == "reviews":
                frame = stage.as_text_frame(amazon.load_events(events))
                reports.append(stage.ingest_events_frame(lake, frame, settings, str(events)))
            elif events is not None:
                reports.append(stage.ingest_events_file(lake, events, settings))
    except (stage.IngestError, ValueError, FileNotFoundError) as exc:
        raise _fail(f"refused: {exc}", REFUSED_EXIT) from exc
    for rep in reports:
        reasons = f"  quarantined: {rep.reasons}" if rep.quarantined else ""
        typer.echo(f"{rep.source}: {rep.rows} rows, {rep.valid} landed, {rep.duplicates} duplicates{reasons}")
    typer.echo(f"lake: {lake.uri}")


def _check_night_inputs(settings: Settings) -> None:
    """Refuse in one line (exit 2) a night that could only fail: nothing to train on. Checked before the flow
    starts, so a user mistake is not retried and shows no traceback."""
    from nightrec.storage.lake import Lake

    lake = Lake(settings.lake_root)
    if not lake.has_items() and not settings.items_source:
        raise _fail(
            f"refused: no item catalogue in the lake ({lake.items_uri}): run `nightrec ingest --items FILE` "
            "first, or set NIGHTREC_ITEMS_SOURCE",
            REFUSED_EXIT,
        )
    if not lake.event_dates() and not settings.events_source:
        raise _fail(
            f"refused: no events in the lake ({lake.events_uri}): run `nightrec ingest --events FILE` first, "
            "or set NIGHTREC_EVENTS_SOURCE",
            REFUSED_EXIT,
        )


@app.command()
def nightly(date: DateOption = None) -> None:
    """The whole DAG for one date (default: today in the configured time zone)."""
    settings = _settings()
    _check_night_inputs(settings)
    from nightrec.flows.locks import RunInProgressError, start_temporary_prefect_server

    start_temporary_prefect_server(settings.home)
    from nightrec.flows.nightly import nightly as nightly_flow

    try:
        summary = nightly_flow(run_date=date.date() if date else None)
    except RunInProgressError as exc:
        raise _fail(f"refused: {exc}", RUN_IN_PROGRESS_EXIT) from exc
    _print_night(summary)


@app.command()
def backfill(
    start: Annotated[dt.datetime, typer.Option(formats=["%Y-%m-%d"], help="First date.")],
    end: Annotated[dt.datetime, typer.Option(formats=["%Y-%m-%d"], help="Last date (inclusive).")],
    force: Annotated[bool, typer.Option(help="Re-run dates that are already published.")] = False,
) -> None:
    """Nightly for each date, oldest first, skipping published dates unless --force; re-running resumes."""
    settings = _settings()
    if end < start:
        raise _fail(f"refused: --end {end.date()} is before --start {start.date()}", REFUSED_EXIT)
    _check_night_inputs(settings)
    from nightrec.flows.locks import start_temporary_prefect_server
    from nightrec.flows.nightly import BackfillError

    start_temporary_prefect_server(settings.home)
    from nightrec.flows.nightly import backfill as backfill_flow

    try:
        result = backfill_flow(start=start.date(), end=end.date(), force=force)
    except BackfillError as exc:
        raise _fail(str(exc)) from exc
    for line in result["nights"]:
        typer.echo(line)
    typer.echo(f"ran {len(result['ran'])} date(s): {', '.join(result['ran']) or '-'}")
    typer.echo(f"skipped {len(result['skipped'])} already published: {', '.join(result['skipped']) or '-'}")


@app.command()
def recommend(
    user: Annotated[str, typer.Option(help="User id.")],
    k: Annotated[int, typer.Option(help="How many items to show.")] = 10,
    date: DateOption = None,
) -> None:
    """Print a user's latest published list (or the list of --date) with the reasons."""
    from nightrec.storage import publication
    from nightrec.storage.lake import Lake

    settings = _settings()
    lake = Lake(settings.lake_root)
    try:
        frame = publication.read_user_list(lake, user, date.date() if date else None)
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    if frame.is_empty():
        raise _fail(f"user {user!r} has no published list (unknown user?)")
    titles = dict(lake.read_items().select("item_id", "title").iter_rows())
    first = frame.row(0, named=True)
    typer.echo(f"Recommendations for user {user} on {first['run_date']} (model version {first['model_version']}):")
    if k > frame.height:
        typer.echo(f"(asked for {k}: the published list has {frame.height} items, NIGHTREC_TOP_K at publish time)")
    for row in frame.head(k).iter_rows(named=True):
        title = titles.get(row["item_id"], row["item_id"])
        typer.echo(f"{row['rank']:>3}. {title}  [{row['item_id']}]  score {row['score']:.3f}")
        because = ", ".join(f"{r['title'] or r['item_id']} ({r['weight']:.2f})" for r in row["reasons"][:3])
        if because:
            typer.echo(f"     because you interacted with: {because}")


@app.command()
def demo(
    users: Annotated[int, typer.Option(help="Demo users.")] = 2000,
    items: Annotated[int, typer.Option(help="Demo items.")] = 3000,
    events: Annotated[int, typer.Option(help="Demo events over a year.")] = 120_000,
) -> None:
    """Generate the demo data, run one nightly (it ingests the files), print a sample of the lists."""
    from nightrec.sources.demo import DemoSpec, write_demo_files

    settings = _settings()
    spec = DemoSpec(users=users, items=items, events=events)
    paths = write_demo_files(settings.home / "demo", spec)
    typer.echo(f"demo data: {users} users, {items} items, {events} events in {paths['events'].parent}")
    os.environ["NIGHTREC_EVENTS_SOURCE"] = str(paths["events"])
    os.environ["NIGHTREC_ITEMS_SOURCE"] = str(paths["items"])
    os.environ["NIGHTREC_USERS_SOURCE"] = str(paths["users"])
    from nightrec.flows.locks import start_temporary_prefect_server
    from nightrec.flows.nightly import nightly as nightly_flow

    start_temporary_prefect_server(settings.home)

    summary = nightly_flow(run_date=spec.end + dt.timedelta(days=1))
    _print_night(summary)
    from nightrec.storage import publication
    from nightrec.storage.lake import Lake

    _, table = publication.read_latest(Lake(settings.lake_root))
    for user in sorted(set(table.column("user_id").to_pylist()))[:2]:
        typer.echo("")
        recommend(user=user, k=5, date=None)
    me = _command_name()
    typer.echo(f"\nNext: `{me} recommend --user {user}`, `{me} ui` (MLflow), README.md for the rest.")
    if me != "nightrec":
        typer.echo(f"(`nightrec` is not on PATH in this shell: `. {Path(me).parent}/activate` puts it there)")


def _command_name() -> str:
    """How to type this command again: ``nightrec`` when that is on PATH, else the script's path (``.venv/bin/``)."""
    import shutil

    script = Path(sys.executable).with_name("nightrec")
    found = shutil.which("nightrec")
    if found and Path(found).resolve() == script.resolve():
        return "nightrec"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def _print_night(summary: dict) -> None:
    settings = Settings()
    gate, published = summary["gate"], summary["publish"]
    typer.echo(f"nightly {summary['run_date']}: {published.get('users')} users, {published.get('rows')} rows published")
    ingest = summary.get("ingest")
    if ingest:
        quarantined = {k.removesuffix("_quarantined"): int(v) for k, v in ingest.items() if k.endswith("_quarantined")}
        where = Path(settings.lake_root) / "quarantine"
        landed = ", ".join(f"{kind} {int(ingest.get(kind + '_valid', 0))}" for kind in quarantined)
        held = ", ".join(f"{kind} {count}" for kind, count in quarantined.items())
        typer.echo(f"  ingest: landed {landed}; quarantined {held} row(s), with their reasons, in {where}")
    for name, metrics in gate["holdout"].items():
        typer.echo(f"  holdout {name:<11} NDCG@10 {metrics['ndcg_at_10']:.4f}  Recall@20 {metrics['recall_at_20']:.4f}")
    typer.echo(f"  model version {gate['model_version']} ({gate['published_model']}): {gate['reason']}")
    typer.echo(f"  lists: {settings.lake_root}/recommendations (Delta table, run_date={summary['run_date']})")
    where = redact(settings.tracking_uri)
    typer.echo(f"  MLflow run {summary['mlflow_run_id']} in {where} (open it with `nightrec ui`)")


@app.command()
def evaluate(
    dataset: Annotated[
        list[Path],
        typer.Option(
            help="A MovieLens folder (100K, 1M or latest layout), an Amazon Review Data 2018 category folder "
            "(reviews *_5.json.gz + meta_*.json.gz), its name under --datasets-dir, or `demo`. Repeat for several."
        ),
    ],
    epochs: Annotated[int | None, typer.Option(help="Override training epochs.")] = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds of the split; every figure is mean ± std over them.")] = 3,
    datasets_dir: Annotated[
        Path, typer.Option(envvar="NIGHTREC_DATASETS", help="Where dataset names are looked up.")
    ] = Path("../shared/datasets"),
) -> None:
    """Offline evaluation (docs/design.md protocol) of nightrec against the peers, one MLflow run per catalogue."""
    from nightrec.flows.offline import run_offline_evaluation

    sources: list[Path | str] = []
    for folder in dataset:
        if str(folder) == "demo":
            sources.append("demo")
            continue
        if not folder.exists() and (datasets_dir / folder).is_dir():
            folder = datasets_dir / folder  # `--dataset movielens-100k`
        if not folder.is_dir():
            raise typer.BadParameter(f"{folder}: no such folder (nor under {datasets_dir})", param_hint="--dataset")
        sources.append(folder)
    settings = _settings()
    from nightrec.extras import MissingExtraError

    for source in sources:
        try:
            report = run_offline_evaluation(
                settings, source, epochs, seeds=range(seeds), progress=lambda m: typer.echo(m, err=True)
            )
        except (ValueError, MissingExtraError) as exc:  # a folder that is neither layout; a peer not installed
            raise _fail(f"refused: {exc}", 2) from exc
        typer.echo(report["markdown"])
        typer.echo(f"MLflow run {report['mlflow_run_id']} in {redact(settings.tracking_uri)}")


@app.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address of the Prefect server (default NIGHTREC_SERVE_HOST, 127.0.0.1).")
    ] = None,
    port: Annotated[int, typer.Option(help="Port of the Prefect server and its UI.")] = 4200,
) -> None:
    """A local Prefect server and the nightly + backfill deployments, in the foreground; Ctrl-C or SIGTERM stops
    all of it. With NIGHTREC_PREFECT_API_URL set, serves the deployments to that server instead (README: the work
    pool path, `prefect deploy` + `prefect worker start`, is the other way)."""
    settings = _settings()
    from nightrec.deployments.serve import serve_forever

    try:
        serve_forever(settings, port=port, host=host)
    except ValueError as exc:  # a non-loopback host without authentication
        raise _fail(f"refused: {exc}", REFUSED_EXIT) from exc


@app.command()
def ui(port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000) -> None:
    """The MLflow UI for this home's runs on 127.0.0.1 (one worker; Ctrl-C or SIGTERM stops it and its workers).
    Only its own address is accepted as Host and as a state-changing request's Origin (DNS rebinding, cross-site
    requests)."""
    import subprocess

    from nightrec.deployments.guard import own_addresses
    from nightrec.deployments.serve import stop_process_group, terminated_as_interrupt

    settings = _settings()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    hosts, origins = own_addresses("127.0.0.1", port)
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", settings.tracking_uri, "--default-artifact-root", settings.artifact_root,
        "--allowed-hosts", ",".join(sorted(hosts)), "--cors-allowed-origins", ",".join(sorted(origins)),
    ]  # fmt: skip
    typer.echo(f"MLflow UI: http://127.0.0.1:{port}  (experiment '{settings.mlflow_experiment}')")
    # Its own process group: a signal to us stops the server and every worker it forked, none is left listening.
    with terminated_as_interrupt():
        server = subprocess.Popen(command, env=env, start_new_session=True)
        try:
            server.wait()
        except KeyboardInterrupt:
            pass
        finally:
            stop_process_group(server)
    typer.echo("stopped")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
