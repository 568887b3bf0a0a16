"""Costs and gains of splitting the default model over Ray workers on this machine.

    python -m benchmarks.parallel_bench

1. Per-worker memory at TP=2 vs TP=1 (RSS the model adds to a worker, and tensor bytes), on a
   random 190M-parameter Llama with 8 heads (SmolLM2's 9 heads admit TP=3, not 2).
2. PP=2 throughput with one step per stage in flight vs one step at a time, same run.
3. The cost of the TP all-reduce on gloo: one call, and two per layer for a whole step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray
from tqdm import tqdm

from benchmarks.engine_bench import make_prompts
from serving.config import EngineConfig, LLMConfig, ModelConfig, ParallelConfig
from serving.engine.llm import LLM
from serving.engine.make_runner import make_runner
from serving.engine.sampling_params import SamplingParams
from serving.models.arch import ModelArch
from serving.models.source import resolve_model
from serving.models.tiny import make_tiny_llama


def config(tp: int, pp: int, source: str = "default", kv_cache_gb: float = 0.25) -> LLMConfig:
    return LLMConfig(
        model=ModelConfig(source=source, max_model_len=512),
        engine=EngineConfig(kv_cache_memory_gb=kv_cache_gb, max_num_seqs=32),
        parallel=ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp),
    )


def memory(folder: Path) -> dict:
    reports = {}
    for tp in tqdm((1, 2), desc="TP memory"):
        executor = make_runner(config(tp, 1, str(folder), kv_cache_gb=0.05), folder, 512)  # mostly the weights
        reports[tp] = executor.memory_reports()
        executor.shutdown()
    added = {tp: max(r["peak_rss"] - r["rss_before_load"] for r in rs) for tp, rs in reports.items()}
    weights = {tp: max(r["weights"] for r in rs) for tp, rs in reports.items()}
    return {
        "peak_rss_added_mb": {tp: round(v / 2**20) for tp, v in added.items()},
        "peak_rss_total_mb": {tp: round(max(r["peak_rss"] for r in rs) / 2**20) for tp, rs in reports.items()},
        "weights_mb": {tp: round(v / 2**20) for tp, v in weights.items()},
        "tp2_over_tp1_added_rss": round(added[2] / added[1], 2),
        "tp2_over_tp1_weights": round(weights[2] / weights[1], 2),
    }


def pipeline(output_len: int, requests: int) -> dict:
    llm = LLM(config=config(1, 2))
    prompts = make_prompts(llm.tokenizer, requests)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)
    results = {}
    for depth in (1, 2):  # one step at a time vs one step per stage in flight
        llm.engine.pipeline_depth = depth
        llm.engine.scheduler.max_seqs_per_step = 32 // depth
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        results[depth] = requests * output_len / (time.perf_counter() - start)
    executor = llm.engine.runner
    executor.shutdown()
    return {
        "pp2_tok_s_one_at_a_time": round(results[1], 1),
        "pp2_tok_s_in_flight": round(results[2], 1),
        "ratio": round(results[2] / results[1], 2),
    }


def all_reduce(folder: Path) -> dict:
    """Activations of SmolLM2's width (576) across a TP=3 group."""
    arch = ModelArch.from_folder(folder)
    executor = make_runner(config(3, 1), folder, 512)
    rows = {rows: executor.time_all_reduce(rows) for rows in (1, 32, 512)}
    executor.shutdown()
    per_step = {rows: 2 * arch.num_layers * seconds for rows, seconds in rows.items()}
    return {
        "all_reduce_ms": {rows: round(s * 1000, 3) for rows, s in rows.items()},
        "per_step_ms_two_per_layer": {rows: round(s * 1000, 1) for rows, s in per_step.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/parallel.json"))
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False)  # its own cluster, never a running one
    with tempfile.TemporaryDirectory() as tmp:
        mid = make_tiny_llama(Path(tmp) / "mid", num_layers=16, hidden_size=1024, num_heads=8, num_kv_heads=4, intermediate_size=2816)
        result = {"memory": memory(mid)}
    result |= {"all_reduce": all_reduce(resolve_model("default")), "pipeline": pipeline(args.output_len, args.requests)}
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
