"""Recommendation quality on several catalogues: nightrec against popularity, item-kNN, EASE, implicit ALS, SASRec
(full-softmax CE) and text-only, docs/design.md protocol (every segment, peers tuned on validation in the same run,
several seeds of the split, mean ± std).

Run: ``.venv/bin/python bench/quality.py --dataset movielens-100k|amazon2018-gift-cards|demo [--seeds 0 1 2]
[--epochs N] [--sequence-members K] [--stratified] [--ablations]``. Prints the table (mean ± std over seeds), the
ratio table, then ONE JSON object as the last line: per headline metric nightrec's mean, the best peer, the ratio to
it (mean ± std over seeds) and to popularity. Item text vectors are cached in tmp/.cache by the texts' digest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("NIGHTREC_DATASETS", REPO.parent / "shared" / "datasets"))
CACHE = REPO / "tmp" / ".cache"
TEMPLATE = "{title}. Genres: {genres}. {description}"  # Settings().item_text_template's default


def load(name: str):
    """A catalogue by name: ``demo`` or ``demo-400k`` (generated) or a folder under NIGHTREC_DATASETS (MovieLens or
    Amazon 2018)."""
    if name in ("demo", "demo-400k"):
        from nightrec.sources import demo

        # demo.PROTOCOL_SPEC: 1.5 times the demo night; demo.COST_SPEC: 400,000 events (the training-cost target)
        return demo.dataset(demo.PROTOCOL_SPEC if name == "demo" else demo.COST_SPEC)
    from nightrec.sources import load_dataset

    folder = Path(name) if Path(name).is_dir() else DATASETS / name
    if not folder.is_dir():
        sys.exit(f"bench/quality.py: no dataset folder {folder}")
    return load_dataset(folder)


def item_vectors(dataset, cache: Path = CACHE) -> np.ndarray:
    """MiniLM vectors of the item texts (row i = dataset.items row i), cached by the texts' digest."""
    from nightrec.tasks.embed import item_texts

    texts = item_texts(dataset.items, TEMPLATE)
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = cache / f"minilm-{digest}.npy"
    if path.exists():
        return np.load(path)
    from nightrec.tasks.embed import load_encoder

    vectors = load_encoder().encode(texts, batch_size=64)
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def _cold_warm(metrics: dict) -> dict:
    keys = ("warm_ndcg_at_10", "warm_recall_at_20", "warm_coverage", "cold_k0_ndcg_at_20", "cold_k1_ndcg_at_20")
    keys += ("cold_k3_ndcg_at_20", "cold_k5_ndcg_at_20")
    return {k: round(metrics[k], 4) for k in keys}


def ablations(
    dataset, vectors: np.ndarray, seed: int, epochs: int | None, members: int, only: list[str] | None = None
) -> dict[str, dict]:
    """One seed's chronological split, nightrec variants only: what each component and warm starting buys. ``only``:
    the variants whose name contains one of these words (the full model always runs)."""
    import dataclasses
    import tempfile

    from nightrec import model
    from nightrec.tasks import evaluate, protocol

    item_ids = dataset.items["item_id"].to_list()
    _, seqs = model.user_sequences(dataset.events, {item: i for i, item in enumerate(item_ids)})
    split = protocol.chronological_split([s for s in seqs if len(s)], seed)
    # epochs None: early stopping decides (the default)
    base = model.TrainConfig(seed=seed, epochs=epochs, sequence_members=members)
    rows: dict[str, dict] = {}

    def run(name: str, config, **kw) -> None:
        started = time.perf_counter()
        scorer = evaluate.fit_nightrec(split.train, item_ids, vectors, config, **kw)
        seconds = time.perf_counter() - started
        metrics, _ = protocol.evaluate_split({"m": scorer}, split)
        meta = scorer.recommender.meta
        spent = (meta.get("validation_fit_epochs") or 0) + (meta.get("epochs") or 0)
        rows[name] = {**_cold_warm(metrics["m"]), "train_s": round(seconds, 1), "epochs": spent}
        print(f"seed {seed}:", name, rows[name], file=sys.stderr, flush=True)

    variants = {
        "full model (defaults)": {},
        "no sequence part": {"sequence_part": False},
        "sequence part untuned (dropout 0.3, length 50)": {"sequence_dropout": 0.3},
        "ordered prior in the meta model, no sequence part": {"prior": "sequence", "sequence_part": False},
        "no popularity prior": {"popularity_prior": False},
        "no inner steps (no meta-learning)": {"inner_steps": 0},
        "no LM features": {"use_text": False},
        "no ID embedding": {"use_id": False},
        "ID dropout 0.2": {"id_dropout": 0.2},
        "fixed 30 epochs (no early stopping)": {"epochs": 30},
    }

    warm_row = "from last night's champion (warm start)"

    def wanted(name: str) -> bool:
        return not only or name == "full model (defaults)" or any(word in name for word in only)

    for name, change in variants.items():
        if wanted(name):
            run(name, dataclasses.replace(base, **change))
    if not wanted(warm_row):
        return rows
    with tempfile.TemporaryDirectory() as tmp:
        # last night's champion lacked the newest event of a seeded 10 % of the users (a night's new events, ~2 % of
        # them): the night continues it (a champion of other data, e.g. 70 % of the events, is not continued)
        rng = np.random.default_rng([seed, 7])
        newer = rng.random(len(split.train)) < 0.1
        older = [s[:-1] if new and len(s) > 1 else s for s, new in zip(split.train, newer, strict=True)]
        champion = evaluate.fit_nightrec(older, item_ids, vectors, base).recommender.save(Path(tmp) / "champion")
        run(warm_row, base, init_from=champion)
    return rows


def ablation_table(per_seed: list[dict[str, dict]], seeds: list[int]) -> str:
    """The ablation rows as mean ± std over seeds, with each variant's warm NDCG@10 minus the full model's per seed
    (mean ± std): a paired difference, since every variant of a seed shares the split."""
    names = list(per_seed[0])
    columns = list(per_seed[0][names[0]])
    full = next(iter(names))
    lines = [
        f"seeds {seeds}; cells: mean ± std over seeds; delta: warm NDCG@10 minus the full model's, paired by seed",
        "",
        "| variant | " + " | ".join(columns) + " | delta warm NDCG@10 |",
        "|---|" + "---|" * (len(columns) + 1),
    ]
    for name in names:
        cells = []
        for column in columns:
            values = np.array([rows[name][column] for rows in per_seed], dtype=float)
            cells.append(f"{values.mean():.4f} ± {values.std():.4f}" if len(values) > 1 else f"{values[0]:.4f}")
        delta = np.array([rows[name]["warm_ndcg_at_10"] - rows[full]["warm_ndcg_at_10"] for rows in per_seed])
        cells.append(f"{delta.mean():+.4f} ± {delta.std():.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from nightrec import model
    from nightrec.tasks import protocol

    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--dataset", default="movielens-100k", help="movielens-100k, amazon2018-gift-cards, demo, or a folder"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument(
        "--sequence-members",
        type=int,
        default=model.TrainConfig().sequence_members,
        help="fits of the sequence part averaged in the served model (setting train_sequence_members)",
    )
    parser.add_argument(
        "--tuning-trials",
        type=int,
        default=model.TrainConfig().tuning_trials,
        help="trials of the sequence part's search and of the SASRec peer's (train_tuning_trials; 1: the grid alone)",
    )
    parser.add_argument("--stratified", action="store_true", help="also the random 75/25 split stratified by item")
    parser.add_argument("--ablations", action="store_true", help="nightrec variants and warm start instead of peers")
    parser.add_argument("--only", nargs="+", help="with --ablations: the variants whose name contains one of these")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # two benchmarks side by side on 2 cores: one thread each
    dataset = load(args.dataset)
    vectors = item_vectors(dataset)
    if args.ablations:
        per_seed = [
            ablations(dataset, vectors, seed, args.epochs, args.sequence_members, args.only) for seed in args.seeds
        ]
        print(ablation_table(per_seed, args.seeds))
        print(json.dumps({"dataset": args.dataset, "seeds": args.seeds, "ablations": per_seed}))
        return
    config = model.TrainConfig(sequence_members=args.sequence_members, tuning_trials=args.tuning_trials)
    if args.epochs:
        config.epochs = args.epochs
    started = time.perf_counter()
    result = protocol.run_seeds(
        dataset,
        vectors,
        config,
        seeds=args.seeds,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
        name=args.dataset,
        stratified=args.stratified,
    )
    seconds = round(time.perf_counter() - started, 1)
    info = result.runs[0].info
    print(f"## {args.dataset}: {info['users']} users, {info['items']} items, seeds {args.seeds}, {seconds} s\n")
    print(f"segment users (seed {args.seeds[0]}): {info['segment_users']}; cold items: {info['cold_items']}\n")
    print(result.to_markdown() + "\n")
    print(result.summary_markdown() + "\n")
    for run in result.runs:
        print(f"seed {run.info['seed']}: peers {json.dumps(run.info['peer_params'], default=str)}", file=sys.stderr)
    reasons = _reasons_table(result.runs)
    if reasons:
        print(reasons + "\n")
    fidelity = {k: _mean_over(result.runs, k) for k in ("reasons", "reasons_cosine")}
    summary = {"dataset": args.dataset, "seeds": args.seeds, "seconds": seconds, **result.summary(), **fidelity}
    print(json.dumps(summary))


def _mean_over(runs, key: str) -> dict:
    rows = [r.info[key] for r in runs if key in r.info]
    return {k: round(float(np.mean([row[k] for row in rows])), 4) for k in rows[0]} if rows else {}


def _reasons_table(runs) -> str:
    """The deletion test of the published reasons (model attribution vs cosine), mean ± std over seeds."""
    columns = ("share_top_lowers_more", "share_lists", "mean_rank_drop_top", "mean_rank_drop_random")
    lines = ["| reasons by | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key, label in (("reasons", "model attribution (published)"), ("reasons_cosine", "cosine (before)")):
        rows = [r.info[key] for r in runs if key in r.info]
        if not rows:
            return ""
        cells = [f"{np.mean([row[c] for row in rows]):.3f} ± {np.std([row[c] for row in rows]):.3f}" for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
