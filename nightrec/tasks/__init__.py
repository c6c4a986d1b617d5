"""One module per pipeline stage: pure functions first, a thin Prefect task on top."""
