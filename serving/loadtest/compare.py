"""Side-by-side comparison of result files: output throughput, median TTFT and median ITL per load
point, each with its ratio to the first file (the baseline), as a Markdown table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

METRICS = (  # (column, how to read it from a point's summary)
    ("out tok/s", lambda s: s["output_throughput"]),
    ("TTFT med ms", lambda s: s["ttft_ms"]["median"]),
    ("ITL med ms", lambda s: s["itl_ms"]["median"]),
    ("client CPU us/tok", lambda s: s.get("client_cpu_us_per_output_token")),  # the load generator's own cost
)


def compare_table(documents: Sequence[dict[str, Any]]) -> str:
    """A Markdown table, one row per load point present in every file. Ratios are file / baseline, so
    above 1 means more throughput or more latency than the baseline."""
    if len(documents) < 2:
        raise ValueError("compare needs two or more result files")
    by_label = [{p["load"]["label"]: p["summary"] for p in doc["points"]} for doc in documents]
    labels = [label for label in by_label[0] if all(label in points for points in by_label[1:])]
    if not labels:
        raise ValueError("the result files share no load point (same concurrency or request rate)")
    baseline = documents[0]["label"]
    header = ["load"]
    for column, _ in METRICS:
        header += [f"{doc['label']} {column}" for doc in documents]
        header += [f"{doc['label']}/{baseline} {column}" for doc in documents[1:]]
    rows = []
    for label in labels:
        row = [label]
        for _, read in METRICS:
            values = [read(points[label]) for points in by_label]
            row += [_number(v) for v in values]
            row += [_ratio(v, values[0]) for v in values[1:]]
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    failed = [
        f"{doc['label']} {label}: {points[label]['errors']}"
        for doc, points in zip(documents, by_label)
        for label in labels
        if points[label]["errors"]
    ]
    if failed:
        lines.append("\nfailed requests: " + "; ".join(failed))
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ratio(value: float | None, baseline: float | None) -> str:
    return "-" if value is None or not baseline else f"{value / baseline:.2f}x"
