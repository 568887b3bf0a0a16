"""llama.cpp on the same batch as ours, run with the peers' llama-cpp-python (not this project's venv):

    /opt/peers/llamacpp/bin/python benchmarks/peers/llamacpp_offline.py MODEL.gguf PROMPTS.json OUTPUT_LEN REPEATS \
        [--batch N] [--threads T]

PROMPTS.json holds token-id prompts (benchmarks/quant_bench.py writes it); the first N of them (all by default)
decode together through llama.cpp's batched C API, called through llama_cpp's low-level bindings: one llama_batch
with one sequence id per prompt, so that every step is one llama_decode of N sequences (the prefill one of all
their prompt tokens). Greedy (the argmax of each sequence's logits), OUTPUT_LEN tokens per prompt, EOS ignored.
One warm-up, then REPEATS timed runs of the whole batch, each from an empty KV cache with its prefill; prints a
line "RESULT {json}" with their output tok/s and the first prompt's tokens of the last run.
Everything else is llama.cpp's default: F16 KV cache, flash attention chosen by llama.cpp, one KV stream per
sequence.
"""

import argparse
import json
import time

import llama_cpp
import numpy as np


class BatchedGreedy:
    """A llama.cpp context for `n_seq` sequences of up to `n_ctx_seq` tokens each, decoded together."""

    def __init__(self, model_path: str, n_seq: int, n_ctx_seq: int, max_batch_tokens: int, threads: int) -> None:
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(model_path.encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {model_path}")
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = n_seq
        params.n_ctx = n_seq * n_ctx_seq  # split evenly between the sequences, each rounded up to 256 by llama.cpp
        # One llama_decode, and one compute graph, for the whole prefill.
        params.n_batch = params.n_ubatch = max_batch_tokens
        params.n_threads = params.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise SystemExit("llama.cpp could not create the context")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.batch = llama_cpp.llama_batch_init(max_batch_tokens, 0, n_seq)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence id, wants logits) entries."""
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq
            batch.logits[i] = logits
        batch.n_tokens = len(entries)
        if (status := llama_cpp.llama_decode(self.ctx, batch)) != 0:
            raise SystemExit(f"llama_decode returned {status}")

    def _argmax(self, rows: int) -> list[int]:
        """The greedy token of each of the last decode's `rows` logit rows (one per sequence, in sequence order)."""
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(rows, self.n_vocab))
        return logits.argmax(axis=1).tolist()

    def generate(self, prompts: list[list[int]], output_len: int) -> list[list[int]]:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self._decode([(token, pos, seq, pos == len(ids) - 1) for seq, ids in enumerate(prompts) for pos, token in enumerate(ids)])
        outputs: list[list[int]] = [[] for _ in prompts]
        for step in range(output_len):
            for seq, token in enumerate(self._argmax(len(prompts))):
                outputs[seq].append(token)
            if step < output_len - 1:
                self._decode([(out[-1], len(ids) + step, seq, True) for seq, (ids, out) in enumerate(zip(prompts, outputs))])
        return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="GGUF file")
    parser.add_argument("prompts", help="JSON list of token-id prompts")
    parser.add_argument("output_len", type=int)
    parser.add_argument("repeats", type=int)
    parser.add_argument("--batch", type=int, help="decode the first BATCH prompts together (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with open(args.prompts) as f:
        prompts: list[list[int]] = json.load(f)[: args.batch]
    longest = max(len(ids) for ids in prompts)
    generator = BatchedGreedy(args.model, len(prompts), longest + args.output_len, sum(map(len, prompts)), args.threads)
    generator.generate(prompts, min(8, args.output_len))
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outputs = generator.generate(prompts, args.output_len)
        elapsed = time.perf_counter() - start
        assert all(len(out) == args.output_len for out in outputs)
        rates.append(len(prompts) * args.output_len / elapsed)
    print("RESULT", json.dumps({"tok_s": rates, "first_prompt_tokens": outputs[0]}), flush=True)


if __name__ == "__main__":
    main()
