"""A private Ray session on 127.0.0.1 with a Serve application, for the tests that push it around
(the processes, memory and idle state they watch come from benchmarks/soak.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import ray
from ray import serve

from cluster.local import init_private_session
from serving.config import LLMConfig
from serving.server.deployments import deploy


@contextmanager
def served(config: LLMConfig, num_cpus: int | None = None) -> Iterator[str]:
    """A Ray session of this process's own with `config` deployed on it; yields the API's URL."""
    init_private_session(num_cpus)
    try:
        yield deploy(config, timeout_s=180)
    finally:
        serve.shutdown()
        ray.shutdown()
