"""Build the model on the meta device and fill it straight from the safetensors (or GGUF) files.

Each tensor is read from disk directly into its (slice of a) parameter: no full-model copy,
no mapped file pages, so peak memory stays close to the model size. Which slice a tensor-parallel
rank reads is each layer's own declaration (llama.WeightSlices); the loader only maps checkpoint
names to parameters. With a quantization the
linear layers and the embedding are quantized tensor by tensor as they are read (int8/int4), or
taken as they are from the GGUF file (gguf), see serving/models/quant.py; with fp8 the decoder's
linear layers are quantized as read, or taken as stored from an FP8 checkpoint (serving/models/fp8.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from serving.errors import ModelSourceError
from serving.models.arch import ModelArch
from serving.models.fp8 import Fp8Linear, Fp8Rows, quantize_fp8, read_checkpoint_rows
from serving.models.llama import GateUpProjection, LlamaForCausalLM, RotaryEmbedding, Slice, WeightSlices
from serving.models.quant import (
    EMBEDDING_KIND,
    GROUP,
    KINDS,
    QuantEmbedding,
    QuantizationError,
    QuantizedWeight,
    QuantLinear,
    QuantRows,
    quantize,
)
from serving.models.safetensors_reader import SafetensorsFile
from serving.models.sharding import SINGLE, SINGLE_STAGE, PipelineStage, TensorParallel
from serving.models.source import gguf_file

_FUSED = {  # checkpoint projection -> (fused parameter, index of its slice)
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# the static activation scales of FP8 checkpoints: fp8 layers scale each token's activations themselves
_IGNORED = re.compile(r"rotary_emb\.inv_freq$|\.input_scale$")


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
    quantization: str = "none",
) -> LlamaForCausalLM:
    """The model, or this rank's part of it (TP shard of a pipeline stage), weights read from `folder`."""
    tp.check(arch)
    stage.check(arch)
    readers = _readers(Path(folder), quantization)
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, max_positions, tp, stage).to(dtype)
        quantized = _quantize_layers(model, quantization, readers)
    model.to_empty(device=device)
    model.rotary = RotaryEmbedding(arch, max_positions).to(device)
    params = dict(model.named_parameters())
    expected = _expected_slots([*params, *(f"{name}.weight" for name in quantized)])
    loaded: set[str] = set()
    with tqdm(total=len(expected), desc="Loading weights", unit="tensor") as bar:
        for reader in readers:
            with reader.open() as f:
                for ckpt_name in reader.keys():
                    slot = _copy_tensor(model, params, quantized, arch, ckpt_name, reader, f)
                    if slot is not None:
                        loaded.add(slot)
                        bar.update(1)
    missing = sorted(expected - loaded)
    if missing:
        raise ModelSourceError(f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return model.eval()


def _readers(folder: Path, quantization: str) -> list:
    if quantization == "gguf":
        from serving.models.gguf_weights import GgufWeights  # gguf is imported only when a GGUF is served

        return [GgufWeights(gguf_file(folder))]
    return [SafetensorsFile(path) for path in safetensors_files(folder)]


def _quantize_layers(model: LlamaForCausalLM, quantization: str, readers: list) -> dict[str, QuantizedWeight | Fp8Linear]:
    """Swap the (meta) layers that will hold quantized weights for quantized ones; returns them by name.

    int8/int4: every linear layer in that format, the LM head and the embedding in int8 (EMBEDDING_KIND).
    gguf: every layer whose checkpoint tensors are all of one type with a kernel (Q8_0, Q4_0/Q4_1).
    fp8: every linear layer but the LM head; the embedding and LM head keep the model dtype.
    """
    if quantization == "fp8":
        kinds = {name: "fp8" for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"}
    elif quantization in KINDS:
        kinds = {
            name: EMBEDDING_KIND if isinstance(module, nn.Embedding) or name == "lm_head" else KINDS[quantization]
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Embedding))
        }
    elif quantization == "gguf":
        kinds = _gguf_kinds(model, readers[0])
    else:
        return {}
    quantized: dict[str, QuantizedWeight | Fp8Linear] = {}
    for name, kind in kinds.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = getattr(parent, attr)
        try:
            # int4's 4-bit layers take int8 inputs; its int8 embedding/head and every gguf layer float ones
            int8_inputs = quantization == "int4" and kind == "q4"
            replacement = _quantized_layer(layer, kind, per_channel=quantization in KINDS, int8_inputs=int8_inputs)
        except QuantizationError as error:
            raise QuantizationError(f"quantization {quantization!r} cannot hold {name}: {error}") from None
        replacement.weight_slices = layer.weight_slices
        setattr(parent, attr, replacement)
        quantized[name] = replacement
    return quantized


def _quantized_layer(layer: nn.Module, kind: str, per_channel: bool, int8_inputs: bool) -> QuantizedWeight | Fp8Linear:
    """The empty layer of storage `kind` that takes `layer`'s place; `per_channel` q8 has one scale per row
    (int8 quantized at load), otherwise one per GROUP inputs (GGUF's Q8_0); `int8_inputs`: see QuantLinear."""
    if isinstance(layer, nn.Embedding):
        rows, cols = layer.num_embeddings, layer.embedding_dim
    else:
        rows, cols = layer.out_features, layer.in_features
    gated = isinstance(layer, GateUpProjection)
    if kind == "fp8":
        return Fp8Linear(rows, cols, layer.bias is not None, gated, layer.weight.dtype)
    group = cols if kind == "q8" and per_channel else GROUP
    if isinstance(layer, nn.Embedding):
        return QuantEmbedding(kind, rows, cols, group)
    return QuantLinear(kind, rows, cols, group, bias=layer.bias is not None, gated=gated, int8_inputs=int8_inputs)


def _gguf_kinds(model: LlamaForCausalLM, reader) -> dict[str, str]:
    kinds: dict[str, set[str | None]] = {}
    for ckpt_name in reader.keys():
        target = _target(model, ckpt_name)
        if target is not None and target[0].endswith(".weight"):
            kinds.setdefault(target[0].removesuffix(".weight"), set()).add(reader.native_kind(ckpt_name))
    return {name: next(iter(found)) for name, found in kinds.items() if len(found) == 1 and None not in found}


def _expected_slots(names: list[str]) -> set[str]:
    slots: set[str] = set()
    for name in names:
        shards = 3 if "qkv_proj" in name else 2 if "gate_up_proj" in name else 0
        slots |= {_slot_key(name, i) for i in range(shards)} if shards else {name}
    return slots


def _slot_key(param_name: str, shard: int | None) -> str:
    return param_name if shard is None else f"{param_name}#{shard}"


def _target(model: LlamaForCausalLM, ckpt_name: str) -> tuple[str, int | None] | None:
    """(parameter name, index among the tensors fused into it) a checkpoint tensor fills on this rank,
    or None when it is not this rank's (another stage's, or a tied head's copy)."""
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
    shard = None
    if len(parts) >= 2 and parts[-2] in _FUSED:
        parts[-2], shard = _FUSED[parts[-2]]
    return ".".join(parts), shard


def _slices(model: LlamaForCausalLM, param_name: str, shard: int | None, ndim: int) -> tuple[tuple[int, int] | None, Slice | None]:
    """(rows in the parameter, slice of the checkpoint tensor) for this rank, as the layer declares them
    (llama.WeightSlices); layers that declare none, such as the norms, take every tensor whole."""
    slices: WeightSlices | None = getattr(model.get_submodule(param_name.rpartition(".")[0]), "weight_slices", None)
    if slices is None:
        return None, None
    rows = None if shard is None else slices.rows[shard]
    source = slices.source[shard or 0]
    return rows, source if source is None or source[0] < ndim else None


def _copy_tensor(
    model: LlamaForCausalLM, params: dict, quantized: dict[str, QuantizedWeight | Fp8Linear], arch: ModelArch, ckpt_name: str, reader, f
) -> str | None:
    """Copy this rank's slice of one checkpoint tensor into its (slice of a) parameter; returns the slot it filled."""
    target = _target(model, ckpt_name)
    if target is None:
        return None
    param_name, shard = target
    rows, source = _slices(model, param_name, shard, len(reader.shape(ckpt_name)))
    layer = quantized.get(param_name.removesuffix(".weight")) if param_name.endswith(".weight") else None
    if layer is not None:
        _copy_quantized(layer, rows, source, ckpt_name, reader, f)
        return _slot_key(param_name, shard)
    param = params.get(param_name)
    if param is None:
        raise ModelSourceError(f"checkpoint tensor {ckpt_name!r} has no place in {arch.architecture}")
    target = param.data if rows is None else param.data.narrow(0, *rows)
    expected = list(reader.shape(ckpt_name))
    if source is not None:
        expected[source[0]] = source[2]
    if tuple(target.shape) != tuple(expected):
        raise ModelSourceError(f"{ckpt_name}: shape {reader.shape(ckpt_name)} does not fit the config's {tuple(target.shape)}")
    reader.read_into(ckpt_name, target, f, source)
    return _slot_key(param_name, shard)


def _copy_quantized(
    layer: QuantizedWeight | Fp8Linear, rows: tuple[int, int] | None, source: Slice | None, ckpt_name: str, reader, f
) -> None:
    """Fill this rank's rows of a quantized layer from one checkpoint tensor: quantized as read from
    float weights (whole rows first, then cut, so that input slices keep their row's scale), or as
    stored when the file holds it quantized."""
    start, count = (0, layer.rows) if rows is None else rows
    shape = reader.shape(ckpt_name)
    expected = list(shape)
    if source is not None:
        expected[source[0]] = source[2]
    if tuple(expected) != (count, layer.cols):
        raise ModelSourceError(f"{ckpt_name}: shape {shape} does not fit the config's {(count, layer.cols)}")
    native = reader.native_kind(ckpt_name)
    if native is not None:
        if native != layer.kind:
            raise QuantizationError(f"{ckpt_name} is stored as {native} and cannot be served as {layer.kind}")
        part: QuantRows | Fp8Rows = read_checkpoint_rows(reader, ckpt_name, f) if native == "fp8" else reader.quantized(ckpt_name, f)
        if source is not None:
            part = part.narrow(*source)
    else:
        row_slice = source if source is not None and source[0] == 0 else None
        # fp8: read in the model dtype and quantized on the layer's device (the GPU); int8/int4: float32 on the CPU
        fp8 = isinstance(layer, Fp8Linear)
        weights = torch.empty(count if row_slice else shape[0], shape[1], dtype=layer.dtype if fp8 else torch.float32)
        reader.read_into(ckpt_name, weights, f, row_slice)
        part = quantize_fp8(weights.to(layer.weight.device)) if fp8 else quantize(weights, layer.kind)
        if source is not None and source[0] == 1:
            part = part.narrow(*source)
    layer.load_rows(start, part)
