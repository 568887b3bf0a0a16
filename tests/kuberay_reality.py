"""What KubeRay 1.7 itself does to the objects the chart hands it, written down once as test data.

From the KubeRay operator's source (ray-project/kuberay, ray-operator/, release 1.7):
- controllers/ray/common/pod.go `labelPod`: the labels of every Ray pod. KubeRay sets the ones in
  `pod_labels` below; the pod template's labels are applied over them, except ray.io/node-type,
  ray.io/group and ray.io/cluster, which KubeRay keeps.
- controllers/ray/common/service.go `BuildServeService`: the Serve Service of a RayService selects
  ray.io/cluster=<cluster> and ray.io/serve=true whatever selector it was given, and keeps only the port
  named "serve" (numbered as the head container's port of that name).
- controllers/ray/rayservice_controller.go `updateHeadPodServeLabel`: pods start with ray.io/serve=true;
  the head's label is "false" when excludeHeadPodFromServeSvc is set (else its proxy's health).
- controllers/ray/rayservice_controller.go: a RayService's RayCluster is named <rayservice>-<5 random
  characters>; the head group is "headgroup".
- controllers/ray/networkpolicy_controller.go: the operator's pods carry app.kubernetes.io/component:
  kuberay-operator under both installs, while app.kubernetes.io/name is "kuberay-operator" (Helm chart)
  or "kuberay" (kustomize).
"""

from __future__ import annotations

from typing import Any

HEAD_GROUP = "headgroup"
KEPT_BY_KUBERAY = ("ray.io/node-type", "ray.io/group", "ray.io/cluster")
OPERATOR_PODS = {
    "helm": {
        "app.kubernetes.io/name": "kuberay-operator",
        "app.kubernetes.io/instance": "kuberay-operator",
        "app.kubernetes.io/component": "kuberay-operator",
    },
    "kustomize": {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"},
}


def cluster_name(rayservice: str, suffix: str = "x7k2p") -> str:
    return f"{rayservice}-{suffix}"


def pod_labels(template_labels: dict[str, str], node_type: str, cluster: str, group: str) -> dict[str, str]:
    """The labels a Ray pod ends up with."""
    labels = {
        "ray.io/is-ray-node": "yes",
        "ray.io/cluster": cluster,
        "ray.io/node-type": node_type,
        "ray.io/group": group,
        "ray.io/identifier": f"{cluster}-{node_type}",
        "app.kubernetes.io/name": "kuberay",
        "app.kubernetes.io/created-by": "kuberay-operator",
    }
    labels.update({k: v for k, v in template_labels.items() if k not in KEPT_BY_KUBERAY})
    return labels


def rayservice_pods(service: dict[str, Any], cluster: str) -> list[dict[str, Any]]:
    """The pods (metadata.labels, spec) of a RayService's cluster with every group at minReplicas (at least one),
    ray.io/serve as the RayService controller sets it."""
    spec = service["spec"]
    config = spec["rayClusterConfig"]
    head_template = config["headGroupSpec"]["template"]
    head = pod_labels(head_template["metadata"]["labels"], "head", cluster, HEAD_GROUP)
    head["ray.io/serve"] = "false" if spec.get("excludeHeadPodFromServeSvc") else "true"
    pods = [{"labels": head, "spec": head_template["spec"], "group": HEAD_GROUP}]
    for group in config["workerGroupSpecs"]:
        for _ in range(max(group["minReplicas"], 1)):
            labels = pod_labels(group["template"]["metadata"]["labels"], "worker", cluster, group["groupName"])
            pods.append({"labels": labels | {"ray.io/serve": "true"}, "spec": group["template"]["spec"], "group": group["groupName"]})
    return pods


def serve_service(service: dict[str, Any], cluster: str) -> dict[str, Any]:
    """The API Service KubeRay creates from the RayService's serveService."""
    declared = service["spec"]["serveService"]
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    serve_ports = [p for p in head.get("ports", []) if p.get("name") == "serve"]
    if serve_ports:
        ports = [{"name": "serve", "port": serve_ports[0]["containerPort"]}]
    else:
        ports = [{"name": p["name"], "port": p["port"]} for p in declared["spec"]["ports"] if p.get("name") == "serve"]
    return {
        "metadata": declared["metadata"],
        "spec": {**declared["spec"], "selector": {"ray.io/cluster": cluster, "ray.io/serve": "true"}, "ports": ports},
    }


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Does a Kubernetes LabelSelector (matchLabels and matchExpressions) select these labels?"""
    if not selector.get("matchLabels") and not selector.get("matchExpressions"):
        return True
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        present = key in labels
        if operator == "In" and not (present and labels[key] in values):
            return False
        if operator == "NotIn" and present and labels[key] in values:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def peer_selects(peer: dict[str, Any], pod_namespace: str, pod: dict[str, str], policy_namespace: str) -> bool:
    """Does a NetworkPolicyPeer (pod and namespace selectors) admit a pod of that namespace?"""
    namespace_labels = {"kubernetes.io/metadata.name": pod_namespace}
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespace_labels):
            return False
    elif pod_namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector") or {}, pod)


def cluster_action(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What KubeRay does with its running RayCluster when a RayService's rayClusterConfig goes from `old` to `new`
    (rayservice_controller.go `getClusterAction`): "DoNothing" when they differ at most in the worker groups'
    replicas, minReplicas, maxReplicas and workersToDelete; "Update" when, besides those, worker groups were
    only appended; else "RolloutNew" (a new cluster next to the old one, with upgradeStrategy NewCluster)."""

    def without_counts(spec: dict[str, Any], groups: int | None = None) -> dict[str, Any]:
        spec = {**spec, "workerGroupSpecs": [dict(g) for g in spec.get("workerGroupSpecs", [])][:groups]}
        for group in spec["workerGroupSpecs"]:
            for field in ("replicas", "minReplicas", "maxReplicas"):
                group.pop(field, None)
            strategy = {k: v for k, v in (group.pop("scaleStrategy", None) or {}).items() if k != "workersToDelete"}
            if strategy:  # an empty scaleStrategy is no scaleStrategy (a struct in KubeRay's Go types)
                group["scaleStrategy"] = strategy
        return spec

    if without_counts(old) == without_counts(new):
        return "DoNothing"
    appended = len(new.get("workerGroupSpecs", [])) > len(old.get("workerGroupSpecs", []))
    if appended and without_counts(old) == without_counts(new, len(old.get("workerGroupSpecs", []))):
        return "Update"
    return "RolloutNew"
