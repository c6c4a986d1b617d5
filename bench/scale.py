"""Scale: one full nightly on the demo shop at several scales (1x = 1M users, 100k items, 20M events), with wall
time, CPU time and peak memory per stage.

Each stage of the nightly (ingest, embed-items, embed-users, train, evaluate-and-gate, compress-and-index, publish)
runs the real stage function from ``nightrec.flows.stages`` in its own process, in the order and with the arguments
the ``nightly`` flow uses, so a stage's peak RSS is its own (``ru_maxrss`` of that process, read with ``wait4``,
including the interpreter and its imports). The data comes from ``bench/scale_data.py``'s generator step.

A stage whose resident memory passes ``--max-rss-gb`` or whose time passes ``--stage-timeout`` is stopped and recorded
as such (with how long it ran and the memory it reached); the later stages of that scale are then skipped.

    python bench/scale.py --scales 0.1,1 --work /tmp/nightrec-scale

Prints a table per scale and, last, one JSON line with every figure; merges the figures into ``--results`` (so
scales measured in separate runs share one file) and draws ``--plot`` from it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from scale_data import FULL, cpu_seconds, peak_rss_mb, spec_for, step_generate

STAGES = ("ingest", "embed-items", "embed-users", "train", "evaluate-and-gate", "compress-and-index", "publish")


# --- inside a stage's own process ---------------------------------------------------------------------------------
def _environment(folder: Path) -> dict[str, str]:
    """What the nightly would be configured with: a fresh home and the generated files as its sources."""
    return {
        "NIGHTREC_HOME": str(folder / "home"),
        "NIGHTREC_EVENTS_SOURCE": str(folder / "events" / "*.csv"),
        "NIGHTREC_ITEMS_SOURCE": str(folder / "items.jsonl"),
        "NIGHTREC_USERS_SOURCE": str(folder / "users.csv"),
    }


def _state(folder: Path) -> dict:
    path = folder / "bench-state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save_state(folder: Path, state: dict) -> None:
    (folder / "bench-state.json").write_text(json.dumps(state, indent=2, default=str))


def run_stage(stage: str, folder: Path, run_date: dt.date) -> dict:
    """One stage, as ``nightrec.flows.nightly._run_night`` calls it (the Prefect task's function, no server)."""
    from nightrec.settings import Settings, apply_environment

    settings = Settings()
    apply_environment(settings)
    from nightrec.flows import stages
    from nightrec.storage import registry, tracking

    state = _state(folder)
    client = tracking.client_for(settings.tracking_uri)
    if "parent" not in state:  # the night's parent run and work folder, as the flow makes them
        exp = tracking.experiment_id(client, settings.mlflow_experiment, settings.artifact_root)
        state["parent"] = tracking.start_run(
            client, exp, f"nightly-{run_date.isoformat()}", {"nightrec.run_date": run_date.isoformat()}
        )
    parent = state["parent"]
    night_dir = settings.home / "runs" / run_date.isoformat()
    workdir = night_dir / parent
    workdir.mkdir(parents=True, exist_ok=True)
    if stage == "ingest":
        result = stages.ingest_sources.fn(parent)
    elif stage == "embed-items":
        result = stages.embed_items.fn(parent)
    elif stage == "embed-users":
        result = stages.embed_users.fn(run_date, parent)
    elif stage == "train":
        champion = registry.champion(client, settings.registered_model)
        result = stages.train_model.fn(
            run_date, parent, str(night_dir / "models"), str(champion.path) if champion else None
        )
    elif stage == "evaluate-and-gate":
        result = stages.evaluate_and_gate.fn(run_date, parent, str(workdir), state["train"]["model_dir"])
    elif stage == "compress-and-index":
        result = stages.compress_and_index.fn(run_date, parent, str(workdir))
    elif stage == "publish":
        result = stages.publish_lists.fn(run_date, parent, str(workdir))
        tracking.finish_run(client, parent)
    else:
        raise ValueError(stage)
    state[stage] = result
    _save_state(folder, state)
    return _headline(stage, result)


def _headline(stage: str, result: dict) -> dict:
    """The few numbers of a stage's result worth a column: counts, not metrics tables."""
    keep = {
        "ingest": ("events_rows", "events_valid", "items_valid"),
        "embed-items": ("items", "embedded", "items_per_second"),
        "embed-users": ("users", "embedded", "pooled"),
        "train": ("train_events", "trained_users", "epochs", "train_seconds"),
        "evaluate-and-gate": ("model_version",),
        "compress-and-index": ("factory", "recall_at_k"),
        "publish": ("users", "rows"),
    }[stage]
    out = {k: result[k] for k in keep if k in result}
    if stage == "evaluate-and-gate":
        model = result.get("holdout", {}).get("model", {})
        out |= {"ndcg_at_10": model.get("ndcg_at_10"), "eval_users": model.get("users")}
    return out


def child_main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    folder = Path(args.folder)
    if args.child == "generate":
        result = step_generate(folder, args.scale, args.chunk_users)
    else:
        result = run_stage(args.child, folder, dt.date.fromisoformat(args.run_date))
    result |= {"seconds": round(time.perf_counter() - start, 2), "cpu_seconds": round(cpu_seconds(), 2)}
    result |= {"peak_rss_mb": round(peak_rss_mb(), 1), "load_avg_1m": round(os.getloadavg()[0], 2)}
    print("RESULT " + json.dumps(result, default=str), flush=True)


# --- the driver ---------------------------------------------------------------------------------------------------
def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def run_child(step: str, folder: Path, scale: float, args: argparse.Namespace, run_date: dt.date) -> dict:
    """Run one step in its own process; stop it past the memory or time limit. Peak RSS from ``wait4``."""
    log = folder.parent / "logs" / f"{folder.name}-{step}.log"  # outside folder: generate starts it afresh
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, __file__, "--child", step, "--folder", str(folder), "--scale", str(scale)]
    command += ["--chunk-users", str(args.chunk_users), "--run-date", run_date.isoformat()]
    env = {**os.environ, **_environment(folder)}
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        stopped, sampled = None, 0.0
        while True:  # wait4 (not Popen.poll) reaps the child, so its rusage is ours to read
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            sampled = max(sampled, _rss_mb(child.pid))
            elapsed = time.perf_counter() - start
            if sampled > args.max_rss_gb * 1024:
                stopped = f"stopped: resident memory passed {args.max_rss_gb} GB"
            elif elapsed > args.stage_timeout:
                stopped = f"stopped: ran past {args.stage_timeout:.0f} s"
            if stopped:
                os.killpg(child.pid, signal.SIGKILL)
                _, status, usage = os.wait4(child.pid, 0)
                break
            time.sleep(0.5)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped above; keeps Popen from waiting again
    seconds = round(time.perf_counter() - start, 2)
    lines = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    if lines and not stopped:
        return {"status": "ok", **json.loads(lines[-1].removeprefix("RESULT "))}
    return {
        "status": stopped or f"failed (exit status {os.waitstatus_to_exitcode(status)}), see {log}",
        "seconds": seconds,
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "peak_rss_mb": round(max(usage.ru_maxrss / 1024, sampled), 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "log_tail": log.read_text()[-1500:],
    }


def measure_scale(scale: float, args: argparse.Namespace, previous: dict | None, save=lambda figures: None) -> dict:
    """Generate (unless reused), then each stage in order; with ``--resume``, stages measured before are kept."""
    import shutil

    folder = Path(args.work) / f"x{scale:g}"
    spec = spec_for(scale)
    run_date = spec.end + dt.timedelta(days=1)  # the night after the last day with events
    figures: dict = dict(previous["stages"]) if args.resume and previous else {}
    if not (args.resume or args.reuse_data) or not (folder / "items.jsonl").exists():
        figures = {"generate": run_child("generate", folder, scale, args, run_date)}
        _print_row(scale, "generate", figures["generate"])
    if not args.resume:
        shutil.rmtree(folder / "home", ignore_errors=True)
        (folder / "bench-state.json").unlink(missing_ok=True)
        figures = {k: v for k, v in figures.items() if k == "generate"}
    wanted = args.stages.split(",") if args.stages else STAGES
    if args.from_stage:  # measure this stage and the later ones again (e.g. after a fix), on the kept home
        for later in STAGES[STAGES.index(args.from_stage) :]:
            figures.pop(later, None)
    for stage in STAGES:
        if figures.get(stage, {}).get("status") == "ok":
            continue
        if stage not in wanted:
            figures[stage] = {"status": "not run (not asked for)"}
            continue
        figures[stage] = run_child(stage, folder, scale, args, run_date)
        _print_row(scale, stage, figures[stage])
        save(figures)  # what is measured so far survives a driver that is stopped
        if figures[stage]["status"] != "ok":
            for later in STAGES[STAGES.index(stage) + 1 :]:
                figures[later] = {"status": f"not run ({stage} did not finish)"}
            break
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    stage_rows = [figures[s] for s in STAGES if figures.get(s, {}).get("status") == "ok"]
    return {
        "spec": {"users": spec.users, "items": spec.items, "events": spec.events},
        "run_date": run_date.isoformat(),
        "overrides": {k: v for k, v in os.environ.items() if k.startswith("NIGHTREC_")},
        "stages": figures,
        "nightly_seconds": round(sum(r["seconds"] for r in stage_rows), 1),
        "nightly_peak_rss_mb": max((r["peak_rss_mb"] for r in stage_rows), default=None),
        "complete": len(stage_rows) == len(STAGES),
    }


def _print_row(scale: float, step: str, row: dict) -> None:
    extra = {k: v for k, v in row.items() if k not in ("status", "seconds", "cpu_seconds", "peak_rss_mb", "log_tail")}
    print(
        f"{scale:>5g}x {step:19s} {row['status'][:40]:40s} {row.get('seconds', 0):9.1f} s "
        f"{row.get('cpu_seconds', 0):9.1f} cpu-s {row.get('peak_rss_mb', 0):8.0f} MB  {json.dumps(extra, default=str)}",
        flush=True,
    )
    if row["status"] != "ok" and "log_tail" in row:
        print(row["log_tail"], flush=True)


def markdown(results: dict) -> str:
    """One table row per (scale, stage): status, wall and CPU seconds, peak RSS, load, the stage's counts."""
    lines = [
        "| Scale | Stage | Status | Wall s | CPU s | Peak RSS MB | Load (1 min) | Counts |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for scale in sorted(results, key=float):
        for stage in ("generate", *STAGES):
            row = results[scale]["stages"].get(stage)
            if row is None:
                continue
            counts = {
                k: ((f"{v:.0f}" if v.is_integer() else f"{v:.4g}") if isinstance(v, float) else v)
                for k, v in row.items()
                if k not in ("status", "seconds", "cpu_seconds", "peak_rss_mb", "load_avg_1m", "log_tail")
            }
            cells = [f"{row[k]:,.1f}" if k in row else "" for k in ("seconds", "cpu_seconds")]
            cells.append(f"{row['peak_rss_mb']:,.0f}" if "peak_rss_mb" in row else "")
            cells.append(str(row.get("load_avg_1m", "")))
            counts_text = ", ".join(f"{k} {v}" for k, v in counts.items())
            lines.append(f"| {scale}x | {stage} | {row['status']} | " + " | ".join(cells) + f" | {counts_text} |")
    return "\n".join(lines)


def growth(results: dict) -> str:
    """Per stage, the ratio of each figure between the smallest and the largest scale where the stage finished."""
    scales = sorted(results, key=float)
    lines = ["| Stage | Scales | Wall | CPU | Peak RSS |", "|---|---|---:|---:|---:|"]
    for stage in ("generate", *STAGES):
        done = [s for s in scales if results[s]["stages"].get(stage, {}).get("status") == "ok"]
        if len(done) < 2:
            continue
        lo, hi = results[done[0]]["stages"][stage], results[done[-1]]["stages"][stage]
        ratios = [hi[k] / lo[k] if lo[k] else float("nan") for k in ("seconds", "cpu_seconds", "peak_rss_mb")]
        lines.append(f"| {stage} | {done[0]}x to {done[-1]}x | " + " | ".join(f"{r:.1f}x" for r in ratios) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path, budget_gb: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = sorted(results, key=float)
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.8))
    for stage in STAGES:
        points = [(float(s), results[s]["stages"][stage]) for s in scales if stage in results[s]["stages"]]
        done = [(x, r) for x, r in points if r.get("status") == "ok"]
        stopped = [(x, r) for x, r in points if r.get("status") != "ok" and "seconds" in r]
        if not done and not stopped:
            continue
        line = ax_time.plot([x for x, _ in done], [r["seconds"] for _, r in done], "o-", label=stage)[0]
        ax_mem.plot([x for x, _ in done], [r["peak_rss_mb"] / 1024 for _, r in done], "o-", color=line.get_color())
        for x, r in stopped:  # a stage stopped at a limit: what it had reached, drawn hollow
            ax_time.plot([x], [r["seconds"]], "x", color=line.get_color(), markersize=9)
            ax_mem.plot([x], [r["peak_rss_mb"] / 1024], "x", color=line.get_color(), markersize=9)
    ax_mem.axhline(budget_gb, color="red", linestyle="--", linewidth=1, label=f"{budget_gb:g} GB budget")
    for ax, title, unit in ((ax_time, "wall time per stage", "seconds"), (ax_mem, "peak RSS per stage", "GB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("scale (1x = 1M users, 100k items, 20M events)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    ax_mem.legend(fontsize=8)
    fig.suptitle("nightrec nightly on the demo shop (2 shared cores; x = stopped before it finished)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _commit() -> str:
    here = Path(__file__).resolve().parent
    done = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="0.1,1")
    parser.add_argument("--work", default="/tmp/nightrec-scale")
    parser.add_argument("--chunk-users", type=int, default=100_000)
    parser.add_argument("--max-rss-gb", type=float, default=12.0, help="stop a stage whose RSS passes this")
    parser.add_argument("--stage-timeout", type=float, default=3600.0, help="stop a stage after this many seconds")
    parser.add_argument("--keep", action="store_true", help="keep the generated files and home")
    parser.add_argument("--reuse-data", action="store_true", help="reuse generated files kept by --keep")
    parser.add_argument("--stages", default=None, help="comma-separated stages to run (default: all, in order)")
    parser.add_argument("--resume", action="store_true", help="keep the home kept by --keep; skip measured stages")
    parser.add_argument("--from-stage", choices=STAGES, help="with --resume: measure this stage and later ones again")
    parser.add_argument("--results", default="/tmp/nightrec-scale/scale.json", help="figures merged across runs")
    parser.add_argument("--merge", nargs="*", default=[], help="other --results files to merge in (by scale)")
    parser.add_argument("--plot", default=None, help="write the growth plot here (e.g. docs/scale.png)")
    parser.add_argument("--plot-only", action="store_true", help="only draw --plot from --results")
    parser.add_argument("--child", choices=("generate", *STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--run-date", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    results_path = Path(args.results)
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for other in args.merge:  # scales measured by separate runs (e.g. 1x started in parallel)
        results.update(json.loads(Path(other).read_text()))
    if args.merge:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1, default=str))
    if not args.plot_only:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        for scale in [float(s) for s in args.scales.split(",")]:
            key = f"{scale:g}"

            def save(figures: dict, key: str = key) -> None:
                partial = {**results, key: {**results.get(key, {}), "stages": figures, "partial": True}}
                results_path.write_text(json.dumps(partial, indent=1, default=str))

            results[key] = measure_scale(scale, args, results.get(key), save) | {
                "measured_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "commit": _commit(),
            }
            results_path.write_text(json.dumps(results, indent=1, default=str))
    if args.plot:
        plot(results, Path(args.plot), args.max_rss_gb)
    print(markdown(results))
    print(growth(results))
    print(json.dumps({"bench": "scale", "full": FULL, "results": results}, default=str))


if __name__ == "__main__":
    main()
