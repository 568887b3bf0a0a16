"""Rendering the Helm chart for the tests: `helm template` with values files, parsed into objects."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "llm-cluster"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
# The KubeRay v1.7.0 CRDs (ray.io_rayservices.yaml, ray.io_rayclusters.yaml): $LLM_CLUSTER_KUBERAY_CRDS, a
# path relative to the repository's root, by default the shared folder beside the checkout.
CRDS_SETTING = "LLM_CLUSTER_KUBERAY_CRDS"
CRD_FILES = ("ray.io_rayservices.yaml", "ray.io_rayclusters.yaml")


def crds_folder(environ: Mapping[str, str] = os.environ) -> Path:
    return (ROOT / environ.get(CRDS_SETTING, "../shared/kuberay-crds")).resolve()


CRDS = crds_folder()


def helm_binary() -> str:
    """The helm that scripts/install_helm.sh puts into the venv, else one on PATH."""
    found = shutil.which("helm", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        raise RuntimeError("helm is not installed: run scripts/install_helm.sh")
    return found


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], check=False, capture_output=True, text=True, timeout=120)


def values_file(tmp_path: Path, values: dict[str, Any], name: str = "values.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def render(*values_files: Path, release: str = "llm", show_only: str | None = None) -> list[dict[str, Any]]:
    """The objects `helm template` renders (hooks such as the test pod included); raises with helm's message."""
    args = ["template", release, str(CHART), "--namespace", "serving"]
    for path in values_files:
        args += ["-f", str(path)]
    if show_only:
        args += ["--show-only", show_only]
    result = helm(*args)
    if result.returncode != 0:
        raise RenderError(result.stderr.strip())
    return [doc for doc in yaml.load_all(result.stdout, Loader=yaml.CSafeLoader) if doc]


def render_error(*values_files: Path) -> str:
    """helm's error message for values that must not render."""
    try:
        render(*values_files)
    except RenderError as error:
        return str(error)
    raise AssertionError("the chart rendered values that should have been refused")


def serve_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The RayService's serveConfigV2, parsed."""
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    return yaml.safe_load(service["spec"]["serveConfigV2"])


class RenderError(Exception):
    pass


def crd(file: str) -> dict[str, Any]:
    """A KubeRay CRD as the API server holds it (a copy to change at will); skips the test, saying where to get
    the CRDs, when they are missing."""
    path = CRDS / file
    if not path.is_file():
        pytest.skip(
            f"KubeRay CRD {file} not found in {CRDS}: set {CRDS_SETTING} to a folder with {' and '.join(CRD_FILES)} "
            "from KubeRay v1.7.0 (ray-operator/config/crd/bases/ of the ray-project/kuberay repository at tag v1.7.0)"
        )
    return copy.deepcopy(_load_crd(path))


@cache
def _load_crd(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=yaml.CSafeLoader)  # 17k lines: libyaml, not pure Python


def crd_schemas() -> tuple[dict[str, Any], dict[str, Any]]:
    """RayService's schema and RayCluster's spec schema (ray.io/v1), with unknown fields rejected as the
    API server prunes them: every object schema that lists properties gets additionalProperties: false."""
    for file in CRD_FILES:
        crd(file)  # skips the test when missing
    return _closed_schemas(CRDS)


@cache
def _closed_schemas(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    def schema(file: str) -> dict[str, Any]:
        return _closed(v1_schema(_load_crd(folder / file)))

    return schema("ray.io_rayservices.yaml"), schema("ray.io_rayclusters.yaml")["properties"]["spec"]


def v1_schema(crd: dict[str, Any]) -> dict[str, Any]:
    """The openAPIV3Schema of a CRD's ray.io/v1 version."""
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _closed(node: Any) -> Any:
    if isinstance(node, list):
        return [_closed(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _closed(value) for key, value in node.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


# Values sets that, with the defaults and the examples, switch every part of the chart on.
OBJECT_STORE = {
    "model": {"type": "objectStore", "objectStore": {"uri": "s3://models/llama-3.1-8b", "credentialsSecret": "s3-creds"}},
    "modelCache": {"type": "pvc", "pvc": {"existingClaim": "shared-cache"}},
    "llm": {"parallel": {"tensor_parallel": 1}},
}
PROMETHEUS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
EVERYTHING_ON = {
    "api": {"ingress": {"enabled": True}, "apiKeys": {"existingSecret": "keys"}},
    "llm": {"server": {"port": 9000, "app_name": "chat"}},
    "monitoring": {name: {"enabled": True} for name in ("podMonitor", "prometheusRule", "grafanaDashboard")},
    "networkPolicy": {"metricsFrom": PROMETHEUS, "apiFrom": [{"podSelector": {"matchLabels": {"role": "gateway"}}}]},
    "gcsFaultTolerance": {"enabled": True, "redisAddress": "rediss://redis.example:6380"},
    "modelCache": {"type": "pvc"},
}
# The pod settings a platform team sets: identity, scheduling, placement, extra environment and volumes,
# gang scheduling, an S3-compatible store, and worker groups with pods to spare (PodDisruptionBudgets).
SPREAD = {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}
PLATFORM = {
    "model": {"type": "objectStore", "objectStore": {"uri": "s3://models/llama", "env": {"RCLONE_S3_PROVIDER": "Minio", "RCLONE_S3_ENDPOINT": "http://minio:9000"}}},
    "llm": {"parallel": {"tensor_parallel": 2, "pipeline_parallel": 2}, "server": {"min_replicas": 2, "max_replicas": 3}},
    "rayService": {"labels": {"ray.io/scheduler-name": "volcano", "volcano.sh/queue-name": "inference"}},
    "serviceAccountName": "llm-serving",
    "podLabels": {"team": "ml-platform"},
    "podAnnotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
    "priorityClassName": "inference-high",
    "schedulerName": "volcano",
    "extraEnv": [{"name": "NCCL_DEBUG", "value": "WARN"}],
    "extraEnvFrom": [{"configMapRef": {"name": "proxy-settings"}}],
    "extraVolumes": [{"name": "ca-bundle", "configMap": {"name": "corporate-ca"}}],
    "extraVolumeMounts": [{"name": "ca-bundle", "mountPath": "/etc/ssl/corporate", "readOnly": True}],
    "head": {"topologySpreadConstraints": [SPREAD], "sharedMemory": "8Gi", "rayStartParams": {"object-store-memory": "2000000000"}},
    "workerGroups": [
        {
            "name": "a100", "gpus": 4, "minReplicas": 4, "maxReplicas": 6, "spreadAcrossNodes": True,
            "resources": {"requests": {"cpu": "32", "memory": "256Gi"}, "limits": {"cpu": "32", "memory": "256Gi"}},
            "runtimeClassName": "nvidia", "podLabels": {"gpu": "a100"}, "topologySpreadConstraints": [SPREAD],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
        },
        {
            "name": "l4", "gpus": 2, "minReplicas": 2, "maxReplicas": 2, "minAvailable": 0,
            "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"cpu": "8", "memory": "64Gi"}},
            "priorityClassName": "inference-low",
        },
    ],
}  # fmt: skip


def render_all() -> dict[str, list[dict[str, Any]]]:
    """Every configuration the tests look at: defaults, each example, and three that switch the rest on (rendered
    once per test session; each caller gets its own copy)."""
    return copy.deepcopy(_render_all())


@cache
def _render_all() -> dict[str, list[dict[str, Any]]]:
    out = {"default": render()}
    out.update({path.stem: render(path) for path in EXAMPLES})
    with tempfile.TemporaryDirectory() as tmp:
        for name, values in [("object-store", OBJECT_STORE), ("everything-on", EVERYTHING_ON), ("platform", PLATFORM)]:
            out[name] = render(values_file(Path(tmp), values, f"{name}.yaml"))
    return out


def rayservice(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (service,) = [o for o in objects if o["kind"] == "RayService"]
    return service


def pod_templates(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The head's pod template, then each worker group's."""
    cluster = rayservice(objects)["spec"]["rayClusterConfig"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
