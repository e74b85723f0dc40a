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

from cluster.config import RouterConfig
from cluster.errors import InvalidRequest, PreftError
from cluster.messages import DecodeRequest, PrefillRequest, Sampling
from proto.preft.v1 import router_pb2 as pb
from proto.preft.v1 import router_pb2_grpc as pb_grpc
from router.pool import NoWorkers, WorkerPool

log = logging.getLogger(__name__)


def _status(code_name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code_name, grpc.StatusCode.INTERNAL)


def _unwrap(e: BaseException) -> BaseException:
    """Ray wraps actor exceptions; return the typed error raised inside the worker."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def to_sampling(p: pb.SamplingParams) -> Sampling:
    return Sampling(
        max_tokens=int(p.max_tokens),
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        seed=p.seed if p.HasField("seed") else None,
        stop=tuple(p.stop), ignore_eos=p.ignore_eos,
    ).validate()


class RouterService(pb_grpc.RouterServicer):
    def __init__(self, cfg: RouterConfig, pool: WorkerPool) -> None:
        self.cfg = cfg
        self.pool = pool
        self.inflight = 0

    async def ListAdapters(self, request, context):
        return pb.ListAdaptersResponse(adapters=[
            pb.Adapter(name=n, version=v) for n, v in sorted(self.pool.adapters().items())])

    async def Generate(self, request: pb.GenerateRequest, context):
        t_admit = time.time()
        try:
            preq = self._validate(request, t_admit)
        except PreftError as e:
            await context.abort(_status(e.grpc_code), e.message)
        if self.inflight >= self.cfg.max_queue_depth:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"router queue is full ({self.inflight} requests); retry later")
        self.inflight += 1
        try:
            async for msg in self._generate(preq, t_admit, context):
                yield msg
        finally:
            self.inflight -= 1

    def _validate(self, request: pb.GenerateRequest, t_admit: float) -> PrefillRequest:
        adapter = request.adapter or None
        if adapter is not None and adapter not in self.pool.adapters():
            from cluster.errors import AdapterNotFound
            raise AdapterNotFound(adapter)
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
        rid = request.request_id or uuid.uuid4().hex
        if which == "text":
            return PrefillRequest(rid, adapter, sampling, prompt_text=request.text,
                                  enqueued_at=t_admit)
        return PrefillRequest(rid, adapter, sampling,
                              prompt_token_ids=tuple(request.token_ids.ids), enqueued_at=t_admit)

    async def _call(self, awaitable, context, what: str):
        remaining = context.time_remaining()
        timeout = self.cfg.request_timeout_s if remaining is None else min(
            remaining, self.cfg.request_timeout_s)
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{what} timed out")
        except PreftError as e:
            await context.abort(_status(e.grpc_code), e.message)
        except (asyncio.CancelledError, grpc.aio.AbortError, StopAsyncIteration):
            raise
        except Exception as e:
            await self._abort_for(e, context, what)

    async def _abort_for(self, e: BaseException, context, what: str):
        import ray.exceptions as rx

        cause = _unwrap(e)
        if isinstance(cause, PreftError):
            await context.abort(_status(cause.grpc_code), cause.message)
        if isinstance(e, (rx.RayActorError, rx.ActorUnavailableError)):
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"{what}: worker died or is unreachable; retry the request")
        log.exception("%s failed", what)
        await context.abort(grpc.StatusCode.INTERNAL, f"{what} failed: {type(cause).__name__}: {cause}")

    async def _generate(self, preq: PrefillRequest, t_admit: float, context):
        try:
            pw = self.pool.pick_prefill(preq.adapter)
            dw = self.pool.pick_decode()
        except NoWorkers as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        pw.outstanding += 1
        try:
            res = await self._call(pw.actor.prefill.remote(preq), context, "prefill")
        finally:
            pw.outstanding -= 1
        t_first = time.time()
        yield pb.GenerateResponse(delta=pb.TokenDelta(token_ids=[res.first_token],
                                                      text=res.first_text))
        n_out, finish = 1, res.finish_reason
        timings = pb.Timings(queue_s=res.queue_s, prefill_s=res.prefill_s,
                             ttft_s=t_first - t_admit)
        kv = pb.KVTransfer(prefill_worker=pw.worker_id)
        if finish is None:
            dreq = DecodeRequest(preq.request_id, res.prompt_token_ids, res.first_token, res.kv,
                                 res.kv_namespace, preq.sampling)
            kv.decode_worker = dw.worker_id
            dw.outstanding += 1
            gen = dw.actor.decode.remote(dreq)
            t_dec = time.time()
            try:
                while True:
                    try:
                        ref = await self._call(gen.__anext__(), context, "decode")
                    except StopAsyncIteration:
                        break
                    d = await self._call(ref, context, "decode")
                    if d.kv_transfer_s is not None:
                        timings.kv_transfer_s = d.kv_transfer_s
                        timings.first_decode_step_s = d.first_step_s or 0.0
                        kv.bytes = d.kv_bytes or 0
                    n_out += len(d.token_ids)
                    if d.token_ids or d.text:
                        yield pb.GenerateResponse(delta=pb.TokenDelta(
                            token_ids=list(d.token_ids), text=d.text))
                    if d.finish_reason:
                        finish = d.finish_reason
            except BaseException:
                _cancel(gen)
                raise
            finally:
                dw.outstanding -= 1
            timings.decode_s = time.time() - t_dec
        timings.total_s = time.time() - t_admit
        if res.kv is not None:
            kv.blocks = res.kv.num_blocks
        yield pb.GenerateResponse(final=pb.Final(
            request_id=preq.request_id, finish_reason=finish or "length",
            usage=pb.Usage(prompt_tokens=len(res.prompt_token_ids), completion_tokens=n_out),
            timings=timings, kv=kv))


def _cancel(gen) -> None:
    try:
        import ray
        ray.cancel(gen)
    except Exception:
        pass


def create_server(cfg: RouterConfig, pool: WorkerPool) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    pb_grpc.add_RouterServicer_to_server(RouterService(cfg, pool), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (pb.DESCRIPTOR.services_by_name["Router"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    if port == 0:
        raise OSError(f"router could not bind {cfg.host}:{cfg.port}")
    server.health_servicer = health_servicer  # set SERVING once started
    return server, port


async def start(server: grpc.aio.Server) -> None:
    await server.start()
    await server.health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.health_servicer.set("preft.v1.Router", health_pb2.HealthCheckResponse.SERVING)


async def serve(cfg: RouterConfig, pool: WorkerPool, ready=None) -> None:
    server, port = create_server(cfg, pool)
    await start(server)
    if ready is not None:
        ready(port)
    try:
        await server.wait_for_termination()
    finally:
        await server.health_servicer.enter_graceful_shutdown()
        await server.stop(grace=5)
