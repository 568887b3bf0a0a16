"""Serving overhead: the engine behind HTTP + Ray Serve against the engine called directly, in one run.

    python -m benchmarks.serving_overhead                 # default model, CPU
    python -m benchmarks.serving_overhead --requests 20 --output-len 128

1. Direct, in this process: the median time to first token of one request at a time through
   AsyncLLMEngine, the offline throughput of 32 requests stepped to completion by LLMEngine, and
   (for reference) the throughput of 32 concurrent requests through AsyncLLMEngine.
2. Served: the same config deployed on a local Ray cluster (`deploy`, as `llmcluster serve` does),
   called over HTTP with the same prompts (aiohttp, a lean client on the same cores): median time to
   first streamed token at concurrency 1, and output throughput at concurrency 32, streaming and not.

Each of --rounds rounds measures 1 with no Ray running, starts a local cluster for 2, stops it and
measures 1 again; the direct figures of a round are the means of its two. This machine's speed
drifts by a third from minute to minute, so a ratio of two numbers taken minutes apart says little:
the baseline brackets the served measurements in time, the served streamed and non-streamed runs
swap order every round, and the result is the median over the rounds of each round's own
difference (TTFT) and ratio (throughput).

Those ratios hold two costs: the request path (HTTP, the API replica, Ray calls) and Ray's own
processes, which wake up hundreds of times a second even when idle. To tell them apart, the offline
run is also made on the running cluster, right before and after each served throughput run: the
served throughput over the mean of those two (seconds apart rather than minutes) is the cost of the
request path alone, and offline on the idle cluster over offline with no Ray is the cost of Ray's
background.

Each served throughput run also records the CPU time the LLM replica, the API replica and HAProxy
used over it (`/proc`, all threads), per generated token.

Greedy decoding with ignore_eos, so every request makes exactly --output-len tokens. Prints the
ratios and writes a JSON file (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import psutil
import ray
from ray import serve
from tqdm import tqdm

from benchmarks.engine_bench import PROMPTS
from benchmarks.soak import actor_pids
from cluster.local import free_port, init_private_session
from serving.config import LLMConfig
from serving.engine.async_engine import AsyncLLMEngine
from serving.engine.llm_engine import LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.server.deployments import deploy


def prompts(count: int) -> list[str]:
    return [f"{i}. {PROMPTS[i % len(PROMPTS)]}" for i in range(count)]


async def direct_ttft(engine: AsyncLLMEngine, texts: list[str]) -> list[float]:
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    times = []
    for text in texts:
        start = time.perf_counter()
        async for _ in engine.generate(text, params):
            times.append(time.perf_counter() - start)
            break
    return times


def offline_throughput(engine: AsyncLLMEngine, texts: list[str], output_len: int) -> float:
    """The engine stepped in a plain loop, on its own thread (another thread would start a second OpenMP team)."""
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)

    def run(sync: LLMEngine) -> float:
        start = time.perf_counter()
        for i, text in enumerate(texts):
            sync.add_request(f"offline-{i}", text, params)
        while sync.has_unfinished_requests():
            sync.step()
        return len(texts) * output_len / (time.perf_counter() - start)

    return engine.run_on_engine_thread(run)


async def async_throughput(engine: AsyncLLMEngine, texts: list[str], output_len: int) -> float:
    """Concurrent requests through AsyncLLMEngine in this process: the engine as the replica runs it."""
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)

    async def one(text: str) -> None:
        async for _ in engine.generate(text, params):
            pass

    start = time.perf_counter()
    await asyncio.gather(*(one(text) for text in texts))
    return len(texts) * output_len / (time.perf_counter() - start)


async def served_ttft(session: aiohttp.ClientSession, url: str, model: str, texts: list[str]) -> list[float]:
    times = []
    for text in texts:
        body = {"model": model, "prompt": text, "max_tokens": 1, "temperature": 0, "stream": True}
        start = time.perf_counter()
        async with session.post(f"{url}/v1/completions", json=body) as response:
            async for line in response.content:
                if line.startswith(b"data: "):
                    times.append(time.perf_counter() - start)
                    break
    return times


async def served_throughput(session: aiohttp.ClientSession, url: str, model: str, texts: list[str], output_len: int, stream: bool) -> float:
    args = {"model": model, "max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        args["stream_options"] = {"include_usage": True}

    async def one(text: str) -> int:
        async with session.post(f"{url}/v1/completions", json=args | {"prompt": text}) as response:
            if not stream:
                return (await response.json())["usage"]["completion_tokens"]
            usage = None
            async for line in response.content:
                if line.startswith(b"data: {"):
                    usage = json.loads(line[6:])["usage"] or usage
            return usage["completion_tokens"]

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(text) for text in texts))
    elapsed = time.perf_counter() - start
    assert all(c == output_len for c in counts), counts
    return sum(counts) / elapsed


def process_cpu_s() -> dict[str, float]:
    """CPU seconds so far of the served processes: the LLM replica, the API replica, HAProxy (all threads)."""
    pids = {"llm": actor_pids("LLMDeployment"), "api": actor_pids("APIIngress"), "haproxy": haproxy_pids()}
    return {name: sum(_cpu_s(pid) for pid in group) for name, group in pids.items()}


def haproxy_pids() -> list[int]:
    pids = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.name() == "haproxy":
                pids.append(process.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def _cpu_s(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


async def measure_direct(engine: AsyncLLMEngine, args: argparse.Namespace) -> dict[str, float]:
    await direct_ttft(engine, prompts(4))  # warm-up
    ttft = statistics.median(await direct_ttft(engine, prompts(args.requests)))
    offline_throughput(engine, prompts(4), 4)  # warm-up
    throughput = offline_throughput(engine, prompts(args.concurrency), args.output_len)
    concurrent = await async_throughput(engine, prompts(args.concurrency), args.output_len)
    return {"ttft_ms": ttft * 1000, "throughput_tok_s": throughput, "async_throughput_tok_s": concurrent}


async def measure_served(engine: AsyncLLMEngine, url: str, args: argparse.Namespace, stream_first: bool) -> dict[str, float]:
    """TTFT and throughput through HTTP, and the offline throughput on the idle cluster before, between and after."""
    texts = prompts(args.concurrency)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.get(f"{url}/v1/models") as response:
            model = (await response.json())["data"][0]["id"]
        await served_ttft(session, url, model, prompts(4))  # warm-up
        ttft = statistics.median(await served_ttft(session, url, model, prompts(args.requests)))
        await served_throughput(session, url, model, prompts(4), 4, stream=True)  # warm-up
        order = (True, False) if stream_first else (False, True)
        throughput, offline, cpu = {}, [offline_throughput(engine, texts, args.output_len)], {}
        for stream in order:
            before = process_cpu_s()
            throughput[stream] = await served_throughput(session, url, model, texts, args.output_len, stream=stream)
            cpu[stream] = {name: (s - before[name]) / (len(texts) * args.output_len) * 1e6 for name, s in process_cpu_s().items()}
            offline.append(offline_throughput(engine, texts, args.output_len))
    # each served run's neighbours: the offline runs just before and just after it
    next_to = {stream: statistics.mean(offline[i : i + 2]) for i, stream in enumerate(order)}
    return (
        {
            "ttft_ms": ttft * 1000,
            "throughput_stream_tok_s": throughput[True],
            "throughput_tok_s": throughput[False],
            "offline_next_to_stream_tok_s": next_to[True],
            "offline_next_to_tok_s": next_to[False],
            "offline_ray_idle_tok_s": statistics.mean(offline),
        }
        | {f"cpu_us_per_token_{name}_stream": us for name, us in cpu[True].items()}
        | {f"cpu_us_per_token_{name}": us for name, us in cpu[False].items()}
    )


def measure_round(engine: AsyncLLMEngine, config: LLMConfig, args: argparse.Namespace, stream_first: bool) -> dict[str, dict[str, float]]:
    """The direct measurements with no Ray running, the served ones on a fresh local cluster, the direct ones again."""
    before = asyncio.run(measure_direct(engine, args))
    # a new port each round: the last round's proxy may not have let go of its port yet
    config = config.model_copy(update={"server": config.server.model_copy(update={"port": free_port()})})
    init_private_session()
    try:
        served = asyncio.run(measure_served(engine, deploy(config), args, stream_first))
    finally:
        serve.shutdown()
        ray.shutdown()
    after = asyncio.run(measure_direct(engine, args))
    direct = {key: (before[key] + after[key]) / 2 for key in before}
    return {"direct": direct, "served": served, "direct_before": before, "direct_after": after}


def summarize(rounds: list[dict[str, dict[str, float]]]) -> dict[str, float]:
    """Medians over the rounds of each round's own difference or ratio."""

    def median(value: Callable[[dict[str, float], dict[str, float]], float]) -> float:
        return statistics.median(value(r["direct"], r["served"]) for r in rounds)

    return {
        "ttft_overhead_ms": median(lambda d, s: s["ttft_ms"] - d["ttft_ms"]),
        "throughput_ratio": median(lambda d, s: s["throughput_tok_s"] / d["throughput_tok_s"]),
        "throughput_ratio_streaming": median(lambda d, s: s["throughput_stream_tok_s"] / d["throughput_tok_s"]),
        "async_throughput_ratio": median(lambda d, s: d["async_throughput_tok_s"] / d["throughput_tok_s"]),
        # the request path alone: against the offline runs on the same (idle) cluster, seconds apart
        "request_path_ratio": median(lambda d, s: s["throughput_tok_s"] / s["offline_next_to_tok_s"]),
        "request_path_ratio_streaming": median(lambda d, s: s["throughput_stream_tok_s"] / s["offline_next_to_stream_tok_s"]),
        # Ray's background: offline on the idle cluster against offline with no Ray
        "ray_idle_ratio": median(lambda d, s: s["offline_ray_idle_tok_s"] / d["throughput_tok_s"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model folder, repo id or 'default'")
    parser.add_argument("--requests", type=int, default=20, help="sequential requests for the TTFT median")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--rounds", type=int, default=5, help="direct/served rounds; the median of their differences and ratios is reported"
    )
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--kv-cache-memory-gb", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serving_overhead.json"))
    args = parser.parse_args()
    config = LLMConfig.model_validate(
        {
            "model": {"source": args.model, "max_model_len": args.max_model_len},
            "engine": {"kv_cache_memory_gb": args.kv_cache_memory_gb, "max_num_seqs": args.concurrency},
        }
    )
    engine = AsyncLLMEngine(config)  # the direct engine: idle while the served requests run
    rounds = []
    for i in tqdm(range(args.rounds), desc="Rounds (direct, served, direct)"):
        rounds.append(measure_round(engine, config, args, stream_first=i % 2 == 0))
        tqdm.write(json.dumps({side: {k: round(v, 1) for k, v in values.items()} for side, values in rounds[-1].items()}))
    result = summarize(rounds) | {"rounds": rounds, "settings": vars(args) | {"out": str(args.out)}}
    served = [r["served"] for r in rounds]
    direct = [r["direct"] for r in rounds]
    print(
        f"TTFT at concurrency 1: served {_median(served, 'ttft_ms'):.1f} ms vs direct {_median(direct, 'ttft_ms'):.1f} ms "
        f"(+{result['ttft_overhead_ms']:.1f} ms, the median of the rounds' differences)\n"
        f"Output throughput at concurrency {args.concurrency}: served {_median(served, 'throughput_tok_s'):.0f} tok/s, "
        f"{result['throughput_ratio']:.0%} of offline {_median(direct, 'throughput_tok_s'):.0f} tok/s; "
        f"streamed {_median(served, 'throughput_stream_tok_s'):.0f} tok/s, {result['throughput_ratio_streaming']:.0%}; "
        f"AsyncLLMEngine alone, in process: {_median(direct, 'async_throughput_tok_s'):.0f} tok/s, {result['async_throughput_ratio']:.0%} "
        f"(medians of {args.rounds} rounds' ratios)\n"
        f"Of which the request path alone (against offline on the idle cluster, run next to it): {result['request_path_ratio']:.0%}, "
        f"streamed {result['request_path_ratio_streaming']:.0%}; Ray's background (offline on the idle cluster against no Ray): "
        f"{result['ray_idle_ratio']:.0%}\n"
        f"CPU per generated token, streamed (not streamed): "
        + ", ".join(
            f"{name} {_median(served, f'cpu_us_per_token_{name}_stream'):.0f} ({_median(served, f'cpu_us_per_token_{name}'):.0f}) us"
            for name in ("llm", "api", "haproxy")
        )
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(row[key] for row in rows)


if __name__ == "__main__":
    main()
