"""Server-sent events: the one streamer behind ``/v1/completions`` and
``/v1/chat/completions`` with ``"stream": true``.

Both endpoints stream the same way: ``data: {chunk}\\n\\n`` per generated piece of text, a
closing chunk with the finish reason, with ``stream_options.include_usage`` a last chunk with
``choices: []`` and the usage, then ``data: [DONE]\\n\\n``. They differ only in the chunk's
envelope (:class:`Envelope`: id, object, model) and in the shape of its one choice (a
``choice(text, finish_reason, logprobs)`` function, plus chat's opening ``role`` chunk).

The router's first message is awaited before the HTTP answer starts (:func:`started`), so
its refusals (unknown adapter, bad field, full queue) become HTTP statuses rather than errors
inside a 200 event stream; an error after that is sent as a ``data: {"error": ...}`` event.
A client that leaves closes the SDK's iterator, which cancels the gRPC call.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from preft_client import Completion, Delta, PreftClientError, Usage

from http_gateway.errors import gateway_error

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
Items = AsyncIterator[Delta | Completion]
# (text, finish_reason or None, the text's token logprobs, the sample's index) -> the choice
Choice = Callable[[str, str | None, tuple, int], dict]


def sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def usage(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


@dataclass(frozen=True)
class Envelope:
    """What every chunk of one response repeats (and its non-streamed body too)."""

    id: str
    object: str
    created: int
    model: str
    include_usage: bool = False

    def head(self) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model}

    def chunk(self, choice: dict) -> dict:
        c = {**self.head(), "choices": [choice]}
        if self.include_usage:
            c["usage"] = None
        return c

    def usage_chunk(self, c: Completion) -> dict:
        return {**self.head(), "choices": [], "usage": usage(c.usage)}


async def started(items: Items) -> Items:
    """Wait for the first item (a refusal raises here, as a :class:`GatewayError`), then
    return an iterator over all of them."""
    try:
        first = await anext(items)
    except PreftClientError as e:
        raise gateway_error(e) from None
    return _chain(first, items)


async def _chain(first: Delta | Completion, rest: Items) -> Items:
    async with contextlib.aclosing(rest):   # closing it cancels the gRPC call
        yield first
        async for item in rest:
            yield item


async def _events(items: Items, env: Envelope, choice: Choice,
                  opening: dict | None, n: int) -> AsyncIterator[bytes]:
    async with contextlib.aclosing(items):
        try:
            for i in range(n if opening is not None else 0):
                yield sse(env.chunk({**opening, "index": i}))
            async for item in items:
                if isinstance(item, Completion):
                    for s in item.samples or [item]:
                        yield sse(env.chunk(choice("", s.finish_reason, (),
                                                   getattr(s, "index", 0))))
                    if env.include_usage:
                        yield sse(env.usage_chunk(item))
                elif item.text or item.logprobs:
                    yield sse(env.chunk(choice(item.text, None, item.logprobs, item.index)))
        except PreftClientError as e:
            yield sse(gateway_error(e).body())
        yield sse("[DONE]")


async def stream_response(items: Items, env: Envelope, choice: Choice,
                          opening: dict | None = None, n: int = 1) -> StreamingResponse:
    """The SSE answer to one request: waits for the router's first message, then streams
    (``n`` samples: chunks carry their choice's index, each choice gets its closing chunk)."""
    items = await started(items)
    return StreamingResponse(_events(items, env, choice, opening, n),
                             media_type="text/event-stream", headers=SSE_HEADERS)
