"""The prefill worker: step 3 of the request path.

A Ray actor owning a vLLM engine with LoRA enabled and our KV connector as producer. Per
request it applies the adapter over the prompt, samples the first output token (so that
token *is* produced with the adapter), and keeps the prompt's KV blocks until the decode
worker pulls them (or a TTL frees them). It returns a :class:`~cluster.messages.PrefillResult`
carrying the first token and a :class:`~cluster.messages.KVHandle`.

The KV of a prompt is salted with the adapter's name and version (vLLM's ``cache_salt``), so
prefix caching never serves one adapter's KV to another, or to a replaced version.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from dataclasses import replace

from cluster.config import PrefillConfig
from cluster.errors import WorkerUnavailable
from cluster.messages import AdapterStats, KVHandle, PrefillRequest, PrefillResult, Sampling
from prefill_worker.adapter_host import AdapterWorker, Resolved
from prefill_worker.reft_runtime import EXTRA_ARG as REFT_EXTRA_ARG
from worker_runtime import sampler_state
from worker_runtime.sequence import (OutputStream, engine_params, prompt_logprobs,
                                     prompt_text, token_logprobs)


class PrefillWorker(AdapterWorker):
    """Ray actor (``ray.remote(PrefillWorker)``); all public methods are async."""

    role = "prefill"
    kv_role = "kv_producer"

    def __init__(self, cfg: PrefillConfig, worker_id: str, redis_url: str | None = None,
                 cache_dir: str | None = None, actor_name: str = "") -> None:
        super().__init__(cfg, worker_id, redis_url, cache_dir, actor_name, transfer=cfg.transfer)
        self.prompt_tokens = self.prompt_tokens_cached = 0

    def after_build(self, engine) -> None:
        super().after_build(engine)
        # A seeded request's generator state after its first token goes to decode with it.
        engine.collective_rpc(sampler_state.keep_states)

    def plane_ops(self) -> dict:
        """The router's prefill call arrives on the plane (its result leaves with the
        engine step's other answers)."""
        from worker_runtime.plane import Op

        return {"prefill": Op(PrefillRequest, lambda req, call: self.prefill(req),
                              orphan=self._orphaned)}

    def _orphaned(self, result: PrefillResult):
        """What undoes an answer the router gave up on as it left (nobody will pull its
        KV): the release of its offers; None when it holds none."""
        held = tuple(r.kv.transfer_id for r in (result, *result.siblings) if r.kv is not None)
        if not held:
            return None
        return lambda: [self.kv.release(t) for t in held]

    # ------------------------------------------------------------------ API
    async def release(self, transfer_id: int) -> bool:
        """Free a transfer's held blocks (the router: decode never pulled them). Never
        waits; True when held blocks were freed now, False when they were not held (already
        pulled, released or expired; or not yet offered: then freed when they are)."""
        return self.kv.release(transfer_id)

    async def held_transfers(self) -> int:
        """Prompts whose KV this worker keeps for decode: offers (held blocks or a staged
        copy), plus staging buffers still being filled or read (0 when idle)."""
        staging = self.kv.staging.stats() if self.kv.staging is not None else {}
        return len(self.kv.offers) + staging.get("staging", 0) + staging.get("lent", 0)

    async def stats(self) -> AdapterStats:
        recs = self.kv.records()
        return AdapterStats(
            requests=self.loop.num_requests, tier_hits=dict(self.adapters.tier_hits),
            resident=self.residency(), transfers=len(recs), bytes=sum(r.bytes for r in recs),
            failed=sum(not r.ok for r in recs), held=len(self.kv.offers),
            expired=self.kv.offers.expired, pinned=self.adapters.pinned(),
            pin_loads=self.adapters.pin_loads, prompt_tokens=self.prompt_tokens,
            prompt_tokens_cached=self.prompt_tokens_cached)

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        """The prompt with its adapter, the first token, the KV handle for decode. With
        ``sampling.n > 1``, n samples of the prompt: engine requests submitted together,
        so the prompt's full blocks are computed once and the others hit the prefix cache;
        samples 1.. come back as the result's ``siblings``."""
        t_in = time.time()
        ids, r = await self.admit(req)
        namespace = self.adapters.namespace(r, len(ids))
        t0 = time.time()
        samples = [asyncio.ensure_future(self._sample(req, i, ids, r, namespace, t_in, t0))
                   for i in range(req.sampling.n)]
        try:
            done = [await s for s in samples]
        except BaseException:   # failed or cancelled: free what finished samples hold
            for s in samples:
                s.cancel()
            await asyncio.gather(*samples, return_exceptions=True)
            for s in samples:
                d = None if s.cancelled() or s.exception() else s.result()
                if d is not None and d.kv is not None:
                    self.kv.release(d.kv.transfer_id)
            raise
        self.metrics.request(len(ids), time.time() - t0)
        self.metrics.adapter(r.tier if r else "")
        return replace(done[0], siblings=tuple(done[1:]))

    async def _sample(self, req: PrefillRequest, i: int, ids: list[int], r: Resolved | None,
                      namespace: str, t_in: float, t0: float) -> PrefillResult:
        """One sample: its first token (sampled with the adapter) and its KV handle."""
        s = req.sampling.sample(i)
        rid = req.request_id if i == 0 else f"{req.request_id}-s{i}"
        hand_over = s.max_tokens > 1
        out = await self._run_prompt(rid, ids, r, namespace,
                                     self._sampling_params(s, hand_over, r, rid))
        first = out.outputs[0].token_ids[0]
        # The first generated token enters the request's output stream (the decode worker
        # replays it): EOS, a stop string inside its text, or max_tokens=1 end it here.
        engine_finish = "stop" if out.outputs[0].finish_reason == "stop" else (
            None if hand_over else "length")
        step = OutputStream(self.tokenizer, s, rid).append([first], engine_finish)
        kv = self._handle(out, step.finish_reason)
        state = await self._sampler_state(rid, s) if hand_over else b""
        lps = token_logprobs([first], out.outputs[0].logprobs, s.logprobs, self.tokenizer)
        cached = out.num_cached_tokens or 0
        self.prompt_tokens, self.prompt_tokens_cached = (self.prompt_tokens + len(ids),
                                                         self.prompt_tokens_cached + cached)
        return PrefillResult(
            request_id=rid, prompt_token_ids=tuple(ids), first_token=first,
            first_text=step.text, finish_reason=step.finish_reason, kv=kv,
            kv_namespace=namespace, queue_s=max(0.0, t0 - (req.enqueued_at or t_in)),
            prefill_s=time.time() - t0, adapter_tier=r.tier if r else "",
            adapter_load_s=r.load_s if r else 0.0, t_start=t_in, t_done=time.time(),
            first_logprob=lps[0] if lps else None, cached_tokens=cached,
            prompt_logprobs=prompt_logprobs(ids, out, s.prompt_logprobs, self.tokenizer),
            prompt_text=prompt_text(s, ids, self.tokenizer), sampler_state=state if kv else b"")

    async def _run_prompt(self, request_id: str, ids: list[int], r: Resolved | None,
                          namespace: str, params):
        """One engine request over the prompt; ReFT weights pinned while the engine has it."""
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=ids, cache_salt=namespace)
        self.adapters.pin(r)
        out = None
        try:   # FINAL_ONLY: one output, the finished request
            async with aclosing(self.loop.run(request_id, prompt, params,
                                              lora_request=r.lora if r else None)) as outputs:
                async for out in outputs:
                    pass
        finally:
            self.adapters.unpin(r, after_engine_step=out is None or not out.finished)
        if not out.outputs[0].token_ids:
            raise WorkerUnavailable(f"{self.worker_id}: prefill produced no token "
                                    f"(finish_reason={out.outputs[0].finish_reason})")
        return out

    async def _sampler_state(self, rid: str, s: Sampling) -> bytes:
        """The request's generator state after its first token (seeded random sampling
        only; ``worker_runtime/sampler_state.py``): decode goes on from it."""
        if s.seed is None or s.temperature == 0:
            return b""
        states = await self.loop.call(
            lambda eng: eng.collective_rpc(sampler_state.take_state, args=(rid,)))
        return bytes(states[0])

    @staticmethod
    def _sampling_params(s: Sampling, hand_over: bool, r: Resolved | None, rid: str = ""):
        """One token, sampled with the adapter by the request's rules; prompt logprobs (when
        asked) are the adapter's too."""
        extra = {REFT_EXTRA_ARG: r.reft_key} if r is not None and r.reft_key else {}
        if hand_over:
            extra["kv_transfer_params"] = {"do_remote_decode": True}
            if s.seed is not None and s.temperature > 0:
                extra[sampler_state.KEY] = rid   # keep its generator state for decode
        return engine_params(s, max_tokens=1, min_tokens=min(s.min_tokens, 1), seed=s.seed,
                             delta=False, prompt_logprobs=True, extra=extra)

    def _handle(self, out, finish: str | None) -> KVHandle | None:
        """The KV handle for decode, or (the request ended here) its blocks freed now."""
        params_out = out.kv_transfer_params or {}
        if "transfer_id" not in params_out:
            if finish is None:
                raise WorkerUnavailable(f"{self.worker_id}: the engine kept no KV for the prompt")
            return None
        if finish is not None:  # ended at prefill: nobody will pull
            self.kv.release(params_out["transfer_id"])
            return None
        host, port = self.kv.address
        return KVHandle(params_out["transfer_id"], host, port, self.worker_id,
                        params_out["num_tokens"], params_out["num_blocks"],
                        self.kv.layout_fingerprint, staged=params_out.get("staged", False),
                        rank_ports=self.kv.rank_ports)
