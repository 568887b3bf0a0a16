"""Our CPU matrix kernels (serving/models/cpu_kernels.c) against torch's CPU linear, measured in the same run.

    python -m benchmarks.cpu_kernels_bench                 # SmolLM2-135M's projections, 1/8/32/128 rows

For each projection of the default model (q/k/v, o, gate+up with SiLU, down, the 49k-row LM head)
and each row count, times our kernel against torch's `F.linear` (MKL) and, where torch has it,
oneDNN with prepacked weights (what the engine used before). Every variant cycles through enough
weight copies (>= 256 MB) that the weights come from memory, as in a real decode step, not from
cache. The variants alternate, and each keeps its best of `--rounds` rounds, so a slow minute on
this shared machine hits all of them alike. Ratios are the baseline's time over ours.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from serving.models.cpu_kernels import load_cpu_kernels, to_gate_up_panels, to_panels

# (name, in_features, out_features) of SmolLM2-135M's projections; gate_up's out is gate + up
SHAPES = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576), ("lm_head", 576, 49152)]
COPY_BYTES = 256 * 2**20


def mean_time(call: Callable[[], object], repeats: int) -> float:
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def variants(name: str, weights: list[torch.Tensor], x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Each variant computes the same projection over every weight copy in turn."""
    kernels = load_cpu_kernels()
    n = weights[0].shape[0]
    if name == "gate_up":
        panels = [to_gate_up_panels(*w.chunk(2)) for w in weights]
        calls = {
            "ours": lambda: [kernels.gate_up(x, p, n // 2) for p in panels],
            "torch": lambda: [F.silu((y := F.linear(x, w)).chunk(2, -1)[0]) * y.chunk(2, -1)[1] for w in weights],
        }
    else:
        panels = [to_panels(w) for w in weights]
        calls = {"ours": lambda: [kernels.linear(x, p, n, None, None) for p in panels], "torch": lambda: [F.linear(x, w) for w in weights]}
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
        calls["onednn"] = lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packed]
        if name == "gate_up":  # the engine's old gate: two calls with fused swish and mul
            halves = [[torch.ops.mkldnn._reorder_linear_weight(h.contiguous()) for h in w.chunk(2)] for w in weights]
            calls["onednn"] = lambda: [
                torch.ops.mkldnn._linear_pointwise.binary(
                    x, torch.ops.mkldnn._linear_pointwise(x, g, None, "swish", [], ""), u, None, "mul"
                )
                for g, u in halves
            ]
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu_kernels.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if load_cpu_kernels() is None:
        raise SystemExit("the CPU kernels cannot run on this machine (see the warning above)")
    rows_out = []
    cases = [(shape, m) for m in args.rows for shape in SHAPES]
    with torch.inference_mode():
        for (name, k, n), m in tqdm(cases, desc="projections x row counts"):
            copies = max(1, COPY_BYTES // (n * k * 4))
            weights = [torch.randn(n, k) for _ in range(copies)]
            x = torch.randn(m, k)
            calls = variants(name, weights, x)
            repeats = max(1, 2_000_000_000 // (copies * n * k * 4 * max(1, m // 8)))
            times: dict[str, float] = {}
            for _ in range(args.rounds):
                for variant, call in calls.items():
                    times[variant] = min(times.get(variant, float("inf")), mean_time(call, repeats) / copies)
            row = {"projection": name, "rows": m, "in": k, "out": n, **{f"{v}_us": round(t * 1e6, 1) for v, t in times.items()}}
            row.update({f"{v}_over_ours": round(t / times["ours"], 2) for v, t in times.items() if v != "ours"})
            rows_out.append(row)
            tqdm.write(json.dumps(row))
    print(f"\n{'projection':>10} {'rows':>5} {'ours us':>9} " + " ".join(f"{v + ' us':>10} {'ratio':>6}" for v in ("torch", "onednn")))
    for row in rows_out:
        cells = " ".join(
            f"{row.get(v + '_us', float('nan')):>10} {row.get(v + '_over_ours', float('nan')):>5}x" for v in ("torch", "onednn")
        )
        print(f"{row['projection']:>10} {row['rows']:>5} {row['ours_us']:>9} {cells}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows_out}, indent=2))


if __name__ == "__main__":
    main()
