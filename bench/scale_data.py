"""Scale data: generate the demo shop at 0.1x and 1x (1x = 1M users, 100k items, 20M events) in chunks of users,
then land it with ``ingest_events_file``; time and peak RSS per step, each step in its own process.

Peer, in the same run: a plain polars copy of the same CSV files into date-partitioned Parquet with no validation,
no deduplication and no manifests (the floor any ingest pays to read and write the bytes).

    python bench/scale_data.py --scales 0.1,1 --work /tmp/nightrec-scale

The last line of stdout is one JSON object with every figure. ``bench/scale.py`` (a whole nightly per scale) uses
this file's generator step and process figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

FULL = {"users": 1_000_000, "items": 100_000, "events": 20_000_000}


def spec_for(scale: float):
    from nightrec.sources.demo import DemoSpec

    return DemoSpec(**{k: max(1, round(v * scale)) for k, v in FULL.items()})


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_seconds() -> float:
    """User + system CPU time of this process: less sensitive than wall time to other work on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def step_generate(folder: Path, scale: float, chunk_users: int) -> dict:
    from nightrec.sources.demo import write_demo_files

    shutil.rmtree(folder, ignore_errors=True)
    paths = write_demo_files(folder, spec_for(scale), chunk_users=chunk_users)
    files = sorted(paths["events"].glob("*.csv"))
    return {"files": len(files), "csv_bytes": sum(f.stat().st_size for f in files)}


def step_ingest(folder: Path, scale: float) -> dict:
    from nightrec.settings import Settings
    from nightrec.storage.lake import Lake
    from nightrec.tasks.ingest import ingest_events_file, ingest_items_file

    home = folder / "home"
    shutil.rmtree(home, ignore_errors=True)
    settings = Settings(home=home)
    lake = Lake(settings.lake_root)
    now = dt.datetime.combine(spec_for(scale).end + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    totals = {"rows": 0, "valid": 0, "duplicates": 0, "quarantined": 0}
    for path in sorted((folder / "events").glob("*.csv")):
        report = ingest_events_file(lake, path, settings, now=now)
        for key in totals:
            totals[key] += getattr(report, key)
    items = ingest_items_file(lake, folder / "items.jsonl", settings, now=now)
    lake_rows = lake.scan_events().select("user_id").collect(engine="streaming").height
    return {**totals, "items": items.valid, "lake_rows": lake_rows, "partitions": len(lake.event_dates())}


def step_verify(folder: Path, scale: float) -> dict:
    from nightrec.storage.lake import Lake

    lake = Lake(folder / "home" / "lake")
    return {"partitions_checked": len(lake.verify_events(deep=True))}


def step_peer(folder: Path, scale: float) -> dict:
    import polars as pl

    out = folder / "peer"
    shutil.rmtree(out, ignore_errors=True)
    frame = pl.scan_csv(folder / "events" / "*.csv", infer_schema=False).with_columns(
        pl.col("timestamp").str.to_datetime("%Y-%m-%dT%H:%M:%SZ", strict=False).alias("ts")
    )
    frame = frame.with_columns(pl.col("ts").dt.date().alias("date"))
    frame.sink_parquet(pl.PartitionBy(out, key="date", include_key=False), mkdir=True)
    return {"files": len(list(out.rglob("*.parquet")))}


STEPS = {"generate": step_generate, "ingest": step_ingest, "verify": step_verify, "peer": step_peer}


def run_child(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    result = STEPS[args.step](Path(args.folder), args.scale, *([args.chunk_users] if args.step == "generate" else []))
    result |= {"seconds": round(time.perf_counter() - start, 2), "cpu_seconds": round(cpu_seconds(), 2)}
    result |= {"peak_rss_mb": round(peak_rss_mb(), 1), "load_avg_1m": round(os.getloadavg()[0], 2)}
    print(json.dumps(result))


def run_step(step: str, folder: Path, scale: float, chunk_users: int) -> dict:
    command = [sys.executable, __file__, "--child", step, "--folder", str(folder), "--scale", str(scale)]
    done = subprocess.run([*command, "--chunk-users", str(chunk_users)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"step {step} at {scale}x failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="0.1,1")
    parser.add_argument("--work", default="/tmp/nightrec-scale")
    parser.add_argument("--chunk-users", type=int, default=100_000)
    parser.add_argument("--keep", action="store_true", help="keep the generated files and lake")
    parser.add_argument("--child", choices=sorted(STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.step = args.child
        run_child(args)
        return
    results = {}
    for scale in [float(s) for s in args.scales.split(",")]:
        folder = Path(args.work) / f"x{scale:g}"
        figures = {}
        for step in ("generate", "ingest", "verify", "peer"):
            figures[step] = run_step(step, folder, scale, args.chunk_users)
            print(f"{scale:g}x {step:9s} {json.dumps(figures[step])}", flush=True)
        ing, peer = figures["ingest"], figures["peer"]
        assert ing["rows"] == ing["valid"] + ing["duplicates"] + ing["quarantined"], "counts do not add up"
        assert ing["lake_rows"] == ing["valid"], "lake rows differ from landed rows"
        figures["ratios"] = {
            "ingest_vs_plain_copy_time": round(ing["seconds"] / peer["seconds"], 2),
            "ingest_vs_plain_copy_cpu": round(ing["cpu_seconds"] / peer["cpu_seconds"], 2),
            "ingest_vs_plain_copy_rss": round(ing["peak_rss_mb"] / peer["peak_rss_mb"], 2),
            "events_per_second": round(ing["rows"] / ing["seconds"]),
        }
        print(f"{scale:g}x ratios    {json.dumps(figures['ratios'])}", flush=True)
        results[f"{scale:g}x"] = {"spec": {k: round(v * scale) for k, v in FULL.items()}, **figures}
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"bench": "scale_data", "chunk_users": args.chunk_users, "results": results}))


if __name__ == "__main__":
    main()
