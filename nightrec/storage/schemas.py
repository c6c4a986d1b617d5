"""Arrow schemas and Delta table specs of everything the lake stores: the contract in docs/contract.md.

A change to a table's schema must bump its ``version`` (kept in the table's Delta metadata as
``nightrec.schema_version``): a writer whose schema differs from the table's at the same version is refused, and
``tests/storage/test_schemas.py`` pins each version's fields.
"""

from __future__ import annotations

import pyarrow as pa

from nightrec.storage.delta import TableSpec

EVENTS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("value", pa.float64()),
    ]
)

ITEMS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string(), nullable=False),
        pa.field("description", pa.string()),
        pa.field("genres", pa.list_(pa.string())),
        pa.field("updated_at", pa.timestamp("us", tz="UTC")),
        pa.field("available", pa.bool_()),
    ]
)

# User attributes are free-form: user_id plus any string columns.
USERS_KEY = pa.field("user_id", pa.string(), nullable=False)


def quarantine_schema(columns: list[str]) -> pa.Schema:
    """Rejected rows: every source column as text, plus why and where from."""
    fields = [pa.field(c, pa.string()) for c in columns]
    fields += [pa.field("reason", pa.string(), nullable=False), pa.field("source_file", pa.string(), nullable=False)]
    return pa.schema(fields)


def embedding_schema(key: str, dim: int) -> pa.Schema:
    """Cached embeddings of items or users: key, text hash, model id, fixed-size float32 vector."""
    return pa.schema(
        [
            pa.field(key, pa.string(), nullable=False),
            pa.field("text_hash", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


# weight: the reason's share of the history's attribution to the recommended item (nightrec.model.reasons), in
# [-1, 1], reasons of one item sum to at most 1 in absolute value; phrase: a short text from catalogue data, or null
REASON = pa.struct(
    [
        pa.field("item_id", pa.string()),
        pa.field("title", pa.string()),
        pa.field("weight", pa.float32()),
        pa.field("phrase", pa.string()),
    ]
)

RECOMMENDATIONS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("reasons", pa.list_(REASON), nullable=False),
        pa.field("run_date", pa.date32(), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
    ]
)

# --- the Delta tables (docs/contract.md) ----------------------------------------------------------------------------
EVENTS_TABLE = TableSpec(
    "events", EVENTS.append(pa.field("date", pa.date32(), nullable=False)), version=1, partition_by=("date",)
)
ITEMS_TABLE = TableSpec("items", ITEMS, version=1)
USERS_TABLE = TableSpec("users", pa.schema([USERS_KEY]), version=1, free_form=True)
QUARANTINE_TABLE = TableSpec(
    "quarantine",
    pa.schema(
        [
            pa.field("reason", pa.string()),
            pa.field("source_file", pa.string()),
            pa.field("batch_id", pa.string()),
            pa.field("date", pa.date32()),
        ]
    ),
    version=1,
    partition_by=("date",),
    free_form=True,
)
# The published lists: the rows build_lists makes, plus the MLflow run that published them (one value per run date).
RECOMMENDATIONS_TABLE = TableSpec(
    "recommendations",
    RECOMMENDATIONS.append(pa.field("mlflow_run_id", pa.string(), nullable=False)),
    version=1,
    partition_by=("run_date",),
)
TABLES = (EVENTS_TABLE, ITEMS_TABLE, USERS_TABLE, QUARANTINE_TABLE, RECOMMENDATIONS_TABLE)
