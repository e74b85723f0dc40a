"""The Generate path: steps 2 and 6 of a request's path, in the router.

:class:`GenerateRpcs` reads top-down as one request's steps: ``Generate`` (the caller's
tenant, the request validated into a ``PrefillRequest``, admission against
``max_queue_depth``) → ``_generate``: ``_place`` (colocated, or a prefill worker by adapter
locality and a decode worker by load, ``router/pool.py``) → the path
(``_run_prefill_decode``: ``_prefill`` → ``_first_token`` → ``_decode`` stream; or
``_run_colocated``) → ``_final`` (finish reason, usage, timings, KV). Below them, the worker
calls every step makes, over the worker plane (``router/plane.py``): each within the
request's deadline, failures mapped to a status code with a message that says what to fix;
a worker that dies mid-request is marked dead and ends the stream with ``UNAVAILABLE``.
A worker's stream arrives in batches (everything its engine produced for the request since
the client was last sent something), and each batch leaves as **one** client message per
sample: at most one per engine step, fewer when the client is behind. The router never
touches KV bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import grpc

from cluster.aio import merge
from cluster.errors import InvalidRequest, Overloaded, PreftError, ShuttingDown
from cluster.messages import (ALL_TOKEN_KINDS, AdapterRef, DecodeDelta, DecodeRequest,
                              PrefillRequest, Sampling)
from proto.preft.v1 import router_pb2 as pb
from router.plane import PlaneLost
from router.pool import NeedsColocated, NoWorkers, Placement, WorkerHandle
from router.service_base import ServiceBase, grpc_status, unwrap

log = logging.getLogger(__name__)

_KIND_NAMES = {"lora": "an all-token LoRA", "alora": "an activated LoRA"}
_OR_PROMPT_ONLY = " or register it as kind lora_p"
DRAINING = ("the router is shutting down: it takes no new requests; retry against another "
            "router, or once it is back")


class GenerateRpcs(ServiceBase):
    """``Generate``: validate → place → prefill → first token → decode stream → final."""

    # ------------------------------------------------------------------ validate, admit
    async def Generate(self, request: pb.GenerateRequest, context):
        t_admit = time.time()
        try:
            preq = self._validate(request, await self._tenant(context), t_admit)
            if self.draining:
                raise ShuttingDown(DRAINING)
            if self.inflight >= self.cfg.max_queue_depth:
                raise Overloaded(f"router is at its queue limit ({self.inflight} requests in "
                                 f"flight, max_queue_depth={self.cfg.max_queue_depth}); retry "
                                 "after a short backoff")
        except PreftError as e:
            if isinstance(e, Overloaded):
                context.set_trailing_metadata((("retry-after-ms", "500"),))
            self.metrics.requests.labels(grpc_status(e.grpc_code).name).inc()
            await context.abort(grpc_status(e.grpc_code), e.message)
        self.inflight += 1
        status = "INTERNAL"
        try:
            async for msg in self._generate(preq, t_admit, context):
                yield msg
            status = "OK"
        except grpc.aio.AbortError:
            code = context.code()
            status = code.name if code is not None else "UNKNOWN"
            raise
        except asyncio.CancelledError:
            status = "CANCELLED"
            raise
        finally:
            self.inflight -= 1
            self.metrics.requests.labels(status).inc()

    def _validate(self, request: pb.GenerateRequest, tenant: str | None,
                  t_admit: float) -> PrefillRequest:
        adapter = None
        if request.adapter:
            r = self._adapter(request.adapter, tenant)
            adapter = AdapterRef(r.name, r.version, r.kind, r.sha256, r.uri)
        if not request.HasField("sampling"):
            raise InvalidRequest("sampling", "is required (at least sampling.max_tokens)")
        try:
            sampling = to_sampling(request.sampling)
        except InvalidRequest as e:
            raise InvalidRequest(f"sampling.{e.field}", e.message.split(": ", 1)[1]) from None
        which = request.WhichOneof("prompt")
        if which is None or (which == "text" and not request.text) or (
                which == "token_ids" and not request.token_ids.ids):
            raise InvalidRequest("prompt", "is empty: set prompt text or token_ids")
        # Engines key requests by id: a caller's id gets a unique suffix, so two callers that
        # reuse one id never share (or steal) each other's engine request.
        rid = (f"{request.request_id}-{uuid.uuid4().hex[:12]}" if request.request_id
               else uuid.uuid4().hex)
        if which == "text":
            return PrefillRequest(rid, adapter, sampling, prompt_text=request.text,
                                  enqueued_at=t_admit)
        return PrefillRequest(rid, adapter, sampling,
                              prompt_token_ids=tuple(request.token_ids.ids), enqueued_at=t_admit)

    # ------------------------------------------------------------------ place, path, final
    async def _generate(self, preq: PrefillRequest, t_admit: float, context):
        """Place the request, run its path, then the final message."""
        place = await self._place(preq, context)
        out = _Outcome()
        run = self._run_colocated if place.path == "colocated" else self._run_prefill_decode
        async for delta in run(preq, place, t_admit, context, out):
            yield pb.GenerateResponse(delta=delta)
        yield self._final(preq, t_admit, out)

    async def _place(self, preq: PrefillRequest, context) -> Placement:
        a = preq.adapter
        name = a.name if a else None
        policies = {"prefill": self.pool.prefill_policy, "colocated": self.pool.colocated_policy}
        spills = {k: getattr(p, "spills", 0) for k, p in policies.items()}
        try:
            place = self.pool.place(name, all_token=a is not None and a.kind in ALL_TOKEN_KINDS)
        except NeedsColocated:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, (
                f"adapter {a.name!r} is {_KIND_NAMES.get(a.kind, a.kind)} (kind {a.kind!r}): "
                "it applies to generated tokens, which only colocated workers serve, and "
                "this cluster has none healthy; start some (`preft up --colocated-workers "
                f"N`){_OR_PROMPT_ONLY if a.kind == 'lora' else ''}"))
        except NoWorkers as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        m = self.metrics
        m.paths.labels(place.path, a.kind if a else "base").inc()
        for pool, w in (("colocated", place.colocated), ("prefill", place.prefill),
                        ("decode", place.decode)):
            if w is not None:
                pol = policies.get(pool, self.pool.decode_policy)
                m.routing.labels(pool, pol.name, w.worker_id).inc()
                if pool in spills and getattr(pol, "spills", 0) > spills[pool]:
                    m.spills.labels(pol.name).inc()
        return place

    async def _run_prefill_decode(self, preq, place: Placement, t_admit: float, context, out):
        """Prefill (adapter, first token, KV held) -> first token out -> decode stream; with
        ``n`` samples, every sample's first token, then their decode streams."""
        pw, dw = place.prefill, place.decode
        t_call = time.time()
        res = await self._prefill(pw, preq, context)
        out.hops(t_admit, t_call, res.t_start, res.t_done, time.time())
        self._first_token(out, t_admit, res.queue_s, res.prefill_s, len(res.prompt_token_ids),
                          preq, res.adapter_tier, res.adapter_load_s)
        out.kv = pb.KVTransfer(prefill_worker=pw.worker_id)
        samples = (res, *res.siblings)
        try:
            for i, r in enumerate(samples):
                first = DecodeDelta((r.first_token,), r.first_text, r.finish_reason, index=i,
                                    logprobs=(r.first_logprob,) if r.first_logprob else ())
                out.add(first, r.prompt_logprobs, r.prompt_text)
                yield _token_delta(first)
            out.kv.blocks = sum(r.kv.num_blocks for r in samples if r.kv is not None)
            live = [(i, r) for i, r in enumerate(samples) if r.finish_reason is None]
            if not live:
                return
            out.kv.decode_worker = dw.worker_id
            t_dec = time.time()
            async for delta in self._decode_samples(pw, dw, preq, live, context, out):
                yield delta
            out.decode_s = time.time() - t_dec
        except BaseException:   # the caller left or a call failed: free what no decode owns
            for i, r in enumerate(samples):
                if r.kv is not None and i not in out.decoding:
                    pw.actor.release.remote(r.kv.transfer_id)
            raise

    async def _decode_samples(self, pw, dw, preq, live, context, out):
        """One decode stream per live sample, all on ``dw``: the first alone until its KV
        is loaded (the prompt's full blocks enter the decode engine's prefix cache), then
        the rest, which pull only what is not cached (the last, partial block)."""
        def stream(i, r):
            dreq = DecodeRequest(r.request_id, r.prompt_token_ids, r.first_token, r.kv,
                                 r.kv_namespace, preq.sampling.sample(i),
                                 sampler_state=r.sampler_state)
            return self._decode(pw, dw, dreq, r, context, out, i)
        (i0, r0), rest = live[0], live[1:]
        first = stream(i0, r0)
        if not rest:
            async for delta in first:
                yield delta
            return
        async for delta in first:    # the first sample's first delta: its KV is loaded
            yield delta
            break
        async for delta in merge([first, *(stream(i, r) for i, r in rest)]):
            yield delta

    async def _prefill(self, pw: WorkerHandle, preq: PrefillRequest, context):
        """The worker's prefill over its plane (a cancel or the deadline cancels the call
        there too): its result, the first token and the KV handle."""
        pw.outstanding += 1
        streams = []

        async def answer():
            streams.append((await self.planes.get(pw)).call("prefill", preq,
                                                            self._timeout(context)))
            return await streams[0].result()
        try:
            return await self._call(answer(), context, "prefill", pw)
        except BaseException:   # an answer that arrived as we gave up: its offers are ours
            for res in streams[0].items if streams else ():
                for r in (res, *res.siblings):
                    if r.kv is not None:
                        pw.actor.release.remote(r.kv.transfer_id)
            raise
        finally:
            pw.outstanding -= 1

    def _first_token(self, out: "_Outcome", t_admit: float, queue_s: float, prefill_s: float,
                     prompt_tokens: int, preq: PrefillRequest, tier: str, load_s: float) -> None:
        m = self.metrics
        out.ttft_s, out.queue_s, out.prefill_s = time.time() - t_admit, queue_s, prefill_s
        out.prompt_tokens = prompt_tokens
        m.ttft.observe(out.ttft_s)
        m.queue.observe(queue_s)
        m.prefill.observe(prefill_s)
        m.prompt_tokens.inc(prompt_tokens)
        if preq.adapter is not None:
            m.observe_adapter(tier, load_s)

    async def _decode(self, pw, dw, dreq: DecodeRequest, res, context, out, index: int = 0):
        m = self.metrics
        out.decoding.add(index)     # from here this stream frees its offer if it fails
        dw.outstanding += 1
        pulled = False
        try:
            async for batch in self._batches(dw, "decode", dreq, context):
                for d in batch:
                    if d.kv_transfer_s is not None:
                        pulled = self._kv_loaded(pw, dw, d, res, out)
                    out.add(d, index=index)
                for delta in _token_deltas(batch, index):
                    yield delta
        except BaseException as e:
            if not pulled:  # decode never pulled: free the prefill side's blocks now
                pw.actor.release.remote(res.kv.transfer_id)
                if not isinstance(e, asyncio.CancelledError):
                    m.kv_failures.labels(pw.worker_id, dw.worker_id).inc()
            raise
        finally:
            dw.outstanding -= 1

    def _kv_loaded(self, pw, dw, d: DecodeDelta, res, out) -> bool:
        """The decode side's first delta: what the KV load moved (sums over samples)."""
        if not d.kv_bytes:   # all found in decode's prefix cache: free the offer
            pw.actor.release.remote(res.kv.transfer_id)
        if out.kv.bytes == 0:   # the first load's timings
            out.kv_transfer_s, out.first_decode_step_s = d.kv_transfer_s, d.first_step_s
            out.kv_exposed_s = d.kv_exposed_s or 0.0
            out.kv.transport, out.kv.pipelined = d.kv_transport, d.kv_pipelined
        out.kv.bytes += d.kv_bytes or 0
        self.metrics.observe_kv(pw.worker_id, dw.worker_id, d.kv_bytes or 0, d.kv_transfer_s,
                                d.kv_transport)
        return True

    async def _run_colocated(self, preq, place: Placement, t_admit: float, context, out):
        """One colocated worker: prompt with the adapter, first token, decode, no KV moves."""
        w = place.colocated
        out.kv = pb.KVTransfer(prefill_worker=w.worker_id, decode_worker=w.worker_id)
        w.outstanding += 1
        t_dec = None
        try:
            async for batch in self._batches(w, "generate", preq, context):
                for d in batch:
                    if d.prompt_tokens is not None:
                        self._first_token(out, t_admit, d.queue_s, d.prefill_s,
                                          d.prompt_tokens, preq, d.adapter_tier,
                                          d.adapter_load_s)
                        t_dec = time.time()
                    out.add(d, d.prompt_logprobs, d.prompt_text)
                for delta in _token_deltas(batch):
                    yield delta
        finally:
            w.outstanding -= 1
        out.decode_s = time.time() - t_dec if t_dec is not None else 0.0

    def _final(self, preq: PrefillRequest, t_admit: float, out: "_Outcome") -> pb.GenerateResponse:
        m = self.metrics
        total = time.time() - t_admit
        m.e2e.observe(total)
        m.generation_tokens.inc(out.n_tokens)
        if out.n_tokens > 1:
            m.tpot.observe((total - out.ttft_s) / (out.n_tokens - 1))
        timings = pb.Timings(queue_s=out.queue_s, prefill_s=out.prefill_s, ttft_s=out.ttft_s,
                             kv_transfer_s=out.kv_transfer_s, kv_exposed_s=out.kv_exposed_s,
                             first_decode_step_s=out.first_decode_step_s or 0.0,
                             decode_s=out.decode_s, total_s=total, **out.hop_s)
        return pb.GenerateResponse(final=pb.Final(
            request_id=preq.request_id, finish_reason=out.finish or "length",
            usage=pb.Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.n_tokens),
            timings=timings, kv=out.kv, prompt_logprobs=to_pb_logprobs(out.prompt_logprobs),
            prompt_text=out.prompt_text, samples=out.samples()))

    # ------------------------------------------------------------------ worker calls
    async def _batches(self, worker: WorkerHandle, op: str, arg, context):
        """A worker's stream call over its plane, as batches of its items (all that arrived
        since the last), within the request's deadline; failures mapped to a status.
        Leaving early cancels the call on the worker."""
        stream = None
        try:
            stream = (await self.planes.get(worker)).call(op, arg, self._timeout(context))
            async for batch in stream.batches():
                yield batch
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await self._abort(e, context, op, worker)
        finally:
            if stream is not None:
                stream.cancel()

    def _timeout(self, context) -> float:
        remaining = context.time_remaining()
        return self.cfg.request_timeout_s if remaining is None else min(
            remaining, self.cfg.request_timeout_s)

    async def _call(self, awaitable, context, what: str, worker: WorkerHandle):
        """Await a worker call within the request's deadline; map failures to a status."""
        try:
            return await asyncio.wait_for(awaitable, self._timeout(context))
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:
            await self._abort(e, context, what, worker)

    async def _abort(self, e: BaseException, context, what: str, worker: WorkerHandle):
        """End the RPC with the status a worker call's failure means; a worker that died
        or dropped its plane is marked dead."""
        import ray.exceptions as rx

        if isinstance(e, asyncio.TimeoutError):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"{what} on {worker.worker_id} exceeded the deadline")
        cause = unwrap(e)
        if isinstance(cause, PreftError):
            await context.abort(grpc_status(cause.grpc_code), cause.message)
        if isinstance(e, (rx.RayActorError, rx.ActorUnavailableError, PlaneLost)):
            log.warning("%s on %s failed: %r", what, worker.worker_id, e)
            self._mark_dead(worker)
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"{what}: worker {worker.worker_id} died or is unreachable; "
                                "retry the request")
        log.exception("%s failed", what)
        await context.abort(grpc.StatusCode.INTERNAL, f"{what} failed: {type(cause).__name__}: {cause}")

    def _mark_dead(self, worker: WorkerHandle) -> None:
        """Stop routing to a dead actor now; its member record goes too, so membership sync
        does not revive it before Ray's restarted instance heartbeats again."""
        worker.healthy = False
        self.view.members.pop(worker.worker_id, None)
        self.planes.drop(worker.worker_id)

        def leave() -> None:
            try:
                self.view.state.leave(worker.worker_id)
            except Exception:  # Redis down: the record expires by TTL instead
                pass
        asyncio.get_running_loop().run_in_executor(None, leave)


class _Outcome:
    """What one Generate gathered on its path, for the final message and the metrics."""

    def __init__(self) -> None:
        self.n_tokens = 0
        self.finish: str | None = None
        self.prompt_tokens = 0
        self.ttft_s = self.queue_s = self.prefill_s = self.decode_s = 0.0
        self.kv_transfer_s = self.first_decode_step_s = self.kv_exposed_s = 0.0
        self.kv = pb.KVTransfer()
        self.hop_s: dict[str, float] = {}
        self.prompt_logprobs = ()
        self.prompt_text = ""
        self.sample_tokens: dict[int, int] = {}
        self.decoding: set[int] = set()          # samples whose decode stream started
        self.finishes: dict[int, str] = {}

    def hops(self, t_admit: float, t_call: float, t_start: float, t_done: float,
             t_result: float) -> None:
        """Where the time before the first token went, hop by hop (wall clocks)."""
        if t_start and t_done:
            self.hop_s = {"route_s": t_call - t_admit, "to_worker_s": t_start - t_call,
                          "worker_s": t_done - t_start, "from_worker_s": t_result - t_done}

    def add(self, d, prompt_logprobs=(), prompt_text: str = "", index: int | None = None) -> None:
        i = d.index if index is None else index
        self.n_tokens += len(d.token_ids)
        self.sample_tokens[i] = self.sample_tokens.get(i, 0) + len(d.token_ids)
        self.prompt_logprobs = self.prompt_logprobs or prompt_logprobs
        self.prompt_text = self.prompt_text or prompt_text
        if d.finish_reason:
            self.finishes[i] = d.finish_reason
            if i == 0:
                self.finish = d.finish_reason

    def samples(self) -> list[pb.SampleEnd]:
        """Each sample's end, when there are several."""
        if len(self.sample_tokens) < 2:
            return []
        return [pb.SampleEnd(index=i, finish_reason=self.finishes.get(i, "length"),
                             completion_tokens=n) for i, n in sorted(self.sample_tokens.items())]


def to_sampling(p: pb.SamplingParams) -> Sampling:
    return Sampling(
        max_tokens=int(p.max_tokens),
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop), ignore_eos=p.ignore_eos, top_k=p.top_k, min_p=p.min_p,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        logit_bias=tuple(sorted(p.logit_bias.items())), min_tokens=p.min_tokens,
        stop_token_ids=tuple(p.stop_token_ids),
        logprobs=p.logprobs if p.HasField("logprobs") else None,
        prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None,
        echo=p.echo, n=p.n or 1, **_guide(p),
    ).validate()


def _guide(p: pb.SamplingParams) -> dict:
    """The request's structured output as ``Sampling.guide`` / ``guide_spec``."""
    which = p.WhichOneof("guide")
    if which is None or (which == "json_object" and not p.json_object):
        return {}
    spec = {"json_schema": lambda: p.json_schema, "regex": lambda: p.regex,
            "choice": lambda: json.dumps(list(p.choice.choices)), "json_object": lambda: "",
            "grammar": lambda: p.grammar}[which]()
    return {"guide": "json" if which == "json_schema" else which, "guide_spec": spec}


def to_pb_logprobs(items) -> list[pb.TokenLogprob]:
    """:class:`~cluster.messages.TokenLogprob` items as their protobuf messages."""
    return [pb.TokenLogprob(token_id=t.token_id, logprob=t.logprob, rank=t.rank, token=t.token,
                            top=[pb.TopLogprob(token_id=i, logprob=lp, token=text)
                                 for (i, lp), text in zip(t.top, t.top_tokens or _blank(t.top))])
            for t in items]


def _blank(top) -> list[str]:
    return [""] * len(top)


def _token_delta(d, index: int | None = None) -> pb.TokenDelta:
    return pb.TokenDelta(token_ids=list(d.token_ids), text=d.text,
                         logprobs=to_pb_logprobs(d.logprobs),
                         index=d.index if index is None else index)


def _token_deltas(batch: list, index: int | None = None) -> list[pb.TokenDelta]:
    """One batch of a worker stream's deltas (one or more engine steps) as one client
    message per sample: tokens, text and logprobs concatenated in order."""
    if len(batch) == 1:
        d = batch[0]
        return [_token_delta(d, index)] if d.token_ids or d.text else []
    groups: dict[int, list] = {}
    for d in batch:
        if d.token_ids or d.text:
            groups.setdefault(d.index if index is None else index, []).append(d)
    return [pb.TokenDelta(token_ids=[t for d in ds for t in d.token_ids],
                          text="".join(d.text for d in ds),
                          logprobs=to_pb_logprobs([lp for d in ds for lp in d.logprobs]),
                          index=i) for i, ds in groups.items()]

