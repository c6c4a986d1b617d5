"""`nightrec evaluate`: the docs/design.md protocol on each catalogue given, nightrec against the peers over several
seeds, one MLflow run per catalogue with its table, its ratio summary and its plots."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from nightrec.flows.locks import open_tracking
from nightrec.settings import Settings
from nightrec.storage import tracking


def load_catalogue(source: Path | str):
    """A dataset folder (MovieLens or Amazon 2018 layout) or ``demo`` (``demo.PROTOCOL_SPEC``)."""
    if str(source) == "demo":
        from nightrec.sources import demo

        return demo.dataset()
    from nightrec.sources import load_dataset

    return load_dataset(Path(source))


def run_offline_evaluation(
    settings: Settings,
    dataset_dir: Path | str,
    epochs: int | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Encode the catalogue with the configured model, run the protocol per seed, log table, summary and plots."""
    from nightrec.model import TrainConfig
    from nightrec.tasks import embed, protocol

    name = Path(dataset_dir).name
    dataset = load_catalogue(dataset_dir)
    experiment = f"{settings.mlflow_experiment}-offline"
    client, exp = open_tracking(settings.home, settings.tracking_uri, experiment, settings.artifact_root)
    run_id = tracking.start_run(
        client, exp, f"evaluate-{name}", {"nightrec.kind": "offline", "dataset": str(dataset_dir)}
    )
    try:
        encoder = embed.load_encoder(settings.embedding_model, settings.embedding_max_length, settings.embedding_device)
        texts = embed.item_texts(dataset.items, settings.item_text_template)
        vectors = encoder.encode(texts, batch_size=settings.embedding_batch_size)
        config = TrainConfig()
        if epochs or settings.train_epochs:
            config.epochs = epochs or settings.train_epochs
        tracking.log_params(
            client,
            run_id,
            {
                "dataset": dataset_dir,
                "events": dataset.events.height,
                "model": settings.embedding_model,
                "seeds": list(seeds),
                **config.to_dict(),
            },
        )
        result = protocol.run_seeds(dataset, vectors, config, seeds=seeds, progress=progress, name=name)
        for method in result.methods:
            means = {f"{method}_{c}": result.mean_std(method, c)[0] for c in result.columns()}
            spreads = {f"{method}_{c}_std": result.mean_std(method, c)[1] for c in result.columns()}
            tracking.log_metrics(client, run_id, means | spreads)
        summary = result.summary()
        tracking.log_metrics(client, run_id, {f"ratio_{m}": e["ratio"] for m, e in summary.items()})
        client.log_table(run_id, _table(result), f"tables/{name}.json")
        tracking.log_dict(client, run_id, summary, f"tables/{name}-summary.json")
        tracking.log_dict(client, run_id, [r.info for r in result.runs], "protocol_info.json")
        for figure_name, figure in result.figures(f"on {name}").items():
            tracking.log_figure(client, run_id, figure, f"plots/{figure_name}.png")
        markdown = f"## {name}\n\n{result.to_markdown()}\n\n{result.summary_markdown()}"
        client.log_text(run_id, markdown, f"tables/{name}.md")
        client.set_tag(run_id, "mlflow.note.content", result.summary_markdown())  # the run page's Description
    except BaseException:
        tracking.finish_run(client, run_id, failed=True)
        raise
    tracking.finish_run(client, run_id)
    return {"mlflow_run_id": run_id, "markdown": markdown, "summary": summary}


def _table(result) -> dict[str, list]:
    """Columns for ``MlflowClient.log_table``: one row per method, ``<metric>`` means and ``<metric>_std``."""
    columns = result.columns()
    table: dict[str, list] = {"method": list(result.methods)}
    for c in columns:  # means first, so the UI's first columns are the figures themselves
        table[c] = [round(result.mean_std(m, c)[0], 5) for m in result.methods]
    for c in columns:
        table[f"{c}_std"] = [round(result.mean_std(m, c)[1], 5) for m in result.methods]
    return table
