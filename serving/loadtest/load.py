"""Load shapes: a fixed number of requests in flight (closed loop) or Poisson-like arrivals (open loop).

A run sends requests from the workload in turn (wrapping around), stops sending after
`num_requests` requests or `duration_s` seconds, whichever comes first, and waits for those in
flight. Warm-up requests go first and are not counted.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from tqdm import tqdm

from serving.loadtest.client import RequestResult, Target
from serving.loadtest.workloads import RequestSpec


@dataclass(frozen=True)
class LoadPoint:
    """Closed loop when `concurrency` is set; else open loop at `request_rate` requests/s (inf: all at once).

    Open-loop gaps are gamma-distributed with shape `burstiness` and mean 1/rate (vLLM's definition):
    1 is a Poisson process, below 1 burstier, above 1 more regular. `max_concurrency` caps requests
    in flight in the open loop; arrivals beyond it wait for a slot.
    """

    concurrency: int | None = None
    request_rate: float | None = None
    burstiness: float = 1.0
    max_concurrency: int | None = None

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.request_rate is None):
            raise ValueError("a load point has either a concurrency or a request rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.request_rate is not None and self.request_rate <= 0:
            raise ValueError("request rate must be > 0")
        if self.burstiness <= 0:
            raise ValueError("burstiness must be > 0")

    @property
    def label(self) -> str:
        if self.concurrency is not None:
            return f"c={self.concurrency}"
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        return f"rate={rate}" + ("" if self.burstiness == 1 else f",b={self.burstiness:g}")

    def to_dict(self) -> dict:
        return asdict(self) | {"label": self.label}


@dataclass
class LoadRun:
    results: list[RequestResult]
    duration_s: float  # first send to last answer
    client_cpu_s: float | None = None  # CPU time this process (the load generator) used meanwhile, all threads


async def run_load(
    target: Target,
    workload: Sequence[RequestSpec],
    point: LoadPoint,
    num_requests: int | None,
    duration_s: float | None = None,
    warmup: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> LoadRun:
    if num_requests is None and duration_s is None:
        raise ValueError("bound the run by a number of requests, a duration, or both")
    if num_requests is None and point.request_rate == math.inf:
        raise ValueError("an infinite request rate needs a number of requests")
    if warmup:
        warm_point = LoadPoint(concurrency=min(warmup, point.concurrency or point.max_concurrency or warmup))
        await _closed_loop(target, workload, warm_point.concurrency, warmup, None, None)
    bar = tqdm(total=num_requests, desc=point.label, unit="req", disable=not progress, leave=False)
    started, cpu_started = time.perf_counter(), time.process_time()
    if point.concurrency is not None:
        results = await _closed_loop(target, workload, point.concurrency, num_requests, duration_s, bar)
    else:
        results = await _open_loop(target, workload, point, num_requests, duration_s, random.Random(seed), bar)
    cpu_s = time.process_time() - cpu_started
    bar.close()
    ends = [r.end for r in results]
    return LoadRun(results, (max(ends) if ends else time.perf_counter()) - started, cpu_s)


async def _closed_loop(
    target: Target,
    workload: Sequence[RequestSpec],
    concurrency: int,
    count: int | None,
    duration_s: float | None,
    bar: tqdm | None,
) -> list[RequestResult]:
    deadline = time.perf_counter() + duration_s if duration_s is not None else math.inf
    results: list[RequestResult] = []
    issued = 0

    async def worker() -> None:
        nonlocal issued
        while (count is None or issued < count) and time.perf_counter() < deadline:
            spec = workload[issued % len(workload)]
            issued += 1
            results.append(await target.send(spec))
            if bar is not None:
                bar.update(1)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def _open_loop(
    target: Target,
    workload: Sequence[RequestSpec],
    point: LoadPoint,
    count: int | None,
    duration_s: float | None,
    rng: random.Random,
    bar: tqdm,
) -> list[RequestResult]:
    deadline = time.perf_counter() + duration_s if duration_s is not None else math.inf
    slots = asyncio.Semaphore(point.max_concurrency) if point.max_concurrency else None
    tasks: list[asyncio.Task[RequestResult]] = []

    async def one(spec: RequestSpec) -> RequestResult:
        if slots is None:
            result = await target.send(spec)
        else:
            async with slots:
                result = await target.send(spec)
        bar.update(1)
        return result

    next_send = time.perf_counter()
    while count is None or len(tasks) < count:
        if tasks and not math.isinf(point.request_rate):
            next_send += rng.gammavariate(point.burstiness, 1.0 / (point.request_rate * point.burstiness))
            await asyncio.sleep(max(0.0, next_send - time.perf_counter()))
        if time.perf_counter() >= deadline:
            break
        tasks.append(asyncio.create_task(one(workload[len(tasks) % len(workload)])))
    return list(await asyncio.gather(*tasks))
