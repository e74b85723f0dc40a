"""Tensor parallelism 1 vs 2 on both pools, one invocation: start-up, memory, KV per rank.

Starts a local prefill/decode cluster (one worker each, one LoRA-P adapter) with
``tensor_parallel_size`` 1, measures it, stops it, then the same with 2 (and any other
``--tps``). Per cluster and pool: the engine's start time (the worker's ``engine_start_s``:
building the engine, its ranks included), the resident memory of the worker actor's
process tree (the actor plus its rank processes), and, over ``--requests`` greedy requests
of ``--prompt-tokens`` fresh tokens each: median TTFT and wall time, the KV bytes a
request reports, and the bytes each decode rank pulled (its own endpoint's records, read on
the rank). ``ratios`` compares each size with TP 1 of this invocation. Prints a table and
writes JSON.

    .venv/bin/python -m bench.tensor_parallel --tps 1,2 --prompt-tokens 512 --requests 8
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from bench.report import report


def _tree_rss_mib(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


def _rank_bytes(engine) -> list[int]:
    """Bytes each rank of a decode engine pulled (its endpoint's records)."""
    def pulled(_worker):
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        return sum(r.bytes for r in get_kv_transfer_group().worker.endpoint.records())
    return engine.collective_rpc(pulled)


def _workload(cluster, adapter: str, args) -> dict:
    import ray

    from preft_client import PreftClient

    vocab = cluster.pool.prefill[0].info.vocab_size
    rng = random.Random(0)
    ttft, wall, kv = [], [], []
    with PreftClient(cluster.address, timeout=600) as client:
        client.generate(adapter, prompt_token_ids=[5] * 16, max_tokens=2)  # warm-up
        before = ray.get(cluster.pool.decode[0].actor.__ray_call__.remote(
            lambda self: _rank_bytes(self.loop.engine)))
        for _ in range(args.requests):
            p = [rng.randrange(3, vocab) for _ in range(args.prompt_tokens)]
            t0 = time.perf_counter()
            c = client.generate(adapter, prompt_token_ids=p, max_tokens=args.max_tokens,
                                ignore_eos=True)
            wall.append((time.perf_counter() - t0) * 1e3)
            ttft.append(c.timings.ttft_s * 1e3)
            kv.append(c.kv_bytes)
        after = ray.get(cluster.pool.decode[0].actor.__ray_call__.remote(
            lambda self: _rank_bytes(self.loop.engine)))
    per_rank = [(a - b) / args.requests for a, b in zip(after, before)]
    return {"ttft_ms": statistics.median(ttft), "wall_ms": statistics.median(wall),
            "kv_bytes_per_request": statistics.median(kv),
            "kv_bytes_per_rank": per_rank}


def _measure(tp: int, model: str, adapter: str, home: Path, args, say) -> dict:
    from app.launcher import LocalCluster
    from cluster.config import (ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig,
                                RouterConfig)

    eng = EngineConfig(model=model, tensor_parallel_size=tp)
    cfg = ClusterConfig(prefill=PrefillConfig(engine=eng), decode=DecodeConfig(engine=eng),
                        router=RouterConfig(port=0), adapters=(("lora", adapter),),
                        run_dir=str(home / f"run-tp{tp}"), name=f"tpb{tp}")
    t0 = time.perf_counter()
    cluster = LocalCluster(cfg).start_in_thread(say)
    try:
        up_s = time.perf_counter() - t0
        p, d = cluster.pool.prefill[0].info, cluster.pool.decode[0].info
        row = {"tp": tp, "cluster_up_s": up_s,
               "prefill_engine_start_s": p.engine_start_s,
               "decode_engine_start_s": d.engine_start_s,
               "prefill_rss_mib": _tree_rss_mib(p.pid), "decode_rss_mib": _tree_rss_mib(d.pid)}
        row.update(_workload(cluster, "lora", args))
        return row
    finally:
        cluster.stop()


def _ratios(rows: list[dict]) -> list[dict]:
    base = next((r for r in rows if r["tp"] == 1), None)
    if base is None:
        return []
    keys = ("prefill_engine_start_s", "prefill_rss_mib", "decode_rss_mib", "ttft_ms",
            "wall_ms", "kv_bytes_per_request")
    return [{"tp": r["tp"], **{f"x_{k}": r[k] / base[k] if base[k] else 0.0 for k in keys}}
            for r in rows if r["tp"] != 1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tps", default="1,2", help="tensor-parallel sizes to compare")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8, help="sequential requests per size")
    ap.add_argument("--out", default="bench/results/tensor_parallel.json")
    args = ap.parse_args(argv)

    from rich.console import Console

    from app.assets import DEFAULT_HOME
    from app.tiny import TinyModelSpec, make_lora_adapter, make_tiny_model

    home = Path(DEFAULT_HOME) / "bench-tp"
    model = make_tiny_model(home / "model", TinyModelSpec(max_position_embeddings=1024))
    adapter = make_lora_adapter(home / "lora", model, seed=7)
    console = Console()
    rows = []
    for tp in [int(x) for x in args.tps.split(",")]:
        console.rule(f"tensor_parallel_size={tp}")
        rows.append(_measure(tp, str(model), str(adapter), home, args, console.log))
    ratios = _ratios(rows)
    console.print({"ratios": ratios})
    report("tensor parallelism on both pools: start-up, memory, KV per rank (medians)",
           rows, args.out, config=vars(args), model=str(model), ratios=ratios)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
