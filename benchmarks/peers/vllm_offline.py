"""vLLM's offline engine on the same batch as ours, run with the peers' vLLM (not this project's venv):

    /opt/peers/vllm/bin/python benchmarks/peers/vllm_offline.py MODEL_DIR PROMPTS.json OUTPUT_LEN REPEATS

PROMPTS.json holds the token-id prompts (benchmarks/peers/offline_comparison.py writes it). One warm-up,
then REPEATS timed `LLM.generate` calls of the whole batch, greedy with ignore_eos; prints a line "RESULT {json}"
with their output tok/s.
"""

import json
import sys
import time

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def main() -> None:
    model, prompts_file, output_len, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    with open(prompts_file) as f:
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.load(f)]
    llm = LLM(model=model, dtype="float32", max_num_seqs=len(prompts), max_model_len=2048)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == output_len for o in outputs)
        rates.append(len(prompts) * output_len / elapsed)
    print("RESULT", json.dumps({"tok_s": rates}), flush=True)


if __name__ == "__main__":
    main()
