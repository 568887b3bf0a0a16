"""The chart as a platform team runs it: node drains, the operator's real labels, upgrades, the pod settings
every cluster asks for, placement, storage and memory. Checked offline on the rendered objects, against what
KubeRay 1.7 does with them (tests/kuberay_reality.py)."""

from __future__ import annotations

import json
import re
import shutil
from typing import Any

import pytest
import yaml

from serving.config import LLMConfig
from serving.server.api_ingress import APIIngress
from tests.chart import (
    CHART,
    EXAMPLES,
    PLATFORM,
    helm,
    pod_templates,
    rayservice,
    render,
    render_all,
    render_error,
    serve_config,
    values_file,
)
from tests.kuberay_reality import OPERATOR_PODS, cluster_name, peer_selects, rayservice_pods, selects, serve_service

NAMESPACE = "serving"  # tests.chart.render's


@pytest.fixture(scope="module")
def renders() -> dict[str, list[dict[str, Any]]]:
    return render_all()


def kinds(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pods_of(objects: list[dict[str, Any]], cluster_suffix: str = "x7k2p") -> list[dict[str, Any]]:
    service = rayservice(objects)
    return rayservice_pods(service, cluster_name(service["metadata"]["name"], cluster_suffix))


# 1. drains


def test_disruption_budgets_allow_drains_and_cover_one_group_each(renders):
    """RayClusters have no scale subresource: a budget works only with an integer minAvailable (maxUnavailable
    gives zero allowed disruptions, KubeRay issue 2662), and it must leave a disruption allowed at minReplicas."""
    seen = 0
    for name, objects in renders.items():
        pods = pods_of(objects)
        groups = {g["groupName"]: g for g in rayservice(objects)["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
        for budget in kinds(objects, "PodDisruptionBudget"):
            seen += 1
            spec = budget["spec"]
            assert "maxUnavailable" not in spec and isinstance(spec["minAvailable"], int), (name, spec)
            covered = [p for p in pods if selects(spec["selector"], p["labels"])]
            (group,) = {p["group"] for p in covered}  # one worker group, never the head
            assert group in groups and len(covered) == groups[group]["minReplicas"], (name, group)
            assert len(covered) - spec["minAvailable"] >= 1, f"{name}: {budget['metadata']['name']} allows no disruption"
    assert seen == 1  # platform's a100 group; its l4 group says minAvailable 0, every example needs all its pods
    (budget,) = kinds(renders["platform"], "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 3  # 4 pods at minReplicas: one may go


def test_a_budget_that_would_block_every_drain_is_refused(tmp_path):
    groups = [{**PLATFORM["workerGroups"][1], "minAvailable": 2}]
    message = render_error(values_file(tmp_path, {"workerGroups": groups}))
    assert (
        'workerGroups "l4": minAvailable (2) must stay below minReplicas (2), or the PodDisruptionBudget blocks every node drain' in message
    )


# 2. selectors against what KubeRay creates, for every configuration


def test_every_selector_matches_the_pods_and_services_kuberay_creates(renders):
    for name, objects in renders.items():
        service = rayservice(objects)
        pods = pods_of(objects)
        other_release = [p["labels"] | {"app.kubernetes.io/instance": "other"} for p in pods]
        (test_pod,) = kinds(objects, "Pod")

        (policy,) = kinds(objects, "NetworkPolicy")
        assert all(selects(policy["spec"]["podSelector"], p["labels"]) for p in pods), name
        assert not selects(policy["spec"]["podSelector"], test_pod["metadata"]["labels"]), name
        among_release = policy["spec"]["ingress"][0]["from"]
        assert all(any(peer_selects(peer, NAMESPACE, p["labels"], NAMESPACE) for peer in among_release) for p in pods), name
        # the operator, installed by its Helm chart or by kustomize, into the namespace the README uses
        (operator_rule,) = [r for r in policy["spec"]["ingress"] if {"port": 8265, "protocol": "TCP"} in r.get("ports", [])]
        for install, labels in OPERATOR_PODS.items():
            assert any(peer_selects(peer, "kuberay-system", labels, NAMESPACE) for peer in operator_rule["from"]), (name, install)
            assert not any(peer_selects(peer, NAMESPACE, labels, NAMESPACE) for peer in operator_rule["from"]), (name, install)

        for monitor in kinds(objects, "PodMonitor"):
            assert all(selects(monitor["spec"]["selector"], p["labels"]) for p in pods), name
            assert not selects(monitor["spec"]["selector"], test_pod["metadata"]["labels"]), name

        # the API Service: the worker pods only, on the port named serve, which the Ingress names too
        api = serve_service(service, cluster_name(service["metadata"]["name"]))
        served = [p for p in pods if selects({"matchLabels": api["spec"]["selector"]}, p["labels"])]
        assert served and all(p["labels"]["ray.io/node-type"] == "worker" for p in served), name
        assert api["spec"]["ports"] == [{"name": "serve", "port": serve_config(objects)["http_options"]["port"]}], name
        for ingress in kinds(objects, "Ingress"):
            backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
            assert backend == {"name": api["metadata"]["name"], "port": {"name": "serve"}}, name

        # required anti-affinity: the pods of its own group in this release, no one else's
        for pod in pods:
            anti = (pod["spec"].get("affinity") or {}).get("podAntiAffinity") or {}
            for term in anti.get("requiredDuringSchedulingIgnoredDuringExecution", []):
                matched = [p for p in pods if selects(term["labelSelector"], p["labels"])]
                assert {p["group"] for p in matched} == {pod["group"]}, name
                assert not any(selects(term["labelSelector"], labels) for labels in other_release), name


def test_the_network_policy_lets_the_operator_in_from_its_namespace(renders, tmp_path):
    (policy,) = kinds(render(values_file(tmp_path, {"networkPolicy": {"operatorNamespace": "ray-system"}})), "NetworkPolicy")
    rule = next(r for r in policy["spec"]["ingress"] if {"port": 8265, "protocol": "TCP"} in r.get("ports", []))
    assert rule["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/component": "kuberay-operator"}},
        }
    ]


# 3. upgrades


def test_upgrades_start_a_new_cluster_and_keep_the_old_one_while_requests_drain(renders, tmp_path):
    for name, objects in renders.items():
        spec = rayservice(objects)["spec"]
        drain = LLMConfig.model_validate(serve_config(objects)["applications"][0]["args"]).server.autoscaling.drain_timeout_s
        assert spec["upgradeStrategy"] == {"type": "NewCluster"}, name
        assert spec["rayClusterDeletionDelaySeconds"] >= drain + 30, name
        assert spec["excludeHeadPodFromServeSvc"] is True, name
    slow = render(values_file(tmp_path, {"llm": {"server": {"autoscaling": {"drain_timeout_s": 900}}}}))
    assert rayservice(slow)["spec"]["rayClusterDeletionDelaySeconds"] == 960
    fixed = render(values_file(tmp_path, {"upgrade": {"strategy": "None", "clusterDeletionDelaySeconds": 30}}))
    assert rayservice(fixed)["spec"]["upgradeStrategy"] == {"type": "None"}
    assert rayservice(fixed)["spec"]["rayClusterDeletionDelaySeconds"] == 30


# 5. pod settings


def test_pod_settings_reach_every_ray_pod(renders):
    objects = renders["platform"]
    service = rayservice(objects)
    assert service["metadata"]["labels"]["ray.io/scheduler-name"] == "volcano"  # KubeRay copies them to its RayCluster
    assert service["metadata"]["labels"]["volcano.sh/queue-name"] == "inference"
    head, a100, l4 = pod_templates(objects)
    for template, priority in [(head, "inference-high"), (a100, "inference-high"), (l4, "inference-low")]:
        spec = template["spec"]
        assert spec["serviceAccountName"] == "llm-serving"
        assert spec["priorityClassName"] == priority and spec["schedulerName"] == "volcano"
        assert template["metadata"]["labels"]["team"] == "ml-platform"
        assert template["metadata"]["annotations"] == {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"}
        container = spec["containers"][0]
        assert {"name": "NCCL_DEBUG", "value": "WARN"} in container["env"]
        assert container["envFrom"] == [{"configMapRef": {"name": "proxy-settings"}}]
        assert {"name": "ca-bundle", "mountPath": "/etc/ssl/corporate", "readOnly": True} in container["volumeMounts"]
        assert {"name": "ca-bundle", "configMap": {"name": "corporate-ca"}} in spec["volumes"]
    assert (
        head["spec"]["topologySpreadConstraints"]
        == a100["spec"]["topologySpreadConstraints"]
        == [PLATFORM["head"]["topologySpreadConstraints"][0]]
    )
    assert a100["spec"]["runtimeClassName"] == "nvidia" and "runtimeClassName" not in l4["spec"]
    assert a100["metadata"]["labels"]["gpu"] == "a100" and "gpu" not in l4["metadata"]["labels"]
    assert a100["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    # the default keeps the namespace's service account and mounts no token where nothing calls the API
    _default_head, default_worker = pod_templates(renders["default"])
    assert "serviceAccountName" not in default_worker["spec"] and default_worker["spec"]["automountServiceAccountToken"] is False


# 6. placement


def test_api_replicas_reserve_cpu_so_they_stay_off_the_head(renders):
    assert APIIngress.name == "APIIngress"  # the deployment the serveConfigV2 entry overrides
    for name, objects in renders.items():
        config = serve_config(objects)
        (api,) = [d for d in config["applications"][0]["deployments"] if d["name"] == "APIIngress"]
        assert api["ray_actor_options"]["num_cpus"] > 0 and api["num_replicas"] >= 1, name
        head = rayservice(objects)["spec"]["rayClusterConfig"]["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == "0", name  # nothing that reserves a CPU lands there
    assert serve_config(renders["default"])["applications"][0]["deployments"][0]["num_replicas"] == 2


# 7. storage and memory


def quantity(value: str | int) -> float:
    units = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units[unit]


def test_root_filesystems_are_read_only_with_writable_scratch_and_sized_disks(renders):
    for name, objects in renders.items():
        for i, template in enumerate(pod_templates(objects)):
            spec = template["spec"]
            assert spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch", name
            volumes = {v["name"]: v for v in spec["volumes"]}
            containers = spec["containers"] + spec.get("initContainers", [])
            for container in containers:
                assert container["securityContext"]["readOnlyRootFilesystem"] is True, (name, container["name"])
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                assert mounts["/tmp"] == "tmp" and mounts["/home/ray"] == "home", (name, container["name"])
            ray = spec["containers"][0]
            disk = sum(quantity(volumes[v]["emptyDir"]["sizeLimit"]) for v in ("tmp", "home"))
            if i and "emptyDir" in volumes["model-cache"]:
                disk += quantity(volumes["model-cache"]["emptyDir"]["sizeLimit"])
            assert quantity(ray["resources"]["requests"]["ephemeral-storage"]) >= disk, (name, i)
        autoscaler = rayservice(objects)["spec"]["rayClusterConfig"].get("autoscalerOptions")
        if autoscaler:
            assert {m["mountPath"] for m in autoscaler["volumeMounts"]} == {"/tmp", "/home/ray"}, name


def test_shared_memory_holds_rays_object_store_on_head_and_workers(renders):
    """Ray's object store lives in /dev/shm; smaller than the store, Ray puts objects on disk instead."""
    for name, objects in renders.items():
        config = rayservice(objects)["spec"]["rayClusterConfig"]
        groups = [config["headGroupSpec"], *config["workerGroupSpecs"]]
        for group in groups:
            spec = group["template"]["spec"]
            (shm,) = [v for v in spec["volumes"] if v["name"] == "shm"]
            assert shm["emptyDir"]["medium"] == "Memory"
            assert {"name": "shm", "mountPath": "/dev/shm"} in spec["containers"][0]["volumeMounts"], name
            store = int(group["rayStartParams"]["object-store-memory"])
            memory = quantity(spec["containers"][0]["resources"]["limits"]["memory"])
            assert store <= quantity(shm["emptyDir"]["sizeLimit"]) <= memory, (name, group.get("groupName", "head"))
            if not (name == "platform" and group is groups[0]):  # that head sets object-store-memory itself
                assert store == int(0.3 * memory), name  # Ray's own default share of the pod's memory
    platform_head = rayservice(renders["platform"])["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert platform_head["rayStartParams"]["object-store-memory"] == "2000000000"


def test_too_little_shared_memory_is_refused(tmp_path):
    demo = yaml.safe_load((CHART / "examples" / "cpu-demo.yaml").read_text())
    demo["workerGroups"][0]["sharedMemory"] = "1Gi"
    message = render_error(values_file(tmp_path, demo))
    assert "workerGroups[0].sharedMemory (1Gi) is smaller than Ray's object store (1932735283 bytes" in message


def test_the_object_store_download_takes_an_s3_compatible_endpoint(renders):
    (init,) = pod_templates(renders["platform"])[1]["spec"]["initContainers"]
    env = {e["name"]: e["value"] for e in init["env"]}
    assert [e["name"] for e in init["env"]].count("RCLONE_S3_PROVIDER") == 1
    assert env["RCLONE_S3_PROVIDER"] == "Minio" and env["RCLONE_S3_ENDPOINT"] == "http://minio:9000"
    assert env["RCLONE_S3_ENV_AUTH"] == "true" and env["RCLONE_CONFIG"].startswith("/tmp/")


# 8. smaller


def test_the_dashboard_filters_by_namespace_and_release(renders):
    dashboard = json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "label_values(llmcluster_replica_info, namespace)" in variables["namespace"]["query"]
    assert "app_kubernetes_io_instance" in variables["release"]["query"]
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    for expr in exprs:
        for selector in re.findall(r"llmcluster_\w+(\{[^}]*\})?", expr):
            assert 'namespace=~"$namespace"' in selector and 'app_kubernetes_io_instance=~"$release"' in selector, expr
    # the release label comes from the PodMonitor
    (monitor,) = kinds(renders["everything-on"], "PodMonitor")
    assert monitor["spec"]["podTargetLabels"] == ["app.kubernetes.io/instance"]


def test_the_pipeline_stages_must_fit_the_worker_groups(tmp_path):
    big = CHART / "examples" / "llama-70b-tp8-pp2.yaml"
    values = yaml.safe_load(big.read_text())
    values["workerGroups"][0]["maxReplicas"] = 1
    values["workerGroups"][0]["minReplicas"] = 1
    message = render_error(values_file(tmp_path, values))
    assert (
        "the GPU worker groups hold 1 stage(s) of tensor_parallel=8 GPUs at their maxReplicas; llm.server.min_replicas=1 "
        "replica(s) of pipeline_parallel=2 need 2" in message
    )


@pytest.mark.parametrize("address", ["redis:6379", "redis://redis.ray-system:6379", "rediss://redis.example:6380"])
def test_redis_addresses_with_and_without_tls(tmp_path, address):
    objects = render(values_file(tmp_path, {"gcsFaultTolerance": {"enabled": True, "redisAddress": address}}))
    assert rayservice(objects)["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"] == address


def test_an_open_api_says_so_loudly(tmp_path):
    # `helm template` skips NOTES.txt and `helm install --dry-run` needs a cluster: a copy of the chart renders
    # the notes as a YAML string
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    text = (chart / "templates" / "NOTES.txt").read_text()
    wrapper = '{{- define "notes" -}}\n' + text + '\n{{- end }}\nnotes: |\n{{ include "notes" . | indent 2 }}\n'
    (chart / "templates" / "notes-as-rendered.yaml").write_text(wrapper)

    def notes(values: dict[str, Any]) -> str:
        args = ["template", "llm", str(chart), "--namespace", NAMESPACE, "--show-only", "templates/notes-as-rendered.yaml"]
        result = helm(*args, "-f", str(values_file(tmp_path, values)))
        assert result.returncode == 0, result.stderr
        return yaml.safe_load(result.stdout)["notes"]

    assert "WARNING: THE API IS OPEN" in notes({})
    assert "the NetworkPolicy is off" in notes({"networkPolicy": {"enabled": False}})
    assert "WARNING" not in notes({"api": {"apiKeys": {"existingSecret": "keys"}}})
    gateway = [{"podSelector": {"matchLabels": {"role": "gateway"}}}]
    assert "WARNING" not in notes({"networkPolicy": {"apiFrom": gateway}})


def test_every_example_renders_with_each_release_name(tmp_path):
    """The anti-affinity and budgets are release-scoped: two releases of one example select disjoint pods."""
    for example in EXAMPLES:
        first, second = render(example, release="blue"), render(example, release="green")
        first_pods, second_pods = pods_of(first), pods_of(second, "q9w8e")
        for budget in kinds(first, "PodDisruptionBudget"):
            assert not any(selects(budget["spec"]["selector"], p["labels"]) for p in second_pods)
        for pod in first_pods:
            anti = (pod["spec"].get("affinity") or {}).get("podAntiAffinity") or {}
            for term in anti.get("requiredDuringSchedulingIgnoredDuringExecution", []):
                assert not any(selects(term["labelSelector"], p["labels"]) for p in second_pods), example.stem
