"""The request body limit: a body over it is answered 413 before anything reads it.

:class:`BodyLimit` is a plain ASGI middleware in front of every route, so the refusal comes
before the body is parsed, before authentication and before routing: a ``Content-Length``
over the limit is answered at once, the body never read; a body without one (chunked) is
read only up to the limit, and past it answered the same way. The answer is OpenAI-shaped
(``{"error": {...}}``, HTTP 413) and names the limit and how to change it.

The default is the router's own limit on a Generate request (``MAX_REQUEST_BYTES``, 64 MiB):
a standalone gateway could not pass on a larger request anyway, and a prompt of the longest
context any model here accepts fits in a small part of it (a 128k-token prompt as JSON token
ids is under 1 MiB).
"""

from __future__ import annotations

from preft_client import MAX_REQUEST_BYTES

from http_gateway.errors import GatewayError

DEFAULT_MAX_BODY_BYTES = MAX_REQUEST_BYTES
HOW_TO_CHANGE = ("python -m http_gateway --max-body-mib N, or preft up --http-max-body-mib N")


def too_large(given: str, limit: int) -> GatewayError:
    return GatewayError(413, f"request body: {given} is over the gateway's limit of {limit} "
                             f"bytes ({limit / (1 << 20):g} MiB); to change the limit: "
                             f"{HOW_TO_CHANGE}", type_="invalid_request_error")


def checked_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"max_body_bytes must be an integer >= 1, got {limit!r}")
    return limit


class BodyLimit:
    """ASGI middleware: HTTP requests whose body is over ``limit`` bytes get 413."""

    def __init__(self, app, limit: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = checked_limit(limit)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = _content_length(scope)
        if length is not None:
            if length > self.limit:
                return await _answer(too_large(f"Content-Length {length}", self.limit),
                                     scope, receive, send)
            return await self.app(scope, receive, send)
        # no Content-Length (chunked): read up to the limit, then hand the app what was read
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks.append(message)   # the client left: the app sees it as it would
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                return await _answer(too_large(f"more than {self.limit} bytes (chunked)",
                                               self.limit), scope, receive, send)
            chunks.append(message)
            if not message.get("more_body", False):
                break
        return await self.app(scope, _replay(chunks, receive), send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None   # the server (uvicorn) refuses a malformed one itself
    return None


def _replay(chunks: list, receive):
    async def replayed():
        return chunks.pop(0) if chunks else await receive()
    return replayed


async def _answer(error: GatewayError, scope, receive, send) -> None:
    """The refusal, closing the connection: the unread body is never read after it."""
    response = error.response()
    response.headers["connection"] = "close"
    await response(scope, receive, send)
