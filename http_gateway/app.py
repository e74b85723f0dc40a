"""The ASGI app: routes for the OpenAI API, health and metrics, and the error handlers.

Each route parses its body (``schema``), asks the router through the app's
:class:`~http_gateway.gateway.Gateway` (the SDK), and answers OpenAI-shaped JSON or, with
``"stream": true``, server-sent events (``sse``). ``Authorization: Bearer <key>`` is passed on
as the SDK call's ``api_key`` (gRPC metadata ``authorization: Bearer <key>``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import replace

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from preft_client import DEFAULT_CHAT, ChatTemplate

from http_gateway.errors import GatewayError
from http_gateway.gateway import DEFAULT_MAX_TOKENS, DEFAULT_TIMEOUT_S, Gateway
from http_gateway.limits import DEFAULT_MAX_BODY_BYTES, BodyLimit, checked_limit
from http_gateway.logprobs import CompletionLogprobs, chat_logprobs
from http_gateway.schema import (ChatCompletionRequest, CompletionRequest, Sampling,
                                 format_chat, single_prompt, validation_error)
from http_gateway.sse import Envelope, stream_response, usage

log = logging.getLogger(__name__)
routes = APIRouter()


def create_app(router_address: str, base_model_name: str = "base", *,
               timeout: float | None = DEFAULT_TIMEOUT_S,
               default_max_tokens: int = DEFAULT_MAX_TOKENS,
               router_tls: dict | None = None, client=None,
               chat_template: ChatTemplate = DEFAULT_CHAT,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The OpenAI-compatible FastAPI app, forwarding to the gRPC router at ``router_address``.

    ``base_model_name`` is the OpenAI ``model`` that means "no adapter"; ``timeout`` is the
    deadline of each gRPC call (seconds, None = none); ``default_max_tokens`` applies when a
    request gives neither ``max_tokens`` nor ``max_completion_tokens``. ``router_tls``: reach
    a TLS router, with the SDK's options (``tls_ca``, ``tls_cert``, ``tls_key``,
    ``tls_server_name``; see ``preft_client.AsyncPreftClient``). ``client``: the SDK client
    to use instead (``preft_client.local.InProcessClient`` in the router's process).
    ``chat_template``: how chat messages become the prompt (``preft_client.chat``: the model's
    own, as ``preft train`` renders it; default: the documented plain template).
    ``max_body_bytes``: a request body over it is answered 413 unread (``limits``).
    """
    gw = Gateway(router_address, base_model_name, timeout, default_max_tokens, router_tls,
                 client, chat_template)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            await gw.close()

    app = FastAPI(title="PreFT Serve OpenAI-compatible gateway", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gw
    app.add_middleware(BodyLimit, limit=checked_limit(max_body_bytes))
    _add_error_handlers(app)
    app.include_router(routes)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _on_gateway_error(request: Request, exc: GatewayError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(404)
    async def _on_not_found(request: Request, exc):
        return GatewayError(404, f"no route {request.method} {request.url.path}").response()

    @app.exception_handler(405)
    async def _on_bad_method(request: Request, exc):
        return GatewayError(405, f"method {request.method} not allowed on {request.url.path}",
                            type_="invalid_request_error").response()

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return GatewayError(500, f"internal error: {type(exc).__name__}: {exc}").response()


def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway


def bearer_key(request: Request) -> str | None:
    """The API key of ``Authorization: Bearer <key>``, or None without one."""
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    if not all(33 <= ord(ch) < 127 for ch in key):
        raise GatewayError(401, "Authorization header: the bearer key must be printable ASCII "
                                "without spaces", type_="authentication_error")
    return key


def _envelope(gw: Gateway, body: Sampling, prefix: str, obj: str) -> Envelope:
    return Envelope(f"{prefix}-{uuid.uuid4().hex}", obj, int(time.time()),
                    body.model or gw.base_model_name, body.include_usage())


# --------------------------------------------------------------------------- health, metrics


@routes.get("/metrics")
async def metrics():
    """Prometheus exposition of this process's router metrics (``router.metrics``: the
    router's registry when the gateway runs in the router's process, as ``preft up
    --http-port`` does)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    from router.metrics import default_metrics

    body = await asyncio.to_thread(default_metrics().render)  # gauges may ask workers
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@routes.get("/health")
async def health(request: Request):
    gw = _gateway(request)
    await gw.check_health()
    return {"status": "ok", "router": gw.router_address}


# --------------------------------------------------------------------------- /v1/models


@routes.get("/v1/models")
async def list_models(request: Request):
    gw = _gateway(request)
    adapters = await gw.adapters(bearer_key(request))
    data = [gw.model_card(gw.base_model_name)]
    data += [gw.model_card(n, a) for n, a in sorted(adapters.items())
             if n != gw.base_model_name]
    return {"object": "list", "data": data}


@routes.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    gw = _gateway(request)
    if model_id == gw.base_model_name:
        return gw.model_card(gw.base_model_name)
    adapters = await gw.adapters(bearer_key(request))
    if model_id not in adapters:
        raise GatewayError(404, f"model {model_id!r} does not exist", "model")
    return gw.model_card(model_id, adapters[model_id])


# --------------------------------------------------------------------------- generation


def _text_choice(with_logprobs: bool):
    offsets: dict[int, CompletionLogprobs] = {}   # text_offset runs on per choice

    def choice(text: str, finish: str | None, logprobs=(), index: int = 0) -> dict:
        lp = offsets.setdefault(index, CompletionLogprobs()) if with_logprobs else None
        return {"index": index, "text": text, "finish_reason": finish,
                "logprobs": lp.block(logprobs) if lp is not None else None}
    return choice


def _chat_choice(with_logprobs: bool):
    def choice(text: str, finish: str | None, logprobs=(), index: int = 0) -> dict:
        return {"index": index, "delta": {"content": text} if text else {},
                "logprobs": chat_logprobs(logprobs) if with_logprobs else None,
                "finish_reason": finish}
    return choice


def _best(samples, n: int, ranked: bool):
    """The samples to answer: all of them, or (``best_of``) the ``n`` with the highest
    cumulative logprob, re-indexed."""
    if not ranked:
        return list(samples)
    best = sorted(samples, key=lambda s: -sum(t.logprob for t in s.logprobs))[:n]
    return [replace(s, index=i) for i, s in enumerate(best)]


_CHAT_OPENING = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}


@routes.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    gw = _gateway(request)
    text, ids = single_prompt(body.prompt)
    if body.stream and (body.echo or body.samples() > (body.n or 1)):
        field = "echo" if body.echo else "best_of"
        raise GatewayError(400, f"{field}: not supported with stream; ask without stream", field)
    env = _envelope(gw, body, "cmpl", "text_completion")
    items = gw.events(body, env.id, text=text, token_ids=ids, api_key=bearer_key(request))
    choice = _text_choice(body.logprobs is not None)
    if body.stream:
        return await stream_response(items, env, choice)
    c = await gw.complete(items)
    echo = c.prompt_text if body.echo else ""
    prompt_lps = c.prompt_logprobs if body.echo else ()
    picked = _best(c.samples, body.n or 1, body.samples() > (body.n or 1))
    return {**env.head(), "usage": usage(c.usage), "choices": [
        choice(echo + s.text, s.finish_reason, prompt_lps + s.logprobs, s.index)
        for s in picked]}


@routes.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    gw = _gateway(request)
    max_tokens = (body.max_completion_tokens if body.max_completion_tokens is not None
                  else body.max_tokens)
    env = _envelope(gw, body, "chatcmpl", "chat.completion.chunk" if body.stream
                    else "chat.completion")
    items = gw.events(body, env.id, text=format_chat(body.messages, gw.chat_template),
                      max_tokens=max_tokens,
                      api_key=bearer_key(request))
    if body.stream:
        return await stream_response(items, env, _chat_choice(bool(body.logprobs)),
                                     opening=_CHAT_OPENING, n=body.n or 1)
    c = await gw.complete(items)
    return {**env.head(), "usage": usage(c.usage), "choices": [
        {"index": s.index, "message": {"role": "assistant", "content": s.text},
         "finish_reason": s.finish_reason,
         "logprobs": chat_logprobs(s.logprobs) if body.logprobs else None}
        for s in c.samples]}
