"""Trace simulation of prefill placement: the adapter hit rate each routing policy would get,
with no engines (a cheap check of a policy before the real benchmark, ``bench/routing.py``).

It models what ``bench/routing.py`` measures: prefill workers whose engine adapter cache is
an LRU of ``host_tier`` entries (vLLM ``max_cpu_loras``) in which pinned entries are never
evicted; a closed loop of ``concurrency`` clients sending the same Zipf mix; a hit is the
adapter being in that cache on the worker the request lands on when it is admitted. The
router's policies from :mod:`router.pool` place the requests (outstanding counts are real:
a random in-flight request finishes before each new one is sent). A policy with ``pins()``
has its pins applied every ``resync_every`` requests, as the router's refresh loop does; a
worker loads an adapter when told to pin it.

    .venv/bin/python -m bench.routing_sim --adapters 64
"""

from __future__ import annotations

import argparse
import random
from collections import OrderedDict

from bench.routing import static_partition_hit_rate, zipf_mix
from cluster.messages import WorkerInfo
from router.pool import POLICIES, WorkerHandle


class SimEngine:
    """One worker's engine adapter cache: LRU over ``capacity`` entries, pinned ones kept."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.lru: OrderedDict[str, None] = OrderedDict()
        self.pinned: set[str] = set()

    def use(self, name: str) -> bool:
        """A request for ``name``: True when it was resident (a hit)."""
        hit = name in self.lru
        self.lru[name] = None
        self.lru.move_to_end(name)
        while len(self.lru) > self.capacity:
            oldest = next(a for a in self.lru if a not in self.pinned)
            del self.lru[oldest]
        return hit

    def set_pins(self, names: tuple[str, ...]) -> None:
        """Pin ``names`` (loading them), unpin the rest; never all ``capacity`` slots."""
        if len(names) >= self.capacity:
            raise ValueError(f"{len(names)} pins leave no unpinned slot of {self.capacity}")
        self.pinned = set()
        for a in names:
            self.use(a)
            self.pinned.add(a)


def simulate(policy, mix: list[str], workers: int = 2, host_tier: int = 4,
             concurrency: int = 4, resync_every: int = 8, seed: int = 0) -> dict:
    """Run ``mix`` through ``policy``; hit counts, spread per adapter and the most
    requests any worker held at once."""
    rng = random.Random(seed)
    handles = [WorkerHandle(WorkerInfo(f"p{i}", "prefill", "L", 1, 1, None, True, 0.0, 0), None)
               for i in range(workers)]
    engines = {h.worker_id: SimEngine(host_tier) for h in handles}
    inflight: list[WorkerHandle] = []
    spread: dict[str, set[str]] = {}
    hits = peak = 0
    for i, name in enumerate(mix):
        if len(inflight) >= concurrency:
            inflight.pop(rng.randrange(len(inflight))).outstanding -= 1
        if hasattr(policy, "pins") and i % resync_every == 0:
            for wid, names in policy.pins().items():
                engines[wid].set_pins(names)
        h = policy.pick(handles, name)
        h.outstanding += 1
        peak = max(peak, h.outstanding)
        inflight.append(h)
        hits += engines[h.worker_id].use(name)
        spread.setdefault(name, set()).add(h.worker_id)
    return {"requests": len(mix), "hits": hits, "hit_rate": hits / len(mix),
            "spread": {a: len(ws) for a, ws in spread.items()}, "peak_outstanding": peak}


def compare(adapters: int, zipf: float = 1.1, requests: int = 300, workers: int = 2,
            host_tier: int = 4, concurrency: int = 4, policies=None,
            **policy_kw) -> dict[str, dict]:
    """Policy name -> its simulated result, with the static partition's hit rate beside."""
    names, mix = zipf_mix(adapters, zipf, requests)
    static = static_partition_hit_rate(mix, names, workers * host_tier)
    out = {}
    for name in policies or POLICIES:
        pol = POLICIES[name](**policy_kw.get(name, {}))
        r = simulate(pol, mix, workers, host_tier, concurrency)
        out[name] = {**r, "static": static, "vs_static": r["hit_rate"] / static}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--host-tier", type=int, default=4)
    ap.add_argument("--prefill-workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    res = compare(args.adapters, args.zipf, args.requests, args.prefill_workers,
                  args.host_tier, args.concurrency)
    rows = [{"policy": name, "hit_rate": r["hit_rate"], "static_partition_hit_rate": r["static"],
             "hit_rate_vs_static": r["vs_static"], "max_spread": max(r["spread"].values()),
             "peak_outstanding": r["peak_outstanding"]} for name, r in res.items()]
    if args.out:
        from bench.report import report

        report(f"simulated placement, {args.adapters} adapters", rows, args.out,
               config=vars(args))
    else:
        print("| policy | hit rate | static | ratio | max spread | peak outstanding |")
        for r in rows:
            print(f"| {r['policy']} | {r['hit_rate']:.3f} | {r['static_partition_hit_rate']:.3f} "
                  f"| {r['hit_rate_vs_static']:.2f} | {r['max_spread']} | {r['peak_outstanding']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
