"""OpenAI-compatible HTTP gateway: an alternative front door (step 1 of a request's path).

An application that speaks the OpenAI API (the ``openai`` package, ``curl``, anything built
for vLLM's OpenAI server) sends HTTP requests here; the gateway is a *client of the router*,
built on the SDK's :class:`preft_client.AsyncPreftClient`: each request becomes one SDK call
(``events``, ``list_adapters``, ``health``) and the answer goes back as OpenAI-shaped JSON or
server-sent events::

    HTTP client ──HTTP/JSON, SSE──> http_gateway ──AsyncPreftClient (gRPC)──> router ──> ...

It is a pure translator: it holds no model, no tokenizer, no KV cache and no adapter; token
ids and text only pass through. Placement, validation of limits (prompt length, token ids,
adapter names) and everything after step 1 stay in the router (``router/server.py``, its Generate path in ``router/generate.py``). It
imports neither torch nor vLLM nor the router's gRPC code; the SDK is its only way in.

Modules, one job each:

- ``schema``: the OpenAI request bodies (parsing, the table of unsupported fields, errors
  that name the field), the chat template, the prompt shapes accepted.
- ``errors``: :class:`GatewayError` (an OpenAI error body with an HTTP status) and the map
  from the SDK's typed errors (gRPC status codes) to HTTP statuses.
- ``gateway``: per-app state, the one :class:`~preft_client.AsyncPreftClient` and the
  translation of a parsed body into an SDK call.
- ``sse``: the one server-sent-event streamer behind both streaming endpoints.
- ``limits``: the request body limit (413 before the body is read).
- ``app``: the FastAPI app (routes, error handlers).
- ``serve``: serving it (uvicorn, TLS, the refusal of an open API on a non-loopback
  address, :class:`HttpGatewayThread`); ``cli``: ``python -m http_gateway``.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both also as SSE with
``stream: true``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``,
``GET /metrics``. The OpenAI ``model`` field is the adapter name (as with vLLM's
``--lora-modules``); the name given by ``--base-model-name`` (default ``base``) means the
base model without an adapter. See ``docs/http.md``.
"""

from http_gateway.app import create_app
from http_gateway.cli import main
from http_gateway.errors import GatewayError
from http_gateway.gateway import Gateway
from http_gateway.schema import ChatCompletionRequest, ChatMessage, CompletionRequest, format_chat
from http_gateway.serve import HttpGatewayThread, check_bind_is_safe, serve_http

__all__ = ["create_app", "serve_http", "HttpGatewayThread", "check_bind_is_safe", "main",
           "Gateway", "GatewayError", "CompletionRequest", "ChatCompletionRequest",
           "ChatMessage", "format_chat"]
