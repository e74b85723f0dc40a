"""Sync and async clients for the ``preft.v1.Router`` gRPC service."""

from __future__ import annotations

from typing import AsyncIterator, Iterator, Sequence

import grpc

from preft_client.errors import from_rpc_error
from preft_client.types import Completion, Delta, Timings, Usage
from proto.preft.v1 import router_pb2 as pb
from proto.preft.v1 import router_pb2_grpc as pb_grpc


def _request(adapter, prompt, prompt_token_ids, max_tokens, temperature, top_p, seed, stop,
             ignore_eos, request_id) -> pb.GenerateRequest:
    if (prompt is None) == (prompt_token_ids is None):
        raise ValueError("give exactly one of prompt or prompt_token_ids")
    sp = pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                           stop=list(stop or ()), ignore_eos=ignore_eos)
    if seed is not None:
        sp.seed = seed
    req = pb.GenerateRequest(adapter=adapter or "", sampling=sp, request_id=request_id or "")
    if prompt is not None:
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt_token_ids)
    return req


class _Collector:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.text: list[str] = []
        self.final = None

    def add(self, msg: pb.GenerateResponse) -> Delta | None:
        if msg.HasField("delta"):
            d = Delta(tuple(msg.delta.token_ids), msg.delta.text)
            self.ids.extend(d.token_ids)
            self.text.append(d.text)
            return d
        self.final = msg.final
        return None

    def completion(self) -> Completion:
        f = self.final
        if f is None:
            raise RuntimeError("stream ended without a final message")
        t = f.timings
        return Completion(
            request_id=f.request_id, token_ids=tuple(self.ids), text="".join(self.text),
            finish_reason=f.finish_reason,
            usage=Usage(f.usage.prompt_tokens, f.usage.completion_tokens),
            timings=Timings(t.queue_s, t.prefill_s, t.kv_transfer_s, t.decode_s, t.ttft_s,
                            t.total_s, t.first_decode_step_s),
            kv_bytes=f.kv.bytes, kv_blocks=f.kv.blocks,
            workers=(f.kv.prefill_worker, f.kv.decode_worker))


class PreftClient:
    """Blocking client. ``PreftClient("127.0.0.1:50051").generate("my-adapter", prompt="Hi")``."""

    def __init__(self, address: str, *, timeout: float | None = 300.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.RouterStub(self._channel)

    def stream(self, adapter: str | None, prompt: str | None = None,
               prompt_token_ids: Sequence[int] | None = None, max_tokens: int = 16,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop: Sequence[str] | None = None, ignore_eos: bool = False,
               request_id: str | None = None) -> Iterator[Delta]:
        req = _request(adapter, prompt, prompt_token_ids, max_tokens, temperature, top_p, seed,
                       stop, ignore_eos, request_id)
        try:
            for msg in self._stub.Generate(req, timeout=self.timeout):
                if msg.HasField("delta"):
                    yield Delta(tuple(msg.delta.token_ids), msg.delta.text)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def generate(self, adapter: str | None, prompt: str | None = None,
                 prompt_token_ids: Sequence[int] | None = None, max_tokens: int = 16,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] | None = None, ignore_eos: bool = False,
                 request_id: str | None = None) -> Completion:
        req = _request(adapter, prompt, prompt_token_ids, max_tokens, temperature, top_p, seed,
                       stop, ignore_eos, request_id)
        col = _Collector()
        try:
            for msg in self._stub.Generate(req, timeout=self.timeout):
                col.add(msg)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return col.completion()

    def list_adapters(self) -> dict[str, int]:
        try:
            resp = self._stub.ListAdapters(pb.ListAdaptersRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return {a.name: a.version for a in resp.adapters}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "PreftClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncPreftClient:
    """asyncio client with the same methods as :class:`PreftClient`."""

    def __init__(self, address: str, *, timeout: float | None = 300.0) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = pb_grpc.RouterStub(self._channel)

    async def stream(self, adapter: str | None, prompt: str | None = None,
                     prompt_token_ids: Sequence[int] | None = None, max_tokens: int = 16,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                     stop: Sequence[str] | None = None, ignore_eos: bool = False,
                     request_id: str | None = None) -> AsyncIterator[Delta]:
        req = _request(adapter, prompt, prompt_token_ids, max_tokens, temperature, top_p, seed,
                       stop, ignore_eos, request_id)
        try:
            async for msg in self._stub.Generate(req, timeout=self.timeout):
                if msg.HasField("delta"):
                    yield Delta(tuple(msg.delta.token_ids), msg.delta.text)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def generate(self, adapter: str | None, prompt: str | None = None,
                       prompt_token_ids: Sequence[int] | None = None, max_tokens: int = 16,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                       stop: Sequence[str] | None = None, ignore_eos: bool = False,
                       request_id: str | None = None) -> Completion:
        req = _request(adapter, prompt, prompt_token_ids, max_tokens, temperature, top_p, seed,
                       stop, ignore_eos, request_id)
        col = _Collector()
        try:
            async for msg in self._stub.Generate(req, timeout=self.timeout):
                col.add(msg)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return col.completion()

    async def list_adapters(self) -> dict[str, int]:
        try:
            resp = await self._stub.ListAdapters(pb.ListAdaptersRequest(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return {a.name: a.version for a in resp.adapters}

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncPreftClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
