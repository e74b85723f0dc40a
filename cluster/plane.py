"""The worker plane's shared ground: keys, limits and typed messages (steps 2-6 of the path).

Every call the router makes on a request's token path -- a prefill (step 3), a decode
stream (step 5), a colocated stream (steps 3-5) -- goes over one ZeroMQ connection per
worker (``router/plane.py`` → ``worker_runtime/plane.py``), not over Ray. This module holds
what both ends agree on and imports nothing above ``cluster``:

- **authentication, both ways**: ZeroMQ's CURVE handshake under one keypair derived from
  the cluster's secret (:func:`plane_keys`). The worker's socket is the CURVE server and
  admits only clients that prove the derived key (its ZAP handler); the router's socket
  names the same key as the server's, so a worker that does not hold the secret fails the
  handshake. Messages are encrypted on the way.
- **sizes first**: a receiving socket drops a peer that sends a frame over
  :data:`HARD_LIMIT` (``ZMQ_MAXMSGSIZE``, before anything is parsed, the handshake
  included); each call's body is checked against the call's limit before it is decoded,
  and a sender checks its own messages, so an oversized call or answer fails that call
  alone.
- **liveness**: a closed connection is noticed at once (ZeroMQ's disconnect event); a
  silent one after :data:`PEER_SILENT_S` (ZMTP heartbeats, and the router's heartbeat
  frames the worker watches).
- **messages**: frames, never hand-written framing. Router → worker:
  ``[b"C", header, body]`` a call (header: msgpack ``[call id, op, answer limit]``; body:
  the op's typed message), ``[b"X", call id]`` a cancel, ``[b"H"]`` a heartbeat.
  Worker → router: ``[b"S", body]``, one :class:`Step` per engine step (or per event-loop
  turn): every call's new items, its end or its error. Each item's body is msgpack of its
  own (``msgspec.Raw``), so a malformed item fails its own call and no other.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

import msgspec

from cluster.errors import MessageTooLarge, PreftError

DEFAULT_LIMIT = 64 << 20        # bytes of one call's body or one answer item
HARD_LIMIT = 256 << 20          # ZMQ_MAXMSGSIZE: a peer sending a larger frame is dropped
HEARTBEAT_S = 1.0               # router -> worker; ZMTP heartbeats on both sockets too
# A peer that stops answering without closing (paused, partitioned) is given up after this
# long: the router fails its calls and marks it dead, the worker cancels a silent router's
# calls. A peer that dies closes its connection and is noticed at once. Long enough that a
# worker paused for a few seconds (a stalled KV pull, a GC pause) finishes its requests.
PEER_SILENT_S = 15.0

CALL, CANCEL, HEARTBEAT, STEP = b"C", b"X", b"H", b"S"
GRPC_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE", "RESOURCE_EXHAUSTED",
              "UNAUTHENTICATED", "PERMISSION_DENIED", "FAILED_PRECONDITION",
              "DEADLINE_EXCEEDED", "INTERNAL")


def plane_keys(secret: str, label: bytes = b"preft-plane-curve-v1") -> tuple[bytes, bytes]:
    """The CURVE keypair (Z85 public, Z85 secret) both ends derive from the cluster secret;
    ``label`` names the plane (the KV control plane derives its own pair)."""
    import zmq
    from zmq.utils import z85

    if not secret:
        raise ValueError("the worker plane needs the cluster's secret (TransferConfig.secret / "
                         "ColocatedConfig.secret / RouterConfig.secret); it is empty")
    raw = hmac.new(secret.encode(), label, hashlib.sha256).digest()
    private = z85.encode(raw)
    return zmq.curve_public(private), private


class PlaneError(ValueError):
    """A frame or message that failed its checks (answered, never trusted)."""


class RemoteError(PreftError):
    """An error a worker answered a call with: its status code and message."""

    def __init__(self, message: str, grpc_code: str = "INTERNAL") -> None:
        super().__init__(message)
        self.grpc_code = grpc_code if grpc_code in GRPC_CODES else "INTERNAL"


@dataclass(frozen=True)
class CallError:
    """Why a call failed, as the worker tells it."""

    grpc_code: str
    message: str
    type: str = ""

    def exception(self) -> RemoteError:
        return RemoteError(self.message[:4096], self.grpc_code)

    @classmethod
    def of(cls, e: BaseException) -> "CallError":
        if isinstance(e, PreftError):
            return cls(e.grpc_code, e.message, type(e).__name__)
        return cls("INTERNAL", f"{type(e).__name__}: {e}", type(e).__name__)


@dataclass(frozen=True)
class Step:
    """What a worker sends once per engine step (or event-loop turn), for every call it
    advanced: ``items`` (call id, one typed item: a delta of a stream, the result of a
    unary call), then ``ends`` (calls finished after their items) and ``errors``."""

    items: tuple[tuple[int, msgspec.Raw], ...] = ()
    ends: tuple[int, ...] = ()
    errors: tuple[tuple[int, CallError], ...] = ()


@dataclass(frozen=True)
class Header:
    call: int
    op: str
    limit: int = DEFAULT_LIMIT     # the caller's limit on each answer item of this call


ENCODER = msgspec.msgpack.Encoder()
HEADER = msgspec.msgpack.Decoder(Header)
STEP_DECODER = msgspec.msgpack.Decoder(Step)
CALL_ID = msgspec.msgpack.Decoder(int)


def decoder(cls: type) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(cls)


def decode(dec: msgspec.msgpack.Decoder, raw: bytes | msgspec.Raw, limit: int, what: str):
    """A typed message, size-checked before parsing (:class:`MessageTooLarge`); its own
    checks (``__post_init__``) raise their typed errors as usual, anything malformed
    :class:`PlaneError`."""
    if len(raw) > limit:
        raise MessageTooLarge(f"{what} of {len(raw)} bytes exceeds the plane's limit of "
                              f"{limit} bytes")
    try:
        return dec.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise PlaneError(f"{what} is malformed: {e}"[:400]) from None
