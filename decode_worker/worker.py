"""The decode worker: a Ray actor owning a vLLM engine built without LoRA.

Per :class:`~cluster.messages.DecodeRequest` it submits ``prompt + [first_token]`` with the
prompt's KV declared external (our KV connector as consumer pulls it from the prefill
worker named in the handle), so nothing of the prompt is recomputed without its adapter;
vLLM computes from the first token on and the worker streams
:class:`~cluster.messages.DecodeDelta` items back to the router.
"""

from __future__ import annotations

import os
import time

from cluster.config import DecodeConfig
from cluster.errors import InvalidRequest, KVTransferFailed, WorkerUnavailable
from cluster.messages import DecodeDelta, DecodeRequest, WorkerInfo
from worker_runtime.engine_loop import as_request_error
from worker_runtime.env import resolve_kv_host


class DecodeWorker:
    """Ray actor (``ray.remote(DecodeWorker)``); all public methods are async."""

    def __init__(self, cfg: DecodeConfig, worker_id: str, redis_url: str | None = None,
                 actor_name: str = "") -> None:
        from worker_runtime.env import configure_engine_process

        configure_engine_process(cfg.engine.kv_cache_gib, cfg.cpu_cores)
        self.cfg = cfg
        self.worker_id = worker_id
        from kv_transfer.runtime import hooks_for
        from worker_runtime.engine_loop import EngineLoop

        from worker_runtime.ray_metrics import WorkerMetrics

        self.metrics = WorkerMetrics("decode", worker_id)
        self.hooks = hooks_for(worker_id)
        self.loop = EngineLoop(self._build_engine, f"decode:{worker_id}", wake=self.hooks.wake)
        self.loop.start()
        if not self.hooks.ready.wait(30):
            raise WorkerUnavailable(f"{worker_id}: KV connector did not register its caches")
        self.heartbeat = None
        if redis_url:
            import socket

            from cluster.state import MemberRecord
            from worker_runtime.heartbeat import Heartbeat

            self.heartbeat = Heartbeat(redis_url, MemberRecord(
                worker_id, "decode", actor_name, self.hooks.layout_fingerprint,
                node=socket.gethostname()), 1.0, on_members=self._prune_pairs)
            self.heartbeat.start()

    def _build_engine(self):
        from vllm import EngineArgs
        from vllm.config import KVTransferConfig
        from vllm.v1.engine.llm_engine import LLMEngine

        e, t = self.cfg.engine, self.cfg.transfer
        args = EngineArgs(
            model=e.model, dtype=e.dtype, max_model_len=e.max_model_len, seed=e.seed,
            load_format=e.load_format, max_num_batched_tokens=e.max_num_batched_tokens,
            enforce_eager=e.enforce_eager, distributed_executor_backend="uni",
            enable_prefix_caching=e.enable_prefix_caching, max_num_seqs=e.max_num_seqs,
            enable_lora=False, disable_log_stats=True,
            kv_transfer_config=KVTransferConfig(
                kv_connector="PreftKVConnector",
                kv_connector_module_path="kv_transfer.connector",
                kv_role="kv_consumer", engine_id=self.worker_id,
                kv_connector_extra_config={
                    "kv_host": resolve_kv_host(t.kv_host), "transfer_timeout_s": t.timeout_s,
                    "hold_ttl_s": t.hold_ttl_s, "transport": t.transport}))
        return LLMEngine.from_engine_args(args)

    def _prune_pairs(self, members) -> None:
        """Drop KV pair groups to prefill workers that left the cluster."""
        live = set()
        for m in members.values():
            if m.role == "prefill" and m.kv_address:
                host, _, port = m.kv_address.rpartition(":")
                live.add((host, int(port)))
        self.hooks.transport.prune(live_addresses=live)

    async def info(self) -> WorkerInfo:
        eng = self.loop.engine
        return WorkerInfo(
            worker_id=self.worker_id, role="decode", kv_layout=self.hooks.layout_fingerprint,
            max_model_len=eng.model_config.max_model_len,
            vocab_size=eng.model_config.get_vocab_size(), eos_token_id=None,
            lora_enabled=eng.vllm_config.lora_config is not None,
            engine_start_s=self.loop.start_s, pid=os.getpid())

    async def kv_usage(self) -> dict:
        """Blocks in use right now (0 when idle: nothing leaked)."""
        def read(eng):
            pool = eng.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
            total = pool.num_gpu_blocks - 1  # block 0 is the null block
            return {"blocks_total": total, "blocks_free": pool.get_num_free_blocks(),
                    "requests": self.loop.num_requests}
        return await self.loop.call(read)

    async def reset_prefix_cache(self) -> bool:
        return await self.loop.call(lambda eng: eng.reset_prefix_cache())

    async def decode(self, req: DecodeRequest):
        """Async generator of :class:`DecodeDelta` (a Ray streaming call)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if req.kv.layout != self.hooks.layout_fingerprint:
            raise KVTransferFailed(
                f"refusing to pair prefill {req.kv.engine_id} (KV layout {req.kv.layout}) with "
                f"decode {self.worker_id} (KV layout {self.hooks.layout_fingerprint}): both need "
                "the same model, block size and KV cache dtype")
        s = req.sampling.validate()
        if s.max_tokens < 2:
            raise InvalidRequest("max_tokens", "decode needs max_tokens >= 2 (the first token "
                                 "comes from prefill)")
        params = SamplingParams(
            max_tokens=s.max_tokens - 1, temperature=s.temperature, top_p=s.top_p,
            seed=None if s.seed is None else (s.seed + 1) % 2**63, stop=list(s.stop) or None,
            ignore_eos=s.ignore_eos, output_kind=RequestOutputKind.DELTA,
            extra_args={"kv_transfer_params": req.kv.to_params()})
        prompt = TokensPrompt(prompt_token_ids=[*req.prompt_token_ids, req.first_token],
                              cache_salt=req.kv_namespace)
        t0 = time.perf_counter()
        q = self.loop.submit(req.request_id, prompt, params)
        first, finished, n_tokens = True, False, 0
        try:
            while True:
                out = await q.get()
                if isinstance(out, BaseException):
                    raise as_request_error(out)
                comp = out.outputs[0]
                if comp.finish_reason == "error":
                    raise KVTransferFailed(
                        f"KV transfer {req.kv.transfer_id} from {req.kv.engine_id} to "
                        f"{self.worker_id} failed; the request was not decoded")
                delta = DecodeDelta(tuple(comp.token_ids), comp.text, comp.finish_reason)
                if first:
                    first = False
                    rec = self.hooks.pop_record(req.kv.transfer_id)
                    total = time.perf_counter() - t0
                    xfer = rec.seconds if rec else 0.0
                    if rec:
                        self.metrics.kv_pull(rec.bytes, rec.seconds)
                    delta = DecodeDelta(delta.token_ids, delta.text, delta.finish_reason,
                                        kv_transfer_s=xfer, kv_bytes=rec.bytes if rec else 0,
                                        first_step_s=max(0.0, total - xfer))
                finished = out.finished
                n_tokens += len(delta.token_ids)
                if finished:
                    self.metrics.request(n_tokens, time.perf_counter() - t0)
                yield delta
                if finished:
                    return
        finally:
            if not finished:  # cancelled, failed or the caller went away: free its blocks
                self.loop.abort(req.request_id)

    async def shutdown(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        self.loop.stop()

