"""The KV control plane: how a decode endpoint asks a prefill endpoint for a prompt's KV
(step 4), authenticated both ways.

Every control message travels over ZeroMQ with CURVE under a keypair both ends derive
from the cluster's secret (:func:`cluster.plane.plane_keys`, label ``preft-kv-curve-v1``).
The prefill endpoint's ROUTER socket is the CURVE server and admits only clients that
prove that key (its ZAP handler); the decode side's DEALER names the same key as the
server's, so an endpoint without the secret fails the handshake. Messages are encrypted
on the way. Nothing of the control plane is written where a process without the secret
could read or forge it (the torch.distributed rendezvous store keeps only group
rendezvous, under a random per-pair prefix the two ends agree on here).

Messages are msgspec structs (tagged unions, one per direction); every number and name is
bounded by its type, so a malformed or out-of-range message fails to decode and is
refused, and every value is then checked against what this side offered (pairs by their
connection, sequence numbers, transfer ids, block ranges). Decode -> prefill:
:class:`Join`, :class:`Confirm`, :class:`Pull`, :class:`Release`, :class:`Fin`,
:class:`Done`, :class:`Close`; prefill -> decode: :class:`Joined`, :class:`Confirmed`,
:class:`Ack`, :class:`Chunk`, :class:`FinAck`, :class:`Refused`.
"""

from __future__ import annotations

import threading
import time
from typing import Annotated, Any, Callable, Literal, Union

import msgspec
from msgspec import Meta, Struct

from cluster.plane import plane_keys

MAX_MESSAGE = 1 << 20            # bytes: a join's answer with CUDA IPC handles is the largest
_LABEL = b"preft-kv-curve-v1"
_POLL_MS = 20                    # a waiting receive lets another thread send this often

Name = Annotated[str, Meta(min_length=1, max_length=256)]
Seq = Annotated[int, Meta(ge=0, le=(1 << 62))]
TransferId = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
Count = Annotated[int, Meta(ge=0, le=(1 << 24))]
Mode = Literal["shm", "cuda_ipc", "group"]


class TransferError(RuntimeError):
    """A KV transfer failed; the request it belonged to cannot continue on this path."""


class TransferRefused(TransferError):
    """The prefill endpoint answered with an error: the pair is in step and kept."""


class PairLost(TransferError):
    """No answer in time, or the connection failed: the pair is dropped and made anew."""


class BadMessage(ValueError):
    """A control message that failed its checks: refused with an error, never fatal."""


# ------------------------------------------------------------------ decode -> prefill
class Join(Struct, tag="join", frozen=True):
    peer: Name
    layout: Name
    same_host: bool = False       # the peer offers to prove it shares this host
    cuda_ipc: bool = False        # its caches are on a GPU and it can map CUDA IPC handles


class Confirm(Struct, tag="confirm", frozen=True):
    pair: Seq
    mode: Mode


class Pull(Struct, tag="pull", frozen=True):
    pair: Seq
    seq: Seq
    transfer_id: TransferId
    start_block: Count
    num_blocks: Annotated[int, Meta(ge=1, le=(1 << 24))]
    # shm: the segments the peer holds mapped now (one it dropped is sent again if named)
    have: Annotated[list[Seq], Meta(max_length=64)] = []


class Release(Struct, tag="release", frozen=True):
    pair: Seq
    seq: Seq
    transfer_id: TransferId


class Fin(Struct, tag="fin", frozen=True):
    """cuda_ipc: the peer finished copying the lent blocks (``copied``) or gave up."""

    pair: Seq
    seq: Seq
    copied: bool


class Done(Struct, tag="done", frozen=True):
    """The peer finished reading the staged copy it was lent for request ``seq``."""

    pair: Seq
    seq: Seq


class Close(Struct, tag="close", frozen=True):
    pair: Seq


ToPrefill = Union[Join, Confirm, Pull, Release, Fin, Done, Close]


# ------------------------------------------------------------------ prefill -> decode
class Joined(Struct, tag="joined", frozen=True):
    pair: Seq
    fd_socket: str = ""           # shm.FdServer's abstract name ("" : no same-host path)
    token: str = ""


class Confirmed(Struct, tag="confirmed", frozen=True):
    mode: Mode
    store_port: Annotated[int, Meta(ge=0, le=65535)] = 0   # group: rendezvous store
    prefix: str = ""                                       # group: this pair's keys
    ipc: dict[str, Any] | None = None                      # cuda_ipc: checked by cuda_ipc


class Ack(Struct, tag="ack", frozen=True):
    seq: Seq
    pipelined: bool = False       # the prompt was staged during its forward
    segment: Annotated[int, Meta(ge=0, le=(1 << 62))] = 0   # shm: the segment's id
    chunks: Annotated[int, Meta(ge=0, le=64)] = 0            # shm: layer chunks to wait for
    staged_blocks: Count = 0      # shm, staged: blocks in the staged copy
    offset: Count = 0             # shm, staged: where ours start in it
    blocks: list[Count] = []      # cuda_ipc: the lent blocks in the prefill cache


class Chunk(Struct, tag="chunk", frozen=True):
    seq: Seq
    index: Annotated[int, Meta(ge=0, le=63)]


class FinAck(Struct, tag="finack", frozen=True):
    seq: Seq
    kept: bool                    # False: prefill took its blocks back before the fin


class Refused(Struct, tag="refused", frozen=True):
    error: Annotated[str, Meta(max_length=4096)]
    seq: Annotated[int, Meta(ge=-1, le=(1 << 62))] = -1


ToDecode = Union[Joined, Confirmed, Ack, Chunk, FinAck, Refused]

_ENCODER = msgspec.msgpack.Encoder()
_TO_PREFILL = msgspec.msgpack.Decoder(ToPrefill)
_TO_DECODE = msgspec.msgpack.Decoder(ToDecode)


def encode(msg: Struct) -> bytes:
    return _ENCODER.encode(msg)


def _decode(dec: msgspec.msgpack.Decoder, raw: bytes) -> Struct:
    if len(raw) > MAX_MESSAGE:
        raise BadMessage(f"{len(raw)} bytes; control messages are at most {MAX_MESSAGE}")
    try:
        return dec.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise BadMessage(f"malformed control message: {e}"[:300]) from None


def decode_request(raw: bytes) -> Struct:
    return _decode(_TO_PREFILL, raw)


def decode_answer(raw: bytes) -> Struct:
    return _decode(_TO_DECODE, raw)


def keys(secret: str) -> tuple[bytes, bytes]:
    return plane_keys(secret, _LABEL)


def _options(sock) -> None:
    import zmq

    for opt, value in ((zmq.LINGER, 0), (zmq.MAXMSGSIZE, MAX_MESSAGE + 64),
                       (zmq.SNDHWM, 0), (zmq.RCVHWM, 0)):
        sock.setsockopt(opt, value)


class ControlServer:
    """Prefill side: one CURVE ROUTER socket. The I/O thread hands each checked message
    to ``on_message(peer, msg)`` (which must not block); :meth:`send` may be called from
    any thread (its frames go through an in-process queue to the I/O thread)."""

    def __init__(self, ctx, secret: str, host: str,
                 on_message: Callable[[bytes, Struct], None],
                 on_refused: Callable[[bytes, str], None]) -> None:
        import zmq
        from zmq.auth.thread import ThreadAuthenticator

        self.public, private = keys(secret)
        self._auth = ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback("*", credentials_provider=self)
        self._sock = ctx.socket(zmq.ROUTER)
        _options(self._sock)
        self._sock.curve_server = True
        self._sock.curve_publickey, self._sock.curve_secretkey = self.public, private
        self.port = self._sock.bind_to_random_port(f"tcp://{host}")
        inbox = f"inproc://kv-control-{id(self)}"
        self._pull = ctx.socket(zmq.PULL)
        self._pull.bind(inbox)
        self._push = ctx.socket(zmq.PUSH)
        _options(self._push)
        self._push.connect(inbox)
        self._push_lock = threading.Lock()
        self._on_message, self._on_refused = on_message, on_refused
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kv-control", daemon=True)
        self._thread.start()

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: admit a client only if it proved the cluster's key."""
        return key == self.public

    def send(self, peer: bytes, msg: Struct) -> None:
        with self._push_lock:
            if not self._stop.is_set():
                self._push.send_multipart([peer, encode(msg)])

    def _loop(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(200):
                if sock is self._pull:
                    self._sock.send_multipart(self._pull.recv_multipart())
                else:
                    self._receive(self._sock.recv_multipart())
        self._sock.close(linger=0)
        self._pull.close(linger=0)

    def _receive(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self._on_refused(frames[0], f"{len(frames) - 1} frames, expected 1")
            return
        try:
            msg = decode_request(frames[1])
        except BadMessage as e:
            self._on_refused(frames[0], str(e))
            return
        self._on_message(frames[0], msg)

    def close(self) -> None:
        with self._push_lock:
            self._stop.set()
            self._push.close(linger=0)
        self._thread.join(timeout=2)
        self._auth.stop()


class ControlClient:
    """Decode side of one pair: a CURVE DEALER to the prefill endpoint. :meth:`send` and
    :meth:`receive` may run on different threads (a lock per call; a waiting receive
    yields every few milliseconds)."""

    def __init__(self, ctx, secret: str, host: str, port: int) -> None:
        import zmq

        public, private = keys(secret)
        self._sock = ctx.socket(zmq.DEALER)
        _options(self._sock)
        self._sock.curve_publickey, self._sock.curve_secretkey = public, private
        self._sock.curve_serverkey = public
        self._sock.connect(f"tcp://{host}:{port}")
        self._lock = threading.Lock()
        self.address = f"{host}:{port}"

    def send(self, msg: Struct) -> None:
        with self._lock:
            self._sock.send(encode(msg))

    def receive(self, timeout: float, seq: int | None = None) -> Struct:
        """The next answer (for request ``seq``: stale answers to earlier ones are
        dropped). :class:`Refused` raises :class:`TransferRefused`; silence past
        ``timeout`` raises :class:`PairLost`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PairLost(f"no answer from the KV endpoint at {self.address} within "
                               f"{timeout:g} s: KV transfer timed out (down, overloaded, or "
                               "it does not hold this cluster's secret)")
            with self._lock:
                raw = self._sock.recv() if self._sock.poll(
                    min(_POLL_MS, int(left * 1000) + 1)) else None
            if raw is None:
                continue
            try:
                msg = decode_answer(raw)
            except BadMessage as e:
                raise PairLost(f"the KV endpoint at {self.address} answered: {e}") from None
            if seq is not None and getattr(msg, "seq", seq) not in (seq, -1):
                continue      # an answer to a request this side already gave up on
            if isinstance(msg, Refused):
                raise TransferRefused(msg.error)
            return msg

    def close(self) -> None:
        with self._lock:
            self._sock.close(linger=0)
