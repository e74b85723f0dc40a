"""Which adapters are hot and which prefill worker is each one's home (step 2's placement
bookkeeping for the ``hot_set`` policy in :mod:`router.pool`).

Decayed request counts per adapter; the hot set is the hottest adapters that fit in the
pool's pinnable host-memory slots (``pin_slots`` per worker); each hot adapter gets one home
worker by a greedy partition balanced by popularity, kept sticky from one rebalance to the
next (so the pins the workers hold do not churn) unless that leaves the homes unbalanced.
Beside them: a guess of each adapter's tier on each worker, and what loading it costs. Pure Python: no Ray, no torch.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field


class DecayedCounts:
    """Request counts that halve every ``half_life`` requests, O(1) per request: each new
    request adds a weight that grows by 2^(1/half_life), and all counts are rescaled when
    the weight gets large."""

    def __init__(self, half_life: float) -> None:
        self.growth = 2.0 ** (1.0 / half_life)
        self.inc = 1.0
        self.counts: dict[str, float] = {}
        self.total = 0.0

    def add(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + self.inc
        self.total += self.inc
        self.inc *= self.growth
        if self.inc > 1e12:
            self._rescale()

    def _rescale(self) -> None:
        s = self.inc
        self.counts = {k: c / s for k, c in self.counts.items() if c / s > 1e-6}
        self.total /= s
        self.inc = 1.0

    def top(self, n: int) -> list[str]:
        """The ``n`` hottest keys, hottest first (ties by name, so the order is stable)."""
        return heapq.nsmallest(n, self.counts, key=lambda k: (-self.counts[k], k))


@dataclass(frozen=True)
class Homes:
    """Where the hot set lives. ``pinned``: adapter -> the worker that pins it (at most
    ``slots`` per worker). ``warm``: the next hottest adapters, one per worker except the
    ``cold`` worker, kept in that worker's unpinned slot by routing cold adapters elsewhere
    first. Every other (cold) adapter prefers the ``cold`` worker."""

    pinned: dict[str, str] = field(default_factory=dict)
    warm: dict[str, str] = field(default_factory=dict)
    cold: str | None = None

    def home(self, adapter: str) -> str | None:
        return self.pinned.get(adapter) or self.warm.get(adapter)


def _partition(hot: list[str], weight: dict[str, float], load: dict[str, float], slots: int,
               start: dict[str, str]) -> dict[str, str]:
    """``start``'s homes kept, then each other hot adapter (hottest first) to the worker
    with the least load (``load``, updated) that still has a slot."""
    used = {w: 0 for w in load}
    homes: dict[str, str] = {}
    for a in hot:
        w = start.get(a)
        if w in load and used[w] < slots:
            homes[a], load[w], used[w] = w, load[w] + weight[a], used[w] + 1
    for a in hot:
        free = [w for w in load if used[w] < slots]
        if a in homes or not free:
            continue
        w = min(free, key=lambda w: (load[w], w))
        homes[a], load[w], used[w] = w, load[w] + weight[a], used[w] + 1
    return homes


def _place(counts: DecayedCounts, workers: list[str], slots: int, cold: str,
           start: Homes) -> tuple[Homes, float]:
    """Homes with the cold worker preloaded by the cold adapters' popularity; the gap
    between the busiest and idlest worker's expected load."""
    top = counts.top(len(workers) * slots + len(workers) - 1)
    pinned, warm = top[:len(workers) * slots], top[len(workers) * slots:]
    weight = {a: counts.counts[a] for a in top}
    load = {w: 0.0 for w in workers}
    load[cold] = counts.total - sum(weight.values())
    was = {**start.warm, **start.pinned}   # an adapter moving warm <-> pinned stays put
    homes = _partition(pinned, weight, load, slots, was) if slots > 0 else {}
    others = {w: load[w] for w in workers if w != cold}
    warm_homes = _partition(warm, weight, others, 1, was)
    load.update(others)
    return Homes(homes, warm_homes, cold), max(load.values()) - min(load.values())


def assign_homes(counts: DecayedCounts, workers: list[str], slots: int, previous: Homes,
                 tolerance: float = 0.1) -> Homes:
    """Homes for the hottest adapters: ``slots`` pinned per worker, one warm per worker but
    the cold one. Sticky: ``previous`` homes stay unless that partition's load gap exceeds
    a fresh partition's by more than ``tolerance`` of all requests."""
    if not workers:
        return Homes()
    workers = sorted(workers)
    cold = previous.cold if previous.cold in workers else workers[0]
    sticky, gap = _place(counts, workers, slots, cold, previous)
    fresh, fresh_gap = _place(counts, workers, slots, cold, Homes())
    return fresh if gap - fresh_gap > tolerance * counts.total else sticky


class ResidencyGuess:
    """Where this policy last sent each adapter: per worker, its unpinned host tier (an
    LRU of ``host_tier`` minus that worker's pins) and its disk (every adapter sent there).
    A guess: one router sees only its own requests."""

    def __init__(self, host_tier: int) -> None:
        self.host_tier = host_tier
        self._recent: dict[str, OrderedDict[str, None]] = {}
        self._disk: dict[str, set[str]] = {}

    def tier(self, worker_id: str, key: str) -> str:
        """``engine`` (still in its unpinned tier), ``disk`` or ``store``."""
        if key in self._recent.get(worker_id, ()):
            return "engine"
        return "disk" if key in self._disk.get(worker_id, ()) else "store"

    def record(self, worker_id: str, key: str, pinned: bool, pins_here: int) -> None:
        self._disk.setdefault(worker_id, set()).add(key)
        if pinned:
            return
        recent = self._recent.setdefault(worker_id, OrderedDict())
        recent[key] = None
        recent.move_to_end(key)
        while len(recent) > max(1, self.host_tier - pins_here):
            recent.popitem(last=False)


class MissCost:
    """What loading an adapter costs, in requests' worth of queue: 0 resident (``engine``),
    ``disk`` from the worker's disk, one more from the store. Fixed, not learned from the
    workers' reported times: those include the engine's queue, so a busy worker's hits
    looked as slow as an idle one's loads and the learned cost went to 0 (every hot
    adapter then spread by load alone)."""

    def __init__(self, disk: float = 3.0) -> None:
        self.disk = disk

    def __call__(self, tier: str) -> float:
        return {"engine": 0.0, "disk": self.disk}.get(tier, self.disk + 1.0)
