"""The worker end of the plane: where the router's calls enter a worker (steps 3 and 5).

One ZeroMQ ROUTER socket per worker, on the actor's own event loop, so a call runs exactly
as an actor method would (same coroutine, same locks). The socket is a CURVE server under
the cluster's keypair (:mod:`cluster.plane`) whose ZAP handler admits only a client that
proves the same key: a peer without the cluster's secret never gets a message in.

Calls are multiplexed by id, each its own task; a ``cancel`` cancels the task (the op
aborts its engine request), and a router silent for :data:`~cluster.plane.PEER_SILENT_S`
has its calls cancelled. Answers leave **once per event-loop turn**: every item a call
emits (:meth:`Call.emit`), every result, end and error goes into an outbox that one
callback flushes as one :class:`~cluster.plane.Step` message. The engine thread hands a
whole engine step's outputs to the loop in one callback (``EngineLoop``), so a worker sends
at most one message per engine step, whatever the number of requests it advanced.

Every frame is checked: a malformed call is answered with ``INVALID_ARGUMENT``, a body or
an answer over the call's limit with ``RESOURCE_EXHAUSTED``, each failing that call alone.
Nothing a peer sends ends the server.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import msgspec

from cluster.errors import InvalidRequest, MessageTooLarge, PreftError
from cluster.plane import (CALL, CANCEL, CALL_ID, ENCODER, HARD_LIMIT, HEADER, HEARTBEAT,
                           PEER_SILENT_S, STEP, CallError, PlaneError, Step, decode, decoder,
                           plane_keys)

log = logging.getLogger(__name__)

_MAX_INFLIGHT = 8192          # calls per router connection
_ANSWERED_KEPT = 4096         # answered calls remembered for a late cancel (ops with orphan)
_BATCH_BYTES = HARD_LIMIT // 2  # one Step message at most this large (split above)


@dataclass(frozen=True)
class Op:
    """One operation a router may call: its argument's message type and the coroutine that
    runs it, given the argument and its :class:`Call`. A unary op returns its result; a
    stream op emits its items through the call and returns None."""

    arg: type
    run: Callable[[Any, "Call"], Awaitable[Any]]
    # A unary op whose result holds something (a prefill's KV offer): given the result as
    # it leaves, the undo to run if the router cancels the call after it was answered (the
    # answer crossed the cancel on the wire, so nobody will use it); None: nothing held.
    # Only the undo is kept, never the result.
    orphan: Callable[[Any], Callable[[], None] | None] | None = None
    decoder: msgspec.msgpack.Decoder = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "decoder", decoder(self.arg))


class Call:
    """One call in flight: where its items go."""

    __slots__ = ("server", "peer", "id", "limit", "task", "failed")

    def __init__(self, server: "PlaneServer", peer: bytes, cid: int, limit: int) -> None:
        self.server, self.peer, self.id, self.limit = server, peer, cid, limit
        self.task: asyncio.Task | None = None
        self.failed = False

    def emit(self, item: Any) -> None:
        """Send one item (a stream's delta) with this turn's step message."""
        self.server.post(self, item)

    def end(self) -> None:
        """The stream is complete: its end goes with this turn's message (the op's return
        would end it a turn later, in a message of its own)."""
        self.server.end(self)


class _Outbox:
    __slots__ = ("items", "ends", "errors")

    def __init__(self) -> None:
        self.items: list[tuple[int, msgspec.Raw]] = []
        self.ends: list[int] = []
        self.errors: list[tuple[int, CallError]] = []


class PlaneServer:
    def __init__(self, ops: dict[str, Op], secret: str, host: str, name: str) -> None:
        self.ops, self.host, self.name = ops, host, name
        self.public, self.private = plane_keys(secret)
        self.address = ""
        self.calls = 0            # calls answered (tests and the bench assert the path)
        self.messages = 0         # step messages sent (the batching test counts them)
        self.refused = 0          # frames or calls refused
        self._inflight: dict[tuple[bytes, int], Call] = {}
        # answered calls of ops with an orphan hook: a cancel that crossed the answer
        self._answered: dict[tuple[bytes, int], Callable[[], None]] = {}
        self._seen: dict[bytes, float] = {}
        self._out: dict[bytes, _Outbox] = {}
        self._flush_scheduled = False
        self._sock = self._auth = None
        self._tasks: list[asyncio.Task] = []

    # ------------------------------------------------------------------ life
    async def start(self) -> str:
        """Listen on the running loop (the actor's); ``tcp://host:port``."""
        if self._sock is None:
            import zmq
            import zmq.asyncio
            from zmq.auth.asyncio import AsyncioAuthenticator

            ctx = zmq.asyncio.Context()
            self._auth = AsyncioAuthenticator(ctx)
            self._auth.start()
            self._auth.configure_curve_callback("*", credentials_provider=self)
            sock = ctx.socket(zmq.ROUTER)
            sock.setsockopt(zmq.MAXMSGSIZE, HARD_LIMIT)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)    # a reconnecting router keeps its id
            sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(PEER_SILENT_S * 1000))
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = self.public, self.private
            # watched before it listens: a handshake that fails at once is counted too
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                                              | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
            port = sock.bind_to_random_port(f"tcp://{self.host}")
            self._sock, self.address = sock, f"tcp://{self.host}:{port}"
            self._tasks = [asyncio.ensure_future(f) for f in (
                self._receive(), self._watch_peers(), self._count_refusals(monitor))]
        return self.address

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: admit a client only if it proved the cluster's key (a refusal is counted
        as a failed handshake)."""
        return key == self.public

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for call in list(self._inflight.values()):
            if call.task is not None:
                call.task.cancel()
        if self._sock is not None:
            self._auth.stop()
            try:
                self._sock.disable_monitor()
            except Exception:
                pass
            self._sock.close(linger=0)
            self._sock = None

    # ------------------------------------------------------------------ receive
    async def _receive(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                self._on_frames(frames)
            except Exception:   # never the server: one message's failure is its own
                self.refused += 1
                log.exception("plane of %s: a message failed", self.name)

    def _on_frames(self, frames: list[bytes]) -> None:
        peer, kind, rest = frames[0], frames[1] if len(frames) > 1 else b"", frames[2:]
        self._seen[peer] = time.monotonic()
        if kind == CALL and len(rest) == 2:
            self._on_call(peer, rest[0], rest[1])
        elif kind == CANCEL and len(rest) == 1:
            key = (peer, decode(CALL_ID, rest[0], 64, "cancel id"))
            call = self._inflight.get(key)
            if call is not None and call.task is not None:
                call.task.cancel()
            elif key in self._answered:   # the router gave up as the answer left: undo it
                self._answered.pop(key)()
        elif kind != HEARTBEAT:
            self.refused += 1
            log.warning("plane of %s: dropped a message of kind %r with %d frames", self.name,
                        kind[:8], len(frames))

    def _on_call(self, peer: bytes, head: bytes, body: bytes) -> None:
        try:
            h = decode(HEADER, head, 1024, "call header")
        except (PlaneError, PreftError) as e:      # no id to answer: counted and logged
            self.refused += 1
            log.warning("plane of %s: %s", self.name, e)
            return
        call = Call(self, peer, h.call, max(1, min(h.limit, _BATCH_BYTES)))
        try:
            op, arg = self._parse(h, body, peer)
        except PreftError as e:
            self.refused += 1
            self.fail(call, e)
            return
        self._inflight[(peer, h.call)] = call
        call.task = asyncio.ensure_future(self._run(call, op, arg))

    def _parse(self, h, body: bytes, peer: bytes) -> tuple[Op, Any]:
        op = self.ops.get(h.op)
        if op is None:
            raise InvalidRequest("op", f"{h.op!r:.40}: expected one of {sorted(self.ops)}")
        if (peer, h.call) in self._inflight or len(self._inflight) >= _MAX_INFLIGHT:
            raise InvalidRequest("call", f"id {h.call} is in use, or {_MAX_INFLIGHT} calls "
                                 "are in flight")
        try:
            return op, decode(op.decoder, body, min(h.limit, _BATCH_BYTES), f"{h.op} request")
        except PlaneError as e:
            raise InvalidRequest("request", str(e)) from None
        except PreftError:
            raise
        except (TypeError, ValueError) as e:   # the message type's own checks
            raise InvalidRequest(h.op, str(e)) from None

    async def _run(self, call: Call, op: Op, arg: Any) -> None:
        try:
            result = await op.run(arg, call)
            if result is not None:
                self.post(call, result)
                if op.orphan is not None:
                    self._remember(call, op.orphan(result))
            self.end(call)
        except asyncio.CancelledError:
            # the router cancelled (it ignores the answer), or an oversized item did (its
            # size error went first and this is a no-op)
            self.fail(call, PreftError("the call was cancelled"))
        except Exception as e:
            if not isinstance(e, PreftError):
                log.exception("plane of %s: %s failed", self.name, type(op.arg).__name__)
            self.fail(call, e)
        finally:
            self._inflight.pop((call.peer, call.id), None)
            self.calls += 1

    def _remember(self, call: Call, undo: Callable[[], None] | None) -> None:
        if undo is None:
            return
        self._answered[(call.peer, call.id)] = undo
        while len(self._answered) > _ANSWERED_KEPT:
            self._answered.pop(next(iter(self._answered)))

    async def _count_refusals(self, monitor) -> None:
        """Handshakes that failed (a client with another key cannot even say hello)."""
        from zmq.utils.monitor import parse_monitor_message

        try:
            while True:
                parse_monitor_message(await monitor.recv_multipart())
                self.refused += 1
                log.warning("plane of %s: refused a client that failed the handshake "
                            "(no cluster secret)", self.name)
        finally:
            monitor.close(linger=0)

    async def _watch_peers(self) -> None:
        """Cancel the calls of a router that went silent (its heartbeats stopped)."""
        while True:
            await asyncio.sleep(PEER_SILENT_S / 3)
            cutoff = time.monotonic() - PEER_SILENT_S
            gone = {p for p, t in self._seen.items() if t < cutoff}
            for key, call in list(self._inflight.items()):
                if key[0] in gone and call.task is not None:
                    log.warning("plane of %s: router silent; cancelling its calls", self.name)
                    call.task.cancel()
            for p in gone:
                self._seen.pop(p, None)

    # ------------------------------------------------------------------ send
    def post(self, call: Call, item: Any) -> None:
        if call.failed:
            return
        raw = ENCODER.encode(item)
        if len(raw) > call.limit:
            self.fail(call, MessageTooLarge(
                f"the worker's answer of {len(raw)} bytes exceeds the plane's limit of "
                f"{call.limit} bytes; ask for less (fewer prompt logprobs, a shorter prompt)"))
            if call.task is not None and not call.task.done():
                call.task.cancel()
            return
        self._box(call.peer).items.append((call.id, msgspec.Raw(raw)))

    def end(self, call: Call) -> None:
        if not call.failed:
            call.failed = True     # nothing more for this call
            self._box(call.peer).ends.append(call.id)

    def fail(self, call: Call, e: BaseException) -> None:
        if call.failed:
            return
        call.failed = True
        self._box(call.peer).errors.append((call.id, CallError.of(e)))

    def _box(self, peer: bytes) -> _Outbox:
        box = self._out.get(peer)
        if box is None:
            box = self._out[peer] = _Outbox()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return box

    def _flush(self) -> None:
        """This turn's answers: one Step message per router (split only past 128 MiB)."""
        self._flush_scheduled = False
        out, self._out = self._out, {}
        for peer, box in out.items():
            for step in _split(box):
                try:
                    self._sock.send_multipart([peer, STEP, ENCODER.encode(step)], copy=False)
                    self.messages += 1
                except Exception as e:   # the router is gone; its calls end by silence
                    log.warning("plane of %s: cannot answer a router: %r", self.name, e)


def _split(box: _Outbox) -> list[Step]:
    steps, items, size = [], [], 0
    for cid, raw in box.items:
        if items and size + len(raw) > _BATCH_BYTES:
            steps.append(Step(tuple(items)))
            items, size = [], 0
        items.append((cid, raw))
        size += len(raw)
    steps.append(Step(tuple(items), tuple(box.ends), tuple(box.errors)))
    return steps

