"""Small asyncio helpers for running several engine requests as one API request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


async def gather_or_cancel(calls: list[Awaitable[T]]) -> list[T]:
    """All results, or the first error with the other calls cancelled."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def merge(streams: list[AsyncIterator[T]], firsts: list[T]) -> AsyncIterator[tuple[int, T]]:
    """(stream number, item) of several streams, in arrival order, starting with their first items."""
    for i, first in enumerate(firsts):
        yield i, first
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((i, item))
            queue.put_nowait((i, end))
        except Exception as error:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((i, error))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:  # stop the pumps before anyone closes their streams
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def close_all(streams: list[AsyncIterator[Any]]) -> None:
    for stream in streams:
        await stream.aclose()  # type: ignore[attr-defined]
