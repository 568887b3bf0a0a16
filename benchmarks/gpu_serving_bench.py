"""Serving benchmark on one GPU: the load tester's closed loop against AsyncLLMEngine, in process.

    python3 -m benchmarks.gpu_serving_bench            # one GPU: Llama-3-8B-shaped random bf16 weights
    python -m benchmarks.gpu_serving_bench --tiny      # anywhere: a tiny random model on CPU (a quick check)

The GPU machine has torch and transformers but no Ray, so requests go straight to the async engine
(no HTTP) with `llmcluster bench`'s closed loop and metrics: concurrency 1 to 64, prompts of
--input-len random token ids, --output-len greedy tokens with ignore_eos. Each point first runs one
uncounted wave of warm-up requests, then 4 x concurrency requests (at least 8), and stops sending
after --max-seconds-per-point. Writes gpu_serving.json and its PNG plots to $OUT (when set) or
benchmarks/results/, and prints the summary table. Under 6 minutes on one H100/H200, the random
model's 16 GB write and load included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

import torch

from serving.config import LLMConfig
from serving.engine.async_engine import AsyncLLMEngine
from serving.loadtest.bench import RunSpec, run_points
from serving.loadtest.engine_target import EngineTarget
from serving.loadtest.load import LoadPoint
from serving.loadtest.plots import plot_result
from serving.loadtest.report import result_document, summary_table, write_result
from serving.loadtest.workloads import token_id_requests
from serving.models.tiny import make_tiny_llama

PROMPT_VOCAB = range(3, 380)  # ids the random model's (tiny) tokenizer can decode


def prepare_model(folder: Path, tiny: bool, layers: int) -> None:
    """Write the random model once; a complete folder of the same shape (from an earlier run, or
    from benchmarks/gpu_bench.py in the same gpu_check.sh) is reused."""
    if tiny:
        make_tiny_llama(folder, num_layers=2)
        return
    from benchmarks.gpu_bench import LLAMA3_8B, write_random_model

    config = LLAMA3_8B | {"num_hidden_layers": layers}
    config_path, index_path = folder / "config.json", folder / "model.safetensors.index.json"
    if not (index_path.exists() and config_path.exists() and json.loads(config_path.read_text()) == config):
        write_random_model(folder, config)


async def sweep(engine: AsyncLLMEngine, concurrencies: list[int], args: argparse.Namespace) -> list[dict]:
    workload = token_id_requests(PROMPT_VOCAB, 4 * max(concurrencies), args.input_len, args.output_len)
    target = EngineTarget(engine)
    records = []
    for concurrency in concurrencies:
        spec = RunSpec(num_requests=max(8, 4 * concurrency), duration_s=args.max_seconds_per_point, warmup=concurrency)
        records += await run_points(target, workload, [LoadPoint(concurrency=concurrency)], spec)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model on CPU instead of the 8B shape on CUDA")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/llama3-8b-random"))
    parser.add_argument("--layers", type=int, default=32, help="fewer layers for a quick try (default: 32)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-seconds-per-point", type=float, default=30.0)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = parser.parse_args()
    folder = args.folder.with_name(args.folder.name + "-tiny") if args.tiny else args.folder
    started = time.perf_counter()
    prepare_model(folder, args.tiny, args.layers)
    written = time.perf_counter()
    device, dtype = ("cpu", "float32") if args.tiny else ("cuda", "bfloat16")
    config = LLMConfig.model_validate(
        {
            "model": {"source": str(folder), "dtype": dtype, "device": device, "max_model_len": 512},
            "engine": {"max_num_seqs": max(args.concurrency), "kv_cache_memory_gb": 0.25 if args.tiny else 8},
        }
    )
    engine = AsyncLLMEngine(config)
    loaded = time.perf_counter()
    records = asyncio.run(sweep(engine, args.concurrency, args))
    settings = {
        "target": "AsyncLLMEngine in process (no HTTP, no Ray)",
        "model": "tiny random Llama" if args.tiny else f"Llama-3-8B-shaped random weights, {args.layers} layers",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "dtype": dtype,
        "torch": torch.__version__,
        "max_num_seqs": max(args.concurrency),
        "workload": {"kind": "random token ids", "input_len": args.input_len, "output_len": args.output_len},
        "model_write_s": round(written - started, 1),
        "engine_start_s": round(loaded - written, 1),
        "total_s": round(time.perf_counter() - started, 1),
    }
    document = result_document("llm-cluster engine" + (" (tiny, cpu)" if args.tiny else ""), settings, records)
    print(summary_table(records))
    print({k: settings[k] for k in ("device", "model_write_s", "engine_start_s", "total_s")})
    write_result(document, args.out / "gpu_serving.json")
    for path in plot_result(document, args.out / "gpu_serving"):
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
