"""The CRDs' CEL rules on every rendered RayService, and `helm upgrade` between two values sets: what KubeRay 1.7
does with each kind of change (tests/kuberay_reality.py) and that the upgrade keeps serving throughout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.config import LLMConfig
from tests.chart import CHART, crd, rayservice, render, render_all, serve_config, v1_schema, values_file
from tests.kuberay_cel import violations
from tests.kuberay_reality import cluster_action

EXAMPLE = CHART / "examples" / "llama-8b-tp2.yaml"


@pytest.fixture(scope="module")
def rayservice_schema() -> dict[str, Any]:
    return v1_schema(crd("ray.io_rayservices.yaml"))


def test_every_rendered_rayservice_passes_the_crds_cel_rules(rayservice_schema):
    cluster_schema = v1_schema(crd("ray.io_rayclusters.yaml"))["properties"]["spec"]
    for name, objects in render_all().items():
        service = rayservice(objects)
        assert violations(rayservice_schema, service) == [], name
        assert violations(cluster_schema, service["spec"]["rayClusterConfig"]) == [], name  # the RayCluster KubeRay makes


def test_the_cel_rules_catch_what_they_are_for(rayservice_schema):
    service = rayservice(render())
    managed = {**service, "spec": {**service["spec"], "managedBy": "someone-else"}}
    assert violations(rayservice_schema, managed) == [
        ".spec.managedBy: the managedBy field value must be either 'ray.io/kuberay-operator' or 'kueue.x-k8s.io/multikueue'"
    ]
    redis, rocksdb = (
        {**service, "spec": {**service["spec"], "rayClusterConfig": {**service["spec"]["rayClusterConfig"], "gcsFaultToleranceOptions": {"backend": b}}}}
        for b in ("redis", "rocksdb")
    )  # fmt: skip
    assert violations(rayservice_schema, rocksdb) == []  # on create, transition rules do not apply
    assert violations(rayservice_schema, rocksdb, redis) == [
        ".spec.rayClusterConfig.gcsFaultToleranceOptions.backend: gcsFaultToleranceOptions.backend is immutable"
    ]


def _upgrade(tmp_path: Path, change: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The RayService before and after `helm upgrade` of the 8B example with `change` added."""
    return rayservice(render(EXAMPLE)), rayservice(render(EXAMPLE, values_file(tmp_path, change)))


UPGRADES = {
    # only the Serve application's arguments: Serve rolls its replicas on the running cluster
    "llm-engine": ({"llm": {"engine": {"max_num_seqs": 64}}}, "DoNothing", True),
    "api-replicas": ({"api": {"replicas": 3}}, "DoNothing", True),
    # pod counts: left out of KubeRay's cluster hash
    "max-replicas": ({"workerGroups": [{**yaml.safe_load(EXAMPLE.read_text())["workerGroups"][0], "maxReplicas": 8}]}, "DoNothing", False),
    # a worker group appended: added to the running cluster
    "add-group": (
        {"workerGroups": [*yaml.safe_load(EXAMPLE.read_text())["workerGroups"], {"name": "h100", "gpus": 2, "minReplicas": 0, "maxReplicas": 2,
         "resources": {"requests": {"cpu": "16", "memory": "96Gi"}, "limits": {"cpu": "16", "memory": "96Gi"}}}]},
        "Update", False,
    ),
    # anything else in the cluster: a second cluster, traffic moved once it serves
    "image": ({"image": {"tag": "0.2.0"}}, "RolloutNew", False),
    "worker-memory": (
        {"workerGroups": [{**yaml.safe_load(EXAMPLE.read_text())["workerGroups"][0], "resources": {"requests": {"cpu": "16", "memory": "128Gi"}, "limits": {"cpu": "16", "memory": "128Gi"}}}]},
        "RolloutNew", False,
    ),
}  # fmt: skip


@pytest.mark.parametrize("change", UPGRADES, ids=list(UPGRADES))
def test_helm_upgrade_renders_what_a_zero_downtime_upgrade_needs(change, tmp_path, rayservice_schema):
    values, action, serve_changes = UPGRADES[change]
    old, new = _upgrade(tmp_path, values)
    assert cluster_action(old["spec"]["rayClusterConfig"], new["spec"]["rayClusterConfig"]) == action
    assert (old["spec"]["serveConfigV2"] != new["spec"]["serveConfigV2"]) is serve_changes
    assert violations(rayservice_schema, new, old) == []  # the API server accepts the update
    # what keeps it serving: a new cluster rather than pods recreated in place, the old one kept until the API
    # replicas drained their streams, and the API Service under the same name for clients and the Ingress
    spec = new["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    drain = LLMConfig.model_validate(serve_config([new])["applications"][0]["args"]).server.autoscaling.drain_timeout_s
    assert spec["rayClusterDeletionDelaySeconds"] > drain
    assert spec["serveService"]["metadata"]["name"] == old["spec"]["serveService"]["metadata"]["name"]


def test_the_classifier_follows_kuberay():
    spec = rayservice(render())["spec"]["rayClusterConfig"]
    changed = yaml.safe_load(yaml.safe_dump(spec))
    changed["workerGroupSpecs"][0]["replicas"] = 5
    changed["workerGroupSpecs"][0]["scaleStrategy"] = {"workersToDelete": ["pod-a"]}
    assert cluster_action(spec, changed) == "DoNothing"
    changed["headGroupSpec"]["rayStartParams"]["num-cpus"] = "1"
    assert cluster_action(spec, changed) == "RolloutNew"
