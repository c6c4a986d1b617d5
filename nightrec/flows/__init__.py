"""The DAG (nightly, backfill) and the ``nightrec`` command line."""
