"""What `deploy` checks before it hands the application to Serve, and what it reads back when a replica fails.

A layout the model cannot take (tensor parallel size against its heads, stages against its layers, context
length) or the cluster can never hold (workers per node, CPUs and GPUs in all) is refused at once with the
reason, instead of after Serve has retried the replica three times. Whatever still fails inside a replica
reaches the user as that replica's own exception, read from the traceback Serve keeps in its status.
"""

from __future__ import annotations

import re
from pathlib import Path

from cluster.placement import NodeCapacity, alive_nodes, plan_stages
from serving.config import LLMConfig
from serving.models.arch import ModelArch, model_limits
from serving.models.sharding import InvalidLayoutError, check_layout
from serving.models.source import resolve_model
from serving.parallel.ray_executor import worker_resources
from serving.server.replica_resources import replica_actor_options

_AUTOSCALING_HINT = "; if the cluster adds nodes on demand, set parallel.cluster_autoscales (--cluster-autoscales)"
_QUALIFIED_EXCEPTION = re.compile(r"^(?:\w+\.)+(?=\w+(?:Error|Exception)\b)")


def check_deployable(config: LLMConfig) -> None:
    """Raise with the reason when the model (if its files are on this machine) or the connected Ray cluster
    cannot run `config`'s layout."""
    model_dir = _model_dir_here(config.model.source)
    if model_dir is not None:
        check_model_layout(config, model_dir)
    check_cluster_resources(config)


def check_model_layout(config: LLMConfig, model_dir: Path) -> None:
    """The model's config.json against the parallel layout and the context length asked for."""
    parallel = config.parallel
    if parallel.backend == "deepspeed":
        _, context = model_limits(model_dir)
    else:
        arch = ModelArch.from_folder(model_dir)
        check_layout(arch, parallel.tensor_parallel, parallel.pipeline_parallel)
        context = arch.max_position_embeddings
    asked = config.model.max_model_len
    if asked is not None and asked > context:
        raise InvalidLayoutError(f"max_model_len {asked} exceeds the model's context length {context} ({model_dir / 'config.json'})")


def check_cluster_resources(config: LLMConfig) -> None:
    """The connected cluster's nodes against what min_replicas replicas and their workers reserve. A cluster that
    adds nodes on demand (parallel.cluster_autoscales) is not judged by the nodes it has now."""
    if config.parallel.cluster_autoscales:
        return
    nodes = alive_nodes()
    total = {name: sum(node.resources.get(name, 0.0) for node in nodes) for name in ("CPU", "GPU")}
    if config.model.device == "cuda" and total["GPU"] == 0:
        raise InvalidLayoutError("model.device is cuda, but no node of the Ray cluster has a GPU")
    options = replica_actor_options(config)
    replica = {"CPU": options["num_cpus"], "GPU": options.get("num_gpus", 0.0)}
    if not any(node.fits(replica, 1) for node in nodes):
        raise InvalidLayoutError(
            f"no node can hold an LLM replica reserving {_amounts(replica)}; nodes have {_node_list(nodes)}{_AUTOSCALING_HINT}"
        )
    parallel = config.parallel
    worker = worker_resources(config, total["GPU"]) if parallel.world_size > 1 else {}
    if worker:
        try:
            plan_stages(nodes, parallel.tensor_parallel, parallel.pipeline_parallel, worker)
        except RuntimeError as error:
            raise InvalidLayoutError(f"{error}{_fraction_hint(worker)}") from None
    needed = {name: config.server.min_replicas * (replica.get(name, 0.0) + parallel.world_size * worker.get(name, 0.0)) for name in total}
    short = [name for name in needed if needed[name] > total[name] + 1e-9]
    if short:
        raise InvalidLayoutError(
            f"{config.server.min_replicas} LLM replica(s) of {parallel.world_size} worker(s) each reserve {_amounts(needed)}; "
            f"the whole cluster has {_amounts(total)}{_fraction_hint(worker)}{_AUTOSCALING_HINT}"
        )


def replica_error(serve_message: str) -> str:
    """The exception a replica failed with, from the message Serve keeps for a deployment whose replicas failed
    to start (it ends with the replica's traceback); the message itself when it holds no traceback."""
    _, _, traceback = serve_message.rpartition("Error:\n")
    lines = [line.strip() for line in traceback.splitlines() if line.strip()]
    if not lines:
        return serve_message
    return _QUALIFIED_EXCEPTION.sub("", lines[-1])


def _model_dir_here(source: str) -> Path | None:
    """The model folder when this machine has it: a local folder, or the embedded default (converted once).
    A Hub repo id is left to the replicas, which download it."""
    if source == "default" or Path(source).expanduser().is_dir():
        return resolve_model(source)
    return None


def _fraction_hint(worker: dict[str, float]) -> str:
    if "CPU" not in worker:
        return ""
    return f"; each worker reserves parallel.worker_cpus = {worker['CPU']:g} CPUs (--worker-cpus; fractions such as 0.5 are allowed)"


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in resources.items() if amount) or "nothing"


def _node_list(nodes: list[NodeCapacity]) -> str:
    return "; ".join(f"{node.ip}: {_amounts({k: node.resources.get(k, 0.0) for k in ('CPU', 'GPU')})}" for node in nodes)
