"""`llmcluster status --kubernetes`: the RayService's conditions, its Ray pods and the Serve applications."""

from __future__ import annotations

from typing import Any

from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi, V1Pod
from kubernetes.client.exceptions import ApiException

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"
# The chart's RayService carries its chart's name here whatever nameOverride makes of app.kubernetes.io/name.
CHART_SELECTOR = "app.kubernetes.io/part-of=llm-cluster"


def find_rayservice(client: ApiClient, namespace: str, name: str | None) -> dict[str, Any]:
    """The RayService `name`, or the only one the chart created in `namespace`."""
    api = CustomObjectsApi(client)
    try:
        if name:
            return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        found = api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, label_selector=CHART_SELECTOR)["items"]
    except ApiException as error:
        if error.status == 404:
            what = f"RayService {name!r}" if name else "the RayService resource (is KubeRay installed?)"
            raise RuntimeError(f"{what} not found in namespace {namespace}") from error
        raise RuntimeError(f"cannot read RayServices in {namespace}: {error.status} {error.reason}") from error
    if len(found) != 1:
        names = ", ".join(item["metadata"]["name"] for item in found) or "none"
        raise RuntimeError(f"{len(found)} llm-cluster RayServices in namespace {namespace} ({names}); pass --name")
    return found[0]


def ray_pods(client: ApiClient, namespace: str, cluster_name: str) -> list[V1Pod]:
    return CoreV1Api(client).list_namespaced_pod(namespace, label_selector=f"ray.io/cluster={cluster_name}").items


def format_status(service: dict[str, Any], pods: list[V1Pod]) -> str:
    meta, status = service["metadata"], service.get("status") or {}
    endpoints = status.get("numServeEndpoints", 0)
    lines = [f"RayService {meta['namespace']}/{meta['name']}: {_ready(status)}, {endpoints} pod(s) serving the API"]
    for condition in status.get("conditions") or []:
        reason = f" ({condition['reason']})" if condition.get("reason") else ""
        message = f": {condition['message']}" if condition.get("message") else ""
        lines.append(f"  condition {condition['type']}={condition['status']}{reason}{message}")
    for role in ("activeServiceStatus", "pendingServiceStatus"):
        part = status.get(role) or {}
        if not part.get("rayClusterName"):
            continue
        lines.append(f"{'Active' if role.startswith('active') else 'Pending'} Ray cluster {part['rayClusterName']}")
        for app_name, app in (part.get("applicationStatuses") or {}).items():
            lines.append(f"  Serve application {app_name}: {app.get('status', 'UNKNOWN')}" + _message(app))
            for name, deployment in (app.get("serveDeploymentStatuses") or {}).items():
                lines.append(f"    {name}: {deployment.get('status', 'UNKNOWN')}" + _message(deployment))
    lines.append(f"Pods: {len(pods)}")
    for pod in sorted(pods, key=lambda p: (p.metadata.labels.get("ray.io/node-type", ""), p.metadata.name)):
        lines.append("  " + _pod_line(pod))
    return "\n".join(lines)


def _ready(status: dict[str, Any]) -> str:
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    return "Ready" if ready and ready[0].get("status") == "True" else "not ready"


def _message(item: dict[str, Any]) -> str:
    return f" ({item['message'].strip()})" if item.get("message") else ""


def _pod_line(pod: V1Pod) -> str:
    statuses = (pod.status.container_statuses if pod.status else None) or []
    ready = sum(1 for s in statuses if s.ready)
    restarts = sum(s.restart_count for s in statuses)
    waiting = [s.state.waiting.reason for s in statuses if s.state and s.state.waiting and s.state.waiting.reason]
    phase = waiting[0] if waiting else (pod.status.phase if pod.status else "Unknown")
    node_type = pod.metadata.labels.get("ray.io/node-type", "?")
    group = pod.metadata.labels.get("ray.io/group", "")
    where = f" on {pod.spec.node_name}" if pod.spec and pod.spec.node_name else ""
    return f"{pod.metadata.name} [{node_type} {group}]: {phase}, {ready}/{len(statuses)} ready, {restarts} restarts{where}"
