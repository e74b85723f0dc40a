"""What every RPC of the router shares: the start of step 2 of a request's path.

Each RPC, ``Generate`` (``router/generate.py``) and the adapter and cluster RPCs
(``router/admin.py``) alike, begins here: the caller's tenant from its API key, the adapter
it names (visible to that tenant, or refused), and a typed :class:`PreftError` answered as
its status code. :class:`ServiceBase` holds the state they all read: the config, the worker
pool, the cached Redis view, the adapter store, the metrics and the requests in flight.
``router/server.py`` composes the two into the one gRPC service.
"""

from __future__ import annotations

import grpc

from cluster.adapter_store import AdapterStore
from cluster.config import RouterConfig
from cluster.errors import AdapterNotFound, PermissionDenied, PreftError, Unauthenticated
from cluster.state import AdapterRecord
from router.plane import Planes
from router.metrics import RouterMetrics, default_metrics
from router.pool import WorkerPool
from router.state_view import StateView


def grpc_status(code_name: str) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, code_name, grpc.StatusCode.INTERNAL)


def unwrap(e: BaseException) -> BaseException:
    """Ray wraps actor exceptions; return the typed error raised inside the worker."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


class ServiceBase:
    """The router's state, the caller's tenant and the adapters it may use."""

    def __init__(self, cfg: RouterConfig, pool: WorkerPool, view: StateView,
                 store: AdapterStore) -> None:
        self.cfg = cfg
        self.pool = pool
        self.view = view
        self.store = store
        self.inflight = 0
        self.draining = False      # shutting down: Generate refuses new requests
        self.metrics: RouterMetrics = default_metrics()
        self.planes = Planes(cfg.secret, cfg.plane_max_bytes)   # the worker calls, by worker

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
            await context.abort(grpc_status(e.grpc_code), e.message)

