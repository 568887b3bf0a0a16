"""`llmcluster status`: the application, its LLM replicas (layout, queue, KV usage, recent throughput).

Everything comes from Serve's status and the per-node metrics exporters, so it shows every replica
on every node, not just the one a handle call would reach; a node whose exporter does not answer is
named and left out. Needs a connected Ray driver.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from prometheus_client.metrics_core import Metric
from ray import serve
from ray.serve.schema import DeploymentStatus

from serving.metrics import PREFIX
from serving.metrics.export import exporters, merge
from serving.server.deploy_checks import replica_error

TIMEOUT_S = 10.0  # how long each round of questions waits for the node exporters


@dataclass
class ReplicaRow:
    replica: str
    model: str
    layout: str  # "TP×PP"
    values: dict[str, float] = field(default_factory=dict)  # metric name without prefix -> value


def status_report(app_name: str, window_s: float = 2.0) -> tuple[bool, str]:
    """(whether the application exists, the report). Throughput is measured over `window_s` seconds."""
    app = serve.status().applications.get(app_name)
    if app is None:
        return False, f"No application {app_name!r}."
    lines = [f"Application {app_name!r}: {app.status.value}"]
    for name, deployment in app.deployments.items():
        replicas = ", ".join(f"{count} {state}" for state, count in deployment.replica_states.items()) or "none"
        lines.append(f"  {name}: {deployment.status.value}; replicas: {replicas}")
        if deployment.message and deployment.status != DeploymentStatus.HEALTHY:
            lines.append(f"    {replica_error(deployment.message)}")
    handles = exporters()
    silent: set[int] = set()
    before = _collect(handles, silent)
    started = time.monotonic()
    time.sleep(window_s)
    rows = _replicas(_collect(handles, silent))
    elapsed = time.monotonic() - started
    generated_before = {row.replica: row.values.get("generation_tokens_total", 0.0) for row in _replicas(before)}
    lines.append(f"  {'replica':<12} {'model':<24} {'TP×PP':<6} {'running':>7} {'waiting':>7} {'KV cache':>8} {'tokens/s':>9}")
    for row in rows:
        rate = (row.values.get("generation_tokens_total", 0.0) - generated_before.get(row.replica, 0.0)) / elapsed
        lines.append(
            f"  {row.replica:<12} {row.model:<24} {row.layout:<6} {row.values.get('requests_running', 0):>7.0f} "
            f"{row.values.get('requests_waiting', 0):>7.0f} {row.values.get('kv_cache_usage_ratio', 0):>8.0%} {rate:>9.1f}"
        )
    if not rows:
        lines.append("  no LLM replica reports metrics yet")
    urls = _answers(handles, lambda h: h.url.remote(), silent)
    lines.append("Metrics endpoints (one per node): " + (", ".join(urls.values()) or "none"))
    if silent:
        lines.append(
            f"{len(silent)} of {len(handles)} node metrics exporters did not answer within {TIMEOUT_S:.0f} s: their replicas are missing"
        )
    return True, "\n".join(lines)


def _collect(handles: list, silent: set[int]) -> list[Metric]:
    answers = _answers(handles, lambda h: h.collect.remote(), silent)
    return merge(family for families in answers.values() for family in families)


def _answers(handles: list, call: Callable[[Any], ray.ObjectRef], silent: set[int]) -> dict[int, Any]:
    """Each handle's answer to `call` by index, waiting TIMEOUT_S at most; the indices that do not answer
    (or fail) are added to `silent`, and those already there are not asked again."""
    refs = {call(h): i for i, h in enumerate(handles) if i not in silent}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=TIMEOUT_S) if refs else ([], [])
    answers: dict[int, Any] = {}
    for ref, index in refs.items():
        try:
            if ref not in ready:
                raise TimeoutError
            answers[index] = ray.get(ref)
        except (TimeoutError, ray.exceptions.RayError):
            silent.add(index)
    return answers


def _replicas(families: list[Metric]) -> list[ReplicaRow]:
    rows: dict[str, ReplicaRow] = {}
    for family in families:
        for sample in family.samples:
            if sample.name == f"{PREFIX}_replica_info":
                layout = f"{sample.labels['tensor_parallel']}×{sample.labels['pipeline_parallel']}"
                rows[sample.labels["replica"]] = ReplicaRow(sample.labels["replica"], sample.labels["model"], layout)
    for family in families:
        for sample in family.samples:
            row = rows.get(sample.labels.get("replica", ""))
            if row is not None and sample.name.startswith(f"{PREFIX}_"):
                row.values[sample.name[len(PREFIX) + 1 :]] = sample.value
    return sorted(rows.values(), key=lambda row: row.replica)
