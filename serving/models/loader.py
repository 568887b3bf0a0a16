"""Build the model on the meta device and fill it straight from the safetensors files.

Each tensor is read from disk directly into its (slice of a) parameter: no full-model copy,
no mapped file pages, so peak memory stays close to the model size.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

from serving.errors import ModelSourceError
from serving.models.arch import ModelArch
from serving.models.llama import LlamaForCausalLM, RotaryEmbedding
from serving.models.safetensors_reader import SafetensorsFile
from serving.parallel.pipeline import SINGLE_STAGE, PipelineStage
from serving.parallel.tensor import SINGLE, TensorParallel

_FUSED = {  # checkpoint projection -> (fused parameter, index of its slice)
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        files = sorted({folder / name for name in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        raise ModelSourceError(f"{folder}: safetensors weights missing ({', '.join(missing) or 'no *.safetensors'})")
    return files


def load_model(
    folder: Path,
    arch: ModelArch,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    tp: TensorParallel = SINGLE,
    stage: PipelineStage = SINGLE_STAGE,
) -> LlamaForCausalLM:
    """The model, or this rank's part of it (TP shard of a pipeline stage), weights read from `folder`."""
    tp.check(arch)
    stage.check(arch)
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, max_positions, tp, stage).to(dtype)
    model.to_empty(device=device)
    model.rotary = RotaryEmbedding(arch, max_positions).to(device)
    params = dict(model.named_parameters())
    expected = _expected_slots(params)
    loaded: set[str] = set()
    files = safetensors_files(Path(folder))
    with tqdm(total=len(expected), desc="Loading weights", unit="tensor") as bar:
        for path in files:
            reader = SafetensorsFile(path)
            with open(path, "rb") as f:
                for ckpt_name in reader.keys():
                    slot = _copy_tensor(model, params, arch, tp, ckpt_name, reader, f)
                    if slot is not None:
                        loaded.add(slot)
                        bar.update(1)
    missing = sorted(expected - loaded)
    if missing:
        raise ModelSourceError(f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return model.eval()


def _expected_slots(params: dict) -> set[str]:
    slots: set[str] = set()
    for name in params:
        shards = 3 if "qkv_proj" in name else 2 if "gate_up_proj" in name else 0
        slots |= {_slot_key(name, i) for i in range(shards)} if shards else {name}
    return slots


def _slot_key(param_name: str, shard: int | None) -> str:
    return param_name if shard is None else f"{param_name}#{shard}"


def _copy_tensor(
    model: LlamaForCausalLM, params: dict, arch: ModelArch, tp: TensorParallel, ckpt_name: str, reader: SafetensorsFile, f
) -> str | None:
    """Copy this rank's slice of one checkpoint tensor into its (slice of a) parameter; returns the slot it filled."""
    if _IGNORED.search(ckpt_name):
        return None
    name = ckpt_name.removeprefix("model.")
    if name == "lm_head.weight" and model.lm_head is None:
        return None  # tied embeddings (some checkpoints store the copy anyway), or not the last stage
    parts = name.split(".")
    if parts[0] == "layers":  # stage-local layer index; other stages' layers are not ours
        local = int(parts[1]) - model.first_layer
        if not 0 <= local < len(model.layers):
            return None
        parts[1] = str(local)
    elif (parts[0] == "embed_tokens" and model.embed_tokens is None) or (parts[0] == "norm" and model.norm is None):
        return None
    projection = parts[-2] if len(parts) >= 2 else ""
    shard = None
    if projection in _FUSED:
        parts[-2], shard = _FUSED[projection]
    param_name = ".".join(parts)
    param = params.get(param_name)
    if param is None:
        raise ModelSourceError(f"checkpoint tensor {ckpt_name!r} has no place in {arch.architecture}")
    target = param.data if shard is None else param.data.narrow(0, *_fused_rows(arch, tp, param_name, shard))
    source = _source_slice(arch, tp, name, projection)
    expected = list(reader.shape(ckpt_name))
    if source is not None:
        expected[source[0]] = source[2]
    if tuple(target.shape) != tuple(expected):
        raise ModelSourceError(f"{ckpt_name}: shape {reader.shape(ckpt_name)} does not fit the config's {tuple(target.shape)}")
    reader.read_into(ckpt_name, target, f, source)
    return _slot_key(param_name, shard)


def _fused_rows(arch: ModelArch, tp: TensorParallel, param_name: str, shard: int) -> tuple[int, int]:
    """(row offset, row count) of one projection inside this rank's fused parameter."""
    if "qkv_proj" in param_name:
        q, kv = tp.local_heads(arch) * arch.head_dim, tp.local_kv_heads(arch) * arch.head_dim
        return [(0, q), (q, kv), (q + kv, kv)][shard]
    size = arch.intermediate_size // tp.size
    return (shard * size, size)


def _source_slice(arch: ModelArch, tp: TensorParallel, name: str, projection: str) -> tuple[int, int, int] | None:
    """(dim, start, length) of this rank's part of a checkpoint tensor, or None for all of it."""
    if tp.size == 1:
        return None
    d, r = arch.head_dim, tp.rank
    if projection == "q_proj":
        heads = tp.local_heads(arch)
        return (0, r * heads * d, heads * d)
    if projection in ("k_proj", "v_proj"):
        heads = tp.local_kv_heads(arch)
        return (0, tp.first_kv_head(arch) * d, heads * d)
    if projection in ("gate_proj", "up_proj"):
        size = arch.intermediate_size // tp.size
        return (0, r * size, size)
    if projection == "o_proj" and name.endswith("weight"):
        heads = tp.local_heads(arch)
        return (1, r * heads * d, heads * d)
    if projection == "down_proj":
        size = arch.intermediate_size // tp.size
        return (1, r * size, size)
    if name in ("embed_tokens.weight", "lm_head.weight"):
        start, end = tp.vocab_range(arch)
        return (0, start, end - start)
    return None  # norms: every rank holds all of them
