"""The engine loop hands a finished output nobody reads to ``on_unclaimed`` (a prefill
worker releases the KV offer it carries there, instead of holding it until the TTL)."""

from __future__ import annotations

import asyncio
import threading
from contextlib import aclosing
from types import SimpleNamespace

from worker_runtime.engine_loop import EngineLoop


class _Engine:
    """Finishes every request it was given once ``finish`` is set, aborted or not (an abort
    that arrives in the step that finishes the request changes nothing)."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.finish = threading.Event()
        sched = SimpleNamespace(has_requests=lambda: bool(self.added))
        self.engine_core = SimpleNamespace(engine_core=SimpleNamespace(scheduler=sched))

    def add_request(self, rid, prompt, params, **kw):
        self.added.append(rid)

    def abort_request(self, rids):
        self.aborted.extend(rids)

    def step(self):
        if not self.finish.wait(0.01):
            return []
        done, self.added = self.added, []
        return [SimpleNamespace(request_id=r, finished=True,
                                kv_transfer_params={"transfer_id": 7}) for r in done]


async def test_an_output_finished_after_its_caller_left_goes_to_on_unclaimed():
    engine, unclaimed = _Engine(), []
    loop = EngineLoop(lambda: engine, "fake", on_unclaimed=unclaimed.append)
    loop.start()
    try:
        async def consume():
            async with aclosing(loop.run("r1", "prompt", None)) as outs:
                async for _ in outs:
                    pass

        task = asyncio.ensure_future(consume())
        while not engine.added:
            await asyncio.sleep(0.005)
        task.cancel()                          # the caller leaves (deadline, cancel)
        await asyncio.gather(task, return_exceptions=True)
        for _ in range(100):
            if engine.aborted:
                break
            await asyncio.sleep(0.005)
        engine.finish.set()                    # ... as the engine finishes it anyway
        for _ in range(200):
            if unclaimed:
                break
            await asyncio.sleep(0.01)
        assert [(o.request_id, o.kv_transfer_params) for o in unclaimed] == [
            ("r1", {"transfer_id": 7})]
    finally:
        loop.stop()
