"""Training cost: nightrec (validation-chosen epochs, the tuned sequence part, the prior's calibration and refit, then
served vectors for every user) against implicit ALS and against SASRec-CE tuned the way the evaluation tunes its peer
(the same grid, every trial early-stopped on a validation carved from the users' newest items, then refitted).

Run: ``.venv/bin/python bench/train.py [--dataset movielens-100k|amazon2018-gift-cards|demo|demo-400k] [--epochs N]
[--threads T] [--peers als sasrec]``. Each trainer runs in its own child process so its peak
resident memory is its own (reported as the rise over the child's RSS after loading data and imports). implicit runs
inside ``threadpool_limits(1, "blas")`` as the stack notes advise; torch uses the machine's cores. Last stdout line:
ONE JSON object with the nightrec / ALS ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import item_vectors, load  # noqa: E402


def _rss_mb() -> float:
    # current RSS from /proc (Linux); ru_maxrss is the peak so far, in KiB
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(which: str, epochs: int | None, name: str, threads: int) -> dict:
    import numpy as np
    import torch

    from nightrec.model import TrainConfig, user_sequences
    from nightrec.tasks import evaluate, train

    if threads:
        torch.set_num_threads(threads)
    dataset = load(name)
    vectors = item_vectors(dataset)
    item_ids = dataset.items["item_id"].to_list()
    _, seqs = user_sequences(dataset.events, {i: n for n, i in enumerate(item_ids)})
    torch.zeros(1) @ torch.zeros(1)  # load the kernels before the baseline
    baseline = _rss_mb()
    started = time.perf_counter()
    if which == "nightrec":
        config = TrainConfig(seed=42)
        if epochs:
            config.epochs = epochs
        model = train.fit_recommender(dataset.events, item_ids, vectors, None, config)
        trained = time.perf_counter()
        served = model.served_vectors(dataset.events, dataset.events["user_id"].unique().sort().to_list())
        assert np.isfinite(served.user_matrix).all()
        parts = {k: model.meta.get(k) for k in ("validation_fit_epochs", "best_epoch", "epochs", "cold_epochs")}
        parts |= {
            k: model.meta.get(k) for k in ("sequence_seconds", "item_item_seconds", "sequence_params", "phase_seconds")
        }
    else:
        parts = {}
    if which == "sasrec":
        from nightrec.tasks import protocol, sasrec

        split = protocol.chronological_split([s for s in seqs if len(s)], seed=0)
        inner, histories, relevant = split.validation
        params = sasrec.tune_sasrec(inner, len(item_ids), (histories, relevant), seed=0, log=lambda _m: None)
        sasrec.SASRec([s for s in seqs if len(s)], len(item_ids), seed=0, **params)
        trained = time.perf_counter()
    elif which == "als":
        evaluate.ALS(seqs, len(item_ids), factors=64, regularization=0.05, alpha=2.0, iterations=15)
        trained = time.perf_counter()
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "fit_s": round(trained - started, 2),
        "total_s": round(done - started, 2),
        "peak_rss_rise_mb": round(peak - baseline, 1),
        "torch_threads": torch.get_num_threads(),
        **parts,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--dataset", default="movielens-100k")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--child", choices=["nightrec", "als", "sasrec"])
    parser.add_argument(
        "--peers", nargs="+", choices=["als", "sasrec"], default=["als", "sasrec"], help="peers measured beside it"
    )
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.epochs, args.dataset, args.threads)))
        return
    results = {}
    for which in (*args.peers, "nightrec"):
        cmd = [sys.executable, __file__, "--child", which, "--dataset", args.dataset, "--threads", str(args.threads)]
        cmd += ["--epochs", str(args.epochs)] if args.epochs else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[which] = json.loads(out)
        print(which, results[which])
    n = results["nightrec"]
    summary = {"dataset": args.dataset, "nightrec_total_s": n["total_s"], "nightrec_fit_s": n["fit_s"]}
    summary["nightrec_peak_rss_rise_mb"] = n["peak_rss_rise_mb"]
    for peer in args.peers:  # SASRec's fit includes its tuning (the grid, every trial early-stopped)
        p = results[peer]
        summary[f"{peer}_total_s"] = p["total_s"]
        summary[f"time_ratio_nightrec_over_{peer}"] = round(n["total_s"] / max(p["total_s"], 1e-9), 2)
        summary[f"{peer}_peak_rss_rise_mb"] = p["peak_rss_rise_mb"]
        memory = n["peak_rss_rise_mb"] / max(p["peak_rss_rise_mb"], 1.0)
        summary[f"memory_ratio_nightrec_over_{peer}"] = round(memory, 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
