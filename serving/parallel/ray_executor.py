"""Drives a group of Worker actors as if they were one model runner.

Every step's StepInput goes to every rank (Ray preserves each actor's call order, so ranks see
steps in the same order); the last stage's first TP rank returns the logits.
"""

from __future__ import annotations

from pathlib import Path

import ray
import torch

from cluster.placement import PlacementError, place_workers
from serving.config import LLMConfig
from serving.engine.runner import ShardRunnerClass, StepInput, StepLogits
from serving.errors import EngineDeadError
from serving.models.sharding import InvalidLayoutError
from serving.parallel.worker import Worker


def worker_resources(config: LLMConfig, cluster_gpus: float) -> dict[str, float]:
    """What each worker reserves: one GPU when the model runs on CUDA (device cuda, or auto on a cluster with
    GPUs), else `parallel.worker_cpus` CPUs."""
    on_gpu = config.model.device == "cuda" or (config.model.device == "auto" and cluster_gpus > 0)
    return {"GPU": 1.0} if on_gpu else {"CPU": config.parallel.worker_cpus}


class RayExecutor:
    """A serving.engine.runner.Runner over Worker actors."""

    device = torch.device("cpu")  # the logits come back to the driver's memory, which samples there

    def __init__(self, folder: Path, config: LLMConfig, max_model_len: int, runner_class: ShardRunnerClass) -> None:
        """Start one Worker per rank, each building its shard as `runner_class` (serving.engine.runner.ShardRunner)."""
        parallel = config.parallel
        tp, pp = parallel.tensor_parallel, parallel.pipeline_parallel
        per_worker = worker_resources(config, ray.cluster_resources().get("GPU", 0.0))
        try:
            self.placement = place_workers(tp, pp, per_worker, parallel.placement_timeout_s, parallel.cluster_autoscales)
        except PlacementError as error:
            hint = "" if parallel.cluster_autoscales else "; if the cluster adds nodes on demand, set parallel.cluster_autoscales"
            raise InvalidLayoutError(f"{error}{hint}") from None
        actor = ray.remote(Worker)
        self.workers = [
            actor.options(scheduling_strategy=strategy, num_cpus=per_worker.get("CPU", 0), num_gpus=per_worker.get("GPU", 0)).remote()
            for strategy in self.placement.strategies
        ]
        address = ray.get(self.workers[0].rendezvous_address.remote())
        blocks = ray.get(
            [w.setup.remote(str(folder), config, max_model_len, rank, address, runner_class) for rank, w in enumerate(self.workers)]
        )
        self.num_blocks = min(blocks)  # stages with more layers fit fewer blocks in the same budget
        self.tensor_parallel = tp
        self.logits_rank = (pp - 1) * tp

    def submit(self, step: StepInput) -> list[ray.ObjectRef]:
        """Send the step to every rank; with pipeline stages, several steps can be on their way."""
        return [worker.execute.remote(step) for worker in self.workers]

    def collect(self, refs: list[ray.ObjectRef]) -> StepLogits:
        """The step's logits; raises EngineDeadError as soon as any rank has died (its peers
        would otherwise sit in a collective waiting for it)."""
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                ray.get(ready)
        except ray.exceptions.RayActorError as error:
            raise EngineDeadError(f"a model worker died, the replica cannot continue: {error}") from error
        return ray.get(refs[self.logits_rank])

    def memory_reports(self) -> list[dict[str, int]]:
        return ray.get([w.memory_report.remote() for w in self.workers])

    def time_all_reduce(self, rows: int, iterations: int = 50) -> float:
        """Mean seconds of one all-reduce across the first TP group (all its ranks take part)."""
        group = self.workers[: self.tensor_parallel]
        return max(ray.get([w.time_all_reduce.remote(rows, iterations) for w in group]))

    def node_ids(self) -> list[str]:
        """The Ray node of each rank."""
        return list(self.placement.node_ids)

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.placement.release()
