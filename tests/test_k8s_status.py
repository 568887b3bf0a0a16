"""`llmcluster status --kubernetes`'s report, from a RayService as KubeRay 1.7 reports it (checked against
the CRD's schema) and the client's V1Pod objects built here; there is no API server on these machines."""

from __future__ import annotations

import jsonschema
from kubernetes.client import V1ContainerState, V1ContainerStateWaiting, V1ContainerStatus, V1ObjectMeta, V1Pod, V1PodSpec, V1PodStatus

from cluster.k8s.status import CHART_SELECTOR, format_status
from tests.chart import crd_schemas, render, values_file
from tests.chart import rayservice as rendered_rayservice

CLUSTER = "llm-llm-cluster-w8xkq"


def rayservice(ready: bool) -> dict:
    app = {
        "status": "RUNNING" if ready else "DEPLOYING",
        "message": "" if ready else "Deploying app 'llm'. Waiting for LLMDeployment to be ready.",
        "serveDeploymentStatuses": {
            "APIIngress": {"status": "HEALTHY"},
            "LLMDeployment": {"status": "HEALTHY" if ready else "UPDATING", "message": "" if ready else "1 replica starting"},
        },
    }
    condition = {
        "type": "Ready",
        "status": str(ready),
        "reason": "NonZeroServeEndpoints" if ready else "Initializing",
        "message": "" if ready else "waiting for the Serve applications",
        "lastTransitionTime": "2026-11-26T09:00:00Z",
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "llm-llm-cluster", "namespace": "serving"},
        "spec": {"rayClusterConfig": {"headGroupSpec": {"template": {"spec": {"containers": []}}}}},
        "status": {
            "conditions": [condition],
            "numServeEndpoints": 2 if ready else 0,
            "activeServiceStatus": {"rayClusterName": CLUSTER, "applicationStatuses": {"llm": app}},
            "serviceStatus": "Running" if ready else "",
        },
    }


def pod(name: str, node_type: str, group: str, ready: bool, waiting: str | None = None, restarts: int = 0) -> V1Pod:
    state = V1ContainerState(waiting=V1ContainerStateWaiting(reason=waiting)) if waiting else V1ContainerState()
    container = V1ContainerStatus(
        name=f"ray-{node_type}", ready=ready, restart_count=restarts, image="llm-cluster:0.1.0", image_id="", state=state
    )
    labels = {"ray.io/cluster": CLUSTER, "ray.io/node-type": node_type, "ray.io/group": group}
    return V1Pod(
        metadata=V1ObjectMeta(name=name, namespace="serving", labels=labels),
        spec=V1PodSpec(containers=[], node_name=f"node-{name[-1]}"),
        status=V1PodStatus(phase="Running" if not waiting else "Pending", container_statuses=[container]),
    )


def test_the_fixture_is_what_kuberay_reports():
    service_schema, _ = crd_schemas()
    for ready in (True, False):
        jsonschema.Draft7Validator(service_schema).validate(rayservice(ready))


def test_running_service():
    pods = [pod(f"{CLUSTER}-gpu-worker-{i}", "worker", "gpu", True) for i in range(2)] + [
        pod(f"{CLUSTER}-head-0", "head", "headgroup", True)
    ]
    report = format_status(rayservice(True), pods)
    assert report.splitlines() == [
        "RayService serving/llm-llm-cluster: Ready, 2 pod(s) serving the API",
        "  condition Ready=True (NonZeroServeEndpoints)",
        f"Active Ray cluster {CLUSTER}",
        "  Serve application llm: RUNNING",
        "    APIIngress: HEALTHY",
        "    LLMDeployment: HEALTHY",
        "Pods: 3",
        f"  {CLUSTER}-head-0 [head headgroup]: Running, 1/1 ready, 0 restarts on node-0",
        f"  {CLUSTER}-gpu-worker-0 [worker gpu]: Running, 1/1 ready, 0 restarts on node-0",
        f"  {CLUSTER}-gpu-worker-1 [worker gpu]: Running, 1/1 ready, 0 restarts on node-1",
    ]


def test_starting_service_says_what_it_waits_for():
    pods = [
        pod(f"{CLUSTER}-head-0", "head", "headgroup", True),
        pod(f"{CLUSTER}-gpu-worker-1", "worker", "gpu", False, waiting="ImagePullBackOff", restarts=2),
    ]
    report = format_status(rayservice(False), pods)
    assert "RayService serving/llm-llm-cluster: not ready, 0 pod(s) serving the API" in report
    assert "condition Ready=False (Initializing): waiting for the Serve applications" in report
    assert "Serve application llm: DEPLOYING (Deploying app 'llm'. Waiting for LLMDeployment to be ready.)" in report
    assert "LLMDeployment: UPDATING (1 replica starting)" in report
    assert f"{CLUSTER}-gpu-worker-1 [worker gpu]: ImagePullBackOff, 0/1 ready, 2 restarts on node-1" in report


def test_the_chart_selector_finds_the_rayservice_whatever_its_names(tmp_path):
    key, value = CHART_SELECTOR.split("=")
    for values in ({}, {"nameOverride": "chat"}, {"fullnameOverride": "prod-llm"}):
        labels = rendered_rayservice(render(values_file(tmp_path, values)))["metadata"]["labels"]
        assert labels.get(key) == value, values
