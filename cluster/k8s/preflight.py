"""`llmcluster preflight`: can this cluster run the chart with this model and layout? A report and a verdict."""

from __future__ import annotations

from dataclasses import dataclass

from kubernetes.client import ApiClient, ApiextensionsV1Api, CoreV1Api, V1CustomResourceDefinition
from kubernetes.client.exceptions import ApiException

from cluster.k8s.fit import GIB, FitReport, GPUNode, ModelShape, check_fit

KUBERAY_CRDS = ("rayservices.ray.io", "rayclusters.ray.io")
KUBERAY_VERSION = "v1"


@dataclass(frozen=True)
class Preflight:
    crd_problems: list[str]
    nodes: list[GPUNode]
    fit: FitReport

    @property
    def passed(self) -> bool:
        return not self.crd_problems and self.fit.fits


def crd_problems(crds: dict[str, V1CustomResourceDefinition | None]) -> list[str]:
    """What is wrong with the KubeRay CRDs found (None: not installed), by name."""
    problems = []
    for name, crd in crds.items():
        if crd is None:
            problems.append(f"CRD {name} is not installed: install the KubeRay operator first (chart README)")
        elif not any(v.name == KUBERAY_VERSION and v.served for v in crd.spec.versions):
            problems.append(f"CRD {name} does not serve {KUBERAY_VERSION}: upgrade the KubeRay operator to 1.7")
    return problems


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
    extensions = ApiextensionsV1Api(client)
    crds: dict[str, V1CustomResourceDefinition | None] = {}
    for name in KUBERAY_CRDS:
        try:
            crds[name] = extensions.read_custom_resource_definition(name)
        except ApiException as error:
            if error.status != 404:
                raise RuntimeError(f"cannot read CRD {name}: {error.status} {error.reason}") from error
            crds[name] = None
    nodes = [GPUNode.from_node(n) for n in CoreV1Api(client).list_node().items]
    fit = check_fit(shape, nodes, tensor_parallel, pipeline_parallel, dtype_bytes, max_model_len, gpu_memory_bytes)
    return Preflight(crd_problems(crds), nodes, fit)


def format_report(result: Preflight) -> str:
    fit = result.fit
    lines = ["KubeRay CRDs: " + ("installed (ray.io/v1)" if not result.crd_problems else "MISSING")]
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
