"""Our engine against vLLM's offline engine (its CPU build) on one batch, in one run:

    python -m benchmarks.peers.offline_comparison            # batch 32, 128 greedy tokens, 2 threads

Ours runs --repeats times, then vLLM (benchmarks/peers/vllm_offline.py, in the peers' venv) --repeats times
after its warm-up, then ours again: vLLM's median over the mean of our two medians brackets the machine's
drift. Same prompts (engine_bench's 12-16 token prompts, as token ids), float32, greedy, ignore_eos.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from benchmarks.engine_bench import make_prompts, time_engine
from benchmarks.peers.run_comparison import MODEL
from serving.engine.llm import LLM


def ours(llm: LLM, prompts: list[list[int]], output_len: int, repeats: int) -> list[float]:
    return [len(prompts) * output_len / time_engine(llm, prompts, output_len) for _ in range(repeats)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers-dir", type=Path, default=Path(os.environ.get("PEERS_DIR", "/opt/peers")))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/peers/offline.json"))
    args = parser.parse_args()
    llm = LLM(str(MODEL), dtype="float32", num_threads=args.threads, max_num_seqs=args.batch, max_model_len=2048)
    prompts = make_prompts(llm.tokenizer, args.batch)
    time_engine(llm, prompts[:4], 8)  # warm-up
    before = ours(llm, prompts, args.output_len, args.repeats)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(prompts, file)
        file.flush()
        env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}"}
        command = [str(args.peers_dir / "vllm/bin/python"), str(Path(__file__).with_name("vllm_offline.py")), str(MODEL), file.name]
        run = subprocess.run(command + [str(args.output_len), str(args.repeats)], env=env, capture_output=True, text=True, check=True)
    [line] = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    vllm = json.loads(line.removeprefix("RESULT "))["tok_s"]
    after = ours(llm, prompts, args.output_len, args.repeats)
    ours_tok_s = (statistics.median(before) + statistics.median(after)) / 2
    result = {
        "ours_before": before,
        "vllm": vllm,
        "ours_after": after,
        "ratio": ours_tok_s / statistics.median(vllm),
        "settings": vars(args),
    }
    print(f"batch {args.batch}: ours {ours_tok_s:.1f} tok/s (before {statistics.median(before):.1f}, after {statistics.median(after):.1f}), "
          f"vLLM {statistics.median(vllm):.1f}: {result['ratio']:.2f}x")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result | {"settings": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
