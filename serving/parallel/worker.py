"""One rank of a parallel replica: a model shard and its KV cache, run as a Ray actor.

The shard runner is whichever class the executor was given (serving.engine.runner.ShardRunner): the
native engine's ModelRunner or, with the deepspeed backend, DeepSpeedRunner; both take the same StepInput.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from serving.config import LLMConfig
from serving.engine.runner import ShardRunnerClass, StepInput, StepLogits
from serving.models.sharding import PipelineStage, TensorParallel


class Worker:
    """Global rank r holds TP rank r % tp of pipeline stage r // tp."""

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a free port on it, for the group's TCP rendezvous (asked of rank 0)."""
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def setup(
        self, folder: str, config: LLMConfig, max_model_len: int, rank: int, address: tuple[str, int], runner_class: ShardRunnerClass
    ) -> int:
        """Join the process group, load this rank's shard; returns how many KV blocks it holds."""
        tp_size, pp_size = config.parallel.tensor_parallel, config.parallel.pipeline_parallel
        _use_node_ip_interface()
        device_is_cuda = config.model.device == "cuda" or (config.model.device == "auto" and torch.cuda.is_available())
        dist.init_process_group(
            "nccl" if device_is_cuda else "gloo",
            init_method=f"tcp://{address[0]}:{address[1]}",
            rank=rank,
            world_size=tp_size * pp_size,
            timeout=timedelta(seconds=120),
        )
        self.rss_before_load = _rss_bytes()
        # one stage: its TP group is the whole world; else every rank must create every stage's group, in the same order
        groups = (
            [dist.group.WORLD] if pp_size == 1 else [dist.new_group(list(range(s * tp_size, (s + 1) * tp_size))) for s in range(pp_size)]
        )
        stage_rank, tp_rank = divmod(rank, tp_size)
        self.tp = TensorParallel(tp_size, tp_rank, groups[stage_rank])
        stage = PipelineStage(
            pp_size,
            stage_rank,
            prev_rank=rank - tp_size if stage_rank > 0 else None,
            next_rank=rank + tp_size if stage_rank < pp_size - 1 else None,
        )
        self.runner = runner_class(Path(folder), config, max_model_len, self.tp, stage)
        self.returns_logits = stage.is_last and tp_rank == 0
        return self.runner.num_blocks

    def execute(self, step: StepInput) -> StepLogits | None:
        logits = self.runner.execute(step)
        if not self.returns_logits:
            return None
        return StepLogits(logits.sample_logits.cpu(), {i: rows.cpu() for i, rows in logits.prompt_logits.items()})

    def memory_report(self) -> dict[str, int]:
        """Peak RSS, RSS just before loading, and bytes of this rank's weights and KV cache."""
        import resource

        return {
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "rss_before_load": self.rss_before_load,
            "weights": sum(t.numel() * t.element_size() for t in self.runner.model.state_dict().values()),
            "kv_cache": sum(2 * k.numel() * k.element_size() for k, _ in self.runner.kv_caches),
        }

    def time_all_reduce(self, rows: int, iterations: int) -> float:
        """Mean seconds of one all-reduce of a [rows, hidden] activation across this TP group."""
        import time

        x = torch.randn(rows, self.runner.arch.hidden_size, dtype=self.runner.dtype, device=self.runner.device)
        self.tp.all_reduce(x)
        start = time.perf_counter()
        for _ in range(iterations):
            self.tp.all_reduce(x)
        return (time.perf_counter() - start) / iterations


def _use_node_ip_interface() -> None:
    """Make gloo and NCCL connect over the interface that carries Ray's node IP. Left alone, gloo
    advertises whatever the host name resolves to, often 127.0.1.1 in /etc/hosts, which peers on
    other hosts cannot reach. An interface the user chose (GLOO_SOCKET_IFNAME, ...) is kept."""
    import psutil
    import ray

    ip = ray.util.get_node_ip_address()
    names = [name for name, addresses in psutil.net_if_addrs().items() if any(a.address == ip for a in addresses)]
    if names:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", names[0])
        os.environ.setdefault("NCCL_SOCKET_IFNAME", names[0])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
