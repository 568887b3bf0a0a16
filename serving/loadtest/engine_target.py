"""An in-process target: requests go straight to an `AsyncLLMEngine`, without HTTP or Ray.

For machines without Ray (the GPU machine) and for separating engine time from serving overhead.
A "chunk" is one engine output that added tokens, as one SSE event would be. Outputs reach each request
through `AsyncLLMEngine.run`'s sink, as in the LLM replica, not one task wake-up per token.
"""

from __future__ import annotations

import time
import uuid

from serving.engine.async_engine import AsyncLLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import RequestOutput
from serving.errors import LLMClusterError
from serving.loadtest.client import RequestResult
from serving.loadtest.workloads import RequestSpec


class EngineTarget:
    """Greedy requests with ignore_eos, as the HTTP target sends them."""

    def __init__(self, engine: AsyncLLMEngine, ignore_eos: bool = True) -> None:
        self.engine, self.ignore_eos = engine, ignore_eos

    async def send(self, spec: RequestSpec) -> RequestResult:
        params = SamplingParams(max_tokens=spec.output_len, temperature=0.0, ignore_eos=self.ignore_eos)
        result = RequestResult(spec.prompt_len, start=time.perf_counter())

        def sink(output: RequestOutput) -> None:  # as the LLM replica takes outputs: no task wakes per token
            if new := len(output.outputs[0].token_ids_delta):
                result.chunk_times.append(time.perf_counter() - result.start)
                result.output_len += new

        try:
            await self.engine.run(spec.prompt, params, uuid.uuid4().hex, sink)
        except LLMClusterError as error:
            result.error, result.detail = type(error).__name__, str(error)[:300]
        result.end = time.perf_counter()
        return result

    async def close(self) -> None:
        """Nothing to release: the engine belongs to the caller."""
