"""PNG plots of result files (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import matplotlib
except ModuleNotFoundError as error:
    raise ModuleNotFoundError("plots need matplotlib: pip install 'llm-cluster[plots]'", name=error.name) from error

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg"): the backend must be chosen first
import numpy as np


def plot_result(document: dict[str, Any], prefix: Path) -> list[Path]:
    """`<prefix>_distributions.png` (TTFT and ITL CDFs per load point) and, for a sweep,
    `<prefix>_latency_throughput.png`. Returns the files written."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    points = document["points"]
    written = [_distributions(points, document["label"], Path(f"{prefix}_distributions.png"))]
    if len(points) > 1:
        written.append(_latency_throughput([document], Path(f"{prefix}_latency_throughput.png")))
    return written


def plot_comparison(documents: Sequence[dict[str, Any]], path: Path) -> Path:
    """Median TTFT and median ITL against output throughput, one line per result file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return _latency_throughput(documents, path)


def _distributions(points: Sequence[dict[str, Any]], title: str, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, key, ax in (("TTFT", "ttft_s", axes[0]), ("ITL", "itl_s", axes[1])):
        for p in points:
            values = np.sort(np.asarray(p[key]) * 1000.0)
            if values.size:
                ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=p["load"]["label"])
        ax.set(
            xlabel=f"{name} (ms)",
            ylabel="fraction of " + ("requests" if key == "ttft_s" else "gaps"),
            title=f"{name} distribution",
        )
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _latency_throughput(documents: Sequence[dict[str, Any]], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, key, ax in (("median TTFT", "ttft_ms", axes[0]), ("median ITL", "itl_ms", axes[1])):
        for doc in documents:
            xs = [p["summary"]["output_throughput"] for p in doc["points"]]
            ys = [p["summary"][key]["median"] or float("nan") for p in doc["points"]]
            ax.plot(xs, ys, marker="o", label=doc["label"])
            for x, y, p in zip(xs, ys, doc["points"]):
                ax.annotate(p["load"]["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize="x-small")
        ax.set(xlabel="output throughput (tokens/s)", ylabel=f"{name} (ms)", title=f"{name} vs throughput")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
