"""The one place that chooses how a replica computes its steps, from the config alone."""

from __future__ import annotations

from pathlib import Path

from serving.config import LLMConfig
from serving.engine.runner import Runner, ShardRunnerClass


def make_runner(config: LLMConfig, folder: Path, max_model_len: int) -> Runner:
    """The model in this process when the layout is one rank, else Worker actors driven by a
    RayExecutor, each running its rank's shard; the backend (native or deepspeed) picks the runner of a rank."""
    shard = _shard_runner_class(config)
    parallel = config.parallel
    if parallel.world_size == 1:
        return shard(folder, config, max_model_len)
    if parallel.backend == "native":  # refuse a bad layout before any worker starts
        from serving.models.arch import ModelArch
        from serving.models.sharding import check_layout

        check_layout(ModelArch.from_folder(folder), parallel.tensor_parallel, parallel.pipeline_parallel)
    from serving.parallel.ray_executor import RayExecutor

    return RayExecutor(folder, config, max_model_len, shard)


def _shard_runner_class(config: LLMConfig) -> ShardRunnerClass:
    if config.parallel.backend == "deepspeed":  # any Hugging Face causal LM, run by transformers + DeepSpeed
        from serving.parallel.deepspeed_runner import DeepSpeedRunner

        return DeepSpeedRunner
    from serving.engine.model_runner import ModelRunner

    return ModelRunner
