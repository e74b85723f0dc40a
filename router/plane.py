"""The router end of the plane: every worker call on a request's token path (steps 3-6).

:class:`Planes` keeps one ZeroMQ DEALER connection per worker (:mod:`worker_runtime.plane`
is the other end), opened on first use from the address the worker's Ray actor gives
(``plane()``, asked once per worker incarnation) and authenticated both ways by the CURVE
handshake under the cluster's keypair (:mod:`cluster.plane`): a worker that does not hold
the secret fails the handshake and is refused. Calls are multiplexed by id.

A worker sends one :class:`~cluster.plane.Step` message per engine step carrying every
call's new items; :class:`Connection` demultiplexes it into each call's
:class:`CallStream`, which buffers what arrived and wakes its reader once. The reader (the
Generate path) takes *everything* buffered at once (:meth:`CallStream.batches`), so a
client stream gets at most one message per engine step, and fewer when it is behind.

A dropped connection (the worker died: ZeroMQ's disconnect event at once, or its
heartbeats stopped for ``PEER_SILENT_S``) fails every call on it with :class:`PlaneLost`, as
``RayActorError`` did; a malformed item fails its own call; nothing a worker sends ends
the router.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import msgspec

from cluster.errors import MessageTooLarge, PreftError, ShuttingDown
from cluster.messages import ColocatedDelta, DecodeDelta, PrefillResult
from cluster.plane import (CALL, CANCEL, DEFAULT_LIMIT, ENCODER, HARD_LIMIT, HEARTBEAT,
                           HEARTBEAT_S, PEER_SILENT_S, STEP, STEP_DECODER, Header, PlaneError, decode,
                           decoder, plane_keys)

log = logging.getLogger(__name__)

_CONNECT_S = 5.0
# What each op's items are: a prefill's result, a decode or colocated stream's deltas.
ITEMS = {"prefill": decoder(PrefillResult), "decode": decoder(DecodeDelta),
         "generate": decoder(ColocatedDelta)}


class PlaneLost(ConnectionError):
    """The connection to a worker dropped, or could not be opened and authenticated."""


class CallStream:
    """One call's items as they arrive; ``batches()`` yields all that are buffered."""

    __slots__ = ("conn", "id", "decoder", "items", "done", "ended", "error", "_waiter",
                 "_timer")

    def __init__(self, conn: "Connection", cid: int, item_decoder, timeout: float) -> None:
        self.conn, self.id, self.decoder = conn, cid, item_decoder
        self.items: list = []
        self.done = False            # nothing more for the reader
        self.ended = False           # the worker ended the call (or was told to)
        self.error: BaseException | None = None
        self._waiter: asyncio.Future | None = None
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(loop.time() + timeout, self._fail,
                                   asyncio.TimeoutError())

    # ------------------------------------------------------------------ reader side
    async def batches(self):
        """Lists of items, each everything that arrived since the last; raises the call's
        error. Leaving early cancels the call on the worker."""
        try:
            while True:
                if not self.items and not self.done:
                    self._waiter = asyncio.get_running_loop().create_future()
                    await self._waiter
                    self._waiter = None
                if self.items:
                    batch, self.items = self.items, []
                    yield batch
                elif self.done:
                    if self.error is not None:
                        raise self.error
                    return
        finally:
            self.cancel()

    async def result(self) -> Any:
        """A unary call's one item."""
        async for batch in self.batches():
            self.ended = True   # answered: leaving now must not cancel (and undo) it there
            return batch[0]
        raise PlaneError("the worker ended the call without an answer")

    def cancel(self) -> None:
        """Stop the call here and on the worker (a no-op once the worker ended it)."""
        if not self.ended:
            self.ended = True
            self.conn.cancel(self.id)
        if not self.done:
            self._finish(None)

    # ------------------------------------------------------------------ connection side
    def _push(self, raw: msgspec.Raw) -> None:
        if self.done:
            return
        try:
            self.items.append(self.decoder.decode(raw))
        except (msgspec.DecodeError, msgspec.ValidationError, PreftError, TypeError,
                ValueError) as e:
            self._fail(PlaneError(f"worker {self.conn.name} sent a malformed answer: {e}"[:400]))
            self.cancel()
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if not self.done:
            self._finish(error)

    def _finish(self, error: BaseException | None) -> None:
        self.done, self.error = True, error
        self._timer.cancel()
        self.conn.calls.pop(self.id, None)
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)


class Connection:
    """One authenticated connection to one worker; calls multiplexed by id."""

    def __init__(self, sock, monitor, name: str, limit: int) -> None:
        self.sock, self.monitor, self.name, self.limit = sock, monitor, name, limit
        self.calls: dict[int, CallStream] = {}
        self.closed = False
        self.messages = 0        # step messages received
        self._ids = itertools.count(1)
        self._tasks = [asyncio.ensure_future(f()) for f in (self._receive, self._watch,
                                                            self._heartbeat)]

    @classmethod
    async def open(cls, ctx, address: str, secret: str, name: str,
                   limit: int = DEFAULT_LIMIT) -> "Connection":
        import zmq

        public, private = plane_keys(secret)
        sock = ctx.socket(zmq.DEALER)
        for opt, value in ((zmq.LINGER, 0), (zmq.MAXMSGSIZE, HARD_LIMIT), (zmq.SNDHWM, 0),
                           (zmq.RCVHWM, 0), (zmq.IMMEDIATE, 1), (zmq.HEARTBEAT_IVL, 1000),
                           (zmq.HEARTBEAT_TIMEOUT, int(PEER_SILENT_S * 1000))):
            sock.setsockopt(opt, value)
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, private, public
        monitor = sock.get_monitor_socket()
        sock.connect(address)
        try:
            await asyncio.wait_for(_handshake(monitor, name), _CONNECT_S)
        except BaseException as e:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            if isinstance(e, asyncio.TimeoutError):
                raise PlaneLost(f"worker {name} did not complete the plane's handshake at "
                                f"{address} within {_CONNECT_S} s (down, or it does not hold "
                                "the cluster's secret)") from None
            raise
        return cls(sock, monitor, name, limit)

    def call(self, op: str, arg: Any, timeout: float) -> CallStream:
        """Start ``op`` on the worker; its items arrive on the returned stream."""
        if self.closed:
            raise PlaneLost(f"plane to {self.name} is closed")
        body = ENCODER.encode(arg)
        if len(body) > self.limit:
            raise MessageTooLarge(f"the {op} request of {len(body)} bytes exceeds the plane's "
                                  f"limit of {self.limit} bytes; send a shorter prompt")
        cid = next(self._ids)
        stream = self.calls[cid] = CallStream(self, cid, ITEMS[op], timeout)
        self._send([CALL, ENCODER.encode(Header(cid, op, self.limit)), body])
        return stream

    def cancel(self, cid: int) -> None:
        self.calls.pop(cid, None)
        if not self.closed:
            self._send([CANCEL, ENCODER.encode(cid)])

    def _send(self, frames: list[bytes]) -> None:
        import zmq

        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            self._lose(f"cannot send: {e}")
            raise PlaneLost(f"plane to {self.name} dropped: {e}") from None

    # ------------------------------------------------------------------ receive
    async def _receive(self) -> None:
        try:
            while True:
                frames = await self.sock.recv_multipart(copy=True)
                if len(frames) != 2 or frames[0] != STEP:
                    log.warning("plane from %s: dropped a message of %d frames", self.name,
                                len(frames))
                    continue
                self._on_step(frames[1])
        except asyncio.CancelledError:
            pass
        except Exception as e:
            self._lose(f"receive failed: {e!r}")

    def _on_step(self, raw: bytes) -> None:
        try:
            step = decode(STEP_DECODER, raw, HARD_LIMIT, "step message")
        except (PlaneError, PreftError) as e:
            log.warning("plane from %s: %s", self.name, e)
            return
        self.messages += 1
        calls = self.calls
        for cid, item in step.items:
            s = calls.get(cid)
            if s is not None:
                s._push(item)
        for cid in step.ends:
            s = calls.get(cid)
            if s is not None:
                s.ended = True
                s._finish(None)
        for cid, err in step.errors:
            s = calls.get(cid)
            if s is not None:
                s.ended = True
                s._fail(err.exception())

    async def _watch(self) -> None:
        """The worker went away (disconnect event): every call on it fails."""
        import zmq
        from zmq.utils.monitor import parse_monitor_message

        try:
            while True:
                event = parse_monitor_message(await self.monitor.recv_multipart())
                if event["event"] in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                    self._lose("the worker disconnected")
                    return
        except asyncio.CancelledError:
            pass
        except Exception as e:
            self._lose(f"monitor failed: {e!r}")

    async def _heartbeat(self) -> None:
        try:
            while not self.closed:
                await asyncio.sleep(HEARTBEAT_S)
                self._send([HEARTBEAT])
        except (asyncio.CancelledError, PlaneLost):
            pass

    def _lose(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        for s in list(self.calls.values()):
            s._fail(PlaneLost(f"plane to {self.name} dropped: {why}"))
        self.calls.clear()
        for t in self._tasks:
            if t is not asyncio.current_task():
                t.cancel()
        try:
            self.sock.disable_monitor()
        except Exception:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=0)

    def close(self) -> None:
        self._lose("closed by the router")


async def _handshake(monitor, name: str) -> None:
    import zmq
    from zmq.utils.monitor import parse_monitor_message

    failed = {getattr(zmq, n) for n in ("EVENT_HANDSHAKE_FAILED_AUTH",
                                        "EVENT_HANDSHAKE_FAILED_PROTOCOL",
                                        "EVENT_HANDSHAKE_FAILED_NO_DETAIL")}
    while True:
        event = parse_monitor_message(await monitor.recv_multipart())
        if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return
        if event["event"] in failed:
            raise PlaneLost(f"worker {name} failed the plane's authentication: it does not "
                            "hold the cluster's secret")


class Planes:
    """The router's connections, by worker id; :meth:`get` opens one on first use."""

    def __init__(self, secret: str, limit: int = DEFAULT_LIMIT) -> None:
        self.secret, self.limit = secret, limit
        self._ctx = None
        self._open: dict[str, Connection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.shut_message: str | None = None    # set by shut(): no more calls

    async def get(self, worker) -> Connection:
        """The worker's connection, opened if need be (its address from its actor);
        raises :class:`PlaneLost` when it cannot be reached or authenticated, and Ray's
        error when its actor is dead."""
        if self.shut_message is not None:
            raise ShuttingDown(self.shut_message)
        wid = worker.worker_id
        conn = self._open.get(wid)
        if conn is not None and not conn.closed:
            return conn
        async with self._locks.setdefault(wid, asyncio.Lock()):
            conn = self._open.get(wid)
            if conn is not None and not conn.closed:
                return conn
            try:
                address = await asyncio.wait_for(worker.actor.plane.remote(), _CONNECT_S * 2)
            except asyncio.TimeoutError:
                raise PlaneLost(f"worker {wid} did not give its plane address") from None
            conn = self._open[wid] = await Connection.open(self._context(), address,
                                                           self.secret, wid, self.limit)
            return conn

    def _context(self):
        if self._ctx is None:
            import zmq.asyncio

            self._ctx = zmq.asyncio.Context()
        return self._ctx

    def shut(self, message: str) -> None:
        """The router is stopping: every call in flight fails with :class:`ShuttingDown`
        (``message``; each is cancelled on its worker as its reader leaves), and so does
        every later :meth:`get`."""
        self.shut_message = message
        for conn in self._open.values():
            for s in list(conn.calls.values()):
                s._fail(ShuttingDown(message))

    def drop(self, worker_id: str) -> None:
        conn = self._open.pop(worker_id, None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        for conn in self._open.values():
            conn.close()
        self._open.clear()
