"""Arrow schemas of everything the lake stores: the contracts in DESIGN.md."""

from __future__ import annotations

import pyarrow as pa

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
