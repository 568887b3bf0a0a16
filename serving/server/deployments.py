"""The Ray Serve application: LLM replicas (one engine each, llm_replica.py) behind an API ingress (api_ingress.py).

`build_app` is the builder for `serve run` / `serve deploy` (import path
`serving.server.deployments:build_app`, its args an `LLMConfig` as a dict); `deploy` starts Serve
on the connected Ray cluster, runs the application and waits until the API answers.
"""

from __future__ import annotations

import logging
import time
import urllib.error
import urllib.request
from typing import Any

from ray import serve
from ray.serve.schema import ApplicationStatus, DeploymentStatus

from serving.config import LLMConfig, ServerConfig
from serving.errors import DeploymentError
from serving.server.api_ingress import APIIngress
from serving.server.autoscaling import autoscaling_config
from serving.server.deploy_checks import check_deployable, replica_error
from serving.server.llm_replica import LLMDeployment
from serving.server.replica_resources import replica_actor_options
from serving.server.serve_env import SERVE_CONTROLLER_ENV

logger = logging.getLogger(__name__)
API_HEADROOM_REQUESTS = 64  # API requests beyond the LLM capacity, for /health, /metrics and /v1/models


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run` / `serve deploy`: `args` is an LLMConfig as a dict."""
    return build(LLMConfig.model_validate(args))


def build(config: LLMConfig) -> serve.Application:
    server = config.server
    data = config.model_dump(mode="json")
    llm = LLMDeployment.options(**_llm_options(server), ray_actor_options=replica_actor_options(config)).bind(data)
    capacity = server.max_ongoing_requests * server.max_replicas + server.max_queued_requests + API_HEADROOM_REQUESTS
    return APIIngress.options(max_ongoing_requests=capacity, **_drain_options(server)).bind(llm, data)


def _drain_options(server: ServerConfig) -> dict[str, Any]:
    """A replica being removed (scale-in, redeploy, shutdown) gets no new requests and finishes the ones it
    has for up to drain_timeout_s; streams pass through the API replicas, so they drain too."""
    return {"graceful_shutdown_timeout_s": server.autoscaling.drain_timeout_s, "graceful_shutdown_wait_loop_s": 0.5}


def _llm_options(server: ServerConfig) -> dict[str, Any]:
    options: dict[str, Any] = {
        "max_ongoing_requests": server.max_ongoing_requests,
        "max_queued_requests": server.max_queued_requests,
        # Serve calls check_health this often and replaces the replica after three failures in a row
        "health_check_period_s": server.health_check_period_s,
        "health_check_timeout_s": server.health_check_timeout_s,
        **_drain_options(server),
    }
    if server.max_replicas > server.min_replicas:
        options["autoscaling_config"] = autoscaling_config(server)
    else:
        options["num_replicas"] = server.min_replicas
    return options


def deploy(config: LLMConfig, timeout_s: float = 120.0) -> str:
    """Run the application on the connected Ray cluster; returns the API's URL once /health answers 200.

    Refuses a layout the model or the cluster cannot take before deploying (deploy_checks.py); a replica that
    fails to start is logged with its own error at once, and raises DeploymentError once Serve gives up on it."""
    server = config.server
    check_deployable(config)
    serve.start(
        http_options={"host": server.host, "port": server.port},
        controller_options={"runtime_env": {"env_vars": SERVE_CONTROLLER_ENV}},
    )
    deadline = time.monotonic() + timeout_s
    serve.run_many([serve.RunTarget(build(config), name=server.app_name, route_prefix="/")], wait_for_applications_running=False)
    wait_until_running(server.app_name, deadline - time.monotonic())
    wait_until_healthy(server.url, deadline - time.monotonic())
    return server.url


def wait_until_running(app_name: str, timeout_s: float) -> None:
    """Wait for Serve to report the application RUNNING; raise DeploymentError with a replica's own error if it fails."""
    deadline = time.monotonic() + timeout_s
    reported: set[str] = set()
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            return
        if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
            failed = {name: d.message for name, d in app.deployments.items() if d.status == DeploymentStatus.DEPLOY_FAILED}
            reasons = "; ".join(f"{name}: {replica_error(message)}" for name, message in failed.items()) or app.message
            raise DeploymentError(f"application {app_name!r} failed to deploy: {reasons}")
        for name, deployment in (app.deployments if app is not None else {}).items():
            error = replica_error(deployment.message)
            if deployment.message.startswith("A replica failed to start") and error not in reported:
                reported.add(error)
                logger.warning("a %s replica failed to start (Serve tries again): %s", name, error)
        time.sleep(0.5)
    raise TimeoutError(f"application {app_name!r} was not running within {timeout_s:.0f} s (`llmcluster status` shows its replicas)")


def wait_until_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as error:
            last = f"HTTP {error.code}"
        except OSError as error:
            last = str(error)
        time.sleep(0.5)
    raise TimeoutError(
        f"{url}/health did not answer 200 within {timeout_s:.0f} s ({last}); if Serve was already running on "
        "this cluster, it keeps the host and port it started with"
    )
