"""OpenAI-compatible HTTP gateway: an alternative front door (step 1 of a request's path).

An application that speaks the OpenAI API (the ``openai`` package, ``curl``, anything built
for vLLM's OpenAI server) sends HTTP requests here; the gateway translates each one into a
``preft.v1.Router`` gRPC call on the router and relays the answer back as OpenAI-shaped
JSON or server-sent events::

    HTTP client ──HTTP/JSON, SSE──> http_gateway ──gRPC (Generate, ListAdapters)──> router ──> ...

It is a pure translator: it holds no model, no tokenizer, no KV cache and no adapter; token
ids and text only pass through. Placement, validation of limits (prompt length, token ids,
adapter names) and everything after step 1 stay in the router (``router/server.py``). Like
the rest of the ``router`` package it imports neither torch nor vLLM nor transformers.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both also as SSE with
``stream: true``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``. The OpenAI
``model`` field is the adapter name (as with vLLM's ``--lora-modules``); the name given by
``--base-model-name`` (default ``base``) means the base model without an adapter.

Chat messages become one plain-text prompt with this template (``format_chat``)::

    <|system|>\\n{system text}\\n<|user|>\\n{user text}\\n<|assistant|>\\n{reply}\\n ... <|assistant|>\\n

An ``Authorization: Bearer <key>`` header is forwarded to the router as gRPC metadata
``authorization: Bearer <key>``. gRPC status codes become HTTP statuses (INVALID_ARGUMENT
400, UNAUTHENTICATED 401, PERMISSION_DENIED 403, NOT_FOUND 404, RESOURCE_EXHAUSTED 429,
UNAVAILABLE 503, DEADLINE_EXCEEDED 504, anything else 500) with an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}``; malformed request bodies are 400 with
the offending field named.

Run it: ``python -m router.http_gateway --router 127.0.0.1:50051 --port 8000`` (see
``--help`` and ``docs/http.md``). In Python: ``create_app(router_address)`` returns the
FastAPI app, ``await serve_http(router_address, host, port)`` serves it, and
``HttpGatewayThread`` runs it on a background thread (tests, embedding).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, AsyncIterator, Callable, Literal, Union

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from preft_client.errors import PreftClientError, from_rpc_error
from proto.preft.v1 import router_pb2 as pb
from proto.preft.v1 import router_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16
DEFAULT_TIMEOUT_S = 300.0
OWNER = "preft"

# --------------------------------------------------------------------------- errors

# gRPC status -> (HTTP status, OpenAI error type)
_HTTP_BY_CODE: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled_error"),
}
_TYPE_BY_HTTP = {400: "invalid_request_error", 401: "authentication_error",
                 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
                 500: "internal_error", 503: "service_unavailable_error", 504: "timeout_error"}


class GatewayError(Exception):
    """An error answered with an OpenAI-style error body and an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or _TYPE_BY_HTTP.get(status, "internal_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _param_from_message(message: str) -> str | None:
    """The router's messages start with the field ("sampling.max_tokens: must be ...")."""
    head, sep, _ = message.partition(": ")
    if not sep or not head.replace(".", "").replace("_", "").isalnum():
        return None
    return head.removeprefix("sampling.")


def gateway_error(e: PreftClientError) -> GatewayError:
    """Map a typed SDK error (``preft_client.errors``) to its HTTP status and body."""
    status, type_ = _HTTP_BY_CODE.get(e.code, (500, "internal_error"))
    param = _param_from_message(e.message) if status == 400 else None
    if status == 404:
        param = "model"
    return GatewayError(status, e.message or e.code.name, param, type_)


def _rpc_error(e: grpc.RpcError) -> GatewayError:
    return gateway_error(from_rpc_error(e))


# --------------------------------------------------------------------------- request bodies

NonNegInt = Annotated[int, Field(ge=0, lt=2**32)]
Finite = Annotated[float, Field(allow_inf_nan=False)]


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM extension; accepted, not used


# OpenAI fields we accept only at their default: field -> (refused(value), message).
_UNSUPPORTED = {
    "n": (lambda v: v is not None and v != 1, "only n=1 is supported"),
    "best_of": (lambda v: v is not None and v != 1, "only best_of=1 is supported"),
    "presence_penalty": (bool, "penalties are not supported; leave unset or 0"),
    "frequency_penalty": (bool, "penalties are not supported; leave unset or 0"),
    "logit_bias": (bool, "logit_bias is not supported"),
    "echo": (bool, "echo is not supported"),
    "suffix": (bool, "suffix is not supported"),
    "logprobs": (bool, "logprobs are not supported"),
    "tools": (bool, "tools are not supported"),
    "response_format": (lambda v: bool(v) and v.get("type", "text") != "text",
                        "only response_format {'type': 'text'} is supported"),
}


class _Sampling(BaseModel):
    """Fields shared by both endpoints. Unknown fields (``user``, ...) are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1, lt=2**32)] | None = None
    temperature: Annotated[Finite, Field(ge=0)] | None = None
    top_p: Annotated[Finite, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    n: int | None = 1
    presence_penalty: Finite | None = None
    frequency_penalty: Finite | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator(*_UNSUPPORTED, check_fields=False)   # also the subclasses' fields
    @classmethod
    def _supported(cls, v, info: ValidationInfo):
        refused, why = _UNSUPPORTED[info.field_name]
        if refused(v):
            raise ValueError(why)
        return v

    @field_validator("stop")
    @classmethod
    def _stop_non_empty(cls, v):
        strings = [v] if isinstance(v, str) else (v or [])
        if any(not s for s in strings):
            raise ValueError("stop strings must be non-empty")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: Union[str, list[NonNegInt], list[str], list[list[NonNegInt]]]
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1, lt=2**32)] | None = None
    logprobs: bool | None = False
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


# --------------------------------------------------------------------------- chat template

_ROLE_TAG = {"system": "system", "developer": "system", "user": "user",
             "assistant": "assistant", "tool": "tool"}


def format_chat(messages: list[ChatMessage]) -> str:
    """The plain-text chat template: one ``<|role|>\\n{text}\\n`` block per message, then
    ``<|assistant|>\\n`` for the reply. ``developer`` is written as ``system``; list content
    (text parts) is concatenated."""
    out = []
    for m in messages:
        if isinstance(m.content, list):
            text = "".join(p.text for p in m.content)
        else:
            text = m.content or ""
        out.append(f"<|{_ROLE_TAG[m.role]}|>\n{text}\n")
    out.append("<|assistant|>\n")
    return "".join(out)


# --------------------------------------------------------------------------- the gateway


@dataclass
class _Result:
    text: list[str] = field(default_factory=list)
    final: pb.Final | None = None


class Gateway:
    """Per-app state: one gRPC channel to the router, shared by all HTTP requests."""

    def __init__(self, router_address: str, base_model_name: str, timeout: float | None,
                 default_max_tokens: int,
                 router_credentials: grpc.ChannelCredentials | None = None,
                 router_options: list | None = None) -> None:
        self.router_address = router_address
        self.router_credentials = router_credentials
        self.router_options = router_options or []
        self.base_model_name = base_model_name
        self.timeout = timeout
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self.channel: grpc.aio.Channel | None = None
        self.stub: pb_grpc.RouterStub | None = None
        self.health: health_pb2_grpc.HealthStub | None = None

    async def open(self) -> None:
        if self.router_credentials is None:
            self.channel = grpc.aio.insecure_channel(self.router_address,
                                                     options=self.router_options)
        else:
            self.channel = grpc.aio.secure_channel(self.router_address, self.router_credentials,
                                                   options=self.router_options)
        self.stub = pb_grpc.RouterStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    # ------------------------------------------------------------ translation
    def adapter_for(self, model: str | None) -> str:
        if model is None or model == "" or model == self.base_model_name:
            return ""
        return model

    def request(self, body: _Sampling, rid: str, *, text: str | None = None,
                token_ids: list[int] | None = None,
                max_tokens: int | None = None) -> pb.GenerateRequest:
        try:
            return self._request(body, rid, text, token_ids, max_tokens)
        except ValueError as e:  # e.g. lone surrogates: not encodable as UTF-8 for protobuf
            raise GatewayError(400, f"request cannot be encoded: {e}") from None

    def _request(self, body, rid, text, token_ids, max_tokens) -> pb.GenerateRequest:
        mt = max_tokens if max_tokens is not None else body.max_tokens
        sp = pb.SamplingParams(max_tokens=mt if mt is not None else self.default_max_tokens,
                               temperature=1.0 if body.temperature is None else body.temperature,
                               top_p=1.0 if body.top_p is None else body.top_p,
                               stop=body.stop_list(), ignore_eos=body.ignore_eos)
        if body.seed is not None:
            sp.seed = body.seed
        req = pb.GenerateRequest(adapter=self.adapter_for(body.model), sampling=sp,
                                 request_id=rid)
        if text is not None:
            req.text = text
        else:
            req.token_ids.ids.extend(token_ids or [])
        return req

    # ------------------------------------------------------------ calls
    def call(self, req: pb.GenerateRequest, metadata) -> grpc.aio.UnaryStreamCall:
        return self.stub.Generate(req, timeout=self.timeout, metadata=metadata)

    async def collect(self, req: pb.GenerateRequest, metadata) -> _Result:
        res = _Result()
        call = self.call(req, metadata)
        try:
            async for msg in call:
                if msg.HasField("delta"):
                    res.text.append(msg.delta.text)
                else:
                    res.final = msg.final
        except grpc.RpcError as e:
            raise _rpc_error(e) from None
        finally:
            call.cancel()
        if res.final is None:
            raise GatewayError(502, "the router's stream ended without a final message",
                               type_="upstream_error")
        return res

    async def open_stream(self, req: pb.GenerateRequest, metadata):
        """Start the call and wait for its first message, so that the router's refusals
        (unknown adapter, bad field, full queue) become proper HTTP statuses rather than
        errors inside a 200 event stream. Returns (call, first message or None)."""
        call = self.call(req, metadata)
        try:
            first = await call.read()
        except grpc.RpcError as e:
            call.cancel()
            raise _rpc_error(e) from None
        except BaseException:
            call.cancel()
            raise
        return call, (None if first is grpc.aio.EOF else first)

    async def messages(self, call, first) -> AsyncIterator[pb.GenerateResponse]:
        try:
            msg = first
            while msg is not None:
                yield msg
                nxt = await call.read()
                msg = None if nxt is grpc.aio.EOF else nxt
        except grpc.RpcError as e:
            raise _rpc_error(e) from None
        finally:
            call.cancel()  # no-op when finished; frees the router's work if the client left

    async def list_adapters(self, metadata) -> dict[str, int]:
        try:
            resp = await self.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=self.timeout,
                                                metadata=metadata)
        except grpc.RpcError as e:
            raise _rpc_error(e) from None
        return {a.name: a.version for a in resp.adapters}

    def model_card(self, name: str, version: int | None = None) -> dict:
        card = {"id": name, "object": "model", "created": self.created, "owned_by": OWNER,
                "root": name, "parent": None if name == self.base_model_name else
                self.base_model_name}
        if version is not None:
            card["version"] = version
        return card


def _metadata(request: Request) -> tuple[tuple[str, str], ...] | None:
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    if not all(33 <= ord(ch) < 127 for ch in key):
        raise GatewayError(401, "Authorization header: the bearer key must be printable ASCII "
                                "without spaces", type_="authentication_error")
    return (("authorization", f"Bearer {key}"),)


def _validation_error(exc: RequestValidationError) -> GatewayError:
    errors = exc.errors()
    if not errors:
        return GatewayError(400, "invalid request body")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return GatewayError(400, f"request body is not valid JSON: {first.get('msg', '')}")
    if not loc:
        if first.get("type") == "missing":
            return GatewayError(400, "a JSON request body is required")
        return GatewayError(400, f"request body: {first.get('msg', 'invalid')}")
    param = loc[0]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    same_field = [e for e in errors if [str(p) for p in e.get("loc", ()) if p != "body"][:1]
                  == [param]]
    if first.get("type") == "missing":
        text = f"{param}: field required"
    elif len(same_field) > 1 and param in ("prompt", "stop"):
        text = {"prompt": "prompt: must be a string, a list of token ids (integers >= 0), or a "
                          "list holding one of those",
                "stop": "stop: must be a string or a list of strings"}[param]
    else:
        where = ".".join(loc)
        text = f"{where}: {msg}"
    return GatewayError(400, text, param)


def _sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _usage(final: pb.Final) -> dict:
    p, c = final.usage.prompt_tokens, final.usage.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _single_prompt(prompt) -> tuple[str | None, list[int] | None]:
    """Accept a string, a list of token ids, or a list holding exactly one of those."""
    if isinstance(prompt, str):
        return prompt, None
    if not prompt:
        raise GatewayError(400, "prompt: is empty: give a string or token ids", "prompt")
    if isinstance(prompt[0], int):
        return None, list(prompt)
    if len(prompt) != 1:
        raise GatewayError(400, f"prompt: only one prompt per request is supported, got "
                                f"{len(prompt)}", "prompt")
    return _single_prompt(prompt[0])


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def create_app(router_address: str, base_model_name: str = "base", *,
               timeout: float | None = DEFAULT_TIMEOUT_S,
               default_max_tokens: int = DEFAULT_MAX_TOKENS,
               router_tls: dict | None = None) -> FastAPI:
    """The OpenAI-compatible FastAPI app, forwarding to the gRPC router at ``router_address``.

    ``base_model_name`` is the OpenAI ``model`` that means "no adapter"; ``timeout`` is the
    deadline of each gRPC call (seconds, None = none); ``default_max_tokens`` applies when a
    request gives neither ``max_tokens`` nor ``max_completion_tokens``. ``router_tls``: reach
    a TLS router, with the SDK's options (``tls_ca``, ``tls_cert``, ``tls_key``,
    ``tls_server_name``; see ``preft_client.PreftClient``).
    """
    creds, options = None, []
    if router_tls:
        from preft_client.client import _channel_args

        creds, options = _channel_args(router_address, True, router_tls.get("tls_ca"),
                                       router_tls.get("tls_cert"), router_tls.get("tls_key"),
                                       router_tls.get("tls_server_name"))
    gw = Gateway(router_address, base_model_name, timeout, default_max_tokens, creds, options)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gw.open()
        try:
            yield
        finally:
            await gw.close()

    app = FastAPI(title="PreFT Serve OpenAI-compatible gateway", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gw

    @app.exception_handler(GatewayError)
    async def _on_gateway_error(request: Request, exc: GatewayError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

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

    # ------------------------------------------------------------ /health, /v1/models
    @app.get("/metrics")
    async def metrics():
        """Prometheus exposition of this process's router metrics (router.metrics)."""
        from prometheus_client import CONTENT_TYPE_LATEST

        from router.metrics import default_metrics

        body = await asyncio.to_thread(default_metrics().render)  # gauges may ask workers
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health():
        try:
            resp = await gw.health.Check(
                health_pb2.HealthCheckRequest(service="preft.v1.Router"), timeout=5)
        except grpc.RpcError as e:
            raise GatewayError(503, f"router {router_address} does not answer: "
                                    f"{from_rpc_error(e)}") from None
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            raise GatewayError(503, f"router {router_address} is not serving "
                                    f"({health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)})")
        return {"status": "ok", "router": router_address}

    @app.get("/v1/models")
    async def list_models(request: Request):
        adapters = await gw.list_adapters(_metadata(request))
        data = [gw.model_card(base_model_name)]
        data += [gw.model_card(n, v) for n, v in sorted(adapters.items())
                 if n != base_model_name]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        if model_id == base_model_name:
            return gw.model_card(base_model_name)
        adapters = await gw.list_adapters(_metadata(request))
        if model_id not in adapters:
            raise GatewayError(404, f"model {model_id!r} does not exist", "model")
        return gw.model_card(model_id, adapters[model_id])

    # ------------------------------------------------------------ /v1/completions
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        text, ids = _single_prompt(body.prompt)
        cid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = body.model or base_model_name
        req = gw.request(body, cid, text=text, token_ids=ids)
        md = _metadata(request)
        if not body.stream:
            res = await gw.collect(req, md)
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": "".join(res.text),
                                 "finish_reason": res.final.finish_reason, "logprobs": None}],
                    "usage": _usage(res.final)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        call, first = await gw.open_stream(req, md)

        def chunk(text: str, finish: str | None) -> dict:
            c = {"id": cid, "object": "text_completion", "created": created, "model": model,
                 "choices": [{"index": 0, "text": text, "logprobs": None,
                              "finish_reason": finish}]}
            if include_usage:
                c["usage"] = None
            return c

        async def events():
            final = None
            try:
                async for msg in gw.messages(call, first):
                    if msg.HasField("delta"):
                        if msg.delta.text:
                            yield _sse(chunk(msg.delta.text, None))
                    else:
                        final = msg.final
                if final is None:
                    raise GatewayError(502, "the router's stream ended without a final message",
                                       type_="upstream_error")
                yield _sse(chunk("", final.finish_reason))
                if include_usage:
                    yield _sse({"id": cid, "object": "text_completion", "created": created,
                                "model": model, "choices": [], "usage": _usage(final)})
            except GatewayError as e:
                yield _sse(e.body())
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)

    # ------------------------------------------------------------ /v1/chat/completions
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        prompt = format_chat(body.messages)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        model = body.model or base_model_name
        max_tokens = (body.max_completion_tokens if body.max_completion_tokens is not None
                      else body.max_tokens)
        req = gw.request(body, cid, text=prompt, max_tokens=max_tokens)
        md = _metadata(request)
        if not body.stream:
            res = await gw.collect(req, md)
            return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                    "choices": [{"index": 0,
                                 "message": {"role": "assistant", "content": "".join(res.text)},
                                 "finish_reason": res.final.finish_reason, "logprobs": None}],
                    "usage": _usage(res.final)}

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        call, first = await gw.open_stream(req, md)

        def chunk(delta: dict, finish: str | None) -> dict:
            c = {"id": cid, "object": "chat.completion.chunk", "created": created,
                 "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish}]}
            if include_usage:
                c["usage"] = None
            return c

        async def events():
            final = None
            try:
                yield _sse(chunk({"role": "assistant", "content": ""}, None))
                async for msg in gw.messages(call, first):
                    if msg.HasField("delta"):
                        if msg.delta.text:
                            yield _sse(chunk({"content": msg.delta.text}, None))
                    else:
                        final = msg.final
                if final is None:
                    raise GatewayError(502, "the router's stream ended without a final message",
                                       type_="upstream_error")
                yield _sse(chunk({}, final.finish_reason))
                if include_usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                                "model": model, "choices": [], "usage": _usage(final)})
            except GatewayError as e:
                yield _sse(e.body())
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=_SSE_HEADERS)

    return app


# --------------------------------------------------------------------------- serving


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"http gateway could not bind {host}:{port}: {e}") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    import ipaddress

    host = host.strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def check_bind_is_safe(gw: Gateway, host: str, timeout: float = 10.0) -> None:
    """An open API only on loopback, as the router's own check (``router.server``): on any
    other address the gateway needs a router that refuses callers without an API key. The
    router says so itself: a ``ListAdapters`` without a key must answer UNAUTHENTICATED."""
    if _is_loopback(host):
        return
    probe = Gateway(gw.router_address, gw.base_model_name, timeout, gw.default_max_tokens,
                    gw.router_credentials, gw.router_options)
    await probe.open()
    try:
        await probe.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=timeout,
                                      wait_for_ready=True)
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            return
        raise PermissionError(
            f"refusing to serve HTTP on {host}: cannot confirm that the router at "
            f"{gw.router_address} requires API keys ({e.code().name}: {e.details()}); start "
            "the router first, or bind 127.0.0.1") from None
    finally:
        await probe.close()
    raise PermissionError(
        f"refusing to serve an open API on {host}: the router at {gw.router_address} answers "
        "without an API key; either bind 127.0.0.1, or run the router with API keys "
        "(--require-auth) after creating one with `preft keys create --tenant NAME`")


def _uvicorn_server(app: FastAPI, log_level: str, ssl_certfile: str | None = None,
                    ssl_keyfile: str | None = None, ssl_client_ca: str | None = None):
    import ssl

    import uvicorn

    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ValueError("http gateway TLS: ssl_certfile and ssl_keyfile must be given together")
    if ssl_client_ca is not None and ssl_certfile is None:
        raise ValueError("http gateway TLS: ssl_client_ca (mutual TLS) needs ssl_certfile/keyfile")
    tls = {}
    if ssl_certfile is not None:
        tls = dict(ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
        if ssl_client_ca is not None:
            tls.update(ssl_ca_certs=ssl_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False,
                            timeout_graceful_shutdown=5, **tls)
    if tls:
        config.load()   # reads the certificate and key now: errors surface before serving
    return uvicorn.Server(config)


async def serve_http(router_address: str, host: str = "127.0.0.1", port: int = 8000, *,
                     base_model_name: str = "base", timeout: float | None = DEFAULT_TIMEOUT_S,
                     default_max_tokens: int = DEFAULT_MAX_TOKENS, log_level: str = "warning",
                     ready: Callable[[int], None] | None = None,
                     server_out: list | None = None, ssl_certfile: str | None = None,
                     ssl_keyfile: str | None = None, ssl_client_ca: str | None = None,
                     router_tls: dict | None = None) -> None:
    """Serve the gateway on ``host:port`` (0 = any free port) until the server exits.

    A ``host`` other than loopback is refused (``PermissionError``) unless the router
    requires API keys (:func:`check_bind_is_safe`).

    ``ready(port)`` is called once it accepts connections; ``server_out``, if given, receives
    the ``uvicorn.Server`` (set its ``should_exit = True`` to stop). ``ssl_certfile`` and
    ``ssl_keyfile`` serve HTTPS; ``ssl_client_ca`` also requires client certificates signed
    by that CA (mutual TLS). ``router_tls``: see :func:`create_app`.
    """
    app = create_app(router_address, base_model_name, timeout=timeout,
                     default_max_tokens=default_max_tokens, router_tls=router_tls)
    await check_bind_is_safe(app.state.gateway, host)
    server = _uvicorn_server(app, log_level, ssl_certfile, ssl_keyfile, ssl_client_ca)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    if server_out is not None:
        server_out.append(server)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                break
            await asyncio.sleep(0.02)
        if server.started and ready is not None:
            ready(bound)
        await task
    finally:
        if not task.done():
            server.should_exit = True
            with contextlib.suppress(BaseException):
                await task
        sock.close()


class HttpGatewayThread:
    """Runs the gateway on its own thread and event loop: ``HttpGatewayThread(addr).start()``
    returns the bound port; ``stop()`` shuts it down. Used by tests and embedders."""

    def __init__(self, router_address: str, host: str = "127.0.0.1", port: int = 0,
                 **kwargs) -> None:
        self.router_address = router_address
        self.host = host
        self.port = port
        self.kwargs = kwargs
        self._servers: list = []
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float = 30.0) -> int:
        ready = threading.Event()

        def on_ready(port: int) -> None:
            self.port = port
            ready.set()

        def run() -> None:
            try:
                asyncio.run(serve_http(self.router_address, self.host, self.port,
                                       ready=on_ready, server_out=self._servers, **self.kwargs))
            except BaseException as e:  # surfaced by start()
                self._error = e
            finally:
                ready.set()

        self._thread = threading.Thread(target=run, name="http-gateway", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError(f"http gateway did not start within {timeout} s")
        if self._error is not None:
            raise self._error
        if not self._servers or not self._servers[0].started:
            raise RuntimeError("http gateway exited during startup")
        return self.port

    @property
    def base_url(self) -> str:
        scheme = "https" if self.kwargs.get("ssl_certfile") else "http"
        return f"{scheme}://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        for s in self._servers:
            s.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None


# --------------------------------------------------------------------------- CLI


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m router.http_gateway",
        description="OpenAI-compatible HTTP gateway for PreFT Serve. Accepts OpenAI API "
                    "requests (/v1/completions, /v1/chat/completions, /v1/models, /health) "
                    "and forwards them to the gRPC router; the OpenAI 'model' field names "
                    "the adapter. Holds no model or KV cache itself.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--router", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="address of the gRPC router to forward to (as printed by 'preft up')")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to listen on for HTTP (0.0.0.0 for all interfaces: only "
                        "when the router requires API keys)")
    p.add_argument("--port", type=int, default=8000,
                   help="HTTP port to listen on (0 = any free port, printed at start)")
    p.add_argument("--base-model-name", default="base", metavar="NAME",
                   help="the OpenAI 'model' name that means the base model without an adapter; "
                        "every other name is looked up as an adapter")
    p.add_argument("--default-max-tokens", type=_positive_int, default=DEFAULT_MAX_TOKENS,
                   metavar="N", help="max_tokens used when a request gives neither max_tokens "
                                     "nor max_completion_tokens")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="deadline of each gRPC call to the router; past it the HTTP answer is "
                        "504 (0 = no deadline)")
    p.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="serve HTTPS with this certificate (chain); needs --tls-key")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="private key of --tls-cert")
    p.add_argument("--tls-client-ca", default=None, metavar="PEM",
                   help="mutual TLS: require client certificates signed by this CA")
    p.add_argument("--router-tls-ca", default=None, metavar="PEM",
                   help="reach the router over TLS, verifying its certificate with this CA")
    p.add_argument("--router-tls-cert", default=None, metavar="PEM",
                   help="the gateway's client certificate for a mutual-TLS router")
    p.add_argument("--router-tls-key", default=None, metavar="PEM",
                   help="private key of --router-tls-cert")
    p.add_argument("--router-tls-server-name", default=None, metavar="NAME",
                   help="name to verify the router's certificate against")
    p.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn log level")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO)
                        if args.log_level != "trace" else logging.DEBUG)

    router_tls = None
    if args.router_tls_ca or args.router_tls_cert:
        router_tls = {"tls_ca": args.router_tls_ca, "tls_cert": args.router_tls_cert,
                      "tls_key": args.router_tls_key,
                      "tls_server_name": args.router_tls_server_name}

    def ready(port: int) -> None:
        scheme = "https" if args.tls_cert else "http"
        print(f"http gateway listening on {scheme}://{args.host}:{port} "
              f"(router {args.router})", flush=True)

    try:
        asyncio.run(serve_http(args.router, args.host, args.port,
                               base_model_name=args.base_model_name,
                               timeout=args.timeout or None,
                               default_max_tokens=args.default_max_tokens,
                               log_level=args.log_level, ready=ready,
                               ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key,
                               ssl_client_ca=args.tls_client_ca, router_tls=router_tls))
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
