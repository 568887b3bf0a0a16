"""A llama GGUF file's tensors under their Hugging Face names, for serving the file in its own precision.

Q8_0, Q4_0 and Q4_1 tensors come out as quantized rows in the CPU kernels' layouts without any
loss (serving/models/quant.py); F32/F16/BF16 tensors as float; any other type is dequantized to
float32 with a log line saying so (and so are the tensors fused into one matrix with it, q/k/v or
gate/up, since a matrix has one format). The tokenizer and config come from the folder the file was
converted into (serving/models/gguf_convert.py), which holds the same model in float32.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from serving.errors import ModelSourceError
from serving.models.gguf_convert import hf_tensor_name, undo_rope_permute
from serving.models.quant import GROUP, QuantRows

log = logging.getLogger(__name__)

_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
NATIVE_TYPES = {GGMLQuantizationType.Q8_0: "q8", GGMLQuantizationType.Q4_0: "q4", GGMLQuantizationType.Q4_1: "q4"}


class GgufWeights:
    """The reader interface of SafetensorsFile (keys, shape, read_into, open) plus `quantized`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        reader = GGUFReader(self.path)
        arch = reader.fields["general.architecture"].contents()
        if arch != "llama":
            raise ModelSourceError(f"{self.path} holds a {arch!r} model; only llama-architecture GGUFs can be served")
        heads = reader.fields["llama.attention.head_count"].contents()
        kv_field = reader.fields.get("llama.attention.head_count_kv")
        self._rope_heads = {"attn_q": heads, "attn_k": heads if kv_field is None else kv_field.contents()}
        self.tensors = {hf_tensor_name(t.name, self.path): t for t in reader.tensors}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(reversed(self.tensors[name].shape.tolist()))  # GGUF lists dimensions innermost first

    def open(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the reader maps the file; there is no handle to pass around

    def native_kind(self, name: str) -> str | None:
        """The quantized kind this tensor loads as without loss, or None (it loads as float)."""
        return NATIVE_TYPES.get(self.tensors[name].tensor_type)

    def quantized(self, name: str, f: None) -> QuantRows:
        """The whole tensor as quantized rows (its type must be one of NATIVE_TYPES)."""
        tensor = self.tensors[name]
        rows, cols = self.shape(name)
        qtype = tensor.tensor_type
        if qtype == GGMLQuantizationType.Q8_0:  # blocks: float16 d, 32 int8
            blocks = np.asarray(tensor.data).reshape(rows, cols // GROUP, 34)
            scales = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
            data = torch.from_numpy(blocks[..., 2:].copy().view(np.int8).reshape(rows, cols))
            quantized = QuantRows("q8", data, scales, None, GROUP)
        else:  # Q4_1 blocks: float16 d, float16 m, 16 bytes; Q4_0: float16 d, 16 bytes, w = d (q - 8)
            size = 20 if qtype == GGMLQuantizationType.Q4_1 else 18
            blocks = np.asarray(tensor.data).reshape(rows, cols // GROUP, size)
            d = blocks[..., :2].copy().view(np.float16)[..., 0]
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0] if size == 20 else (d.astype(np.float32) * -8).astype(np.float16)
            data = torch.from_numpy(blocks[..., size - 16 :].reshape(rows, cols // 2).copy())
            quantized = QuantRows("q4", data, torch.from_numpy(d.copy()), torch.from_numpy(m.copy()), GROUP)
        heads = self._heads_to_unpermute(tensor.name)
        if heads is not None:
            quantized = quantized.select_rows(torch.from_numpy(undo_rope_permute(np.arange(rows), heads)))
        return quantized

    def read_into(self, name: str, target: torch.Tensor, f: None, part: tuple[int, int, int] | None = None) -> None:
        """Fill `target` with the tensor (or its slice `part` = (dim, start, length)) as float."""
        tensor = self.tensors[name]
        qtype = tensor.tensor_type.name
        if tensor.tensor_type in NATIVE_TYPES:
            log.warning(
                "%s: %s is %s, dequantized to float32 with the tensors of other types it is fused with", self.path.name, tensor.name, qtype
            )
        elif tensor.tensor_type not in _FLOAT_TYPES:
            log.warning("%s: %s is %s, which has no kernel here; dequantized to float32", self.path.name, tensor.name, qtype)
        try:
            weights = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise ModelSourceError(
                f"{self.path.name}: tensor {tensor.name} is {tensor.tensor_type.name}, which has no kernel here and cannot be "
                f"dequantized either; supported: {', '.join(t.name for t in (*NATIVE_TYPES, *_FLOAT_TYPES))} and the types gguf dequantizes"
            ) from None
        weights = weights.reshape(self.shape(name))
        heads = self._heads_to_unpermute(tensor.name)
        if heads is not None:
            weights = undo_rope_permute(weights, heads)
        values = torch.from_numpy(np.array(weights, dtype=np.float32))
        target.copy_(values if part is None else values.narrow(*part))

    def _heads_to_unpermute(self, gguf_name: str) -> int | None:
        """llama.cpp stores q and k rows in its own rotary order; the head count to undo it with."""
        kind = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else ""
        return self._rope_heads.get(kind)
