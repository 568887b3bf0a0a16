"""Read tensors from a .safetensors file straight into memory the caller owns.

Plain reads (no mmap) keep the file's pages out of the process's resident memory, so loading a
model costs little more than the model itself. Format: an 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets}}, then the raw tensor bytes.

A pre-quantized int8 checkpoint (compressed-tensors' per-channel W8A16: an I8 `X.weight` and a
float `X.weight_scale` [rows, 1], w = q * scale) is read as quantized rows by `quantized`; an FP8 one
(an F8_E4M3 `X.weight` and its `X.weight_scale`) by serving/models/fp8.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from serving.errors import ModelSourceError
from serving.models.quant import QuantRows

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
}


class SafetensorsFile:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            try:
                header = json.loads(f.read(header_len))
            except ValueError as error:
                raise ModelSourceError(f"{self.path} is not a valid safetensors file: {error}") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries = header

    def open(self) -> BinaryIO:
        """The file handle `read_into` reads from."""
        return open(self.path, "rb")

    def keys(self) -> list[str]:
        """Every tensor but the scales of int8 and FP8 weights (they are read with their weight)."""
        scales = {f"{name}_scale" for name in self.entries if self.native_kind(name)}
        return [name for name in self.entries if name not in scales]

    def native_kind(self, name: str) -> str | None:
        """ "q8" or "fp8" for an int8 or e4m3 weight of a pre-quantized checkpoint, None for float tensors."""
        return {"I8": "q8", "F8_E4M3": "fp8"}.get(self.entries[name]["dtype"])

    def quantized(self, name: str, f) -> QuantRows:
        """An int8 weight and its per-row scale as quantized rows."""
        data, scales = self.weight_and_scales(name, f, torch.int8, per_tensor=False)
        return QuantRows("q8", data, scales[:, None], None, data.shape[1])

    def weight_and_scales(self, name: str, f, dtype: torch.dtype, per_tensor: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A pre-quantized weight [rows, cols] of `dtype` and its float scale `{name}_scale` per output row
        ([rows] or [rows, 1]; with `per_tensor` also one for the whole tensor, [] or [1]), as [rows] scales."""
        scale_name, label = f"{name}_scale", {torch.int8: "int8"}.get(dtype, "FP8")
        rows, cols = self.shape(name)
        if scale_name not in self.entries:
            raise ModelSourceError(
                f"{self.path.name}: tensor {name} is {str(dtype).removeprefix('torch.')} but its scale {scale_name} is missing; a "
                f"pre-quantized {label} checkpoint needs a float scale per output row{' (or per tensor)' * per_tensor} next to each weight"
            )
        scale_shape = self.shape(scale_name)
        if scale_shape not in ((rows,), (rows, 1), *([(), (1,)] if per_tensor else [])):
            raise ModelSourceError(f"{self.path.name}: {scale_name} has shape {scale_shape}, not one scale per row ({rows}, 1)")
        data, scales = torch.empty(rows, cols, dtype=dtype), torch.empty(scale_shape)
        self.read_into(name, data, f)
        self.read_into(scale_name, scales, f)
        return data, scales.reshape(-1).expand(rows).contiguous()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read_into(self, name: str, target: torch.Tensor, f, part: tuple[int, int, int] | None = None) -> None:
        """Fill `target` (any dtype/device) with tensor `name`, or with its slice `part` = (dim, start, length).

        Row slices (dim 0) read only their bytes; other slices read the whole tensor first.
        """
        entry = self.entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ModelSourceError(f"{self.path.name}: tensor {name} has unsupported dtype {entry['dtype']}")
        fp8 = dtype == torch.float8_e4m3fn
        if (fp8 and target.dtype != dtype) or (target.is_floating_point() and not dtype.is_floating_point):  # values need their scale
            served_as = "fp8" if fp8 else "int8"
            raise ModelSourceError(
                f"{self.path.name}: tensor {name} is stored as {entry['dtype']}, a quantized checkpoint: serve it with quantization {served_as!r}"
            )
        shape = list(self.shape(name))
        start, end = entry["data_offsets"]
        if part is not None and part[0] == 0:
            row_bytes = (end - start) // max(shape[0], 1)
            start, end = start + part[1] * row_bytes, start + (part[1] + part[2]) * row_bytes
            shape[0] = part[2]
            part = None
        f.seek(self.data_start + start)
        direct = part is None and target.device.type == "cpu" and target.dtype == dtype and target.is_contiguous()
        buffer = target.view(torch.uint8).view(-1) if direct else torch.empty(end - start, dtype=torch.uint8)
        if f.readinto(memoryview(buffer.numpy())) != end - start:
            raise ModelSourceError(f"{self.path.name}: tensor {name} is truncated")
        if not direct:
            tensor = buffer.view(dtype).view(shape)
            target.copy_(tensor if part is None else tensor.narrow(*part))
