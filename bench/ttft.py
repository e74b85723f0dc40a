"""TTFT split through the real cluster: prefill / KV transfer / first decode step.

Starts a local cluster (embedded tiny model by default, or ``--model``), sends greedy
requests with prompts of the given lengths, and reports per length the medians of queue,
prefill, KV transfer and first decode step, TTFT, KV bytes and GB/s; plus engine start
time and resident memory per worker. Prints a table and writes JSON.

    .venv/bin/python -m bench.ttft --lengths 128,512,2048 --repeats 5
"""

from __future__ import annotations

import argparse
import random
import statistics
from bench.report import report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model dir (default: embedded tiny model)")
    ap.add_argument("--lengths", default="128,512,2048", help="prompt lengths in tokens")
    ap.add_argument("--repeats", type=int, default=5, help="requests per length (median reported)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="engine context length (default: the model's own)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="bench/results/ttft.json")
    args = ap.parse_args(argv)

    import ray
    from rich.console import Console
    from rich.progress import track

    from app.assets import tiny_assets
    from cluster.config import ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig, RouterConfig
    from app.launcher import LocalCluster
    from preft_client import PreftClient

    console = Console()
    model, demo = (args.model, {}) if args.model else tiny_assets()
    adapters = tuple((n, str(p)) for n, p in demo.items())
    eng = EngineConfig(model=str(model), dtype=args.dtype, max_model_len=args.max_model_len)
    cfg = ClusterConfig(prefill=PrefillConfig(engine=eng), decode=DecodeConfig(engine=eng),
                        router=RouterConfig(port=0), adapters=adapters,
                        run_dir=".preft/bench-ttft")
    cluster = LocalCluster(cfg).start_in_thread(console.log)
    rss = {w.worker_id: ray.get(w.actor.__ray_call__.remote(
        lambda self: __import__("psutil").Process().memory_info().rss))
        for w in cluster.pool.prefill + cluster.pool.decode}
    starts = {w.worker_id: w.info.engine_start_s for w in cluster.pool.prefill + cluster.pool.decode}
    vocab = cluster.pool.prefill[0].info.vocab_size
    adapter = adapters[0][0] if adapters else None
    rng = random.Random(0)
    rows = []
    try:
        with PreftClient(cluster.address) as client:
            client.generate(adapter, prompt_token_ids=[5] * 16, max_tokens=2)  # warm-up
            for L in [int(x) for x in args.lengths.split(",")]:
                samples = []
                for _ in track(range(args.repeats), description=f"{L}-token prompts"):
                    p = [rng.randrange(3, vocab) for _ in range(L)]  # fresh: no cache hits
                    c = client.generate(adapter, prompt_token_ids=p, max_tokens=args.max_tokens,
                                        ignore_eos=True)
                    samples.append(c)
                med = lambda f: statistics.median(f(c) for c in samples)  # noqa: E731
                t = lambda name: med(lambda c: getattr(c.timings, name))  # noqa: E731
                kv_s = t("kv_transfer_s")
                kv_b = med(lambda c: c.kv_bytes)
                rows.append({
                    "prompt_tokens": L, "queue_ms": t("queue_s") * 1e3,
                    "prefill_ms": t("prefill_s") * 1e3, "kv_transfer_ms": kv_s * 1e3,
                    "first_decode_step_ms": t("first_decode_step_s") * 1e3,
                    "ttft_ms": t("ttft_s") * 1e3, "kv_bytes": kv_b,
                    "kv_gb_per_s": kv_b / kv_s / 1e9 if kv_s else 0.0,
                    "kv_share_of_time_to_second_token": kv_s / (t("ttft_s") + kv_s + t("first_decode_step_s")),
                })
    finally:
        cluster.stop()
    console.print({"engine_start_s": starts, "rss_gib": {k: v / 2**30 for k, v in rss.items()}})
    report("TTFT split (medians)", rows, args.out, config=vars(args), model=str(model),
           engine_start_s=starts, rss_bytes=rss)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
