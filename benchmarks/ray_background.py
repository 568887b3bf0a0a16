"""What an idle served cluster costs the engine next to it: offline throughput with the cluster's processes running
against the same cluster stopped (SIGSTOP), alternating every run.

    python -m benchmarks.ray_background                  # default model, 8 pairs
    python -m benchmarks.ray_background --pairs 12 --output-len 64
    python -m benchmarks.ray_background --like-serve     # the cluster `llmcluster serve` starts

A child process starts a local Ray cluster and deploys the model as serving_overhead does (the LLM and API replicas,
Serve's controller and proxies, HAProxy, the metrics exporter), then idles. By default that cluster is the `ray.init`
session serving_overhead and the tests start (no dashboard, with the log monitor); with --like-serve it is the one
`llmcluster serve` starts (`ray start` in a session of its own, with the dashboard, without the log monitor).
This process, which is not a Ray driver, steps its own engine on --concurrency prompts to completion
(serving_overhead.offline_throughput), once with every process of that cluster running and once with all of them
stopped, in alternating order, so the two halves of a pair are seconds apart (this machine's speed drifts by a third
from minute to minute; serving_overhead's "Ray's background" compares runs minutes apart). Prints the median of the
pairs' ratios and each cluster process's CPU over the running halves, and writes a JSON file (--out).
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
from tqdm import tqdm

from benchmarks.serving_overhead import offline_throughput, prompts
from serving.config import LLMConfig
from serving.engine.async_engine import AsyncLLMEngine

# the child: an idle served cluster that lives until it is killed. Its cluster is the `ray.init` session of
# serving_overhead and the tests, or (argument "like-serve") the one `llmcluster serve` starts (serving/cli.py), stopped
# as `llmcluster shutdown` does.
_CLUSTER = """
import shutil, signal, sys, tempfile, time
from pathlib import Path
from cluster import local
from serving.config import LLMConfig
from serving.server.deployments import deploy
config, like_serve = LLMConfig.model_validate_json(sys.argv[1]), sys.argv[2] == "like-serve"
state_dir = Path(tempfile.mkdtemp(prefix="ray-background-"))
try:
    if like_serve:
        local.connect(local.start(state_dir, local.free_port(), local.free_port()).address, token_auth=True)
    else:
        local.init_private_session()
    # set after ray.init, which installs a SIGTERM handler of its own; ray's atexit shutdown then stops a ray.init session
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    deploy(config.model_copy(update={"server": config.server.model_copy(update={"port": local.free_port()})}))
    print("ready", flush=True)
    while True:
        time.sleep(3600)
finally:
    local.stop(state_dir)  # nothing to stop for a ray.init session
    shutil.rmtree(state_dir)
"""


def start_cluster(config: LLMConfig, like_serve: bool = False) -> subprocess.Popen:
    kind = "like-serve" if like_serve else "ray.init"
    child = subprocess.Popen([sys.executable, "-c", _CLUSTER, config.model_dump_json(), kind], stdout=subprocess.PIPE, text=True)
    if child.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the cluster did not start (exit code {child.wait()})")
    return child


def cluster_processes(child: subprocess.Popen) -> list[psutil.Process]:
    root = psutil.Process(child.pid)
    return [root, *root.children(recursive=True)]


def signal_all(processes: list[psutil.Process], signum: int) -> None:
    for process in processes:
        try:
            process.send_signal(signum)
        except psutil.NoSuchProcess:
            continue


def cpu_seconds(processes: list[psutil.Process]) -> dict[str, float]:
    """CPU seconds so far per process, named by its title (Ray titles an actor's process `ray::Class`)."""
    seconds: dict[str, float] = {}
    for process in processes:
        try:
            name = f"{_title(process.cmdline() or [process.name()])} ({process.pid})"
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        seconds[name] = times.user + times.system
    return seconds


def _title(cmdline: list[str]) -> str:
    """`ray::Class` for a Ray worker, else the program and its first argument that is not an option (a script)."""
    if cmdline[0].startswith("ray::"):
        return cmdline[0][:60]
    if Path(cmdline[0]).name.startswith("python") and "-c" in cmdline:
        return f"{Path(cmdline[0]).name} -c (this benchmark's cluster driver)"
    script = next((part for part in cmdline[1:] if not part.startswith("-")), "")
    return f"{Path(cmdline[0]).name} {Path(script).name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model folder, repo id or 'default'")
    parser.add_argument("--pairs", type=int, default=8, help="running/stopped pairs; the median of their ratios is reported")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--like-serve", action="store_true", help="the cluster `llmcluster serve` starts (see above)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ray_background.json"))
    args = parser.parse_args()
    config = LLMConfig.model_validate(
        {"model": {"source": args.model, "max_model_len": 1024}, "engine": {"kv_cache_memory_gb": 0.5, "max_num_seqs": args.concurrency}}
    )
    child = start_cluster(config, args.like_serve)
    try:
        processes = cluster_processes(child)
        engine, texts = AsyncLLMEngine(config), prompts(args.concurrency)
        offline_throughput(engine, texts, args.output_len)  # warm-up
        running, stopped, busy_s = [], [], 0.0
        cpu: dict[str, float] = {}
        for i in tqdm(range(args.pairs), desc="Pairs (cluster running, stopped)"):
            for state in ("running", "stopped") if i % 2 == 0 else ("stopped", "running"):
                signal_all(processes, signal.SIGCONT if state == "running" else signal.SIGSTOP)
                if state == "stopped":
                    stopped.append(offline_throughput(engine, texts, args.output_len))
                    continue
                before, start = cpu_seconds(processes), time.perf_counter()
                running.append(offline_throughput(engine, texts, args.output_len))
                busy_s += time.perf_counter() - start
                for name, seconds in cpu_seconds(processes).items():
                    cpu[name] = cpu.get(name, 0.0) + seconds - before.get(name, seconds)
    finally:
        signal_all(cluster_processes(child), signal.SIGCONT)
        child.terminate()  # it stops its cluster on the way out (ray.shutdown at exit, or local.stop with --like-serve)
        child.wait()
    ratios = [r / s for r, s in zip(running, stopped)]
    shares = {name: seconds / busy_s for name, seconds in sorted(cpu.items(), key=lambda item: -item[1])}
    result = {
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "running_tok_s": running,
        "stopped_tok_s": stopped,
        "cluster_cpu_cores_while_running": sum(shares.values()),
        "cpu_cores_by_process": shares,
        "settings": vars(args) | {"out": str(args.out)},
    }
    print(
        f"Offline throughput with the idle cluster running: {statistics.median(running):.0f} tok/s, stopped: "
        f"{statistics.median(stopped):.0f} tok/s; running/stopped, median of {args.pairs} pairs: {result['ratio_median']:.3f} "
        f"({', '.join(f'{r:.2f}' for r in ratios)})\n"
        f"The cluster's processes used {result['cluster_cpu_cores_while_running']:.3f} cores meanwhile; the busiest:"
    )
    for name, cores in list(shares.items())[:12]:
        print(f"  {cores * 100:5.2f}% of a core  {name}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
