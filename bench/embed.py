"""Embedding throughput against sentence-transformers, incremental nights, and the int8 fast path's quality.

    python bench/embed.py [--items 5000] [--rounds 3] [--batch-size 32]

1. Same model (the packaged all-MiniLM-L6-v2), same demo catalogue texts, same thread count, fp32 both:
   our ``TextEncoder.encode`` against ``SentenceTransformer(path).encode``; rounds alternate, medians reported.
2. ``embed_items`` on an empty lake (full night, model load included), then after 1 % of the items changed text
   (incremental night): wall-clock ratio full / incremental.
3. The int8 fast path: throughput, cosine to fp32 per item, top-10 neighbour overlap with fp32.

The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402

from nightrec.settings import Settings  # noqa: E402
from nightrec.sources import demo  # noqa: E402
from nightrec.storage.lake import Lake  # noqa: E402
from nightrec.storage.schemas import ITEMS  # noqa: E402
from nightrec.tasks import embed  # noqa: E402


def catalogue(n: int, seed: int = 11) -> pl.DataFrame:
    """The demo generator's catalogue in the lake's ITEMS schema."""
    _, items, _ = demo.generate(demo.DemoSpec(items=n, users=10, events=100, bad_row_fraction=0.0, seed=seed))
    return items.with_columns(
        pl.col("genres").str.split("|"),
        pl.lit(None, pl.Datetime("us", "UTC")).alias("updated_at"),
        pl.lit(True).alias("available"),
    ).select(ITEMS.names)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def throughput(texts: list[str], threads: int, batch_size: int, rounds: int) -> dict:
    from sentence_transformers import SentenceTransformer

    path = embed.resolve_model_path(embed.DEFAULT_MODEL_ID)
    torch.set_num_threads(threads)
    peer = SentenceTransformer(path, device="cpu")
    ours = embed.load_encoder(embed.DEFAULT_MODEL_ID, max_length=128, device="cpu", threads=threads)
    peer.max_seq_length = ours.max_length  # the same truncation for both (no text here reaches it)
    peer.encode(texts[:64], batch_size=batch_size)  # warm-up both
    ours.encode(texts[:64], batch_size=batch_size)
    peer_rates, our_rates = [], []
    for _ in range(rounds):
        ref, seconds = timed(lambda: peer.encode(texts, batch_size=batch_size, normalize_embeddings=True))
        peer_rates.append(len(texts) / seconds)
        got, seconds = timed(lambda: ours.encode(texts, batch_size=batch_size))
        our_rates.append(len(texts) / seconds)
        torch.set_num_threads(threads)
    lengths = [len(t) for t in ours.token_ids(texts)]
    return {
        "texts": len(texts),
        "mean_tokens": float(np.mean(lengths)),
        "threads": threads,
        "batch_size": batch_size,
        "st_items_per_s": statistics.median(peer_rates),
        "ours_items_per_s": statistics.median(our_rates),
        "speed_ratio": statistics.median(our_rates) / statistics.median(peer_rates),
        "st_rates": [round(r, 1) for r in peer_rates],
        "our_rates": [round(r, 1) for r in our_rates],
        "max_abs_diff_vs_st": float(np.abs(np.asarray(ref) - got).max()),
    }


def nights(items: pl.DataFrame, threads: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        lake = Lake(Path(tmp) / "lake")
        settings = Settings(home=Path(tmp), embedding_threads=threads, embedding_batch_size=batch_size)
        lake.replace_items(items)
        full, full_s = timed(lambda: embed.embed_items(lake, settings))
        rng = np.random.default_rng(3)
        changed = rng.choice(items.height, size=max(1, items.height // 100), replace=False)
        flag = pl.Series(np.isin(np.arange(items.height), changed))
        night2 = items.with_columns(
            pl.when(flag).then(pl.col("description") + " Now restored in 4K.").otherwise(pl.col("description"))
        )
        lake.replace_items(night2)
        incremental, incremental_s = timed(lambda: embed.embed_items(lake, settings))
        ids = night2["item_id"].to_list()
        stored = embed.load_item_embeddings(lake, settings, [ids[i] for i in changed])
        texts = embed.item_texts(night2, settings.item_text_template)
        encoder = embed.settings_encoder(settings)
        fresh = encoder.encode([texts[i] for i in changed])
        quiet, quiet_s = timed(lambda: embed.embed_items(lake, settings))
    return {
        "full_night_s": full_s,
        "full_embedded": full["embedded"],
        "incremental_night_s": incremental_s,
        "incremental_embedded": incremental["embedded"],
        "incremental_reused": incremental["reused"],
        "full_over_incremental": full_s / incremental_s,
        "unchanged_night_s": quiet_s,
        "changed_items_max_abs_diff": float(np.abs(stored - fresh).max()),
    }


def fast_path(texts: list[str], threads: int, batch_size: int, rounds: int) -> dict:
    exact = embed.load_encoder(device="cpu", threads=threads)
    quick = embed.load_encoder(device="cpu", threads=threads, fast_path="int8")
    quick.encode(texts[:64], batch_size=batch_size)
    rates_exact, rates_quick = [], []
    for _ in range(rounds):
        a, seconds = timed(lambda: exact.encode(texts, batch_size=batch_size))
        rates_exact.append(len(texts) / seconds)
        b, seconds = timed(lambda: quick.encode(texts, batch_size=batch_size))
        rates_quick.append(len(texts) / seconds)
    cosine = np.sum(a * b, axis=1)
    return {
        "int8_items_per_s": statistics.median(rates_quick),
        "fp32_items_per_s": statistics.median(rates_exact),
        "int8_speedup": statistics.median(rates_quick) / statistics.median(rates_exact),
        "int8_cosine_mean": float(cosine.mean()),
        "int8_cosine_min": float(cosine.min()),
        "int8_top10_overlap": neighbour_overlap(a, b, 10),
    }


def neighbour_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean share of each item's k nearest catalogue neighbours (itself excluded) that both encodings agree on."""
    overlaps = []
    for start in range(0, len(a), 1024):
        sa, sb = a[start : start + 1024] @ a.T, b[start : start + 1024] @ b.T
        rows = np.arange(sa.shape[0])
        sa[rows, rows + start] = -np.inf
        sb[rows, rows + start] = -np.inf
        ta = np.argpartition(-sa, k, axis=1)[:, :k]
        tb = np.argpartition(-sb, k, axis=1)[:, :k]
        overlaps += [len(set(x) & set(y)) / k for x, y in zip(ta, tb, strict=True)]
    return float(np.mean(overlaps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--batch-size", type=int, default=32, help="both encoders (32 is sentence-transformers' default)"
    )
    parser.add_argument("--threads", type=int, default=0, help="0 = all usable cores")
    args = parser.parse_args()
    threads = args.threads or embed.usable_cpus()
    items = catalogue(args.items)
    texts = embed.item_texts(items, Settings().item_text_template)
    result = {"device": "cpu", "cuda_available": torch.cuda.is_available(), "torch": torch.__version__}
    result.update(throughput(texts, threads, args.batch_size, args.rounds))
    print(
        f"throughput: ours {result['ours_items_per_s']:.0f}/s, sentence-transformers {result['st_items_per_s']:.0f}/s"
    )
    result.update(nights(items, threads, 64))
    print(f"nights: full {result['full_night_s']:.2f}s, incremental {result['incremental_night_s']:.2f}s")
    result.update(fast_path(texts, threads, args.batch_size, args.rounds))
    result["goals"] = {
        "speed_ratio>=1.2": result["speed_ratio"] >= 1.2,
        "full_over_incremental>=20": result["full_over_incremental"] >= 20,
        "max_abs_diff_vs_st<1e-5": result["max_abs_diff_vs_st"] < 1e-5,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
