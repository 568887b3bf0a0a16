"""The Helm chart: lint, render, validate against Kubernetes, KubeRay's CRDs and Ray Serve's schema,
and refuse bad values with a readable message. No cluster needed; helm comes from scripts/install_helm.sh."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from cluster.ray_settings import RAY_NODE_ENV, RAY_START_PARAMS
from serving.config import LLMConfig, ServerConfig
from serving.server.replica_resources import replica_actor_options
from serving.server.serve_env import SERVE_CONTROLLER_ENV
from tests.chart import (
    CHART,
    EXAMPLES,
    PROMETHEUS,
    ROOT,
    crd_schemas,
    helm,
    pod_templates,
    rayservice,
    render,
    render_all,
    render_error,
    serve_config,
    values_file,
)

CUSTOM_GROUPS = ("ray.io/", "monitoring.coreos.com/")


@pytest.fixture(scope="module")
def renders() -> dict[str, list[dict[str, Any]]]:
    return render_all()


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} == {"cpu-demo", "llama-8b-tp2", "llama-70b-tp8-pp2"}


@pytest.mark.parametrize("values", [None, *EXAMPLES], ids=lambda v: v.stem if v else "default")
def test_lint_strict(values):
    result = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("version", ["1.30.0", "1.35.0"])
def test_builtin_objects_pass_kubernetes_validate(renders, version):
    kinds = set()
    for name, objects in renders.items():
        for obj in objects:
            if obj["apiVersion"].startswith(CUSTOM_GROUPS):
                continue
            kinds.add(obj["kind"])
            _k8s_validate(obj, version, f"{name}: {obj['kind']} {obj['metadata']['name']}")
        # the Ray pods are built-in objects too, inside the RayService
        for i, template in enumerate(pod_templates(objects)):
            pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"ray-{i}", **template["metadata"]}, "spec": template["spec"]}
            _k8s_validate(pod, version, f"{name}: Ray pod template {i}")
    assert kinds == {"NetworkPolicy", "PodDisruptionBudget", "Pod", "Ingress", "ConfigMap", "PersistentVolumeClaim"}


def test_rayservice_and_its_cluster_pass_the_kuberay_crds(renders):
    service_schema, cluster_spec_schema = crd_schemas()
    for name, objects in renders.items():
        (service,) = [o for o in objects if o["kind"] == "RayService"]
        _crd_validate(service, service_schema, f"{name}: RayService")
        _crd_validate(service["spec"]["rayClusterConfig"], cluster_spec_schema, f"{name}: RayCluster spec")


def test_crd_validation_rejects_unknown_fields(renders):
    service_schema, _ = crd_schemas()
    service = copy.deepcopy(next(o for o in renders["default"] if o["kind"] == "RayService"))
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["numGpus"] = 1
    with pytest.raises(AssertionError, match="'numGpus' was unexpected"):
        _crd_validate(service, service_schema, "RayService")


def test_serve_config_passes_ray_serve_schema_and_llm_config(renders):
    for name, objects in renders.items():
        config = serve_config(objects)
        ServeDeploySchema.model_validate(config)
        assert config["controller_options"]["runtime_env"]["env_vars"] == SERVE_CONTROLLER_ENV, name
        (app,) = config["applications"]
        assert app["import_path"] == "serving.server.deployments:build_app"
        llm = LLMConfig.model_validate(app["args"])
        assert (llm.server.host, llm.server.port, llm.server.app_name) == ("0.0.0.0", config["http_options"]["port"], app["name"]), name


def test_the_api_port_and_name_default_to_the_project_and_follow_llm_server(renders):
    defaults = ServerConfig()
    for name, port, app_name in [("default", defaults.port, defaults.app_name), ("everything-on", 9000, "chat")]:
        config = serve_config(renders[name])
        assert (config["http_options"]["port"], config["applications"][0]["name"]) == (port, app_name), name
        (service,) = [o for o in renders[name] if o["kind"] == "RayService"]
        assert service["spec"]["serveService"]["spec"]["ports"][0]["targetPort"] == port
        for template in pod_templates(renders[name]):
            assert {"name": "serve", "containerPort": port} in template["spec"]["containers"][0]["ports"]
        (policy,) = [o for o in renders[name] if o["kind"] == "NetworkPolicy"]
        assert [p["port"] for p in policy["spec"]["ingress"][1]["ports"]] == [port]


def test_kuberay_probes_are_left_in_place(renders):
    """No probes of the chart's own: KubeRay's worker readiness probe includes the Serve proxy's health
    (/-/healthz on the port named serve), which an override would drop; the image has the wget it runs."""
    for name, objects in renders.items():
        for template in pod_templates(objects):
            for container in template["spec"]["containers"]:
                assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(container), name
    assert re.search(r"apt-get install [^\n]*\bwget\b", (ROOT / "docker" / "Dockerfile").read_text())


def test_an_api_key_secret_turns_the_key_check_on(renders):
    def auth(name: str) -> dict[str, Any] | None:
        return serve_config(renders[name])["applications"][0]["args"]["server"].get("auth")

    assert auth("default") is None and LLMConfig.model_validate(serve_config(renders["default"])["applications"][0]["args"])
    for name in ("everything-on", "llama-8b-tp2", "llama-70b-tp8-pp2"):
        assert auth(name) == {"require_api_key": True}, name
        args = serve_config(renders[name])["applications"][0]["args"]
        assert LLMConfig.model_validate(args).server.auth.require_api_key
        env = {e["name"]: e for e in pod_templates(renders[name])[1]["spec"]["containers"][0]["env"]}
        assert "LLMCLUSTER_API_KEYS" in env


def test_the_test_pod_is_no_ray_pod_but_may_call_the_api(renders):
    for name, objects in renders.items():
        (pod,) = [o for o in objects if o["kind"] == "Pod"]
        selectors = [o["spec"]["selector"]["matchLabels"] for o in objects if o["kind"] in ("PodDisruptionBudget", "PodMonitor")]
        (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
        selectors.append(policy["spec"]["podSelector"]["matchLabels"])
        for selector in selectors:
            assert not selector.items() <= pod["metadata"]["labels"].items(), (name, selector)
        api_rule = policy["spec"]["ingress"][1]
        allowed = [peer.get("podSelector", {}).get("matchLabels", {}) for peer in api_rule.get("from", [])]
        assert "from" not in api_rule or any(s.items() <= pod["metadata"]["labels"].items() for s in allowed if s), name


def test_llm_values_become_the_application_args(renders):
    demo = yaml.safe_load((CHART / "examples" / "cpu-demo.yaml").read_text())
    args = serve_config(renders["cpu-demo"])["applications"][0]["args"]
    assert args["engine"] == demo["llm"]["engine"]
    assert args["model"] == {**demo["llm"]["model"], "source": "default"}  # no GPUs: device stays the project's default
    big = serve_config(renders["llama-70b-tp8-pp2"])["applications"][0]
    assert big["args"]["parallel"]["tensor_parallel"] == 8 and big["args"]["parallel"]["pipeline_parallel"] == 2
    assert big["args"]["model"] == {
        "source": "/models/Llama-3.1-70B-Instruct",
        "dtype": "bfloat16",
        "max_model_len": 32768,
        "device": "cuda",
    }
    # replicas reserve a CPU, so they stay off the head (num-cpus 0); a TP x PP replica is a driver that needs
    # no GPU, a one-GPU replica asks for its GPU; with the autoscaler on, parallel workers wait for new pods
    assert big["deployments"] == [{"name": "APIIngress", "num_replicas": 2, "ray_actor_options": {"num_cpus": 0.5}}]
    assert replica_actor_options(LLMConfig.model_validate(big["args"])) == {"num_cpus": 1}
    assert LLMConfig.model_validate(big["args"]).parallel.cluster_autoscales
    default_app = serve_config(renders["default"])["applications"][0]
    assert replica_actor_options(LLMConfig.model_validate(default_app["args"])) == {"num_cpus": 1, "num_gpus": 1}
    assert serve_config(renders["llama-8b-tp2"])["applications"][0]["args"]["model"]["source"] == "meta-llama/Llama-3.1-8B-Instruct"


def test_every_tensor_parallel_group_fits_a_worker_pod(renders):
    for name, objects in renders.items():
        (service,) = [o for o in objects if o["kind"] == "RayService"]
        tp = serve_config(objects)["applications"][0]["args"].get("parallel", {}).get("tensor_parallel", 1)
        for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
            gpus = group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
            assert gpus == 0 or gpus >= tp, name


def test_containers_have_limits_and_run_as_non_root(renders):
    for name, objects in renders.items():
        pods = [o["spec"] for o in objects if o["kind"] == "Pod"] + [t["spec"] for t in pod_templates(objects)]
        for spec in pods:
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            for container in spec["containers"] + spec.get("initContainers", []):
                assert container["resources"]["requests"] and container["resources"]["limits"], (name, container["name"])
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
        (service,) = [o for o in objects if o["kind"] == "RayService"]
        autoscaler = service["spec"]["rayClusterConfig"].get("autoscalerOptions")
        if autoscaler:
            assert autoscaler["resources"]["limits"] and autoscaler["securityContext"]["capabilities"]["drop"] == ["ALL"]


def test_only_the_api_is_exposed(renders):
    for name, objects in renders.items():
        (service,) = [o for o in objects if o["kind"] == "RayService"]
        cluster = service["spec"]["rayClusterConfig"]
        assert cluster["authOptions"] == {"mode": "token"}
        assert cluster["headGroupSpec"]["serviceType"] == "ClusterIP"
        assert [p["name"] for p in service["spec"]["serveService"]["spec"]["ports"]] == ["serve"]
        (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
        open_rules = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
        port = serve_config(objects)["http_options"]["port"]
        expected = [] if name == "everything-on" else [[port]]  # everything-on: only networkPolicy.apiFrom reaches the API
        assert [[p["port"] for p in rule["ports"]] for rule in open_rules] == expected, name
    ingresses = [o for o in renders["everything-on"] if o["kind"] == "Ingress"]
    backend = ingresses[0]["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "llm-llm-cluster-api", "port": {"name": "serve"}}


def test_model_sources_reach_the_worker_pods(renders):
    workers = pod_templates(renders["object-store"])[1:]
    init = workers[0]["spec"]["initContainers"][0]
    source = serve_config(renders["object-store"])["applications"][0]["args"]["model"]["source"]
    assert init["args"][-2:] == [":s3:models/llama-3.1-8b", source]
    assert init["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "shared-cache"}} in workers[0]["spec"]["volumes"]
    big = pod_templates(renders["llama-70b-tp8-pp2"])[1]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "llama-weights", "readOnly": True}} in big["volumes"]
    env = {e["name"]: e for e in pod_templates(renders["llama-8b-tp2"])[1]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    assert env["LLMCLUSTER_API_KEYS"]["valueFrom"]["secretKeyRef"] == {"name": "llm-api-keys", "key": "api-keys"}


def test_every_ray_node_runs_with_the_projects_ray_settings(renders):
    """The pods' Ray nodes keep no idle task workers and no log monitor (cluster/ray_settings.py), as the local cluster's."""
    for objects in renders.values():
        cluster = rayservice(objects)["spec"]["rayClusterConfig"]
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            assert RAY_START_PARAMS.items() <= group["rayStartParams"].items()
            ray = group["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in ray["env"]}
            assert RAY_NODE_ENV.items() <= env.items()
    assert RAY_NODE_ENV == {"RAY_num_workers_soft_limit": "0"} and RAY_START_PARAMS == {"include-log-monitor": "false"}


def test_monitoring_objects_carry_the_shared_files(renders):
    objects = {o["kind"]: o for o in renders["everything-on"]}
    dashboard = objects["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["llm-cluster.json"]) == json.loads((CHART / "files" / "grafana-dashboard.json").read_text())
    rules = yaml.safe_load((CHART / "files" / "alert-rules.yaml").read_text())
    assert objects["PrometheusRule"]["spec"]["groups"] == rules["groups"]
    # one target per pod: Ray's metrics and the node's llmcluster_* metrics, on the port the application is given
    pod_monitor = objects["PodMonitor"]["spec"]
    assert [e["port"] for e in pod_monitor["podMetricsEndpoints"]] == ["metrics", "llm-metrics"]
    ports = {p["name"]: p["containerPort"] for p in pod_templates(renders["everything-on"])[1]["spec"]["containers"][0]["ports"]}
    args = serve_config(renders["everything-on"])["applications"][0]["args"]
    assert ports["llm-metrics"] == args["server"]["metrics_port"] == 9450 and ports["metrics"] == 8080
    # never the API's /metrics: every pod answers it with the whole cluster's series
    assert not [o for objects in renders.values() for o in objects if o["kind"] == "ServiceMonitor"]
    (policy,) = [o for o in renders["everything-on"] if o["kind"] == "NetworkPolicy"]
    (metrics_rule,) = [rule for rule in policy["spec"]["ingress"] if rule.get("from") == PROMETHEUS]
    assert [p["port"] for p in metrics_rule["ports"]] == [8080, 9450]


def test_prometheus_rule_passes_promtool(renders, tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/install_prometheus.sh installs it)")
    (rule,) = [o for o in renders["everything-on"] if o["kind"] == "PrometheusRule"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_values_schema_is_generated_from_llm_config():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_chart_schema.py"), "--check"], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


# values that must fail, with a message that says what to change


def _demo_with(tmp_path: Path, change: dict[str, Any]) -> Path:
    values = yaml.safe_load((CHART / "examples" / "cpu-demo.yaml").read_text())
    return values_file(tmp_path, _merge(values, change))


def test_tensor_parallel_larger_than_a_node_fails(tmp_path):
    big = CHART / "examples" / "llama-8b-tp2.yaml"
    message = render_error(big, values_file(tmp_path, {"llm": {"parallel": {"tensor_parallel": 4}}}))
    assert 'tensor_parallel=4 does not fit worker group "l40s": its pods have 2 GPUs' in message


def test_missing_model_source_fails(tmp_path):
    assert "at '/model': missing property 'type'" in render_error(values_file(tmp_path, {"model": {"type": None}}))
    message = render_error(values_file(tmp_path, {"model": {"type": "huggingface"}}))
    assert "set model.huggingface.repoId" in message
    message = render_error(values_file(tmp_path, {"model": {"type": "pvc", "pvc": {"claimName": "weights"}}}))
    assert "set model.pvc.claimName and model.pvc.path" in message


def test_negative_replicas_fail(tmp_path):
    message = render_error(_demo_with(tmp_path, {"llm": {"server": {"min_replicas": -1}}}))
    assert "at '/llm/server/min_replicas': minimum: got -1, want 1" in message
    demo = yaml.safe_load((CHART / "examples" / "cpu-demo.yaml").read_text())
    demo["workerGroups"][0]["minReplicas"] = -2
    message = render_error(values_file(tmp_path, demo))
    assert "at '/workerGroups/0/minReplicas': minimum: got -2, want 0" in message


def test_a_pod_monitor_the_network_policy_blocks_fails(tmp_path):
    message = render_error(values_file(tmp_path, {"monitoring": {"podMonitor": {"enabled": True}}}))
    assert "monitoring.podMonitor.enabled: the NetworkPolicy lets no one scrape the pods; set networkPolicy.metricsFrom" in message
    assert render(values_file(tmp_path, {"monitoring": {"podMonitor": {"enabled": True}}, "networkPolicy": {"enabled": False}}))
    message = render_error(values_file(tmp_path, {"monitoring": {"serviceMonitor": {"enabled": True}}}))
    assert "at '/monitoring': additional properties 'serviceMonitor' not allowed" in message


def test_key_checks_without_keys_fail(tmp_path):
    message = render_error(values_file(tmp_path, {"llm": {"server": {"auth": {"require_api_key": True}}}}))
    assert "llm.server.auth.require_api_key: no keys to accept; set api.apiKeys.existingSecret" in message


def test_unknown_keys_fail(tmp_path):
    assert "additional properties 'replicas' not allowed" in render_error(_demo_with(tmp_path, {"replicas": 3}))
    message = render_error(_demo_with(tmp_path, {"llm": {"engine": {"max_num_seq": 8}}}))
    assert "at '/llm/engine': additional properties 'max_num_seq' not allowed" in message
    # the chart sets model.source itself, from `model`
    message = render_error(_demo_with(tmp_path, {"llm": {"model": {"source": "/elsewhere"}}}))
    assert "at '/llm/model': additional properties 'source' not allowed" in message


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in change.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _k8s_validate(obj: dict[str, Any], version: str, what: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = ".".join(str(p) for p in error.path)
        raise AssertionError(f"{what} fails Kubernetes {version} at {path}: {error.message}") from None


def _crd_validate(obj: dict[str, Any], schema: dict[str, Any], what: str) -> None:
    try:
        jsonschema.Draft7Validator(schema).validate(obj)
    except jsonschema.ValidationError as error:
        raise AssertionError(f"{what} fails the KubeRay CRD at {'.'.join(map(str, error.path))}: {error.message}") from None


def test_readme_lists_every_value():
    readme = (CHART / "README.md").read_text()
    missing = [key for key in _value_keys(yaml.safe_load((CHART / "values.yaml").read_text())) if f"`{key}`" not in readme]
    assert not missing


_WHOLE_VALUES = {"resources", "nodeSelector", "tolerations", "affinity", "rayStartParams", "annotations", "labels", "hosts", "tls"}


def _value_keys(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys of values.yaml, down to the values that are objects of Kubernetes' own (resources, ...)."""
    keys = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, list) and value and isinstance(value[0], dict) and key not in _WHOLE_VALUES:
            keys += _value_keys(value[0], f"{path}[].")
        elif isinstance(value, dict) and value and key not in _WHOLE_VALUES and not key.endswith("SecurityContext"):
            keys += _value_keys(value, f"{path}.")
        else:
            keys.append(path)
    return keys
