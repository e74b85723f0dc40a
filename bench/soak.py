"""Bounded soak: sustained mixed-adapter streaming load with zero lost or hung requests.

``python -m bench.soak --minutes 10`` starts the embedded tiny cluster, keeps
``--streams`` concurrent streaming clients busy for the duration (random adapter or base
model, prompt 4-300 tokens, 4-64 output tokens, greedy), and every ``--sample-s`` records
the resident memory of each worker process and of the router process, the decode KV
blocks in use and the prefill worker's held transfers. At the end it checks that every
request finished (completed, or a retriable status), none outlived its deadline, KV
blocks and held transfers returned to zero, and reports memory growth from the first
quarter of the run to the last (flat memory = within noise). Writes JSON and a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--streams", type=int, default=6, help="concurrent clients")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--deadline-s", type=float, default=60.0, help="per-request deadline")
    p.add_argument("--out", default="bench/results/soak.json")
    a = p.parse_args(argv)

    import psutil
    import ray

    from app.assets import tiny_assets
    from cluster.config import (ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig,
                                RouterConfig)
    from app.launcher import LocalCluster
    from preft_client import AsyncPreftClient, PreftClientError

    model, adapters = tiny_assets()
    eng = EngineConfig(model=str(model), max_model_len=1024)
    run_dir = tempfile.mkdtemp(prefix="preft-soak-")
    cfg = ClusterConfig(prefill=PrefillConfig(engine=eng), decode=DecodeConfig(engine=eng),
                        router=RouterConfig(port=0, request_timeout_s=a.deadline_s),
                        adapters=tuple((n, str(q)) for n, q in adapters.items()),
                        run_dir=run_dir, name="soak")
    cluster = LocalCluster(cfg).start_in_thread(print)
    names = [None, *adapters]
    pids = {w.worker_id: ray.get(w.actor.info.remote()).pid for w in cluster.pool.all()}
    pids["router"] = psutil.Process().pid
    samples: list[dict] = []
    stop = threading.Event()

    def sampler() -> None:
        t0 = time.monotonic()
        while not stop.wait(a.sample_s):
            row = {"t": time.monotonic() - t0}
            for k, pid in pids.items():
                try:
                    row[f"rss_mib:{k}"] = psutil.Process(pid).memory_info().rss / 2**20
                except psutil.Error:
                    row[f"rss_mib:{k}"] = None
            row["kv_blocks_in_use"] = sum(
                u.blocks_in_use
                for u in ray.get([w.actor.kv_usage.remote() for w in cluster.pool.decode]))
            row["held_transfers"] = sum(ray.get([w.actor.held_transfers.remote()
                                                 for w in cluster.pool.prefill]))
            samples.append(row)

    counts = {"sent": 0, "completed": 0, "retriable": 0, "other_error": 0, "hung": 0,
              "tokens": 0}
    errors: list[str] = []

    async def stream(i: int, client, end: float) -> None:
        rng = random.Random(i)
        while time.monotonic() < end:
            n_out = rng.randint(4, 64)
            prompt = " ".join(rng.choice(["soak", "test", "adapters", "prefill", "decode",
                                          "kv", "cache"]) for _ in range(rng.randint(4, 300)))
            counts["sent"] += 1
            got = 0
            try:
                async with asyncio.timeout(a.deadline_s + 5):
                    async for d in client.stream(rng.choice(names), prompt=prompt,
                                                 max_tokens=n_out, ignore_eos=True):
                        got += len(d.token_ids)
                if got == n_out:
                    counts["completed"] += 1
                    counts["tokens"] += got
                else:
                    counts["other_error"] += 1
                    errors.append(f"short stream: {got}/{n_out}")
            except TimeoutError:
                counts["hung"] += 1
            except PreftClientError as e:
                key = "retriable" if e.code.name in ("UNAVAILABLE", "ABORTED") else "other_error"
                counts[key] += 1
                errors.append(f"{e.code.name}: {e.message[:200]}")

    async def drive() -> None:
        end = time.monotonic() + 60 * a.minutes
        async with AsyncPreftClient(cluster.address, timeout=a.deadline_s, retries=0) as c:
            await asyncio.gather(*(stream(i, c, end) for i in range(a.streams)))

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    t0 = time.time()
    try:
        asyncio.run(drive())
        wall = time.time() - t0
        time.sleep(2 * a.sample_s)        # quiescent samples: blocks must be back to zero
    finally:
        stop.set()
        th.join(30)
        cluster.stop()

    def growth(key: str, late: bool = False) -> float | None:
        """Median RSS of the last quarter minus the first (``late``: minus the third)."""
        vals = [s[key] for s in samples if s.get(key) is not None]
        if len(vals) < 8:
            return None
        q = len(vals) // 4
        ref = vals[2 * q:3 * q] if late else vals[:q]
        return statistics.median(vals[-q:]) - statistics.median(ref)

    rss_keys = [k for k in samples[0] if k.startswith("rss_mib:")] if samples else []
    result = {
        "config": vars(a), "wall_s": wall, **counts,
        "requests_per_s": counts["completed"] / wall, "tokens_per_s": counts["tokens"] / wall,
        "final_kv_blocks_in_use": samples[-1]["kv_blocks_in_use"] if samples else None,
        "final_held_transfers": samples[-1]["held_transfers"] if samples else None,
        "rss_growth_mib_first_to_last_quarter": {k.split(":", 1)[1]: growth(k) for k in rss_keys},
        "rss_growth_mib_third_to_last_quarter": {k.split(":", 1)[1]: growth(k, True)
                                                 for k in rss_keys},
        "rss_mib_last": {k.split(":", 1)[1]: samples[-1][k] for k in rss_keys} if samples else {},
        "errors": sorted(set(errors))[:20], "samples": samples,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    _plot(samples, rss_keys, out.with_suffix(".png"))
    ok = (counts["hung"] == 0 and counts["other_error"] == 0 and
          result["final_kv_blocks_in_use"] == 0 and result["final_held_transfers"] == 0)
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "config")},
                     indent=2))
    print(f"{'OK' if ok else 'FAILED'}: wrote {out} and {out.with_suffix('.png')}")
    return 0 if ok else 1


def _plot(samples: list[dict], rss_keys: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples:
        return
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    t = [s["t"] / 60 for s in samples]
    for k in rss_keys:
        ax1.plot(t, [s[k] for s in samples], label=k.split(":", 1)[1])
    ax1.set_ylabel("RSS (MiB)")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    ax2.plot(t, [s["kv_blocks_in_use"] for s in samples], label="decode KV blocks in use")
    ax2.plot(t, [s["held_transfers"] for s in samples], label="prefill held transfers")
    ax2.set_xlabel("minutes")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle("preft soak: memory and KV blocks under sustained mixed-adapter load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
