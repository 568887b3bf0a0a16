"""The Ray Serve application: LLM replicas (one engine each, llm_replica.py) behind an API ingress.

`build_app` is the builder for `serve run` / `serve deploy` (import path
`serving.server.deployments:build_app`, its args an `LLMConfig` as a dict); `deploy` starts Serve
on the connected Ray cluster, runs the application and waits until the API answers.
"""
from __future__ import annotations

import asyncio
import logging
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus, DeploymentStatus

from serving.config import LLMConfig, ServerConfig
from serving.engine.sampling_params import SamplingParams
from serving.errors import DeploymentError, InvalidRequestError, LLMClusterError
from serving.metrics.api import APIMetrics
from serving.metrics.export import MetricsPusher, cluster_families
from serving.server.app import create_app
from serving.server.auth import APIKeys
from serving.server.deploy_checks import check_deployable, replica_error
from serving.server.autoscaling import autoscaling_config
from serving.server.http_errors import overloaded, replica_failed
from serving.server.llm_replica import LLMDeployment
from serving.server.messages import GenerationDelta, ModelInfo
from serving.server.replica_resources import replica_actor_options

# Environment of the Serve controller, inherited by the proxies and replicas it starts.
SERVE_CONTROLLER_ENV = {
    # Ray Serve's high-throughput ingress: HAProxy (a C load balancer, shipped with ray[serve] on Linux) takes the
    # Python proxy actor's place and forwards HTTP straight to the API replicas' own HTTP servers. A streamed token
    # then crosses one Ray hop (LLM to API replica) instead of two, and no Python proxy: at 32 streams on 2 cores,
    # proxy plus API replica took 1.6-1.9 ms of CPU per token, now 0.6 ms (benchmarks/README.md, serving overhead).
    # THROUGHPUT_OPTIMIZED also runs user code and the router in the replica's own event loop (our replicas never
    # block it: engine steps run in a thread), buffers the replicas' Serve logs and freezes start-up objects out of the GC.
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ...but not its buffering of the replicas' Serve logs: access and warning lines reached a replica's log file
    # only once 1,000 had gathered (or with an ERROR), and never from a replica that was killed. One write per request.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    # An API replica being removed keeps answering this long while every HAProxy drops it from its backends (they
    # reload within a second of the controller's word); Serve's default, 30 s, made every shutdown take 30 s.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    # On 2 cores that are also loading a model, a proxy can take longer than Serve's default 5 s
    # to report ready, and is then restarted over and over.
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30",
    # The controller's loop wakes 2 rather than 10 times a second. Idle, it was the busiest Ray process (4.4% of a
    # core; with the GCS calls it makes, 6.8%): on 2 cores every wake-up takes a core from an engine step.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # Replicas report their autoscaling signals (queue, KV usage, TTFT) every second rather than every 10 s.
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    # A replica that failed its health checks (dead or stuck engine) has nothing left to drain: stop it at
    # once, so its requests fail now rather than after drain_timeout_s (Serve drains it by default).
    "RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS": "1",
}
logger = logging.getLogger(__name__)
API_HEADROOM_REQUESTS = 64  # API requests beyond the LLM capacity, for /health, /metrics and /v1/models


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class APIIngress:
    """The OpenAI-compatible HTTP API (FastAPI), calling the LLM deployment through its handle."""

    def __init__(self, llm: DeploymentHandle, config: dict[str, Any]) -> None:
        self.config = LLMConfig.model_validate(config)
        self.keys = APIKeys.load(self.config.server.auth)  # fails the replica when keys are required and there are none
        self.backend = ServeLLMClient(llm, self.config.server)
        replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = APIMetrics(replica)
        self._pusher = MetricsPusher(f"api-{replica}", self.metrics.registry, self.config.server)

    def __serve_build_asgi_app__(self) -> FastAPI:
        families = lambda: cluster_families(exclude=self._pusher.source)
        return create_app(self.backend, self.config.server, self.metrics, families, self.keys)

    def __del__(self) -> None:
        self._pusher.stop()


class ServeLLMClient:
    """The LLM deployment as the API's backend: streaming handle calls, with Ray's errors unwrapped."""

    def __init__(self, handle: DeploymentHandle, server: ServerConfig) -> None:
        # Ray actor calls, not Serve's gRPC transport between replicas (its default where RAY_SERVE_THROUGHPUT_OPTIMIZED
        # is set, as in the processes the controller starts): gRPC cut the API replica's CPU per streamed token from
        # 0.6 to 0.25 ms, but with it tests/test_server_api.py failed 2 runs of 3: a burst of 18 all admitted at
        # 8 running + 4 queued (the race below, far more often) and streams still running after their clients had
        # closed (perhaps HAProxy's splicing, since turned off: cluster/haproxy.py). Tried again after both fixes:
        # the tests passed, but no throughput gain showed (benchmarks/README.md), so not yet.
        self._handle = handle.options(_by_reference=True)
        self._streaming = self._handle.options(stream=True)
        self._retry_after_s = server.retry_after_s
        self._info: ModelInfo | None = None
        # Serve's handle checks its queue limit before it counts a request as queued, with an await in between
        # (Router.assign_request): a burst passes the check together. Bursts of 36 at 8 running + 4 queued had
        # 15-17 admitted. So this replica also counts the calls it has at the LLM deployment, running or queued,
        # and refuses past what Serve would take with every replica up; below max_replicas Serve's limit is the tighter.
        self._calls = 0
        self._max_calls = server.max_ongoing_requests * server.max_replicas + server.max_queued_requests

    async def model_info(self) -> ModelInfo:
        if self._info is None:
            with self._errors():
                self._info = await self._handle.model_info.remote()
        return self._info

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[GenerationDelta]:
        with self._admitted(), self._errors():
            response = self._streaming.generate.remote(prompt_ids, params, request_id)
            try:
                async for delta in response:
                    if isinstance(delta, InvalidRequestError):
                        raise delta
                    yield delta
            except BaseException:  # closed early (client gone), cancelled or failed: abort it on its replica
                response.cancel()
                raise

    async def complete(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> GenerationDelta:
        with self._admitted(), self._errors():
            response = self._handle.complete.remote(prompt_ids, params, request_id)
            try:
                result = await response
            except asyncio.CancelledError:
                response.cancel()
                raise
        if isinstance(result, InvalidRequestError):
            raise result
        return result

    async def check_health(self) -> None:
        with self._errors():
            await self._handle.check_health.remote()

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        """One call to the LLM deployment, refused with 503 when this replica already has all it may."""
        if self._calls >= self._max_calls:
            raise overloaded(self._retry_after_s)
        self._calls += 1
        try:
            yield
        finally:
            self._calls -= 1

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except BackPressureError as error:
            raise overloaded(self._retry_after_s) from error
        except RayActorError as error:  # the replica died under the request, or was stopped as unhealthy
            raise replica_failed() from error
        except RayTaskError as error:
            if isinstance(error.cause, LLMClusterError):
                raise error.cause from None
            raise


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
