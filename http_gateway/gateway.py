"""Per-app state: the gateway's one :class:`~preft_client.AsyncPreftClient` to the router,
and the translation of a parsed OpenAI body into an SDK call.

Standalone (``python -m http_gateway``) the client is built with the app (so bad TLS
options fail at once) but opens its channel on the first request, on the server's event
loop, and closes it when the app shuts down. Inside the router's process (``preft up
--http-port``) it is the SDK's :class:`~preft_client.local.InProcessClient`, which calls the
router's ``Generate`` directly: no gRPC hop. Either way it never retries: a refusal or an
unavailable router is answered to the HTTP caller at once.
"""

from __future__ import annotations

import time
from typing import AsyncIterator

from preft_client import (DEFAULT_CHAT, AdapterInfo, AsyncPreftClient, ChatTemplate, Completion,
                          Delta, PreftClientError)

from http_gateway.errors import GatewayError, gateway_error
from http_gateway.schema import Sampling

DEFAULT_MAX_TOKENS = 16
DEFAULT_TIMEOUT_S = 300.0
OWNER = "preft"
_TLS_KEYS = ("tls_ca", "tls_cert", "tls_key", "tls_server_name")


class Gateway:
    """What every HTTP request of one app shares: the SDK client and the settings."""

    def __init__(self, router_address: str, base_model_name: str, timeout: float | None,
                 default_max_tokens: int, router_tls: dict | None = None,
                 client: AsyncPreftClient | None = None,
                 chat_template: ChatTemplate = DEFAULT_CHAT) -> None:
        self.router_address = router_address
        self.chat_template = chat_template   # the model's (preft_client.chat), as preft train
        self.base_model_name = base_model_name
        self.timeout = timeout
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        tls = {"tls": True, **{k: router_tls.get(k) for k in _TLS_KEYS}} if router_tls else {}
        self.client_options = dict(timeout=timeout, retries=0, **tls)
        self.in_process = client is not None
        self.client = client or AsyncPreftClient(router_address, **self.client_options)

    def probe_client(self, timeout: float) -> AsyncPreftClient:
        """A separate client that waits up to ``timeout`` for the router to come up (in the
        router's process: the in-process client, the router is up)."""
        if self.in_process:
            return self.client
        return AsyncPreftClient(self.router_address,
                                **{**self.client_options, "timeout": timeout,
                                   "wait_for_ready": True})

    async def close(self) -> None:
        await self.client.close()

    # ------------------------------------------------------------ generation
    def adapter_for(self, model: str | None) -> str:
        if model is None or model == "" or model == self.base_model_name:
            return ""
        return model

    def events(self, body: Sampling, rid: str, *, text: str | None = None,
               token_ids: list[int] | None = None, max_tokens: int | None = None,
               api_key: str | None = None) -> AsyncIterator[Delta | Completion]:
        """The router's answer to ``body`` as SDK items: deltas, then the completion. The
        request is built here, so a body protobuf cannot encode is a 400 before any call."""
        mt = max_tokens if max_tokens is not None else body.max_tokens
        try:
            return self.client.events(
                self.adapter_for(body.model), prompt=text, prompt_token_ids=token_ids,
                max_tokens=mt if mt is not None else self.default_max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed,
                stop=body.stop_list(), ignore_eos=body.ignore_eos, request_id=rid,
                api_key=api_key, **body.knobs(), **body.answer_knobs(), **body.guide())
        except ValueError as e:  # e.g. lone surrogates: not encodable as UTF-8 for protobuf
            raise GatewayError(400, f"request cannot be encoded: {e}") from None
        except PreftClientError as e:   # the SDK's own refusal (INVALID_ARGUMENT)
            raise gateway_error(e) from None

    @staticmethod
    async def complete(items: AsyncIterator[Delta | Completion]) -> Completion:
        """Run ``items`` to its end: the completion (its last item)."""
        last = None
        try:
            async for last in items:
                pass
        except PreftClientError as e:
            raise gateway_error(e) from None
        return last

    # ------------------------------------------------------------ models, health
    async def adapters(self, api_key: str | None) -> dict[str, AdapterInfo]:
        try:
            return await self.client.list_adapters(api_key=api_key)
        except PreftClientError as e:
            raise gateway_error(e) from None

    def model_card(self, name: str, adapter: AdapterInfo | None = None) -> dict:
        """The OpenAI model object; an adapter's also carries its version and ``preft_kind``
        (``lora_p``, ``reft_p``, ``lora``) when the router reports one."""
        card = {"id": name, "object": "model", "created": self.created, "owned_by": OWNER,
                "root": name, "parent": None if name == self.base_model_name else
                self.base_model_name}
        if adapter is not None:
            card["version"] = adapter.version
            if adapter.kind:
                card["preft_kind"] = adapter.kind
        return card

    async def check_health(self) -> None:
        """Raises a 503 unless the router's health service answers SERVING."""
        try:
            status = await self.client.health(timeout=5)
        except PreftClientError as e:
            raise GatewayError(503, f"router {self.router_address} does not answer: "
                                    f"{e}") from None
        if status != "SERVING":
            raise GatewayError(503, f"router {self.router_address} is not serving ({status})")
