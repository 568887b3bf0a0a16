"""`llmcluster preflight`'s model sizing and fit/placement logic, on the kubernetes client's own model
objects (V1Node, V1CustomResourceDefinition) built here; there is no API server on these machines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from kubernetes.client import (
    V1Node,
    V1NodeCondition,
    V1NodeSpec,
    V1NodeStatus,
    V1ObjectMeta,
)
from safetensors import safe_open

from cluster.k8s.fit import GIB, GPUNode, ModelShape, check_fit
from cluster.k8s.preflight import CHART_FIELDS, Preflight, crd_problems, format_report
from serving.cli import main
from tests.chart import crd, rayservice, render_all, v1_schema

H100_MIB = "81559"  # what GPU Feature Discovery reports for an H100 80GB HBM3
LLAMA_70B = {  # Llama 3.1 70B's config.json figures
    "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
    "intermediate_size": 28672, "vocab_size": 128256, "tie_word_embeddings": False, "max_position_embeddings": 131072,
}  # fmt: skip
LLAMA_8B = {**LLAMA_70B, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 14336}


def node(name: str, gpus: int, memory_mib: str | None = H100_MIB, ready: bool = True, cordoned: bool = False) -> V1Node:
    labels = {"kubernetes.io/hostname": name}
    if gpus:
        labels["nvidia.com/gpu.product"] = "NVIDIA-H100-80GB-HBM3"
    if gpus and memory_mib:
        labels["nvidia.com/gpu.memory"] = memory_mib
    allocatable = {"cpu": "96", "memory": "1900Gi", "pods": "110"} | ({"nvidia.com/gpu": str(gpus)} if gpus else {})
    return V1Node(
        metadata=V1ObjectMeta(name=name, labels=labels),
        spec=V1NodeSpec(unschedulable=cordoned or None),
        status=V1NodeStatus(allocatable=allocatable, capacity=allocatable, conditions=[V1NodeCondition(type="Ready", status=str(ready))]),
    )


def shape_of(config: dict, tmp_path: Path) -> ModelShape:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return ModelShape.from_config_json(path)


def safetensors_params(folder: Path) -> int:
    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            total += sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    return total


@pytest.mark.parametrize("model", ["default_model", "tiny_model"])
def test_parameter_count_from_config_matches_the_weights(model, request):
    folder = request.getfixturevalue(model)
    assert ModelShape.from_config_json(folder / "config.json").num_params == safetensors_params(folder)


def test_published_model_sizes(tmp_path):
    big = shape_of(LLAMA_70B, tmp_path)
    assert big.num_params / 1e9 == pytest.approx(70.55, abs=0.05)  # Meta: 70.6B
    assert big.kv_bytes_per_token(2) == 2 * 80 * 8 * 128 * 2  # 320 KiB per token in bfloat16
    assert shape_of(LLAMA_8B, tmp_path).num_params / 1e9 == pytest.approx(8.03, abs=0.01)  # Meta: 8.0B


def test_70b_fits_two_8_gpu_nodes_with_tp8_pp2(tmp_path):
    nodes = [GPUNode.from_node(node(f"gpu-{i}", 8)) for i in range(2)] + [GPUNode.from_node(node("cpu-0", 0))]
    report = check_fit(shape_of(LLAMA_70B, tmp_path), nodes, 8, 2, dtype_bytes=2, max_model_len=32768)
    assert report.fits and not report.warnings
    assert (report.stage_slots, report.replicas_placeable) == (2, 1)
    assert report.weight_bytes_per_gpu / GIB == pytest.approx(70.55e9 * 2 / 16 / GIB, rel=1e-3)
    # 0.9 * 79.6 GiB - 2 GiB = 69.7 GiB budget, less 8.2 GiB of weights, over 320 KiB * 32768 / 16 GPUs = 0.625 GiB
    assert report.max_full_sequences == 98


def test_weights_too_big_for_the_gpus_fail(tmp_path):
    nodes = [GPUNode.from_node(node("l4-0", 2, memory_mib="23034"))]
    report = check_fit(shape_of(LLAMA_70B, tmp_path), nodes, 2, 1, dtype_bytes=2, max_model_len=8192)
    assert not report.fits
    assert "the weights need 65.7 GiB per GPU, more than the 18.2 GiB the engine may use of a 22 GiB GPU" in report.problems[0]


def test_no_room_for_one_full_length_sequence_fails(tmp_path):
    nodes = [GPUNode.from_node(node("a10-0", 1, memory_mib="23028"))]
    report = check_fit(shape_of(LLAMA_8B, tmp_path), nodes, 1, 1, dtype_bytes=2, max_model_len=131072)
    assert report.max_full_sequences == 0
    assert "no room for one 131072-token sequence" in report.problems[0]


def test_tensor_parallel_group_must_fit_one_node(tmp_path):
    nodes = [GPUNode.from_node(node(f"gpu-{i}", 8)) for i in range(4)]
    report = check_fit(shape_of(LLAMA_70B, tmp_path), nodes, 16, 1, dtype_bytes=2, max_model_len=4096)
    assert report.problems == ["tensor_parallel=16 needs that many GPUs on one node; the largest node has 8"]


def test_pipeline_stages_need_enough_groups_and_only_schedulable_nodes_count(tmp_path):
    nodes = [node("gpu-0", 8), node("gpu-1", 8, cordoned=True), node("gpu-2", 8, ready=False), node("gpu-3", 4)]
    report = check_fit(shape_of(LLAMA_70B, tmp_path), [GPUNode.from_node(n) for n in nodes], 4, 4, 2, 4096)
    assert report.stage_slots == 3  # two groups of 4 on gpu-0, one on gpu-3
    assert report.problems == ["one replica needs 4 groups of 4 GPUs; the nodes hold 3"]


def test_no_gpu_nodes_and_unknown_memory(tmp_path):
    shape = shape_of(LLAMA_8B, tmp_path)
    report = check_fit(shape, [GPUNode.from_node(node("cpu-0", 0))], 1, 1, 2, 4096)
    assert report.problems == ["no Ready, schedulable node has nvidia.com/gpu (is the NVIDIA device plugin running?)"]
    unlabelled = [GPUNode.from_node(node("gpu-0", 2, memory_mib=None))]
    report = check_fit(shape, unlabelled, 2, 1, 2, 4096)
    assert report.fits and report.usable_bytes_per_gpu is None
    assert "GPU memory unknown: the memory check was skipped" in report.warnings
    report = check_fit(shape, unlabelled, 2, 1, 2, 4096, gpu_memory_bytes=16 * GIB)
    assert report.fits and report.gpu_memory_bytes == 16 * GIB and report.max_full_sequences > 0


def kuberay_crd(file: str, served: bool = True) -> dict:
    """A CRD of the KubeRay 1.7 release as the API server returns it (tests.chart.crd)."""
    found = crd(file)
    for version in found["spec"]["versions"]:
        version["served"] = version["served"] and served
    return found


def kuberay_1_5_crds() -> dict[str, dict]:
    """What the chart meets on KubeRay 1.5: its CRDs have no authOptions (new in 1.6). Made from the 1.7 CRDs by
    removing that field, the one of the chart's fields 1.5 lacks that matters most (token auth)."""
    service, cluster = kuberay_crd("ray.io_rayservices.yaml"), kuberay_crd("ray.io_rayclusters.yaml")
    del v1_schema(service)["properties"]["spec"]["properties"]["rayClusterConfig"]["properties"]["authOptions"]
    del v1_schema(cluster)["properties"]["spec"]["properties"]["authOptions"]
    return {"rayservices.ray.io": service, "rayclusters.ray.io": cluster}


def test_kuberay_crds_and_the_report_verdict(tmp_path):
    installed = {name: kuberay_crd(f"ray.io_{name.split('.')[0]}.yaml") for name in ("rayservices.ray.io", "rayclusters.ray.io")}
    assert crd_problems(installed) == []
    problems = crd_problems({"rayservices.ray.io": None, "rayclusters.ray.io": kuberay_crd("ray.io_rayclusters.yaml", served=False)})
    assert problems == [
        "CRD rayservices.ray.io is not installed: install the KubeRay operator 1.7 first (chart README)",
        "CRD rayclusters.ray.io does not serve v1: upgrade the KubeRay operator to 1.7",
    ]
    nodes = [GPUNode.from_node(node(f"gpu-{i}", 8)) for i in range(2)]
    fit = check_fit(shape_of(LLAMA_70B, tmp_path), nodes, 8, 2, 2, 32768)
    report = format_report(Preflight([], nodes, fit))
    assert "KubeRay CRDs: installed (ray.io/v1, every field the chart sets)" in report
    assert "gpu-0: 8 x NVIDIA-H100-80GB-HBM3 (80 GiB each)" in report
    assert report.endswith("Verdict: PASS")
    failed = format_report(Preflight(problems, nodes, fit))
    assert "KubeRay CRDs: MISSING" in failed and failed.endswith("Verdict: FAIL")


def test_an_older_operator_that_would_drop_token_auth_fails():
    assert crd_problems(kuberay_1_5_crds()) == [
        (f"CRD {name} has no {path}, which the chart sets (the API server would drop it): upgrade the KubeRay operator and its CRDs to 1.7")
        for name, path in [
            ("rayservices.ray.io", "spec.rayClusterConfig.authOptions.mode"),
            ("rayclusters.ray.io", "spec.authOptions.mode"),
        ]
    ]


def test_preflight_knows_every_field_the_chart_sets():
    """CHART_FIELDS is exactly the RayService fields of every rendered configuration, down to Kubernetes' own types."""
    rendered: set[str] = set()
    for objects in render_all().values():
        rendered |= _paths(rayservice(objects)["spec"], "spec")
    assert rendered == set(CHART_FIELDS)


_KUBERNETES_TYPES = {"template", "serveService", "resources", "securityContext", "volumeMounts", "redisPassword", "rayStartParams"}


def _paths(value: object, path: str) -> set[str]:
    if path.rsplit(".", 1)[-1] in _KUBERNETES_TYPES:
        return {path}
    if isinstance(value, list):
        return set().union(*(_paths(item, path + "[]") for item in value))
    if isinstance(value, dict):
        return set().union(*(_paths(item, f"{path}.{key}") for key, item in value.items()))
    return {path}


def test_cli_needs_all_explicit_figures_and_a_readable_kubeconfig_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["preflight", "--num-params-b", "8"])
    assert "explicit model figures need all of --num-params-b, --num-layers" in capsys.readouterr().err
    missing = tmp_path / "no-kubeconfig"
    figures = ["--num-params-b", "8", "--num-layers", "32", "--num-kv-heads", "8", "--head-dim", "128", "--max-model-len", "8192"]
    assert main(["preflight", *figures, "--kubeconfig", str(missing)]) == 1
    assert "llmcluster preflight: cannot use the kubeconfig" in capsys.readouterr().err


def test_fit_budgets_gpu_memory_as_the_engine_does():
    """cluster never imports serving, so fit.py repeats the engine's CUDA KV budget rule (serving/config.py)."""
    from cluster.k8s import fit
    from serving.config import CUDA_KV_CACHE_FRACTION, CUDA_RESERVED_GB

    assert (fit.USABLE_FRACTION, fit.RESERVED_GIB) == (CUDA_KV_CACHE_FRACTION, CUDA_RESERVED_GB)
