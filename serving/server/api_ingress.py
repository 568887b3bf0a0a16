"""The API ingress deployment: the OpenAI-compatible HTTP API (FastAPI app.py) on a Serve replica of its own."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.config import LLMConfig
from serving.metrics.api import APIMetrics
from serving.metrics.export import MetricsPusher, cluster_families
from serving.server.app import create_app
from serving.server.auth import APIKeys
from serving.server.llm_client import ServeLLMClient


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
