"""The LLM deployment: each replica owns one engine and streams output deltas to the API replicas."""
from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import psutil
from ray import serve

from serving.config import LLMConfig
from serving.engine.async_engine import AsyncLLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.errors import EngineDeadError, InvalidRequestError
from serving.server.messages import (
    EngineStats,
    GenerationDelta,
    ModelInfo,
    engine_deltas,
)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_constructor_retry_count=3)
class LLMDeployment:
    """One engine; streams output deltas of each request to the API replica that asked."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = LLMConfig.model_validate(config)
        self.engine = AsyncLLMEngine(_with_threads(self.config))
        self.replica = serve.get_replica_context().replica_id.unique_id

    # A request the engine rejects is answered with the error as a value, not raised: it is the
    # client's fault, and Serve would log a raised one as a failure of this replica.

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[GenerationDelta | InvalidRequestError]:
        try:
            async for delta in engine_deltas(self.engine.generate(prompt_ids, params, request_id)):
                yield delta
        except InvalidRequestError as error:
            yield error

    async def complete(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> GenerationDelta | InvalidRequestError:
        result: GenerationDelta | None = None
        try:
            async for delta in engine_deltas(self.engine.generate(prompt_ids, params, request_id)):
                result = delta if result is None else result.merge(delta)
        except InvalidRequestError as error:
            return error
        assert result is not None, "the engine finishes every request with an output"
        return result

    async def model_info(self) -> ModelInfo:
        engine = self.engine.engine
        return ModelInfo(engine.model_name, engine.max_model_len, engine.tokenizer)

    async def stats(self) -> EngineStats:
        engine = self.engine.engine
        blocks = engine.blocks
        return EngineStats(
            replica=self.replica,
            model=engine.model_name,
            num_running=engine.num_running,
            num_waiting=engine.num_waiting,
            kv_cache_usage=blocks.usage,
            kv_blocks_used=blocks.num_blocks - blocks.num_free_blocks,
            kv_blocks_total=blocks.num_blocks,
        )

    async def check_health(self) -> None:
        """Serve calls this periodically and restarts the replica while it raises."""
        if self.engine.dead_error is not None:
            raise EngineDeadError(f"the engine stopped: {self.engine.dead_error!r}")
        stalled = self.engine.seconds_without_progress()
        if stalled > self.config.server.stall_timeout_s:
            raise EngineDeadError(f"the engine has had work but made no progress for {stalled:.0f} s")


def _with_threads(config: LLMConfig) -> LLMConfig:
    """Ray sets OMP_NUM_THREADS=1 in a worker that reserves no CPUs, which leaves torch one thread; an
    engine left to torch's choice gets what torch would choose outside Ray: the node's physical cores."""
    if config.engine.num_threads is not None:
        return config
    engine = config.engine.model_copy(update={"num_threads": psutil.cpu_count(logical=False) or os.cpu_count()})
    return config.model_copy(update={"engine": engine})
