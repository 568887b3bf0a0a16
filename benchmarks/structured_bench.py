"""The cost of constrained decoding: output throughput with a JSON schema per request against the same
requests unconstrained, and time to first token with a new schema against a cached one.

    python -m benchmarks.structured_bench                   # default model, 32 requests, 3 rounds

Throughput: --batch requests, each with its own JSON schema (an array of objects that cannot end
before --output-len tokens, so every request makes exactly that many), against the same prompts
with no constraint and ignore_eos, sampled at temperature 1 with seeds. Each round runs both, in
alternating order, and the median of the rounds' ratios is reported: the machine's cores are shared
and its speed drifts between minutes, so only ratios within a round are compared. The schemas are
compiled before timing (the steady state of a server that has seen them); TTFT is measured apart.

TTFT: one request, alone, from add_request to its first token: with a schema never seen (compiled
then), with the same schema again (cached), and with no constraint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.engine_bench import make_prompts
from serving.engine.llm import LLM
from serving.engine.llm_engine import LLMEngine
from serving.engine.sampling_params import OutputConstraint, SamplingParams


def row_schema(i: int) -> dict:
    """A schema per request (distinct property names), long enough for any --output-len."""
    item = {
        "type": "object",
        "properties": {
            f"name_{i}": {"type": "string", "maxLength": 12},
            "score": {"type": "integer", "minimum": 0, "maximum": 1000},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        },
        "required": [f"name_{i}", "score", "tags"],
        "additionalProperties": False,
    }
    return {"type": "array", "items": item, "minItems": 1000}


def constraint(i: int) -> OutputConstraint:
    return OutputConstraint("json", json.dumps(row_schema(i)))


def time_batch(llm: LLM, prompts: list[list[int]], output_len: int, constrained: bool) -> float:
    params = [
        SamplingParams(
            max_tokens=output_len, temperature=1.0, seed=i, ignore_eos=not constrained, constraint=constraint(i) if constrained else None
        )
        for i in range(len(prompts))
    ]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
    return elapsed


def first_token_s(engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams) -> float:
    start = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    while True:
        outputs = engine.step()
        if any(o.request_id == request_id and o.outputs[0].token_ids for o in outputs):
            elapsed = time.perf_counter() - start
            engine.abort_request(request_id)
            return elapsed


def time_to_first_token(llm: LLM, prompt: list[int], repeats: int) -> dict[str, float]:
    """Median TTFT in seconds: a schema never seen before, the same schema cached, and no constraint."""
    engine = llm.engine
    new, cached, free = [], [], []
    for r in range(repeats):
        fresh = constraint(10_000 + r)  # not compiled yet
        new.append(first_token_s(engine, f"new-{r}", prompt, SamplingParams(max_tokens=4, constraint=fresh)))
        cached.append(first_token_s(engine, f"cached-{r}", prompt, SamplingParams(max_tokens=4, constraint=fresh)))
        free.append(first_token_s(engine, f"free-{r}", prompt, SamplingParams(max_tokens=4)))
    return {"new_schema": statistics.median(new), "cached_schema": statistics.median(cached), "unconstrained": statistics.median(free)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/structured_bench.json"))
    args = parser.parse_args()

    llm = LLM(args.model, max_model_len=512)
    prompts = make_prompts(llm.tokenizer, args.batch)
    for i in range(args.batch):  # compile every schema once: the rounds measure the per-token cost
        llm.engine.grammars.matcher(constraint(i))
    time_batch(llm, prompts[:4], 4, constrained=False)  # warm-up

    rounds = []
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        seconds = {kind: time_batch(llm, prompts, args.output_len, kind) for kind in order}
        tokens = args.batch * args.output_len
        rounds.append(
            {
                "unconstrained_tok_s": tokens / seconds[False],
                "constrained_tok_s": tokens / seconds[True],
                "ratio": seconds[False] / seconds[True],
            }
        )
        print(f"round {r + 1}: unconstrained {rounds[-1]['unconstrained_tok_s']:.1f} tok/s, "
              f"constrained {rounds[-1]['constrained_tok_s']:.1f} tok/s, ratio {rounds[-1]['ratio']:.3f}")  # fmt: skip
    ttft = time_to_first_token(llm, prompts[0], repeats=3)
    result = {
        "batch": args.batch,
        "output_len": args.output_len,
        "rounds": rounds,
        "median_ratio": statistics.median(r["ratio"] for r in rounds),
        "ttft_s": ttft,
    }
    print(f"median throughput ratio (constrained / unconstrained): {result['median_ratio']:.3f}")
    print("TTFT: " + ", ".join(f"{name} {seconds * 1000:.0f} ms" for name, seconds in ttft.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
