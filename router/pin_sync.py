"""Keeps the prefill workers' pinned adapters in step with the placement policy (beside
step 2, off the request path).

A policy with ``pins()`` (``hot_set``) says which adapters each prefill worker should pin
in its engine's host-memory tier; every ``period_s`` this task sends a worker its pins
(``PrefillWorker.pin_adapters``, as :class:`~cluster.messages.AdapterRef` from the cached
registry view) when they changed, and everyone's again every ``resend_s`` (a restarted
worker, or a dropped adapter, lost them). A policy without pins clears what was sent.
Nothing here runs per request, and no call is awaited on the request path.
"""

from __future__ import annotations

import asyncio
import logging
import time

from cluster.messages import AdapterRef

log = logging.getLogger(__name__)


class PinSync:
    def __init__(self, pool, view, period_s: float = 0.25, resend_s: float = 2.0,
                 timeout_s: float = 30.0) -> None:
        self.pool, self.view = pool, view
        self.period_s, self.resend_s, self.timeout_s = period_s, resend_s, timeout_s
        self.sent: dict[str, tuple[AdapterRef, ...]] = {}
        self._last_full = 0.0
        self._task: asyncio.Task | None = None

    def wanted(self) -> dict[str, tuple[AdapterRef, ...]]:
        """Worker id -> the refs it should pin now (registered adapters only)."""
        pins = getattr(self.pool.prefill_policy, "pins", None)
        want = pins() if pins is not None else {}
        out = {}
        for w in self.pool.prefill:
            recs = [self.view.adapters.get(n) for n in want.get(w.worker_id, ())]
            out[w.worker_id] = tuple(AdapterRef(r.name, r.version, r.kind, r.sha256, r.uri)
                                     for r in recs if r is not None)
        return out

    async def sync_once(self) -> None:
        full = time.monotonic() - self._last_full >= self.resend_s
        if full:
            self._last_full = time.monotonic()
        want = self.wanted()
        todo = [w for w in self.pool.prefill if w.healthy and (
            want[w.worker_id] != self.sent.get(w.worker_id, ()) or
            (full and want[w.worker_id]))]
        calls = [w.actor.pin_adapters.remote(want[w.worker_id]) for w in todo]
        for w, call in zip(todo, calls):
            try:
                await asyncio.wait_for(call, self.timeout_s)
                self.sent[w.worker_id] = want[w.worker_id]
            except Exception as e:  # a dying worker: its pins go with it
                log.warning("pinning adapters on %s failed: %s", w.worker_id, e)

    async def run(self) -> None:
        while True:
            try:
                await self.sync_once()
            except Exception:
                log.exception("pin sync failed")
            await asyncio.sleep(self.period_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
