"""asyncio helpers shared by the router and the workers (no heavy imports).

:func:`merge` runs the streams of a request's ``n`` samples side by side (the router merges
the decode workers' streams); :func:`all_of` runs a colocated request's ``n`` sample
coroutines, all or none.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator


async def merge(streams) -> AsyncIterator:
    """The items of several async iterators as they come. A failure in one cancels the
    others and is raised; leaving early cancels them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream):
        try:
            async for item in stream:
                await queue.put(item)
        finally:
            await queue.put(done)
    tasks = [asyncio.ensure_future(pump(s)) for s in streams]
    try:
        for _ in tasks:
            while (item := await queue.get()) is not done:
                yield item
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()
    finally:
        for t in tasks:
            t.cancel()


async def all_of(coros) -> None:
    """Await every coroutine; the first failure (or the caller's cancel) cancels the rest
    and is raised."""
    if len(coros) == 1:
        await coros[0]
        return
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        for t in asyncio.as_completed(tasks):
            await t
    finally:
        for t in tasks:
            t.cancel()
