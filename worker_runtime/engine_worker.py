"""What every pool's worker actor shares: one engine, its thread, membership, info, shutdown.

Prefill, decode and colocated workers (steps 3-5 of the request path) are Ray actors that
each own one in-process vLLM engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor
``uni``) driven by an :class:`~worker_runtime.engine_loop.EngineLoop`. This base builds the
engine from the pool's :class:`~cluster.config.EngineConfig` plus what the subclass adds
(:meth:`EngineWorker.engine_args`: LoRA), creates the prefill or decode engine's
:class:`~kv_transfer.endpoint.KVEndpoint` with it (handed to the engine's KV connector in
the KV transfer config; the worker keeps it as ``self.kv``), joins the cluster by
heartbeat, and answers the calls the router makes of every worker (:class:`WorkerApi`):
``info``, ``kv_usage``, ``reset_prefix_cache``, ``shutdown``, and ``plane``: the address of
the worker's plane (``worker_runtime/plane.py``), where the router's calls on a request's
token path arrive (the pool's :meth:`EngineWorker.plane_ops`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from typing import Any, Protocol

from cluster.config import EngineConfig, TransferConfig
from cluster.errors import WorkerUnavailable
from cluster.messages import KVUsage, WorkerInfo
from cluster.state import MemberRecord

HEARTBEAT_S = 1.0
EXIT_AFTER_CRASH_S = 1.0   # time for the failed requests' errors to reach their callers

log = logging.getLogger(__name__)


class WorkerApi(Protocol):
    """The calls the router makes of every worker (Ray actor methods, awaited)."""

    async def info(self) -> WorkerInfo: ...
    async def plane(self) -> str: ...
    async def kv_usage(self) -> KVUsage: ...
    async def shutdown(self) -> None: ...


class EngineWorker:
    """Base of the worker actors. Subclasses set ``role``, may set ``kv_role``
    (``kv_producer`` | ``kv_consumer``: the engine gets our KV connector, the worker its KV
    endpoint as ``self.kv``) and override :meth:`engine_args`, :meth:`after_build` and
    :meth:`residency`."""

    role = ""
    kv_role: str | None = None
    holds_adapters = False      # publishes residency (adapter -> tier@version) by heartbeat

    def __init__(self, engine: EngineConfig, cpu_cores: str | None, worker_id: str,
                 redis_url: str | None, actor_name: str,
                 transfer: TransferConfig | None = None) -> None:
        from worker_runtime.env import configure_engine_process

        configure_engine_process(engine.kv_cache_gib, cpu_cores, engine.tensor_parallel_size)
        from worker_runtime.engine_loop import EngineLoop
        from worker_runtime.ray_metrics import WorkerMetrics

        self.engine_cfg, self.transfer, self.cpu_cores = engine, transfer, cpu_cores
        self.worker_id = worker_id
        self._plane = None
        self.metrics = WorkerMetrics(self.role, worker_id)
        self.kv = self._kv_endpoint()
        offers = getattr(self.kv, "offers", None)
        if offers is not None:
            offers.on_expire = lambda n: self.metrics.kv_offer_released("ttl", n)
        self.loop = EngineLoop(self._build_engine, f"{self.role}:{worker_id}",
                               wake=self.kv.wake if self.kv is not None else None,
                               on_crash=self._engine_crashed,
                               on_unclaimed=self._unclaimed_output)
        self.loop.start()
        self.tokenizer = self.loop.engine.get_tokenizer()
        if self.kv is not None and not self.kv.ready.wait(30):
            raise WorkerUnavailable(f"{worker_id}: KV connector did not register its caches")
        self.heartbeat = None
        if redis_url:
            from worker_runtime.heartbeat import Heartbeat

            self.heartbeat = Heartbeat(
                redis_url, self._member(actor_name), HEARTBEAT_S, on_members=self.on_members,
                residency=self.residency if self.holds_adapters else None)
            self.heartbeat.start()

    # ------------------------------------------------------------------ engine
    def engine_args(self) -> dict:
        """What this pool adds to the engine's arguments."""
        return {}

    def after_build(self, engine: Any) -> None:
        """Engine-thread hooks installed once the engine exists."""

    def plane_ops(self) -> dict:
        """The calls this pool answers on its plane (``worker_runtime.plane.Op`` by name)."""
        return {}

    def plane_host_secret(self) -> tuple[str, str]:
        """Where the plane binds and the cluster secret it authenticates with."""
        from worker_runtime.env import resolve_kv_host

        return resolve_kv_host(self.transfer.kv_host), self.transfer.secret

    def _build_engine(self):
        from vllm import EngineArgs
        from vllm.config import StructuredOutputsConfig
        from vllm.v1.engine.llm_engine import LLMEngine

        from worker_runtime.env import use_engine_cores

        use_engine_cores(self.cpu_cores)  # engine thread: one OpenMP thread per core
        import torch

        self.engine_threads = torch.get_num_threads()
        e = self.engine_cfg
        # tensor parallel: the ranks are processes of this worker (vLLM's mp executor)
        args = EngineArgs(
            model=e.model, dtype=e.dtype, max_model_len=e.max_model_len, seed=e.seed,
            load_format=e.load_format, max_num_batched_tokens=e.max_num_batched_tokens,
            enforce_eager=e.enforce_eager, tensor_parallel_size=e.tensor_parallel_size,
            distributed_executor_backend="uni" if e.tensor_parallel_size == 1 else "mp",
            enable_prefix_caching=e.enable_prefix_caching, max_num_seqs=e.max_num_seqs,
            disable_log_stats=True, kv_transfer_config=self._kv_transfer_config(),
            # structured output: one backend (llguidance) on every engine of a request, so
            # the prefill and decode grammars are the same; compact JSON
            structured_outputs_config=StructuredOutputsConfig(
                backend="guidance", disable_any_whitespace=True),
            **self.engine_args())
        engine = LLMEngine.from_engine_args(args)
        if hasattr(self.kv, "attach"):   # tensor parallel: every rank's KV endpoint
            self.kv.attach(engine)
        self.after_build(engine)
        return engine

    def _kv_endpoint(self):
        """This engine's KV endpoint (prefill and decode roles), created with the engine:
        handed to its connector in the KV transfer config, used here by the worker. A
        tensor-parallel engine's: one per rank, seen here as a ``RankedEndpoint``."""
        if self.kv_role is None:
            return None
        from kv_transfer.endpoint import KVEndpoint
        from worker_runtime.env import resolve_kv_host

        t = self.transfer
        tp = self.engine_cfg.tensor_parallel_size
        if tp > 1:
            from kv_transfer.ranks import RankedEndpoint, RankSpec

            return RankedEndpoint(RankSpec(
                self.worker_id, self.kv_role, tp, resolve_kv_host(t.kv_host), t.timeout_s,
                t.hold_ttl_s, t.transport, t.shared_memory, secret=t.secret))
        return KVEndpoint(self.worker_id, self.kv_role, kv_host=resolve_kv_host(t.kv_host),
                          timeout_s=t.timeout_s, hold_ttl_s=t.hold_ttl_s,
                          transport=t.transport, secret=t.secret,
                          shared_memory=t.shared_memory, layerwise=t.layerwise,
                          staging_bytes=t.staging_mib << 20)

    def _kv_transfer_config(self):
        if self.kv is None:
            return None
        from vllm.config import KVTransferConfig

        from kv_transfer.endpoint import EXTRA_CONFIG_KEY

        return KVTransferConfig(
            kv_connector="PreftKVConnector", kv_connector_module_path="kv_transfer.connector",
            kv_role=self.kv_role, engine_id=self.worker_id,
            # a failed pull fails the request: never a base-model recompute of the prompt
            kv_load_failure_policy="fail",
            kv_connector_extra_config={EXTRA_CONFIG_KEY: self.kv})

    def _unclaimed_output(self, out) -> None:
        """A finished engine request whose caller left as it finished (cancelled, past its
        deadline): a prefill's KV offer for it is released now, not at ``hold_ttl_s``."""
        params = getattr(out, "kv_transfer_params", None) or {}
        if self.kv is not None and self.kv.is_producer and "transfer_id" in params:
            self.kv.release(params["transfer_id"])
            self.metrics.kv_offer_released("caller_left")

    def _engine_crashed(self, error: BaseException) -> None:
        """The engine died after it started (e.g. one of a tensor-parallel engine's ranks
        was killed: vLLM's executor fails every step after). Its requests in flight got a
        retriable error; this worker leaves the cluster now and its process ends a moment
        later, so Ray starts a fresh one (``ClusterConfig.max_restarts``) instead of a live
        actor answering every request with a dead engine."""
        log.error("%s: engine died (%s); leaving the cluster, exiting for a restart",
                  self.worker_id, error)
        heartbeat = getattr(self, "heartbeat", None)
        if heartbeat is not None:
            heartbeat.stop()
        threading.Timer(EXIT_AFTER_CRASH_S, os._exit, args=(1,)).start()

    # ------------------------------------------------------------------ membership
    def _member(self, actor_name: str) -> MemberRecord:
        kv = self.kv
        return MemberRecord(self.worker_id, self.role, actor_name,
                            kv.layout_fingerprint if kv is not None else "",
                            node=socket.gethostname(),
                            kv_address=kv.kv_address if kv is not None else "")

    def residency(self) -> dict[str, str]:
        """Adapters held here (published with the heartbeat when ``holds_adapters``)."""
        return {}

    def on_members(self, members) -> None:
        """The cluster's membership, every few beats (heartbeat thread): tear down KV pair
        groups whose other side left."""
        if self.kv is not None:
            self.kv.prune(members)

    # ------------------------------------------------------------------ API
    async def plane(self) -> str:
        """The plane's address (``tcp://host:port``), started on first ask, on this actor's
        event loop: the router's calls on a request's token path arrive there."""
        if self._plane is None:
            from worker_runtime.env import name_this_thread
            from worker_runtime.plane import PlaneServer

            name_this_thread("preft-loop")   # this actor's event loop thread
            host, secret = self.plane_host_secret()
            self._plane = PlaneServer(self.plane_ops(), secret, host, self.worker_id)
        return await self._plane.start()

    async def plane_stats(self) -> dict[str, int]:
        """Calls answered, step messages sent, frames refused on the plane, engine steps."""
        p = self._plane
        return {"calls": p.calls if p else 0, "messages": p.messages if p else 0,
                "refused": p.refused if p else 0, "steps": self.loop.steps}

    async def info(self) -> WorkerInfo:
        eng = self.loop.engine
        return WorkerInfo(
            worker_id=self.worker_id, role=self.role,
            kv_layout=self.kv.layout_fingerprint if self.kv is not None else "",
            max_model_len=eng.model_config.max_model_len,
            vocab_size=eng.model_config.get_vocab_size(), eos_token_id=self._eos_token_id(),
            lora_enabled=eng.vllm_config.lora_config is not None,
            engine_start_s=self.loop.start_s, pid=os.getpid(),
            engine_threads=self.engine_threads,
            tensor_parallel_size=self.engine_cfg.tensor_parallel_size,
            block_size=eng.vllm_config.cache_config.block_size)

    def _eos_token_id(self) -> int | None:
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return eos if isinstance(eos, int) else None

    async def kv_usage(self) -> KVUsage:
        """Blocks in use right now (0 when idle: nothing leaked)."""
        def read(eng):
            pool = eng.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
            return KVUsage(blocks_total=pool.num_gpu_blocks - 1,  # block 0 is the null block
                           blocks_free=pool.get_num_free_blocks(),
                           requests=self.loop.num_requests)
        return await self.loop.call(read)

    async def reset_prefix_cache(self) -> bool:
        return await self.loop.call(lambda eng: eng.reset_prefix_cache())

    async def shutdown(self) -> None:
        """Leave the cluster, stop the engine, close the KV endpoint's pairs: each may wait
        seconds (Redis, the engine thread's step, a pair's pull), so off the event loop."""
        if self._plane is not None:   # its calls end (their engine requests are aborted)
            self._plane.close()
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.loop.stop()
        if self.kv is not None:
            self.kv.close()
