"""The heavy optional parts (pyproject extras) say which extra to install when it is missing.

A missing package is simulated the way Python itself marks one: `sys.modules[name] = None` makes
`import name` raise ModuleNotFoundError.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from serving.config import LLMConfig, ParallelConfig
from serving.parallel.deepspeed_runner import DeepSpeedRunner, _shard_with_deepspeed


def test_kubernetes_commands_without_the_client_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    for name in [m for m in sys.modules if m == "cluster.k8s" or m.startswith("cluster.k8s.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'llm-cluster\[kubernetes\]'"):
        importlib.import_module("cluster.k8s.fit")


def test_deepspeed_backend_without_transformers_names_the_extra(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "transformers", None)
    config = LLMConfig(parallel=ParallelConfig(backend="deepspeed"))
    with pytest.raises(ModuleNotFoundError, match=r"needs transformers .*pip install 'llm-cluster\[deepspeed\]'"):
        DeepSpeedRunner(tmp_path, config, 16)


def test_deepspeed_backend_without_deepspeed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(ModuleNotFoundError, match=r"needs deepspeed .*pip install 'llm-cluster\[deepspeed\]'"):
        _shard_with_deepspeed(torch.nn.Linear(2, 2), 2, torch.float32)


def test_plots_without_matplotlib_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "serving.loadtest.plots", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'llm-cluster\[plots\]'"):
        importlib.import_module("serving.loadtest.plots")
