"""KV transport: how a prompt's blocks cross from prefill to decode (step 4).

The prefill engine's endpoint serves (:meth:`TorchDistTransport.serve`); the decode
engine's endpoint opens one pair per prefill peer, lazily, the first time a handle names
that peer. This module is the orchestrator; each job has a module of its own:

- control messages and their authentication: :mod:`kv_transfer.control` (ZeroMQ with
  CURVE under the cluster's secret, both directions; typed, bounded messages);
- held KV and its one owner: :mod:`kv_transfer.offers`;
- the byte paths, each with its sending and receiving halves:
  :mod:`kv_transfer.shm` (same host, CPU caches: memfd segments passed by descriptor),
  :mod:`kv_transfer.cuda_ipc` (same host, GPU caches: the decode side copies straight out
  of the mapped prefill cache), :mod:`kv_transfer.group` (across hosts: a two-rank
  torch.distributed group, gloo on CPU, NCCL on GPU).

A pair (decode -> prefill, over one CURVE connection):
  ``Join{peer, layout, same_host, cuda_ipc}`` -> ``Joined{pair, fd_socket, token}``; a
  decode that can connect to that abstract socket and send the token shares this host;
  ``Confirm{pair, mode}`` -> ``Confirmed{mode, ...}``: shm (the proof arrived), cuda_ipc
  (the proof arrived, GPU caches: the answer carries the cache's IPC handles) or group
  (the answer names the rendezvous store and a random prefix; both sides build the group).
Then, per request (``seq`` counts up on the pair; anything else is refused):
  ``Pull{seq, transfer_id, start_block, num_blocks}`` -> ``Ack{seq, ...}``
  group: then the blocks over the group. shm: the segment (its descriptor sent first over
  the pair's fd channel) holds them: at once (``chunks`` 0), or chunk by chunk
  (``Chunk{seq, j}`` as each layer range is in). A staged prompt's copy is lent until
  ``Done{seq}`` (or discarded at ``lend_s``). cuda_ipc: ``Ack{blocks}``; the lent blocks stay
  held until ``Fin{seq, copied}``, answered ``FinAck{kept}``: at its timeout prefill takes
  them back first, and a late copy is refused on the decode side, never served.
  ``Release{seq, transfer_id}``: free held blocks unsent (the offers' one release route).
Every value is checked against what this side offered: the pair by its connection, the
sequence number, the transfer id against the offers, the block range against the offer,
a segment id against the segments received on the pair's own channel, CUDA IPC
descriptions against the storages they claim (:func:`kv_transfer.cuda_ipc.check`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import torch
from torch.distributed import TCPStore

from kv_transfer import control, cuda_ipc, group, shm
from kv_transfer.control import (Ack, BadMessage, Chunk, Close, Confirm, Confirmed, Done,
                                 Fin, FinAck, Join, Joined, PairLost, Pull, Refused, Release,
                                 TransferError, TransferRefused)
from kv_transfer.layout import KVLayout, LayoutMismatch
from kv_transfer.offers import Offer, OfferTable, TransferRecord
from kv_transfer.staging import Staged

__all__ = ["BadMessage", "Claim", "Offer", "OfferTable", "PairLost", "TorchDistTransport",
           "TransferError", "TransferRecord", "TransferRefused"]

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 1.0                 # a pair thread's wait between stop checks
# Same-host transfers of at least this many bytes are handed over in this many layer chunks.
_SHM_CHUNK_MIN_BYTES = int(os.environ.get("PREFT_KV_SHM_CHUNK_MIN_BYTES", 16 << 20))
_SHM_CHUNKS = 4
_LENT_POLL_S = 0.1                 # how often lent staged copies are checked
_MAPPED_SEGMENTS = 8               # decode side: segments kept mapped per pair
_PROOF_WAIT_S = 5.0                # prefill: how long a confirm waits for its fd channel
_MAX_PAIRS = 1024                  # prefill: pairs at once (a decode engine makes one)


@dataclass
class _Pair:
    """Prefill side: one decode peer's pair (its connection, mode and what it was lent)."""

    n: int
    conn: bytes                          # the peer's ZeroMQ routing id
    peer: str
    join: Join
    inbox: "queue.Queue" = field(default_factory=queue.Queue)
    mode: str = ""
    seq: int = 0                         # the next request's sequence number
    token: str = ""
    fd_conn: object = None               # shm: the pair's descriptor channel
    segment: shm.Segment | None = None   # shm: the gathered transfers' segment
    pg: object = None
    lent: list = field(default_factory=list)   # (seq, staged, deadline)
    cache: dict = field(default_factory=dict)
    deferred: list = field(default_factory=list)


class TorchDistTransport:
    """The one KV transport: one instance per engine (owned by its
    :class:`~kv_transfer.endpoint.KVEndpoint`); ``serve`` on prefill, ``pull``, ``claim``
    and ``release`` on decode."""

    name = "torch_dist"

    def __init__(self, layers: list[torch.Tensor], layout: KVLayout, *, local_host: str,
                 timeout_s: float, engine_name: str,
                 on_record: Callable[[TransferRecord], None] | None = None,
                 secret: str = "", shared_memory: bool = True,
                 lend_s: float = 120.0) -> None:
        if not secret:
            raise ValueError(f"KV transport of {engine_name}: the control plane needs the "
                             "cluster's secret (TransferConfig.secret); it is empty")
        import zmq

        self.layers, self.layout = layers, layout
        self._lend_s = lend_s   # prefill: how long a peer may keep reading a staged copy
        self.local_host = local_host
        self.timeout = timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self.engine_name = engine_name
        self.device = layers[0].device
        self._on_record = on_record or (lambda r: None)
        self._secret = secret               # the cluster's; never stored, logged or sent
        self._ctx = zmq.Context()
        self._stop = threading.Event()
        self._server: control.ControlServer | None = None
        self._store = None
        self._fds: shm.FdServer | None = None
        self._pairs: dict[int, _Pair] = {}
        self._pairs_lock = threading.Lock()
        self._next_pair = 0
        self._clients: dict[tuple[str, int], _PairClient] = {}
        self._clients_lock = threading.Lock()
        self.refused = 0                    # prefill side: control messages refused
        self.shared_memory = shared_memory and shm.available()
        self.same_host_mode = "cuda_ipc" if self.device.type == "cuda" else "shm"
        self._ipc_export: dict | None = None   # prefill side: our caches' handles, made once
        self.ipc_refused = False               # decode side: CUDA could not map a peer's
        self.group_name = "nccl" if self.device.type == "cuda" else "gloo"

    # ================================================================ prefill side
    def serve(self, offers: OfferTable) -> tuple[str, int]:
        """Listen for decode peers; the control plane's ``(host, port)``."""
        self._offers = offers
        self._store = group.bound_store(self.local_host, self.timeout)
        if self.shared_memory:
            self._fds = shm.FdServer()
        self._server = control.ControlServer(self._ctx, self._secret, self.local_host,
                                             self._on_message, self._on_refused)
        return self.local_host, self._server.port

    def _on_refused(self, conn: bytes, why: str) -> None:
        with self._pairs_lock:
            self.refused += 1
        log.error("KV endpoint %s: refused a control message: %s", self.engine_name, why)
        self._server.send(conn, Refused(f"refused by {self.engine_name}: {why}"[:4000]))

    def _on_message(self, conn: bytes, msg) -> None:
        """The control thread: route a checked message to its pair (never blocks)."""
        if isinstance(msg, Join):
            self._new_pair(conn, msg)
            return
        with self._pairs_lock:
            pair = self._pairs.get(msg.pair)
        if pair is None or pair.conn != conn:   # another connection's pair is not yours
            self._on_refused(conn, f"pair {msg.pair} is not this connection's")
            return
        pair.inbox.put(msg)

    def _new_pair(self, conn: bytes, join: Join) -> None:
        try:
            self.layout.check_compatible(join.layout, local=self.engine_name, remote=join.peer)
        except LayoutMismatch as e:
            self._on_refused(conn, str(e))
            return
        with self._pairs_lock:
            full = len(self._pairs) >= _MAX_PAIRS
            if not full:
                n, self._next_pair = self._next_pair, self._next_pair + 1
                pair = self._pairs[n] = _Pair(n, conn, join.peer, join)
        if full:
            self._on_refused(conn, f"{_MAX_PAIRS} pairs are open on this endpoint")
            return
        threading.Thread(target=self._serve_pair, args=(pair,), name=f"kv-serve-{n}",
                         daemon=True).start()

    def _serve_pair(self, pair: _Pair) -> None:
        try:
            if self._form(pair):
                self._serve_loop(pair)
        except Exception:
            log.exception("KV pair %d with %s failed; dropped", pair.n, pair.peer)
        finally:
            self._end_pair(pair)

    def _form(self, pair: _Pair) -> bool:
        """Join -> Joined, Confirm -> Confirmed, and the mode's set-up; False if refused."""
        if pair.join.same_host and self._fds is not None:
            pair.token = self._fds.offer(pair.n)
        self._server.send(pair.conn, Joined(pair.n, self._fds.name if pair.token else "",
                                            pair.token))
        confirm = self._next(pair, 2 * self.timeout_s)
        if not isinstance(confirm, Confirm):
            return False
        mode, answer = self._mode_for(pair, confirm.mode)
        if mode is None:
            self._server.send(pair.conn, Refused(answer))
            return False
        pair.mode = mode
        prefix = group.new_prefix() if mode == "group" else ""
        self._server.send(pair.conn, Confirmed(mode, self._store.port if prefix else 0,
                                               prefix, answer or None))
        if mode == "group":
            pair.pg = group.make_pair_group(self._store, prefix, 0, self.local_host,
                                            self.device, self.timeout)
        return True

    def _mode_for(self, pair: _Pair, asked: str):
        """(mode, CUDA IPC handles or None), or (None, why) when ``asked`` is refused."""
        if asked == "group":
            return "group", None
        if asked != self.same_host_mode or not pair.token:
            return None, f"mode {asked} is not offered on this pair"
        pair.fd_conn = self._fds.channel(pair.n, _PROOF_WAIT_S)
        self._fds.forget(pair.token)
        if pair.fd_conn is None:
            return None, "the same-host proof did not arrive: ask for the group mode"
        if asked == "shm":
            return "shm", None
        if not pair.join.cuda_ipc:
            return None, "cuda_ipc needs a join that can map CUDA IPC handles"
        try:
            if self._ipc_export is None:
                self._ipc_export = cuda_ipc.export(self.layers)
        except Exception as e:   # an allocation CUDA cannot share: the network way
            log.warning("KV endpoint %s: no CUDA IPC handles (%s)", self.engine_name, e)
            return None, f"no CUDA IPC handles here ({type(e).__name__}); ask for group"
        return "cuda_ipc", self._ipc_export

    def _next(self, pair: _Pair, timeout: float):
        """The pair's next message within ``timeout`` (None at the timeout or the stop)."""
        deadline = time.monotonic() + timeout
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                return pair.inbox.get(timeout=min(left, _IDLE_WAIT_S))
            except queue.Empty:
                continue
        return None

    def _serve_loop(self, pair: _Pair) -> None:
        while not self._stop.is_set():
            self._settle_lent(pair)
            if pair.deferred:
                msg = pair.deferred.pop(0)
            else:
                msg = self._next(pair, _LENT_POLL_S if pair.lent else _IDLE_WAIT_S)
            if msg is None:
                continue
            if isinstance(msg, Close):
                return
            if isinstance(msg, (Pull, Release)):
                if not self._request(pair, msg):
                    return
            else:
                self._notice(pair, msg)

    def _notice(self, pair: _Pair, msg) -> None:
        """Done and late Fin messages (no request of their own)."""
        if isinstance(msg, Done):
            for item in [x for x in pair.lent if x[0] == msg.seq]:
                pair.lent.remove(item)
                item[1].recycle()
        elif isinstance(msg, Fin):   # after our timeout took the blocks back
            self._server.send(pair.conn, FinAck(msg.seq, kept=False))
        else:
            self._on_refused(pair.conn, f"{type(msg).__name__} out of place on pair {pair.n}")

    def _settle_lent(self, pair: _Pair) -> None:
        """Discard (never reuse) a lent staged copy the peer kept past its deadline."""
        now = time.monotonic()
        for item in [x for x in pair.lent if now > x[2]]:
            pair.lent.remove(item)
            item[1].discard()

    def _request(self, pair: _Pair, msg) -> bool:
        """One pull or release; False when the pair's group broke."""
        if msg.seq != pair.seq:
            self._refuse_request(pair, msg.seq, f"request {msg.seq} out of order on pair "
                                 f"{pair.n} (expected {pair.seq})")
            return True
        pair.seq += 1
        if isinstance(msg, Release):   # the offers' one release route; it never waits
            self._offers.release(msg.transfer_id)
            self._server.send(pair.conn, Ack(msg.seq))
            return True
        return self._answer(pair, msg)

    def _refuse_request(self, pair: _Pair, seq: int, why: str) -> None:
        with self._pairs_lock:
            self.refused += 1
        log.error("KV endpoint %s: %s", self.engine_name, why)
        self._server.send(pair.conn, Refused(why[:4000], seq))

    def _answer(self, pair: _Pair, req: Pull) -> bool:
        """Serve one checked pull; False when the pair's group broke."""
        # Answer before the peer's own wait (the full timeout) gives up on us.
        offer = self._offers.claim(req.transfer_id, timeout=self.timeout_s / 2)
        if offer is None:
            self._refuse_request(pair, req.seq, f"KV transfer {req.transfer_id} is unknown "
                                 f"or expired on {self.engine_name}")
            return True
        n, err, t0 = offer.num_blocks - req.start_block, "", time.perf_counter()
        try:
            if n != req.num_blocks or req.start_block >= offer.num_blocks:
                if offer.staged is not None:
                    offer.staged.recycle()
                self._refuse_request(pair, req.seq, f"decode asked for {req.num_blocks} "
                                     f"blocks from block {req.start_block}, prefill holds "
                                     f"{offer.num_blocks}")
                return True
            err = self._deliver(pair, offer, req)
        finally:  # transferred or refused: the engine may free held blocks
            self._offers.finish(offer)
        self._on_record(TransferRecord(
            offer.transfer_id, pair.peer, n, n * self.layout.bytes_per_block,
            time.perf_counter() - t0, ok=not err, error=err,
            transport=self.group_name if pair.pg is not None else pair.mode,
            pipelined=offer.staged is not None))
        if err:
            log.error("KV send of transfer %d to %s failed: %s", offer.transfer_id,
                      pair.peer, err)
        return not err or pair.pg is None   # a failed same-host copy breaks no group

    def _deliver(self, pair: _Pair, offer: Offer, req: Pull) -> str:
        """Move the offer's blocks [start:] to the peer the pair's way; the error, or ""."""
        try:
            if offer.staged is not None:
                return self._deliver_staged(pair, offer.staged, req)
            blocks = offer.block_ids[req.start_block:]
            if pair.pg is not None:   # ack first: the peer posts its receives on it
                self._server.send(pair.conn, Ack(req.seq))
                group.send_blocks(pair.pg, self.layers, self.layout.block_shape, blocks,
                                  self.timeout, pair.cache)
                return ""
            if pair.mode == "cuda_ipc":
                return self._lend_blocks(pair, blocks, req.seq)
            return self._gather_into_segment(pair, blocks, req)
        except Exception as e:  # broken pair: free the blocks, drop the group
            return f"{type(e).__name__}: {e}"

    def _lend_blocks(self, pair: _Pair, blocks: list[int], seq: int) -> str:
        """CUDA IPC: the peer copies ``blocks`` straight out of our cache (mapped at join);
        they stay held until its Fin. At the timeout this side takes them back, and answers
        a later Fin ``kept=False``: that copy is refused, never served."""
        self._server.send(pair.conn, Ack(seq, blocks=blocks))
        deadline = time.monotonic() + self.timeout_s
        while (msg := self._next(pair, deadline - time.monotonic())) is not None:
            if isinstance(msg, Fin) and msg.seq == seq:
                self._server.send(pair.conn, FinAck(seq, kept=True))
                return "" if msg.copied else "the peer's copy failed"
            pair.deferred.append(msg)
        return (f"the peer did not finish copying within {self.timeout_s:g} s; the blocks "
                "were taken back")

    @staticmethod
    def _send_segment(pair: _Pair, seg: shm.Segment, req: Pull) -> None:
        """The segment's descriptor to the peer, unless it holds it mapped already."""
        if seg.id not in req.have:
            shm.send_segment(pair.fd_conn, seg)

    def _deliver_staged(self, pair: _Pair, staged: Staged, req: Pull) -> str:
        """A prompt the forward staged: nothing to gather. Same host: the peer copies
        straight out of the staged segment and says Done (then it is reused; if it never
        does, it is discarded at its deadline). Group: sent as it lies."""
        if pair.pg is not None:
            self._server.send(pair.conn, Ack(req.seq, pipelined=True))
            try:
                group.send_buffer(pair.pg, staged.buf[:, req.start_block:].contiguous(),
                                  self.timeout)
            except Exception as e:
                staged.discard()
                return f"{type(e).__name__}: {e}"
            staged.recycle()
            return ""
        self._send_segment(pair, staged.segment, req)
        pair.lent.append((req.seq, staged, time.monotonic() + self._lend_s))
        self._server.send(pair.conn, Ack(req.seq, pipelined=True, segment=staged.segment.id,
                                         staged_blocks=staged.num_blocks,
                                         offset=req.start_block))
        return ""

    def _gather_into_segment(self, pair: _Pair, blocks: list[int], req: Pull) -> str:
        """Copy ``blocks`` of every layer into the pair's segment (grown when too small).

        A small transfer is acked once its bytes are in (``chunks`` 0). A large one is
        acked first and then signalled chunk by chunk, so the peer scatters chunk j while
        this side gathers chunk j+1: the two copies overlap instead of adding up."""
        shape, seq = (len(self.layers), len(blocks), *self.layout.block_shape), req.seq
        try:
            seg = self._segment(pair, math.prod(shape), req)
        except Exception as e:
            err = f"no shared-memory segment for KV: {type(e).__name__}: {e}"
            self._server.send(pair.conn, Refused(err, seq))
            return err
        buf, idx = seg.view(shape), torch.tensor(blocks, dtype=torch.long)
        k = (min(_SHM_CHUNKS, len(self.layers))
             if buf.numel() * buf.element_size() >= _SHM_CHUNK_MIN_BYTES else 0)
        if k:
            self._server.send(pair.conn, Ack(seq, segment=seg.id, chunks=k))
        for j, (lo, hi) in enumerate(shm.layer_chunks(len(self.layers), max(1, k))):
            try:
                for i in range(lo, hi):
                    torch.index_select(self.layers[i], 0, idx, out=buf[i])
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
                self._server.send(pair.conn, Refused(err, seq))
                return err
            if k:
                self._server.send(pair.conn, Chunk(seq, j))
        if not k:
            self._server.send(pair.conn, Ack(seq, segment=seg.id))
        return ""

    def _segment(self, pair: _Pair, numel: int, req: Pull) -> shm.Segment:
        seg = pair.segment
        if seg is None or seg.numel < numel:
            if seg is not None:
                seg.close()   # the peer keeps its mapping until it drops it
            seg = pair.segment = shm.Segment.create(numel, self.layers[0].dtype)
        self._send_segment(pair, seg, req)
        return seg

    def _end_pair(self, pair: _Pair) -> None:
        with self._pairs_lock:
            self._pairs.pop(pair.n, None)
        if pair.token and self._fds is not None:
            self._fds.forget(pair.token)
        if pair.segment is not None:
            pair.segment.close()
        if pair.fd_conn is not None:
            pair.fd_conn.close()
        for _, staged, _ in pair.lent:
            staged.discard()   # the peer may still read them: never reused
        if pair.pg is not None:
            group.shutdown_group(pair.pg)

    def peers(self) -> list[str]:
        """Prefill side: the decode peers with a live pair."""
        with self._pairs_lock:
            return sorted(p.peer for p in self._pairs.values())

    # ================================================================ decode side
    def _client(self, host: str, port: int) -> "_PairClient":
        with self._clients_lock:
            client = self._clients.get((host, port))
            if client is None or client.broken:
                if client is not None:
                    client.close()
                client = self._pair(host, port)
                self._clients[(host, port)] = client
            return client

    def _pair(self, host: str, port: int) -> "_PairClient":
        """A new pair; one that CUDA IPC could not map is made again the network way."""
        refused = self.ipc_refused
        try:
            return _PairClient(self, host, port)
        except TransferError:
            if refused or not self.ipc_refused:
                raise
            return _PairClient(self, host, port)

    def pull(self, host: str, port: int, transfer_id: int, start_block: int,
             dst_block_ids: list[int]) -> TransferRecord:
        t0 = time.perf_counter()
        try:
            client = self._client(host, port)
            pipelined = client.pull(transfer_id, start_block, dst_block_ids)
        except Exception as e:
            rec = TransferRecord(transfer_id, f"{host}:{port}", len(dst_block_ids), 0,
                                 time.perf_counter() - t0, ok=False, error=str(e))
            self._on_record(rec)
            raise (e if isinstance(e, TransferError) else TransferError(rec.error)) from e
        rec = TransferRecord(transfer_id, f"{host}:{port}", len(dst_block_ids),
                             len(dst_block_ids) * self.layout.bytes_per_block,
                             time.perf_counter() - t0, ok=True, transport=client.transport,
                             pipelined=pipelined)
        self._on_record(rec)
        return rec

    def release(self, host: str, port: int, transfer_id: int) -> None:
        self._client(host, port).release(transfer_id)

    def pair_mode(self, host: str, port: int) -> str:
        """Decode side: how an existing, unbroken pair with that endpoint moves KV (shm |
        cuda_ipc | gloo | nccl); "" when there is none yet."""
        with self._clients_lock:
            client = self._clients.get((host, port))
            return client.transport if client is not None and not client.broken else ""

    def claim(self, host: str, port: int, transfer_id: int, num_blocks: int) -> "Claim":
        """Decode side, same-host pair, staged transfer: ask for all of its blocks and map
        them without copying; the caller copies them (layer by layer, during its forward)
        and then :meth:`Claim.release` s them."""
        return self._client(host, port).claim(transfer_id, num_blocks)

    # ================================================================ both sides
    def prune(self, live_peers: set[str] | None = None,
              live_addresses: set[tuple[str, int]] | None = None) -> None:
        """Tear down pairs whose other side left the cluster (by membership). Prefill side:
        ``live_peers`` are the decode engines still alive; decode side: ``live_addresses``
        the prefill KV endpoints still alive."""
        if live_peers is not None:
            with self._pairs_lock:
                gone = [p for p in self._pairs.values() if p.peer not in live_peers]
            for p in gone:
                p.inbox.put(Close(p.n))
        if live_addresses is not None:
            with self._clients_lock:
                for addr in [a for a in self._clients if a not in live_addresses]:
                    self._clients.pop(addr).close()

    def close(self) -> None:
        self._stop.set()
        with self._pairs_lock:
            pairs = list(self._pairs.values())
        for p in pairs:
            p.inbox.put(Close(p.n))
        with self._clients_lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()
        if self._server is not None:
            self._server.close()
        if self._fds is not None:
            self._fds.close()
        self._ctx.destroy(linger=0)


@dataclass
class Claim:
    """A staged transfer mapped on the decode side, not yet copied: ``blocks`` is
    ``[layers, num_blocks, *block_shape]`` in the prefill endpoint's staged segment."""

    transfer_id: int
    blocks: torch.Tensor
    done: Callable[[], None]
    claimed_s: float                 # request -> mapped (the control round trip)
    _released: bool = False

    def release(self) -> None:
        """Finished reading (or never will): the prefill side may reuse the segment."""
        if not self._released:
            self._released = True
            try:
                self.done()
            except Exception:   # the endpoint is gone; it discards at its deadline
                pass


class _PairClient:
    """Decode side of one prefill-decode pair; pulls are serialized per pair."""

    def __init__(self, transport: TorchDistTransport, host: str, port: int) -> None:
        self.t, self.host = transport, host
        self.broken = False
        self._lock = threading.Lock()
        self._cache: dict = {}            # reused receive buffer (pulls are serialized)
        self.segments: dict[int, shm.Segment] = {}   # mapped, least recently used first
        self.fds: shm.FdChannel | None = None
        self.pg = None
        self.peer_layers: list[torch.Tensor] = []   # cuda_ipc: the prefill cache, mapped
        self.seq, self.pair = 0, None
        self.control = control.ControlClient(transport._ctx, transport._secret, host, port)
        try:
            self.transport = self._form()
        except BaseException:
            self.close()
            raise

    def _form(self) -> str:
        t = self.t
        ipc = t.same_host_mode == "cuda_ipc" and not t.ipc_refused
        self.control.send(Join(t.engine_name, t.layout.fingerprint(),
                               same_host=t.shared_memory, cuda_ipc=ipc))
        joined = self._expect(Joined)
        self.pair = joined.pair
        mode = "group"
        if joined.fd_socket and t.shared_memory and (ipc or t.same_host_mode == "shm"):
            try:
                self.fds = shm.FdChannel(joined.fd_socket, joined.token, t.timeout_s)
                mode = t.same_host_mode
            except OSError:       # another host or network namespace: the network way
                mode = "group"
        self.control.send(Confirm(self.pair, mode))
        confirmed = self._expect(Confirmed)
        if confirmed.mode != mode:
            raise PairLost(f"asked for mode {mode}, the endpoint confirmed {confirmed.mode}")
        if mode == "cuda_ipc":
            self._map_peer(confirmed.ipc)
        elif mode == "group":
            self._store = TCPStore(self.host, confirmed.store_port, is_master=False,
                                         timeout=t.timeout)
            self.pg = group.make_pair_group(self._store, confirmed.prefix, 1, t.local_host,
                                            t.device, t.timeout)
        return t.group_name if self.pg is not None else mode

    def _expect(self, kind: type, seq: int | None = None):
        msg = self.control.receive(self.t.timeout_s, seq)
        if not isinstance(msg, kind):
            raise PairLost(f"expected {kind.__name__} from the KV endpoint, got "
                           f"{type(msg).__name__}")
        return msg

    def _map_peer(self, desc) -> None:
        """cuda_ipc: map the prefill engine's cache layers. If CUDA refuses, the pair is
        closed and this transport asks for the network way from now on."""
        t = self.t
        try:
            self.peer_layers = cuda_ipc.open_layers(
                desc, device=t.device, num_layers=len(t.layers),
                block_shape=tuple(t.layout.block_shape), dtype=t.layers[0].dtype)
        except cuda_ipc.IpcError as e:
            t.ipc_refused = True
            log.warning("KV pair %d: %s; pairing over %s from now on", self.pair, e,
                        t.group_name)
            raise TransferError(f"CUDA IPC pairing failed: {e}") from e

    def _request(self, msg_type: type, **fields) -> tuple[object, int]:
        """Send one request on the pair; its first answer and its sequence number."""
        seq = self.seq
        self.seq += 1
        self.control.send(msg_type(pair=self.pair, seq=seq, **fields))
        return self._expect(Ack, seq), seq

    def pull(self, transfer_id: int, start_block: int, dst_block_ids: list[int]) -> bool:
        """Copy the transfer's blocks into ours; True when prefill had staged them."""
        t = self.t
        with self._lock, self._breaks_on_loss():
            ack, seq = self._request(Pull, transfer_id=transfer_id, start_block=start_block,
                                     num_blocks=len(dst_block_ids), have=list(self.segments))
            idx = torch.tensor(dst_block_ids, dtype=torch.long, device=t.device)
            if self.pg is not None:
                group.receive_blocks(self.pg, t.layers, t.layout.block_shape, idx,
                                     t.timeout, self._cache)
            elif self.peer_layers:
                self._copy_from_peer(ack, seq, idx)
            else:
                self._scatter_from_segment(ack, seq, idx)
            return ack.pipelined

    @contextlib.contextmanager
    def _breaks_on_loss(self):
        """An exchange that fails breaks the pair (the next use makes a new one), unless
        the endpoint answered with an error: then the pair is in step and kept."""
        if self.broken:
            raise PairLost("KV pair is broken")
        try:
            yield
        except TransferRefused:
            raise
        except BaseException:
            self._break()
            raise

    def _scatter_from_segment(self, ack: Ack, seq: int, idx: torch.Tensor) -> None:
        """Copy the blocks out of the segment into ours, chunk by chunk as the prefill side
        signals each (``chunks`` 0: all of them are in already)."""
        t, k = self.t, ack.chunks
        if k > len(t.layers):
            raise PairLost(f"malformed answer from the KV endpoint: chunks={k}")
        try:
            buf = self._mapped(ack, len(idx))
            for j, (lo, hi) in enumerate(shm.layer_chunks(len(t.layers), max(1, k))):
                if k and self._expect(Chunk, seq).index != j:
                    raise PairLost(f"chunk out of order on pair {self.pair}")
                for i in range(lo, hi):
                    t.layers[i].index_copy_(0, idx, buf[i])
        finally:
            if ack.pipelined:   # done reading its staged segment
                self.control.send(Done(self.pair, seq))

    def _copy_from_peer(self, ack: Ack, seq: int, idx: torch.Tensor) -> None:
        """cuda_ipc: copy the acked blocks out of the mapped prefill cache into ours, wait
        for the copy, then Fin; refused unless prefill still kept them (FinAck)."""
        t, blocks = self.t, ack.blocks
        cap = self.peer_layers[0].shape[0]
        try:
            if len(blocks) != len(idx) or any(b >= cap for b in blocks):
                raise PairLost(f"malformed answer from the KV endpoint: blocks="
                               f"{blocks!r:.60} for {len(idx)} blocks of {cap}")
            cuda_ipc.copy_blocks(t.layers, idx.tolist(), self.peer_layers, blocks)
            if t.device.type == "cuda":   # the bytes are in before prefill may free them
                torch.cuda.current_stream(t.device).synchronize()
        except BaseException:
            self.control.send(Fin(self.pair, seq, copied=False))  # prefill may free now
            raise
        self.control.send(Fin(self.pair, seq, copied=True))
        if not self._expect(FinAck, seq).kept:
            raise TransferRefused("the prefill endpoint took its blocks back before this "
                                  f"copy finished (its {t.timeout_s:g} s timeout)")

    def _mapped(self, ack: Ack, n_blocks: int) -> torch.Tensor:
        """The blocks as prefill laid them out in a segment this pair's channel delivered:
        the pair's (gathered at the pull), or a prompt's staged copy (``staged_blocks``
        long, ours from ``offset``)."""
        t = self.t
        total, offset = n_blocks, 0
        if ack.staged_blocks:
            total, offset = ack.staged_blocks, ack.offset
            if offset + n_blocks != total:
                raise PairLost(f"staged KV holds {total} blocks; blocks {offset}.. do not "
                               f"make the {n_blocks} asked for")
        shape = (len(t.layers), total, *t.layout.block_shape)
        seg = self._segment(ack.segment)
        if seg.numel < math.prod(shape):
            raise PairLost(f"segment {seg.id} holds {seg.nbytes} bytes, the transfer needs "
                           f"{math.prod(shape) * t.layers[0].element_size()}")
        return seg.view(shape)[:, offset:]

    def _segment(self, seg_id: int) -> shm.Segment:
        """A segment by id, from this pair's channel only (received now if it is new)."""
        if self.fds is None:
            raise PairLost("no same-host channel on this pair")
        seg = self.segments.pop(seg_id, None)
        while seg is None:
            new = self.fds.receive(self.t.layers[0].dtype)
            if new.id == seg_id:
                seg = new
            else:
                self._keep(new)
        self._keep(seg)
        return seg

    def _keep(self, seg: shm.Segment) -> None:
        old = self.segments.pop(seg.id, None)
        if old is not None and old is not seg:
            old.close()
        self.segments[seg.id] = seg             # most recently used last
        while len(self.segments) > _MAPPED_SEGMENTS:
            self.segments.pop(next(iter(self.segments))).close()

    def release(self, transfer_id: int) -> None:
        with self._lock, self._breaks_on_loss():
            self._request(Release, transfer_id=transfer_id)

    def claim(self, transfer_id: int, num_blocks: int) -> Claim:
        t0 = time.perf_counter()
        with self._lock:
            if self.broken or self.transport != "shm":
                raise TransferError("layer-wise claims need a same-host CPU pair")
            with self._breaks_on_loss():
                ack, seq = self._request(Pull, transfer_id=transfer_id, start_block=0,
                                         num_blocks=num_blocks, have=list(self.segments))
            done = lambda: self.control.send(Done(self.pair, seq))  # noqa: E731
            if not ack.pipelined or ack.chunks:
                # held blocks were gathered into the pair segment instead; nobody reads
                # them, and the pair's next request reuses that segment
                raise TransferError(f"KV transfer {transfer_id} was not staged")
            try:
                blocks = self._mapped(ack, num_blocks)
            except Exception:
                done()
                raise
        return Claim(transfer_id, blocks, done, time.perf_counter() - t0)

    def _break(self) -> None:
        self.broken = True
        if self.pg is not None:
            group.shutdown_group(self.pg)

    def close(self) -> None:
        with self._lock:
            if self.pair is not None and hasattr(self, "transport"):   # formed
                try:
                    self.control.send(Close(self.pair))
                except Exception:
                    pass
            self.control.close()
            if self.pg is not None:
                group.shutdown_group(self.pg)
            if self.fds is not None:
                self.fds.close()
            for seg in self.segments.values():
                seg.close()
            self.segments.clear()
            self.peer_layers = []   # unmaps the prefill cache once the storages are freed
