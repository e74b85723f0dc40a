"""KV transport over torch.distributed: how a prompt's blocks cross from prefill to decode.

Step 4 of the request path. The prefill engine's connector runs a :class:`KVServer`; the
decode engine's connector opens one :class:`KVClient` per prefill peer, lazily, the first
time a handle names that peer. Control is tiny JSON messages on the prefill worker's
``TCPStore`` (join, pull, ack); bytes move on a two-rank torch.distributed process group
made for that pair alone (rank 0 = prefill, rank 1 = decode): gloo when the caches are on
the CPU, NCCL when they are on a GPU. One code path, chosen by the caches' device.

Protocol for one request:
  decode  -> store  ``pull/<pair>/<seq>``  {transfer_id, start_block, num_blocks}
  prefill -> store  ``ack/<pair>/<seq>``   {ok} or {error}
  prefill -> group  the held blocks [start_block:] of every layer, whole blocks, packed
                    into one [layers, blocks, ...] buffer sent as few large messages
  decode  <- group  recv into the same-shaped scratch, then ``index_copy_`` per layer
A ``release`` op frees held blocks without sending (decode found them in its own prefix
cache, or its request was aborted before it was scheduled). Held blocks that nobody pulls
expire after ``hold_ttl_s``. A transfer that errors or times out breaks its pair group;
both sides drop it and the next pull makes a new one.
"""

from __future__ import annotations

import json
import math
import os
import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, TCPStore

from kv_transfer.layout import KVLayout, LayoutMismatch

log = logging.getLogger(__name__)

_IDLE_WAIT = timedelta(seconds=60)  # how long a control wait blocks before re-checking
_MAX_MESSAGE = 64 << 20             # bytes per send/recv
# Per-pair reusable transfer buffer, up to this size (0 disables; larger transfers allocate).
_SCRATCH_CACHE_BYTES = int(os.environ.get("PREFT_KV_SCRATCH_CACHE_BYTES", 256 << 20))


class TransferError(RuntimeError):
    """A KV transfer failed; the request it belonged to cannot continue on this path."""


@dataclass
class Offer:
    """Blocks a prefill engine holds for one finished prompt."""

    transfer_id: int
    req_id: str                 # vLLM's internal request id (what get_finished reports)
    block_ids: list[int]
    num_tokens: int
    expires_at: float


@dataclass(frozen=True)
class TransferRecord:
    """One completed (or failed) transfer, as seen by the side that records it."""

    transfer_id: int
    peer: str
    num_blocks: int
    bytes: int
    seconds: float
    ok: bool
    error: str = ""


class OfferTable:
    """Prefill side: held blocks by transfer id. Thread-safe.

    The engine thread adds offers (from connector metadata) and collects finished request
    ids; serve threads claim offers. A claim may arrive before the offer does (the router
    is faster than the engine's next step), so ``claim`` waits a little.
    """

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._offers: dict[int, Offer] = {}
        self._finished: set[str] = set()
        self.expired = 0

    def add(self, offer: Offer) -> None:
        with self._cv:
            self._offers[offer.transfer_id] = offer
            self._cv.notify_all()

    def claim(self, transfer_id: int, timeout: float) -> Offer | None:
        deadline = time.monotonic() + timeout
        with self._cv:
            while transfer_id not in self._offers:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cv.wait(left)
            return self._offers.pop(transfer_id)

    def finish(self, req_id: str) -> None:
        with self._cv:
            self._finished.add(req_id)

    def release_local(self, transfer_id: int) -> bool:
        """Free an offer nobody will pull (the request ended at prefill)."""
        offer = self.claim(transfer_id, timeout=5.0)
        if offer is not None:
            self.finish(offer.req_id)
        return offer is not None

    def take_finished(self, now: float | None = None) -> set[str]:
        """Request ids whose blocks may be freed: transferred, released or expired."""
        now = time.monotonic() if now is None else now
        with self._cv:
            for tid in [t for t, o in self._offers.items() if o.expires_at <= now]:
                offer = self._offers.pop(tid)
                self._finished.add(offer.req_id)
                self.expired += 1
                log.warning("KV transfer %d expired unpulled; freeing %d blocks",
                            tid, len(offer.block_ids))
            done, self._finished = self._finished, set()
            return done

    def __len__(self) -> int:
        with self._cv:
            return len(self._offers)


def _make_pair_group(store, rank: int, local_host: str, device: torch.device,
                     timeout: timedelta):
    """A standalone two-rank group (independent of vLLM's default group)."""
    if device.type == "cuda":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, 2, opts)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
    return dist.ProcessGroupGloo(store, rank, 2, opts)


def _wait_all(works, timeout: timedelta, device: torch.device) -> None:
    for w in works:
        if not w.wait(timeout):
            raise TransferError(f"KV transfer timed out after {timeout.total_seconds()} s")
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _blocking_wait(store, key: str, stop: threading.Event) -> bool:
    """Wait for ``key``; False if ``stop`` was set meanwhile."""
    while not stop.is_set():
        try:
            store.wait([key], _IDLE_WAIT)
            return True
        except dist.DistStoreError:
            continue
    return False


class KVTransport(ABC):
    """The KV transport seam. One instance per engine; ``serve`` on prefill, ``pull`` on decode."""

    name: str

    @abstractmethod
    def serve(self, offers: OfferTable) -> tuple[str, int]:
        """Start answering pulls for ``offers``; returns the address decode peers use."""

    @abstractmethod
    def pull(self, host: str, port: int, transfer_id: int, start_block: int,
             dst_block_ids: list[int]) -> TransferRecord:
        """Copy held blocks [start_block:] of ``transfer_id`` into ``dst_block_ids``."""

    @abstractmethod
    def release(self, host: str, port: int, transfer_id: int) -> None:
        """Tell the holder to free ``transfer_id`` without sending it."""

    @abstractmethod
    def close(self) -> None: ...


class TorchDistTransport(KVTransport):
    """Pairwise torch.distributed groups, created lazily; gloo on CPU, NCCL on GPU."""

    name = "torch_dist"

    def __init__(self, layers: list[torch.Tensor], layout: KVLayout, *, local_host: str,
                 timeout_s: float, engine_name: str,
                 on_record: Callable[[TransferRecord], None] | None = None) -> None:
        self.layers = layers
        self.layout = layout
        self.local_host = local_host
        self.timeout = timedelta(seconds=timeout_s)
        self.engine_name = engine_name
        self.device = layers[0].device
        self._on_record = on_record or (lambda r: None)
        self._stop = threading.Event()
        self._store: TCPStore | None = None
        self._clients: dict[tuple[str, int], _PairClient] = {}
        self._clients_lock = threading.Lock()
        self._pairs: dict[int, dict] = {}   # prefill side: pair -> {"peer", "seq"}
        self._pairs_lock = threading.Lock()

    # ---------------------------------------------------------------- prefill side
    def serve(self, offers: OfferTable) -> tuple[str, int]:
        self._store = TCPStore(self.local_host, 0, is_master=True, wait_for_workers=False,
                               timeout=self.timeout)
        self._offers = offers
        threading.Thread(target=self._accept_loop, name="kv-accept", daemon=True).start()
        return self.local_host, self._store.port

    def _own_client(self) -> TCPStore:
        # A TCPStore connection serializes its commands: a thread blocked in wait() would
        # stall every other thread's wait on the same object. One connection per thread.
        return TCPStore(self.local_host, self._store.port, is_master=False, timeout=self.timeout)

    def _accept_loop(self) -> None:
        store, n = self._own_client(), 0
        while _blocking_wait(store, f"join/{n}", self._stop):
            info = json.loads(store.get(f"join/{n}"))
            if info.get("op") == "close":
                return
            peer = info.get("peer", f"pair{n}")
            try:
                self.layout.check_compatible(info.get("layout", "?"), local=self.engine_name,
                                             remote=peer)
            except LayoutMismatch as e:
                log.error("%s", e)
                store.set(f"joinack/{n}", json.dumps({"error": str(e)}))
                n += 1
                continue
            store.set(f"joinack/{n}", json.dumps({"ok": True}))
            threading.Thread(target=self._serve_pair, args=(n, peer), name=f"kv-serve-{n}",
                             daemon=True).start()
            n += 1

    def _serve_pair(self, pair: int, peer: str) -> None:
        store = self._own_client()
        try:
            pg = _make_pair_group(PrefixStore(f"pair/{pair}/", store), 0, self.local_host,
                                  self.device, self.timeout)
        except Exception as e:  # the peer died while joining
            log.error("KV pair %d with %s could not be formed: %s", pair, peer, e)
            return
        state = {"peer": peer, "seq": 0}
        with self._pairs_lock:
            self._pairs[pair] = state
        try:
            self._serve_loop(pair, peer, store, pg, state)
        finally:
            with self._pairs_lock:
                self._pairs.pop(pair, None)
            _shutdown_group(pg)

    def _serve_loop(self, pair: int, peer: str, store, pg, state: dict) -> None:
        while _blocking_wait(store, f"pull/{pair}/{state['seq']}", self._stop):
            seq = state["seq"]
            key = f"pull/{pair}/{seq}"
            msg = json.loads(store.get(key))
            store.delete_key(key)
            ack = f"ack/{pair}/{seq}"
            state["seq"] = seq + 1
            if msg["op"] == "close":
                break
            # Answer before the peer's own ack wait (the full timeout) gives up on us.
            offer = self._offers.claim(msg["transfer_id"], timeout=self.timeout.total_seconds() / 2)
            if offer is None:
                store.set(ack, json.dumps({"error": (
                    f"KV transfer {msg['transfer_id']} is unknown or expired on "
                    f"{self.engine_name}")}))
                continue
            if msg["op"] == "release":
                self._offers.finish(offer.req_id)
                store.set(ack, json.dumps({"ok": True}))
                continue
            blocks = offer.block_ids[msg["start_block"]:]
            if len(blocks) != msg["num_blocks"]:
                self._offers.finish(offer.req_id)
                store.set(ack, json.dumps({"error": (
                    f"decode asked for {msg['num_blocks']} blocks from block "
                    f"{msg['start_block']}, prefill holds {len(offer.block_ids)}")}))
                continue
            store.set(ack, json.dumps({"ok": True}))
            t0 = time.perf_counter()
            try:
                idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
                buf = self._scratch(len(blocks), state)
                for i, layer in enumerate(self.layers):
                    torch.index_select(layer, 0, idx, out=buf[i])
                works = [pg.send([c], 1, tag) for tag, c in enumerate(self._messages(buf))]
                _wait_all(works, self.timeout, self.device)
                err = ""
            except Exception as e:  # broken pair: free the blocks, drop the group
                err = f"{type(e).__name__}: {e}"
            finally:
                self._offers.finish(offer.req_id)
            self._on_record(TransferRecord(
                offer.transfer_id, peer, len(blocks), len(blocks) * self.layout.bytes_per_block,
                time.perf_counter() - t0, ok=not err, error=err))
            if err:
                log.error("KV send of transfer %d to %s failed: %s", offer.transfer_id, peer, err)
                break

    # ---------------------------------------------------------------- both sides
    def _scratch(self, n_blocks: int, cache: dict | None = None) -> torch.Tensor:
        """[layers, n_blocks, *block_shape]: all of a transfer's blocks in one buffer.

        With ``cache`` (one per pair: its transfers are sequential) the buffer is reused
        across transfers up to ``_SCRATCH_CACHE_BYTES``: a fresh multi-MiB buffer costs a
        page fault per 4 KiB on first touch, on both sides of every transfer."""
        shape = (len(self.layers), n_blocks, *self.layout.block_shape)
        numel = math.prod(shape)
        dtype = self.layers[0].dtype
        if cache is None or numel * dtype.itemsize > _SCRATCH_CACHE_BYTES:
            return torch.empty(shape, dtype=dtype, device=self.device)
        flat = cache.get("scratch")
        if flat is None or flat.numel() < numel:
            flat = cache["scratch"] = torch.empty(numel, dtype=dtype, device=self.device)
        return flat[:numel].view(shape)

    def _messages(self, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Few large messages (whole layers, up to _MAX_MESSAGE bytes each), split the same
        way on both sides: per-layer messages cost 3-4x in gloo's per-message overhead."""
        per_layer = buf[0].numel() * buf.element_size()
        return buf.split(max(1, _MAX_MESSAGE // max(1, per_layer)))

    # ---------------------------------------------------------------- decode side
    def _client(self, host: str, port: int) -> "_PairClient":
        with self._clients_lock:
            client = self._clients.get((host, port))
            if client is None or client.broken:
                client = _PairClient(self, host, port)
                self._clients[(host, port)] = client
            return client

    def pull(self, host: str, port: int, transfer_id: int, start_block: int,
             dst_block_ids: list[int]) -> TransferRecord:
        t0 = time.perf_counter()
        try:
            self._client(host, port).pull(transfer_id, start_block, dst_block_ids)
        except Exception as e:
            rec = TransferRecord(transfer_id, f"{host}:{port}", len(dst_block_ids), 0,
                                 time.perf_counter() - t0, ok=False,
                                 error=str(e))
            self._on_record(rec)
            raise TransferError(rec.error) from e
        rec = TransferRecord(transfer_id, f"{host}:{port}", len(dst_block_ids),
                             len(dst_block_ids) * self.layout.bytes_per_block,
                             time.perf_counter() - t0, ok=True)
        self._on_record(rec)
        return rec

    def release(self, host: str, port: int, transfer_id: int) -> None:
        self._client(host, port).release(transfer_id)

    def peers(self) -> list[str]:
        """Prefill side: the decode peers with a live pair group."""
        with self._pairs_lock:
            return sorted(p["peer"] for p in self._pairs.values())

    def prune(self, live_peers: set[str] | None = None,
              live_addresses: set[tuple[str, int]] | None = None) -> None:
        """Tear down pair groups whose other side left the cluster (by membership).

        Prefill side: ``live_peers`` are the decode engines still alive; a departed peer's
        serve thread is woken with a close message and its group shut down. Decode side:
        ``live_addresses`` are the prefill KV endpoints still alive.
        """
        if live_peers is not None and self._store is not None:
            with self._pairs_lock:
                gone = [(n, dict(st)) for n, st in self._pairs.items() if st["peer"] not in live_peers]
            for n, st in gone:
                try:
                    self._store.set(f"pull/{n}/{st['seq']}", json.dumps({"op": "close"}))
                except Exception:
                    pass
        if live_addresses is not None:
            with self._clients_lock:
                for addr in [a for a in self._clients if a not in live_addresses]:
                    self._clients.pop(addr).close()

    def close(self) -> None:
        self._stop.set()
        with self._clients_lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()
        if self._store is not None:
            # Wake the accept loop; serve loops see _stop within their idle wait.
            try:
                n = self._store.add("joins", 0)
                self._store.set(f"join/{n}", json.dumps({"op": "close"}))
            except Exception:
                pass


def _shutdown_group(pg) -> None:
    try:
        pg.shutdown()
    except Exception:
        pass


class _PairClient:
    """Decode side of one prefill↔decode pair; pulls are serialized per pair."""

    def __init__(self, transport: TorchDistTransport, host: str, port: int) -> None:
        self.t = transport
        self.broken = False
        self._lock = threading.Lock()
        self._cache: dict = {}            # reused receive buffer (pulls are serialized)
        timeout = transport.timeout
        self.store = TCPStore(host, port, is_master=False, timeout=timeout)
        n = self.store.add("joins", 1) - 1
        self.store.set(f"join/{n}", json.dumps(
            {"peer": transport.engine_name, "layout": transport.layout.fingerprint()}))
        self.store.wait([f"joinack/{n}"], timeout)
        ack = json.loads(self.store.get(f"joinack/{n}"))
        if "error" in ack:
            raise LayoutMismatch(ack["error"])
        self.pair = n
        self.pg = _make_pair_group(PrefixStore(f"pair/{n}/", self.store), 1,
                                   transport.local_host, transport.device, timeout)
        self.seq = 0

    def _request(self, msg: dict) -> None:
        seq = self.seq
        self.seq += 1
        self.store.set(f"pull/{self.pair}/{seq}", json.dumps(msg))
        ack_key = f"ack/{self.pair}/{seq}"
        self.store.wait([ack_key], self.t.timeout)
        ack = json.loads(self.store.get(ack_key))
        self.store.delete_key(ack_key)
        if "error" in ack:
            raise TransferError(ack["error"])

    def pull(self, transfer_id: int, start_block: int, dst_block_ids: list[int]) -> None:
        t = self.t
        with self._lock:
            if self.broken:
                raise TransferError("KV pair is broken")
            try:
                self._request({"op": "pull", "transfer_id": transfer_id,
                               "start_block": start_block, "num_blocks": len(dst_block_ids)})
                buf = t._scratch(len(dst_block_ids), self._cache)
                works = [self.pg.recv([c], 0, tag) for tag, c in enumerate(t._messages(buf))]
                _wait_all(works, t.timeout, t.device)
            except TransferError as e:
                if "timed out" in str(e):
                    self._break()
                raise
            except Exception:
                self._break()
                raise
            idx = torch.tensor(dst_block_ids, dtype=torch.long, device=t.device)
            for i, layer in enumerate(t.layers):
                layer.index_copy_(0, idx, buf[i])

    def release(self, transfer_id: int) -> None:
        with self._lock:
            self._request({"op": "release", "transfer_id": transfer_id})

    def _break(self) -> None:
        self.broken = True
        _shutdown_group(self.pg)

    def close(self) -> None:
        with self._lock:
            try:
                self.store.set(f"pull/{self.pair}/{self.seq}", json.dumps({"op": "close"}))
            except Exception:
                pass
            _shutdown_group(self.pg)


TRANSPORTS: dict[str, type[KVTransport]] = {TorchDistTransport.name: TorchDistTransport}
