"""Prefect deployments of the nightly and backfill flows, and the `nightrec serve` entry point."""
