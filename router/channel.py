"""The router end of the direct channel (step 2 → 3 of the request path).

The prefill call is the one worker call the first token waits on; through a Ray actor call
it costs two hops through Ray's core workers (about 1.2 ms round trip on an idle 2-core
machine, 4-5 ms under load: docs/benchmarks.md). :class:`Channels` keeps one persistent,
authenticated TCP connection per prefill worker (:mod:`worker_runtime.channel` is the other
end) and multiplexes calls on it by id. The address and token come from the worker's Ray
actor (``channel()``), asked once per worker incarnation: a worker Ray restarted answers
on a new port, so a connection that fails is dropped and the next call asks again.
Where no channel can be had (connecting fails, the worker has none), the caller falls back
to the Ray call; :class:`ChannelLost` (the connection dropped mid-call) means the worker
died, as ``RayActorError`` does on the Ray path.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from cluster.wire import (WireError, error_from, frame, from_wire, handshake_mac,
                          read_frame, to_wire)

log = logging.getLogger(__name__)

_CONNECT_S = 5.0
_RETRY_AFTER_S = 2.0      # after a failed connect, the Ray path until then


class ChannelLost(ConnectionError):
    """The connection to a worker dropped with the call in flight."""


class Channel:
    """One authenticated connection to one worker; calls multiplexed by id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 name: str) -> None:
        self.reader, self.writer, self.name = reader, writer, name
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.closed = False
        self._reader_task = asyncio.create_task(self._read_loop())

    @classmethod
    async def open(cls, address: str, token: str, name: str) -> "Channel":
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            nonce = (await read_frame(reader)).get("nonce")
            if not isinstance(nonce, str):
                raise WireError("no handshake nonce")
            writer.write(frame({"mac": handshake_mac(token, nonce)}))
            await writer.drain()
            if (await read_frame(reader)).get("ok") is not True:
                raise WireError("the worker refused the channel token")
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, name)

    async def call(self, op: str, arg: Any, result_type: type) -> Any:
        """Run ``op`` on the worker; its typed result, or its error raised here. Cancelling
        the awaiting task cancels the call on the worker."""
        if self.closed:
            raise ChannelLost(f"channel to {self.name} is closed")
        cid = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[cid] = fut
        try:
            self.writer.write(frame({"id": cid, "op": op, "body": to_wire(arg)}))
            await self.writer.drain()
            msg = await fut
        except asyncio.CancelledError:
            if not self.closed:
                self.writer.write(frame({"id": cid, "cancel": True}))
            raise
        except ChannelLost:
            raise
        except ConnectionError as e:
            self._lose(e)
            raise ChannelLost(f"channel to {self.name} dropped: {e}") from e
        finally:
            self._pending.pop(cid, None)
        if "error" in msg:
            raise error_from(msg["error"])
        return from_wire(result_type, msg.get("result"), "result.")

    async def _read_loop(self) -> None:
        try:
            while True:
                msg = await read_frame(self.reader)
                fut = self._pending.get(msg.get("id"))
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                elif msg.get("id") is None and "error" in msg:
                    raise WireError(f"the worker closed the channel: {msg['error']}")
        except (asyncio.IncompleteReadError, ConnectionError, WireError) as e:
            self._lose(e)
        except asyncio.CancelledError:
            self._lose(ConnectionError("closed"))

    def _lose(self, why: BaseException) -> None:
        if self.closed:
            return
        self.closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ChannelLost(f"channel to {self.name} dropped: {why!r}"))
        self.writer.close()

    def close(self) -> None:
        self._reader_task.cancel()
        self._lose(ConnectionError("closed by the router"))


class Channels:
    """The router's channels, by worker id; :meth:`get` opens one on first use."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._open: dict[str, Channel] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._retry_at: dict[str, float] = {}

    async def get(self, worker) -> Channel | None:
        """The worker's channel, opened if need be (its address from its actor); None when
        it has none or cannot be reached now (the caller takes the Ray path)."""
        if not self.enabled:
            return None
        wid = worker.worker_id
        ch = self._open.get(wid)
        if ch is not None and not ch.closed:
            return ch
        if time.monotonic() < self._retry_at.get(wid, 0.0):
            return None
        async with self._locks.setdefault(wid, asyncio.Lock()):
            ch = self._open.get(wid)
            if ch is not None and not ch.closed:
                return ch
            try:
                address, token = await asyncio.wait_for(worker.actor.channel.remote(),
                                                        _CONNECT_S)
                ch = await asyncio.wait_for(Channel.open(address, token, wid), _CONNECT_S)
            except Exception as e:
                log.warning("no direct channel to %s (%r); Ray calls for %g s", wid, e,
                            _RETRY_AFTER_S)
                self._retry_at[wid] = time.monotonic() + _RETRY_AFTER_S
                return None
            self._open[wid] = ch
            return ch

    def close(self) -> None:
        for ch in self._open.values():
            ch.close()
        self._open.clear()
