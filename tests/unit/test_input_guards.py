"""Small guards at the edges (issue 12, item 8): adapter names, the gateway's bind check,
the router's tenant lookup off the event loop, and ``lora_kernel: stock`` refused."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from cluster.adapter_store import check_adapter_name
from cluster.config import ConfigError, EngineConfig, PrefillConfig, valid_adapter_name
from cluster.errors import InvalidAdapter, Unauthenticated
from cluster.state import hash_key
from proto.preft.v1 import router_pb2 as pb
from proto.preft.v1 import router_pb2_grpc as pb_grpc

# ----------------------------------------------------------------------------- adapter names


@pytest.mark.parametrize("name", ["abc\n", "abc\r\n", "\nabc", "a b", "a/b", "a..b", "-a", ""])
def test_bad_adapter_names_are_refused(name):
    assert not valid_adapter_name(name)
    with pytest.raises(InvalidAdapter, match="invalid"):
        check_adapter_name(name)


@pytest.mark.parametrize("name", ["abc", "a", "user-7.v2_x", "A" * 128])
def test_good_adapter_names_pass(name):
    assert valid_adapter_name(name)
    check_adapter_name(name)


def test_adapter_name_length_limit():
    assert not valid_adapter_name("A" * 129)
    assert not valid_adapter_name("A" * 128 + "\n")


# ----------------------------------------------------------------------------- lora_kernel


def test_stock_lora_kernel_is_refused():
    with pytest.raises(ConfigError, match=r"PrefillConfig\.lora_kernel='stock'.*mixed batch"):
        PrefillConfig(EngineConfig(model="m"), lora_kernel="stock")
    assert PrefillConfig(EngineConfig(model="m")).lora_kernel == "grouped"


# ----------------------------------------------------------------------------- tenant lookup


class _SlowState:
    """Redis stand-in whose per-key lookup blocks its caller for ``delay`` seconds."""

    def __init__(self, keys: dict[str, str], delay: float = 0.3) -> None:
        self.keys, self.delay, self.calls = keys, delay, 0

    def tenant_for(self, api_key: str) -> str | None:
        self.calls += 1
        time.sleep(self.delay)
        return self.keys.get(api_key)


class _Context:
    def __init__(self, key: str | None) -> None:
        self.md = () if key is None else (("authorization", f"Bearer {key}"),)

    def invocation_metadata(self):
        return self.md


def _service(state, require_auth: bool):
    from cluster.config import RouterConfig
    from router.pool import WorkerPool
    from router.server import RouterService
    from router.state_view import StateView

    view = StateView(state)
    return RouterService(RouterConfig(require_auth=require_auth), WorkerPool(), view,
                         store=None), view


async def _ticks_while(coro, period: float = 0.01) -> tuple[object, int]:
    """Run ``coro``; count how often a 10 ms ticker ran on the same loop meanwhile."""
    ticks = 0
    done = asyncio.Event()

    async def ticker():
        nonlocal ticks
        while not done.is_set():
            await asyncio.sleep(period)
            ticks += 1

    t = asyncio.create_task(ticker())
    try:
        return await coro, ticks
    finally:
        done.set()
        await t


def test_tenant_lookup_does_not_block_the_event_loop():
    state = _SlowState({"k-new": "alice"}, delay=0.3)
    svc, _ = _service(state, require_auth=True)

    async def main():
        return await _ticks_while(svc._tenant(_Context("k-new")))

    (tenant, ticks) = asyncio.run(main())
    assert tenant == "alice" and state.calls == 1
    assert ticks >= 10, f"the loop ran only {ticks} ticks during a 0.3 s Redis lookup"
    svc.close()


def test_tenant_lookup_keeps_its_behaviour():
    state = _SlowState({"k-new": "alice"}, delay=0.0)
    svc, view = _service(state, require_auth=True)
    view.key_tenants = {hash_key("k-cached"): "bob"}

    async def main():
        assert await svc._tenant(_Context("k-cached")) == "bob"
        assert state.calls == 0                       # a cached key never asks Redis
        assert await svc._tenant(_Context("k-new")) == "alice"
        assert await svc._tenant(_Context("k-new")) == "alice"
        assert state.calls == 1                       # and is cached afterwards
        with pytest.raises(Unauthenticated, match="unknown API key"):
            await svc._tenant(_Context("k-unknown"))
        with pytest.raises(Unauthenticated, match="missing API key"):
            await svc._tenant(_Context(None))
        view.stale = True                             # Redis down: the cached view only
        calls = state.calls
        with pytest.raises(Unauthenticated, match="unknown API key"):
            await svc._tenant(_Context("k-other"))
        assert state.calls == calls

    asyncio.run(main())
    svc.close()


def test_tenant_lookup_open_mode():
    class _Down:
        def tenant_for(self, api_key):
            raise ConnectionError("redis down")

    svc, _ = _service(_Down(), require_auth=False)

    async def main():
        assert await svc._tenant(_Context(None)) is None
        assert await svc._tenant(_Context("whatever")) is None   # lookup error: no tenant

    asyncio.run(main())
    svc.close()


# ----------------------------------------------------------------------------- gateway bind


class _FakeRouter(pb_grpc.RouterServicer):
    def __init__(self, require_auth: bool) -> None:
        self.require_auth = require_auth

    def ListAdapters(self, request, context):
        md = dict(context.invocation_metadata())
        if self.require_auth and "authorization" not in md:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing API key")
        return pb.ListAdaptersResponse()


@pytest.fixture
def fake_router(request):
    server = grpc.server(ThreadPoolExecutor(2))
    pb_grpc.add_RouterServicer_to_server(_FakeRouter(request.param), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


@pytest.mark.parametrize("fake_router", [False], indirect=True)
def test_gateway_refuses_open_api_on_a_public_address(fake_router, capsys):
    from http_gateway import main, serve_http

    with pytest.raises(PermissionError, match="refusing to serve an open API on 0.0.0.0"):
        asyncio.run(serve_http(fake_router, "0.0.0.0", 0))
    assert main(["--router", fake_router, "--host", "0.0.0.0", "--port", "0"]) == 1
    assert "refusing to serve an open API" in capsys.readouterr().err


@pytest.mark.parametrize("fake_router", [False], indirect=True)
def test_gateway_serves_open_api_on_loopback(fake_router):
    from http_gateway import HttpGatewayThread

    gw = HttpGatewayThread(fake_router, host="127.0.0.1", port=0)
    assert gw.start() > 0
    gw.stop()


@pytest.mark.parametrize("fake_router", [True], indirect=True)
def test_gateway_serves_a_public_address_when_the_router_requires_keys(fake_router):
    from http_gateway import HttpGatewayThread

    gw = HttpGatewayThread(fake_router, host="0.0.0.0", port=0)
    assert gw.start() > 0
    gw.stop()


def test_gateway_refuses_a_public_address_when_the_router_is_unreachable():
    import socket

    from http_gateway import check_bind_is_safe, create_app

    with socket.socket() as s:              # bound, not listening: connections are refused
        s.bind(("127.0.0.1", 0))
        app = create_app(f"127.0.0.1:{s.getsockname()[1]}")
        with pytest.raises(PermissionError, match="cannot confirm"):
            asyncio.run(check_bind_is_safe(app.state.gateway, "0.0.0.0", timeout=0.5))
