"""Matplotlib figures logged to MLflow: a person would rather look at a plot than a table of numbers."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: nightly runs have no display

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def loss_curve(losses: list[float]) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses)
    ax.set(xlabel="epoch", ylabel="meta-training query loss", title="Training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    plt.close(fig)
    return fig


def model_vs_peers(
    report: dict[str, dict[str, float]], metrics: tuple[str, ...] = ("ndcg_at_10", "recall_at_20")
) -> Figure:
    """Grouped bars: each model's holdout metrics side by side."""
    names = list(report)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.5))
    for ax, metric in zip(list(axes) if len(metrics) > 1 else [axes], metrics, strict=True):
        values = [report[n].get(metric, float("nan")) for n in names]
        bars = ax.bar(names, values, color=["#2f6db5" if n == "model" else "#999999" for n in names])
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        ax.set(title=metric.replace("_at_", "@"), ylabel=metric)
    fig.suptitle("Holdout: tonight's model vs champion and popularity")
    fig.tight_layout()
    plt.close(fig)
    return fig


def metric_history(dates: list[str], series: dict[str, list[float]], metric: str) -> Figure:
    """One line per model across nights (the parent runs of earlier dates)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, values in series.items():
        ax.plot(dates, values, marker="o", label=name)
    ax.set(xlabel="run date", ylabel=metric, title=f"{metric} across nights")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    plt.close(fig)
    return fig
