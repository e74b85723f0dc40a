"""KV transport: how a prompt's blocks cross from prefill to decode.

Step 4 of the request path. The prefill engine's endpoint serves (:meth:`TorchDistTransport.serve`);
the decode engine's endpoint opens one pair per prefill peer, lazily, the first time a
handle names that peer. Control is tiny JSON messages on the prefill worker's ``TCPStore``
(join, pull, ack). Bytes move one of three ways, chosen per pair at join:

- **same host, CPU caches** (``mode: shm``): through a shared-memory segment of the pair
  (:mod:`kv_transfer.shm`): prefill gathers the blocks into it, decode scatters them out;
  no network, no serialization. Chosen when the decode peer proves it shares the prefill
  endpoint's ``/dev/shm`` and network namespace (``shared_memory`` on, the default).
- **same host, GPU caches** (``mode: cuda_ipc``, the same proof): the join's answer
  carries CUDA IPC handles of the prefill engine's cache (:mod:`kv_transfer.cuda_ipc`);
  decode maps them once and copies each prompt's blocks straight out of the prefill
  cache into its own, one device copy. Prefill keeps the blocks held until decode says
  ``fin/<ack>`` = done; at its timeout it takes them back with an atomic ``compare_set``
  of ``void``, and a decode copy that finishes later finds ``void`` and fails, so freed
  (reusable) blocks are never served. A decode that cannot map the handles asks for the
  group way from then on.
- **across hosts** (``mode: group``): a two-rank torch.distributed process group made for
  that pair alone (rank 0 = prefill, rank 1 = decode): gloo when the caches are on the
  CPU, NCCL when they are on a GPU.

Protocol for one pair (``n`` from the store's ``joins`` counter):
  decode  -> store  ``join/<n>``           {peer, layout, [shm, netns,] mac}
  prefill -> store  ``joinack/<n>``        {ok, mode} or {error}; mode group: both sides
                                           build the group
and for one request on it:
  decode  -> store  ``pull/<pair>/<seq>``  {op, transfer_id, start_block, num_blocks, mac}
  group:  prefill -> store ``ack/<pair>/<seq>`` {ok} or {error}, then sends the held
          blocks [start_block:] of every layer, whole blocks, packed into one
          [layers, blocks, ...] buffer as few large messages; decode receives into the
          same-shaped scratch, then ``index_copy_`` per layer
  cuda_ipc: prefill acks {ok, blocks}; decode copies them from the mapped cache and sets
          ``fin/<ack>`` (compare_set "" -> done, or abandon when its copy failed); at its
          timeout prefill sets void instead; the side that did not write the key deletes it
  shm:    prefill gathers the blocks into the pair's segment and acks {ok, segment,
          chunks}: a small transfer (chunks 0) once its bytes are in; a large one first,
          then ``ack/<pair>/<seq>/<j>`` as each layer chunk j is in. Decode maps the
          segment (once per segment) and ``index_copy_`` per layer as its chunk arrives.
          The next request on the pair is what tells prefill the segment may be reused.
A ``release`` op frees held blocks without sending (decode found them in its own prefix
cache, or its request was aborted before it was scheduled): it takes the offers' one
release route, :meth:`OfferTable.release`, as the prefill worker's own releases do. Held
blocks that nobody pulls or releases expire after ``hold_ttl_s``. A transfer that errors or
times out breaks its pair group; both sides drop it and the next pull makes a new one.

Trust: ``mac`` is an HMAC-SHA256 under the cluster's secret of the endpoint's nonce (the
store's ``nonce`` key, fresh per endpoint), the message's store key and its body, so the
secret itself never enters the store, which anyone who can connect may read. The server
checks every message (:func:`parse_join`, :func:`parse_request`) and refuses a bad one
with an error ack; no input ends the accept thread or a pair's serve thread. What it does
not protect (the store's keys, the group's rendezvous and bytes): docs/deploy.md, Security.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import logging
import secrets
import socket
import threading
from collections import deque
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, TCPStore

from kv_transfer import cuda_ipc, shm
from kv_transfer.layout import KVLayout, LayoutMismatch
from kv_transfer.staging import Staged

log = logging.getLogger(__name__)

_IDLE_WAIT = timedelta(seconds=60)  # how long a control wait blocks before re-checking
_MAX_MESSAGE = 64 << 20             # bytes per send/recv
# Per-pair reusable transfer buffer, up to this size (0 disables; larger transfers allocate).
_SCRATCH_CACHE_BYTES = int(os.environ.get("PREFT_KV_SCRATCH_CACHE_BYTES", 256 << 20))


# Same-host transfers of at least this many bytes are handed over in this many layer chunks.
_SHM_CHUNK_MIN_BYTES = int(os.environ.get("PREFT_KV_SHM_CHUNK_MIN_BYTES", 16 << 20))
_SHM_CHUNKS = 4

_LENT_POLL = timedelta(milliseconds=100)   # how often lent staged copies are checked
_MAPPED_SEGMENTS = 8               # decode side: segments kept mapped per pair
_MAX_CONTROL_BYTES = 4096          # a control message is ~200 bytes; larger ones are refused
_MAX_NAME = 256                    # characters of a peer name or layout fingerprint
_MAX_TRANSFER_ID = (1 << 63) - 1


class TransferError(RuntimeError):
    """A KV transfer failed; the request it belonged to cannot continue on this path."""


class BadMessage(ValueError):
    """A control message that failed its checks: refused with an error, never fatal."""


@dataclass(frozen=True)
class JoinRequest:
    """A decode peer asks to form a pair (checked: authentic, names within limits)."""

    peer: str
    layout: str
    shm_token: str = ""      # the prefill endpoint's probe token, read from /dev/shm
    netns: str = ""          # the peer's network namespace
    cuda_ipc: bool = False   # the peer's caches are on a GPU and it can map CUDA IPC handles


@dataclass(frozen=True)
class PairRequest:
    """One request on a formed pair (checked: authentic, op known, numbers in range)."""

    op: str                  # "pull" | "release" | "close"
    transfer_id: int = -1
    start_block: int = 0
    num_blocks: int = 0


def _mac(secret: str, nonce: str, key: str, body: dict) -> str:
    data = "\n".join((nonce, key, json.dumps(body, sort_keys=True, separators=(",", ":"))))
    return hmac.new(secret.encode(), data.encode(), hashlib.sha256).hexdigest()


def sign(secret: str, nonce: str, key: str, body: dict) -> str:
    """The control message ``body`` as stored under ``key`` on the endpoint with ``nonce``."""
    return json.dumps({**body, "mac": _mac(secret, nonce, key, body)})


def _open(raw: bytes, secret: str, nonce: str, key: str) -> dict:
    """Parse one control message read from ``key`` and check its MAC."""
    if len(raw) > _MAX_CONTROL_BYTES:
        raise BadMessage(f"{len(raw)} bytes; control messages are at most {_MAX_CONTROL_BYTES}")
    try:
        msg = json.loads(raw)
    except Exception as e:  # ValueError, UnicodeDecodeError, RecursionError
        raise BadMessage(f"not JSON ({type(e).__name__})") from None
    if not isinstance(msg, dict):
        raise BadMessage(f"expected a JSON object, got {type(msg).__name__}")
    mac = msg.pop("mac", None)
    if not isinstance(mac, str) or not hmac.compare_digest(
            mac.encode(), _mac(secret, nonce, key, msg).encode()):
        raise BadMessage("missing or wrong cluster secret (the peer is not of this cluster)")
    return msg


def _int(msg: dict, name: str, lo: int, hi: int) -> int:
    v = msg.get(name)
    if type(v) is not int or not lo <= v <= hi:   # bool is not a count
        raise BadMessage(f"{name}={v!r:.40}: expected an integer in [{lo}, {hi}]")
    return v


def _name(msg: dict, name: str) -> str:
    v = msg.get(name)
    if not isinstance(v, str) or not 0 < len(v) <= _MAX_NAME:
        raise BadMessage(f"{name}={v!r:.40}: expected a string of 1-{_MAX_NAME} characters")
    return v


def parse_join(raw: bytes, secret: str, nonce: str, key: str) -> JoinRequest:
    msg = _open(raw, secret, nonce, key)
    same_host = {k: _name(msg, k) for k in ("shm", "netns") if k in msg}
    ipc = msg.get("cuda_ipc", False)
    if type(ipc) is not bool:
        raise BadMessage(f"cuda_ipc={ipc!r:.40}: expected true or false")
    return JoinRequest(peer=_name(msg, "peer"), layout=_name(msg, "layout"),
                       shm_token=same_host.get("shm", ""), netns=same_host.get("netns", ""),
                       cuda_ipc=ipc)


def parse_request(raw: bytes, secret: str, nonce: str, key: str, capacity: int) -> PairRequest:
    """``capacity``: blocks in the serving cache, the bound on any block index or count."""
    msg = _open(raw, secret, nonce, key)
    op = msg.get("op")
    if op == "close":
        return PairRequest("close")
    if op not in ("pull", "release"):
        raise BadMessage(f"op={op!r:.40}: expected pull, release or close")
    tid = _int(msg, "transfer_id", 0, _MAX_TRANSFER_ID)
    if op == "release":
        return PairRequest("release", tid)
    start = _int(msg, "start_block", 0, capacity - 1)
    return PairRequest("pull", tid, start, _int(msg, "num_blocks", 1, capacity - start))


def _read_ack(store, key: str) -> dict:
    """Decode side: the endpoint's answer under ``key`` (waited for by the caller)."""
    try:
        ack = json.loads(store.get(key))
    except ValueError:
        ack = None
    store.delete_key(key)
    if not isinstance(ack, dict):
        raise TransferError(f"malformed answer from the KV endpoint under {key}")
    if "error" in ack:
        raise TransferError(str(ack["error"]))
    return ack


@dataclass
class Offer:
    """One finished prompt's KV a prefill engine keeps for decode: its cache blocks (held,
    delay-freed), or, when its forward staged them layer by layer, the staged copy (the
    blocks were freed when the request finished)."""

    transfer_id: int
    req_id: str                 # vLLM's internal request id (what get_finished reports)
    block_ids: list[int]        # held cache blocks; [] when staged
    num_tokens: int
    expires_at: float
    staged: Staged | None = None

    @property
    def num_blocks(self) -> int:
        return self.staged.num_blocks if self.staged is not None else len(self.block_ids)


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
    transport: str = ""      # shm | cuda_ipc | gloo | nccl
    pipelined: bool = False  # staged layer by layer during prefill (no gather at pull)
    exposed_s: float | None = None   # decode: what the request waited for (None: seconds)

    @property
    def exposed(self) -> float:
        return self.seconds if self.exposed_s is None else self.exposed_s


class TransferLog:
    """The last transfers an engine recorded (oldest first), and each one by transfer id
    until its request takes it (:meth:`pop`). Thread-safe; bounded."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._capacity = capacity
        self._records: deque[TransferRecord] = deque(maxlen=capacity)
        self._by_transfer: dict[int, TransferRecord] = {}

    def add(self, rec: TransferRecord) -> None:
        with self._lock:
            self._records.append(rec)
            self._by_transfer[rec.transfer_id] = rec
            if len(self._by_transfer) > self._capacity:
                self._by_transfer.pop(next(iter(self._by_transfer)))

    def records(self) -> list[TransferRecord]:
        with self._lock:
            return list(self._records)

    def pop(self, transfer_id: int) -> TransferRecord | None:
        with self._lock:
            return self._by_transfer.pop(transfer_id, None)


_MAX_RELEASED = 1 << 16            # remembered early releases (each a few dozen bytes)


class OfferTable:
    """Prefill side: held blocks by transfer id. Thread-safe; no method waits but ``claim``.

    The engine thread adds offers (the connector's scheduler side) and collects finished
    request ids; serve threads claim offers for pulls. A claim may arrive before the offer
    does (the router is faster than the engine's next step), so ``claim`` waits a little.

    :meth:`release` is the one release route (the worker's own, and the decode side's
    ``release`` op through a serve thread) and never waits: an offer not here yet is
    remembered as released, and freed the moment it arrives. ``expires_at`` is the
    fallback: :meth:`take_finished` frees what nobody pulled or released in time.
    """

    def __init__(self, release_ttl_s: float = 600.0,
                 on_finish: Callable[[], None] | None = None) -> None:
        self._cv = threading.Condition()
        self._offers: dict[int, Offer] = {}
        self._finished: set[str] = set()
        self._released: dict[int, float] = {}   # transfer id -> forget after (monotonic)
        self._release_ttl_s = release_ttl_s
        self._on_finish = on_finish or (lambda: None)
        self.expired = 0

    def add(self, offer: Offer) -> None:
        with self._cv:
            early = offer.transfer_id in self._released   # kept: a pull of it is refused
            if early:
                self._drop_locked(offer)           # released before it arrived: free it now
            else:
                self._offers[offer.transfer_id] = offer
                self._cv.notify_all()
        if early:
            self._on_finish()

    def claim(self, transfer_id: int, timeout: float) -> Offer | None:
        """The offer, for a pull; None if it is unknown after ``timeout`` or released."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while transfer_id not in self._offers:
                left = deadline - time.monotonic()
                if left <= 0 or transfer_id in self._released:
                    return None
                self._cv.wait(left)
            return self._offers.pop(transfer_id)

    def finish(self, offer: Offer) -> None:
        """A claimed offer's held blocks may be freed (sent, or the pull refused). A staged
        offer's copy is the transport's to recycle once the peer has read it."""
        if offer.staged is None:
            with self._cv:
                self._finished.add(offer.req_id)
            self._on_finish()

    def _drop_locked(self, offer: Offer) -> None:
        """Nobody will read ``offer``: free its blocks, or recycle its staged copy."""
        if offer.staged is None:
            self._finished.add(offer.req_id)
        else:
            offer.staged.recycle()

    def release(self, transfer_id: int) -> bool:
        """Free ``transfer_id``'s blocks without sending them; never waits.

        True when held blocks were freed now; False when the offer is not here (already
        pulled or expired, or not yet arrived: then it is freed on arrival)."""
        now = time.monotonic()
        with self._cv:
            offer = self._offers.pop(transfer_id, None)
            if offer is None:
                self._released[transfer_id] = now + self._release_ttl_s
                while len(self._released) > _MAX_RELEASED:
                    self._released.pop(next(iter(self._released)))
                self._cv.notify_all()             # a waiting claim gives up now
                return False
            self._drop_locked(offer)
        self._on_finish()
        return True

    def take_finished(self, now: float | None = None) -> set[str]:
        """Request ids whose blocks may be freed: transferred, released or expired."""
        now = time.monotonic() if now is None else now
        with self._cv:
            for tid in [t for t, o in self._offers.items() if o.expires_at <= now]:
                offer = self._offers.pop(tid)
                self._drop_locked(offer)
                self.expired += 1
                log.warning("KV transfer %d expired unpulled; freeing %d blocks",
                            tid, offer.num_blocks)
            for tid in [t for t, until in self._released.items() if until <= now]:
                del self._released[tid]
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


def _bound_store(host: str, timeout: timedelta) -> TCPStore:
    """A TCPStore server that listens on ``host`` only.

    Given a host and port, TCPStore's server listens on every interface; handed a socket
    already bound to ``host`` (``master_listen_fd``, libuv backend) it listens on that."""
    family, _, _, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind(addr)
        sock.listen(128)
        store = TCPStore(host, sock.getsockname()[1], is_master=True, wait_for_workers=False,
                         timeout=timeout, master_listen_fd=sock.fileno(), use_libuv=True)
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server owns the descriptor now
    return store


def _wait_all(works, timeout: timedelta, device: torch.device) -> None:
    for w in works:
        if not w.wait(timeout):
            raise TransferError(f"KV transfer timed out after {timeout.total_seconds()} s")
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class TorchDistTransport:
    """Pairwise torch.distributed groups, created lazily; gloo on CPU, NCCL on GPU.

    The one KV transport: one instance per engine (owned by its
    :class:`~kv_transfer.endpoint.KVEndpoint`); ``serve`` on prefill, ``pull`` and
    ``release`` on decode. No abstract base until a second transport lands.
    """

    name = "torch_dist"

    def __init__(self, layers: list[torch.Tensor], layout: KVLayout, *, local_host: str,
                 timeout_s: float, engine_name: str,
                 on_record: Callable[[TransferRecord], None] | None = None,
                 secret: str = "", shared_memory: bool = True,
                 lend_s: float = 120.0) -> None:
        self.layers = layers
        self._lend_s = lend_s   # prefill: how long a peer may keep reading a staged copy
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
        self._secret = secret               # the cluster's; never stored, logged or sent
        self._nonce = ""                    # prefill side: this endpoint's, in the store
        self.refused = 0                    # prefill side: control messages refused
        # Same-host pairs (proved through /dev/shm): CPU caches share a segment, GPU caches
        # CUDA IPC handles.
        self.shared_memory = shared_memory and shm.available()
        self.same_host_mode = "cuda_ipc" if self.device.type == "cuda" else "shm"
        self._probe: shm.Probe | None = None
        self._ipc_export: dict | None = None   # prefill side: our caches' handles, made once
        self.ipc_refused = False               # decode side: CUDA could not map a peer's
        self.group_name = "nccl" if self.device.type == "cuda" else "gloo"

    # ---------------------------------------------------------------- prefill side
    def serve(self, offers: OfferTable) -> tuple[str, int]:
        if not self._secret:
            log.warning("KV endpoint of %s has no cluster secret: any peer that reaches it "
                        "may pair and pull", self.engine_name)
        self._store = _bound_store(self.local_host, self.timeout)
        self._nonce = secrets.token_hex(16)
        self._store.set("nonce", self._nonce)
        if self.shared_memory:
            shm.sweep_stale()
            self._probe = shm.Probe()
            self._store.set("shm_probe", self._probe.name)
        self._offers = offers
        threading.Thread(target=self._accept_loop, name="kv-accept", daemon=True).start()
        return self.local_host, self._store.port

    def _own_client(self) -> TCPStore:
        # A TCPStore connection serializes its commands: a thread blocked in wait() would
        # stall every other thread's wait on the same object. One connection per thread.
        return TCPStore(self.local_host, self._store.port, is_master=False, timeout=self.timeout)

    def _accept_loop(self) -> None:
        """Answer join n, then n+1, ...; a bad or abandoned join is refused, never fatal."""
        store, n = self._own_client(), 0
        while (state := self._wait_join(store, n)) != "stop":
            try:
                if state == "stale":
                    self._refuse(store, f"joinack/{n}", f"join {n} was claimed but not "
                                 f"written within {2 * self.timeout.total_seconds():g} s")
                else:
                    self._accept_one(store, n)
            except Exception:
                log.exception("KV endpoint %s: join %d failed; still accepting",
                              self.engine_name, n)
            n += 1

    def _wait_join(self, store, n: int) -> str:
        """Wait for join/n: "ready" once it is written; "stale" when its slot stayed claimed
        (``joins`` > n) but empty for a whole timeout (its peer died between add and set,
        or never meant to write); "stop" once the endpoint closes."""
        key, claimed = f"join/{n}", False
        while not self._stop.is_set():
            try:
                store.wait([key], self.timeout)
                return "stop" if self._stop.is_set() else "ready"
            except dist.DistStoreError:
                pass
            if store.add("joins", 0) > n:
                if claimed:
                    return "stale"
                claimed = True
        return "stop"

    def _accept_one(self, store, n: int) -> None:
        key, ack = f"join/{n}", f"joinack/{n}"
        raw = store.get(key)
        store.delete_key(key)
        try:
            join = parse_join(raw, self._secret, self._nonce, key)
            self.layout.check_compatible(join.layout, local=self.engine_name, remote=join.peer)
        except LayoutMismatch as e:
            self._refuse(store, ack, str(e))
            return
        except BadMessage as e:
            self._refuse(store, ack, f"refusing to pair {self.engine_name} with join {n}: {e}")
            return
        same_host = self._probe is not None and self._probe.admits(join.shm_token, join.netns)
        answer = self._same_host_answer(join) if same_host else {"mode": "group"}
        mode = answer["mode"]
        store.set(ack, json.dumps({"ok": True, **answer}))
        threading.Thread(target=self._serve_pair, args=(n, join.peer, mode),
                         name=f"kv-serve-{n}", daemon=True).start()

    def _same_host_answer(self, join: JoinRequest) -> dict:
        """The pair's mode for a peer on this host, and what the peer needs for it."""
        if self.same_host_mode == "shm":
            return {"mode": "shm"}
        if not join.cuda_ipc:
            return {"mode": "group"}
        try:
            if self._ipc_export is None:
                self._ipc_export = cuda_ipc.export(self.layers)
        except Exception as e:   # an allocation CUDA cannot share: the network way
            log.warning("KV endpoint %s: no CUDA IPC handles (%s); pairing over %s",
                        self.engine_name, e, self.group_name)
            return {"mode": "group"}
        return {"mode": "cuda_ipc", "ipc": self._ipc_export}

    def _refuse(self, store, ack: str, why: str) -> None:
        log.error("KV endpoint %s: %s", self.engine_name, why)
        with self._pairs_lock:
            self.refused += 1
        store.set(ack, json.dumps({"error": why}))

    def _serve_pair(self, pair: int, peer: str, mode: str) -> None:
        store, pg = self._own_client(), None
        if mode == "group":
            try:
                pg = _make_pair_group(PrefixStore(f"pair/{pair}/", store), 0, self.local_host,
                                      self.device, self.timeout)
            except Exception as e:  # the peer died while joining
                log.error("KV pair %d with %s could not be formed: %s", pair, peer, e)
                return
        state = {"peer": peer, "seq": 0, "mode": mode, "segment": None,
                 "lent": []}      # staged copies the peer reads: (done key, staged, deadline)
        with self._pairs_lock:
            self._pairs[pair] = state
        try:
            self._serve_loop(pair, peer, store, pg, state)
        finally:
            with self._pairs_lock:
                self._pairs.pop(pair, None)
            if state["segment"] is not None:
                state["segment"].close()
            for _, staged, _ in state["lent"]:
                staged.discard()   # the peer may still read them: never reused
            if pg is not None:
                _shutdown_group(pg)

    def _serve_loop(self, pair: int, peer: str, store, pg, state: dict) -> None:
        capacity = self.layers[0].shape[0]
        while self._next_request(store, f"pull/{pair}/{state['seq']}", state):
            seq = state["seq"]
            state["seq"] = seq + 1
            key, ack = f"pull/{pair}/{seq}", f"ack/{pair}/{seq}"
            try:
                raw = store.get(key)
                store.delete_key(key)
                req = parse_request(raw, self._secret, self._nonce, key, capacity)
                if req.op == "close":
                    break
                if not self._answer(req, peer, store, ack, pg, state):
                    break
            except BadMessage as e:
                self._refuse(store, ack, f"KV pair {pair} with {peer}: {e}")
            except Exception:  # one request's failure never ends the pair's thread
                log.exception("KV pair %d with %s: request %d failed", pair, peer, seq)

    def _next_request(self, store, key: str, state: dict) -> bool:
        """Wait for the pair's next request (``key``); meanwhile take back the staged copies
        the peer has finished reading. False once the endpoint stops."""
        while not self._stop.is_set():
            self._settle_lent(store, state)
            try:
                store.wait([key], _LENT_POLL if state["lent"] else _IDLE_WAIT)
                return True
            except dist.DistStoreError:
                continue
        return False

    def _settle_lent(self, store, state: dict) -> None:
        """Recycle each lent staged copy whose ``done`` key the peer set; discard (never
        reuse) one it has not released by its deadline."""
        keep, now = [], time.monotonic()
        for done, staged, deadline in state["lent"]:
            if store.check([done]):
                store.delete_key(done)
                staged.recycle()
            elif now > deadline:
                staged.discard()
            else:
                keep.append((done, staged, deadline))
        state["lent"] = keep

    def _answer(self, req: PairRequest, peer: str, store, ack: str, pg, state: dict) -> bool:
        """Serve one checked pull or release; False when the pair's group broke."""
        if req.op == "release":  # the offers' one release route; it never waits
            self._offers.release(req.transfer_id)
            store.set(ack, json.dumps({"ok": True}))
            return True
        # Answer before the peer's own ack wait (the full timeout) gives up on us.
        offer = self._offers.claim(req.transfer_id, timeout=self.timeout.total_seconds() / 2)
        if offer is None:
            store.set(ack, json.dumps({"error": (  # released: as gone as expired
                f"KV transfer {req.transfer_id} is unknown or expired on {self.engine_name}")}))
            return True
        n, err, t0 = offer.num_blocks - req.start_block, "", time.perf_counter()
        try:
            if n != req.num_blocks:
                if offer.staged is not None:
                    offer.staged.recycle()
                raise BadMessage(f"decode asked for {req.num_blocks} blocks from block "
                                 f"{req.start_block}, prefill holds {offer.num_blocks}")
            err = self._deliver(offer, req.start_block, store, ack, pg, state)
        finally:  # transferred or refused: the engine may free held blocks
            self._offers.finish(offer)
        self._on_record(TransferRecord(
            offer.transfer_id, peer, n, n * self.layout.bytes_per_block,
            time.perf_counter() - t0, ok=not err, error=err,
            transport=self.group_name if pg is not None else state["mode"],
            pipelined=offer.staged is not None))
        if err:
            log.error("KV send of transfer %d to %s failed: %s", offer.transfer_id, peer, err)
        return not err or pg is None   # a failed copy into shared memory breaks no group

    def _deliver(self, offer: Offer, start: int, store, ack: str, pg, state: dict) -> str:
        """Move the offer's blocks [start:] to the peer the pair's way and ack; the error
        text, or "" """
        if offer.staged is not None:
            return self._deliver_staged(offer.staged, start, store, ack, pg, state)
        blocks = offer.block_ids[start:]
        if pg is not None:   # ack first: the peer posts its receives on it
            store.set(ack, json.dumps({"ok": True}))
            return self._send(blocks, pg, state)
        if state["mode"] == "cuda_ipc":
            return self._lend_blocks(blocks, store, ack)
        return self._gather_into_segment(blocks, store, ack, state)

    def _lend_blocks(self, blocks: list[int], store, ack: str) -> str:
        """CUDA IPC: the peer copies ``blocks`` straight out of our cache (mapped at join).
        They stay held until it sets ``fin/<ack>`` = done; at the timeout this side sets it
        to void first (atomically: whichever writes first wins), so a copy finishing later
        is refused on the peer's side rather than served from blocks we free now."""
        fin = f"fin/{ack}"
        store.set(ack, json.dumps({"ok": True, "blocks": blocks}))
        with contextlib.suppress(dist.DistStoreError):
            store.wait([fin], self.timeout)
        outcome = store.compare_set(fin, "", "void")
        if outcome != b"void":   # the peer's (done, or abandoned): it no longer reads it
            store.delete_key(fin)
        if outcome == b"done":
            return ""
        return (f"the peer did not finish copying within {self.timeout.total_seconds():g} s "
                "(or failed); the blocks were taken back")

    def _deliver_staged(self, staged: Staged, start: int, store, ack: str, pg,
                        state: dict) -> str:
        """A prompt the forward staged: nothing to gather. Same host: the peer copies
        straight out of the staged segment, now or layer by layer during its forward, and
        sets ``done/<ack>`` when it has finished reading (then the copy is reused; if it
        never does, it is discarded at its deadline). Group: sent as it lies."""
        if pg is not None:
            store.set(ack, json.dumps({"ok": True, "pipelined": True}))
            try:
                _wait_all([pg.send([c], 1, tag) for tag, c in enumerate(
                    self._messages(staged.buf[:, start:].contiguous()))],
                    self.timeout, self.device)
            except Exception as e:
                staged.discard()
                return f"{type(e).__name__}: {e}"
            staged.recycle()
            return ""
        state["lent"].append((f"done/{ack}", staged, time.monotonic() + self._lend_s))
        store.set(ack, json.dumps({"ok": True, "pipelined": True, "chunks": 0,
                                   "segment": staged.segment.name,
                                   "staged_blocks": staged.num_blocks, "offset": start}))
        return ""

    def _gather_into_segment(self, blocks: list[int], store, ack: str, state: dict) -> str:
        """Copy ``blocks`` of every layer into the pair's segment (grown when too small).

        A small transfer is acked once its bytes are in (``chunks: 0``). A large one is
        acked first and then signalled chunk by chunk (``<ack>/<j>``, layers split evenly),
        so the peer scatters chunk j while this side gathers chunk j+1: the two copies
        overlap instead of adding up."""
        shape = (len(self.layers), len(blocks), *self.layout.block_shape)
        try:
            seg = self._segment(math.prod(shape), state)
        except Exception as e:
            err = f"{type(e).__name__}: {e}"
            store.set(ack, json.dumps({"error": f"no shared-memory segment for KV: {err}"}))
            return err
        buf, idx = seg.view(shape), torch.tensor(blocks, dtype=torch.long)
        k = (min(_SHM_CHUNKS, len(self.layers))
             if buf.numel() * buf.element_size() >= _SHM_CHUNK_MIN_BYTES else 0)
        if k:
            store.set(ack, json.dumps({"ok": True, "segment": seg.name, "chunks": k}))
        for j, (lo, hi) in enumerate(layer_chunks(len(self.layers), max(1, k))):
            try:
                for i in range(lo, hi):
                    torch.index_select(self.layers[i], 0, idx, out=buf[i])
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
                store.set(f"{ack}/{j}" if k else ack, json.dumps({"error": err}))
                return err
            if k:
                store.set(f"{ack}/{j}", json.dumps({"ok": True}))
        if not k:
            store.set(ack, json.dumps({"ok": True, "segment": seg.name, "chunks": 0}))
        return ""

    def _segment(self, numel: int, state: dict) -> "shm.Segment":
        seg: shm.Segment | None = state["segment"]
        if seg is None or seg.numel < numel:
            if seg is not None:
                seg.close()   # the peer mapped it already; it maps the new one by name
            seg = state["segment"] = shm.Segment.create(numel, self.layers[0].dtype)
        return seg

    def _send(self, blocks: list[int], pg, state: dict) -> str:
        """Send ``blocks`` of every layer to rank 1; the error text, or "" when sent."""
        try:
            idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
            buf = self._scratch(len(blocks), state)
            for i, layer in enumerate(self.layers):
                torch.index_select(layer, 0, idx, out=buf[i])
            works = [pg.send([c], 1, tag) for tag, c in enumerate(self._messages(buf))]
            _wait_all(works, self.timeout, self.device)
            return ""
        except Exception as e:  # broken pair: free the blocks, drop the group
            return f"{type(e).__name__}: {e}"

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
                                 time.perf_counter() - t0, ok=False,
                                 error=str(e))
            self._on_record(rec)
            raise TransferError(rec.error) from e
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
        gloo | nccl); "" when there is none yet."""
        with self._clients_lock:
            client = self._clients.get((host, port))
            return client.transport if client is not None and not client.broken else ""

    def claim(self, host: str, port: int, transfer_id: int, num_blocks: int) -> "Claim":
        """Decode side, same-host pair, staged transfer: ask for all of its blocks and map
        them without copying; the caller copies them (layer by layer, during its forward)
        and then :meth:`Claim.release` s them."""
        return self._client(host, port).claim(transfer_id, num_blocks)

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
                key = f"pull/{n}/{st['seq']}"
                try:
                    self._store.set(key, sign(self._secret, self._nonce, key, {"op": "close"}))
                except Exception:
                    pass
        if live_addresses is not None:
            with self._clients_lock:
                for addr in [a for a in self._clients if a not in live_addresses]:
                    self._clients.pop(addr).close()

    def close(self) -> None:
        self._stop.set()
        if self._probe is not None:
            self._probe.close()
        with self._pairs_lock:   # unlink now: serve threads notice the stop later
            for state in self._pairs.values():
                if state.get("segment") is not None:
                    state["segment"].close()
        with self._clients_lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()
        if self._store is not None:
            # Wake the accept loop (it sees _stop); serve loops see it within their idle wait.
            try:
                n = self._store.add("joins", 0)
                self._store.set(f"join/{n}", json.dumps({"op": "close"}))
            except Exception:
                pass


_MAX_RUNS = 16   # more runs of consecutive blocks than this: gather + scatter instead


def block_runs(dst: list[int], src: list[int]) -> list[tuple[int, int, int]]:
    """(dst start, src start, length) of each stretch where both ids go up by one."""
    runs: list[list[int]] = []
    for d, s in zip(dst, src):
        if runs and d == runs[-1][0] + runs[-1][2] and s == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([d, s, 1])
    return [tuple(r) for r in runs]


def copy_blocks(dst_layers: list, dst: list[int], src_layers: list, src: list[int]) -> None:
    """``dst_layers[i][dst[j]] = src_layers[i][src[j]]`` for every layer i and block j. Few
    runs of consecutive blocks: one multi-tensor copy of whole slices (on a GPU one launch
    for every layer, not two kernels per layer); else a gather and a scatter per layer."""
    runs = block_runs(dst, src)
    if len(runs) <= _MAX_RUNS and hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_([d[a:a + n] for d in dst_layers for a, _, n in runs],
                             [s[b:b + n] for s in src_layers for _, b, n in runs])
        return
    device = dst_layers[0].device
    di = torch.tensor(dst, dtype=torch.long, device=device)
    si = torch.tensor(src, dtype=torch.long, device=device)
    for d, s in zip(dst_layers, src_layers):
        d.index_copy_(0, di, s.index_select(0, si))


def layer_chunks(n_layers: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous layer ranges, as even as can be; both sides of a pair compute them."""
    k = max(1, min(k, n_layers))
    return [(j * n_layers // k, (j + 1) * n_layers // k) for j in range(k)]


def _shutdown_group(pg) -> None:
    try:
        pg.shutdown()
    except Exception:
        pass


@dataclass
class Claim:
    """A staged transfer mapped on the decode side, not yet copied: ``blocks`` is
    ``[layers, num_blocks, *block_shape]`` in the prefill endpoint's staged segment."""

    transfer_id: int
    blocks: torch.Tensor
    done_key: str
    store: object
    claimed_s: float                 # request -> mapped (the control round trip)
    _released: bool = False

    def release(self) -> None:
        """Finished reading (or never will): the prefill side may reuse the segment."""
        if not self._released:
            self._released = True
            try:
                self.store.set(self.done_key, "1")
            except Exception:   # the endpoint is gone; it discards at its deadline
                pass


class _PairClient:
    """Decode side of one prefill↔decode pair; pulls are serialized per pair."""

    def __init__(self, transport: TorchDistTransport, host: str, port: int) -> None:
        self.t = transport
        self.broken = False
        self._lock = threading.Lock()
        self._cache: dict = {}            # reused receive buffer (pulls are serialized)
        self.segments: dict[str, shm.Segment] = {}   # mapped, least recently used first
        timeout = transport.timeout
        self.store = TCPStore(host, port, is_master=False, timeout=timeout)
        self.nonce = self.store.get("nonce").decode()
        n = self.store.add("joins", 1) - 1
        self.store.set(f"join/{n}", self._sign(f"join/{n}", {
            "peer": transport.engine_name, "layout": transport.layout.fingerprint(),
            **self._same_host_proof()}))
        self.store.wait([f"joinack/{n}"], timeout)
        ack = _read_ack(self.store, f"joinack/{n}")
        mode = ack.get("mode", "group")
        self.pair, self.seq = n, 0
        self.pg = None
        self.peer_layers: list[torch.Tensor] = []   # cuda_ipc: the prefill cache, mapped
        if mode == "cuda_ipc":
            self._map_peer(ack.get("ipc"))
        elif mode != "shm":
            self.pg = _make_pair_group(PrefixStore(f"pair/{n}/", self.store), 1,
                                       transport.local_host, transport.device, timeout)
        self.transport = transport.group_name if self.pg is not None else mode

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
            self.close()
            raise TransferError(f"CUDA IPC pairing failed: {e}") from e

    def _same_host_proof(self) -> dict:
        """The prefill endpoint's probe token, when this process can read its /dev/shm."""
        if not self.t.shared_memory or not self.store.check(["shm_probe"]):
            return {}
        token = shm.read_probe(self.store.get("shm_probe").decode(errors="replace"))
        if not token or not shm.netns():
            return {}
        ipc = self.t.same_host_mode == "cuda_ipc" and not self.t.ipc_refused
        return {"shm": token, "netns": shm.netns(), **({"cuda_ipc": True} if ipc else {})}

    def _sign(self, key: str, body: dict) -> str:
        return sign(self.t._secret, self.nonce, key, body)

    def _request(self, msg: dict) -> tuple[dict, str]:
        """Send one request on the pair; its ack and the ack's key."""
        seq = self.seq
        self.seq += 1
        key = f"pull/{self.pair}/{seq}"
        self.store.set(key, self._sign(key, msg))
        ack_key = f"ack/{self.pair}/{seq}"
        self.store.wait([ack_key], self.t.timeout)
        return _read_ack(self.store, ack_key), ack_key

    def pull(self, transfer_id: int, start_block: int, dst_block_ids: list[int]) -> bool:
        """Copy the transfer's blocks into ours; True when prefill had staged them."""
        t = self.t
        with self._lock:
            if self.broken:
                raise TransferError("KV pair is broken")
            with self._breaks_on_loss():
                ack, ack_key = self._request({"op": "pull", "transfer_id": transfer_id,
                                              "start_block": start_block,
                                              "num_blocks": len(dst_block_ids)})
                idx = torch.tensor(dst_block_ids, dtype=torch.long, device=t.device)
                if self.pg is not None:
                    buf = self._receive(len(dst_block_ids))
                    for i, layer in enumerate(t.layers):
                        layer.index_copy_(0, idx, buf[i])
                elif self.peer_layers:
                    self._copy_from_peer(ack, ack_key, idx)
                else:
                    self._scatter_from_segment(ack, ack_key, idx)
                return ack.get("pipelined") is True

    @contextlib.contextmanager
    def _breaks_on_loss(self):
        """An exchange on the pair that fails breaks it (the next use makes a new one),
        unless the endpoint answered with an error: then the pair is in step and kept."""
        try:
            yield
        except TransferError as e:
            if "timed out" in str(e):
                self._break()
            raise
        except Exception:
            self._break()
            raise

    def _receive(self, n_blocks: int) -> torch.Tensor:
        t = self.t
        buf = t._scratch(n_blocks, self._cache)
        works = [self.pg.recv([c], 0, tag) for tag, c in enumerate(t._messages(buf))]
        _wait_all(works, t.timeout, t.device)
        return buf

    def _scatter_from_segment(self, ack: dict, ack_key: str, idx: torch.Tensor) -> None:
        """Copy the blocks out of the pair's segment into ours, chunk by chunk as the prefill
        side signals each (``chunks: 0``: all of them are in already)."""
        t, k = self.t, ack.get("chunks", 0)
        if type(k) is not int or not 0 <= k <= len(t.layers):
            raise TransferError(f"malformed answer from the KV endpoint: chunks={k!r:.40}")
        try:
            buf = self._mapped(ack, len(idx))
            for j, (lo, hi) in enumerate(layer_chunks(len(t.layers), max(1, k))):
                if k:
                    key = f"{ack_key}/{j}"
                    self.store.wait([key], t.timeout)
                    _read_ack(self.store, key)
                for i in range(lo, hi):
                    t.layers[i].index_copy_(0, idx, buf[i])
        finally:
            if ack.get("pipelined") is True:   # done reading its staged segment
                self.store.set(f"done/{ack_key}", "1")

    def _copy_from_peer(self, ack: dict, ack_key: str, idx: torch.Tensor) -> None:
        """cuda_ipc: copy the acked blocks out of the mapped prefill cache into ours, wait
        for the copy, then claim ``fin/<ack>`` = done. If prefill's timeout claimed it
        first (void), its blocks may already be reused: the copy is refused."""
        t, fin = self.t, f"fin/{ack_key}"
        blocks = ack.get("blocks")
        cap = self.peer_layers[0].shape[0]
        try:
            if (not isinstance(blocks, list) or len(blocks) != len(idx)
                    or any(type(b) is not int or not 0 <= b < cap for b in blocks)):
                raise TransferError(f"malformed answer from the KV endpoint: blocks="
                                    f"{blocks!r:.60} for {len(idx)} blocks")
            copy_blocks(t.layers, idx.tolist(), self.peer_layers, blocks)
            if t.device.type == "cuda":   # the bytes are in before prefill may free them
                torch.cuda.current_stream(t.device).synchronize()
        except BaseException:
            self.store.compare_set(fin, "", "abandon")   # prefill may free its blocks now
            raise
        if self.store.compare_set(fin, "", "done") != b"done":
            self.store.delete_key(fin)   # prefill's void, left for us to read
            raise TransferError("the prefill endpoint took its blocks back before this copy "
                                f"finished (its {t.timeout.total_seconds():g} s timeout)")

    def _mapped(self, ack: dict, n_blocks: int) -> torch.Tensor:
        """The blocks as prefill laid them out in a segment: the pair's (gathered at the
        pull), or a prompt's staged copy (``staged_blocks`` long, ours from ``offset``).
        Segments stay mapped while in use: prefill reuses a few of each."""
        t = self.t
        total, offset = n_blocks, 0
        if "staged_blocks" in ack:
            total, offset = _int(ack, "staged_blocks", 1, 1 << 24), _int(ack, "offset", 0, 1 << 24)
            if offset + n_blocks != total:
                raise TransferError(f"staged KV holds {total} blocks; blocks {offset}.. "
                                    f"do not make the {n_blocks} asked for")
        shape = (len(t.layers), total, *t.layout.block_shape)
        name = ack.get("segment")
        seg = self.segments.pop(name, None) if isinstance(name, str) else None
        if seg is None or seg.numel < math.prod(shape):
            if seg is not None:
                seg.close()
            seg = shm.Segment.attach(name, math.prod(shape), t.layers[0].dtype)
        self.segments[name] = seg              # most recently used last
        while len(self.segments) > _MAPPED_SEGMENTS:
            self.segments.pop(next(iter(self.segments))).close()
        return seg.view(shape)[:, offset:]

    def release(self, transfer_id: int) -> None:
        with self._lock:
            self._request({"op": "release", "transfer_id": transfer_id})

    def claim(self, transfer_id: int, num_blocks: int) -> Claim:
        t0 = time.perf_counter()
        with self._lock:
            if self.broken or self.transport != "shm":
                raise TransferError("layer-wise claims need a same-host CPU pair")
            with self._breaks_on_loss():
                ack, ack_key = self._request({"op": "pull", "transfer_id": transfer_id,
                                              "start_block": 0, "num_blocks": num_blocks})
            if ack.get("pipelined") is not True or ack.get("chunks", 0) != 0:
                # held (unstaged) blocks were gathered into the pair segment instead; they
                # are consumed by nobody, and the pair's next request frees that segment
                raise TransferError(f"KV transfer {transfer_id} was not staged")
            try:
                blocks = self._mapped(ack, num_blocks)
            except Exception:
                self.store.set(f"done/{ack_key}", "1")
                raise
        return Claim(transfer_id, blocks, f"done/{ack_key}", self.store,
                     time.perf_counter() - t0)

    def _break(self) -> None:
        self.broken = True
        if self.pg is not None:
            _shutdown_group(self.pg)

    def close(self) -> None:
        with self._lock:
            key = f"pull/{self.pair}/{self.seq}"
            try:
                self.store.set(key, self._sign(key, {"op": "close"}))
            except Exception:
                pass
            if self.pg is not None:
                _shutdown_group(self.pg)
            for seg in self.segments.values():
                seg.close()
            self.segments.clear()
            self.peer_layers = []   # unmaps the prefill cache once the storages are freed
