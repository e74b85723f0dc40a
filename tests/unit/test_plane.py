"""The worker plane without engines: router/plane.py against worker_runtime/plane.py over
real ZeroMQ sockets on loopback (CURVE both ways, per-turn step messages, limits)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import zmq
import zmq.asyncio

from cluster.errors import InvalidRequest, MessageTooLarge
from cluster.messages import DecodeDelta, PrefillRequest, PrefillResult, Sampling
from cluster.plane import CALL, ENCODER, STEP_DECODER, Header, RemoteError, plane_keys
from router.plane import Connection, PlaneLost
from worker_runtime.plane import Op, PlaneServer

SECRET = "s3cret"


def _result(req: PrefillRequest, size: int = 0) -> PrefillResult:
    return PrefillResult(req.request_id, (1, 2), 7, "x" * size, None, None, "ns", 0.0, 0.0)


def _req(rid: str = "r", ids=(1, 2, 3), **kw) -> PrefillRequest:
    return PrefillRequest(rid, None, Sampling(**kw), prompt_token_ids=tuple(ids))


class _Worker:
    """A plane server whose ops are plain coroutines: ``prefill`` answers at once (its
    text as long as ``max_tokens`` asks), ``decode`` emits one delta per "engine step"
    (:meth:`next_step`, every 5 ms unless ``manual``), ``generate`` waits until cancelled."""

    def __init__(self, secret: str = SECRET, manual: bool = False) -> None:
        self.cancelled = asyncio.Event()
        self.step = asyncio.get_running_loop().create_future()
        self._ticker = None if manual else asyncio.ensure_future(self._tick())
        self.server = PlaneServer({"prefill": Op(PrefillRequest, self.prefill),
                                   "decode": Op(PrefillRequest, self.decode),
                                   "generate": Op(PrefillRequest, self.hang)},
                                  secret, "127.0.0.1", "fake-worker")

    async def prefill(self, req, call):
        if req.request_id == "fail":
            raise InvalidRequest("prompt", "refused on purpose")
        return _result(req, req.sampling.max_tokens)

    async def decode(self, req, call):
        for i in range(req.sampling.max_tokens):
            await self.step
            call.emit(DecodeDelta((i,), str(i)))

    def next_step(self) -> None:
        done, self.step = self.step, asyncio.get_running_loop().create_future()
        done.set_result(None)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.005)
            self.next_step()

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self.server.close()

    async def hang(self, req, call):
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def _pair(secret: str = SECRET, limit: int = 64 << 20, manual: bool = False):
    w = _Worker(manual=manual)
    address = await w.server.start()
    ctx = zmq.asyncio.Context()
    conn = await Connection.open(ctx, address, secret, "fake-worker", limit)
    return w, conn


async def _drain(stream) -> list:
    return [d for batch in [b async for b in stream.batches()] for d in batch]


async def test_unary_and_stream_calls_with_one_step_message_per_turn():
    w, conn = await _pair(manual=True)
    try:
        res = await conn.call("prefill", _req("a", max_tokens=3), 10).result()
        assert res == _result(_req("a"), 3)
        streams = [conn.call("decode", _req(f"d{i}", max_tokens=5), 10) for i in range(8)]
        while len(w.server._inflight) < 8:
            await asyncio.sleep(0.01)
        sent = w.server.messages
        drained = asyncio.gather(*(_drain(s) for s in streams))
        for _ in range(5):
            w.next_step()
            await asyncio.sleep(0.02)
        outs = await drained
        assert all([d.token_ids for d in o] == [(i,) for i in range(5)] for o in outs)
        # 8 streams x 5 steps: one message per step (the last with the ends), not per item
        assert w.server.messages - sent == 5
    finally:
        conn.close()
        w.close()


async def test_a_failing_or_oversized_call_fails_alone():
    w, conn = await _pair(limit=4096)
    try:
        ok = conn.call("decode", _req("ok", max_tokens=4), 10)
        with pytest.raises(RemoteError, match="refused on purpose") as e:
            await conn.call("prefill", _req("fail"), 10).result()
        assert e.value.grpc_code == "INVALID_ARGUMENT"
        with pytest.raises(RemoteError, match="exceeds the plane's limit of 4096") as e:
            await conn.call("prefill", _req("big", max_tokens=8000), 10).result()
        assert e.value.grpc_code == "RESOURCE_EXHAUSTED"
        with pytest.raises(MessageTooLarge, match="request of .* exceeds"):
            conn.call("prefill", _req("huge", ids=range(5000)), 10)
        assert len(await _drain(ok)) == 4
        assert (await conn.call("prefill", _req("after"), 10).result()).request_id == "after"
    finally:
        conn.close()
        w.close()


async def test_malformed_and_oversized_frames_from_an_authenticated_peer_fail_their_call():
    w = _Worker()
    address = await w.server.start()
    public, private = plane_keys(SECRET)
    ctx = zmq.asyncio.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.curve_publickey, raw.curve_secretkey, raw.curve_serverkey = public, private, public
    raw.connect(address)
    try:
        await raw.send_multipart([b"?", b"junk"])                     # no such kind
        await raw.send_multipart([CALL, b"\xc1", b""])                # header not msgpack
        await raw.send_multipart([CALL, ENCODER.encode(Header(1, "prefill")), b"\x93\x01"])
        await raw.send_multipart([CALL, ENCODER.encode(Header(2, "prefill", 64)),
                                  ENCODER.encode(_req("x", ids=range(100)))])
        await raw.send_multipart([CALL, ENCODER.encode(Header(3, "nope")), b""])
        errors = {}
        while len(errors) < 3:
            kind, body = await asyncio.wait_for(raw.recv_multipart(), 10)
            errors.update(dict(STEP_DECODER.decode(body).errors))
        assert errors[1].grpc_code == "INVALID_ARGUMENT" and "malformed" in errors[1].message
        assert errors[2].grpc_code == "RESOURCE_EXHAUSTED"
        assert errors[3].grpc_code == "INVALID_ARGUMENT" and "op" in errors[3].message
        assert w.server.refused >= 5
        conn = await Connection.open(ctx, address, SECRET, "fake-worker")   # still serving
        assert (await conn.call("prefill", _req("fine"), 10).result()).request_id == "fine"
        conn.close()
    finally:
        raw.close(linger=0)
        w.close()


async def test_a_peer_without_the_secret_is_refused_both_ways():
    w = _Worker()
    address = await w.server.start()
    ctx = zmq.asyncio.Context()
    try:
        with pytest.raises(PlaneLost, match="secret"):       # a fake router
            await Connection.open(ctx, address, "not-the-secret", "fake-worker")
        for _ in range(100):     # the failed handshake's event may come in a moment later
            if w.server.refused:
                break
            await asyncio.sleep(0.1)
        assert w.server.refused >= 1
        fake = _Worker(secret="not-the-secret")               # a fake worker
        fake_address = await fake.server.start()
        with pytest.raises(PlaneLost, match="secret"):
            await Connection.open(ctx, fake_address, SECRET, "fake-worker")
        assert fake.server.calls == 0
        fake.close()
        conn = await Connection.open(ctx, address, SECRET, "fake-worker")   # both still serve
        assert (await conn.call("prefill", _req("ok"), 10).result()).request_id == "ok"
        conn.close()
    finally:
        w.close()


async def test_cancel_reaches_the_worker_and_a_dead_worker_fails_its_calls_fast():
    w, conn = await _pair()
    stream = conn.call("generate", _req("h"), 30)
    await asyncio.sleep(0.2)
    stream.cancel()
    await asyncio.wait_for(w.cancelled.wait(), 5)
    pending = conn.call("generate", _req("h2"), 30)
    w.close()                                          # the worker dies mid-call
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(PlaneLost):
        await _drain(pending)
    assert asyncio.get_running_loop().time() - t0 < 8
    with pytest.raises(PlaneLost):
        conn.call("prefill", _req(), 10)


async def test_deadline_fails_the_call():
    w, conn = await _pair()
    try:
        with pytest.raises(asyncio.TimeoutError):
            await _drain(conn.call("generate", _req("slow"), 0.3))
        await asyncio.wait_for(w.cancelled.wait(), 5)
    finally:
        conn.close()
        w.close()


def test_keys_need_the_secret():
    with pytest.raises(ValueError, match="secret"):
        plane_keys("")
    assert plane_keys("a") == plane_keys("a") != plane_keys("b")
    assert isinstance(msgspec.msgpack.Decoder(int).decode(ENCODER.encode(5)), int)


async def test_an_answer_crossing_a_cancel_is_handed_to_the_ops_orphan_hook():
    """A prefill answered just as the router gave up (the cancel crossed the answer): the
    worker runs the undo the op's ``orphan`` hook gave for the result (a prefill releases
    its KV offer there). An answer the router read is never orphaned, even though reading it closes the
    stream."""
    orphans = []

    async def prefill(req, call):
        return _result(req)

    server = PlaneServer({"prefill": Op(PrefillRequest, prefill,
                                        orphan=lambda r: lambda: orphans.append(r))},
                         SECRET, "127.0.0.1", "fake-worker")
    address = await server.start()
    ctx = zmq.asyncio.Context()
    conn = await Connection.open(ctx, address, SECRET, "fake-worker")
    try:
        assert (await conn.call("prefill", _req("read"), 10).result()).request_id == "read"
        late = conn.call("prefill", _req("late"), 10)
        while server.calls < 2:                   # answered on the worker, not read here
            await asyncio.sleep(0.005)
        late.ended = False                        # as if the end had not arrived yet
        late.cancel()
        for _ in range(200):
            if orphans:
                break
            await asyncio.sleep(0.01)
        assert [r.request_id for r in orphans] == ["late"]
    finally:
        conn.close()
        server.close()
