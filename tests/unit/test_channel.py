"""The router's direct channel to a worker (cluster/wire.py, worker_runtime/channel.py,
router/channel.py) over real loopback TCP, with a coroutine in place of the engine: the
typed round trip, errors and cancellation as on the Ray path, and bad input that is
answered or refused while the server keeps serving."""

from __future__ import annotations

import asyncio
import json

import pytest

from cluster.errors import AdapterNotFound, InvalidRequest
from cluster.messages import AdapterRef, KVHandle, PrefillRequest, PrefillResult, Sampling
from cluster.wire import RemoteError, WireError, frame, from_wire, handshake_mac, to_wire
from router.channel import Channel, ChannelLost, Channels
from worker_runtime.channel import ChannelServer, Op


REQ = PrefillRequest("r1", AdapterRef("a", 2, "lora_p", "f" * 64, "file:///x"),
                     Sampling(max_tokens=5, temperature=0.0, stop=("\n",)),
                     prompt_token_ids=(1, 2, 3), enqueued_at=12.5)


def _result(req: PrefillRequest) -> PrefillResult:
    ids = req.prompt_token_ids or (5, 6)            # text prompts: "tokenized"
    kv = KVHandle(7, "127.0.0.1", 9, "p0", len(ids), 1, "L2/B16", True)
    return PrefillResult(req.request_id, ids, 42, "x", None, kv, "a@v2",
                         0.1, 0.2, "engine", 0.0, 1.0, 2.0)


class _Worker:
    """What the prefill op does, seen from outside: answers, fails, or blocks."""

    def __init__(self):
        self.cancelled: list[str] = []
        self.release = asyncio.Event()

    async def prefill(self, req: PrefillRequest) -> PrefillResult:
        if req.request_id == "missing":
            raise AdapterNotFound("nope")
        if req.request_id == "crash":
            raise RuntimeError("engine exploded")
        if req.request_id.startswith("block"):
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.append(req.request_id)
                raise
        return _result(req)


@pytest.fixture
async def served():
    w = _Worker()
    srv = ChannelServer({"prefill": Op(PrefillRequest, w.prefill)}, "127.0.0.1", "p0")
    address = await srv.start()
    ch = await Channel.open(address, srv.token, "p0")
    yield srv, ch, w, address
    ch.close()
    srv.close()


def test_typed_messages_round_trip_and_are_checked():
    assert from_wire(PrefillRequest, json.loads(json.dumps(to_wire(REQ)))) == REQ
    res = _result(REQ)
    assert from_wire(PrefillResult, json.loads(json.dumps(to_wire(res)))) == res
    bad = to_wire(REQ)
    for path, value, why in [
        (("sampling", "max_tokens"), "5", "max_tokens"),
        (("prompt_token_ids",), [1, "2"], "prompt_token_ids\\[1\\]"),
        (("adapter", "version"), True, "version"),
        (("request_id",), None, "request_id"),
    ]:
        msg = json.loads(json.dumps(bad))
        node = msg
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        with pytest.raises(WireError, match=why):
            from_wire(PrefillRequest, msg)
    with pytest.raises(WireError, match="unknown fields"):
        from_wire(PrefillRequest, {**to_wire(REQ), "evil": 1})


@pytest.mark.asyncio(loop_scope="session")   # the fixture's loop
async def test_a_call_returns_the_workers_typed_result(served):
    srv, ch, _, _ = served
    results = await asyncio.gather(*(ch.call("prefill", PrefillRequest(
        f"r{i}", None, Sampling(), prompt_text="hi"), PrefillResult) for i in range(20)))
    assert [r.request_id for r in results] == [f"r{i}" for i in range(20)]   # by id
    assert results[0].kv.staged and results[0].prompt_token_ids == (5, 6)
    assert srv.calls == 20


@pytest.mark.asyncio(loop_scope="session")   # the fixture's loop
async def test_worker_errors_keep_their_status_code(served):
    _, ch, _, _ = served
    with pytest.raises(RemoteError) as e:
        await ch.call("prefill", PrefillRequest("missing", None, Sampling(), prompt_text="x"),
                      PrefillResult)
    assert e.value.grpc_code == "NOT_FOUND" and "not registered" in e.value.message
    with pytest.raises(RemoteError) as e:
        await ch.call("prefill", PrefillRequest("crash", None, Sampling(), prompt_text="x"),
                      PrefillResult)
    assert e.value.grpc_code == "INTERNAL" and "engine exploded" in e.value.message


@pytest.mark.asyncio(loop_scope="session")   # the fixture's loop
async def test_cancelling_the_call_cancels_it_on_the_worker(served):
    srv, ch, w, _ = served
    call = asyncio.create_task(ch.call("prefill", PrefillRequest(
        "block-1", None, Sampling(), prompt_text="x"), PrefillResult))
    await asyncio.sleep(0.05)
    call.cancel()
    for _ in range(100):
        if w.cancelled:
            break
        await asyncio.sleep(0.01)
    assert w.cancelled == ["block-1"]
    r = await ch.call("prefill", PrefillRequest("after", None, Sampling(), prompt_text="x"),
                      PrefillResult)
    assert r.request_id == "after"                      # the channel still serves


@pytest.mark.asyncio(loop_scope="session")   # the fixture's loop
async def test_a_dropped_connection_fails_calls_in_flight_as_lost(served):
    srv, ch, w, _ = served
    call = asyncio.create_task(ch.call("prefill", PrefillRequest(
        "block-2", None, Sampling(), prompt_text="x"), PrefillResult))
    await asyncio.sleep(0.05)
    ch.writer.transport.abort()                          # as if the worker died
    with pytest.raises(ChannelLost):
        await call
    for _ in range(100):
        if w.cancelled:
            break
        await asyncio.sleep(0.01)
    assert w.cancelled == ["block-2"]                    # the worker cancelled its side


async def _raw(address):
    host, _, port = address.rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def _read(reader):
    n = int.from_bytes(await reader.readexactly(4), "big")
    return json.loads(await reader.readexactly(n))


@pytest.mark.asyncio(loop_scope="session")   # the fixture's loop
async def test_bad_input_is_answered_or_refused_and_the_server_keeps_serving(served):
    srv, ch, _, address = served
    r, w = await _raw(address)                           # a wrong token: refused
    await _read(r)
    w.write(frame({"mac": "0" * 64}))
    assert "token" in (await _read(r))["error"]
    r, w = await _raw(address)                           # authenticated, then bad calls
    nonce = (await _read(r))["nonce"]
    w.write(frame({"mac": handshake_mac(srv.token, nonce)}))
    assert (await _read(r))["ok"] is True
    w.write(frame({"id": 1, "op": "drop_tables", "body": {}}))
    assert "expected one of" in (await _read(r))["error"]["message"]
    body = {**to_wire(REQ), "sampling": {**to_wire(REQ.sampling), "max_tokens": 0}}
    w.write(frame({"id": 2, "op": "prefill", "body": body}))
    err = (await _read(r))["error"]
    assert err["grpc_code"] == "INVALID_ARGUMENT" and "max_tokens" in err["message"]
    w.write((5).to_bytes(4, "big") + b"{oops")           # broken framing: closes this one
    assert "not JSON" in (await _read(r))["error"]["message"]
    assert await r.read() == b""
    r2, w2 = await _raw(address)
    await _read(r2)                                      # the nonce
    w2.write((1 << 30).to_bytes(4, "big"))               # an oversized handshake frame
    assert "at most" in (await _read(r2))["error"]["message"]
    assert await r2.read() == b""
    res = await ch.call("prefill", REQ, PrefillResult)   # the good connection still serves
    assert res.first_token == 42 and srv.refused >= 3


class _Actor:
    def __init__(self, answer):
        self.channel = self
        self.answer, self.asked = answer, 0

    def remote(self):
        self.asked += 1

        async def ask():
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer
        return ask()


class _Handle:
    def __init__(self, wid, actor):
        self.worker_id, self.actor = wid, actor


@pytest.mark.asyncio(loop_scope="session")   # the fixture's loop
async def test_channels_open_once_reopen_after_loss_and_fall_back(served):
    srv, _, _, address = served
    actor = _Actor((address, srv.token))
    chans = Channels()
    h = _Handle("p0", actor)
    ch = await chans.get(h)
    assert ch is not None and await chans.get(h) is ch and actor.asked == 1
    ch.writer.transport.abort()
    await asyncio.sleep(0.05)
    ch2 = await chans.get(h)                             # lost: the actor is asked again
    assert ch2 is not None and ch2 is not ch and actor.asked == 2
    down = _Handle("p1", _Actor(ConnectionRefusedError("gone")))
    assert await chans.get(down) is None                 # the caller takes the Ray path
    assert await chans.get(down) is None and down.actor.asked == 1   # not retried at once
    assert await Channels(enabled=False).get(h) is None
    chans.close()


def test_invalid_request_from_the_message_checks_is_a_wire_error():
    body = {**to_wire(REQ), "prompt_text": "x"}          # both prompt forms
    with pytest.raises(InvalidRequest):
        from_wire(PrefillRequest, body)
