"""Two versions of serving/models/cpu_kernels.c against each other, alternated in one process.

    git show HEAD~1:serving/models/cpu_kernels.c > /tmp/before.c
    python -m benchmarks.kernel_ab /tmp/before.c                      # against the working tree's file
    python -m benchmarks.kernel_ab /tmp/before.c /tmp/after.c --format q8 --rows 32

Runs a decode step's worth of the default model's projections (q/k/v, o, gate/up with SiLU, down; 30
layers, each with its own weights, so that they come from memory as in a real step) in one weight format,
through raw calls of each build's llm_quantized, or llm_linear / llm_gate_up for float32. Each round runs
both builds, the other one first every other round, so that this shared machine's drift from minute to
minute hits both alike; reported are the median
time of each over the rounds, the weight stream it amounts to, and their ratio (> 1: the second is faster).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from serving.models.cpu_kernels import QUANTIZED_FORMATS, SOURCE, CpuKernels, build, to_gate_up_panels, to_panels
from serving.models.quant import QuantLinear, quantize

# (in_features, out_features, gated) of SmolLM2-135M's projections; gate_up's out is gate + up
SHAPES = [(576, 960, False), (576, 576, False), (576, 3072, True), (1536, 576, False)]
LAYERS = 30
KINDS = {"q8": "q8", "q4": "q4", "q4_x8": "q4"}  # quantized format -> storage kind
FORMATS = ["f32", *KINDS]


def projection(fmt: str, k: int, n: int, gated: bool, kernels: CpuKernels) -> QuantLinear:
    rows = quantize(torch.randn(n, k), KINDS[fmt])
    layer = QuantLinear(rows.kind, n, k, rows.group, bias=False, gated=gated, int8_inputs=fmt == "q4_x8")
    layer.load_rows(0, rows)
    layer.pack(kernels)
    return layer


def float_call(k: int, n: int, gated: bool, x: torch.Tensor, out: torch.Tensor, threads: int) -> tuple[str, tuple, torch.Tensor]:
    """(function name, arguments, panels) of one float32 projection."""
    weight = torch.randn(n, k)
    if gated:
        panels = to_gate_up_panels(*weight.chunk(2))
        return "_gate_up", (x.data_ptr(), x.shape[0], k, panels.data_ptr(), n // 2, out.data_ptr(), threads), panels
    panels = to_panels(weight)
    return "_linear", (x.data_ptr(), x.shape[0], k, panels.data_ptr(), n, None, None, out.data_ptr(), threads), panels


def step_calls(fmt: str, rows: int, threads: int, kernels: CpuKernels) -> tuple[list[tuple[str, tuple]], int, list]:
    """(function, arguments) of every projection of a step, the weights' bytes, and the tensors they point to."""
    calls, weight_bytes, keep = [], 0, []
    for _ in range(LAYERS):
        for k, n, gated in SHAPES:
            width = n // 2 if gated else n
            x, out = torch.randn(rows, k), torch.empty(rows, width)
            if fmt == "f32":
                function, arguments, panels = float_call(k, n, gated, x, out, threads)
                calls.append((function, arguments))
                weight_bytes += panels.numel() * 4
                keep += [panels, x, out]
                continue
            layer = projection(fmt, k, n, gated, kernels)
            mins = None if layer.mins is None else layer.mins.data_ptr()
            calls.append(
                ("_quantized", (x.data_ptr(), rows, k, QUANTIZED_FORMATS[layer.format], layer.data.data_ptr(), layer.scales.data_ptr(),
                 mins, layer.group, width, int(gated), None, None, out.data_ptr(), threads))
            )  # fmt: skip
            weight_bytes += sum(t.numel() * t.element_size() for t in (layer.data, layer.scales, layer.mins) if t is not None)
            keep += [layer, x, out]
    return calls, weight_bytes, keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path, help="a version of cpu_kernels.c")
    parser.add_argument("second", type=Path, nargs="?", default=SOURCE, help="another (default: the working tree's)")
    parser.add_argument("--format", default="q4_x8", choices=FORMATS, help="weights: f32, q8 (int8), q4 (gguf's 4-bit), q4_x8 (int4)")
    parser.add_argument("--rows", type=int, default=1, help="rows of x (the decode batch)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--avx512", action="store_true", help="build both with the AVX-512 tiles")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.format == "q4_x8" and any("FORMAT_Q4_X8" not in source.read_text() for source in (args.first, args.second)):
        raise SystemExit("--format q4_x8 needs both sources to have the Q4_X8 format (int4's int8 inputs, from 7fc47e8 on)")
    builds = [CpuKernels(ctypes.CDLL(str(build(args.avx512, source)))) for source in (args.first, args.second)]
    calls, weight_bytes, _keep = step_calls(args.format, args.rows, args.threads, builds[0])
    times: list[list[float]] = [[], []]
    for r in tqdm(range(args.rounds), desc="rounds"):
        for kernels, spent in zip(builds, times) if r % 2 == 0 else zip(builds[::-1], times[::-1]):
            start = time.perf_counter()
            for function, arguments in calls:
                getattr(kernels, function)(*arguments)
            spent.append(time.perf_counter() - start)
    first, second = (statistics.median(spent) for spent in times)
    for name, seconds in ((args.first, first), (args.second, second)):
        print(f"{name}: {seconds * 1e3:.2f} ms a step, {weight_bytes / seconds / 1e9:.1f} GB/s of weights")
    print(f"first / second: {first / second:.3f}")


if __name__ == "__main__":
    main()
