"""The server section of the config, the Serve application built from it, and the example Serve config file."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve._private.build_app import build_app as serve_build_app
from ray.serve.schema import ServeDeploySchema

from cluster.local import serve_ingress_env
from serving.cli import build_parser
from serving.config import LLMConfig, ServerConfig
from serving.config_flags import config_from_args
from serving.server.autoscaling import LLMAutoscalingPolicy
from serving.server.deployments import API_HEADROOM_REQUESTS, _llm_options, build_app
from serving.server.serve_env import SERVE_CONTROLLER_ENV

EXAMPLE = Path(__file__).parent.parent / "examples" / "serve_config.yaml"


def test_server_defaults_keep_everything_on_this_machine():
    server = LLMConfig().server
    assert server.host == "127.0.0.1" and server.url == "http://127.0.0.1:8000"
    assert ServerConfig(host="0.0.0.0", port=9000).url == "http://127.0.0.1:9000"


@pytest.mark.parametrize(
    "server",
    [{"min_replicas": 3, "max_replicas": 2}, {"port": 0}, {"max_ongoing_requests": 0}, {"limits": {"max_n": 0}}, {"hots": "x"}],
)
def test_invalid_server_settings_are_rejected(server):
    with pytest.raises(ValidationError):
        LLMConfig.model_validate({"server": server})


def test_yaml_config_with_a_server_section(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("model:\n  max_model_len: 512\nserver:\n  port: 9001\n  limits:\n    max_body_bytes: 1000\n")
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # the CLI's --config, the one reader of YAML configs
    config = config_from_args(serve.parse_args(["--config", str(path)]), serve)
    assert (config.model.max_model_len, config.server.port, config.server.limits.max_body_bytes) == (512, 9001, 1000)
    assert config.server.limits.max_n == ServerConfig().limits.max_n


def test_replicas_fixed_or_autoscaled():
    fixed = _llm_options(ServerConfig(min_replicas=2, max_replicas=2, max_ongoing_requests=10, max_queued_requests=3))
    server = ServerConfig()
    health_and_drain = {
        "health_check_period_s": server.health_check_period_s,
        "health_check_timeout_s": server.health_check_timeout_s,
        "graceful_shutdown_timeout_s": server.autoscaling.drain_timeout_s,
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    assert fixed == {"num_replicas": 2, "max_ongoing_requests": 10, "max_queued_requests": 3} | health_and_drain
    scaled = _llm_options(ServerConfig(min_replicas=1, max_replicas=4, max_ongoing_requests=10))
    assert "num_replicas" not in scaled
    autoscaling = scaled["autoscaling_config"]
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (1, 4)
    assert autoscaling["policy"]["policy_function"] is LLMAutoscalingPolicy  # LLM signals, not only ongoing requests


def test_example_serve_config_is_valid_for_serve_and_for_us():
    document = yaml.safe_load(EXAMPLE.read_text())
    schema = ServeDeploySchema.model_validate(document)
    [app] = schema.applications
    assert app.import_path == "serving.server.deployments:build_app"
    assert LLMConfig.model_validate(app.args).model.max_model_len == 2048
    assert document["controller_options"]["runtime_env"]["env_vars"] == SERVE_CONTROLLER_ENV
    # what Serve does with the import path: our builder, then Serve's own step from application to deployments
    built = serve_build_app(build_app(app.args), name=app.name)
    deployments = {deployment.name: deployment for deployment in built.deployments}
    assert built.ingress_deployment_name == "APIIngress" and set(deployments) == {"APIIngress", "LLMDeployment"}
    llm, api = deployments["LLMDeployment"], deployments["APIIngress"]
    config = LLMConfig.model_validate(app.args)
    [llm_args] = llm.init_args
    assert LLMConfig.model_validate(llm_args) == config  # every replica builds its engine from the whole file's config
    assert (llm.num_replicas, llm.max_ongoing_requests, llm.max_queued_requests) == (1, 64, 128)
    handle, api_args = api.init_args
    assert handle.deployment_name == "LLMDeployment" and LLMConfig.model_validate(api_args) == config
    assert api.max_ongoing_requests == 64 * 1 + 128 + API_HEADROOM_REQUESTS  # the LLM capacity and its queue, plus room


def test_the_settings_we_give_serve_are_ones_it_reads():
    """Serve reads its settings from environment variables and ignores unknown ones: a renamed one would go unnoticed."""
    import ray.serve._private.constants as serve_constants

    read = Path(serve_constants.__file__).read_text()
    for name in SERVE_CONTROLLER_ENV | serve_ingress_env():
        assert f'"{name}"' in read, name


def test_each_local_serve_ingress_gets_ports_of_its_own():
    ports = [int(port) for name, port in serve_ingress_env().items() if name.endswith("_PORT")]
    assert len(set(ports)) == 4 and not {9101, 8404, 8500, 9500} & set(ports)  # not Ray's fixed defaults
    for port in ports:
        with socket.socket() as s:
            s.bind(("", port))  # free when handed out
