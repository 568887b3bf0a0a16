"""Quantized weights (issue 22): speed, resident memory and quality of each format, in one run.

    python -m benchmarks.quant_bench                  # speed: batch 1 and 32, 128 greedy tokens
    python -m benchmarks.quant_bench --quality        # perplexity on tests/data/held_in.txt, greedy agreement

Speed: every format (float32, int8, int4, the default model's own Q4_1 file served with `gguf`)
stays loaded; each round runs all of them one after the other at batch 1, then at batch 32
(prompts of 16 tokens, 128 output tokens each, ignore_eos), in the reverse order every other round
so that the drift within a round does not always fall on the same formats, and the ratios to float32
are taken within each round, because this shared 2-core machine's speed drifts from minute to minute.
Reported: the median over rounds of each ratio, and of tok/s.

llama.cpp's Q8_0 (converted from the same folder) and Q4_1 (the embedded default's own GGUF) run in the same
rounds, after our formats at each batch size: one process each (benchmarks/peers/llamacpp_offline.py, in the
peers' llama-cpp-python that benchmarks/peers/setup_peers.sh installs) on the same prompts, timed after its
warm-up, its ratio taken to our float32 of that round. On by default when the peers are set up (--peers-dir);
otherwise the run says so and goes on without them; --no-llamacpp leaves them out.

Memory: the bytes of every weight a loaded model holds (parameters and buffers, the rotary tables
left out), as a ratio to float32's.

Quality: perplexity of each format on the held-in text (3,266 tokens) from the engine's prompt
logprobs, and greedy agreement with float32 over the first 32 tokens of 16 prompts (how many
prompts give the same 32 tokens, and the mean number of tokens before the first difference).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import engine_bench
from serving.engine.llm import LLM
from serving.engine.sampling_params import SamplingParams
from serving.models.source import gguf_file, resolve_model

FORMATS = ("none", "int8", "int4", "gguf")
HELD_IN = Path(__file__).resolve().parents[1] / "tests" / "data" / "held_in.txt"
LLAMACPP_OFFLINE = Path(__file__).resolve().parent / "peers" / "llamacpp_offline.py"
PROMPTS = [
    *engine_bench.PROMPTS,
    "The best way to learn a new language is",
    "In the year 2050, cities will",
    "A good friend is someone who",
    "The main causes of the French Revolution were",
    "To repair a bicycle tyre, first",
    "Photosynthesis is the process by which",
    "def quicksort(items):",
    "The three primary colours are",
]


def engine(quantization: str, threads: int, max_model_len: int = 1024, kv_gb: float = 0.5) -> LLM:
    return LLM(
        "default", quantization=quantization, max_num_seqs=32, max_model_len=max_model_len, kv_cache_memory_gb=kv_gb, num_threads=threads
    )


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` prompts of 16 tokens (numbered, so that no two share a prefix in the cache)."""
    prompts = []
    for i in range(count):
        ids = tokenizer.encode(f"{i}. {PROMPTS[i % len(PROMPTS)]} {PROMPTS[(i + 1) % len(PROMPTS)]}")
        prompts.append(ids[:16])
    return prompts


def weight_bytes(llm: LLM) -> int:
    model = llm.engine.runner.model
    tensors = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()] if not name.startswith("rotary.")}
    return sum(t.numel() * t.element_size() for t in tensors.values() if t is not None)


def llamacpp_models(args: argparse.Namespace) -> dict[str, Path]:
    """llama.cpp's rows (name: GGUF file), or none when left out or, unless asked for, not set up."""
    if args.llamacpp is False:
        return {}
    models = {
        "llama.cpp Q8_0": args.peers_dir / "models" / "SmolLM2-135M-Instruct-q8_0.gguf",
        "llama.cpp Q4_1": gguf_file(resolve_model("default")),
    }
    missing = [str(path) for path in [args.peers_dir / "llamacpp" / "bin" / "python", *models.values()] if not path.exists()]
    if not missing:
        return models
    message = f"llama.cpp is not set up (missing {', '.join(missing)}; run PEERS_DIR={args.peers_dir} benchmarks/peers/setup_peers.sh)"
    if args.llamacpp:
        raise SystemExit(message)
    print(f"{message}: running without llama.cpp", flush=True)
    return {}


def llamacpp_tok_s(args: argparse.Namespace, model: Path, prompts_file: Path) -> float:
    """Output tok/s of one timed llama.cpp run (after its warm-up) of the prompts in `prompts_file`."""
    command = [str(args.peers_dir / "llamacpp" / "bin" / "python"), str(LLAMACPP_OFFLINE), str(model), str(prompts_file)]
    command += [str(args.output_len), "1", "--threads", str(args.threads)]
    run = subprocess.run(command, check=False, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"llama.cpp failed on {model} (exit {run.returncode}):\n{run.stderr[-3000:]}")
    [line] = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))["tok_s"][0]


def speed(args: argparse.Namespace) -> dict:
    ours = {q: engine(q, args.threads) for q in args.formats}
    memory = {q: weight_bytes(llm) for q, llm in ours.items()}
    tokenizer = ours[args.formats[0]].tokenizer
    peers = llamacpp_models(args)
    rounds: dict[int, list[dict[str, float]]] = {b: [] for b in args.batch_sizes}
    with tempfile.TemporaryDirectory(prefix="quant-bench-") as tmp:
        for r in range(args.rounds):
            for batch in args.batch_sizes:
                prompts = make_prompts(tokenizer, batch)
                prompts_file = Path(tmp) / f"prompts-{batch}.json"
                prompts_file.write_text(json.dumps(prompts), encoding="utf-8")
                order = list(ours) if r % 2 == 0 else list(ours)[::-1]  # which runs first alternates between rounds
                timed = {q: len(prompts) * args.output_len / engine_bench.time_engine(ours[q], prompts, args.output_len) for q in order}
                figures = {q: timed[q] for q in ours} | {name: llamacpp_tok_s(args, model, prompts_file) for name, model in peers.items()}
                rounds[batch].append(figures)
                print(f"round {r + 1} batch {batch}: " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()), flush=True)
    result = {
        "memory_bytes": memory,
        "memory_vs_float32": {q: b / memory["none"] for q, b in memory.items()},
        "llamacpp_models": {name: str(model) for name, model in peers.items()},
        "batches": {},
    }
    for batch, figures in rounds.items():
        names = list(figures[0])
        result["batches"][batch] = {
            name: {
                "tok_s": statistics.median(f[name] for f in figures),
                "vs_float32": statistics.median(f[name] / f["none"] for f in figures),
                "rounds": [round(f[name], 1) for f in figures],
            }
            for name in names
        }
    return result


def speed_table(result: dict) -> str:
    """The speed result as a markdown table: per batch size, median tok/s (the rounds) and the ratio to float32."""
    batches = result["batches"]
    header = "| format | " + " | ".join(f"batch {b} tok/s (rounds) | vs float32" for b in batches) + " |"
    lines = [header, "|" + " --- |" * (1 + 2 * len(batches))]
    for name in next(iter(batches.values())):
        cells = [
            f"{row['tok_s']:.1f} ({', '.join(map(str, row['rounds']))}) | {row['vs_float32']:.2f}x"
            for row in (figures[name] for figures in batches.values())
        ]
        lines.append(f"| {'float32' if name == 'none' else name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def perplexity(llm: LLM, text: str) -> tuple[float, int]:
    """exp(mean negative log-likelihood) of every token of `text` after the first, and the count."""
    output = llm.generate([text], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False)[0]
    logprobs = [entry[0] for entry in output.prompt_logprobs if entry is not None]
    return math.exp(-sum(logprobs) / len(logprobs)), len(logprobs)


def quality(args: argparse.Namespace) -> dict:
    text = HELD_IN.read_text(encoding="utf-8")
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    result: dict = {}
    reference: list[list[int]] = []
    for q in args.formats:
        llm = engine(q, args.threads, max_model_len=4096, kv_gb=0.5)
        ppl, count = perplexity(llm, text)
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        if q == "none":
            reference = tokens
        common = [next((i for i, (a, b) in enumerate(zip(t, r)) if a != b), len(t)) for t, r in zip(tokens, reference)]
        result[q] = {
            "perplexity": ppl,
            "tokens": count,
            "identical_prompts": sum(c == 32 for c in common),
            "mean_common_prefix": statistics.mean(common),
        }
        result[q]["vs_float32"] = ppl / result["none"]["perplexity"]
        print(q, result[q], flush=True)
        del llm
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quality", action="store_true", help="perplexity and greedy agreement instead of speed")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS, help="ours; 'none' (float32) must come first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the engine (and of llama.cpp)")
    parser.add_argument(
        "--llamacpp",
        action=argparse.BooleanOptionalAction,
        help="llama.cpp's Q8_0 and Q4_1 in every speed round (default: when the peers are set up in --peers-dir)",
    )
    parser.add_argument("--peers-dir", type=Path, default=Path(os.environ.get("PEERS_DIR", "/opt/peers")))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quant_bench.json"))
    args = parser.parse_args()
    if args.formats[0] != "none":
        parser.error("the formats must start with 'none', the float32 baseline")
    result = quality(args) if args.quality else speed(args)
    result["settings"] = {k: str(v) for k, v in vars(args).items()} | {"command": " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = args.out.with_name(args.out.stem + ("-quality" if args.quality else "") + args.out.suffix)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))
    if not args.quality:
        print(speed_table(result))


if __name__ == "__main__":
    main()
