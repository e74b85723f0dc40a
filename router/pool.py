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


@dataclass
class WorkerPool:
    prefill: list[WorkerHandle] = field(default_factory=list)
    decode: list[WorkerHandle] = field(default_factory=list)
    prefill_policy: RoutingPolicy = field(default_factory=Locality)
    decode_policy: RoutingPolicy = field(default_factory=LeastLoaded)

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

    def all(self) -> list[WorkerHandle]:
        return self.prefill + self.decode

    def find(self, worker_id: str) -> WorkerHandle | None:
        return next((w for w in self.all() if w.worker_id == worker_id), None)

    def add(self, handle: WorkerHandle) -> None:
        (self.prefill if handle.info.role == "prefill" else self.decode).append(handle)

    def mark_alive(self, alive_ids: set[str]) -> None:
        """Membership from heartbeats: workers without a live record take no new requests."""
        for w in self.all():
            w.healthy = w.worker_id in alive_ids
