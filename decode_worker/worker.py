"""The decode worker: a Ray actor owning a vLLM engine built without LoRA.

Per :class:`~cluster.messages.DecodeRequest` it submits ``prompt + [first_token]`` with the
prompt's KV declared external (our KV connector as consumer pulls it from the prefill
worker named in the handle), so nothing of the prompt is recomputed without its adapter;
vLLM computes from the first token on. Each engine step's output goes through the request's
:class:`OutputStream` (text, stop strings) into one :class:`~cluster.messages.DecodeDelta`,
emitted on the worker's plane (``worker_runtime/plane.py``), which sends every request's
delta of that step to the router in one message.
"""

from __future__ import annotations

import time
from dataclasses import replace

from cluster.config import DecodeConfig
from cluster.errors import InvalidRequest, KVTransferFailed
from cluster.messages import DecodeDelta, DecodeRequest
from worker_runtime import sampler_state
from worker_runtime.engine_worker import EngineWorker
from decode_worker import first_token
from worker_runtime.sequence import (OutputStream, cache_only_prompt_blocks, engine_params,
                                     token_logprobs)


class DecodeWorker(EngineWorker):
    """Ray actor (``ray.remote(DecodeWorker)``); all public methods are async."""

    role = "decode"
    kv_role = "kv_consumer"

    def __init__(self, cfg: DecodeConfig, worker_id: str, redis_url: str | None = None,
                 actor_name: str = "") -> None:
        self.cfg = cfg
        super().__init__(cfg.engine, cfg.cpu_cores, worker_id, redis_url, actor_name,
                         transfer=cfg.transfer)

    def engine_args(self) -> dict:
        return {"enable_lora": False}

    def after_build(self, engine) -> None:
        # The first token's and every generated token's KV is the base model's: never cached
        # where a later prompt (a chat's next turn) could take it for adapter-conditioned KV.
        cache_only_prompt_blocks(engine, generated_in_prompt=1)
        # The first token is generated, though it reaches this engine in the prompt:
        # penalties count it, grammars continue from it.
        first_token.install(engine)
        # A seeded request's generator goes on from prefill's state after the first token.
        self.sampler_state_size = engine.collective_rpc(sampler_state.start_from_states)[0]

    async def kv_loads(self) -> dict[str, int]:
        """This engine's recent prompt-KV loads by how they ran: ``layerwise`` (copied
        during the forward that reads them), ``pulled`` (copied before the request ran),
        ``failed``."""
        recs = self.kv.records()
        return {"layerwise": sum(r.ok and r.exposed_s is not None for r in recs),
                "pulled": sum(r.ok and r.exposed_s is None for r in recs),
                "failed": sum(not r.ok for r in recs)}

    def plane_ops(self) -> dict:
        from worker_runtime.plane import Op

        return {"decode": Op(DecodeRequest, self.decode)}

    async def decode(self, req: DecodeRequest, call) -> None:
        """Decode ``req``, emitting one :class:`DecodeDelta` per engine step on ``call``
        (the plane's stream call); returns when the request ends."""
        self._check_layout(req)
        if req.sampler_state and len(req.sampler_state) != self.sampler_state_size:
            raise InvalidRequest("sampler_state", f"a generator state of "
                                 f"{len(req.sampler_state)} bytes; this decode engine's are "
                                 f"{self.sampler_state_size} (prefill on another device kind?)")
        if req.sampling.max_tokens < 2:
            raise InvalidRequest("max_tokens", "decode needs max_tokens >= 2 (the first token "
                                 "comes from prefill)")
        await self.loop.drive(req.request_id, self._prompt(req), self._params(req),
                              _DecodeOutput(self, req, call))

    def _check_layout(self, req: DecodeRequest) -> None:
        if req.kv.layout != self.kv.layout_fingerprint:
            raise KVTransferFailed(
                f"refusing to pair prefill {req.kv.engine_id} (KV layout {req.kv.layout}) with "
                f"decode {self.worker_id} (KV layout {self.kv.layout_fingerprint}): both need "
                "the same model, block size and KV cache dtype")

    @staticmethod
    def _prompt(req: DecodeRequest):
        """The engine's prompt: the prompt, then the first token (its KV is computed here,
        by the base model); the prompt's KV is declared external (pulled from prefill)."""
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=[*req.prompt_token_ids, req.first_token],
                            cache_salt=req.kv_namespace)

    @staticmethod
    def _params(req: DecodeRequest):
        """The tokens after the first, by the request's rules (``min_tokens`` counts the
        first token as one already generated). A seeded request's generator starts where
        prefill's was left after the first token (``req.sampler_state``), so the request
        draws as it would in one engine: its seed's stream, never another sample's."""
        s = req.sampling
        extra = {"kv_transfer_params": req.kv.to_params()}
        if req.sampler_state:
            extra[sampler_state.KEY] = req.sampler_state
        return engine_params(
            s, max_tokens=s.max_tokens - 1, min_tokens=max(0, s.min_tokens - 1),
            seed=s.seed, delta=True, extra=extra)

    def _with_transfer(self, delta: DecodeDelta, req: DecodeRequest, t0: float) -> DecodeDelta:
        """The first delta carries the KV transfer's bytes and seconds."""
        rec = self.kv.pop_record(req.kv.transfer_id)
        total = time.perf_counter() - t0
        xfer = rec.seconds if rec else 0.0
        exposed = rec.exposed if rec else 0.0
        if rec:
            self.metrics.kv_pull(rec.bytes, rec.seconds)
        return replace(delta, kv_transfer_s=xfer, kv_bytes=rec.bytes if rec else 0,
                       first_step_s=max(0.0, total - exposed),
                       kv_transport=rec.transport if rec else "",
                       kv_pipelined=bool(rec and rec.pipelined), kv_exposed_s=exposed)


class _DecodeOutput:
    """One decode request's engine outputs → its deltas, once per engine step (called on the
    worker's event loop; returns True when the request's stream has ended)."""

    __slots__ = ("worker", "req", "call", "stream", "t0", "first", "n_tokens")

    def __init__(self, worker: DecodeWorker, req: DecodeRequest, call) -> None:
        self.worker, self.req, self.call = worker, req, call
        self.stream = OutputStream(worker.tokenizer, req.sampling, req.request_id)
        self.stream.append([req.first_token], None)  # prefill already sent what this produces
        self.t0 = time.perf_counter()
        self.first, self.n_tokens = True, 0

    def __call__(self, out) -> bool:
        w, req, comp = self.worker, self.req, out.outputs[0]
        if comp.finish_reason == "error":
            raise KVTransferFailed(
                f"KV transfer {req.kv.transfer_id} from {req.kv.engine_id} to "
                f"{w.worker_id} failed; the request was not decoded")
        step = self.stream.append(comp.token_ids, comp.finish_reason if out.finished else None)
        lps = token_logprobs(comp.token_ids, comp.logprobs, req.sampling.logprobs, w.tokenizer)
        delta = DecodeDelta(step.token_ids, step.text, step.finish_reason,
                            logprobs=lps[:len(step.token_ids)])
        if self.first:
            self.first, delta = False, w._with_transfer(delta, req, self.t0)
        self.n_tokens += len(delta.token_ids)
        self.call.emit(delta)
        if step.finish_reason is None:
            return False
        w.metrics.request(self.n_tokens, time.perf_counter() - self.t0)
        self.call.end()   # with this step's message
        return True   # before the engine stopped (a stop string): the request is aborted
