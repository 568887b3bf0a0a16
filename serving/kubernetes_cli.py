"""The Kubernetes commands of the CLI: `llmcluster preflight` and `llmcluster status --kubernetes`.

The work happens in cluster.k8s; this module turns flags (generated from LLMConfig where they are
config fields) into its arguments.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from serving.config import LLMConfig
from serving.config_flags import add_config_flags, config_from_args

if TYPE_CHECKING:  # the kubernetes client takes a while to import: only when a command runs
    from cluster.k8s.fit import ModelShape

_SHAPE_FLAGS = ("num_params_b", "num_layers", "num_kv_heads", "head_dim")


def add_preflight_command(commands: argparse._SubParsersAction) -> None:
    summary = "Check that a Kubernetes cluster can run the Helm chart with this model and layout"
    parser = commands.add_parser(
        "preflight", help=summary, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"{summary}.\n\nAgainst the current kubeconfig: are the KubeRay CRDs installed with every field the chart sets\n"
        "(an older operator's API server drops what its CRD lacks), do nodes have enough GPUs\n"
        "for one tensor-parallel group, and do the weights plus one full-length sequence's KV cache fit\n"
        "in the GPUs of a replica? The model's figures come from its config.json (--model FOLDER,\n"
        "--model-config FILE, or a Hub repo id) or from the explicit figures below. Exit status 1 on FAIL.",
    )  # fmt: skip
    parser.set_defaults(run=_preflight, parser=parser)
    add_config_flags(parser, ["model", "parallel"])
    figures = parser.add_argument_group("model figures (instead of a config.json)")
    figures.add_argument("--model-config", metavar="FILE", help="the model's Hugging Face config.json")
    figures.add_argument("--num-params-b", type=float, help="parameters, in billions")
    figures.add_argument("--num-layers", type=int, help="transformer layers")
    figures.add_argument("--num-kv-heads", type=int, help="key/value heads per layer")
    figures.add_argument("--head-dim", type=int, help="dimension of one attention head")
    figures.add_argument("--gpu-memory-gb", type=float, help="memory of one GPU in GiB (default: the nodes' nvidia.com/gpu.memory label)")
    _add_cluster_flags(parser)


def add_kubernetes_status_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Kubernetes (with --kubernetes)")
    group.add_argument("--kubernetes", action="store_true", help="show the chart's RayService, its pods and Serve applications instead")
    group.add_argument("--namespace", default="default", help="namespace of the RayService (default: %(default)s)")
    group.add_argument("--name", help="the RayService (default: the only llm-cluster one in the namespace)")
    _add_cluster_flags(group)


def kubernetes_status(args: argparse.Namespace) -> int:
    from cluster.k8s.client import api_client, readable_errors
    from cluster.k8s.status import find_rayservice, format_status, ray_pods

    client = api_client(args.kubeconfig, args.context)
    with readable_errors(client):
        service = find_rayservice(client, args.namespace, args.name)
        cluster_name = ((service.get("status") or {}).get("activeServiceStatus") or {}).get("rayClusterName")
        pods = ray_pods(client, args.namespace, cluster_name) if cluster_name else []
    print(format_status(service, pods))
    ready = [c for c in (service.get("status") or {}).get("conditions") or [] if c.get("type") == "Ready"]
    return 0 if ready and ready[0].get("status") == "True" else 1


def _add_cluster_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")


def _preflight(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cluster.k8s import preflight
    from cluster.k8s.client import api_client, readable_errors
    from cluster.k8s.fit import DTYPE_BYTES, GIB

    config = config_from_args(args, parser)
    shape = _model_shape(args, config, parser)
    max_model_len = config.model.max_model_len or shape.max_position_embeddings
    if max_model_len is None:
        parser.error("the model's config.json has no max_position_embeddings: pass --max-model-len")
    dtype = "bfloat16" if config.model.dtype == "auto" else config.model.dtype  # 'auto' is bfloat16 on CUDA
    memory = int(args.gpu_memory_gb * GIB) if args.gpu_memory_gb else None
    client = api_client(args.kubeconfig, args.context)
    parallel = config.parallel
    with readable_errors(client):
        result = preflight.run(
            client, shape, parallel.tensor_parallel, parallel.pipeline_parallel, DTYPE_BYTES[dtype], max_model_len, memory
        )
    print(preflight.format_report(result))
    return 0 if result.passed else 1


def _model_shape(args: argparse.Namespace, config: LLMConfig, parser: argparse.ArgumentParser) -> ModelShape:
    from cluster.k8s.fit import ModelShape

    given = [name for name in _SHAPE_FLAGS if getattr(args, name) is not None]
    if given:
        if len(given) != len(_SHAPE_FLAGS):
            parser.error("explicit model figures need all of " + ", ".join("--" + n.replace("_", "-") for n in _SHAPE_FLAGS))
        return ModelShape(int(args.num_params_b * 1e9), args.num_layers, args.num_kv_heads, args.head_dim)
    if args.model_config:
        return ModelShape.from_config_json(Path(args.model_config))
    return ModelShape.from_config_json(_config_json(config.model.source))


def _config_json(source: str) -> Path:
    """config.json of a model source, without fetching any weights."""
    from serving.models.source import default_model_dir

    if source == "default":
        return default_model_dir() / "config.json"
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser() / "config.json"
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(source, "config.json", token=os.environ.get("HF_TOKEN") or None))
