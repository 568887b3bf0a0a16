"""`llmcluster preflight`: can this cluster run the chart with this model and layout? A report and a verdict."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kubernetes.client import ApiClient, ApiextensionsV1Api, CoreV1Api
from kubernetes.client.exceptions import ApiException

from cluster.k8s.fit import GIB, FitReport, GPUNode, ModelShape, check_fit

KUBERAY_CRDS = ("rayservices.ray.io", "rayclusters.ray.io")
KUBERAY_VERSION = "v1"
KUBERAY_NEEDED = "1.7"  # the operator release whose CRDs hold every field below (Chart.yaml says the same)
# Every RayService field the Helm chart sets, as a path in the CRD's schema ("[]": each item of a list).
# The API server drops a field its CRD does not have, without an error: on an older operator the
# cluster would run without it (with no authOptions, without token authentication). Kubernetes' own
# types inside (pod templates, the Service, resources, security contexts) end the paths.
# tests/test_k8s_preflight.py checks this list against what the chart renders.
CHART_FIELDS = (
    "spec.upgradeStrategy.type",
    "spec.rayClusterDeletionDelaySeconds",
    "spec.excludeHeadPodFromServeSvc",
    "spec.serveConfigV2",
    "spec.serveService",
    "spec.rayClusterConfig.rayVersion",
    "spec.rayClusterConfig.authOptions.mode",
    "spec.rayClusterConfig.enableInTreeAutoscaling",
    "spec.rayClusterConfig.autoscalerOptions.version",
    "spec.rayClusterConfig.autoscalerOptions.upscalingMode",
    "spec.rayClusterConfig.autoscalerOptions.idleTimeoutSeconds",
    "spec.rayClusterConfig.autoscalerOptions.resources",
    "spec.rayClusterConfig.autoscalerOptions.securityContext",
    "spec.rayClusterConfig.autoscalerOptions.volumeMounts",
    "spec.rayClusterConfig.gcsFaultToleranceOptions.redisAddress",
    "spec.rayClusterConfig.gcsFaultToleranceOptions.redisPassword",
    "spec.rayClusterConfig.headGroupSpec.serviceType",
    "spec.rayClusterConfig.headGroupSpec.rayStartParams",
    "spec.rayClusterConfig.headGroupSpec.template",
    "spec.rayClusterConfig.workerGroupSpecs[].groupName",
    "spec.rayClusterConfig.workerGroupSpecs[].replicas",
    "spec.rayClusterConfig.workerGroupSpecs[].minReplicas",
    "spec.rayClusterConfig.workerGroupSpecs[].maxReplicas",
    "spec.rayClusterConfig.workerGroupSpecs[].rayStartParams",
    "spec.rayClusterConfig.workerGroupSpecs[].template",
)


@dataclass(frozen=True)
class Preflight:
    crd_problems: list[str]
    nodes: list[GPUNode]
    fit: FitReport

    @property
    def passed(self) -> bool:
        return not self.crd_problems and self.fit.fits


def crd_problems(crds: dict[str, dict[str, Any] | None]) -> list[str]:
    """What is wrong with the KubeRay CRDs found (None: not installed), by name: a CRD missing, not serving
    ray.io/v1, or without a field the chart sets."""
    problems = []
    for name, crd in crds.items():
        if crd is None:
            problems.append(f"CRD {name} is not installed: install the KubeRay operator {KUBERAY_NEEDED} first (chart README)")
            continue
        served = [v for v in crd["spec"]["versions"] if v["name"] == KUBERAY_VERSION and v.get("served")]
        if not served:
            problems.append(f"CRD {name} does not serve {KUBERAY_VERSION}: upgrade the KubeRay operator to {KUBERAY_NEEDED}")
        else:
            schema = (served[0].get("schema") or {}).get("openAPIV3Schema") or {}
            problems += [
                f"CRD {name} has no {path}, which the chart sets (the API server would drop it): "
                f"upgrade the KubeRay operator and its CRDs to {KUBERAY_NEEDED}"
                for path in _fields_of(name)
                if not _has_field(schema, path)
            ]
    return problems


def _fields_of(crd_name: str) -> list[str]:
    """The chart's fields in a CRD: all of them in the RayService's; in the RayCluster's (which KubeRay creates
    from the RayService's rayClusterConfig) those under rayClusterConfig, at its spec."""
    if crd_name == "rayservices.ray.io":
        return list(CHART_FIELDS)
    prefix = "spec.rayClusterConfig."
    return ["spec." + path.removeprefix(prefix) for path in CHART_FIELDS if path.startswith(prefix)]


def _has_field(schema: dict[str, Any], path: str) -> bool:
    node = schema
    for part in path.split("."):
        is_list = part.endswith("[]")
        node = (node.get("properties") or {}).get(part.removesuffix("[]"))
        if node is None:
            return False
        if is_list:
            node = node.get("items") or {}
    return True


def read_crd(client: ApiClient, name: str) -> dict[str, Any] | None:
    """A CRD as the API server returns it (None: not installed), as plain JSON: its schema is what matters."""
    try:
        response = ApiextensionsV1Api(client).read_custom_resource_definition(name, _preload_content=False)
    except ApiException as error:
        if error.status != 404:
            raise RuntimeError(f"cannot read CRD {name}: {error.status} {error.reason}") from error
        return None
    return json.loads(response.data)


def run(
    client: ApiClient,
    shape: ModelShape,
    tensor_parallel: int,
    pipeline_parallel: int,
    dtype_bytes: int,
    max_model_len: int,
    gpu_memory_bytes: int | None = None,
) -> Preflight:
    """Ask the cluster for the KubeRay CRDs and its nodes, and check one replica against them."""
    crds = {name: read_crd(client, name) for name in KUBERAY_CRDS}
    nodes = [GPUNode.from_node(n) for n in CoreV1Api(client).list_node().items]
    fit = check_fit(shape, nodes, tensor_parallel, pipeline_parallel, dtype_bytes, max_model_len, gpu_memory_bytes)
    return Preflight(crd_problems(crds), nodes, fit)


def format_report(result: Preflight) -> str:
    fit = result.fit
    lines = ["KubeRay CRDs: " + ("installed (ray.io/v1, every field the chart sets)" if not result.crd_problems else "MISSING")]
    lines += [f"  - {p}" for p in result.crd_problems]
    gpu_nodes = [n for n in result.nodes if n.gpus]
    lines.append(f"GPU nodes: {len(gpu_nodes)} of {len(result.nodes)}")
    for node in gpu_nodes:
        memory = f"{node.gpu_memory_bytes / GIB:.0f} GiB each" if node.gpu_memory_bytes else "memory unknown"
        state = "" if node.schedulable else ", not schedulable"
        lines.append(f"  {node.name}: {node.gpus} x {node.product or 'GPU'} ({memory}{state})")
    lines.append(
        f"Replica: tensor_parallel={fit.tensor_parallel} x pipeline_parallel={fit.pipeline_parallel}, max_model_len={fit.max_model_len}"
    )
    lines.append(
        f"  per GPU: weights {fit.weight_bytes_per_gpu / GIB:.2f} GiB + KV cache "
        f"{fit.kv_bytes_per_gpu_per_sequence / GIB:.3f} GiB per full-length sequence"
    )
    if fit.usable_bytes_per_gpu is not None:
        lines.append(
            f"  engine budget {fit.usable_bytes_per_gpu / GIB:.1f} GiB of {fit.gpu_memory_bytes / GIB:.0f} GiB per GPU; "
            f"room for {fit.max_full_sequences} full-length sequences"
        )
    lines.append(f"  placement: {fit.stage_slots} TP groups fit on the nodes now, so {fit.replicas_placeable} replica(s)")
    lines += [f"  problem: {p}" for p in fit.problems]
    lines += [f"  warning: {w}" for w in fit.warnings]
    verdict = "PASS" if result.passed else "FAIL"
    lines.append(f"Verdict: {verdict}" + (" (with warnings)" if result.passed and fit.warnings else ""))
    return "\n".join(lines)
