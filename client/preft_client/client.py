"""Sync and async clients for the ``preft.v1.Router`` gRPC service.

The two clients share one request/response body (:class:`_Base` and the helpers here): each
call is described once (:class:`_Unary`: the RPC, the request message, how the answer becomes
SDK types; :func:`_request` and :class:`_Collector` for ``Generate``), and a client only runs
it, blocking or on asyncio. Both send ``authorization: Bearer <api_key>`` when given a key
(the client's, or ``api_key=`` on one call), and retry ``UNAVAILABLE`` with exponential
backoff through gRPC's own retry policy (:func:`_retry_options`, a service config on the
channel). gRPC retries a call only until it is committed, that is until the router's first
response arrived: ``generate``/``stream``/``events`` are retried only before their first
token (nothing is delivered twice); an adapter upload is never retried.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from preft_client.errors import IncompleteStream, InvalidArgument, from_rpc_error
from preft_client.types import (AdapterInfo, Completion, Delta, Sample, Timings, TokenLogprob,
                                Usage, WorkerStatus)
from proto.preft.v1 import router_pb2 as pb
from proto.preft.v1 import router_pb2_grpc as pb_grpc

UPLOAD_CHUNK = 1 << 20
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ROUTER_SERVICE = "preft.v1.Router"   # the proto's package and service (proto/preft/v1)
HEALTH_SERVICE = ROUTER_SERVICE      # the name the router's health status is kept under
MAX_RETRIES = 4   # gRPC caps a call at 5 attempts (its retry policy's maxAttempts)
# Message sizes, in bytes, as the router's server has them (cluster.messages keeps the same
# numbers; a unit test keeps them equal): the largest request it accepts, and the largest
# reply message it may send -- the Final with top-20 prompt logprobs of a long prompt
# (~400 bytes per prompt token) is over gRPC's default 4 MiB from ~10k prompt tokens on.
MAX_REQUEST_BYTES = 64 << 20
MAX_REPLY_BYTES = 256 << 20
_OPTIONS = [("grpc.max_send_message_length", MAX_REQUEST_BYTES),
            ("grpc.max_receive_message_length", MAX_REPLY_BYTES)]
_CLIENT_TIMEOUT = object()   # a call's timeout when none is given: the client's


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


def _seconds(s: float) -> str:
    return f"{max(s, 0.001):.3f}s"   # a service config's duration; gRPC wants it above 0


def _retry_options(retries: int, backoff_s: float) -> list[tuple[str, Any]]:
    """Channel options for gRPC's retry policy: up to ``retries`` more attempts of a call
    that fails with ``UNAVAILABLE`` before it is committed (the router's first response),
    waiting about ``backoff_s * 2**(n-1)`` before retry n (gRPC's C core jitters it by 20%).
    Router calls and health checks are retried, uploads never."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0 (0 = no retries), not {retries}")
    if backoff_s < 0:
        raise ValueError(f"backoff_s must be >= 0 seconds, not {backoff_s}")
    if retries == 0:
        return []   # no policy: gRPC accepts one only with maxAttempts >= 2
    policy = {"maxAttempts": retries + 1, "initialBackoff": _seconds(backoff_s),
              "maxBackoff": _seconds(backoff_s * 2 ** (retries - 1)),
              "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}
    config = {"methodConfig": [
        {"name": [{"service": ROUTER_SERVICE}, {"service": "grpc.health.v1.Health"}],
         "retryPolicy": policy},
        # The most specific name wins: an upload (a new version each time) has no policy.
        {"name": [{"service": ROUTER_SERVICE, "method": "RegisterAdapter"}]}]}
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config))]


# --------------------------------------------------------------------------- requests


# Keyword arguments of generate/stream/events beyond the basic ones: vLLM's names and
# meanings, applied identically to the first token (prefill, adapter on) and the rest.
SAMPLING_KNOBS = {
    "top_k": "int >= 0; 0 (or -1) = off",
    "min_p": "float in [0, 1]; 0 = off",
    "repetition_penalty": "float in (0, 10]; 1 = off",
    "presence_penalty": "float in [-2, 2]",
    "frequency_penalty": "float in [-2, 2]",
    "logit_bias": "{token id: bias in [-100, 100]}",
    "min_tokens": "int in [0, max_tokens]",
    "stop_token_ids": "token ids that end the completion (kept in token_ids)",
    "logprobs": "k in [0, 20]: each generated token's logprob and the top k",
    "prompt_logprobs": "k in [0, 20]: each prompt token's logprob (adapter on) and the top k",
    "echo": "bool: Completion.prompt_text carries the prompt's decoding",
    # structured output, at most one (the completion follows it; JSON comes out compact)
    "json_schema": "a JSON schema (dict or JSON text)",
    "regex": "a regular expression",
    "choice": "a list of strings: the completion is one of them",
    "json_object": "True: any JSON object",
    "grammar": "an EBNF grammar",
    "n": "samples of the prompt, 1..16: one prefill, KV moved once (Completion.samples)",
}
_GUIDES = ("json_schema", "regex", "choice", "json_object", "grammar")


def _request(adapter, prompt, prompt_token_ids, max_tokens, temperature, top_p, seed, stop,
             ignore_eos, request_id, **knobs) -> pb.GenerateRequest:
    """The ``GenerateRequest`` of one generate/stream/events call. Raises ``ValueError`` for
    bad arguments, including text protobuf cannot encode (lone surrogates)."""
    if (prompt is None) == (prompt_token_ids is None):
        raise ValueError("give exactly one of prompt or prompt_token_ids")
    unknown = set(knobs) - set(SAMPLING_KNOBS)
    if unknown:
        raise TypeError(f"unknown sampling arguments {sorted(unknown)}; known: "
                        f"{', '.join(SAMPLING_KNOBS)}")
    knobs = {k: v for k, v in knobs.items() if v is not None}
    if knobs.get("top_k") == -1:
        knobs["top_k"] = 0     # vLLM's "off", as the gateway takes it
    _check_unsigned(max_tokens=max_tokens, seed=seed, **knobs)
    guides = {k: knobs.pop(k) for k in _GUIDES if k in knobs}
    sp = pb.SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                           stop=list(stop or ()), ignore_eos=ignore_eos,
                           **{k: v for k, v in knobs.items() if k != "logit_bias"})
    sp.logit_bias.update({int(t): float(b) for t, b in (knobs.get("logit_bias") or {}).items()})
    _set_guide(sp, guides)
    if seed is not None:
        sp.seed = seed
    req = pb.GenerateRequest(adapter=adapter or "", sampling=sp, request_id=request_id or "")
    if prompt is not None:
        req.text = prompt
    else:
        req.token_ids.ids.extend(prompt_token_ids)
    return req


_UNSIGNED = ("max_tokens", "seed", "top_k", "min_tokens", "logprobs", "prompt_logprobs", "n")


def _check_unsigned(**values) -> None:
    """The wire carries these unsigned: a negative one is refused here, as the router would
    refuse it, naming the field. Every other range is the router's to check (one place:
    ``cluster.messages.Sampling.validate``), so the SDK never refuses what it accepts."""
    for name in _UNSIGNED:
        v = values.get(name)
        if isinstance(v, int) and v < 0:
            off = " (0 = off, or -1)" if name == "top_k" else ""
            raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"sampling.{name}: must be >= 0{off}, got {v}")
    for name in ("stop_token_ids", "logit_bias"):
        bad = [t for t in values.get(name) or () if str(t).strip().startswith("-")]
        if bad:
            raise InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"sampling.{name}: token ids must be >= 0, got {bad[0]}")


def _set_guide(sp: pb.SamplingParams, guides: dict) -> None:
    if len(guides) > 1:
        raise ValueError(f"give at most one structured output, got {sorted(guides)}")
    for kind, value in guides.items():
        if kind == "json_schema":
            sp.json_schema = value if isinstance(value, str) else json.dumps(value)
        elif kind == "choice":
            sp.choice.choices.extend(value)
        else:
            setattr(sp, kind, value)


def upload_chunks(name: str, path: str | Path, public: bool,
                  progress: Callable[[int, int], None] | None,
                  kind: str | None = None) -> Iterator[pb.AdapterUploadChunk]:
    """Header, then the PEFT files in 1 MiB chunks; ``progress(sent, total)`` after each.
    ``kind`` (``lora_p``, ``reft_p``, ``lora``, ``alora``): what the files are; None = from the files."""
    path = Path(path)
    files = [path / f for f in ADAPTER_FILES if (path / f).is_file()]
    total = sum(f.stat().st_size for f in files)
    yield pb.AdapterUploadChunk(header=pb.AdapterUploadHeader(name=name, public=public,
                                                              kind=kind or ""))
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


# --------------------------------------------------------------------------- responses


def _adapter_info(a: pb.Adapter) -> AdapterInfo:
    return AdapterInfo(a.name, a.version, a.kind, a.rank, tuple(a.target_modules), a.size_bytes,
                       a.sha256, a.owner, a.public, a.created)


def _adapters(resp: pb.ListAdaptersResponse) -> dict[str, AdapterInfo]:
    return {a.name: _adapter_info(a) for a in resp.adapters}


def _status(resp: pb.ClusterStatusResponse) -> dict:
    return {"workers": [WorkerStatus(w.worker_id, w.role, w.healthy, w.outstanding,
                                     w.kv_blocks_total, w.kv_blocks_free, dict(w.resident),
                                     w.kv_bytes_sent, w.held_transfers,
                                     w.tensor_parallel_size or 1, w.decoding_requests,
                                     w.prefill_adapters, w.max_loras, w.wide_steps)
                        for w in resp.workers],
            "router_inflight": resp.router_inflight, "adapters": resp.adapters,
            "state_stale": resp.state_stale}


def _serving(resp: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def _logprobs(items) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(t.token_id, t.logprob, t.rank,
                              tuple((x.token_id, x.logprob) for x in t.top), t.token,
                              tuple(x.token for x in t.top)) for t in items)


class _Collector:
    """Assembles one ``Generate`` stream: :class:`Delta` per token message, then the
    :class:`Completion` (each sample's text and ids, finish reason, usage, timings)."""

    def __init__(self) -> None:
        self.ids: dict[int, list[int]] = {}
        self.text: dict[int, list[str]] = {}
        self.logprobs: dict[int, list[TokenLogprob]] = {}
        self.final = None

    def add(self, msg: pb.GenerateResponse) -> Delta | None:
        if msg.HasField("delta"):
            m = msg.delta
            d = Delta(tuple(m.token_ids), m.text, _logprobs(m.logprobs), m.index)
            self.ids.setdefault(d.index, []).extend(d.token_ids)
            self.text.setdefault(d.index, []).append(d.text)
            self.logprobs.setdefault(d.index, []).extend(d.logprobs)
            return d
        self.final = msg.final
        return None

    def _samples(self, f) -> tuple[Sample, ...]:
        ends = {e.index: e.finish_reason for e in f.samples}
        return tuple(Sample(i, tuple(self.ids[i]), "".join(self.text[i]),
                            ends.get(i, f.finish_reason), tuple(self.logprobs[i]))
                     for i in sorted(self.ids))

    def completion(self) -> Completion:
        f = self.final
        if f is None:
            raise IncompleteStream(grpc.StatusCode.UNAVAILABLE,
                                   "stream ended without a final message")
        t = f.timings
        samples = self._samples(f)
        s0 = samples[0] if samples else Sample(0, (), "", f.finish_reason)
        return Completion(
            request_id=f.request_id, token_ids=s0.token_ids, text=s0.text,
            finish_reason=f.finish_reason,
            usage=Usage(f.usage.prompt_tokens, f.usage.completion_tokens),
            timings=Timings(t.queue_s, t.prefill_s, t.kv_transfer_s, t.decode_s, t.ttft_s,
                            t.total_s, t.first_decode_step_s, t.route_s, t.to_worker_s,
                            t.worker_s, t.from_worker_s, t.kv_exposed_s),
            kv_bytes=f.kv.bytes, kv_blocks=f.kv.blocks, kv_transport=f.kv.transport,
            kv_pipelined=f.kv.pipelined,
            workers=(f.kv.prefill_worker, f.kv.decode_worker),
            logprobs=s0.logprobs, prompt_logprobs=_logprobs(f.prompt_logprobs),
            prompt_text=f.prompt_text, samples=samples)


# --------------------------------------------------------------------------- the shared body


@dataclass(frozen=True)
class _Unary:
    """One call with one answer, described once for both clients: ``rpc`` on the Router stub
    (or on the health stub), the request (a message, or an iterator of upload chunks), and how
    its answer becomes SDK types."""

    rpc: str
    request: Any
    answer: Callable[[Any], Any]
    health: bool = False


@contextmanager
def _rpc_errors(call=None) -> Iterator[None]:
    """gRPC errors leave as the SDK's typed errors; ``call`` (a stream) is cancelled on the
    way out: a no-op when it finished, and it frees the router's work if the caller left."""
    try:
        yield
    except grpc.RpcError as e:
        raise from_rpc_error(e) from None
    finally:
        if call is not None:
            call.cancel()


class _Base:
    """What both clients share: channel settings (retry policy included), call options, and
    the calls themselves; a client only runs them (:meth:`_unary`, :meth:`_events`)."""

    _grpc: Any = grpc   # the module that makes channels: grpc or grpc.aio

    def __init__(self, address: str, api_key: str | None, timeout: float | None,
                 retries: int, backoff_s: float, wait_for_ready: bool, tls: bool,
                 tls_ca, tls_cert, tls_key, tls_server_name) -> None:
        self.address = address
        self.timeout = timeout
        self.retries = min(retries, MAX_RETRIES)
        self.backoff_s = backoff_s
        self.wait_for_ready = wait_for_ready
        self._api_key = api_key
        retry = _retry_options(self.retries, backoff_s)
        # Validated and PEM files read now: bad TLS options fail here, not on the first call.
        self._creds, self._options = _channel_args(address, tls, tls_ca, tls_cert, tls_key,
                                                   tls_server_name)
        self._options += retry
        self._channel = None
        self._stubs: tuple[pb_grpc.RouterStub, health_pb2_grpc.HealthStub] | None = None

    def _open(self) -> tuple[pb_grpc.RouterStub, health_pb2_grpc.HealthStub]:
        if self._channel is None:
            g = self._grpc
            self._channel = (g.insecure_channel(self.address, options=self._options)
                             if self._creds is None else
                             g.secure_channel(self.address, self._creds, options=self._options))
            self._stubs = (pb_grpc.RouterStub(self._channel),
                           health_pb2_grpc.HealthStub(self._channel))
        return self._stubs

    @property
    def _stub(self) -> pb_grpc.RouterStub:
        return self._open()[0]

    def _kw(self, api_key: str | None, timeout=_CLIENT_TIMEOUT) -> dict:
        """gRPC call options: deadline, ``authorization`` metadata, wait-for-ready."""
        key = self._api_key if api_key is None else api_key
        return {"timeout": self.timeout if timeout is _CLIENT_TIMEOUT else timeout,
                "metadata": (("authorization", f"Bearer {key}"),) if key else None,
                "wait_for_ready": True if self.wait_for_ready else None}

    def _method(self, call: _Unary):
        router, health = self._open()
        return getattr(health if call.health else router, call.rpc)

    def _generate(self, req: pb.GenerateRequest, api_key: str | None):
        """The ``Generate`` call of one request; ``cancel()`` it when leaving early."""
        return self._stub.Generate(req, **self._kw(api_key))

    # The calls, described once.
    @staticmethod
    def _list_adapters() -> _Unary:
        return _Unary("ListAdapters", pb.ListAdaptersRequest(), _adapters)

    @staticmethod
    def _get_adapter(name: str) -> _Unary:
        return _Unary("GetAdapter", pb.GetAdapterRequest(name=name), _adapter_info)

    @staticmethod
    def _delete_adapter(name: str) -> _Unary:
        return _Unary("DeleteAdapter", pb.DeleteAdapterRequest(name=name), lambda r: r.deleted)

    @staticmethod
    def _cluster_status() -> _Unary:
        return _Unary("ClusterStatus", pb.ClusterStatusRequest(), _status)

    @staticmethod
    def _health() -> _Unary:
        return _Unary("Check", health_pb2.HealthCheckRequest(service=HEALTH_SERVICE), _serving,
                      health=True)

    @staticmethod
    def _register_adapter(name, path, public, kind, progress) -> _Unary:
        return _Unary("RegisterAdapter", upload_chunks(name, path, public, progress, kind),
                      _adapter_info)


# --------------------------------------------------------------------------- blocking client


class PreftClient(_Base):
    """Blocking client. ``PreftClient("127.0.0.1:50051").generate("my-adapter", prompt="Hi")``.

    Every call takes ``api_key=`` to use another key than the client's for that call."""

    def __init__(self, address: str, *, api_key: str | None = None,
                 timeout: float | None = 300.0, retries: int = 3, backoff_s: float = 0.2,
                 wait_for_ready: bool = False, tls: bool = False,
                 tls_ca: str | Path | bytes | None = None,
                 tls_cert: str | Path | bytes | None = None,
                 tls_key: str | Path | bytes | None = None,
                 tls_server_name: str | None = None) -> None:
        """``timeout``: each call's deadline, its retries included. ``retries``: how many times
        a call that failed with ``UNAVAILABLE`` before the router's first response is tried
        again (0 = never; gRPC allows at most 4, more counts as 4), ``backoff_s`` the wait
        before the first retry (doubling each retry). ``tls=True`` (or any ``tls_*``) connects
        over TLS: ``tls_ca`` verifies the router's certificate (default: system roots),
        ``tls_cert``/``tls_key`` are this client's certificate for mutual TLS,
        ``tls_server_name`` the name to check the certificate against when it differs from
        the address's host. ``wait_for_ready``: calls wait (up to ``timeout``) for the router
        to come up instead of failing at once."""
        super().__init__(address, api_key, timeout, retries, backoff_s, wait_for_ready, tls,
                         tls_ca, tls_cert, tls_key, tls_server_name)
        self._open()

    def _unary(self, call: _Unary, api_key: str | None = None, **kw):
        with _rpc_errors():
            return call.answer(self._method(call)(call.request, **self._kw(api_key, **kw)))

    def _events(self, req: pb.GenerateRequest, api_key: str | None, deltas: bool = True,
                final: bool = True) -> Iterator[Delta | Completion]:
        """Runs one ``Generate``: its :class:`Delta` items (``deltas``), then its
        :class:`Completion` (``final``)."""
        col, call = _Collector(), self._generate(req, api_key)
        with _rpc_errors(call):
            for msg in call:
                if (d := col.add(msg)) is not None and deltas:
                    yield d
        if final:
            yield col.completion()

    def events(self, adapter: str | None, prompt: str | None = None,
               prompt_token_ids: Sequence[int] | None = None, max_tokens: int = 16,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop: Sequence[str] | None = None, ignore_eos: bool = False,
               request_id: str | None = None, *,
               api_key: str | None = None, **knobs: Any) -> Iterator[Delta | Completion]:
        """:class:`Delta` items as they arrive, then the :class:`Completion` (finish reason,
        usage, timings, whole text). Bad arguments raise ``ValueError`` here, at the call."""
        req = _request(adapter, prompt, prompt_token_ids, max_tokens, temperature, top_p, seed,
                       stop, ignore_eos, request_id, **knobs)
        return self._events(req, api_key)

    def stream(self, adapter: str | None, prompt: str | None = None,
               prompt_token_ids: Sequence[int] | None = None, max_tokens: int = 16,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop: Sequence[str] | None = None, ignore_eos: bool = False,
               request_id: str | None = None, *, api_key: str | None = None,
               **knobs: Any) -> Iterator[Delta]:
        req = _request(adapter, prompt, prompt_token_ids, max_tokens, temperature, top_p, seed,
                       stop, ignore_eos, request_id, **knobs)
        return self._events(req, api_key, final=False)

    def generate(self, adapter: str | None, prompt: str | None = None,
                 prompt_token_ids: Sequence[int] | None = None, max_tokens: int = 16,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] | None = None, ignore_eos: bool = False,
                 request_id: str | None = None, *, api_key: str | None = None,
                 **knobs: Any) -> Completion:
        req = _request(adapter, prompt, prompt_token_ids, max_tokens, temperature, top_p, seed,
                       stop, ignore_eos, request_id, **knobs)
        return next(self._events(req, api_key, deltas=False))

    def register_adapter(self, name: str, path: str | Path, *, public: bool = False,
                         kind: str | None = None,
                         progress: Callable[[int, int], None] | None = None,
                         api_key: str | None = None) -> AdapterInfo:
        """Upload a PEFT adapter directory; other files under a name make a new version,
        files identical to its current version return that version.
        ``kind``: ``lora_p``, ``reft_p``, ``lora`` (all-token) or ``alora`` (activated LoRA); None = from the files."""
        return self._unary(self._register_adapter(name, path, public, kind, progress), api_key)

    def list_adapters(self, *, api_key: str | None = None) -> dict[str, AdapterInfo]:
        return self._unary(self._list_adapters(), api_key)

    def get_adapter(self, name: str, *, api_key: str | None = None) -> AdapterInfo:
        return self._unary(self._get_adapter(name), api_key)

    def delete_adapter(self, name: str, *, api_key: str | None = None) -> bool:
        return self._unary(self._delete_adapter(name), api_key)

    def cluster_status(self, *, api_key: str | None = None) -> dict:
        return self._unary(self._cluster_status(), api_key)

    def health(self, *, timeout: float | None = 5.0) -> str:
        """The router's gRPC health status (``"SERVING"``, ``"NOT_SERVING"``, ...)."""
        return self._unary(self._health(), timeout=timeout)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self) -> "PreftClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- asyncio client


class AsyncPreftClient(_Base):
    """asyncio client with the same methods as :class:`PreftClient` (coroutines; ``stream``
    and ``events`` return async iterators). It may be built outside a running event loop:
    its channel opens on the first call, on that call's loop, and again after ``close()``."""

    _grpc = grpc.aio

    def __init__(self, address: str, *, api_key: str | None = None,
                 timeout: float | None = 300.0, retries: int = 3, backoff_s: float = 0.2,
                 wait_for_ready: bool = False, tls: bool = False,
                 tls_ca: str | Path | bytes | None = None,
                 tls_cert: str | Path | bytes | None = None,
                 tls_key: str | Path | bytes | None = None,
                 tls_server_name: str | None = None) -> None:
        """The options of :class:`PreftClient`, the same way."""
        super().__init__(address, api_key, timeout, retries, backoff_s, wait_for_ready, tls,
                         tls_ca, tls_cert, tls_key, tls_server_name)

    async def _unary(self, call: _Unary, api_key: str | None = None, **kw):
        with _rpc_errors():
            return call.answer(await self._method(call)(call.request, **self._kw(api_key, **kw)))

    async def _events(self, req: pb.GenerateRequest, api_key: str | None, deltas: bool = True,
                      final: bool = True) -> AsyncIterator[Delta | Completion]:
        """Runs one ``Generate`` on asyncio, as :meth:`PreftClient._events` does."""
        col, call = _Collector(), self._generate(req, api_key)
        with _rpc_errors(call):
            async for msg in call:
                if (d := col.add(msg)) is not None and deltas:
                    yield d
        if final:
            yield col.completion()

    def events(self, adapter: str | None, prompt: str | None = None,
               prompt_token_ids: Sequence[int] | None = None, max_tokens: int = 16,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop: Sequence[str] | None = None, ignore_eos: bool = False,
               request_id: str | None = None, *,
               api_key: str | None = None, **knobs: Any) -> AsyncIterator[Delta | Completion]:
        """:class:`Delta` items as they arrive, then the :class:`Completion`. Bad arguments
        raise ``ValueError`` here, at the call; the RPC starts on the first ``__anext__``."""
        req = _request(adapter, prompt, prompt_token_ids, max_tokens, temperature, top_p, seed,
                       stop, ignore_eos, request_id, **knobs)
        return self._events(req, api_key)

    def stream(self, adapter: str | None, prompt: str | None = None,
               prompt_token_ids: Sequence[int] | None = None, max_tokens: int = 16,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
               stop: Sequence[str] | None = None, ignore_eos: bool = False,
               request_id: str | None = None, *,
               api_key: str | None = None, **knobs: Any) -> AsyncIterator[Delta]:
        req = _request(adapter, prompt, prompt_token_ids, max_tokens, temperature, top_p, seed,
                       stop, ignore_eos, request_id, **knobs)
        return self._events(req, api_key, final=False)

    async def generate(self, adapter: str | None, prompt: str | None = None,
                       prompt_token_ids: Sequence[int] | None = None, max_tokens: int = 16,
                       temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                       stop: Sequence[str] | None = None, ignore_eos: bool = False,
                       request_id: str | None = None, *,
                       api_key: str | None = None, **knobs: Any) -> Completion:
        req = _request(adapter, prompt, prompt_token_ids, max_tokens, temperature, top_p, seed,
                       stop, ignore_eos, request_id, **knobs)
        events = self._events(req, api_key, deltas=False)
        try:
            return await anext(events)
        finally:
            await events.aclose()

    async def register_adapter(self, name: str, path: str | Path, *, public: bool = False,
                               kind: str | None = None,
                               progress: Callable[[int, int], None] | None = None,
                               api_key: str | None = None) -> AdapterInfo:
        return await self._unary(self._register_adapter(name, path, public, kind, progress),
                                 api_key)

    async def list_adapters(self, *, api_key: str | None = None) -> dict[str, AdapterInfo]:
        return await self._unary(self._list_adapters(), api_key)

    async def get_adapter(self, name: str, *, api_key: str | None = None) -> AdapterInfo:
        return await self._unary(self._get_adapter(name), api_key)

    async def delete_adapter(self, name: str, *, api_key: str | None = None) -> bool:
        return await self._unary(self._delete_adapter(name), api_key)

    async def cluster_status(self, *, api_key: str | None = None) -> dict:
        return await self._unary(self._cluster_status(), api_key)

    async def health(self, *, timeout: float | None = 5.0) -> str:
        """The router's gRPC health status (``"SERVING"``, ``"NOT_SERVING"``, ...)."""
        return await self._unary(self._health(), timeout=timeout)

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def __aenter__(self) -> "AsyncPreftClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
