"""Where a step's time goes, and what each token costs on its way from the engine to HTTP bytes.

    python -m benchmarks.serving_costs                   # default model, CPU, batch 32 x 128 tokens
    python -m benchmarks.serving_costs --batch 32 --output-len 128 --logprobs 0

1. The engine: one offline batch (greedy, ignore_eos) stepped to the end, with a timer around each part
   of `LLMEngine.step`: scheduling, the model (submit + collect), sampling, appending tokens (of which
   incremental detokenization and the stop checks), and building the step's `RequestOutput`s.
2. The serving path, replayed on the outputs that run made, in this process: what the LLM replica does per
   step (each request's delta, one msgpack message for all: serving/server/channel.py) and what the API
   replica does (unpack, each request's mailbox, the OpenAI chunk and its SSE line: openai_api.py).

Prints microseconds per generated token for each part and writes JSON (--out). Timers cost ~0.2 us each.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from benchmarks.engine_bench import make_prompts
from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.llm import LLM
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import RequestOutput
from serving.server.channel import Mailbox
from serving.server.formats import CompletionFormat
from serving.server.messages import DeltaTracker, from_wire, to_wire


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, name: str, label: str) -> Callable[..., Any]:
        """Time every call of `owner.name` (an instance's or a class's attribute) under `label`; returns the original."""
        inner = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - start

        setattr(owner, name, timed)
        return inner


def engine_breakdown(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[dict[str, float], list[list[RequestOutput]], int]:
    """Seconds per part over one batch run; the outputs of each step; the tokens generated."""
    engine, timers = llm.engine, Timers()
    timers.wrap(engine.scheduler, "schedule", "schedule")
    timers.wrap(engine.runner, "submit", "model")
    timers.wrap(engine.runner, "collect", "model")
    timers.wrap(engine, "_sample", "sample")
    timers.wrap(engine, "_append_token", "append (detokenize, stop checks)")
    timers.wrap(engine, "_output", "request outputs")
    add = timers.wrap(IncrementalDetokenizer, "add", "  of which detokenize")
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        steps = []
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            steps.append(engine.step())
        total = time.perf_counter() - start
    finally:
        IncrementalDetokenizer.add = add
    order = ["step (all)", "schedule", "model", "sample", "append (detokenize, stop checks)", "  of which detokenize", "request outputs"]
    seconds = {label: timers.seconds[label] for label in order[1:]} | {"step (all)": total}
    seconds = {label: seconds[label] for label in order}
    tokens = sum(len(c.token_ids_delta) for step in steps for o in step for c in o.outputs)
    return seconds, steps, tokens


def timed(label: str, seconds: dict[str, float], call: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = call()
    seconds[label] += time.perf_counter() - start
    return result


def serving_breakdown(steps: list[list[RequestOutput]], fmt: CompletionFormat) -> dict[str, float]:
    """Seconds per part of the replica-to-HTTP path, replayed over the engine run's outputs."""
    seconds: dict[str, float] = defaultdict(float)
    trackers = defaultdict(DeltaTracker)
    mailboxes = defaultdict(Mailbox)
    unpacker = msgpack.Unpacker(strict_map_key=False)
    for outputs in steps:
        # LLM replica: each request's delta as a wire entry, then one message for the step
        entries = timed(
            "replica: deltas", seconds, lambda: [to_wire(o.request_id, o.finished, trackers[o.request_id].delta(o)) for o in outputs]
        )
        message = timed("replica: msgpack one message", seconds, lambda: msgpack.packb(entries))
        # API replica: unpack, hand each request its delta, then each stream's chunk as an SSE line
        unpacker.feed(message)
        [received] = timed("api: msgpack unpack", seconds, lambda: list(unpacker))

        def demux() -> None:
            for entry in received:
                request_id, finished, delta = from_wire(entry)
                mailboxes[request_id].push(finished, delta)

        timed("api: deltas to mailboxes", seconds, demux)
        prefix = (
            'data: {"id": "cmpl-0123456789abcdef0123456789abcdef", "object": "text_completion", "created": 1, "model": "m", "choices": '
        )

        def encode() -> list[str]:
            lines = []
            for mailbox in mailboxes.values():
                if (delta := mailbox.take()) is not None:
                    for c in delta.choices:
                        lines.append(f"{prefix}{json.dumps([fmt.chunk_choice(c.index, c)], ensure_ascii=False)}}}\n\n")
            return lines

        timed("api: OpenAI chunk + SSE line", seconds, encode)
    return dict(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--logprobs", type=int, help="ask for this many top logprobs per token")
    parser.add_argument("--stop", nargs="*", default=["\n\n\n\n"], help="stop strings (never met: they cost their check)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serving_costs.json"))
    args = parser.parse_args()
    llm = LLM(args.model, max_num_seqs=args.batch, num_threads=args.threads)
    prompts = make_prompts(llm.tokenizer, args.batch)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True, logprobs=args.logprobs, stop=args.stop)
    engine_breakdown(llm, prompts[:4], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up
    engine_s, steps, tokens = engine_breakdown(llm, prompts, params)
    fmt = CompletionFormat(llm.tokenizer, echo=False, echo_logprobs=None, prompt_logprobs=None)
    serving_s = serving_breakdown(steps, fmt)
    per_token = {part: s / tokens * 1e6 for part, s in (engine_s | serving_s).items()}
    step_ms = engine_s["step (all)"] / len(steps) * 1000
    print(f"{tokens} tokens in {len(steps)} steps, {step_ms:.1f} ms per step, {tokens / engine_s['step (all)']:.0f} tok/s offline")
    for part, us in per_token.items():
        print(f"  {part:40s} {us:9.2f} us/token")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"settings": vars(args) | {"out": str(args.out)}, "tokens": tokens, "steps": len(steps), "us_per_token": per_token}
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
