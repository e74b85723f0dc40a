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
from router.hot_set import DecayedCounts, Homes, MissCost, ResidencyGuess, assign_homes


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

    @classmethod
    def from_config(cls, router_cfg, pool_cfg) -> "RoutingPolicy":
        """The policy for a pool: ``router_cfg`` a ``RouterConfig``, ``pool_cfg`` the pool's
        config (``PrefillConfig``...) or None."""
        return cls()


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
        ranked = rendezvous(workers, key)
        bound = load_bound(workers, self.epsilon)
        for i, w in enumerate(ranked):
            if w.outstanding < bound:
                self.spills += i > 0
                return w
        return ranked[0]


def rendezvous(workers: list[WorkerHandle], key: str) -> list[WorkerHandle]:
    """Workers ranked by hash(key, worker): the same key ranks them the same way."""
    return sorted(workers, key=lambda w: hashlib.blake2b(
        f"{key}|{w.worker_id}".encode(), digest_size=8).digest(), reverse=True)


def load_bound(workers: list[WorkerHandle], epsilon: float) -> float:
    """Bounded load: a worker takes a request while its outstanding work is below this."""
    mean = sum(w.outstanding for w in workers) / len(workers)
    return (1 + epsilon) * mean + 1


class HotSet(RoutingPolicy):
    """Hot adapters to a home worker that pins them in host memory; the rest to a cold
    worker; each request to the candidate with the least outstanding work plus what its
    adapter would cost to load there, within a load bound.

    The hottest adapters by decayed request count that fit in ``pin_slots`` per worker get a
    home (:func:`router.hot_set.assign_homes`; again when the pool changes, when an adapter
    without a home outgrows one with, and every ``rebalance_every`` requests); :meth:`pins`
    is what each worker should pin. A hot adapter's candidates are its home, then the next
    ``max_spread - 1`` workers by rendezvous rank: it never spreads further. Any other
    adapter's are every worker, the cold one first. Score: outstanding requests + the load
    cost of the adapter's tier there (:class:`MissCost`; resident costs 0) + one load if it
    would evict a warm adapter; only workers under ``load_bound(epsilon)`` (all over: the
    least loaded candidate); ties go to the earlier candidate. LRU engines evict a hot
    adapter for every cold load; pinning is what keeps the hot set resident.
    """

    name = "hot_set"

    def __init__(self, epsilon: float = 1.0, max_spread: int = 2, pin_slots: int = 3,
                 host_tier: int = 4, half_life: float = 256.0, rebalance_every: int = 64,
                 hysteresis: float = 1.2, miss_cost: float = 3.0) -> None:
        self.epsilon, self.max_spread = epsilon, max_spread
        self.pin_slots = pin_slots
        self.rebalance_every, self.hysteresis = rebalance_every, hysteresis
        self.counts = DecayedCounts(half_life)
        self.homes = Homes()
        self.where = ResidencyGuess(host_tier)
        self.cost = MissCost(miss_cost)   # fixed: see MissCost
        self.spills = 0
        self._seen, self._floor = 0, 0.0
        self._workers: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, router_cfg, pool_cfg) -> "HotSet":
        slots = getattr(pool_cfg, "pinnable_loras", 0)
        tier = getattr(pool_cfg, "max_cpu_loras", 1)
        return cls(max_spread=router_cfg.max_spread, pin_slots=slots, host_tier=tier)

    def pick(self, workers, key):
        if key is None:
            return min(workers, key=lambda w: w.outstanding)
        self._observe(workers, key)
        cands = self._candidates(workers, key)
        bound = load_bound(workers, self.epsilon)
        within = [w for w in cands if w.outstanding < bound]
        choice = min(within, key=lambda w: self._score(w, key)) if within else min(
            cands, key=lambda w: w.outstanding)
        self.spills += choice is not cands[0]
        pinned = self.homes.pinned.get(key) == choice.worker_id
        pins_here = sum(w == choice.worker_id for w in self.homes.pinned.values())
        self.where.record(choice.worker_id, key, pinned, pins_here)
        return choice

    def pins(self) -> dict[str, tuple[str, ...]]:
        """Worker id -> the adapters it should pin (its hot adapters, hottest first)."""
        out: dict[str, list[str]] = {w: [] for w in self._workers}
        for a in sorted(self.homes.pinned, key=lambda a: -self.counts.counts.get(a, 0.0)):
            out[self.homes.pinned[a]].append(a)
        return {w: tuple(names) for w, names in out.items()}

    def _candidates(self, workers: list[WorkerHandle], key: str) -> list[WorkerHandle]:
        ranked = rendezvous(workers, key)
        home = self.homes.home(key)
        if home is None:
            return sorted(ranked, key=lambda w: w.worker_id != self.homes.cold)
        first = next(w for w in workers if w.worker_id == home)
        return [first] + [w for w in ranked if w is not first][:self.max_spread - 1]

    def _score(self, w: WorkerHandle, key: str) -> float:
        if self.homes.pinned.get(key) == w.worker_id:
            return w.outstanding
        evicts_warm = any(h == w.worker_id and a != key for a, h in self.homes.warm.items())
        return (w.outstanding + self.cost(self.where.tier(w.worker_id, key))
                + (self.cost("disk") if evicts_warm else 0.0))

    def _observe(self, workers: list[WorkerHandle], key: str) -> None:
        """Count the request; new homes when the pool changed, every ``rebalance_every``
        requests, or when an adapter without a home gets hotter (by ``hysteresis``) than
        the coolest one with a home."""
        self.counts.add(key)
        self._seen += 1
        ids = tuple(sorted(w.worker_id for w in workers))
        hotter = (self.homes.home(key) is None
                  and self.counts.counts[key] > self.hysteresis * self._floor)
        if ids != self._workers or hotter or self._seen % self.rebalance_every == 0:
            self._workers = ids
            self.homes = assign_homes(self.counts, list(ids), self.pin_slots, self.homes)
            homed = [*self.homes.pinned, *self.homes.warm]
            full = len(homed) == len(ids) * (self.pin_slots + 1) - 1
            self._floor = min(self.counts.counts[a] for a in homed) if full else 0.0


POLICIES: dict[str, type[RoutingPolicy]] = {
    p.name: p for p in (Locality, RoundRobin, LeastLoaded, HotSet)}


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
