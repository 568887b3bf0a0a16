"""The LLM deployment: each replica owns one engine and streams output deltas to the API replicas."""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any

import psutil
from ray import serve

from serving.config import LLMConfig
from serving.engine.async_engine import AsyncLLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import RequestOutput
from serving.errors import EngineDeadError, InvalidRequestError
from serving.metrics.export import MetricsPusher
from serving.metrics.replica import ReplicaMetrics
from serving.server.channel import ChannelAddress, Outboxes
from serving.server.messages import GenerationDelta, ModelInfo, whole_output
from serving.server.tools.parsers import resolve_parser


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_constructor_retry_count=3)
class LLMDeployment:
    """One engine; streams output deltas of each request to the API replica that asked."""

    def __init__(self, config: dict[str, Any]) -> None:
        started = time.monotonic()
        self.config = LLMConfig.model_validate(config)
        self.engine = AsyncLLMEngine(_with_threads(self.config), collect_stats=True)  # the pusher takes them every second
        self.engine.engine.grammars.load_tokenizer()  # now, not under the first request with an output constraint
        self.replica = serve.get_replica_context().replica_id.unique_id
        parallel, engine = self.config.parallel, self.engine.engine
        self.metrics = ReplicaMetrics(engine.model_name, self.replica, parallel.tensor_parallel, parallel.pipeline_parallel)
        self.metrics.model_load.set(engine.model_load_s)
        # from the constructor's start (Ray may hand Serve a worker process started long before): what adding a
        # replica costs, which the autoscaler plans for
        self.startup_s = time.monotonic() - started
        self.metrics.startup.set(self.startup_s)
        # only the pusher's thread touches the deque; Serve's thread reads the float it publishes (one assignment)
        self._recent_ttft: deque[tuple[float, float]] = deque()  # (when, seconds) within the look-back period
        self._mean_ttft_s = 0.0
        self._outboxes = Outboxes(self.engine)  # one per API replica with requests here, made on its first
        self._pusher = MetricsPusher(f"llm-{self.replica}", self.metrics.registry, self.config.server, self._refresh_metrics)

    def __del__(self) -> None:
        """Serve calls this when it removes the replica (after draining): its series leave the node's endpoint.
        It also runs after a failed constructor, which may not have got as far as the pusher."""
        if hasattr(self, "_pusher"):
            self._pusher.stop()

    # A request the engine rejects is answered with the error as a value, not raised: it is the
    # client's fault, and Serve would log a raised one as a failure of this replica.

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str, channel: ChannelAddress
    ) -> InvalidRequestError | None:
        """Run a request whose deltas go to the API replica at `channel`, with those of every other request of that
        API replica, one message per engine step (serving/server/channel.py). Returns once the last delta has been
        written; cancelling the call (the client left) aborts the request."""
        try:
            await self._outboxes.get(channel).send(prompt_ids, params, request_id)
        except InvalidRequestError as error:
            return error
        except EngineDeadError:
            self.metrics.count_error()
            raise
        return None

    async def complete(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> GenerationDelta | InvalidRequestError:
        last: list[RequestOutput] = []  # the latest output only: it holds the whole text so far

        def keep(output: RequestOutput) -> None:
            last[:] = [output]

        try:
            await self.engine.run(prompt_ids, params, request_id, keep)
        except InvalidRequestError as error:
            return error
        except EngineDeadError:
            self.metrics.count_error()
            raise
        return whole_output(last[-1])

    async def model_info(self) -> ModelInfo:
        engine = self.engine.engine
        parser = resolve_parser(self.config.model.tool_parser, engine.tokenizer.chat_template)
        return ModelInfo(engine.model_name, engine.max_model_len, engine.tokenizer, parser)

    async def check_health(self) -> None:
        """Serve calls this periodically and restarts the replica while it raises."""
        if (problem := self._health_problem()) is not None:
            raise EngineDeadError(problem)

    def _health_problem(self) -> str | None:
        if self.engine.dead_error is not None:
            return f"the engine stopped: {self.engine.dead_error!r}"
        stalled = self.engine.seconds_without_progress()
        if stalled > self.config.server.stall_timeout_s:
            return f"the engine has had work but made no progress for {stalled:.0f} s"
        return None

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's autoscaler averages these per replica over the look-back period (serving/server/autoscaling.py)."""
        snapshot = self.engine.snapshot
        return {
            "waiting": snapshot.num_waiting,
            "kv_cache_usage": snapshot.kv_cache_usage,
            "ttft_s": self._mean_ttft_s,
            "startup_s": self.startup_s,
        }

    def _refresh_metrics(self) -> None:
        """Runs in the metrics pusher's thread before each push."""
        snapshot, step = self.engine.snapshot, self.engine.take_stats()
        self.metrics.update(snapshot, self._health_problem() is None, step)
        now = time.monotonic()
        self._recent_ttft.extend((now, ttft) for ttft in step.time_to_first_token_s)
        while self._recent_ttft and self._recent_ttft[0][0] < now - self.config.server.autoscaling.look_back_period_s:
            self._recent_ttft.popleft()
        self._mean_ttft_s = sum(ttft for _, ttft in self._recent_ttft) / len(self._recent_ttft) if self._recent_ttft else 0.0


def _with_threads(config: LLMConfig) -> LLMConfig:
    """Ray sets OMP_NUM_THREADS=1 in a worker that reserves no CPUs, which leaves torch one thread; an
    engine left to torch's choice gets what torch would choose outside Ray: the node's physical cores."""
    if config.engine.num_threads is not None:
        return config
    engine = config.engine.model_copy(update={"num_threads": psutil.cpu_count(logical=False) or os.cpu_count()})
    return config.model_copy(update={"engine": engine})
