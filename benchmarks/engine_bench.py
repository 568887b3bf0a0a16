"""Engine throughput against Hugging Face transformers' `generate`, measured in the same run.

    python -m benchmarks.engine_bench                       # CPU: default model, batches 1/8/32
    python -m benchmarks.engine_bench --prefix-caching      # 32 requests sharing a 512-token prefix
    python -m benchmarks.engine_bench --load-memory         # peak RSS while loading vs weight size

Greedy decoding with ignore_eos, so every request makes exactly --output-len tokens. Each batch size
runs --repeats engine/transformers pairs back to back and reports the median of the pairs' ratios:
this machine's memory bandwidth swings between about 13 and 26 GB/s from minute to minute, so a
single pair can be off by a third. Results go to the terminal and to a JSON file (--out).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from serving.engine.llm import LLM
from serving.engine.sampling_params import SamplingParams
from serving.models.source import resolve_model

PROMPTS = [
    "The history of the Roman Empire began when",
    "Write a short poem about the ocean at night.",
    "Explain how a paged KV cache works in simple words.",
    "List three reasons why the sky appears blue today.",
    "My favourite recipe for a quick vegetable soup is",
    "Describe the rules of chess to a curious beginner.",
    "What are the main differences between cats and dogs?",
    "Summarise the plot of a detective novel you like.",
]


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` prompts of 12-16 tokens, cycling through PROMPTS with a distinguishing number."""
    prompts = []
    for i in range(count):
        ids = tokenizer.encode(f"{i}. {PROMPTS[i % len(PROMPTS)]}")
        prompts.append(ids[:16])
    return prompts


def time_engine(llm: LLM, prompts: list[list[int]], output_len: int) -> float:
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    return elapsed


def time_transformers(model, prompts: list[list[int]], output_len: int, pad_id: int) -> float:
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=pad_id,
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == width + output_len
    return elapsed


def throughput(args: argparse.Namespace) -> dict:
    llm = LLM(args.model, max_num_seqs=max(args.batch_sizes), max_model_len=args.max_model_len, dtype=args.dtype, device=args.device)
    prompts_all = make_prompts(llm.tokenizer, max(args.batch_sizes))
    time_engine(llm, prompts_all[:2], 4)  # warm-up
    hf = None
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(llm.engine.model_dir, dtype=llm.engine.runner.dtype).to(llm.engine.runner.device)
        time_transformers(hf, prompts_all[:2], 4, pad_id=0)
    rows = []
    runs = [batch for batch in args.batch_sizes for _ in range(args.repeats)]
    samples: dict[int, list[tuple[float, float | None]]] = {batch: [] for batch in args.batch_sizes}
    for batch in tqdm(runs, desc="Runs (engine, then transformers)"):
        # the two sides run back to back, so a swing in this machine's memory bandwidth hits both
        prompts = prompts_all[:batch]
        ours = batch * args.output_len / time_engine(llm, prompts, args.output_len)
        theirs = None if hf is None else batch * args.output_len / time_transformers(hf, prompts, args.output_len, pad_id=0)
        samples[batch].append((ours, theirs))
    for batch, pairs in samples.items():
        row = {
            "batch": batch,
            "engine_tok_s": round(statistics.median(o for o, _ in pairs), 1),
            "engine_runs": [round(o, 1) for o, _ in pairs],
        }
        if hf is not None:
            ratios = [o / t for o, t in pairs]
            row |= {
                "transformers_tok_s": round(statistics.median(t for _, t in pairs), 1),
                "transformers_runs": [round(t, 1) for _, t in pairs],
                "ratio": round(statistics.median(ratios), 2),  # the median of the pairs' ratios
                "ratio_runs": [round(r, 2) for r in ratios],
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"throughput": rows}


def prefix_caching(args: argparse.Namespace) -> dict:
    """32 requests with one shared 512-token prefix, prefix caching on vs off."""
    results = {}
    for enabled in (True, False):
        llm = LLM(
            args.model,
            enable_prefix_caching=enabled,
            max_num_seqs=32,
            max_model_len=args.max_model_len,
            dtype=args.dtype,
            device=args.device,
        )
        vocab = llm.engine.vocab_size
        shared = torch.randint(100, vocab - 100, (512,), generator=torch.Generator().manual_seed(0)).tolist()
        prompts = [shared + llm.tokenizer.encode(f" Question {i}: what comes next?", add_special_tokens=False) for i in range(32)]
        elapsed = time_engine(llm, prompts, args.prefix_output_len)
        results["on" if enabled else "off"] = round(elapsed, 2)
        print(f"prefix caching {'on' if enabled else 'off'}: {elapsed:.2f} s", flush=True)
        del llm
    results["speedup"] = round(results["off"] / results["on"], 2)
    return {"prefix_caching_seconds": results}


def load_memory(args: argparse.Namespace) -> dict:
    """Peak RSS of a fresh process that imports torch and loads the model, vs the float32 weight size."""
    folder = resolve_model(args.model)
    code = (
        "import resource, torch\n"
        "from pathlib import Path\n"
        "from serving.models.arch import ModelArch\n"
        "from serving.models.loader import load_model\n"
        f"folder = Path({str(folder)!r})\n"
        "torch.nn.Embedding(8, 8, device='meta')  # torch loads its meta-device machinery (~75 MB) on first use\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "load_model(folder, ModelArch.from_folder(folder), torch.float32, torch.device('cpu'), 2048)\n"
        "print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    before_kb, peak_kb = map(int, subprocess.check_output([sys.executable, "-c", code], text=True).split()[-2:])
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))  # the default model is stored in float32
    result = {
        "weights_mb": round(weights / 2**20),
        "rss_torch_initialised_mb": round(before_kb / 1024),
        "peak_rss_mb": round(peak_kb / 1024),
        "peak_over_weights": round(peak_kb * 1024 / weights, 2),
        "load_increase_over_weights": round((peak_kb - before_kb) * 1024 / weights, 2),
    }
    print(json.dumps(result), flush=True)
    return {"load_memory": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model folder, repo id or 'default'")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="engine/transformers pairs per batch size; the median ratio is reported")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-transformers", action="store_true", help="time only the engine")
    parser.add_argument("--prefix-caching", action="store_true", help="run the shared-prefix comparison instead")
    parser.add_argument("--prefix-output-len", type=int, default=16)
    parser.add_argument("--load-memory", action="store_true", help="measure peak RSS while loading instead")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    if args.load_memory:
        result = load_memory(args)
    elif args.prefix_caching:
        result = prefix_caching(args)
    else:
        result = throughput(args)
    result |= {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "seconds": round(time.time() - started, 1),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
