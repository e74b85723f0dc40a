"""The router's view of the worker pools and the routing-policy seam (step 2 of the path).

Holds Ray actor handles and what each worker reported about itself (:class:`WorkerInfo`),
counts outstanding requests per worker, and asks a :class:`RoutingPolicy` (by name, from
``POLICIES``) where a request goes. No torch, no vLLM here.
"""

from __future__ import annotations

import hashlib
import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from cluster.messages import WorkerInfo


@dataclass
class WorkerHandle:
    info: WorkerInfo
    actor: Any
    outstanding: int = 0
    healthy: bool = True

    @property
    def worker_id(self) -> str:
        return self.info.worker_id


class NoWorkers(RuntimeError):
    pass


class RoutingPolicy(ABC):
    name: str

    @abstractmethod
    def pick(self, workers: list[WorkerHandle], key: str | None) -> WorkerHandle: ...


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._n = itertools.count()

    def pick(self, workers, key):
        return workers[next(self._n) % len(workers)]


class LeastLoaded(RoutingPolicy):
    name = "least_loaded"

    def pick(self, workers, key):
        return min(workers, key=lambda w: w.outstanding)


class Locality(RoutingPolicy):
    """Rendezvous hashing on the adapter name, with bounded load.

    Each adapter ranks workers by hash(adapter, worker); it goes to the first whose
    outstanding work is within (1 + epsilon) x the pool mean (+1), else spills down the rank.
    """

    name = "locality"

    def __init__(self, epsilon: float = 0.25) -> None:
        self.epsilon = epsilon
        self.spills = 0

    def pick(self, workers, key):
        if key is None or len(workers) == 1:
            return min(workers, key=lambda w: w.outstanding)
        ranked = sorted(workers, key=lambda w: hashlib.blake2b(
            f"{key}|{w.worker_id}".encode(), digest_size=8).digest(), reverse=True)
        mean = sum(w.outstanding for w in workers) / len(workers)
        bound = (1 + self.epsilon) * mean + 1
        for i, w in enumerate(ranked):
            if w.outstanding < bound:
                self.spills += i > 0
                return w
        return ranked[0]


POLICIES: dict[str, type[RoutingPolicy]] = {p.name: p for p in (Locality, RoundRobin, LeastLoaded)}


@dataclass(frozen=True)
class Placement:
    """Where one request runs: a colocated worker, or a prefill worker and a decode worker."""

    path: str                                # "colocated" | "prefill_decode"
    colocated: WorkerHandle | None = None
    prefill: WorkerHandle | None = None
    decode: WorkerHandle | None = None


class NeedsColocated(NoWorkers):
    """An all-token adapter, and no healthy colocated worker to run it."""


@dataclass
class WorkerPool:
    prefill: list[WorkerHandle] = field(default_factory=list)
    decode: list[WorkerHandle] = field(default_factory=list)
    colocated: list[WorkerHandle] = field(default_factory=list)
    prefill_policy: RoutingPolicy = field(default_factory=Locality)
    decode_policy: RoutingPolicy = field(default_factory=LeastLoaded)
    colocated_policy: RoutingPolicy = field(default_factory=Locality)

    def pick_prefill(self, adapter: str | None) -> WorkerHandle:
        live = [w for w in self.prefill if w.healthy]
        if not live:
            raise NoWorkers("no healthy prefill worker")
        return self.prefill_policy.pick(live, adapter)

    def pick_decode(self) -> WorkerHandle:
        live = [w for w in self.decode if w.healthy]
        if not live:
            raise NoWorkers("no healthy decode worker")
        return self.decode_policy.pick(live, None)

    def pick_colocated(self, adapter: str | None) -> WorkerHandle:
        live = [w for w in self.colocated if w.healthy]
        if not live:
            raise NoWorkers("no healthy colocated worker")
        return self.colocated_policy.pick(live, adapter)

    def pick_adapter_host(self, adapter: str | None) -> WorkerHandle:
        """A worker that can validate and load adapters: prefill, else colocated."""
        try:
            return self.pick_prefill(adapter)
        except NoWorkers:
            return self.pick_colocated(adapter)

    def place(self, adapter: str | None, all_token: bool) -> Placement:
        """The request's path. All-token adapters: colocated only (by adapter locality).
        PreFT requests: the only path the cluster has; with both, the colocated worker
        picked by locality unless it has more requests outstanding than the prefill/decode
        pair's busier worker (no KV moves on a tie)."""
        colo = [w for w in self.colocated if w.healthy]
        if all_token:
            if not colo:
                raise NeedsColocated("no healthy colocated worker")
            return Placement("colocated", colocated=self.pick_colocated(adapter))
        pd = any(w.healthy for w in self.prefill) and any(w.healthy for w in self.decode)
        if not colo:
            return Placement("prefill_decode", prefill=self.pick_prefill(adapter),
                             decode=self.pick_decode())
        c = self.pick_colocated(adapter)
        if not pd:
            return Placement("colocated", colocated=c)
        p, d = self.pick_prefill(adapter), self.pick_decode()
        if c.outstanding <= max(p.outstanding, d.outstanding):
            return Placement("colocated", colocated=c)
        return Placement("prefill_decode", prefill=p, decode=d)

    def adapter_hosts(self) -> list[WorkerHandle]:
        return self.prefill + self.colocated

    def all(self) -> list[WorkerHandle]:
        return self.prefill + self.decode + self.colocated

    def find(self, worker_id: str) -> WorkerHandle | None:
        return next((w for w in self.all() if w.worker_id == worker_id), None)

    def add(self, handle: WorkerHandle) -> None:
        {"prefill": self.prefill, "decode": self.decode,
         "colocated": self.colocated}[handle.info.role].append(handle)

    def mark_alive(self, alive_ids: set[str]) -> None:
        """Membership from heartbeats: workers without a live record take no new requests."""
        for w in self.all():
            w.healthy = w.worker_id in alive_ids
