"""An asyncio front for the engine: requests stream their outputs while the engine's thread runs the steps.

The engine's thread runs steps back to back while there is work and hands each step's outputs to
the event loop, so passing one step's tokens on overlaps the next step instead of delaying it. There
each output goes to its request's sink, and once all have, the `on_step` callbacks run: a caller can
send a whole step's outputs as one message. A lock orders steps, new requests and aborts, so an
abort frees the request's KV blocks before the next step starts, and after each of them the engine's
state is published as one snapshot for other threads to read.

One thread, the same for the engine's whole life, builds the model and runs every step: each OS
thread that runs torch's parallel ops gets its own OpenMP team, and once libgomp manages more
threads than there are cores it stops spinning between parallel regions and puts its workers to
sleep (benchmarks/README.md, "One engine thread").
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from serving.config import LLMConfig
from serving.engine.llm_engine import LLMEngine
from serving.engine.sampling_params import SamplingParams
from serving.engine.sequence import RequestOutput
from serving.engine.stats import EngineSnapshot, EngineStepStats
from serving.errors import EngineDeadError, InvalidRequestError, LLMClusterError

logger = logging.getLogger(__name__)
T = TypeVar("T")


class _EngineThread:
    """A daemon thread that runs the calls given to it one after another, for as long as its owner lives.

    Not a one-worker ThreadPoolExecutor: that joins its thread at interpreter exit, which waits out any
    request still being stepped, and a thread ending during interpreter teardown aborts the process.
    """

    def __init__(self, num_threads: int) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future] | None] = queue.SimpleQueue()
        threading.Thread(target=self._serve, args=(num_threads,), name="engine", daemon=True).start()

    def submit(self, call: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._calls.put((call, future))
        return future

    def stop(self) -> None:
        """Let the thread end (and its OpenMP team with it) once the calls already given to it are done."""
        self._calls.put(None)

    def _serve(self, num_threads: int) -> None:
        # OpenMP keeps a thread count per OS thread and starts a new thread at OMP_NUM_THREADS, not at what
        # torch.set_num_threads said in the thread that created this one
        torch.set_num_threads(num_threads)
        while (item := self._calls.get()) is not None:
            call, future = item
            try:
                future.set_result(call())
            except BaseException as error:  # noqa: BLE001 - whatever it is belongs to the caller waiting on the future
                future.set_exception(error)


class AsyncLLMEngine:
    def __init__(self, config: LLMConfig, collect_stats: bool = False) -> None:
        """`collect_stats`: keep the engine's measurements for `take_stats`, which the owner must then call regularly."""
        self._thread = _EngineThread(torch.get_num_threads())
        # the thread, and its OpenMP team, end with this object, but not at interpreter exit: a thread
        # ending while the interpreter tears down aborts the process ("terminate called ...")
        weakref.finalize(self, self._thread.stop).atexit = False
        self.engine = self._thread.submit(lambda: LLMEngine(config, collect_stats=collect_stats)).result()
        self._lock = threading.Lock()
        # what the steps measured, taken inside each locked step; its own lock is held for microseconds only,
        # so a metrics thread never waits behind a step (the step lock is not fair and can starve it)
        self._stats = EngineStepStats()
        self._stats_lock = threading.Lock()
        # each request's sink: called on the requests' loop with each of its outputs, or with the error that ends it
        self._sinks: dict[str, Callable[[RequestOutput | BaseException], None]] = {}
        self._step_callbacks: list[Callable[[], None]] = []  # called on the loop after each step's outputs are delivered
        self._loop: asyncio.AbstractEventLoop | None = None  # where outputs are delivered: the requests' loop
        self._stepping = False  # the engine's thread is in the step loop; read and written under _lock
        self.snapshot = EngineSnapshot()  # replaced (one assignment) under the lock after every change
        self.dead_error: BaseException | None = None
        self.last_progress = time.monotonic()  # last time a step produced tokens (or the engine was idle)

    def seconds_without_progress(self) -> float:
        """How long the engine has had work but produced nothing (0 while idle)."""
        if not self.snapshot.has_unfinished_requests:
            return 0.0
        return time.monotonic() - self.last_progress

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as tokens arrive; closing the iterator early aborts it."""
        request_id = self._admit(request_id)
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._sinks[request_id] = queue.put_nowait
        finished = False
        try:
            try:
                await asyncio.to_thread(self._add_locked, request_id, prompt, params)
            except LLMClusterError:
                finished = True  # rejected: nothing was queued, nothing to abort
                raise
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._sinks.pop(request_id, None)
            if not finished:  # closed early, cancelled or failed: make sure the engine lets it go
                await asyncio.shield(self.abort(request_id))

    async def run(self, prompt: str | list[int], params: SamplingParams, request_id: str, sink: Callable[[RequestOutput], None]) -> None:
        """Run a request, calling `sink(output)` on this loop with each of its outputs as the steps make them (no task
        wakes up per output); returns once it has finished. Cancelling it aborts the request.

        The outputs of one step reach every sink before the callbacks of `on_step` run, so a caller can gather
        a step's outputs of many requests and send them on as one message."""
        request_id = self._admit(request_id)
        done: asyncio.Future[None] = self._loop.create_future()

        def deliver(item: RequestOutput | BaseException) -> None:
            if done.done():
                return
            if isinstance(item, BaseException):
                done.set_exception(item)
                return
            sink(item)
            if item.finished:
                done.set_result(None)

        self._sinks[request_id] = deliver
        finished = False
        try:
            try:
                await asyncio.to_thread(self._add_locked, request_id, prompt, params)
            except LLMClusterError:
                finished = True
                raise
            await done
            finished = True
        finally:
            self._sinks.pop(request_id, None)
            if not finished:
                await asyncio.shield(self.abort(request_id))

    def on_step(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call `callback()` on the requests' loop after each step's outputs have reached their sinks; returns a
        function that removes it."""
        self._step_callbacks.append(callback)
        return lambda: self._step_callbacks.remove(callback) if callback in self._step_callbacks else None

    def _admit(self, request_id: str | None) -> str:
        if self.dead_error is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead_error}")
        self._loop = asyncio.get_running_loop()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._sinks:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        return request_id

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
        """Runs in a worker thread: waiting for the lock (held during a step) must not block the event loop.
        An output constraint compiles before the lock is taken, so a big grammar does not hold up the steps."""
        matcher = self.engine.compile_constraint(params)
        with self._lock:
            if not self.engine.has_unfinished_requests():
                self.last_progress = time.monotonic()
            self.engine.add_request(request_id, prompt, params, matcher)
            self._take_snapshot()
            if not self._stepping:
                self._stepping = True
                self._thread.submit(self._run)

    def _abort_locked(self, request_id: str) -> EngineStepStats:
        with self._lock:
            self.engine.abort_request(request_id)
            self._take_snapshot()
            return self.engine.take_stats()

    def run_on_engine_thread(self, call: Callable[[LLMEngine], T]) -> T:
        """Run `call(engine)` on the engine's thread once no step loop is running there; returns its result (blocks)."""

        def locked() -> T:
            with self._lock:
                return call(self.engine)

        return self._thread.submit(locked).result()

    def _run(self) -> None:
        """The step loop, on the engine's thread: steps until the engine has no unfinished request, or a step fails."""
        try:
            while True:
                with self._lock:
                    if not self.engine.has_unfinished_requests():
                        self._stepping = False  # under the lock: a request added after this starts the loop again
                        return
                    outputs, stats = self.engine.step(), self.engine.take_stats()
                    self._take_snapshot()
                self._keep_stats(stats)
                if outputs:
                    self.last_progress = time.monotonic()
                    self._in_loop(self._put, outputs)
        except Exception as error:  # a fault in the step: fail every request in flight, loudly
            logger.exception("the engine stopped")
            self.dead_error = error
            self._in_loop(self._fail_all, EngineDeadError(f"the engine stopped: {error!r}"))

    def _take_snapshot(self) -> None:
        """Under the lock: publish the engine's state for other threads."""
        engine = self.engine
        self.snapshot = EngineSnapshot(
            num_running=engine.num_running,
            num_waiting=engine.num_waiting,
            kv_cache_usage=engine.blocks.usage,
            prefix_cache_queries=engine.blocks.prefix_queries,
            prefix_cache_hits=engine.blocks.prefix_hits,
            preemptions=engine.scheduler.num_preemptions,
            has_unfinished_requests=engine.has_unfinished_requests(),
        )

    def _in_loop(self, callback: Callable[[Any], None], arg: Any) -> None:
        """Run `callback(arg)` on the requests' event loop (this runs in the engine's thread)."""
        try:
            self._loop.call_soon_threadsafe(callback, arg)
        except RuntimeError:  # the loop is closed: nobody is left to read them
            pass

    def _put(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            if (sink := self._sinks.get(output.request_id)) is not None:
                sink(output)
        for callback in list(self._step_callbacks):
            try:
                callback()
            except Exception:
                logger.exception("a step callback failed")

    def _fail_all(self, error: EngineDeadError) -> None:
        for sink in list(self._sinks.values()):
            sink(error)
