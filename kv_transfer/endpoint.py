"""The KV endpoint of one engine process: what step 4 shares between a worker and its engine.

A worker actor (:class:`~worker_runtime.engine_worker.EngineWorker`, prefill or decode)
creates one :class:`KVEndpoint` with its engine and hands it to the engine in the KV
transfer config (``kv_connector_extra_config["endpoint"]``): vLLM builds our connector
itself (:mod:`kv_transfer.connector`), and with the in-process engine our workers run
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor ``uni``) both connector sides receive this
very object. Nothing is parked in a process-global; an endpoint that cannot reach its
connector that way (an engine in another process would get a pickled copy) refuses to be
pickled, so that mistake fails at startup.

What it holds:
- the engine's KV address (prefill: the control socket decode peers pull from) and layout, once
  the connector's worker side has opened it on the engine's caches (:meth:`open`);
- prefill: the offers (held prompt blocks by transfer id) and their one release route,
  :meth:`release`, which never waits; a TTL frees what nobody pulled or released;
- decode: pulls, and the ``release`` message that frees a holder's blocks (that holder's
  :meth:`release`, through its transport);
- membership pruning of pair groups, the transfer records, and the ``wake`` event the
  engine loop waits on (set when a transfer completes or blocks may be freed).
"""

from __future__ import annotations

import secrets
import threading
from concurrent.futures import Future, ThreadPoolExecutor
import time
from typing import Any, Mapping

from cluster.messages import KVHandle
from kv_transfer.layout import KVLayout
from kv_transfer.staging import StagingPool
from kv_transfer.offers import Offer, OfferTable, TransferLog, TransferRecord
from kv_transfer.transport import Claim, TorchDistTransport

ROLES = ("kv_producer", "kv_consumer")   # prefill, decode (vLLM's kv_role)
EXTRA_CONFIG_KEY = "endpoint"            # where the connector finds it in the config
_MAX_RECORDS = 10_000


def check_engine(ep: Any, kv_transfer_config: Any) -> None:
    """``ep`` was made for the engine this KV transfer config builds."""
    if (ep.engine_id, ep.role) != (kv_transfer_config.engine_id, kv_transfer_config.kv_role):
        raise RuntimeError(f"{ep!r} handed to engine {kv_transfer_config.engine_id!r} "
                           f"with kv_role {kv_transfer_config.kv_role!r}")


class KVEndpoint:
    """One engine's KV endpoint. Thread-safe: the actor's event loop, the engine thread,
    the heartbeat thread and the transport's threads all use it. What the event loop calls
    (:meth:`release`, :meth:`records`, :meth:`pop_record`, the properties) never waits;
    :meth:`pull`, :meth:`send_release` and :meth:`close` do, on threads of their own."""

    def __init__(self, engine_id: str, role: str, *, kv_host: str = "127.0.0.1",
                 timeout_s: float = 30.0, hold_ttl_s: float = 120.0,
                 transport: str = TorchDistTransport.name, secret: str = "",
                 shared_memory: bool = True, layerwise: bool = True,
                 staging_bytes: int = 1 << 30, rank: int = 0, tp_size: int = 1) -> None:
        if role not in ROLES:
            raise ValueError(f"KVEndpoint {engine_id}: role must be kv_producer (prefill) or "
                             f"kv_consumer (decode), got {role!r}")
        if transport != TorchDistTransport.name:
            raise ValueError(f"KVEndpoint {engine_id}: unknown transport {transport!r}; "
                             f"known: {TorchDistTransport.name!r}")
        self.engine_id, self.role = engine_id, role
        self.rank, self.tp_size = rank, tp_size   # a tensor-parallel engine's rank (ranks.py)
        self.is_producer = role == "kv_producer"
        self.kv_host, self.timeout_s, self.hold_ttl_s = kv_host, timeout_s, hold_ttl_s
        self.shared_memory = shared_memory
        self.layerwise, self.staging_bytes = layerwise, staging_bytes
        self.staging: StagingPool | None = None   # prefill, layerwise: opened with the caches
        self._secret = secret              # the cluster's: pairs only within it; never shown
        self.wake = threading.Event()      # the engine loop steps when set
        self.ready = threading.Event()     # set once open() ran on the engine's caches
        self.offers = (OfferTable(release_ttl_s=hold_ttl_s, on_finish=self.wake.set)
                       if self.is_producer else None)
        self.layout: KVLayout | None = None
        self.address: tuple[str, int] | None = None
        self.transport: TorchDistTransport | None = None
        self._lock = threading.Lock()
        self._log = TransferLog(_MAX_RECORDS)
        self._closed = False
        self._fresh: list[TransferRecord] = []   # a rank's records not yet reported
        self._expired_reported = 0
        self._claimer: ThreadPoolExecutor | None = None   # decode: layer-wise claims

    @classmethod
    def of(cls, kv_transfer_config: Any) -> "KVEndpoint":
        """The endpoint a worker handed to its engine (vLLM's ``KVTransferConfig``)."""
        ep = kv_transfer_config.kv_connector_extra_config.get(EXTRA_CONFIG_KEY)
        if not isinstance(ep, cls):
            raise RuntimeError(
                "PreftKVConnector needs the KVEndpoint its worker created, in "
                f"kv_connector_extra_config[{EXTRA_CONFIG_KEY!r}] of an in-process engine "
                f"(VLLM_ENABLE_V1_MULTIPROCESSING=0); got {type(ep).__name__}")
        check_engine(ep, kv_transfer_config)
        return ep

    def __repr__(self) -> str:
        return f"KVEndpoint({self.engine_id!r}, {self.role!r}, address={self.address})"

    def __reduce__(self):
        raise TypeError(f"{self!r} belongs to its engine's process and cannot be copied "
                        "to another: the engine must run in-process")

    # ------------------------------------------------------------------ lifecycle
    def open(self, layers: list, block_size: int) -> None:
        """On the engine's registered caches (the connector's worker side, once)."""
        self.layout = KVLayout.from_tensors(layers, block_size)
        self.transport = TorchDistTransport(
            layers, self.layout, local_host=self.kv_host, timeout_s=self.timeout_s,
            engine_name=self.engine_id, on_record=self._record, secret=self._secret,
            shared_memory=self.shared_memory, lend_s=self.hold_ttl_s)
        if self.is_producer:
            # CPU caches only: on a GPU the copy thread's stream is not ordered after the
            # forward's KV writes (not built: a side stream that waits on the forward's
            # events); GPU prompts take the held path.
            if self.layerwise and layers[0].device.type == "cpu":
                self.staging = StagingPool(layers, self.layout, cap_bytes=self.staging_bytes,
                                           shared_memory=self.transport.shared_memory,
                                           stale_after_s=self.hold_ttl_s)
            self.address = self.transport.serve(self.offers)
        self.ready.set()

    def close(self) -> None:
        """Stop serving and close every pair (the worker leaving, or its engine shut down)."""
        with self._lock:
            if self._closed or self.transport is None:
                return
            self._closed = True
        self.transport.close()
        if self._claimer is not None:
            self._claimer.shutdown(wait=False, cancel_futures=True)
        if self.staging is not None:
            self.staging.close()

    @property
    def layout_fingerprint(self) -> str:
        return self.layout.fingerprint() if self.layout is not None else ""

    @property
    def kv_address(self) -> str:
        """``host:port`` that decode peers pull from ("" on decode)."""
        return f"{self.address[0]}:{self.address[1]}" if self.address is not None else ""

    @property
    def rank_ports(self) -> tuple[int, ...]:
        """Every rank's port: none for a single-process engine (``KVHandle.port``)."""
        return ()

    # ------------------------------------------------------------------ prefill
    def hold(self, req_id: str, block_ids: list[int], num_tokens: int) -> tuple[int, bool]:
        """Keep a finished prompt's KV (engine request ``req_id``) until decode pulls or
        releases it, or ``hold_ttl_s`` passes: its new transfer id, and whether its blocks
        stay held (False: its forward staged them, so the engine frees them now)."""
        transfer_id = secrets.randbits(62)
        staged = self.staging.take(req_id, len(block_ids)) if self.staging else None
        self.offers.add(Offer(transfer_id, req_id, [] if staged else block_ids, num_tokens,
                              expires_at=time.monotonic() + self.hold_ttl_s, staged=staged))
        return transfer_id, staged is None

    def hold_as(self, transfer_id: int, req_id: str, block_ids: list[int],
                num_tokens: int) -> None:
        """A rank's share of a prompt its engine's scheduler held under ``transfer_id``."""
        self.offers.add(Offer(transfer_id, req_id, block_ids, num_tokens,
                              expires_at=time.monotonic() + self.hold_ttl_s))

    def drop_staged(self, req_id: str) -> None:
        """A prompt ended without a hand-over (aborted, failed): nothing stays staged."""
        if self.staging is not None:
            self.staging.drop(req_id)

    def release(self, transfer_id: int) -> bool:
        """The one release route of held blocks (see :meth:`OfferTable.release`): never
        waits; True when blocks were freed now, False when the offer is not (yet) here."""
        return self.offers.release(transfer_id)

    def take_finished(self) -> set[str]:
        """Engine request ids whose held blocks may be freed now."""
        return self.offers.take_finished()

    # ------------------------------------------------------------------ decode
    def peer(self, handle: KVHandle) -> tuple[str, int]:
        """Where this engine (this rank) pulls ``handle``'s KV: the prefill engine's rank
        of the same number; refused when the two engines' rank counts differ."""
        ranks = len(handle.rank_ports) or 1
        if ranks != self.tp_size:
            raise ValueError(
                f"KV transfer {handle.transfer_id}: prefill engine {handle.engine_id} has "
                f"tensor_parallel_size={ranks}, this decode engine {self.engine_id} "
                f"tensor_parallel_size={self.tp_size}; KV moves rank to rank, so both need "
                "the same size")
        return handle.host, handle.rank_ports[self.rank] if handle.rank_ports else handle.port

    def pull(self, handle: KVHandle, start_block: int, dst_block_ids: list[int]) -> None:
        """Copy ``handle``'s blocks [start_block:] into ``dst_block_ids`` (blocks a thread)."""
        host, port = self.peer(handle)
        self.transport.pull(host, port, handle.transfer_id, start_block, dst_block_ids)

    def can_claim(self, handle: KVHandle) -> bool:
        """Whether ``handle``'s KV can load layer by layer during the decode forward: it was
        staged, and our pair with its endpoint is same-host (a network pull would stall
        the whole decode batch's forward, so those load before the request runs)."""
        return (self.layerwise and handle.staged and self.transport is not None
                and self.transport.pair_mode(handle.host, handle.port) == "shm")

    def claim(self, handle: KVHandle) -> "Future[Claim]":
        """Map ``handle``'s staged blocks without copying them, on a thread of our own."""
        with self._lock:
            if self._claimer is None:
                self._claimer = ThreadPoolExecutor(2, thread_name_prefix="kv-claim")
        return self._claimer.submit(self.transport.claim, handle.host, handle.port,
                                    handle.transfer_id, handle.num_blocks)

    def record(self, rec: TransferRecord) -> None:
        """A transfer the connector completed itself (layer-wise loads)."""
        self._record(rec)

    def send_release(self, handle: KVHandle) -> None:
        """Ask the holder to release ``handle``'s blocks unsent (blocks a thread)."""
        self.transport.release(*self.peer(handle), handle.transfer_id)

    # ------------------------------------------------------------------ membership
    def prune(self, members: Mapping[str, Any]) -> None:
        """Tear down pair groups whose other side left the cluster. ``members``: worker id →
        membership record (``role``, ``worker_id``, ``kv_address``: cluster.state)."""
        if self.transport is None:
            return
        if self.is_producer:
            self.transport.prune(live_peers={m.worker_id for m in members.values()
                                             if m.role == "decode"})
            return
        live = set()
        for m in members.values():
            if m.role == "prefill" and m.kv_address:   # host:port, or host:p0+p1+... (ranks)
                host, _, ports = m.kv_address.rpartition(":")
                live.update((host, int(p)) for p in ports.split("+"))
        self.transport.prune(live_addresses=live)

    # ------------------------------------------------------------------ records
    def _record(self, rec: TransferRecord) -> None:
        if self.tp_size > 1:
            with self._lock:
                self._fresh.append(rec)
        self._log.add(rec)
        self.wake.set()

    def records(self) -> list[TransferRecord]:
        """The last transfers this engine recorded, oldest first."""
        return self._log.records()

    def pop_record(self, transfer_id: int) -> TransferRecord | None:
        return self._log.pop(transfer_id)

    def take_report(self) -> tuple[list[TransferRecord], int]:
        """A rank's records and expired offers since the last call (its engine's
        scheduler merges them over the ranks: :class:`~kv_transfer.ranks.RankedEndpoint`)."""
        with self._lock:
            fresh, self._fresh = self._fresh, []
        expired = self.offers.expired if self.offers is not None else 0
        new, self._expired_reported = expired - self._expired_reported, expired
        return fresh, new
