"""nightrec: a nightly recommender pipeline."""

__version__ = "0.1.0"
