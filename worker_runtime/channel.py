"""The worker end of the direct channel: the router's calls that the first token waits on.

Step 3 of the request path is entered here when the router has a channel to the worker
(:mod:`router.channel`): one TCP server per worker, on the actor's own event loop, so a
call runs exactly as the Ray actor method would (same coroutine, same locks). Each
connection is authenticated first (:mod:`cluster.wire` handshake under a token that only
callers of the worker's Ray actor learn); then calls are multiplexed by id, each its own
task, answered as they finish; a ``cancel`` cancels its task, as ``ray.cancel`` does, and
a dropped connection cancels every call it carried.

Every frame is checked: a malformed call is answered with an ``INVALID_ARGUMENT`` error
and the connection keeps serving; broken framing (not JSON, oversized) or a failed
handshake closes that connection only. Nothing a peer sends ends the server.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from cluster.wire import (WireError, error_body, frame, from_wire, mac_ok, read_frame,
                          to_wire)

log = logging.getLogger(__name__)

_HANDSHAKE_S = 10.0
_MAX_INFLIGHT = 4096     # calls per connection


@dataclass(frozen=True)
class Op:
    """One callable operation: its argument's message type and the coroutine that runs it."""

    arg: type
    run: Callable[[Any], Awaitable[Any]]


class ChannelServer:
    def __init__(self, ops: dict[str, Op], host: str, name: str) -> None:
        self.ops, self.host, self.name = ops, host, name
        self.token = secrets.token_hex(16)
        self.address = ""
        self.calls = 0            # calls served (tests and the bench assert the path used)
        self.refused = 0          # frames or connections refused
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        """Listen (on the running loop: the actor's); ``host:port``."""
        if self._server is None:
            self._server = await asyncio.start_server(self._connection, self.host, 0)
            port = self._server.sockets[0].getsockname()[1]
            self.address = f"{self.host}:{port}"
        return self.address

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    # ------------------------------------------------------------------ one connection
    async def _connection(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        tasks: dict[int, asyncio.Task] = {}
        try:
            if await self._handshake(reader, writer):
                await self._serve(reader, writer, tasks)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass                  # the router went away
        except WireError as e:
            self.refused += 1
            log.warning("channel of %s: closing a connection: %s", self.name, e)
            await self._send(writer, {"id": None, "error": {
                "type": "WireError", "grpc_code": "INVALID_ARGUMENT", "message": str(e)}})
        except Exception:
            log.exception("channel of %s: connection failed", self.name)
        finally:
            for t in tasks.values():
                t.cancel()
            writer.close()

    async def _handshake(self, reader, writer) -> bool:
        nonce = secrets.token_hex(16)
        await self._send(writer, {"nonce": nonce})
        try:
            hello = await asyncio.wait_for(read_frame(reader), _HANDSHAKE_S)
        except asyncio.TimeoutError:
            hello = {}
        if not mac_ok(self.token, nonce, hello.get("mac")):
            self.refused += 1
            await self._send(writer, {"error": "wrong or missing channel token"})
            return False
        await self._send(writer, {"ok": True})
        return True

    async def _serve(self, reader, writer, tasks: dict[int, asyncio.Task]) -> None:
        while True:
            msg = await read_frame(reader)
            cid = msg.get("id")
            if type(cid) is not int:
                raise WireError(f"id={cid!r:.40}: expected an integer")
            if msg.get("cancel") is True:
                task = tasks.get(cid)
                if task is not None:
                    task.cancel()
                continue
            try:
                op, arg = self._parse(msg, cid, tasks)
            except WireError as e:
                self.refused += 1
                await self._send(writer, {"id": cid, "error": {
                    "type": "WireError", "grpc_code": "INVALID_ARGUMENT", "message": str(e)}})
                continue
            tasks[cid] = asyncio.create_task(self._call(op, arg, cid, writer, tasks))

    def _parse(self, msg: dict, cid: int, tasks: dict) -> tuple[Op, Any]:
        op = self.ops.get(msg.get("op")) if isinstance(msg.get("op"), str) else None
        if op is None:
            raise WireError(f"op={msg.get('op')!r:.40}: expected one of {sorted(self.ops)}")
        if cid in tasks or len(tasks) >= _MAX_INFLIGHT:
            raise WireError(f"call id {cid} is in use, or {_MAX_INFLIGHT} calls are in flight")
        try:
            return op, from_wire(op.arg, msg.get("body"), "body.")
        except WireError:
            raise
        except Exception as e:   # the message type's own checks (InvalidRequest, ValueError)
            raise WireError(getattr(e, "message", str(e))) from None

    async def _call(self, op: Op, arg, cid: int, writer, tasks: dict) -> None:
        try:
            answer = {"id": cid, "result": to_wire(await op.run(arg))}
        except asyncio.CancelledError:
            return                # cancelled by the router, or its connection dropped
        except Exception as e:
            answer = {"id": cid, "error": error_body(e)}
        finally:
            tasks.pop(cid, None)
        self.calls += 1
        await self._send(writer, answer)

    @staticmethod
    async def _send(writer, msg: dict) -> None:
        try:
            writer.write(frame(msg))
            await writer.drain()
        except (ConnectionError, RuntimeError):
            pass                  # the peer is gone; its calls were cancelled
