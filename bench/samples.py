"""n samples of one prompt: one request with ``n`` vs n independent requests, one cluster.

Starts a local P/D cluster once and, for each ``n``, sends the same kind of work two ways
(fresh prompts each time, one LoRA-P adapter, temperature 1 with seeds):

* ``n_samples``    -- one request with ``n=N``: one prefill call whose N engine requests
  are submitted together (the prompt's full blocks computed once), the first sample's KV
  pulled whole and the others' only their last, partial block (decode prefix cache);
* ``independent``  -- N concurrent requests of the same prompt with ``n=1`` (seeds
  seed..seed+N-1: the same samples), each its own admission, prefill call and KV pull.

Per row: medians over ``--repeats`` of wall time to the last token, prompt tokens the
prefill engines computed (not found in their prefix cache), KV bytes moved prefill ->
decode, and TTFT of the first sample. ``ratios`` holds independent / n_samples per N,
from this invocation only. Prints a table and writes JSON.

    .venv/bin/python -m bench.samples --ns 2,4,8 --prompt-tokens 900 --repeats 3
    .venv/bin/python -m bench.samples --decode-workers 2 --out bench/results/samples_2decode.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.report import report


def _prefill_tokens(cluster) -> tuple[int, int]:
    import ray

    st = [ray.get(w.actor.stats.remote()) for w in cluster.pool.prefill]
    return sum(s.prompt_tokens for s in st), sum(s.prompt_tokens_cached for s in st)


def _run(cluster, client, mode: str, n: int, prompt: list[int], args, adapter: str) -> dict:
    kw = dict(prompt_token_ids=prompt, max_tokens=args.max_tokens, temperature=1.0,
              ignore_eos=True)
    t0, before = time.perf_counter(), _prefill_tokens(cluster)
    if mode == "n_samples":
        done = [client.generate(adapter, seed=1, n=n, **kw)]
    else:
        with ThreadPoolExecutor(n) as ex:
            done = list(ex.map(lambda i: client.generate(adapter, seed=1 + i, **kw), range(n)))
    wall = time.perf_counter() - t0
    after = _prefill_tokens(cluster)
    computed = (after[0] - before[0]) - (after[1] - before[1])
    return {"wall_ms": wall * 1e3, "prompt_tokens_computed": computed,
            "kv_bytes": sum(c.kv_bytes for c in done),
            "ttft_ms": min(c.timings.ttft_s for c in done) * 1e3,
            "completion_tokens": sum(c.usage.completion_tokens for c in done)}


def _measure(cluster, adapter: str, args, track) -> list[dict]:
    from preft_client import PreftClient

    vocab = cluster.pool.prefill[0].info.vocab_size
    rng = random.Random(0)
    rows = []
    with PreftClient(cluster.address, timeout=600) as client:
        client.generate(adapter, prompt_token_ids=[5] * 16, max_tokens=2)  # warm-up
        for n in [int(x) for x in args.ns.split(",")]:
            for mode in ("n_samples", "independent"):
                runs = []
                for _ in track(range(args.repeats), description=f"n={n} {mode}"):
                    p = [rng.randrange(3, vocab) for _ in range(args.prompt_tokens)]
                    runs.append(_run(cluster, client, mode, n, p, args, adapter))
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                rows.append({"n": n, "mode": mode, "prompt_tokens": args.prompt_tokens, **med})
    return rows


def _ratios(rows: list[dict]) -> list[dict]:
    """Per n: independent over n_samples (medians of this invocation)."""
    by = {(r["n"], r["mode"]): r for r in rows}
    out = []
    for (n, mode), one in by.items():
        ind = by.get((n, "independent"))
        if mode != "n_samples" or ind is None:
            continue
        out.append({"n": n, **{f"x_{k}": ind[k] / one[k] if one[k] else 0.0
                               for k in ("wall_ms", "prompt_tokens_computed", "kv_bytes")}})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="2,4,8", help="samples per request to compare")
    ap.add_argument("--prompt-tokens", type=int, default=900)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3, help="runs per row (median reported)")
    ap.add_argument("--decode-workers", type=int, default=1,
                    help="decode pool size (independent requests spread over it by load)")
    ap.add_argument("--out", default="bench/results/samples.json")
    args = ap.parse_args(argv)

    from rich.console import Console
    from rich.progress import track

    from app.assets import DEFAULT_HOME
    from app.launcher import LocalCluster
    from app.tiny import TinyModelSpec, make_lora_adapter, make_tiny_model
    from cluster.config import (ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig,
                                RouterConfig)

    home = Path(DEFAULT_HOME) / "bench-samples"
    model = make_tiny_model(home / "model", TinyModelSpec(max_position_embeddings=1024))
    adapter = make_lora_adapter(home / "lora", model, seed=7)
    eng = EngineConfig(model=str(model))
    cfg = ClusterConfig(prefill=PrefillConfig(engine=eng), decode=DecodeConfig(engine=eng),
                        decode_workers=args.decode_workers, router=RouterConfig(port=0),
                        adapters=(("lora", str(adapter)),), run_dir=str(home / "run"))
    console = Console()
    cluster = LocalCluster(cfg).start_in_thread(console.log)
    try:
        rows = _measure(cluster, "lora", args, track)
    finally:
        cluster.stop()
    ratios = _ratios(rows)
    console.print({"ratios": ratios})
    report("n samples of one prompt: one request with n vs n independent requests (medians)",
           rows, args.out, config=vars(args), model=str(model), ratios=ratios)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
