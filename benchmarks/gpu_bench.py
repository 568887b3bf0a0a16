"""GPU throughput on a Llama-3-8B-shaped model with random bf16 weights, against transformers' generate,
and the same model served with fp8 weights against bf16.

    python -m benchmarks.gpu_bench --out results.json

Writes the random model as a sharded safetensors folder (the real loading path), times
transformers' `generate` at each batch size, frees it, then times the engine (CUDA graphs for
decode) on the same prompts, 128 greedy tokens each with ignore_eos. Also reports the batch-1
bound set by memory bandwidth (weight bytes per step / measured device copy speed).

Then, on a GPU with FP8 matrix units, the engine again with quantization 'fp8' (quantized as it loads)
at --fp8-batch-sizes: tok/s, the ratio to bf16 at the same batch, and at batch 1 the fraction of the
FP8 bandwidth bound: bytes one decode step reads (e4m3 layers with their scales, the bf16 LM head and
norms) / --peak-tb-s, the GPU's nominal memory bandwidth (4.8 TB/s on an H200), and / the measured
copy speed. Issue 22's targets: batch 1 at least 1.6x bf16 and 70% of the bound, batch 64 at least 1.3x.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from benchmarks.engine_bench import time_engine, time_transformers
from serving.engine.llm import LLM
from serving.models.llama import LlamaForCausalLM
from serving.models.tiny import make_tiny_llama

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def write_random_model(folder: Path, config: dict) -> int:
    """Random N(0, 0.02) bf16 weights, one safetensors shard per layer; returns the weight bytes."""
    make_tiny_llama(folder)  # tokenizer files; config and weights are replaced below
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "config.json").write_text(json.dumps(config))
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16) * 0.02).cpu()

    weight_map, total = {}, 0
    shards = [
        (
            "embed",
            {
                "model.embed_tokens.weight": rand(config["vocab_size"], h),
                "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
                "lm_head.weight": rand(config["vocab_size"], h),
            },
        )
    ]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shards.append(
            (
                f"layer{layer}",
                {
                    p + "self_attn.q_proj.weight": rand(h, h),
                    p + "self_attn.k_proj.weight": rand(kv, h),
                    p + "self_attn.v_proj.weight": rand(kv, h),
                    p + "self_attn.o_proj.weight": rand(h, h),
                    p + "mlp.gate_proj.weight": rand(i, h),
                    p + "mlp.up_proj.weight": rand(i, h),
                    p + "mlp.down_proj.weight": rand(h, i),
                    p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                    p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                },
            )
        )
    for name, tensors in tqdm(shards, desc="Writing random weights"):
        filename = f"model-{name}.safetensors"
        save_file(tensors, folder / filename)
        weight_map |= {key: filename for key in tensors}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def copy_bandwidth() -> float:
    """Device-to-device copy speed in bytes/s, counting bytes read and written."""
    a = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (time.perf_counter() - start)


def bytes_per_step(model: LlamaForCausalLM) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer but the embedding (a row per
    token) and the rotary tables (a row per position). The model's LM head is its own (not tied)."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return sum(t.numel() * t.element_size() for name, t in tensors.items() if not name.startswith(("embed_tokens.", "rotary.")))


def time_fp8(
    folder: Path, prompts: list[list[int]], batch_sizes: list[int], output_len: int, bf16: dict[int, float], peak: float, copy: float
) -> dict:
    """The engine with fp8 weights at each batch size, against bf16's tok/s at the same batch (`bf16`)."""
    if torch.cuda.get_device_capability() < (8, 9):
        return {"skipped": f"compute capability {torch.cuda.get_device_capability()} has no FP8 matrix units"}
    started = time.perf_counter()
    llm = LLM(
        str(folder),
        dtype="bfloat16",
        device="cuda",
        quantization="fp8",
        max_model_len=512,
        max_num_seqs=max(batch_sizes),
        kv_cache_memory_gb=8,
    )
    step_bytes = bytes_per_step(llm.engine.runner.model)
    result = {
        "engine_start_s": round(time.perf_counter() - started, 1),
        "gb_per_step": round(step_bytes / 1e9, 2),
        "peak_tb_s": peak / 1e12,
        "batch1_bound_tok_s": round(peak / step_bytes, 1),
        "batch1_copy_bound_tok_s": round(copy / step_bytes, 1),
        "rows": [],
    }
    time_engine(llm, prompts[:2], 4)
    for batch in tqdm(batch_sizes, desc="engine fp8"):
        ours = batch * output_len / time_engine(llm, prompts[:batch], output_len)
        row = {"batch": batch, "fp8_tok_s": round(ours, 1)}
        if batch in bf16:
            row |= {"bf16_tok_s": round(bf16[batch], 1), "ratio_to_bf16": round(ours / bf16[batch], 2)}
        if batch == 1:
            row |= {"fraction_of_bound": round(ours / result["batch1_bound_tok_s"], 2)}
            row |= {"fraction_of_copy_bound": round(ours / result["batch1_copy_bound_tok_s"], 2)}
        result["rows"].append(row)
        print(json.dumps({"fp8": row}), flush=True)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/llama3-8b-random"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--layers", type=int, default=32, help="fewer layers for a quick try")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--fp8-batch-sizes", type=int, nargs="*", default=[1, 64], help="none: skip the fp8 run")
    parser.add_argument("--peak-tb-s", type=float, default=4.8, help="the GPU's nominal memory bandwidth (H200: 4.8)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    args = parser.parse_args()
    config = LLAMA3_8B | {"num_hidden_layers": args.layers}
    shutil.rmtree(args.folder, ignore_errors=True)
    weight_bytes = write_random_model(args.folder, config)
    bandwidth = copy_bandwidth()
    result = {
        "device": torch.cuda.get_device_name(),
        "weight_gb": round(weight_bytes / 1e9, 2),
        "copy_tb_s": round(bandwidth / 1e12, 2),
        "batch1_bound_tok_s": round(bandwidth / weight_bytes, 1),
        "rows": [],
    }
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 380, (14,), generator=gen).tolist() for _ in range(max(args.batch_sizes + args.fp8_batch_sizes))]
    baseline = {}
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.bfloat16, device_map="cuda").eval()
        time_transformers(hf, prompts[:2], 4, pad_id=0)
        for batch in tqdm(args.batch_sizes, desc="transformers"):
            baseline[batch] = batch * args.output_len / time_transformers(hf, prompts[:batch], args.output_len, pad_id=0)
        del hf
        gc.collect()
        torch.cuda.empty_cache()
    started = time.perf_counter()
    llm = LLM(
        str(args.folder), dtype="bfloat16", device="cuda", max_model_len=512, max_num_seqs=max(args.batch_sizes), kv_cache_memory_gb=8
    )
    result["engine_start_s"] = round(time.perf_counter() - started, 1)
    time_engine(llm, prompts[:2], 4)
    bf16 = {}
    for batch in tqdm(args.batch_sizes, desc="engine"):
        ours = bf16[batch] = batch * args.output_len / time_engine(llm, prompts[:batch], args.output_len)
        row = {"batch": batch, "engine_tok_s": round(ours, 1)}
        if batch in baseline:
            row |= {"transformers_tok_s": round(baseline[batch], 1), "ratio": round(ours / baseline[batch], 2)}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    result["batch1_fraction_of_bound"] = round(result["rows"][0]["engine_tok_s"] / result["batch1_bound_tok_s"], 2)
    if args.fp8_batch_sizes:
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        result["fp8"] = time_fp8(args.folder, prompts, args.fp8_batch_sizes, args.output_len, bf16, args.peak_tb_s * 1e12, bandwidth)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
