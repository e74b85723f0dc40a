"""Routing benchmark: adapter hit rate on the prefill pool per policy, router-added latency,
and upload-to-servable time.

Starts a cluster (embedded tiny model; 2 prefill + 1 decode workers by default) whose
prefill engines hold ``--host-tier`` adapters each (vLLM ``max_cpu_loras``), registers
``--adapters`` adapters (default 4x the host tier), and sends the same Zipf(``--zipf``)
request mix under each routing policy. A hit is a request whose adapter was still in the
engine's adapter cache on the worker it landed on; misses load from the worker's disk cache
or the store. Router-added latency is the client-observed time to first token minus the
prefill worker's own queue + prefill time (gRPC, validation, placement, the worker plane's
hops to the prefill worker and back).

    .venv/bin/python -m bench.routing --requests 300
"""

from __future__ import annotations

import argparse
import platform
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.report import report


def pct(xs, q):
    """The q-quantile, nearest rank."""
    return float(np.quantile(xs, q, method="nearest"))


HOPS = ("router_added", "grpc", "route", "to_worker", "from_worker", "first_send")


def _hops(client_ttft: float, t) -> dict[str, float]:
    """Where one request's time to first token went, outside the prefill worker (ms).
    ``router_added``: the client's TTFT minus the worker's own time (everything the
    serving path adds); ``grpc``: the client's TTFT minus the router's (client <-> router,
    both ways); ``route``: router admission to the prefill call (API key, validation,
    placement); ``to_worker`` / ``from_worker``: the hops to and from the worker (the
    worker plane);
    ``first_send``: the router's own work from the result to the first token sent."""
    hop = {"router_added": client_ttft - t.worker_s, "grpc": client_ttft - t.ttft_s,
           "route": t.route_s, "to_worker": t.to_worker_s, "from_worker": t.from_worker_s}
    hop["first_send"] = t.ttft_s - (t.route_s + t.to_worker_s + t.worker_s + t.from_worker_s)
    return {k: v * 1e3 for k, v in hop.items()}


def _percentiles(samples: list[dict]) -> dict[str, float]:
    return {f"{h}_ms_{name}": pct([s[h] for s in samples], q)
            for h in HOPS for name, q in (("p50", 0.5), ("p99", 0.99))}


def _vs_static(hit_rate: float, static: float) -> dict[str, float]:
    return {"static_partition_hit_rate": static,
            "hit_rate_vs_static": hit_rate / static if static else float("nan")}


def static_partition_hit_rate(mix: list[str], names: list[str], slots: int) -> float:
    """The hit rate of a perfect static partition: the ``slots`` hottest adapters (by the
    Zipf rank the mix was drawn with) pinned across the workers' slots, each missing once
    (its first load); every other adapter always misses."""
    hot = set(names[:slots])
    return (sum(a in hot for a in mix) - len(hot & set(mix))) / len(mix)


def zipf_mix(adapters: int, zipf: float, requests: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """(adapter names hottest first, the request mix drawn from Zipf(``zipf``) over them)."""
    names = [f"u{i:03d}" for i in range(adapters)]
    weights = [1 / (i + 1) ** zipf for i in range(adapters)]
    return names, random.Random(seed).choices(names, weights, k=requests)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefill-workers", type=int, default=2)
    ap.add_argument("--host-tier", type=int, default=4, help="max_cpu_loras per prefill engine")
    ap.add_argument("--batch-slots", type=int, default=1,
                    help="max_loras per prefill engine (hot_set pins host tier - batch slots)")
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--policies", default="locality,round_robin,least_loaded,hot_set")
    ap.add_argument("--out", default="bench/results/routing.json")
    args = ap.parse_args(argv)

    import ray
    from rich.console import Console
    from rich.progress import track

    from app.assets import tiny_assets
    from cluster.config import ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig, RouterConfig
    from app.launcher import LocalCluster
    from app.tiny import make_lora_adapter
    from preft_client import PreftClient
    from router.pool import POLICIES

    console = Console()
    model, _ = tiny_assets()
    work = Path(".preft/bench-routing")
    paths = {}
    for i in range(args.adapters):
        d = work / f"u{i:03d}"
        if not (d / "adapter_model.safetensors").exists():
            make_lora_adapter(d, model, seed=1000 + i)
        paths[d.name] = d
    eng = EngineConfig(model=str(model), max_model_len=1024)
    cfg = ClusterConfig(
        prefill=PrefillConfig(engine=eng, max_loras=args.batch_slots, max_cpu_loras=args.host_tier),
        decode=DecodeConfig(engine=eng), router=RouterConfig(port=0),
        prefill_workers=args.prefill_workers, decode_workers=1, run_dir=str(work / "run"))
    cluster = LocalCluster(cfg)
    cluster.start_workers(console.log)
    cluster.start_router_in_thread()
    out: dict = {"config": vars(args), "machine": platform.platform()}
    try:
        with PreftClient(cluster.address) as client:
            t0 = time.perf_counter()
            client.register_adapter("fresh", paths["u000"])
            t_reg = time.perf_counter() - t0
            client.generate("fresh", prompt="hello", max_tokens=2)
            out["upload_to_servable_s"] = {"register": t_reg, "register_plus_first_request":
                                           time.perf_counter() - t0}
            for name, p in track(list(paths.items()), description="register adapters"):
                client.register_adapter(name, p)
            names, mix = zipf_mix(args.adapters, args.zipf, args.requests)
            svc = cluster._server.service
            static = static_partition_hit_rate(mix, names, args.prefill_workers * args.host_tier)
            rows = []
            for pol in args.policies.split(","):
                svc.pool.prefill_policy = POLICIES[pol].from_config(cfg.router, cfg.prefill)
                for w in cluster.pool.prefill:   # cold tiers for every policy
                    for n in names:
                        ray.get(w.actor.drop_adapter.remote(n))
                before = [ray.get(w.actor.stats.remote()) for w in cluster.pool.prefill]
                samples = []

                def one(name):
                    t0, first = time.perf_counter(), None
                    for ev in client.events(name, prompt="The scheduler batches requests",
                                            max_tokens=2):
                        if first is None:
                            first = time.perf_counter() - t0   # the client's TTFT
                    samples.append(_hops(first, ev.timings))
                    return ev

                with ThreadPoolExecutor(args.concurrency) as ex:
                    list(track(ex.map(one, mix), total=len(mix), description=pol))
                after = [ray.get(w.actor.stats.remote()) for w in cluster.pool.prefill]
                hits = {t: sum(a.tier_hits[t] - b.tier_hits[t] for a, b in zip(after, before))
                        for t in after[0].tier_hits}
                pin_loads = sum(a.pin_loads - b.pin_loads for a, b in zip(after, before))
                total = sum(hits.values())
                rows.append({"policy": pol, "via": "plane", "requests": total,
                             "engine_hits": hits["engine"],
                             "disk_loads": hits["disk"], "store_loads": hits["store"],
                             "pin_loads": pin_loads, "pinned_at_end": [list(a.pinned) for a in after],
                             "hit_rate": hits["engine"] / total,
                             **_vs_static(hits["engine"] / total, static),
                             **_percentiles(samples)})
            out["rows"] = rows
    finally:
        cluster.stop()
    console.print(out["upload_to_servable_s"])
    report(f"{args.adapters} adapters, host tier {args.host_tier}/worker, "
           f"{args.prefill_workers} prefill workers, Zipf {args.zipf}", rows, args.out,
           **{k: v for k, v in out.items() if k != "rows"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
