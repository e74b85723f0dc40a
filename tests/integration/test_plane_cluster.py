"""The worker plane in a running cluster (real vLLM workers, Ray, the gRPC router): one
message per engine step, limits and malformed calls that fail their own call only, and
both ends refusing a peer without the cluster's secret."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.integration

HONEST = [f"honest stream {i}: the prefill pool reads the prompt" for i in range(4)]


def _run_on_router(cluster, coro, timeout: float = 30.0):
    return asyncio.run_coroutine_threadsafe(coro, cluster._loop).result(timeout)


def _stats(handle) -> dict:
    import ray

    return ray.get(handle.actor.plane_stats.remote(), timeout=30)


def _honest(client):
    return [client.generate(None, prompt=p, max_tokens=24, ignore_eos=True).token_ids
            for p in HONEST]


def test_each_worker_sends_at_most_one_message_per_engine_step(cluster, client):
    pw, dw = cluster.pool.prefill[0], cluster.pool.decode[0]
    p0, d0 = _stats(pw), _stats(dw)

    def one(i):
        return sum(len(d.token_ids) for d in client.stream(
            None, prompt=f"batching {i} " * 3, max_tokens=32, ignore_eos=True))
    with ThreadPoolExecutor(32) as ex:
        tokens = sum(ex.map(one, range(32)))
    p1, d1 = _stats(pw), _stats(dw)
    steps, messages = d1["steps"] - d0["steps"], d1["messages"] - d0["messages"]
    assert tokens == 32 * 32
    assert 0 < messages <= steps, (messages, steps)
    assert messages < tokens - 32, "one message per token, not per step"   # 31 decode tokens each
    assert d1["calls"] - d0["calls"] == 32
    assert 0 < p1["messages"] - p0["messages"] <= p1["steps"] - p0["steps"]


def _with_limit(cluster, limit: int) -> None:
    """Every router -> worker connection reopened with ``limit`` (the router's
    ``plane_max_bytes``, each call carries it)."""
    planes = cluster._server.service.planes

    async def set_limit():
        planes.limit = limit
        planes.close()
    _run_on_router(cluster, set_limit())


def test_an_oversized_call_or_answer_fails_alone(cluster, client):
    from preft_client import ResourceExhausted

    expected = _honest(client)
    _with_limit(cluster, 16 << 10)
    try:
        with ThreadPoolExecutor(6) as ex:
            honest = [ex.submit(lambda p=p: client.generate(
                None, prompt=p, max_tokens=24, ignore_eos=True).token_ids) for p in HONEST]
            # worker -> router: top-20 prompt logprobs of a long prompt (the answer's size)
            big_answer = ex.submit(client.generate, None, prompt="word " * 300, max_tokens=4,
                                   prompt_logprobs=20)
            # router -> worker: a 20 KB regex in the request
            big_call = ex.submit(client.generate, None, prompt="x", max_tokens=4,
                                 regex="a" * 20000)
            with pytest.raises(ResourceExhausted, match="answer of .* exceeds the plane's limit"):
                big_answer.result(120)
            with pytest.raises(ResourceExhausted, match="request of .* exceeds the plane's limit"):
                big_call.result(120)
            assert [f.result(120) for f in honest] == expected
    finally:
        _with_limit(cluster, 64 << 20)
    assert all(w.healthy for w in cluster.pool.prefill + cluster.pool.decode)
    assert _honest(client) == expected


def test_a_malformed_call_fails_alone_and_the_worker_serves_on(cluster, client):
    import zmq
    import zmq.asyncio

    from cluster.plane import CALL, ENCODER, STEP_DECODER, Header, plane_keys

    dw = cluster.pool.decode[0]
    expected = _honest(client)
    refused = _stats(dw)["refused"]

    async def malformed():
        address = await dw.actor.plane.remote()
        public, private = plane_keys(cluster.cfg.router.secret)
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = (public, private,
                                                                            public)
        sock.connect(address)
        try:
            await sock.send_multipart([CALL, ENCODER.encode(Header(7, "decode")), b"\x92\x01"])
            await sock.send_multipart([CALL, ENCODER.encode(Header(8, "decode")),
                                       ENCODER.encode({"request_id": 5})])
            errors = {}
            while len(errors) < 2:
                _, body = await asyncio.wait_for(sock.recv_multipart(), 30)
                errors.update(dict(STEP_DECODER.decode(body).errors))
            return errors
        finally:
            sock.close(linger=0)
    with ThreadPoolExecutor(4) as ex:
        honest = [ex.submit(lambda p=p: client.generate(
            None, prompt=p, max_tokens=24, ignore_eos=True).token_ids) for p in HONEST]
        errors = asyncio.run(malformed())
        assert [f.result(120) for f in honest] == expected
    assert {e.grpc_code for e in errors.values()} == {"INVALID_ARGUMENT"}
    assert "malformed" in errors[7].message and "request_id" in errors[8].message
    assert _stats(dw)["refused"] >= refused + 2
    assert dw.healthy


def test_a_peer_without_the_secret_is_refused_both_ways(cluster, client):
    import zmq

    from cluster.plane import plane_keys
    from plane_client import open_plane
    from router.plane import PlaneLost

    cw = cluster.pool.decode[0]
    refused = _stats(cw)["refused"]
    with pytest.raises(PlaneLost, match="secret"):          # a fake router
        asyncio.run(open_plane(cluster, cw, secret="not-the-cluster-secret"))
    assert _stats(cw)["refused"] > refused

    ctx = zmq.Context.instance()                            # a fake worker
    fake = ctx.socket(zmq.ROUTER)
    fake.curve_server = True
    fake.curve_publickey, fake.curve_secretkey = plane_keys("not-the-cluster-secret")
    port = fake.bind_to_random_port("tcp://127.0.0.1")

    async def address():
        return f"tcp://127.0.0.1:{port}"
    handle = SimpleNamespace(worker_id="fake-worker",
                             actor=SimpleNamespace(plane=SimpleNamespace(remote=address)))
    t0 = time.monotonic()
    try:
        with pytest.raises(PlaneLost, match="secret"):
            _run_on_router(cluster, cluster._server.service.planes.get(handle))
        assert time.monotonic() - t0 < 15
        assert fake.poll(100) == 0, "the fake worker received a message"
    finally:
        fake.close(linger=0)
    out = client.generate(None, prompt=HONEST[0], max_tokens=8, ignore_eos=True)
    assert len(out.token_ids) == 8 and all(w.healthy for w in cluster.pool.decode)
