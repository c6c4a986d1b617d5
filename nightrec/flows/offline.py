"""`nightrec evaluate`: the DESIGN.md protocol on a public dataset, nightrec against the peers, logged to MLflow."""

from __future__ import annotations

from pathlib import Path

from nightrec.settings import Settings
from nightrec.storage import tracking


def run_offline_evaluation(settings: Settings, dataset_dir: Path, epochs: int | None = None) -> dict:
    """Encode the catalogue with the configured model, run the protocol, log metrics, table and plots."""
    from nightrec.sources import load_dataset
    from nightrec.tasks import embed, evaluate, train

    dataset = load_dataset(dataset_dir)
    client = tracking.client_for(settings.tracking_uri)
    exp = tracking.experiment_id(client, f"{settings.mlflow_experiment}-offline", settings.artifact_root)
    run_id = tracking.start_run(
        client, exp, f"evaluate-{Path(dataset_dir).name}", {"nightrec.kind": "offline", "dataset": str(dataset_dir)}
    )
    try:
        encoder = embed.load_encoder(settings.embedding_model, settings.embedding_max_length, settings.embedding_device)
        texts = embed.item_texts(dataset.items, settings.item_text_template)
        vectors = encoder.encode(texts, batch_size=settings.embedding_batch_size)
        config = train.TrainConfig(seed=settings.seed)
        if epochs or settings.train_epochs:
            config.epochs = epochs or settings.train_epochs
        tracking.log_params(
            client,
            run_id,
            {
                "dataset": dataset_dir,
                "events": dataset.events.height,
                "model": settings.embedding_model,
                **config.to_dict(),
            },
        )
        result = evaluate.run_protocol(dataset, vectors, config, seed=settings.seed)
        for method, metrics in result.metrics.items():
            tracking.log_metrics(client, run_id, {f"{method}_{k}": v for k, v in metrics.items()})
        for name, figure in result.figures().items():
            tracking.log_figure(client, run_id, figure, f"plots/{name}.png")
        markdown = result.to_markdown()
        tracking.log_dict(client, run_id, result.metrics, "metrics.json")
    except BaseException:
        tracking.finish_run(client, run_id, failed=True)
        raise
    tracking.finish_run(client, run_id)
    return {"mlflow_run_id": run_id, "markdown": markdown, "metrics": result.metrics}
