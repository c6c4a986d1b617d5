"""Where bytes live: the lake's Delta tables (docs/contract.md), Arrow schemas, local caches and locks, the MLflow
registry. Imports nothing of ours above it."""
