"""The gRPC router: steps 1, 2 and 6 of a request's path.

``Generate`` validates the request, picks a prefill worker (adapter locality) and a decode
worker (load), runs prefill, hands the KV handle to decode and streams tokens back. It
never touches KV bytes. Errors are mapped to canonical status codes with a message that
says what to fix; a worker that dies mid-request ends the stream with ``UNAVAILABLE``.

``create_server(cfg, pool) -> (server, port)`` builds a ``grpc.aio`` server with the
standard health service and reflection; ``serve`` runs it until stopped.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.adapter_store import AdapterStore, UploadWriter, check_adapter_name
from cluster.config import RouterConfig
from cluster.errors import (AdapterNotFound, InvalidAdapter, InvalidRequest, Overloaded,
                            PermissionDenied, PreftError, Unauthenticated, WorkerUnavailable)
from cluster.messages import (ADAPTER_KINDS, ALL_TOKEN_KINDS, AdapterRef, DecodeDelta,
                              DecodeRequest, PrefillRequest, Sampling)
from cluster.state import AdapterRecord
from proto.preft.v1 import router_pb2 as pb
from proto.preft.v1 import router_pb2_grpc as pb_grpc
from router.metrics import RouterMetrics, default_metrics
from router.pool import NeedsColocated, NoWorkers, Placement, WorkerHandle, WorkerPool
from router.state_view import StateView

log = logging.getLogger(__name__)


def _status(code_name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code_name, grpc.StatusCode.INTERNAL)


def _unwrap(e: BaseException) -> BaseException:
    """Ray wraps actor exceptions; return the typed error raised inside the worker."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _adapter_pb(r: AdapterRecord) -> pb.Adapter:
    return pb.Adapter(name=r.name, version=r.version, kind=r.kind, rank=r.rank,
                      target_modules=list(r.target_modules), size_bytes=r.size_bytes,
                      sha256=r.sha256, owner=r.owner, public=r.public, created=r.created)


def to_sampling(p: pb.SamplingParams) -> Sampling:
    return Sampling(
        max_tokens=int(p.max_tokens),
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop), ignore_eos=p.ignore_eos,
    ).validate()


class RouterService(pb_grpc.RouterServicer):
    def __init__(self, cfg: RouterConfig, pool: WorkerPool, view: StateView,
                 store: AdapterStore) -> None:
        self.cfg = cfg
        self.pool = pool
        self.view = view
        self.store = store
        self.inflight = 0
        view.on_members = self._sync_members
        self.metrics: RouterMetrics = default_metrics()
        self.metrics.set_gauge_source(self._gauges)

    def close(self) -> None:
        """The router stopped: its pool's gauges leave /metrics."""
        self.metrics.clear_gauge_source(self._gauges)

    def _gauges(self) -> list:
        """Scrape-time gauges: pool queues, per-worker load, decode KV blocks in use."""
        out = [("preft_router_inflight_requests", {}, self.inflight)]
        for pool, workers in (("prefill", self.pool.prefill), ("decode", self.pool.decode),
                              ("colocated", self.pool.colocated)):
            out.append(("preft_pool_queue_depth", {"pool": pool},
                        sum(w.outstanding for w in workers)))
            out.append(("preft_pool_healthy_workers", {"pool": pool},
                        sum(w.healthy for w in workers)))
            out += [("preft_worker_outstanding_requests", {"pool": pool, "worker": w.worker_id},
                     w.outstanding) for w in workers]
        live = [w for w in self.pool.decode + self.pool.colocated if w.healthy]
        if live:
            import ray

            refs = [w.actor.kv_usage.remote() for w in live]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
            for w, ref in zip(live, refs):
                try:
                    u = ray.get(ref, timeout=0) if ref in ready else None
                except Exception:  # a dying worker: no sample this scrape
                    u = None
                if u is not None:
                    lab = {"worker": w.worker_id}
                    out.append(("preft_kv_blocks_in_use", lab, u.blocks_in_use))
                    out.append(("preft_kv_blocks_total", lab, u.blocks_total))
        return out

    # ------------------------------------------------------------------ auth & lookup
    async def _tenant(self, context) -> str | None:
        """The caller's tenant; None = operator (open mode on loopback)."""
        md = {k.lower(): v for k, v in (context.invocation_metadata() or ())}
        auth = md.get("authorization", "")
        if not auth:
            if self.cfg.require_auth:
                raise Unauthenticated("missing API key: send metadata "
                                      "'authorization: Bearer <key>' (create one with "
                                      "`preft keys create --tenant NAME`)")
            return None
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not key:
            if not self.cfg.require_auth:
                return None
            raise Unauthenticated("malformed authorization: expected 'Bearer <key>'")
        tenant = await self.view.tenant_for_key(key.strip())
        if tenant is None and self.cfg.require_auth:
            raise Unauthenticated("unknown API key")
        return tenant  # open mode: a known key still scopes the caller to its tenant

    def _adapter(self, name: str, tenant: str | None) -> AdapterRecord:
        rec = self.view.adapters.get(name)
        if rec is None:
            raise AdapterNotFound(name)
        if not rec.visible_to(tenant):
            raise PermissionDenied(f"adapter {name!r} is not available to tenant {tenant!r}")
        return rec

    async def _guard(self, context, fn):
        try:
            return await fn()
        except PreftError as e:
            await context.abort(_status(e.grpc_code), e.message)

    # ------------------------------------------------------------------ adapters
    async def ListAdapters(self, request, context):
        async def run():
            tenant = await self._tenant(context)
            return pb.ListAdaptersResponse(adapters=[
                _adapter_pb(r) for _, r in sorted(self.view.adapters.items())
                if r.visible_to(tenant)])
        return await self._guard(context, run)

    async def GetAdapter(self, request, context):
        async def run():
            return _adapter_pb(self._adapter(request.name, await self._tenant(context)))
        return await self._guard(context, run)

    async def DeleteAdapter(self, request, context):
        async def run():
            tenant = await self._tenant(context)
            rec = self._adapter(request.name, tenant)
            if tenant not in (None, "admin") and rec.owner != tenant:
                raise PermissionDenied(f"adapter {rec.name!r} belongs to another tenant")
            await asyncio.to_thread(self.view.state.delete_adapter, rec.name)
            self.view.drop_adapter(rec.name)
            if not any(r.sha256 == rec.sha256 for r in self.view.adapters.values()):
                await asyncio.to_thread(self.store.delete, rec.uri)
            await self._broadcast("drop_adapter", rec.name)
            return pb.DeleteAdapterResponse(deleted=True)
        return await self._guard(context, run)

    async def RegisterAdapter(self, request_iterator, context):
        async def run():
            tenant = await self._tenant(context)
            first = await anext(request_iterator.__aiter__(), None)
            if first is None or not first.HasField("header"):
                raise InvalidAdapter("the first upload message must be a header with the name")
            h = first.header
            check_adapter_name(h.name)
            if h.kind and h.kind not in ADAPTER_KINDS:  # empty: the files say which
                raise InvalidAdapter(f"kind {h.kind!r} is not supported; supported: "
                                     f"{list(ADAPTER_KINDS)}")
            old = self.view.adapters.get(h.name)
            if old is not None and tenant not in (None, "admin") and old.owner != tenant:
                raise PermissionDenied(f"adapter {h.name!r} belongs to another tenant")
            writer = UploadWriter(self.store, self.cfg.max_adapter_bytes)
            try:  # nothing stays in the store unless it validated: clean up before answering
                async for msg in request_iterator:
                    if not msg.HasField("chunk"):
                        raise InvalidAdapter("only one header per upload")
                    writer.write(msg.chunk.filename, msg.chunk.data)
                spec = await self._validate_upload(writer.finish(), h.kind)
                if h.kind and h.kind != spec.kind:
                    raise InvalidAdapter(f"the header says kind {h.kind!r} but the files are a "
                                         f"{spec.kind} adapter; fix the header or the files")
                uri = await asyncio.to_thread(self.store.commit, writer.dir, spec.sha256)
            except BaseException:
                writer.abort()
                raise
            state = self.view.state
            version = await asyncio.to_thread(state.next_version, h.name)
            rec = AdapterRecord(h.name, spec.kind, version, spec.sha256, spec.rank,
                                tuple(spec.target_modules), spec.size_bytes,
                                owner=tenant or "", public=h.public, uri=uri)
            await asyncio.to_thread(state.put_adapter, rec)
            self.view.put_adapter(rec)
            if old is not None:  # every cached copy of older versions goes
                await self._broadcast("invalidate", h.name, version)
            return _adapter_pb(rec)

        return await self._guard(context, run)

    async def _validate_upload(self, staged, kind: str):
        """Tensor-level checks need torch: a prefill (or colocated) worker does them, as
        ``kind`` (empty: what the files declare)."""
        try:
            validator = self.pool.pick_adapter_host(None)
        except NoWorkers as e:  # else gRPC answers UNKNOWN "Unexpected NoWorkers"
            raise WorkerUnavailable(f"cannot validate the adapter now: {e}; retry") from None
        try:
            return await validator.actor.validate_adapter.remote(str(staged), kind or None)
        except Exception as e:
            cause = _unwrap(e)
            if isinstance(cause, PreftError):
                raise cause from None
            raise WorkerUnavailable(
                f"adapter validation failed on {validator.worker_id}: {cause}") from None

    async def _broadcast(self, method: str, *args) -> None:
        refs = [getattr(w.actor, method).remote(*args)
                for w in self.pool.adapter_hosts() if w.healthy]
        for ref in refs:
            try:
                await asyncio.wait_for(ref, 30)
            except Exception as e:  # a dead worker has nothing cached; log and go on
                log.warning("%s%s on a prefill worker failed: %s", method, args, e)

    # ------------------------------------------------------------------ cluster
    async def _sync_members(self, members) -> None:
        import ray

        alive = set(members)
        for wid, rec in members.items():
            if self.pool.find(wid) is None and rec.actor_name:
                try:
                    actor = ray.get_actor(rec.actor_name)
                    info = await asyncio.wait_for(actor.info.remote(), 10)
                    self.pool.add(WorkerHandle(info, actor))
                    log.info("worker %s joined the %s pool", wid, info.role)
                except Exception as e:
                    log.warning("member %s (%s) not reachable yet: %s", wid, rec.actor_name, e)
        self.pool.mark_alive(alive)

    async def ClusterStatus(self, request, context):
        async def run():
            await self._tenant(context)
            out = []
            for w in self.pool.all():
                ws = pb.WorkerStatus(worker_id=w.worker_id, role=w.info.role, healthy=w.healthy,
                                     outstanding=w.outstanding)
                try:
                    if w.info.role in ("decode", "colocated"):
                        u = await asyncio.wait_for(w.actor.kv_usage.remote(), 5)
                        ws.kv_blocks_total, ws.kv_blocks_free = u.blocks_total, u.blocks_free
                    if w.info.role in ("prefill", "colocated"):
                        st = await asyncio.wait_for(w.actor.stats.remote(), 5)
                        ws.kv_bytes_sent, ws.held_transfers = st.bytes, st.held
                        ws.resident.update(st.resident)
                except Exception:  # unreachable: fall back to what it last published
                    ws.healthy = False
                    if w.info.role in ("prefill", "colocated"):
                        ws.resident.update(await asyncio.to_thread(self._residency, w.worker_id))
                out.append(ws)
            return pb.ClusterStatusResponse(workers=out, router_inflight=self.inflight,
                                            adapters=len(self.view.adapters),
                                            state_stale=self.view.stale)
        return await self._guard(context, run)

    def _residency(self, worker_id: str) -> dict[str, str]:
        try:
            return self.view.state.residency([worker_id])[worker_id]
        except Exception:
            return {}

    # ------------------------------------------------------------------ generate
    async def Generate(self, request: pb.GenerateRequest, context):
        t_admit = time.time()
        try:
            preq = self._validate(request, await self._tenant(context), t_admit)
            if self.inflight >= self.cfg.max_queue_depth:
                raise Overloaded(f"router is at its queue limit ({self.inflight} requests in "
                                 f"flight, max_queue_depth={self.cfg.max_queue_depth}); retry "
                                 "after a short backoff")
        except PreftError as e:
            if isinstance(e, Overloaded):
                context.set_trailing_metadata((("retry-after-ms", "500"),))
            self.metrics.requests.labels(_status(e.grpc_code).name).inc()
            await context.abort(_status(e.grpc_code), e.message)
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

    async def _call(self, awaitable, context, what: str, worker: WorkerHandle):
        """Await a worker call within the request's deadline; map failures to a status."""
        remaining = context.time_remaining()
        timeout = self.cfg.request_timeout_s if remaining is None else min(
            remaining, self.cfg.request_timeout_s)
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"{what} on {worker.worker_id} exceeded the deadline")
        except PreftError as e:
            await context.abort(_status(e.grpc_code), e.message)
        except (asyncio.CancelledError, grpc.aio.AbortError, StopAsyncIteration):
            raise
        except Exception as e:
            await self._abort_for(e, context, what, worker)

    def _mark_dead(self, worker: WorkerHandle) -> None:
        """Stop routing to a dead actor now; its member record goes too, so membership sync
        does not revive it before Ray's restarted instance heartbeats again."""
        worker.healthy = False
        self.view.members.pop(worker.worker_id, None)

        def leave() -> None:
            try:
                self.view.state.leave(worker.worker_id)
            except Exception:  # Redis down: the record expires by TTL instead
                pass
        asyncio.get_running_loop().run_in_executor(None, leave)

    async def _abort_for(self, e: BaseException, context, what: str, worker: WorkerHandle):
        import ray.exceptions as rx

        cause = _unwrap(e)
        if isinstance(cause, PreftError):
            await context.abort(_status(cause.grpc_code), cause.message)
        if isinstance(e, (rx.RayActorError, rx.ActorUnavailableError)):
            log.warning("%s on %s failed: %r", what, worker.worker_id, e)
            self._mark_dead(worker)
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"{what}: worker {worker.worker_id} died or is unreachable; "
                                "retry the request")
        log.exception("%s failed", what)
        await context.abort(grpc.StatusCode.INTERNAL, f"{what} failed: {type(cause).__name__}: {cause}")

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
                f"adapter {a.name!r} is an all-token LoRA (kind {a.kind!r}): only colocated "
                "workers serve it, and this cluster has none healthy; start some "
                "(`preft up --colocated-workers N`) or register it as kind lora_p"))
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

    async def _run_colocated(self, preq, place: Placement, t_admit: float, context, out):
        """One colocated worker: prompt with the adapter, first token, decode, no KV moves."""
        w = place.colocated
        out.kv = pb.KVTransfer(prefill_worker=w.worker_id, decode_worker=w.worker_id)
        w.outstanding += 1
        gen = w.actor.generate.remote(preq)
        t_dec = None
        try:
            async for d in self._stream(gen, context, "generate", w):
                if d.prompt_tokens is not None:
                    self._first_token(out, t_admit, d.queue_s, d.prefill_s, d.prompt_tokens,
                                      preq, d.adapter_tier, d.adapter_load_s)
                    t_dec = time.time()
                out.add(d)
                if d.token_ids or d.text:
                    yield pb.TokenDelta(token_ids=list(d.token_ids), text=d.text)
        finally:
            w.outstanding -= 1
        out.decode_s = time.time() - t_dec if t_dec is not None else 0.0

    async def _run_prefill_decode(self, preq, place: Placement, t_admit: float, context, out):
        """Prefill (adapter, first token, KV held) -> first token out -> decode stream."""
        pw, dw = place.prefill, place.decode
        res = await self._prefill(pw, preq, context)
        self._first_token(out, t_admit, res.queue_s, res.prefill_s, len(res.prompt_token_ids),
                          preq, res.adapter_tier, res.adapter_load_s)
        out.kv = pb.KVTransfer(prefill_worker=pw.worker_id)
        out.add(DecodeDelta((res.first_token,), res.first_text, res.finish_reason))
        yield pb.TokenDelta(token_ids=[res.first_token], text=res.first_text)
        if res.kv is not None:
            out.kv.blocks = res.kv.num_blocks
        if res.finish_reason is not None:
            return
        dreq = DecodeRequest(preq.request_id, res.prompt_token_ids, res.first_token, res.kv,
                             res.kv_namespace, preq.sampling)
        out.kv.decode_worker = dw.worker_id
        t_dec = time.time()
        async for delta in self._decode(pw, dw, dreq, res, context, out):
            yield delta
        out.decode_s = time.time() - t_dec

    async def _prefill(self, pw: WorkerHandle, preq: PrefillRequest, context):
        pw.outstanding += 1
        ref = pw.actor.prefill.remote(preq)
        try:
            return await self._call(ref, context, "prefill", pw)
        except BaseException:
            _cancel(ref)  # client cancel or deadline: the worker aborts the request
            raise
        finally:
            pw.outstanding -= 1

    async def _decode(self, pw, dw, dreq: DecodeRequest, res, context, out):
        m = self.metrics
        dw.outstanding += 1
        gen = dw.actor.decode.remote(dreq)
        try:
            async for d in self._stream(gen, context, "decode", dw):
                if d.kv_transfer_s is not None:
                    out.kv_transfer_s, out.first_decode_step_s = d.kv_transfer_s, d.first_step_s
                    out.kv.bytes = d.kv_bytes or 0
                    m.observe_kv(pw.worker_id, dw.worker_id, out.kv.bytes, d.kv_transfer_s)
                out.add(d)
                if d.token_ids or d.text:
                    yield pb.TokenDelta(token_ids=list(d.token_ids), text=d.text)
        except BaseException as e:
            if out.kv.bytes == 0:  # decode never pulled: free the prefill side's blocks now
                pw.actor.release.remote(res.kv.transfer_id)
                if not isinstance(e, asyncio.CancelledError):
                    m.kv_failures.labels(pw.worker_id, dw.worker_id).inc()
            raise
        finally:
            dw.outstanding -= 1

    async def _stream(self, gen, context, what: str, worker: WorkerHandle):
        """The items of a worker's Ray stream, each within the request's deadline."""
        try:
            while True:
                try:
                    ref = await self._call(gen.__anext__(), context, what, worker)
                except StopAsyncIteration:
                    return
                yield await self._call(ref, context, what, worker)
        except BaseException:
            _cancel(gen)
            raise

    def _final(self, preq: PrefillRequest, t_admit: float, out: "_Outcome") -> pb.GenerateResponse:
        m = self.metrics
        total = time.time() - t_admit
        m.e2e.observe(total)
        m.generation_tokens.inc(out.n_tokens)
        if out.n_tokens > 1:
            m.tpot.observe((total - out.ttft_s) / (out.n_tokens - 1))
        timings = pb.Timings(queue_s=out.queue_s, prefill_s=out.prefill_s, ttft_s=out.ttft_s,
                             kv_transfer_s=out.kv_transfer_s,
                             first_decode_step_s=out.first_decode_step_s or 0.0,
                             decode_s=out.decode_s, total_s=total)
        return pb.GenerateResponse(final=pb.Final(
            request_id=preq.request_id, finish_reason=out.finish or "length",
            usage=pb.Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.n_tokens),
            timings=timings, kv=out.kv))


class _Outcome:
    """What one Generate gathered on its path, for the final message and the metrics."""

    def __init__(self) -> None:
        self.n_tokens = 0
        self.finish: str | None = None
        self.prompt_tokens = 0
        self.ttft_s = self.queue_s = self.prefill_s = self.decode_s = 0.0
        self.kv_transfer_s = self.first_decode_step_s = 0.0
        self.kv = pb.KVTransfer()

    def add(self, d) -> None:
        self.n_tokens += len(d.token_ids)
        if d.finish_reason:
            self.finish = d.finish_reason


def _cancel(ref) -> None:
    try:
        import ray
        ray.cancel(ref)
    except Exception:
        pass


def check_bind_is_safe(cfg: RouterConfig) -> None:
    """An open API (no keys) only on loopback."""
    import ipaddress

    if cfg.require_auth:
        return
    host = cfg.host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise PermissionError(
            f"refusing to serve an open API on {cfg.host}: either bind 127.0.0.1, or require "
            "API keys (--require-auth) after creating one with `preft keys create --tenant NAME`")


def create_server(cfg: RouterConfig, pool: WorkerPool, view: StateView,
                  store: AdapterStore) -> tuple[grpc.aio.Server, int]:
    """The router's ``grpc.aio`` server, bound but not started; returns (server, port).

    With ``cfg.tls_cert``/``tls_key`` the TCP port serves TLS only (with ``tls_client_ca``:
    mutual TLS, a client without a certificate from that CA is refused in the handshake),
    and the server also listens on a plaintext Unix socket in a fresh 0700 directory
    (``server.local_address``, ``unix:/tmp/preft-router-.../router.sock``) for clients in
    the same account (``preft up``'s start-up uploads and HTTP gateway). Without TLS,
    ``server.local_address`` is None.
    """
    import os
    import tempfile
    from pathlib import Path

    check_bind_is_safe(cfg)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    service = RouterService(cfg, pool, view, store)
    pb_grpc.add_RouterServicer_to_server(service, server)
    server.service = service
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (pb.DESCRIPTOR.services_by_name["Router"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    server.local_address = None
    server.local_dir = None
    if cfg.tls_cert:
        client_ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
        try:
            creds = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
                root_certificates=client_ca, require_client_auth=client_ca is not None)
        except (OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"router TLS: cannot load tls_cert={cfg.tls_cert!r} / "
                             f"tls_key={cfg.tls_key!r}: {e}") from None
        try:
            port = server.add_secure_port(f"{cfg.host}:{cfg.port}", creds)
        except RuntimeError as e:  # gRPC says "failed to bind" for a bad key/cert too
            raise ValueError(f"router TLS on {cfg.host}:{cfg.port}: {e}; check that "
                             f"tls_cert={cfg.tls_cert!r} and tls_key={cfg.tls_key!r} are a "
                             "matching PEM certificate and private key") from None
        local_dir = tempfile.mkdtemp(prefix="preft-router-")   # mode 0700: this account only
        os.chmod(local_dir, 0o700)
        local = f"unix:{local_dir}/router.sock"
        if not server.add_insecure_port(local):
            raise OSError(f"router could not bind its local socket {local}")
        server.local_address, server.local_dir = local, local_dir
    else:
        port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if cfg.host.strip("[]") not in ("127.0.0.1", "::1", "localhost"):
            log.warning("router on %s:%s without TLS: API keys and prompts cross the network "
                        "in plaintext; serve TLS with --tls-cert/--tls-key", cfg.host, port)
    if port == 0:
        raise OSError(f"router could not bind {cfg.host}:{cfg.port}")
    server.health_servicer = health_servicer  # set SERVING once started
    return server, port


async def start(server: grpc.aio.Server) -> None:
    await server.service.view.refresh()
    server.service.view.start()
    await server.start()
    await server.health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.health_servicer.set("preft.v1.Router", health_pb2.HealthCheckResponse.SERVING)


async def serve(cfg: RouterConfig, pool: WorkerPool, view: StateView, store: AdapterStore,
                ready=None) -> None:
    server, port = create_server(cfg, pool, view, store)
    await start(server)
    if ready is not None:
        ready(port)
    try:
        await server.wait_for_termination()
    finally:
        await server.health_servicer.enter_graceful_shutdown()
        await server.service.view.stop()
        await server.stop(grace=5)
        server.service.close()
        if server.local_dir is not None:
            import shutil
            shutil.rmtree(server.local_dir, ignore_errors=True)
