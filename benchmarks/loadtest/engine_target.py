"""An in-process target: requests go straight to an `AsyncLLMEngine`, without HTTP or Ray.

For machines without Ray (the GPU machine) and for separating engine time from serving overhead.
A "chunk" is one engine output that added tokens, as one SSE event would be.
"""

from __future__ import annotations

import time

from benchmarks.loadtest.client import RequestResult
from benchmarks.loadtest.workloads import RequestSpec
from serving.engine.async_engine import AsyncLLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.errors import LLMClusterError


class EngineTarget:
    """Greedy requests with ignore_eos, as the HTTP target sends them."""

    def __init__(self, engine: AsyncLLMEngine, ignore_eos: bool = True) -> None:
        self.engine, self.ignore_eos = engine, ignore_eos

    async def send(self, spec: RequestSpec) -> RequestResult:
        params = SamplingParams(max_tokens=spec.output_len, temperature=0.0, ignore_eos=self.ignore_eos)
        result = RequestResult(spec.prompt_len, start=time.perf_counter())
        produced = 0
        try:
            async for output in self.engine.generate(spec.prompt, params):
                tokens = len(output.outputs[0].token_ids)
                if tokens > produced:
                    result.chunk_times.append(time.perf_counter() - result.start)
                    produced = tokens
        except LLMClusterError as error:
            result.error, result.detail = type(error).__name__, str(error)[:300]
        result.output_len = produced
        result.end = time.perf_counter()
        return result

    async def close(self) -> None:
        """Nothing to release: the engine belongs to the caller."""
