"""Tensor-parallel engines in step 4: one KV endpoint per rank, and the worker's view of them.

With ``tensor_parallel_size`` > 1 a worker's engine runs its model on ranks that are
processes of their own (vLLM's ``mp`` executor, all on the worker's node); each rank's KV
cache holds its shard of the KV heads. Each rank's connector worker side opens a
:class:`~kv_transfer.endpoint.KVEndpoint` of its own on that shard (built from the
:class:`RankSpec` it finds in the KV transfer config: the pickled form of the worker's
:class:`RankedEndpoint`), and KV moves **rank to rank**: decode rank i pulls prefill rank i's
shard over their own pair group, whole blocks only; the bytes moved add up to the
unsharded count.

The worker actor and its engine's scheduler (one process) keep a :class:`RankedEndpoint`,
with the calls of a ``KVEndpoint`` that they make. What must reach the ranks (a finished
prompt's held blocks, releases, membership) rides vLLM's per-step connector metadata; what
the ranks learn (transfer records, expiries) comes back in vLLM's worker metadata,
aggregated over the ranks (:class:`RankReport`), and finished transfers through vLLM's own
``finished_sending`` / ``finished_recving`` counting, which waits for every rank.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, Mapping

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata

from kv_transfer.endpoint import KVEndpoint
from kv_transfer.offers import TransferLog, TransferRecord

_MAX_RECORDS = 10_000


@dataclass(frozen=True)
class RankSpec:
    """What a rank needs to open its endpoint (plain data: it crosses to the rank's process
    inside vLLM's pickled config). The secret is never shown (vLLM logs its config)."""

    engine_id: str
    role: str
    tp_size: int
    kv_host: str
    timeout_s: float
    hold_ttl_s: float
    transport: str
    shared_memory: bool
    secret: str = field(default="", repr=False)

    def open_rank(self, rank: int) -> KVEndpoint:
        """This rank's endpoint (in the rank's process). Layer-wise staging is for the
        single-process engine; a rank's prompts are held until decode pulls them."""
        return KVEndpoint(self.engine_id, self.role, kv_host=self.kv_host,
                          timeout_s=self.timeout_s, hold_ttl_s=self.hold_ttl_s,
                          transport=self.transport, secret=self.secret,
                          shared_memory=self.shared_memory, layerwise=False,
                          rank=rank, tp_size=self.tp_size)


@dataclass
class RankReport(KVConnectorWorkerMetadata):
    """Rank → scheduler, each step: the rank's new transfer records and expired offers,
    summed over the ranks by vLLM (:meth:`aggregate`)."""

    records: list[TransferRecord] = field(default_factory=list)
    expired: int = 0

    def aggregate(self, other: "RankReport") -> "RankReport":
        return RankReport(self.records + other.records, self.expired + other.expired)


def rank_info(worker: Any) -> dict:
    """On each rank (``engine.collective_rpc``): its rank and KV endpoint's address."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    ep = get_kv_transfer_group().worker.endpoint
    if not ep.ready.wait(60):
        raise RuntimeError(f"{ep!r}: the rank's KV connector did not open its caches")
    host, port = ep.address or (ep.kv_host, 0)
    return {"rank": ep.rank, "host": host, "port": port, "layout": ep.layout_fingerprint}


class _HeldView:
    """``len()``: prompts held for decode on the ranks; ``expired``: offers the ranks'
    TTL freed (what a single-process endpoint's ``OfferTable`` answers)."""

    def __init__(self) -> None:
        self.by_req: dict[str, int] = {}
        self.expired = 0

    def __len__(self) -> int:
        return len(self.by_req)


class RankedEndpoint:
    """A tensor-parallel engine's KV endpoint, as its worker and scheduler see it. Pickles
    to its :class:`RankSpec` (what vLLM's executor sends its ranks)."""

    staging = None
    layerwise = False

    def __init__(self, spec: RankSpec) -> None:
        self.spec = spec
        self.engine_id, self.role, self.tp_size = spec.engine_id, spec.role, spec.tp_size
        self.is_producer = spec.role == "kv_producer"
        self.wake = threading.Event()
        self.ready = threading.Event()
        self.address: tuple[str, int] | None = None
        self.rank_ports: tuple[int, ...] = ()
        self.layout_fingerprint = ""
        self.offers = _HeldView()
        self._lock = threading.Lock()
        self._holds: list[tuple[int, str, list[int], int]] = []
        self._drops: list[int] = []
        self._live: dict | None = None
        self._log = TransferLog(_MAX_RECORDS)
        self._parts: dict[int, list[TransferRecord]] = {}

    def __reduce__(self):
        return (RankSpec, tuple(getattr(self.spec, f) for f in RankSpec.__dataclass_fields__))

    def __repr__(self) -> str:
        return (f"RankedEndpoint({self.engine_id!r}, {self.role!r}, tp={self.tp_size}, "
                f"address={self.address}, ranks={self.rank_ports})")

    # ------------------------------------------------------------------ lifecycle
    def attach(self, engine: Any) -> None:
        """Engine thread, once the engine is built: every rank's address and layout."""
        infos = sorted(engine.collective_rpc(rank_info), key=lambda i: i["rank"])
        layouts = {i["layout"] for i in infos}
        if [i["rank"] for i in infos] != list(range(self.tp_size)) or len(layouts) != 1:
            raise RuntimeError(f"{self.engine_id}: ranks answered {infos}; want ranks "
                               f"0..{self.tp_size - 1} with one KV layout")
        self.layout_fingerprint = layouts.pop()
        if self.is_producer:
            self.address = (infos[0]["host"], infos[0]["port"])
            self.rank_ports = tuple(i["port"] for i in infos)
        self.ready.set()

    def close(self) -> None:
        """The ranks' endpoints close with their processes (the engine's shutdown)."""

    @property
    def kv_address(self) -> str:
        """``host:port0+port1+...``: every rank's endpoint ("" on decode)."""
        if self.address is None:
            return ""
        return f"{self.address[0]}:" + "+".join(map(str, self.rank_ports))

    # ------------------------------------------------------------------ prefill
    def hold(self, req_id: str, block_ids: list[int], num_tokens: int) -> tuple[int, bool]:
        """As :meth:`KVEndpoint.hold`: the ranks add the offer at the next step (a pull
        that comes first waits for it, as for any early claim)."""
        transfer_id = secrets.randbits(62)
        with self._lock:
            self._holds.append((transfer_id, req_id, list(block_ids), num_tokens))
            self.offers.by_req[req_id] = transfer_id
        self.wake.set()
        return transfer_id, True

    def drop_staged(self, req_id: str) -> None:
        """Nothing is staged on a tensor-parallel engine."""

    def release(self, transfer_id: int) -> bool:
        """Free a held prompt on every rank at the next step; never waits. False: the
        blocks are freed when the ranks have done so (vLLM's ``finished_sending``)."""
        with self._lock:
            self._drops.append(transfer_id)
        self.wake.set()
        return False

    def take_outbox(self) -> tuple[list, list, dict | None]:
        """Scheduler side, building a step's metadata: holds, releases, membership."""
        with self._lock:
            out = (self._holds, self._drops, self._live)
            self._holds, self._drops, self._live = [], [], None
        return out

    # ------------------------------------------------------------------ decode
    def can_claim(self, handle: Any) -> bool:
        return False

    # ------------------------------------------------------------------ from the ranks
    def on_output(self, output: Any) -> None:
        """Scheduler side, after each step: vLLM's aggregated connector output."""
        for req_id in output.finished_sending or ():
            with self._lock:
                self.offers.by_req.pop(req_id, None)
        report = output.kv_connector_worker_meta
        if isinstance(report, RankReport):
            self.offers.expired += report.expired
            for rec in report.records:
                self._merge(rec)

    def _merge(self, rec: TransferRecord) -> None:
        """One rank's record; the transfer's own once every rank has sent its part."""
        with self._lock:
            parts = self._parts.setdefault(rec.transfer_id, [])
            parts.append(rec)
            if len(parts) < self.tp_size:
                if len(self._parts) > _MAX_RECORDS:   # a rank never reported its part
                    self._parts.pop(next(iter(self._parts)))
                return
            del self._parts[rec.transfer_id]
        self._log.add(replace(parts[0], bytes=sum(p.bytes for p in parts),
                              seconds=max(p.seconds for p in parts), ok=all(p.ok for p in parts),
                              error="; ".join(p.error for p in parts if p.error),
                              exposed_s=max(p.exposed for p in parts)))
        self.wake.set()

    def records(self) -> list[TransferRecord]:
        return self._log.records()

    def pop_record(self, transfer_id: int) -> TransferRecord | None:
        return self._log.pop(transfer_id)

    # ------------------------------------------------------------------ membership
    def prune(self, members: Mapping[str, Any]) -> None:
        """Passed to the ranks at the next step (each prunes its own pair groups)."""
        live = {k: SimpleNamespace(role=m.role, worker_id=m.worker_id, kv_address=m.kv_address)
                for k, m in members.items()}
        with self._lock:
            self._live = live
