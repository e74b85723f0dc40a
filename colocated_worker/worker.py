"""The colocated worker: a Ray actor whose one engine prefills and decodes (steps 3-5).

Per request (the router's :class:`~cluster.messages.PrefillRequest`) it resolves the
adapter through the same tiers as a prefill worker (:class:`AdapterHost`), submits the
prompt with the adapter, and streams :class:`~cluster.messages.ColocatedDelta` items: the
first carries the prefill timings. Each engine step's outputs become deltas in one callback
and leave on the worker's plane (``worker_runtime/plane.py``) in one message. Inside the
engine the adapter touches the positions of the request's adapter span only
(``colocated_worker/adapter_span.py``: PreFT the prompt, all-token LoRA every position,
activated LoRA from its invocation on; ``prompt_lora.py`` maps them), prefix-cache blocks
are keyed by span, generated tokens' KV is never cached (``worker_runtime/sequence.py``),
and the request's :class:`OutputStream` owns detokenization and stop strings, as on the
prefill/decode path.
"""

from __future__ import annotations

import time
from dataclasses import replace

from cluster.aio import all_of
from cluster.config import ColocatedConfig
from cluster.messages import AdapterStats, ColocatedDelta, PrefillRequest, Sampling
from colocated_worker.adapter_span import SPAN_ARG, install_span_block_keys, request_span
from colocated_worker.prompt_lora import StepMix, install_span_lora, step_mix
from prefill_worker.adapter_host import AdapterWorker, Resolved
from prefill_worker.reft_runtime import EXTRA_ARG as REFT_EXTRA_ARG
from worker_runtime.sequence import (OutputStream, cache_only_prompt_blocks, engine_params,
                                     prompt_logprobs, prompt_text, token_logprobs)


class ColocatedWorker(AdapterWorker):
    """Ray actor (``ray.remote(ColocatedWorker)``); all public methods are async."""

    role = "colocated"

    def __init__(self, cfg: ColocatedConfig, worker_id: str, redis_url: str | None = None,
                 cache_dir: str | None = None, actor_name: str = "") -> None:
        from colocated_worker.prompt_slots import worker_slots
        from colocated_worker.slot_metrics import SlotMetrics

        self.mix = StepMix()
        self.slot_metrics = SlotMetrics(worker_id)
        self.slots = worker_slots(cfg.max_loras, self.slot_metrics)   # adapter slots by span
        self.requests_by_kind = {"lora_p": 0, "reft_p": 0, "lora": 0, "alora": 0, "base": 0,
                                 "alora_not_invoked": 0}
        super().__init__(cfg, worker_id, redis_url, cache_dir, actor_name)

    def after_build(self, engine) -> None:
        from colocated_worker.prompt_slots import install_prompt_slots

        super().after_build(engine)
        install_span_lora(engine, self.mix)
        install_span_block_keys()
        install_prompt_slots(engine, self.slots, on_prompt_done=self.adapters.prompt_done)
        # Generated tokens' KV (base weights, or an all-token adapter's) is never cached
        # where a later prompt could take it for adapter-conditioned prompt KV.
        cache_only_prompt_blocks(engine, generated_in_prompt=0)

    # ------------------------------------------------------------------ API
    async def stats(self) -> AdapterStats:
        mix = self.mix
        if self.engine_cfg.tensor_parallel_size > 1:   # the ranks count the steps
            mix = await self.loop.call(step_mix) or mix
        return AdapterStats(requests=self.loop.num_requests,
                            tier_hits=dict(self.adapters.tier_hits), resident=self.residency(),
                            mixed_steps=mix.mixed, by_kind=dict(self.requests_by_kind),
                            **self.slots.fields())

    def plane_ops(self) -> dict:
        from worker_runtime.plane import Op

        return {"generate": Op(PrefillRequest, self.generate)}

    def plane_host_secret(self) -> tuple[str, str]:
        from worker_runtime.env import resolve_kv_host

        return resolve_kv_host(self.cfg.host), self.cfg.secret

    async def generate(self, req: PrefillRequest, call) -> None:
        """Serve ``req``, emitting one :class:`ColocatedDelta` per sample per engine step on
        ``call`` (the plane's stream call); with ``sampling.n > 1`` the samples' deltas
        interleave, each with its ``index``. Returns when every sample has ended."""
        t_in = time.time()
        ids, r = await self.admit(req)
        span = request_span(r.ref.kind, ids, r.invocation) if r is not None else None
        kind = r.ref.kind if r is not None else "base"
        self.requests_by_kind[kind] += 1
        self.slot_metrics.request(kind)
        if r is not None and span is None:   # aLoRA without its invocation: the base model
            self.requests_by_kind["alora_not_invoked"] += 1
        t0 = time.time()
        live = [req.sampling.n]   # samples still running: the last one ends the call
        await all_of([self._sample(req, i, ids, (r, span), call, live, t_in, t0)
                      for i in range(req.sampling.n)])

    async def _sample(self, req: PrefillRequest, i: int, ids: list[int], adapter: tuple,
                      call, live: list[int], t_in: float, t0: float) -> None:
        """One sample's engine request (``adapter``: the request's :class:`Resolved` or
        None, and its span); its outputs become deltas in the engine step's callback
        (:class:`_SampleOutput`)."""
        r, span = adapter
        s = req.sampling.sample(i)
        rid = req.request_id if i == 0 else f"{req.request_id}-s{i}"
        out = _SampleOutput(self, s, rid, i, ids, r, call, live,
                            t0 - (req.enqueued_at or t_in), t0)
        on = r if span is not None else None   # what the engine applies
        self.adapters.pin(on)
        try:
            await self.loop.drive(rid, self._prompt(ids, on), self._params(s, on, span), out,
                                  lora_request=on.lora if on else None)
        finally:
            self.adapters.unpin(on, after_engine_step=not out.engine_done)

    def _prompt(self, ids: list[int], r: Resolved | None):
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=ids,
                            cache_salt=self.adapters.namespace(r, len(ids)))

    @staticmethod
    def _params(s: Sampling, r: Resolved | None, span: tuple[int, int] | None):
        """Every token in this engine, by the request's rules; the adapter's span rides in
        the request (``colocated_worker/adapter_span.py``)."""
        extra = {} if span is None else {SPAN_ARG: list(span)}
        if r is not None and r.reft_key:
            extra[REFT_EXTRA_ARG] = r.reft_key
        return engine_params(s, max_tokens=s.max_tokens, min_tokens=s.min_tokens, seed=s.seed,
                             delta=True, prompt_logprobs=True, extra=extra or None)

    def _first(self, delta: ColocatedDelta, ids: list[int], out, s: Sampling,
               r: Resolved | None, queue_s: float, prefill_s: float) -> ColocatedDelta:
        """The first delta carries what the router reports as prefill, and the prompt's
        logprobs when asked."""
        self.metrics.adapter(r.tier if r else "")
        return replace(delta, prompt_tokens=len(ids), queue_s=max(0.0, queue_s),
                       prompt_logprobs=prompt_logprobs(ids, out, s.prompt_logprobs,
                                                       self.tokenizer),
                       prompt_text=prompt_text(s, ids, self.tokenizer),
                       prefill_s=prefill_s, adapter_tier=r.tier if r else "",
                       adapter_load_s=r.load_s if r else 0.0)


class _SampleOutput:
    """One sample's engine outputs → its deltas, once per engine step (on the worker's event
    loop; returns True when the sample's stream has ended). Sample 0's first delta carries
    the prefill figures."""

    __slots__ = ("worker", "s", "index", "ids", "r", "call", "live", "queue_s", "t0",
                 "stream", "first", "n_out", "engine_done")

    def __init__(self, worker: ColocatedWorker, s: Sampling, rid: str, index: int,
                 ids: list[int], r: Resolved | None, call, live: list[int], queue_s: float,
                 t0: float) -> None:
        self.worker, self.s, self.index, self.ids, self.r = worker, s, index, ids, r
        self.call, self.live = call, live
        self.queue_s, self.t0 = queue_s, t0
        self.stream = OutputStream(worker.tokenizer, s, rid)
        self.first, self.n_out, self.engine_done = index == 0, 0, False

    def __call__(self, out) -> bool:
        w, s = self.worker, self.s
        self.engine_done = out.finished
        comp = out.outputs[0]
        step = self.stream.append(comp.token_ids, comp.finish_reason if out.finished else None)
        lps = token_logprobs(comp.token_ids, comp.logprobs, s.logprobs, w.tokenizer)
        delta = ColocatedDelta(step.token_ids, step.text, step.finish_reason,
                               logprobs=lps[:len(step.token_ids)], index=self.index)
        if self.first:
            self.first = False
            delta = w._first(delta, self.ids, out, s, self.r, self.queue_s,
                             time.time() - self.t0)
        self.n_out += len(delta.token_ids)
        self.call.emit(delta)
        if step.finish_reason is None:
            return False
        w.metrics.request(len(self.ids) + self.n_out, time.time() - self.t0)
        self.live[0] -= 1
        if not self.live[0]:
            self.call.end()   # the last sample: with this step's message
        return True   # before the engine stopped (a stop string): the request is aborted
