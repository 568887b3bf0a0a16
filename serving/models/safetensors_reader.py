"""Read tensors from a .safetensors file straight into memory the caller owns.

Plain reads (no mmap) keep the file's pages out of the process's resident memory, so loading a
model costs little more than the model itself. Format: an 8-byte little-endian header length,
a JSON header {name: {dtype, shape, data_offsets}}, then the raw tensor bytes.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from serving.errors import ModelSourceError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
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

    def keys(self) -> list[str]:
        return list(self.entries)

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
