"""Nights after the first: training on a catalogue from scratch, then again on the same events warm-started from
that model (what the nightly does when nothing changed). The target (issue #13): the second costs at most 25 % of the
first.

Run: ``.venv/bin/python bench/warm_night.py [--dataset amazon2018-gift-cards|movielens-100k|demo] [--threads 1]``.
Last stdout line: ONE JSON object with both times, their ratio and the epochs each fit ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import item_vectors, load  # noqa: E402

KEYS = ("validation_fit_epochs", "epochs", "cold_epochs", "best_validation_ndcg", "sequence_seconds")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="amazon2018-gift-cards")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from nightrec.model import TrainConfig
    from nightrec.tasks.train import fit_recommender

    dataset = load(args.dataset)
    vectors = item_vectors(dataset)
    item_ids = dataset.items["item_id"].to_list()
    events = dataset.events.select("user_id", "item_id", "timestamp")
    config = TrainConfig(threads=args.threads, seed=0)
    started = time.perf_counter()
    first = fit_recommender(events, item_ids, vectors, None, config)
    scratch_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        champion = first.save(Path(folder) / "champion")
        started = time.perf_counter()
        second = fit_recommender(events, item_ids, vectors, None, config, init_from=champion)
        warm_s = time.perf_counter() - started
    print(
        json.dumps(
            {
                "dataset": args.dataset,
                "scratch_s": round(scratch_s, 1),
                "warm_s": round(warm_s, 1),
                "ratio": round(warm_s / scratch_s, 3),
                "scratch": {k: first.meta.get(k) for k in KEYS},
                "warm": {k: second.meta.get(k) for k in KEYS},
            }
        )
    )


if __name__ == "__main__":
    main()
