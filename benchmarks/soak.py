"""Soak run: mixed streaming and non-streaming load with periodic client disconnects for a fixed time,
then a check that the server went back to idle: no request running, no KV block held, and the memory
of the API and LLM replica processes back near its idle value.

  python -m benchmarks.soak --duration 600            # local Ray on 127.0.0.1, the default model
  python -m benchmarks.soak --model PATH --duration 60 --concurrency 4

Every request ends as one of: ok, disconnected (the client hung up on purpose), back-pressure (429 or
503 overloaded, with Retry-After, which the client then waits out), error (anything else) or lost
(no answer within the timeout). A healthy soak has errors and lost at 0. The report is JSON
(stdout, and --out).
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = ["Tell me a story about a lighthouse.", "List three colours.", "What is the capital of France?", "Write a haiku about rain."]
IDLE_GAUGES = ("requests_running", "requests_waiting", "kv_cache_usage_ratio")


@dataclass
class SoakReport:
    duration_s: float
    concurrency: int
    outcomes: dict[str, int]
    requests_per_s: float
    idle_before: dict[str, float]
    idle_after: dict[str, float]
    rss_mb_before: float
    rss_mb_after: float
    errors: list[str] = field(default_factory=list)  # the first few unexpected ones

    @property
    def clean(self) -> bool:
        """No error, nothing lost, and the engine back to idle."""
        return not self.outcomes.get("error") and not self.outcomes.get("lost") and not any(self.idle_after.values())


def actor_pids(class_name: str) -> list[int]:
    """Process ids of the live Ray actors of a class started under this process (Ray titles an actor's
    process `ray::Class`, a Serve replica's `ray::ServeReplica:APP:DEPLOYMENT`)."""
    pids = []
    for process in psutil.Process().children(recursive=True):
        try:
            title = (process.cmdline() or [""])[0]
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        name = title.removeprefix("ray::").split(".")[0].split(" ")[0]
        if title.startswith("ray::") and (name == class_name or name.endswith(f":{class_name}")):
            pids.append(process.pid)
    return sorted(pids)


def rss_mb(pids: list[int]) -> float:
    """Resident memory of these processes together, in MiB."""
    return sum(psutil.Process(pid).memory_info().rss for pid in pids) / 2**20


def engine_state(url: str, headers: dict[str, str] | None = None) -> dict[str, float]:
    """The LLM replicas' gauges of /metrics (summed over replicas), by name without the prefix."""
    text = requests.get(f"{url}/metrics", headers=headers, timeout=30).text
    state: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "model" in sample.labels and sample.name.startswith("llmcluster_"):
                name = sample.name.removeprefix("llmcluster_")
                state[name] = state.get(name, 0.0) + sample.value
    return state


def wait_until_idle(url: str, headers: dict[str, str] | None = None, timeout_s: float = 30.0) -> dict[str, float]:
    """The idle gauges once nothing runs, waits or holds KV blocks (or whatever they are at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = engine_state(url, headers)
        idle = {name: state.get(name, 0.0) for name in IDLE_GAUGES}
        if not any(idle.values()) or time.monotonic() > deadline:
            return idle
        time.sleep(0.2)


class _Load:
    """One client thread's loop: random requests until the deadline, each outcome counted."""

    def __init__(self, url: str, model: str, headers: dict[str, str], timeout_s: float, seed: int) -> None:
        self.url, self.model, self.headers, self.timeout_s = url, model, headers, timeout_s
        self.random = random.Random(seed)
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self.retry_after_s = 0.0  # of the last refusal

    def run(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            kind = self.random.choices(["stream", "whole", "disconnect"], weights=[4, 4, 2])[0]
            try:
                outcome = self._request(kind)
            except requests.exceptions.Timeout:
                outcome = "lost"
            except requests.exceptions.RequestException as error:
                outcome = "error"
                self.errors.append(f"{kind}: {type(error).__name__}: {error}")
            self.outcomes[outcome] += 1
            if outcome == "back-pressure":  # as a well-behaved client does: wait as long as Retry-After says
                time.sleep(min(self.retry_after_s, max(0.0, deadline - time.monotonic())))

    def _request(self, kind: str) -> str:
        chat = self.random.random() < 0.5
        prompt = self.random.choice(PROMPTS)
        body = {"model": self.model, "max_tokens": self.random.randint(8, 64), "temperature": 0.8, "stream": kind != "whole"}
        body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
        path = "chat/completions" if chat else "completions"
        with requests.post(f"{self.url}/v1/{path}", json=body, headers=self.headers, stream=True, timeout=self.timeout_s) as response:
            refused = response.status_code == 429 or (response.status_code == 503 and response.json()["error"]["code"] == "overloaded")
            if refused and response.headers.get("Retry-After"):
                self.retry_after_s = float(response.headers["Retry-After"])
                return "back-pressure"
            if response.status_code != 200:
                self.errors.append(f"{kind}: HTTP {response.status_code} {response.text[:200]}")
                return "error"
            if kind == "whole":
                return "ok" if response.json()["choices"] else "error"
            events = 0
            for line in response.iter_lines():
                if not line.startswith(b"data: "):
                    continue
                events += 1
                if line == b"data: [DONE]":
                    return "ok"
                if b'"error"' in line[:20]:
                    self.errors.append(f"{kind}: {line[:200]!r}")
                    return "error"
                if kind == "disconnect" and events >= 3:
                    return "disconnected"  # leaving the block closes the connection mid-stream
            self.errors.append(f"{kind}: the stream ended without [DONE]")
            return "lost"


def run_soak(
    url: str,
    model: str,
    duration_s: float,
    concurrency: int,
    pids: Callable[[], list[int]],
    headers: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> SoakReport:
    """Soak the server at `url` for `duration_s` with `concurrency` clients; `pids` lists the processes to watch."""
    headers = headers or {}
    loads = [_Load(url, model, headers, timeout_s, seed) for seed in range(concurrency)]
    warm_up = time.monotonic() + min(10.0, duration_s / 10)
    _run_all(loads, warm_up)  # first-use allocations are not growth
    idle_before, rss_before = wait_until_idle(url, headers), rss_mb(pids())
    loads = [_Load(url, model, headers, timeout_s, seed) for seed in range(concurrency)]
    started = time.monotonic()
    _run_all(loads, started + duration_s)
    elapsed = time.monotonic() - started
    idle_after = wait_until_idle(url, headers)
    time.sleep(2)  # let the replicas free what the last requests held
    outcomes = sum((load.outcomes for load in loads), Counter())
    return SoakReport(
        duration_s=round(elapsed, 1),
        concurrency=concurrency,
        outcomes=dict(outcomes),
        requests_per_s=round(sum(outcomes.values()) / elapsed, 2),
        idle_before=idle_before,
        idle_after=idle_after,
        rss_mb_before=round(rss_before, 1),
        rss_mb_after=round(rss_mb(pids()), 1),
        errors=[e for load in loads for e in load.errors][:10],
    )


def _run_all(loads: list[_Load], deadline: float) -> None:
    threads = [threading.Thread(target=load.run, args=(deadline,), daemon=True) for load in loads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main(argv: list[str] | None = None) -> int:
    import ray
    from ray import serve

    from cluster.local import init_private_session
    from serving.config import LLMConfig
    from serving.server.deployments import deploy

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default", help="model source (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=6, help="client threads (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="API port on 127.0.0.1 (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    # capacity below the client count, so back-pressure is part of the run
    server = {"port": args.port, "max_ongoing_requests": max(1, args.concurrency - 2), "max_queued_requests": 1}
    config = LLMConfig.model_validate(
        {"model": {"source": args.model, "max_model_len": 1024}, "engine": {"kv_cache_memory_gb": 0.25}, "server": server}
    )
    init_private_session()
    try:
        url = deploy(config, timeout_s=300)
        model = requests.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        report = run_soak(url, model, args.duration, args.concurrency, lambda: actor_pids("APIIngress") + actor_pids("LLMDeployment"))
    finally:
        serve.shutdown()
        ray.shutdown()
    text = json.dumps(asdict(report) | {"clean": report.clean}, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report.clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
