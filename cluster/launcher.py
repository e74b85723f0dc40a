"""Brings a cluster up: Ray, the prefill and decode worker actors, and the router.

Used by ``preft up``/``preft demo`` and by the integration tests. The router runs on an
asyncio loop (the caller's, or a background thread's for tests); the workers are Ray actors
that each own one in-process vLLM engine pinned to its own cores.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import replace
from typing import Callable

from cluster.config import ClusterConfig, ConfigError
from cluster.messages import WorkerInfo

log = logging.getLogger(__name__)


def split_cores(n: int) -> tuple[str, str]:
    """Disjoint OpenMP core sets for the prefill and decode engines on one machine."""
    if n <= 1:
        return "0", "0"
    half = n // 2
    fmt = lambda a, b: str(a) if a == b else f"{a}-{b}"  # noqa: E731
    return fmt(0, half - 1), fmt(half, n - 1)


class LocalCluster:
    def __init__(self, cfg: ClusterConfig, *, log_to_driver: bool = False) -> None:
        self.cfg = cfg
        self.log_to_driver = log_to_driver
        self.pool = None
        self.port: int | None = None
        self._server = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._owns_ray = False

    # -------------------------------------------------------------- workers
    def start_workers(self, progress: Callable[[str], None] | None = None) -> None:
        import ray

        from decode_worker.worker import DecodeWorker
        from prefill_worker.worker import PrefillWorker
        from router.pool import WorkerHandle, WorkerPool

        say = progress or (lambda msg: log.info(msg))
        cfg = self.cfg
        if not ray.is_initialized():
            say("starting Ray")
            ray.init(address=cfg.ray_address, num_cpus=cfg.num_cpus,
                     include_dashboard=False, object_store_memory=256 << 20 if not cfg.ray_address else None,
                     log_to_driver=self.log_to_driver, logging_level=logging.WARNING,
                     configure_logging=True)
            self._owns_ray = True
        pre, dec = cfg.prefill, cfg.decode
        if not cfg.ray_address and pre.cpu_cores is None and dec.cpu_cores is None:
            p_cores, d_cores = split_cores(os.cpu_count() or 2)
            pre, dec = replace(pre, cpu_cores=p_cores), replace(dec, cpu_cores=d_cores)
        say("starting prefill and decode workers (vLLM engines)")
        p_actor = ray.remote(PrefillWorker).options(
            name="preft-prefill-0", num_cpus=1, max_concurrency=1000).remote(pre, "prefill-0")
        d_actor = ray.remote(DecodeWorker).options(
            name="preft-decode-0", num_cpus=1, max_concurrency=1000).remote(dec, "decode-0")
        p_info: WorkerInfo = ray.get(p_actor.info.remote())
        say(f"prefill worker ready ({p_info.engine_start_s:.1f} s engine start)")
        d_info: WorkerInfo = ray.get(d_actor.info.remote())
        say(f"decode worker ready ({d_info.engine_start_s:.1f} s engine start)")
        if d_info.lora_enabled:
            raise ConfigError("decode engine was built with LoRA; decode must never load adapters")
        if p_info.kv_layout != d_info.kv_layout:
            raise ConfigError(
                f"refusing to pair prefill-0 (KV layout {p_info.kv_layout}) with decode-0 "
                f"(KV layout {d_info.kv_layout}): both need the same model, block size and dtype")
        self.pool = WorkerPool(prefill=[WorkerHandle(p_info, p_actor)],
                               decode=[WorkerHandle(d_info, d_actor)])

    def register_adapter(self, name: str, path: str) -> int:
        """Register (or replace) an adapter on every prefill worker; returns its version."""
        import ray

        versions = ray.get([w.actor.register_adapter.remote(name, path) for w in self.pool.prefill])
        for w in self.pool.prefill:
            w.info = ray.get(w.actor.info.remote())
        return max(versions)

    # -------------------------------------------------------------- router
    async def start_router(self) -> int:
        from router.server import create_server, start

        self._server, self.port = create_server(self.cfg.router, self.pool)
        await start(self._server)
        return self.port

    def start_router_in_thread(self) -> int:
        """Run the router on a background event loop (tests, demo)."""
        ready = threading.Event()
        err: list[BaseException] = []

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self.start_router())
            except BaseException as e:
                err.append(e)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="router", daemon=True)
        self._thread.start()
        ready.wait(60)
        if err:
            raise err[0]
        return self.port

    @property
    def address(self) -> str:
        return f"{self.cfg.router.host}:{self.port}"

    async def stop_router(self) -> None:
        if self._server is not None:
            await self._server.health_servicer.enter_graceful_shutdown()
            await self._server.stop(grace=2)
            self._server = None

    def stop(self) -> None:
        import ray

        if self._loop is not None:
            fut = asyncio.run_coroutine_threadsafe(self.stop_router(), self._loop)
            try:
                fut.result(10)
            except Exception:
                pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None
        if self.pool is not None:
            for w in self.pool.prefill + self.pool.decode:
                try:
                    ray.get(w.actor.shutdown.remote(), timeout=15)
                except Exception:
                    pass
                ray.kill(w.actor)
            self.pool = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    def wait_until(self, cond: Callable[[], bool], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.05)
        return cond()
