"""The SDK's retries, against a real gRPC server on loopback (a fake ``RouterServicer``).

The SDK retries ``UNAVAILABLE`` through gRPC's own retry policy (a service config on the
channel): a call is retried until it is committed, so a ``Generate`` stream is retried only
before its first message; ``retries=0`` makes one attempt; an adapter upload is never
retried; gRPC caps a call at 5 attempts. The server counts the attempts it saw.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from preft_client import AsyncPreftClient, PreftClient, Unavailable
from proto.preft.v1 import router_pb2 as pb
from proto.preft.v1 import router_pb2_grpc as pb_grpc

FAST = dict(timeout=10.0, backoff_s=0.01)   # retries in milliseconds; a hang fails fast


def _fails(key: str) -> int:
    """How many first attempts of a call fail: ``"down-2"`` -> 2, ``"down"`` -> always."""
    tail = key.rpartition("-")[2]
    return int(tail) if tail.isdigit() else 1 << 30


class _FlakyRouter(pb_grpc.RouterServicer):
    """``Generate`` aborts with UNAVAILABLE on the first k attempts of a request id
    ``"<name>-k"`` (before any message), then streams two tokens and the final message;
    ``"mid-..."`` ids abort with UNAVAILABLE after the first token instead."""

    def __init__(self) -> None:
        self.attempts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def _attempt(self, key: str) -> int:
        with self.lock:
            self.attempts[key] += 1
            return self.attempts[key]

    def Generate(self, request, context):
        n = self._attempt(request.request_id)
        if n <= _fails(request.request_id) and not request.request_id.startswith("mid-"):
            context.abort(grpc.StatusCode.UNAVAILABLE, f"decode pool empty (attempt {n})")
        yield pb.GenerateResponse(delta=pb.TokenDelta(token_ids=[1], text="he"))
        if request.request_id.startswith("mid-"):
            context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker died")
        yield pb.GenerateResponse(delta=pb.TokenDelta(token_ids=[2], text="llo"))
        yield pb.GenerateResponse(final=pb.Final(
            request_id=request.request_id, finish_reason="length",
            usage=pb.Usage(prompt_tokens=3, completion_tokens=2),
            timings=pb.Timings(queue_s=0.001, prefill_s=0.01, ttft_s=0.012, total_s=0.02)))

    def GetAdapter(self, request, context):
        n = self._attempt(f"get:{request.name}")
        if n <= _fails(request.name):
            context.abort(grpc.StatusCode.UNAVAILABLE, "adapter registry unreachable")
        return pb.Adapter(name=request.name, version=1, kind="lora_p", rank=8)

    def RegisterAdapter(self, request_iterator, context):
        header = next(request_iterator).header
        for _ in request_iterator:
            pass
        self._attempt(f"register:{header.name}")
        context.abort(grpc.StatusCode.UNAVAILABLE, "adapter store unreachable")


class _FlakyHealth(health_pb2_grpc.HealthServicer):
    """SERVING after the first ``fails`` checks, which abort with UNAVAILABLE."""

    def __init__(self, router: _FlakyRouter) -> None:
        self.router = router
        self.fails = 0

    def Check(self, request, context):
        if self.router._attempt(f"health:{request.service}") <= self.fails:
            context.abort(grpc.StatusCode.UNAVAILABLE, "starting")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture(scope="module")
def server():
    router = _FlakyRouter()
    health = _FlakyHealth(router)
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_RouterServicer_to_server(router, srv)
    health_pb2_grpc.add_HealthServicer_to_server(health, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", router, health
    srv.stop(0)


def _check(c) -> None:
    assert c.text == "hello" and c.token_ids == (1, 2) and c.finish_reason == "length"
    assert c.usage.completion_tokens == 2 and c.timings.ttft_s == pytest.approx(0.012)


@pytest.mark.parametrize("k", [1, 3])
def test_sync_generate_retries_unavailable_before_the_first_message(server, k):
    address, router, _ = server
    with PreftClient(address, retries=3, **FAST) as client:
        _check(client.generate("a", prompt="hi", request_id=f"sync-{k}"))
        assert [type(e).__name__ for e in client.events("a", prompt="hi",
                                                        request_id=f"events-{k}")] == \
            ["Delta", "Delta", "Completion"]
    assert router.attempts[f"sync-{k}"] == k + 1
    assert router.attempts[f"events-{k}"] == k + 1


@pytest.mark.parametrize("k", [1, 3])
def test_async_generate_retries_unavailable_before_the_first_message(server, k):
    address, router, _ = server

    async def main():
        async with AsyncPreftClient(address, retries=3, **FAST) as client:
            _check(await client.generate("a", prompt="hi", request_id=f"async-{k}"))
            deltas = [d async for d in client.stream("a", prompt="hi",
                                                     request_id=f"astream-{k}")]
            assert "".join(d.text for d in deltas) == "hello"

    asyncio.run(main())
    assert router.attempts[f"async-{k}"] == k + 1
    assert router.attempts[f"astream-{k}"] == k + 1


def test_no_retries_means_one_attempt(server):
    address, router, _ = server
    with PreftClient(address, retries=0, **FAST) as client:
        with pytest.raises(Unavailable, match="decode pool empty"):
            client.generate("a", prompt="hi", request_id="zero-1")

    async def main():
        async with AsyncPreftClient(address, retries=0, **FAST) as client:
            with pytest.raises(Unavailable, match="decode pool empty"):
                await client.generate("a", prompt="hi", request_id="azero-1")

    asyncio.run(main())
    assert router.attempts["zero-1"] == 1 and router.attempts["azero-1"] == 1


def test_a_stream_that_fails_after_its_first_message_is_not_retried(server):
    address, router, _ = server
    with PreftClient(address, retries=3, **FAST) as client:
        got = []
        with pytest.raises(Unavailable, match="decode worker died"):
            for d in client.stream("a", prompt="hi", request_id="mid-sync"):
                got.append(d.text)
        assert got == ["he"]   # delivered once, never again

    async def main():
        async with AsyncPreftClient(address, retries=3, **FAST) as client:
            with pytest.raises(Unavailable, match="decode worker died"):
                await client.generate("a", prompt="hi", request_id="mid-async")

    asyncio.run(main())
    assert router.attempts["mid-sync"] == 1 and router.attempts["mid-async"] == 1


def test_a_call_that_keeps_failing_ends_after_its_retries(server):
    address, router, _ = server
    with PreftClient(address, retries=2, **FAST) as client:
        with pytest.raises(Unavailable):
            client.generate("a", prompt="hi", request_id="down-a")
    assert router.attempts["down-a"] == 3
    # gRPC caps a call at 5 attempts: more retries than 4 are 4.
    with PreftClient(address, retries=8, **FAST) as client:
        assert client.retries == 4
        with pytest.raises(Unavailable):
            client.generate("a", prompt="hi", request_id="down-b")
    assert router.attempts["down-b"] == 5


def test_read_calls_and_health_are_retried_uploads_are_not(server, tmp_path):
    address, router, health = server
    health.fails = 2
    (tmp_path / "adapter_config.json").write_text("{}")
    with PreftClient(address, retries=3, **FAST) as client:
        assert client.get_adapter("x-2").version == 1
        assert client.health() == "SERVING"
        with pytest.raises(Unavailable, match="adapter store"):
            client.register_adapter("up", tmp_path)
    assert router.attempts["get:x-2"] == 3
    assert router.attempts["health:preft.v1.Router"] == 3
    assert router.attempts["register:up"] == 1


@pytest.mark.parametrize("kw", [dict(retries=-1), dict(backoff_s=-0.5)])
def test_bad_retry_settings_fail_at_construction(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        PreftClient("127.0.0.1:1", **kw)
