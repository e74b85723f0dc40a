"""Drives one vLLM ``LLMEngine`` in a dedicated thread: schedule → run → dispatch.

The worker actor's asyncio methods call :meth:`EngineLoop.submit` (or :meth:`drive`,
:meth:`run`); the engine thread adds requests, steps the engine while its scheduler has
anything to do (running requests, requests waiting for KV, blocks held for transfer), and
hands **each step's outputs to the event loop in one callback**: every request's sink runs
there, one after another, so whatever the worker sends for that step (the plane's step
message, ``worker_runtime/plane.py``) leaves once. The engine is built inside the thread so
vLLM's OpenMP binding applies to the thread that runs the model.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any, Callable

Sink = Callable[[Any], None]   # a request's outputs (or the exception that ended it)

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05     # nothing scheduled: how long to sleep between inbox checks
_PENDING_WAIT_S = 0.002  # only transfers pending: wait for a transfer to complete


class EngineDead(RuntimeError):
    """The engine thread crashed; every request on it fails and the worker is unhealthy."""


class EngineLoop:
    def __init__(self, build: Callable[[], Any], name: str,
                 wake: threading.Event | None = None,
                 on_crash: Callable[[BaseException], None] | None = None,
                 on_unclaimed: Callable[[Any], None] | None = None) -> None:
        self._build = build
        self._on_crash = on_crash   # after the requests in flight got EngineDead
        # A finished output nobody reads (its caller left as the engine finished it): what
        # it holds (a prefill's KV offer) is released here, not left to a TTL. Any thread.
        self._on_unclaimed = on_unclaimed or (lambda out: None)
        self.name = name
        self.wake = wake or threading.Event()
        self._inbox: deque = deque()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, Sink]] = {}
        self._ready = threading.Event()
        self._stop = threading.Event()
        self.engine = None
        self.error: BaseException | None = None
        self.start_s = 0.0
        self.steps = 0
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)

    # ------------------------------------------------------------------ caller side
    def start(self, timeout: float = 600.0) -> None:
        t0 = time.perf_counter()
        self._thread.start()
        if not self._ready.wait(timeout):
            raise EngineDead(f"{self.name}: engine did not start within {timeout} s")
        if self.error is not None:
            raise EngineDead(f"{self.name}: engine failed to start: {self.error}") from self.error
        self.start_s = time.perf_counter() - t0

    def submit(self, request_id: str, prompt: Any, params: Any, sink: Sink | None = None,
               **kwargs: Any) -> asyncio.Queue | None:
        """Queue a request; its outputs (or an exception) go to ``sink`` on the caller's
        event loop, once per engine step, or without one onto the returned queue."""
        if self.error is not None:
            raise EngineDead(f"{self.name}: engine is dead: {self.error}")
        q = None
        if sink is None:
            q = asyncio.Queue()
            sink = q.put_nowait
        self._sinks[request_id] = (asyncio.get_running_loop(), sink)
        self._inbox.append(("add", request_id, prompt, params, kwargs))
        self.wake.set()
        return q

    async def drive(self, request_id: str, prompt: Any, params: Any,
                    handle: Callable[[Any], bool], **kwargs: Any) -> None:
        """Submit a request and call ``handle(output)`` on this event loop for each of its
        engine outputs, in the step's one callback; returns once the engine finished it or
        ``handle`` returned True (e.g. a stop string: the engine request is aborted).
        ``handle`` raising, the engine failing it, or the caller being cancelled aborts the
        engine request too (its blocks are freed) and raises."""
        done = asyncio.get_running_loop().create_future()

        def sink(out: Any) -> None:
            if done.done():
                return
            if isinstance(out, BaseException):
                done.set_exception(as_request_error(out))
                return
            try:
                if handle(out) or out.finished:
                    done.set_result(None)
            except BaseException as e:
                done.set_exception(e)

        self.submit(request_id, prompt, params, sink=sink, **kwargs)
        try:
            await done
        finally:
            self.abort(request_id)   # a no-op once the engine finished it

    async def run(self, request_id: str, prompt: Any, params: Any, **kwargs: Any):
        """Submit a request and yield its outputs until the engine finishes it. Leaving
        early (the caller stops, is cancelled or fails; use ``contextlib.aclosing``)
        aborts the engine request, so its blocks are freed."""
        q = self.submit(request_id, prompt, params, **kwargs)
        finished = False
        try:
            while not finished:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise as_request_error(out)
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)
                while not q.empty():    # finished as the caller left: nobody reads it
                    left = q.get_nowait()
                    if not isinstance(left, BaseException) and left.finished:
                        self._on_unclaimed(left)

    def abort(self, request_id: str) -> None:
        if self._sinks.pop(request_id, None) is not None:
            self._inbox.append(("abort", request_id))
            self.wake.set()

    def call(self, fn: Callable[[Any], Any]) -> "asyncio.Future":
        """Run ``fn(engine)`` on the engine thread (engine state is not thread-safe)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._inbox.append(("call", fn, loop, fut))
        self.wake.set()
        return fut

    @property
    def num_requests(self) -> int:
        return len(self._sinks)

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ engine thread
    def _deliver(self, request_id: str, item: Any, final: bool) -> None:
        entry = self._sinks.pop(request_id, None) if final else self._sinks.get(request_id)
        if entry is not None:
            loop, sink = entry
            loop.call_soon_threadsafe(_dispatch, [(sink, item)])

    def _deliver_step(self, outputs: list) -> None:
        """One engine step's outputs: one callback per event loop, every sink in it."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        sinks = self._sinks
        for out in outputs:
            entry = sinks.pop(out.request_id, None) if out.finished else sinks.get(
                out.request_id)
            if entry is not None:
                batches.setdefault(entry[0], []).append((entry[1], out))
            elif out.finished:
                self._on_unclaimed(out)
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_dispatch, batch)

    def _drain_inbox(self) -> None:
        while self._inbox:
            op = self._inbox.popleft()
            if op[0] == "add":
                _, rid, prompt, params, kwargs = op
                try:
                    self.engine.add_request(rid, prompt, params, **kwargs)
                except Exception as e:  # vLLM's own validation: per-request error
                    self._deliver(rid, e, final=True)
            elif op[0] == "abort":
                self.engine.abort_request([op[1]])
            elif op[0] == "call":
                _, fn, loop, fut = op
                try:
                    res = fn(self.engine)
                    loop.call_soon_threadsafe(_set_result, fut, res, None)
                except Exception as e:
                    loop.call_soon_threadsafe(_set_result, fut, None, e)

    def _has_work(self) -> bool:
        # In-process engine: LLMEngine -> InprocClient -> EngineCore -> Scheduler.
        # has_requests() also covers finished requests whose blocks wait for a transfer.
        return self.engine.engine_core.engine_core.scheduler.has_requests()

    def _run(self) -> None:
        from worker_runtime.env import name_this_thread

        try:
            self.engine = self._build()
        except BaseException as e:
            self.error = e
            self._ready.set()
            return
        name_this_thread("preft-engine")   # after vLLM's start-up, which names it its way
        self._ready.set()
        try:
            while not self._stop.is_set():
                self._drain_inbox()
                if self._has_work():
                    outputs = self.engine.step()
                    self.steps += 1
                    if outputs:
                        self._deliver_step(outputs)
                    else:
                        self.wake.wait(_PENDING_WAIT_S)
                        self.wake.clear()
                else:
                    self.wake.wait(_IDLE_WAIT_S)
                    self.wake.clear()
        except BaseException as e:
            log.exception("%s: engine loop crashed", self.name)
            self.error = e
            for rid in list(self._sinks):
                self._deliver(rid, EngineDead(f"{self.name}: engine crashed: {e}"), final=True)
            if self._on_crash is not None:
                self._on_crash(e)


def _dispatch(batch: list) -> None:
    """On the event loop: each request's output to its sink; one failing sink is its own."""
    for sink, item in batch:
        try:
            sink(item)
        except Exception:
            log.exception("an output sink failed")


def _set_result(fut: asyncio.Future, res: Any, err: BaseException | None) -> None:
    if fut.done():
        return
    if err is not None:
        fut.set_exception(err)
    else:
        fut.set_result(res)


def as_request_error(e: BaseException) -> Exception:
    """Map what the engine thread delivered to the typed errors the router understands."""
    from cluster.errors import InvalidRequest, PreftError, WorkerUnavailable

    if isinstance(e, EngineDead):
        return WorkerUnavailable(str(e))
    if isinstance(e, PreftError):
        return e
    if isinstance(e, ValueError):  # vLLM's input validation
        return InvalidRequest("request", str(e))
    return e if isinstance(e, Exception) else RuntimeError(str(e))
