"""Will one replica's model fit the cluster's GPU nodes? Memory estimates and placement from Node objects.

A replica is `pipeline_parallel` stages of `tensor_parallel` GPUs; each stage must sit on one node
(its GPUs talk over NVLink/PCIe), stages may sit on different nodes. Every GPU holds 1/(TP*PP) of the
weights and of the KV cache; the engine gives weights and KV cache `USABLE_FRACTION` of a GPU's memory
less `RESERVED_GIB` for activations and CUDA graphs (the rule of serving/engine/runner.py kv_cache_blocks, whose
figures are in serving/config.py; cluster never imports serving, so they are repeated here).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kubernetes.client import V1Node

GPU_RESOURCE = "nvidia.com/gpu"
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB per GPU, set by NVIDIA GPU Feature Discovery
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
USABLE_FRACTION = 0.9
RESERVED_GIB = 2.0
GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """The figures memory depends on: parameter count and the KV cache's shape."""

    num_params: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int | None = None

    @classmethod
    def from_config_json(cls, path: Path) -> ModelShape:
        """Figures of a Llama-family Hugging Face config.json (Llama, Mistral, Qwen2 and the like)."""
        c = json.loads(Path(path).read_text(encoding="utf-8"))
        hidden, layers, heads = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]
        kv_heads = c.get("num_key_value_heads") or heads
        head_dim = c.get("head_dim") or hidden // heads
        attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q and o; k and v
        per_layer = attention + 3 * hidden * c["intermediate_size"] + 2 * hidden  # gate/up/down, two norms
        embeddings = c["vocab_size"] * hidden * (1 if c.get("tie_word_embeddings") else 2)
        return cls(embeddings + layers * per_layer + hidden, layers, kv_heads, head_dim, c.get("max_position_embeddings"))

    def weight_bytes(self, dtype_bytes: int) -> int:
        return self.num_params * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class GPUNode:
    name: str
    gpus: int
    gpu_memory_bytes: int | None  # per GPU; None when the node does not say
    product: str | None
    schedulable: bool  # Ready and not cordoned

    @classmethod
    def from_node(cls, node: V1Node) -> GPUNode:
        labels = node.metadata.labels or {}
        allocatable = (node.status.allocatable if node.status else None) or {}
        memory_mib = labels.get(GPU_MEMORY_LABEL)
        conditions = (node.status.conditions if node.status else None) or []
        ready = any(c.type == "Ready" and c.status == "True" for c in conditions)
        return cls(
            name=node.metadata.name,
            gpus=int(allocatable.get(GPU_RESOURCE, "0")),
            gpu_memory_bytes=int(memory_mib) * 2**20 if memory_mib and memory_mib.isdigit() else None,
            product=labels.get(GPU_PRODUCT_LABEL),
            schedulable=ready and not (node.spec and node.spec.unschedulable),
        )


@dataclass(frozen=True)
class FitReport:
    """The answer for one replica layout; `problems` empty means it fits."""

    tensor_parallel: int
    pipeline_parallel: int
    max_model_len: int
    weight_bytes_per_gpu: int
    kv_bytes_per_gpu_per_sequence: int  # one sequence of max_model_len tokens
    gpu_memory_bytes: int | None  # per GPU of the nodes considered (the smallest); None if unknown
    usable_bytes_per_gpu: int | None
    max_full_sequences: int | None  # full-length sequences whose KV fits next to the weights
    stage_slots: int  # TP groups the schedulable nodes hold at once
    replicas_placeable: int
    problems: list[str]
    warnings: list[str]

    @property
    def fits(self) -> bool:
        return not self.problems


def check_fit(
    shape: ModelShape,
    nodes: list[GPUNode],
    tensor_parallel: int,
    pipeline_parallel: int,
    dtype_bytes: int,
    max_model_len: int,
    gpu_memory_bytes: int | None = None,
) -> FitReport:
    """Check one replica against the nodes; `gpu_memory_bytes` overrides what the node labels say."""
    problems: list[str] = []
    warnings: list[str] = []
    world = tensor_parallel * pipeline_parallel
    weights_per_gpu = -(-shape.weight_bytes(dtype_bytes) // world)
    kv_per_gpu = -(-shape.kv_bytes_per_token(dtype_bytes) * max_model_len // world)

    usable = [n for n in nodes if n.schedulable and n.gpus > 0]
    if not usable:
        problems.append(f"no Ready, schedulable node has {GPU_RESOURCE} (is the NVIDIA device plugin running?)")
    fitting = [n for n in usable if n.gpus >= tensor_parallel]
    if usable and not fitting:
        most = max(n.gpus for n in usable)
        problems.append(f"tensor_parallel={tensor_parallel} needs that many GPUs on one node; the largest node has {most}")
    slots = sum(n.gpus // tensor_parallel for n in fitting)
    if fitting and slots < pipeline_parallel:
        problems.append(f"one replica needs {pipeline_parallel} groups of {tensor_parallel} GPUs; the nodes hold {slots}")

    memory = gpu_memory_bytes
    if memory is None:
        known = [n.gpu_memory_bytes for n in fitting if n.gpu_memory_bytes]
        memory = min(known) if known else None
        if fitting and len(known) < len(fitting):
            warnings.append(f"some GPU nodes have no {GPU_MEMORY_LABEL} label; pass the GPU memory to check them")
    budget = full_sequences = None
    if memory is not None:
        budget = int(USABLE_FRACTION * memory - RESERVED_GIB * GIB)
        full_sequences = max(0, (budget - weights_per_gpu) // kv_per_gpu) if kv_per_gpu else None
        if weights_per_gpu > budget:
            problems.append(
                f"the weights need {weights_per_gpu / GIB:.1f} GiB per GPU, more than the {budget / GIB:.1f} GiB the engine "
                f"may use of a {memory / GIB:.0f} GiB GPU: raise tensor_parallel or pipeline_parallel, or use a smaller dtype"
            )
        elif full_sequences == 0:
            problems.append(
                f"after the weights ({weights_per_gpu / GIB:.1f} GiB per GPU) the KV cache has no room for one "
                f"{max_model_len}-token sequence ({kv_per_gpu / GIB:.2f} GiB per GPU): lower max_model_len or add GPUs"
            )
    elif fitting:
        warnings.append("GPU memory unknown: the memory check was skipped")
    return FitReport(
        tensor_parallel, pipeline_parallel, max_model_len, weights_per_gpu, kv_per_gpu, memory, budget, full_sequences,
        slots, slots // pipeline_parallel, problems, warnings,
    )  # fmt: skip
