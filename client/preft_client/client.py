"""Sync and async clients for the ``preft.v1.Router`` gRPC service.

Both send ``authorization: Bearer <api_key>`` when given a key, and retry ``UNAVAILABLE``
with exponential backoff where that is safe: read-only calls always, ``generate``/``stream``
only before the first token arrived (nothing was delivered twice).
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator, Sequence

import grpc

from preft_client.errors import Unavailable, from_rpc_error
from preft_client.types import AdapterInfo, Completion, Delta, Timings, Usage, WorkerStatus
from proto.preft.v1 import router_pb2 as pb
from proto.preft.v1 import router_pb2_grpc as pb_grpc

UPLOAD_CHUNK = 1 << 20
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_OPTIONS = [("grpc.max_send_message_length", 64 << 20)]


def _pem(value: str | Path | bytes | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).expanduser().read_bytes()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {str(value)!r}: {e.strerror}") from None


def _channel_args(address: str, tls: bool, tls_ca, tls_cert, tls_key, tls_server_name):
    """(credentials or None for plaintext, channel options). ``tls_ca`` (PEM file or bytes)
    is the CA that signed the router's certificate; without it, TLS uses the system roots.
    ``tls_cert``/``tls_key``: this client's certificate for mutual TLS."""
    options = list(_OPTIONS)
    if not (tls or tls_ca is not None or tls_cert is not None):
        if tls_key is not None or tls_server_name is not None:
            raise ValueError("tls_key/tls_server_name need TLS (tls=True, tls_ca or tls_cert)")
        return None, options
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("tls_cert and tls_key must be given together (mutual TLS)")
    if address.startswith("unix:"):
        raise ValueError(f"{address}: the router's local socket is plaintext; drop the TLS options")
    creds = grpc.ssl_channel_credentials(root_certificates=_pem(tls_ca, "tls_ca"),
                                         private_key=_pem(tls_key, "tls_key"),
                                         certificate_chain=_pem(tls_cert, "tls_cert"))
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return creds, options


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


def _adapter_info(a: pb.Adapter) -> AdapterInfo:
    return AdapterInfo(a.name, a.version, a.kind, a.rank, tuple(a.target_modules), a.size_bytes,
                       a.sha256, a.owner, a.public, a.created)


def _status(resp: pb.ClusterStatusResponse) -> dict:
    return {"workers": [WorkerStatus(w.worker_id, w.role, w.healthy, w.outstanding,
                                     w.kv_blocks_total, w.kv_blocks_free, dict(w.resident),
                                     w.kv_bytes_sent, w.held_transfers) for w in resp.workers],
            "router_inflight": resp.router_inflight, "adapters": resp.adapters,
            "state_stale": resp.state_stale}


def upload_chunks(name: str, path: str | Path, public: bool,
                  progress: Callable[[int, int], None] | None) -> Iterator[pb.AdapterUploadChunk]:
    """Header, then the PEFT files in 1 MiB chunks; ``progress(sent, total)`` after each."""
    path = Path(path)
    files = [path / f for f in ADAPTER_FILES if (path / f).is_file()]
    total = sum(f.stat().st_size for f in files)
    yield pb.AdapterUploadChunk(header=pb.AdapterUploadHeader(name=name, public=public))
    sent = 0
    for f in files:
        with f.open("rb") as fh:
            for data in iter(lambda: fh.read(UPLOAD_CHUNK), b""):
                yield pb.AdapterUploadChunk(chunk=pb.AdapterFileChunk(filename=f.name, data=data))
                sent += len(data)
                if progress:
                    progress(sent, total)
    for f in path.iterdir() if path.is_dir() else ():
        if f.is_file() and f.name not in ADAPTER_FILES and f.suffix in (".bin", ".pt", ".pth",
                                                                          ".pkl", ".pickle"):
            # Send pickle files too, so the server can say why they are refused.
            yield pb.AdapterUploadChunk(chunk=pb.AdapterFileChunk(filename=f.name, data=b""))


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
            raise Unavailable(grpc.StatusCode.UNAVAILABLE, "stream ended without a final message")
        t = f.timings
        return Completion(
            request_id=f.request_id, token_ids=tuple(self.ids), text="".join(self.text),
            finish_reason=f.finish_reason,
            usage=Usage(f.usage.prompt_tokens, f.usage.completion_tokens),
            timings=Timings(t.queue_s, t.prefill_s, t.kv_transfer_s, t.decode_s, t.ttft_s,
                            t.total_s, t.first_decode_step_s),
            kv_bytes=f.kv.bytes, kv_blocks=f.kv.blocks,
            workers=(f.kv.prefill_worker, f.kv.decode_worker))


class _Base:
    def __init__(self, address: str, api_key: str | None, timeout: float | None,
                 retries: int, backoff_s: float) -> None:
        self.address = address
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self._md = (("authorization", f"Bearer {api_key}"),) if api_key else None

    def _delay(self, attempt: int) -> float:
        return self.backoff_s * (2 ** attempt) * (0.5 + random.random())


class PreftClient(_Base):
    """Blocking client. ``PreftClient("127.0.0.1:50051").generate("my-adapter", prompt="Hi")``."""

    def __init__(self, address: str, *, api_key: str | None = None,
                 timeout: float | None = 300.0, retries: int = 3, backoff_s: float = 0.2,
                 tls: bool = False, tls_ca: str | Path | bytes | None = None,
                 tls_cert: str | Path | bytes | None = None,
                 tls_key: str | Path | bytes | None = None,
                 tls_server_name: str | None = None) -> None:
        """``tls=True`` (or any ``tls_*``) connects over TLS: ``tls_ca`` verifies the router's
        certificate (default: system roots), ``tls_cert``/``tls_key`` are this client's
        certificate for mutual TLS, ``tls_server_name`` the name to check the certificate
        against when it differs from the address's host."""
        super().__init__(address, api_key, timeout, retries, backoff_s)
        creds, options = _channel_args(address, tls, tls_ca, tls_cert, tls_key, tls_server_name)
        self._channel = (grpc.insecure_channel(address, options=options) if creds is None
                         else grpc.secure_channel(address, creds, options=options))
        self._stub = pb_grpc.RouterStub(self._channel)

    def _unary(self, method, req):
        for attempt in range(self.retries + 1):
            try:
                return method(req, timeout=self.timeout, metadata=self._md)
            except grpc.RpcError as e:
                err = from_rpc_error(e)
                if not isinstance(err, Unavailable) or attempt == self.retries:
                    raise err from None
                time.sleep(self._delay(attempt))

    def _responses(self, req: pb.GenerateRequest) -> Iterator[pb.GenerateResponse]:
        for attempt in range(self.retries + 1):
            started = False
            try:
                for msg in self._stub.Generate(req, timeout=self.timeout, metadata=self._md):
                    started = True
                    yield msg
                return
            except grpc.RpcError as e:
                err = from_rpc_error(e)
                if started or not isinstance(err, Unavailable) or attempt == self.retries:
                    raise err from None
                time.sleep(self._delay(attempt))

    def stream(self, adapter: str | None, prompt: str | None = None,
               prompt_token_ids: Sequence[int] | None = None, max_tokens: int = 16,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop: Sequence[str] | None = None, ignore_eos: bool = False,
               request_id: str | None = None) -> Iterator[Delta]:
        req = _request(adapter, prompt, prompt_token_ids, max_tokens, temperature, top_p, seed,
                       stop, ignore_eos, request_id)
        for msg in self._responses(req):
            if msg.HasField("delta"):
                yield Delta(tuple(msg.delta.token_ids), msg.delta.text)

    def generate(self, adapter: str | None, prompt: str | None = None,
                 prompt_token_ids: Sequence[int] | None = None, max_tokens: int = 16,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] | None = None, ignore_eos: bool = False,
                 request_id: str | None = None) -> Completion:
        req = _request(adapter, prompt, prompt_token_ids, max_tokens, temperature, top_p, seed,
                       stop, ignore_eos, request_id)
        col = _Collector()
        for msg in self._responses(req):
            col.add(msg)
        return col.completion()

    def register_adapter(self, name: str, path: str | Path, *, public: bool = False,
                         progress: Callable[[int, int], None] | None = None) -> AdapterInfo:
        """Upload a PEFT adapter directory; a second upload of a name is a new version."""
        try:
            a = self._stub.RegisterAdapter(upload_chunks(name, path, public, progress),
                                           timeout=self.timeout, metadata=self._md)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return _adapter_info(a)

    def list_adapters(self) -> dict[str, AdapterInfo]:
        resp = self._unary(self._stub.ListAdapters, pb.ListAdaptersRequest())
        return {a.name: _adapter_info(a) for a in resp.adapters}

    def get_adapter(self, name: str) -> AdapterInfo:
        return _adapter_info(self._unary(self._stub.GetAdapter, pb.GetAdapterRequest(name=name)))

    def delete_adapter(self, name: str) -> bool:
        return self._unary(self._stub.DeleteAdapter, pb.DeleteAdapterRequest(name=name)).deleted

    def cluster_status(self) -> dict:
        return _status(self._unary(self._stub.ClusterStatus, pb.ClusterStatusRequest()))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "PreftClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncPreftClient(_Base):
    """asyncio client with the same methods as :class:`PreftClient`."""

    def __init__(self, address: str, *, api_key: str | None = None,
                 timeout: float | None = 300.0, retries: int = 3, backoff_s: float = 0.2,
                 tls: bool = False, tls_ca: str | Path | bytes | None = None,
                 tls_cert: str | Path | bytes | None = None,
                 tls_key: str | Path | bytes | None = None,
                 tls_server_name: str | None = None) -> None:
        super().__init__(address, api_key, timeout, retries, backoff_s)
        creds, options = _channel_args(address, tls, tls_ca, tls_cert, tls_key, tls_server_name)
        self._channel = (grpc.aio.insecure_channel(address, options=options) if creds is None
                         else grpc.aio.secure_channel(address, creds, options=options))
        self._stub = pb_grpc.RouterStub(self._channel)

    async def _unary(self, method, req):
        for attempt in range(self.retries + 1):
            try:
                return await method(req, timeout=self.timeout, metadata=self._md)
            except grpc.RpcError as e:
                err = from_rpc_error(e)
                if not isinstance(err, Unavailable) or attempt == self.retries:
                    raise err from None
                await asyncio.sleep(self._delay(attempt))

    async def _responses(self, req: pb.GenerateRequest) -> AsyncIterator[pb.GenerateResponse]:
        for attempt in range(self.retries + 1):
            started = False
            try:
                async for msg in self._stub.Generate(req, timeout=self.timeout, metadata=self._md):
                    started = True
                    yield msg
                return
            except grpc.RpcError as e:
                err = from_rpc_error(e)
                if started or not isinstance(err, Unavailable) or attempt == self.retries:
                    raise err from None
                await asyncio.sleep(self._delay(attempt))

    async def stream(self, adapter: str | None, prompt: str | None = None,
                     prompt_token_ids: Sequence[int] | None = None, max_tokens: int = 16,
                     temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                     stop: Sequence[str] | None = None, ignore_eos: bool = False,
                     request_id: str | None = None) -> AsyncIterator[Delta]:
        req = _request(adapter, prompt, prompt_token_ids, max_tokens, temperature, top_p, seed,
                       stop, ignore_eos, request_id)
        async for msg in self._responses(req):
            if msg.HasField("delta"):
                yield Delta(tuple(msg.delta.token_ids), msg.delta.text)

    async def generate(self, adapter: str | None, prompt: str | None = None,
                       prompt_token_ids: Sequence[int] | None = None, max_tokens: int = 16,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                       stop: Sequence[str] | None = None, ignore_eos: bool = False,
                       request_id: str | None = None) -> Completion:
        req = _request(adapter, prompt, prompt_token_ids, max_tokens, temperature, top_p, seed,
                       stop, ignore_eos, request_id)
        col = _Collector()
        async for msg in self._responses(req):
            col.add(msg)
        return col.completion()

    async def register_adapter(self, name: str, path: str | Path, *, public: bool = False,
                               progress: Callable[[int, int], None] | None = None) -> AdapterInfo:
        try:
            a = await self._stub.RegisterAdapter(upload_chunks(name, path, public, progress),
                                                 timeout=self.timeout, metadata=self._md)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return _adapter_info(a)

    async def list_adapters(self) -> dict[str, AdapterInfo]:
        resp = await self._unary(self._stub.ListAdapters, pb.ListAdaptersRequest())
        return {a.name: _adapter_info(a) for a in resp.adapters}

    async def get_adapter(self, name: str) -> AdapterInfo:
        return _adapter_info(await self._unary(self._stub.GetAdapter,
                                               pb.GetAdapterRequest(name=name)))

    async def delete_adapter(self, name: str) -> bool:
        resp = await self._unary(self._stub.DeleteAdapter, pb.DeleteAdapterRequest(name=name))
        return resp.deleted

    async def cluster_status(self) -> dict:
        return _status(await self._unary(self._stub.ClusterStatus, pb.ClusterStatusRequest()))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncPreftClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
