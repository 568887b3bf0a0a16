"""What one LLM replica reserves in Ray: its `ray_actor_options`, from `server.replica_cpus` / `replica_gpus`.

Reserved resources are what Ray's autoscaler plans with: a replica that no node has room for stays
pending until the autoscaler adds a node that fits it (docs/autoscaling.md). A replica that runs the
model itself on CUDA reserves its GPU by default, so Ray hands each replica a GPU of its own
(CUDA_VISIBLE_DEVICES). With tensor_parallel x pipeline_parallel > 1 the replica is only a driver: its
Worker actors reserve the GPUs (or CPUs) in placement groups (serving/parallel/ray_executor.py).
"""

from __future__ import annotations

from serving.config import LLMConfig


def replica_gpus(config: LLMConfig) -> float:
    """`server.replica_gpus`, or its default: 1 for a single-worker replica on CUDA, else 0."""
    if config.server.replica_gpus is not None:
        return config.server.replica_gpus
    return 1.0 if config.model.device == "cuda" and config.parallel.world_size == 1 else 0.0


def replica_actor_options(config: LLMConfig) -> dict[str, float]:
    """The LLM deployment's `ray_actor_options`."""
    options = {"num_cpus": config.server.replica_cpus}
    if (gpus := replica_gpus(config)) > 0:
        options["num_gpus"] = gpus
    return options
