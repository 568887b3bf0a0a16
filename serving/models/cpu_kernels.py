"""Build and call the CPU kernels of `cpu_kernels.c` (float32 activations, which the q4_x8 format rounds to
int8 itself; float32, int8 or 4-bit weights).

The C file is compiled once per machine and source version with the system C compiler (a second or
two) into the cache directory, and loaded with ctypes. It is linked against the OpenMP runtime
that torch itself loaded, so its threads are torch's threads: a second OpenMP runtime would start a
second team on the same cores and both would stop spinning (see ARCHITECTURE.md).

`load_cpu_kernels()` returns None, with the reason logged once, where the kernels cannot run: not
x86-64 with AVX2/FMA, torch without OpenMP, no C compiler, or LLM_CLUSTER_CPU_KERNELS=0.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from serving.models.source import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]
_POINTER, _SIZE, _FLOAT, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
# argument types of each llm_* function in cpu_kernels.c, in order
_SIGNATURES = {
    "linear": [_POINTER, _SIZE, _SIZE, _POINTER, _SIZE, _POINTER, _POINTER, _POINTER, _INT],
    "gate_up": [_POINTER, _SIZE, _SIZE, _POINTER, _SIZE, _POINTER, _INT],
    "rms_norm": [_POINTER, _SIZE, _SIZE, _POINTER, _FLOAT, _POINTER, _INT],
    "decode_attention": [_POINTER, *[_SIZE] * 5, _POINTER, _POINTER, _SIZE, _POINTER, _SIZE, _POINTER, _FLOAT, _POINTER, _INT],
    "rope_store": [_POINTER, *[_SIZE] * 4, *[_POINTER] * 5, _INT],
    "quantized": [_POINTER, _SIZE, _SIZE, _INT, _POINTER, _POINTER, _POINTER, _SIZE, _SIZE, _INT, _POINTER, _POINTER, _POINTER, _INT],
    "decode_layers": [_POINTER, _SIZE, _POINTER, *[_SIZE] * 6, _FLOAT, *[_POINTER] * 3, _SIZE, _POINTER, _SIZE, _POINTER, _FLOAT, _INT],
}
# weight formats of llm_quantized (FORMAT_* in cpu_kernels.c); q4_x8: q4 weights times int8-quantized inputs
QUANTIZED_FORMATS = {"q8": 1, "q4": 2, "q4_x8": 3}
FLOAT_FORMAT = 0


class PanelWeights(ctypes.Structure):
    """`Weights` in cpu_kernels.c: one matrix's panels, float32 (FLOAT_FORMAT, no scales) or quantized."""

    _fields_ = [("format", _INT), ("data", _POINTER), ("scales", _POINTER), ("mins", _POINTER), ("group", _SIZE)]


class DecodeLayer(ctypes.Structure):
    """`Layer` in cpu_kernels.c: the addresses of one decoder layer's weights and KV cache."""

    _fields_ = [
        ("input_norm", _POINTER),
        ("post_norm", _POINTER),
        ("qkv", PanelWeights),
        ("o", PanelWeights),
        ("gate_up", PanelWeights),
        ("down", PanelWeights),
        ("qkv_bias", _POINTER),
        ("k_cache", _POINTER),
        ("v_cache", _POINTER),
    ]


class CpuKernels:
    """Typed wrappers over the compiled library; every tensor is float32, contiguous, on the CPU."""

    def __init__(self, library: ctypes.CDLL) -> None:
        for name, argtypes in _SIGNATURES.items():
            function = getattr(library, f"llm_{name}")
            function.argtypes, function.restype = argtypes, None
        self._linear, self._gate_up = library.llm_linear, library.llm_gate_up
        self._rms_norm, self._decode_attention, self._rope_store = (
            library.llm_rms_norm,
            library.llm_decode_attention,
            library.llm_rope_store,
        )
        self._quantized = library.llm_quantized
        self._decode_layers = library.llm_decode_layers

    def linear(
        self, x: torch.Tensor, panels: torch.Tensor, n: int, bias: torch.Tensor | None, residual: torch.Tensor | None
    ) -> torch.Tensor:
        """x [M, K] @ W^T (+ bias [n]) (+ residual [M, n]) with W packed by `to_panels`."""
        m, k = x.shape
        out = torch.empty(m, n)
        self._linear(x.data_ptr(), m, k, panels.data_ptr(), n, _ptr(bias), _ptr(residual), out.data_ptr(), torch.get_num_threads())
        return out

    def gate_up(self, x: torch.Tensor, panels: torch.Tensor, width: int) -> torch.Tensor:
        """silu(x Wg^T) * x Wu^T, [M, width], with the weights packed by `to_gate_up_panels`."""
        m, k = x.shape
        out = torch.empty(m, width)
        self._gate_up(x.data_ptr(), m, k, panels.data_ptr(), width, out.data_ptr(), torch.get_num_threads())
        return out

    def quantized(
        self,
        x: torch.Tensor,
        fmt: str,
        data: torch.Tensor,
        scales: torch.Tensor,
        mins: torch.Tensor | None,
        group: int,
        n: int,
        gated: bool,
        bias: torch.Tensor | None,
        residual: torch.Tensor | None,
    ) -> torch.Tensor:
        """`linear` (gated False) or `gate_up` (True) over quantized panels packed by serving/models/quant.py,
        in weight format `fmt` (QUANTIZED_FORMATS)."""
        m, k = x.shape
        out = torch.empty(m, n)
        self._quantized(
            x.data_ptr(), m, k, QUANTIZED_FORMATS[fmt], data.data_ptr(), scales.data_ptr(), _ptr(mins), group, n, int(gated),
            _ptr(bias), _ptr(residual), out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x [M, K] / sqrt(mean(x^2) + eps) * weight [K]."""
        m, k = x.shape
        out = torch.empty(m, k)
        self._rms_norm(x.data_ptr(), m, k, weight.data_ptr(), eps, out.data_ptr(), torch.get_num_threads())
        return out

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """One query token per sequence, q [B, H, D] (heads contiguous, rows may be strided), over the first
        context_lens[b] keys of its blocks (cache [blocks, block_size, KVH, D], block_tables [B, max_blocks]
        and context_lens [B] int64)."""
        b, heads, head_dim = q.shape
        assert q.stride(1) == head_dim and q.stride(2) == 1
        _, block_size, kv_heads, _ = k_cache.shape
        out = torch.empty_like(q)
        self._decode_attention(
            q.data_ptr(), q.stride(0), b, heads, kv_heads, head_dim, k_cache.data_ptr(), v_cache.data_ptr(), block_size,
            block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(), scale, out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return out

    def rope_store(
        self,
        qkv: torch.Tensor,
        heads: int,
        kv_heads: int,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> None:
        """Rotate q and k of qkv [T, (H + 2 KVH) * D] in place by cos/sin [T, D] (sin's first half
        negated), and write k and v into cache slots [T] (int64) of k_cache/v_cache [..., KVH, D]."""
        t, width = qkv.shape
        head_dim = width // (heads + 2 * kv_heads)
        self._rope_store(
            qkv.data_ptr(), t, heads, kv_heads, head_dim, cos.data_ptr(), sin.data_ptr(), slots.data_ptr(),
            k_cache.data_ptr(), v_cache.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip

    def decode_layers(
        self,
        layers: ctypes.Array,
        x: torch.Tensor,
        shape: tuple[int, int, int, int],
        eps: float,
        rope: tuple[torch.Tensor, torch.Tensor],
        slots: torch.Tensor,
        block_size: int,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
    ) -> None:
        """A decode-only step through every layer of `layers` (DecodeLayer structs) in one call, x [B, hidden]
        updated in place; shape is (heads, kv_heads, head_dim, intermediate size), rope cos/sin [B, D]."""
        b, hidden = x.shape
        heads, kv_heads, head_dim, intermediate = shape
        self._decode_layers(
            layers, len(layers), x.data_ptr(), b, hidden, heads, kv_heads, head_dim, intermediate, eps, rope[0].data_ptr(),
            rope[1].data_ptr(), slots.data_ptr(), block_size, block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(),
            scale, torch.get_num_threads(),
        )  # fmt: skip


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def to_panels(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/16), K, 16]: groups of 16 output rows, k-major, the last zero-padded."""
    n, k = weight.shape
    padded = torch.zeros(-(-n // 16) * 16, k)
    padded[:n] = weight
    return padded.view(-1, 16, k).transpose(1, 2).contiguous()


def to_gate_up_panels(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Gate and up [W, K] -> [ceil(W/8), K, 16]: each panel's first 8 columns gate rows, last 8 the same up rows."""
    width, k = gate.shape
    groups = -(-width // 8)
    padding = torch.zeros(groups * 8 - width, k)
    gate_groups = torch.cat((gate, padding)).view(groups, 8, k)
    up_groups = torch.cat((up, padding)).view(groups, 8, k)
    both = torch.cat((gate_groups, up_groups), dim=1)
    return both.transpose(1, 2).contiguous()


_FAILURE: list[str] = []  # the reason load_cpu_kernels() gave up, once it has


@functools.cache
def load_cpu_kernels() -> CpuKernels | None:
    """The compiled kernels, or None (reason logged) where they cannot be used on this machine."""
    reason = _unavailable_reason()
    if reason is None:
        try:
            return CpuKernels(ctypes.CDLL(str(build(avx512=torch.backends.cpu.get_cpu_capability() == "AVX512"))))
        except subprocess.CalledProcessError as error:
            reason = f"compiling {SOURCE.name} failed: {error.stderr.strip()}"
        except OSError as error:
            reason = f"loading {SOURCE.name} failed: {error}"
    log.warning("CPU matrix kernels not used (%s); falling back to torch's linear layers, which are slower", reason)
    _FAILURE.append(reason)
    return None


def unavailable_reason() -> str | None:
    """Why `load_cpu_kernels()` returned None (None when it did not)."""
    return None if load_cpu_kernels() is not None else _FAILURE[-1]


def _unavailable_reason() -> str | None:
    if os.environ.get("LLM_CLUSTER_CPU_KERNELS", "1") == "0":
        return "LLM_CLUSTER_CPU_KERNELS=0"
    if platform.machine() not in ("x86_64", "AMD64") or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"needs x86-64 with AVX2 and FMA, this is {platform.machine()} with {torch.backends.cpu.get_cpu_capability()}"
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return "torch was built without OpenMP"
    if _compiler() is None:
        return "no C compiler (set CC or install gcc)"
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _torch_openmp() -> list[str]:
    """Link against torch's bundled libgomp when it has one (its soname may differ from the system's)."""
    bundled = sorted((Path(torch.__file__).parent / "lib").glob("libgomp*.so*"))
    return [str(bundled[0])] if bundled else []


def build(avx512: bool, source: Path = SOURCE) -> Path:
    """Compile into the cache unless this source, flag set and OpenMP runtime were compiled before.
    With `avx512` (where the CPU has it) the tiles are the 16-lane ones of cpu_kernels.c. `source`
    another version of cpu_kernels.c (benchmarks/kernel_ab.py compares two)."""
    wide = ["-mavx512f"] if avx512 else []
    command = [_compiler(), *_FLAGS, *wide, str(source), *_torch_openmp(), "-lm"]
    key = hashlib.sha256(source.read_bytes() + " ".join(command).encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"cpu_kernels-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            subprocess.run([*command, "-o", str(built)], check=True, capture_output=True, text=True)
            os.replace(built, target)  # atomic: concurrent builders (replicas, test workers) never see half a file
    return target
