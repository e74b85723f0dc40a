"""The router's gRPC server: where a request enters the router (step 2) and where its
tokens leave it (step 6).

:class:`RouterService` is the one ``preft.v1.Router`` service, composed of its two jobs:
the Generate path (``router/generate.py``) and the adapter and cluster RPCs
(``router/admin.py``), over the state and tenant helpers they share
(``router/service_base.py``). It wires membership sync into the state view, runs the pin sync
(``router/pin_sync.py``) and serves the pools' gauges to ``/metrics``.

``create_server(cfg, pool, view, store) -> (server, port)`` builds a ``grpc.aio`` server
with the standard health service and reflection: an open API only on loopback
(``check_bind_is_safe``), TLS when configured (plus a local Unix socket). ``start`` marks it
SERVING; ``serve`` runs it until stopped.
"""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cluster.adapter_store import AdapterStore
from cluster.config import RouterConfig
from cluster.messages import MAX_REPLY_BYTES, MAX_REQUEST_BYTES
from proto.preft.v1 import router_pb2 as pb
from proto.preft.v1 import router_pb2_grpc as pb_grpc
from router.admin import AdminRpcs
from router.generate import GenerateRpcs, to_sampling
from router.pin_sync import PinSync
from router.pool import WorkerPool
from router.state_view import StateView

__all__ = ["RouterService", "check_bind_is_safe", "create_server", "serve", "start",
           "to_sampling"]

log = logging.getLogger(__name__)


class RouterService(AdminRpcs, GenerateRpcs, pb_grpc.RouterServicer):
    """The Router service: ``Generate`` from :class:`GenerateRpcs`, the adapter RPCs and
    ``ClusterStatus`` from :class:`AdminRpcs`."""

    def __init__(self, cfg: RouterConfig, pool: WorkerPool, view: StateView,
                 store: AdapterStore) -> None:
        super().__init__(cfg, pool, view, store)
        view.on_members = self._sync_members
        self.pin_sync = PinSync(pool, view, cfg.pin_sync_s)
        self.metrics.set_gauge_source(self._gauges)

    async def drain(self, timeout: float, say=log.info) -> int:
        """Stop taking requests (``Generate`` answers UNAVAILABLE; health NOT_SERVING is
        the server's to set) and wait up to ``timeout`` s for those in flight to finish;
        then end the rest (:meth:`end_streams`). Returns how many were ended unfinished."""
        import asyncio

        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.inflight:
            say(f"draining {self.inflight} request(s) in flight for up to {timeout:g} s; "
                "new requests are refused")
        while self.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = self.inflight
        if left:
            say(f"{left} request(s) still running after {timeout:g} s: ending them "
                "(UNAVAILABLE, the router is shutting down)")
            self.end_streams(timeout)
            end = loop.time() + 5.0
            while self.inflight and loop.time() < end:
                await asyncio.sleep(0.05)
        return left

    def end_streams(self, timeout: float) -> None:
        """Every worker call in flight fails, and every later one: each request still
        running ends with UNAVAILABLE saying the router is shutting down."""
        self.draining = True
        self.planes.shut(f"the router is shutting down: this request was still running "
                         f"when its drain period ({timeout:g} s) ended; retry it against "
                         "another router, or once it is back")

    def close(self) -> None:
        """The router stopped: its pool's gauges leave /metrics, its plane connections close."""
        self.metrics.clear_gauge_source(self._gauges)
        self.planes.close()
        sweep = self.__dict__.get("_retire_sweep")   # replaced versions' copies: left as is
        if sweep is not None:
            sweep.cancel()

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
    check_bind_is_safe(cfg)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                                      ("grpc.max_send_message_length", MAX_REPLY_BYTES)])
    service = RouterService(cfg, pool, view, store)
    pb_grpc.add_RouterServicer_to_server(service, server)
    server.service = service
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (pb.DESCRIPTOR.services_by_name["Router"].full_name,
             health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    port = _bind(server, cfg)
    server.health_servicer = health_servicer  # set SERVING once started
    return server, port


def _bind(server: grpc.aio.Server, cfg: RouterConfig) -> int:
    """Bind ``cfg.host:cfg.port``: TLS (and the local socket) when configured, else
    plaintext; returns the port."""
    server.local_address = None
    server.local_dir = None
    if cfg.tls_cert:
        port = _bind_tls(server, cfg)
    else:
        port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if cfg.host.strip("[]") not in ("127.0.0.1", "::1", "localhost"):
            log.warning("router on %s:%s without TLS: API keys and prompts cross the network "
                        "in plaintext; serve TLS with --tls-cert/--tls-key", cfg.host, port)
    if port == 0:
        raise OSError(f"router could not bind {cfg.host}:{cfg.port}")
    return port


def _bind_tls(server: grpc.aio.Server, cfg: RouterConfig) -> int:
    """The TLS port (mutual with ``tls_client_ca``), and the plaintext Unix socket in a
    fresh 0700 directory for clients in the same account; returns the port."""
    import os
    import tempfile
    from pathlib import Path

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
    return port


async def start(server: grpc.aio.Server) -> None:
    await server.service.view.refresh()
    server.service.view.start()
    server.service.pin_sync.start()
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
        await server.service.pin_sync.stop()
        await server.stop(grace=5)
        server.service.close()
        if server.local_dir is not None:
            import shutil
            shutil.rmtree(server.local_dir, ignore_errors=True)
