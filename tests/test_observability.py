"""End to end: a real Prometheus scrapes a running cluster under a bounded load that makes Serve add a
second LLM replica and remove it again (with one client still sending, so the removed replica drains);
then every dashboard query and alert expression must return data.

One application (tiny model, 1..2 replicas, short look-back and quiet period) serves the whole module.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ray
import requests
import yaml
from ports import free_port, listening
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from cluster import local
from serving.config import LLMConfig
from serving.metrics.export import SNAPSHOT_TTL_S, cluster_families, exporters
from serving.server import status as status_module
from serving.server.deployments import deploy
from serving.server.llm_replica import LLMDeployment
from serving.server.status import status_report

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "helm/llm-cluster/files/grafana-dashboard.json"
ALERT_RULES = ROOT / "helm/llm-cluster/files/alert-rules.yaml"
MODEL = "tiny-llama"
BODY = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 64, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory) -> Iterator[str]:
    config = LLMConfig.model_validate(
        {
            "model": {"source": str(tiny_model)},
            "engine": {"kv_cache_memory_gb": 0.02, "block_size": 4, "max_num_seqs": 2},
            "server": {
                "port": free_port(),
                "min_replicas": 1,
                "max_replicas": 2,
                "max_ongoing_requests": 16,
                "autoscaling": {"target_waiting_requests": 1, "look_back_period_s": 3, "downscale_delay_s": 5, "drain_timeout_s": 60},
            },
        }
    )
    state_dir = tmp_path_factory.mktemp("cluster")
    cluster = local.start(state_dir, free_port(), free_port())  # the CLI's local cluster: everything on 127.0.0.1
    try:
        local.connect(cluster.address, token_auth=True)
        yield deploy(config)
    finally:
        ray.shutdown()
        local.stop(state_dir)


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory) -> Iterator[str]:
    """Prometheus scraping every node's metrics endpoint once a second, the way it scrapes a Ray cluster."""
    deadline = time.monotonic() + 30
    while not (handles := exporters()) and time.monotonic() < deadline:
        time.sleep(0.5)
    targets = [url.removeprefix("http://").removesuffix("/metrics") for url in ray.get([h.url.remote() for h in handles])]
    assert targets, "no node metrics exporter started"
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "llm-cluster", "static_configs": [{"targets": targets}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    command = [
        shutil.which("prometheus") or "prometheus", f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with open(workdir / "prometheus.log", "wb") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        try:
            while not (listening(port) and requests.get(f"{url}/-/ready", timeout=5).status_code == 200):
                assert process.poll() is None, (workdir / "prometheus.log").read_text()
                time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            process.wait(30)


def running_replicas() -> int:
    deployment = serve.status().applications["llm"].deployments[LLMDeployment.name]
    return deployment.replica_states.get("RUNNING", 0)


def query(prometheus: str, expr: str, at: float) -> list[dict]:
    answer = requests.get(f"{prometheus}/api/v1/query", params={"query": expr, "time": at}, timeout=30).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def poll(check: Callable[[], object], timeout_s: float, what: str) -> object:
    """`check()` once it returns something true, trying every 0.25 s for up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.25)
    return result


def metric_names(url: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(requests.get(url, timeout=30).text)}


def test_metrics_served_at_the_api_and_per_node(server, prometheus):
    requests.post(f"{server}/v1/completions", json=BODY | {"max_tokens": 4}, timeout=60).raise_for_status()
    [url] = ray.get([h.url.remote() for h in exporters()])
    assert url.startswith("http://127.0.0.1:")
    expected = {
        "llmcluster_replica_info",
        "llmcluster_time_to_first_token_seconds",
        "llmcluster_requests_finished",
        "llmcluster_http_requests",
    }
    poll(lambda: metric_names(f"{server}/metrics") >= expected, 30, "the request's metrics at /metrics")
    # The API serves its own registry live and the exporter's copy of it one push (PUSH_INTERVAL_S) later.
    poll(lambda: metric_names(f"{server}/metrics") == metric_names(url), 10, "the node exporter catching up with the API")


def test_the_cluster_union_is_gathered_once_a_second(server):
    async def gather_three() -> list[list]:
        first, second = await asyncio.gather(cluster_families(), cluster_families())
        await asyncio.sleep(1.2)
        return [first, second, await cluster_families()]

    first, second, later = asyncio.run(gather_three())
    assert first is second and later is not first
    assert {f.name for f in later} >= {"llmcluster_replica", "llmcluster_http_requests"}  # family names: no _info, _total


@ray.remote(num_cpus=0)
class SilentExporter:
    """A node whose exporter hangs (its node is overloaded or partitioned)."""

    def url(self) -> str:
        time.sleep(60)
        return ""

    def collect(self) -> list:
        time.sleep(60)
        return []


def test_status_leaves_out_an_exporter_that_does_not_answer(server, monkeypatch):
    monkeypatch.setattr(status_module, "TIMEOUT_S", 1.0)
    silent = SilentExporter.remote()
    monkeypatch.setattr(status_module, "exporters", lambda: [*exporters(), silent])
    try:
        started = time.monotonic()
        found, report = status_report("llm", window_s=0.2)
        assert found and time.monotonic() - started < 10, "asked the silent exporter once, not once per round"
        assert re.search(rf"\w+ +{MODEL} +1×1 ", report), report
        assert "1 of 2 node metrics exporters did not answer within 1 s" in report
    finally:
        ray.kill(silent)


def test_load_scales_out_and_back_and_every_query_returns_data(server, prometheus):
    burst: list[tuple[int, str]] = []  # (status, body); status -1: the client raised (body: the exception)
    steady: list[tuple[int, str]] = []
    stop_burst, stop_steady = threading.Event(), threading.Event()

    def client(results: list[tuple[int, str]], stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                response = requests.post(f"{server}/v1/completions", json=BODY, timeout=120)
                results.append((response.status_code, response.text))
            except requests.RequestException as error:  # a failure of the test, not a thread dying unseen
                results.append((-1, repr(error)))

    threads = [threading.Thread(target=client, args=(burst, stop_burst)) for _ in range(7)]
    threads.append(threading.Thread(target=client, args=(steady, stop_steady)))
    load_started = time.time()
    for thread in threads:
        thread.start()
    requests.post(f"{server}/v1/completions", json=BODY | {"n": 0}, timeout=30)  # one 4xx for the error panels
    poll(lambda: running_replicas() >= 2, 120, "the load adding a replica")
    scaled_out_after = time.time() - load_started

    def both_replicas_report() -> str | None:
        report = status_report("llm", window_s=1.0)[1]
        return report if len(re.findall(rf"\w+ +{MODEL} +1×1 ", report)) == 2 else None

    report = poll(both_replicas_report, 30, "both replicas in llmcluster status")
    load_stopped = time.time()
    stop_burst.set()
    for thread in threads[:-1]:
        thread.join(120)
    print(f"scaled out {scaled_out_after:.1f} s after the load started\n{report}")

    # one client keeps sending while Serve removes the extra replica: what that replica holds drains
    poll(lambda: running_replicas() == 1, 90, "the replica added for the load removed after the load dropped")
    scaled_in_after = time.time() - load_stopped
    stop_steady.set()
    threads[-1].join(120)
    print(f"scaled back in {scaled_in_after:.1f} s after the load dropped; {len(burst)} + {len(steady)} requests")

    assert steady and {status for status, _ in steady} == {200}, [r for r in steady if r[0] != 200][:3]
    failures = [(status, text) for status, text in burst if status not in (200, 503)]
    assert not failures, failures[:3]
    for status, text in burst + steady:
        if status == 200:
            assert json.loads(text)["choices"][0]["finish_reason"] == "length"
        else:
            assert json.loads(text)["error"]["code"] == "overloaded"

    def replicas_in_prometheus() -> str:
        return query(prometheus, "count(llmcluster_replica_info)", time.time())[0]["value"][1]

    poll(lambda: replicas_in_prometheus() == "1", 30, "Prometheus seeing one replica")
    # the removed replica's series must stay gone: a push racing its forget would bring them back for a while
    deadline = time.monotonic() + SNAPSHOT_TTL_S + 2
    while time.monotonic() < deadline:
        assert replicas_in_prometheus() == "1", "the removed replica's series came back"
        time.sleep(0.5)
    now = time.time()
    peak = query(prometheus, "max_over_time(count(llmcluster_replica_info)[5m:1s])", now)
    assert float(peak[0]["value"][1]) >= 2

    at = load_stopped - 1
    for expr in dashboard_queries():
        assert query(prometheus, expr, at), f"dashboard query returns no data: {expr}"
    for expr in alert_signals():
        assert query(prometheus, expr, at), f"alert expression returns no data: {expr}"


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    exprs = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    assert len(exprs) > 20
    variables = {"$__rate_interval": "1m", "$model": ".*", "$namespace": ".*", "$release": ".*"}  # Grafana's "All"
    for name, value in variables.items():
        exprs = [expr.replace(name, value) for expr in exprs]
    return exprs


def alert_signals() -> list[str]:
    """Each alert's expression without its final threshold: the signal it compares, which must exist."""
    rules = [rule for group in yaml.safe_load(ALERT_RULES.read_text())["groups"] for rule in group["rules"]]
    signals = [re.sub(r"\s*(>|<|==|>=|<=)\s*[0-9.]+\s*$", "", rule["expr"].strip()) for rule in rules]
    assert len(signals) == 5 and all(signal != rule["expr"].strip() for signal, rule in zip(signals, rules))
    return signals
