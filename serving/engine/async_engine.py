"""An asyncio front for the engine: requests stream their outputs while one loop runs the steps.

Steps run in a worker thread (the event loop stays free for I/O); a lock orders steps, new
requests and aborts, so an abort frees the request's KV blocks before the next step starts.
"""
from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator

from serving.config import LLMConfig
from serving.engine.llm_engine import LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import RequestOutput
from serving.engine.stats import EngineStepStats
from serving.errors import EngineDeadError, InvalidRequestError, LLMClusterError


class AsyncLLMEngine:
    def __init__(self, config: LLMConfig, collect_stats: bool = False) -> None:
        """`collect_stats`: keep the engine's measurements for `take_stats`, which the owner must then call regularly."""
        self.engine = LLMEngine(config, collect_stats=collect_stats)
        self._lock = threading.Lock()
        # what the steps measured, taken inside each locked step; its own lock is held for microseconds only,
        # so a metrics thread never waits behind a step (the step lock is not fair and can starve it)
        self._stats = EngineStepStats()
        self._stats_lock = threading.Lock()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._wakeup: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.dead_error: BaseException | None = None
        self.last_progress = time.monotonic()  # last time a step produced tokens (or the engine was idle)

    def seconds_without_progress(self) -> float:
        """How long the engine has had work but produced nothing (0 while idle)."""
        if not self.engine.has_unfinished_requests():
            return 0.0
        return time.monotonic() - self.last_progress

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as tokens arrive; closing the iterator early aborts it."""
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead_error}")
        self._ensure_loop()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue
        finished = False
        try:
            try:
                await asyncio.to_thread(self._add_locked, request_id, prompt, params)
            except LLMClusterError:
                finished = True  # rejected: nothing was queued, nothing to abort
                raise
            self._wakeup.set()
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished:  # closed early, cancelled or failed: make sure the engine lets it go
                await asyncio.shield(self.abort(request_id))

    def take_stats(self) -> EngineStepStats:
        """What the engine measured since the last call (see LLMEngine.take_stats); safe from any thread."""
        with self._stats_lock:
            stats, self._stats = self._stats, EngineStepStats()
        return stats

    def _keep_stats(self, stats: EngineStepStats) -> None:
        with self._stats_lock:
            self._stats.merge(stats)

    async def abort(self, request_id: str) -> None:
        self._keep_stats(await asyncio.to_thread(self._abort_locked, request_id))

    def _add_locked(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Runs in a worker thread: waiting for the lock (held during a step) must not block the event loop."""
        with self._lock:
            if not self.engine.has_unfinished_requests():
                self.last_progress = time.monotonic()
            self.engine.add_request(request_id, prompt, params)

    def _abort_locked(self, request_id: str) -> EngineStepStats:
        with self._lock:
            self.engine.abort_request(request_id)
            return self.engine.take_stats()

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wakeup = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def _step_locked(self) -> tuple[list[RequestOutput], EngineStepStats]:
        with self._lock:
            return self.engine.step(), self.engine.take_stats()

    async def _run(self) -> None:
        try:
            while True:
                if not self.engine.has_unfinished_requests():
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                outputs, stats = await asyncio.to_thread(self._step_locked)
                self._keep_stats(stats)
                if outputs:
                    self.last_progress = time.monotonic()
                for output in outputs:
                    queue = self._streams.get(output.request_id)
                    if queue is not None:
                        queue.put_nowait(output)
        except Exception as error:  # a fault in the step: fail every request in flight, loudly
            self.dead_error = error
            for queue in self._streams.values():
                queue.put_nowait(EngineDeadError(f"the engine stopped: {error!r}"))
            raise
