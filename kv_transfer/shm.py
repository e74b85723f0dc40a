"""Same-host KV through memory with no name: memfd segments handed over by fd passing
(step 4, one host).

When the two engines of a pair run on one host, KV needs no network and no serialization:
the prefill side gathers the held blocks of every layer into a segment (one copy out of
the source blocks), or its forward staged them there already, and the decode side scatters
them from the same pages into its own blocks (one copy in).

Segments are anonymous: ``memfd_create`` memory, mapped by the processes that hold its
descriptor. There is no file under ``/dev/shm`` to leak: when the last holder exits (a
clean close, SIGKILL, the OOM killer) the kernel frees the pages. A descriptor crosses to
the peer over a Unix ``SOCK_SEQPACKET`` socket in the abstract namespace (``SCM_RIGHTS``;
the kernel keeps message boundaries, so there is no framing of ours), one per pair:

- the prefill endpoint listens on a random abstract name (:class:`FdServer`) and tells a
  joining peer that name and a one-time token over the authenticated control plane
  (:mod:`kv_transfer.control`);
- the peer connects and sends the token (:class:`FdChannel`). Abstract names live in a
  network namespace, so a peer that reaches the name shares this host's kernel (and its
  memory); one that cannot (another host, another container network) gets the network
  path. That connection is the proof of "same host", and the pair's channel for segments:
  prefill sends each segment's descriptor once, before the first answer that names it.
"""

from __future__ import annotations

import itertools
import logging
import math
import mmap
import os
import secrets
import socket
import threading

import msgspec
import torch

log = logging.getLogger(__name__)

_ALIGN = 1 << 20            # segments grow in whole MiB, so a pair rarely makes a new one
_TOKEN_BYTES = 32           # hex characters of a channel token
_MAX_FD_MESSAGE = 256       # a segment header is ~20 bytes
_ACCEPT_TIMEOUT_S = 5.0     # a connected peer has this long to send its token
_ids = itertools.count(1)


def available() -> bool:
    return hasattr(os, "memfd_create") and hasattr(socket, "send_fds")


class SegmentHeader(msgspec.Struct, frozen=True):
    """What travels with a segment's descriptor: its id on the prefill side, its size."""

    id: int
    nbytes: int


_HEADER = msgspec.msgpack.Decoder(SegmentHeader)
_ENCODE = msgspec.msgpack.Encoder().encode


class Segment:
    """Anonymous shared memory mapped as one flat tensor of ``dtype``."""

    def __init__(self, seg_id: int, fd: int, nbytes: int, dtype: torch.dtype) -> None:
        self.id, self.fd, self.nbytes, self.dtype = seg_id, fd, nbytes, dtype
        self.numel = nbytes // dtype.itemsize
        buf = mmap.mmap(fd, nbytes) if nbytes else bytearray(0)
        self.flat = torch.frombuffer(buf, dtype=dtype, count=self.numel) if nbytes else \
            torch.empty(0, dtype=dtype)

    @classmethod
    def create(cls, numel: int, dtype: torch.dtype) -> "Segment":
        """A new segment of at least ``numel`` elements, its pages allocated now: when the
        memory is not there this raises ENOSPC/ENOMEM here, not SIGBUS at a later write."""
        nbytes = -(-numel * dtype.itemsize // _ALIGN) * _ALIGN
        fd = os.memfd_create("preft-kv", os.MFD_CLOEXEC)
        try:
            if nbytes:
                os.posix_fallocate(fd, 0, nbytes)
            return cls(next(_ids), fd, nbytes, dtype)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def adopt(cls, header: SegmentHeader, fd: int, dtype: torch.dtype) -> "Segment":
        """Map a descriptor the peer sent; refused when it is smaller than it claims."""
        try:
            size = os.fstat(fd).st_size
            if size < header.nbytes or header.nbytes % dtype.itemsize:
                raise ValueError(f"segment {header.id}: {size} bytes behind a descriptor "
                                 f"announced as {header.nbytes}")
            return cls(header.id, fd, header.nbytes, dtype)
        except BaseException:
            os.close(fd)
            raise

    def view(self, shape: tuple[int, ...]) -> torch.Tensor:
        return self.flat[:math.prod(shape)].view(shape)

    def close(self) -> None:
        """Drop this process's hold; the pages go once every holder has (views taken from
        it keep the mapping alive until they are gone)."""
        self.flat = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class FdServer:
    """Prefill side: the abstract socket peers connect to, and the channels they opened.

    :meth:`offer` makes a token for one pair; the accept thread matches each connection's
    token to its pair (:meth:`channel` waits for it). Anything else is closed unread."""

    def __init__(self) -> None:
        self.name = f"preft-kv-{secrets.token_hex(12)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock.bind("\0" + self.name)
        self._sock.listen(64)
        self._cv = threading.Condition()
        self._expected: dict[str, int] = {}          # token -> pair
        self._channels: dict[int, socket.socket] = {}
        self._closed = False
        threading.Thread(target=self._accept_loop, name="kv-fd-accept", daemon=True).start()

    def offer(self, pair: int) -> str:
        token = secrets.token_hex(_TOKEN_BYTES // 2)
        with self._cv:
            self._expected[token] = pair
        return token

    def channel(self, pair: int, timeout: float) -> socket.socket | None:
        """The pair's connection, once its peer proved the token; None if it did not."""
        with self._cv:
            self._cv.wait_for(lambda: pair in self._channels or self._closed, timeout)
            return self._channels.pop(pair, None)

    def forget(self, token: str) -> None:
        with self._cv:
            self._expected.pop(token, None)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(_ACCEPT_TIMEOUT_S)
                token = conn.recv(_TOKEN_BYTES + 1).decode("ascii", "replace")
                with self._cv:
                    pair = self._expected.pop(token, None)
                    if pair is not None:
                        conn.settimeout(None)
                        self._channels[pair] = conn
                        self._cv.notify_all()
                        continue
            except OSError:
                pass
            conn.close()   # no or a wrong token: nothing was sent to it

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for c in self._channels.values():
                c.close()
            self._channels.clear()
            self._cv.notify_all()
        self._sock.close()


def send_segment(conn: socket.socket, seg: Segment) -> None:
    """Hand ``seg``'s descriptor to the pair's peer (prefill side)."""
    socket.send_fds(conn, [_ENCODE(SegmentHeader(seg.id, seg.nbytes))], [seg.fd])


class FdChannel:
    """Decode side of a pair's segment channel."""

    def __init__(self, name: str, token: str, timeout: float) -> None:
        self.timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect("\0" + name)
            self._sock.send(token.encode("ascii"))
        except BaseException:
            self._sock.close()
            raise

    def receive(self, dtype: torch.dtype) -> Segment:
        """The next segment the prefill side sent; raises ``OSError``/``ValueError``."""
        msg, fds, _flags, _addr = socket.recv_fds(self._sock, _MAX_FD_MESSAGE, 1)
        if not msg:
            for fd in fds:
                os.close(fd)
            raise ConnectionError("the prefill endpoint closed the segment channel")
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise ValueError(f"a segment message came with {len(fds)} descriptors, not 1")
        try:
            header = _HEADER.decode(msg)
        except msgspec.DecodeError as e:
            os.close(fds[0])
            raise ValueError(f"malformed segment header: {e}") from None
        return Segment.adopt(header, fds[0], dtype)

    def close(self) -> None:
        self._sock.close()


def layer_chunks(n_layers: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous layer ranges, as even as can be; both sides of a pair compute them."""
    k = max(1, min(k, n_layers))
    return [(j * n_layers // k, (j + 1) * n_layers // k) for j in range(k)]


def held_segments() -> int:
    """How many memfd segments this process holds open (tests: nothing leaks)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:preft-kv")
        except OSError:
            pass
    return n
