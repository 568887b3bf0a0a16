"""Result files and the terminal summary.

A result file is JSON: {"tool", "version", "created", "label", "settings", "points"}, where each
point holds its load ("label", concurrency or request rate), its summary (metrics.py) and the raw
TTFTs and pooled ITLs in seconds, from which plots and comparisons are drawn.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serving.loadtest.load import LoadPoint, LoadRun
from serving.loadtest.metrics import request_latencies, summarize

RESULT_VERSION = 1


def point_record(point: LoadPoint, run: LoadRun, slo_ms: dict[str, float] | None) -> dict[str, Any]:
    latencies = [request_latencies(r) for r in run.results if r.ok]
    failures = [{"error": r.error, "detail": r.detail} for r in run.results if not r.ok][:10]
    return {
        "load": point.to_dict(),
        "summary": summarize(run.results, run.duration_s, slo_ms) | _client_cpu(run),
        "ttft_s": [round(p["ttft"], 6) for p in latencies],
        "itl_s": [round(gap, 6) for p in latencies for gap in p["itl"]],
        "first_failures": failures,
    }


def _client_cpu(run: LoadRun) -> dict[str, float]:
    """The load generator's own CPU time over the point, in all and per output token: what it took from the
    machine it shares with the server."""
    if run.client_cpu_s is None:
        return {}
    tokens = sum(r.output_len for r in run.results if r.ok)
    per_token = run.client_cpu_s / tokens * 1e6 if tokens else None
    return {"client_cpu_s": run.client_cpu_s, "client_cpu_us_per_output_token": per_token}


def result_document(label: str, settings: dict[str, Any], points: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "tool": "llmcluster bench",
        "version": RESULT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "label": label,
        "settings": settings | {"host": platform.node(), "python": platform.python_version()},
        "points": points,
    }


def write_result(document: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1))


def load_result(path: Path) -> dict[str, Any]:
    document = json.loads(path.read_text())
    if document.get("tool") != "llmcluster bench" or document.get("version") != RESULT_VERSION:
        raise ValueError(f"{path} is not a result file of this tool (version {RESULT_VERSION})")
    return document


def summary_table(points: Sequence[dict[str, Any]]) -> str:
    """One row per load point: throughput, median and p99 latencies, errors (times in ms)."""
    header = [
        "load",
        "ok",
        "failed",
        "req/s",
        "out tok/s",
        "out/req",
        "TTFT med",
        "TTFT p99",
        "TPOT med",
        "ITL med",
        "ITL p99",
        "E2EL med",
        "client CPU s",
    ]
    with_goodput = any("goodput" in p["summary"] for p in points)
    if with_goodput:
        header.append("goodput req/s")
    rows = [header]
    for p in points:
        s = p["summary"]
        row = [
            p["load"]["label"],
            str(s["completed"]),
            str(s["failed"]),
            f"{s['request_throughput']:.2f}",
            f"{s['output_throughput']:.1f}",
            f"{s['total_output_tokens'] / s['completed']:.0f}" if s["completed"] else "-",
            _ms(s["ttft_ms"]["median"]),
            _ms(s["ttft_ms"]["p99"]),
            _ms(s["tpot_ms"]["median"]),
            _ms(s["itl_ms"]["median"]),
            _ms(s["itl_ms"]["p99"]),
            _ms(s["e2el_ms"]["median"]),
            "-" if s.get("client_cpu_s") is None else f"{s['client_cpu_s']:.2f}",
        ]
        if with_goodput:
            row.append(f"{s['goodput']:.2f}" if "goodput" in s else "-")
        rows.append(row)
    lines = [format_row(row, [max(len(r[i]) for r in rows) for i in range(len(header))]) for row in rows]
    errors = [f"{p['load']['label']}: {p['summary']['errors']}" for p in points if p["summary"]["errors"]]
    return "\n".join(lines[:1] + ["-" * len(lines[0])] + lines[1:] + (["errors by kind: " + "; ".join(errors)] if errors else []))


def format_row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(cell.rjust(width) if i else cell.ljust(width) for i, (cell, width) in enumerate(zip(cells, widths)))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
