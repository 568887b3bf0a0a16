"""The float32 CPU matrix kernels against float64 torch, their build, and their fallback."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from serving.models import cpu_kernels
from serving.models.cpu_kernels import load_cpu_kernels, to_gate_up_panels, to_panels

pytestmark = pytest.mark.skipif(
    cpu_kernels._unavailable_reason() is not None, reason=f"CPU kernels cannot run here: {cpu_kernels._unavailable_reason()}"
)

# rows cover every register-tile height (1-6) and several tiles; widths cover partial panels
ROWS = [1, 2, 5, 6, 7, 13, 40]
SHAPES = [(576, 960), (64, 40), (33, 17), (7, 3)]


@pytest.fixture
def kernels() -> cpu_kernels.CpuKernels:
    loaded = load_cpu_kernels()
    assert loaded is not None, "this machine qualifies, so the kernels must build and load"
    return loaded


def rounding_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sum of |x_k w_k| per output: float32 summation error is a small multiple of eps times this."""
    return x.double().abs() @ weight.double().abs().T


TOLERANCE = 1e-6  # times the rounding bound; float32 eps is 1.2e-7


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("in_features, out_features", SHAPES)
def test_linear_with_bias_and_residual_matches_float64(kernels, rows, in_features, out_features):
    x, weight = torch.randn(rows, in_features), torch.randn(out_features, in_features)
    bias, residual = torch.randn(out_features), torch.randn(rows, out_features)
    reference, bound = x.double() @ weight.double().T, rounding_bound(x, weight)
    plain = kernels.linear(x, to_panels(weight), out_features, None, None)
    assert ((plain.double() - reference).abs() <= TOLERANCE * bound).all()
    out = kernels.linear(x, to_panels(weight), out_features, bias, residual)
    expected = reference + bias.double() + residual.double()
    assert ((out.double() - expected).abs() <= TOLERANCE * (bound + expected.abs())).all()


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("in_features, width", SHAPES)
def test_gate_up_matches_float64_silu_product(kernels, rows, in_features, width):
    x, gate, up = torch.randn(rows, in_features), torch.randn(width, in_features), torch.randn(width, in_features)
    gate_out, up_out = x.double() @ gate.double().T, x.double() @ up.double().T
    reference = F.silu(gate_out) * up_out
    # an error e in the gate moves the output by at most 1.1 |up| e (silu' <= 1.1), in up by |silu(gate)| e
    bound = 1.1 * up_out.abs() * rounding_bound(x, gate) + F.silu(gate_out).abs() * rounding_bound(x, up) + reference.abs()
    out = kernels.gate_up(x, to_gate_up_panels(gate, up), width)
    assert out.shape == (rows, width)
    assert ((out.double() - reference).abs() <= TOLERANCE * bound).all()


def test_silu_saturates_without_overflow(kernels):
    """Gate values far outside exp's float range: silu(-1000) = 0 and silu(1000) = 1000, no inf or NaN."""
    x = torch.tensor([[1.0]])
    gate = torch.tensor([[-1000.0], [1000.0], [0.0], [-20.0], [20.0], [1.0], [-1.0], [88.5]])
    out = kernels.gate_up(x, to_gate_up_panels(gate, torch.ones_like(gate)), 8)
    torch.testing.assert_close(out[0], F.silu(gate.double()[:, 0]).float(), rtol=1e-6, atol=1e-30)


def test_kernels_share_torchs_openmp_runtime(kernels):
    """One OpenMP runtime in the process: a second one would run a second thread team on the same cores."""
    kernels.linear(torch.randn(4, 64), to_panels(torch.randn(32, 64)), 32, None, None)
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(runtimes) == 1, runtimes


def test_a_failing_compiler_falls_back_with_the_reason(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("CC", "false")
    monkeypatch.setenv("LLM_CLUSTER_CACHE", str(tmp_path))
    load_cpu_kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="serving.models.cpu_kernels"):
            assert load_cpu_kernels() is None
    finally:
        load_cpu_kernels.cache_clear()
    assert "compiling cpu_kernels.c failed" in caplog.text
    assert not list(tmp_path.rglob("*.so")), "a failed build must leave no library behind"


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("LLM_CLUSTER_CPU_KERNELS", "0")
    assert cpu_kernels._unavailable_reason() == "LLM_CLUSTER_CPU_KERNELS=0"


@pytest.mark.parametrize("rows, size", [(1, 576), (3, 37), (40, 64)])
def test_rms_norm_matches_float64(kernels, rows, size):
    x, weight = torch.randn(rows, size) * 3, torch.randn(size)
    x64 = x.double()
    reference = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5).double(), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 4, 12), (8, 1, 16)])
def test_decode_attention_matches_float64_over_gathered_blocks(kernels, heads, kv_heads, head_dim):
    """Sequences of different lengths over shuffled blocks; block tables padded with a block that must not be read."""
    block_size, num_blocks = 4, 40
    k_cache, v_cache = (torch.randn(num_blocks, block_size, kv_heads, head_dim) for _ in range(2))
    context_lens = torch.tensor([1, 4, 5, 23, 37])
    order = torch.randperm(num_blocks - 1)
    tables, used = torch.full((len(context_lens), 10), num_blocks - 1), 0
    for b, n in enumerate(context_lens.tolist()):
        blocks = -(-n // block_size)
        tables[b, :blocks] = order[used : used + blocks]
        used += blocks
    k_cache[num_blocks - 1] = float("nan")  # the padding block: reading it would poison the output
    q = torch.randn(len(context_lens), heads, head_dim)
    scale = head_dim**-0.5
    out = kernels.decode_attention(q, k_cache, v_cache, tables, context_lens, scale)
    for b, n in enumerate(context_lens.tolist()):
        keys = k_cache[tables[b]].reshape(-1, kv_heads, head_dim)[:n].double()
        values = v_cache[tables[b]].reshape(-1, kv_heads, head_dim)[:n].double()
        per_head = heads // kv_heads
        weights = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double(), keys.repeat_interleave(per_head, 1)) * scale, dim=-1)
        reference = torch.einsum("hn,nhd->hd", weights, values.repeat_interleave(per_head, 1))
        torch.testing.assert_close(out[b].double(), reference, rtol=1e-5, atol=1e-5)


def test_rope_store_matches_torch_rotary_and_cache_write(kernels):
    from serving.models.llama import apply_rotary

    tokens, heads, kv_heads, head_dim = 5, 6, 2, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    angles = torch.randn(tokens, head_dim // 2)
    cos = torch.cat((angles, angles), -1).cos()
    sin = torch.cat((-angles, angles), -1).sin()
    slots = torch.tensor([7, 0, 3, 12, 5])
    k_cache, v_cache = torch.zeros(4, 4, kv_heads, head_dim), torch.zeros(4, 4, kv_heads, head_dim)
    q_k = apply_rotary(qkv[:, : (heads + kv_heads) * head_dim].reshape(tokens, -1, head_dim), cos[:, None], sin[:, None])
    v = qkv[:, (heads + kv_heads) * head_dim :].reshape(tokens, kv_heads, head_dim).clone()
    kernels.rope_store(qkv, heads, kv_heads, cos, sin, slots, k_cache, v_cache)
    torch.testing.assert_close(qkv[:, : (heads + kv_heads) * head_dim].reshape(tokens, -1, head_dim), q_k)
    torch.testing.assert_close(k_cache.view(-1, kv_heads, head_dim)[slots], q_k[:, heads:])
    torch.testing.assert_close(v_cache.view(-1, kv_heads, head_dim)[slots], v)
    untouched = torch.ones(16, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache.view(16, -1)[untouched].any() and not v_cache.view(16, -1)[untouched].any()
