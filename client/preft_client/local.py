"""The SDK without the network hop: step 1 of a request's path when the caller shares the
router's process (the OpenAI gateway under ``preft up --http-port``).

:class:`InProcessClient` is an :class:`~preft_client.AsyncPreftClient` whose calls go
straight to a Router servicer object on the same event loop (``Generate`` and the unary
RPCs, with a minimal servicer context: metadata, deadline, abort), instead of through a gRPC
channel: the same requests, the same answers and typed errors, no serialization, no socket.
It knows the servicer only by the RPC method names of ``proto/preft/v1/router.proto``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from preft_client.client import AsyncPreftClient


class _Aborted(grpc.aio.AbortError, grpc.RpcError):
    """``context.abort`` of an in-process call: what the servicer sees as grpc.aio's abort
    and the client as the call's status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Context:
    """What the router's RPCs read of a ``grpc.aio.ServicerContext``."""

    def __init__(self, metadata, timeout: float | None) -> None:
        self._metadata = tuple(metadata or ())
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._code: grpc.StatusCode | None = None

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self._code = code
        raise _Aborted(code, details)

    def set_trailing_metadata(self, metadata) -> None:
        pass

    def code(self) -> grpc.StatusCode | None:
        return self._code


class _LocalStream:
    """A ``Generate`` called in-process: iterate it; ``cancel()`` ends it early."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def __aiter__(self):
        return self._stream

    def cancel(self) -> None:
        asyncio.ensure_future(self._close())

    async def _close(self) -> None:
        try:
            await self._stream.aclose()   # a no-op once it finished
        except RuntimeError:              # already closing (its task was cancelled)
            pass


class InProcessClient(AsyncPreftClient):
    """``InProcessClient(servicer)``: :class:`AsyncPreftClient`'s methods on a Router
    servicer in this process (coroutines on the servicer's event loop)."""

    def __init__(self, servicer: Any, *, api_key: str | None = None,
                 timeout: float | None = 300.0) -> None:
        super().__init__("in-process", api_key=api_key, timeout=timeout, retries=0)
        self._servicer = servicer

    def _generate(self, req, api_key: str | None):
        kw = self._kw(api_key)
        return _LocalStream(self._servicer.Generate(req, _Context(kw["metadata"],
                                                                  kw["timeout"])))

    def _method(self, call):
        if call.health:
            async def serving(request, **kw):
                return health_pb2.HealthCheckResponse(
                    status=health_pb2.HealthCheckResponse.SERVING)
            return serving
        rpc = getattr(self._servicer, call.rpc)

        async def invoke(request, timeout=None, metadata=None, wait_for_ready=None):
            return await rpc(request, _Context(metadata, timeout))
        return invoke

    async def close(self) -> None:
        """Nothing to close: no channel."""
