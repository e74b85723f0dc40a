"""Multi-turn agent workload: activated LoRA vs the same adapters as all-token LoRA vs base.

One colocated-only cluster (one engine, the default settings), started once; every system
runs on it in one invocation, one after the other, each over its own fresh contexts (no
system finds another's KV in the prefix cache):

* ``alora`` -- ``--adapters`` aLoRA adapters (kind ``alora``): the adapter applies from its
  invocation tokens on, so the shared context's KV is the base model's and every adapter
  asked about it finds it in the prefix cache;
* ``lora``  -- the same weights as all-token LoRA (kind ``lora``): the adapter conditions the
  whole context, so no adapter reuses another's KV;
* ``base``  -- no adapter (the throughput every ratio is taken against).

A conversation is a ``--context``-token shared context; each adapter in turn is asked a
``--question``-token question over it (the invocation tokens appended: the same prompt for
every system) and answers ``--output`` tokens (greedy, no EOS stop); ``--conversations``
conversations run ``--concurrency`` at a time, their turns in order. Per system: TTFT (the
first streamed delta, at the SDK) p50/p90, output tokens per second over the system's wall
time, and the prefix-cache hits the engine counted, by span part (base: positions before
the adapter's span; adapter: from it on). Ratios compare systems of this invocation only.
Prints a table and writes JSON.

    .venv/bin/python -m bench.alora --model qwen2.5-0.5b --conversations 4
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.report import report

SYSTEMS = ("alora", "lora", "base")
INVOCATION = (11, 12, 13)


def _prepare(model: str, n_adapters: int, home: Path):
    """(model dir, load_format, aLoRA dirs, the same weights as plain LoRA dirs)."""
    from app.tiny import make_alora_adapter
    from bench.models import make_model
    from prefill_worker.adapters.alora import without_invocation

    model_dir, load_format = make_model(model, home / "bench-models")
    root = home / "adapters" / model_dir.name / "alora-bench"
    alora, lora = [], []
    for i in range(n_adapters):
        a, plain = root / f"al{i}", root / f"lo{i}"
        if not (a / "adapter_model.safetensors").exists():
            make_alora_adapter(a, model_dir, seed=100 + i, invocation=INVOCATION, rank=8)
        if not (plain / "adapter_model.safetensors").exists():
            without_invocation(a, plain)
        alora.append(str(a))
        lora.append(str(plain))
    return model_dir, load_format, alora, lora


def _cluster_config(args, model_dir: Path, load_format: str, alora, lora):
    from cluster.config import (ClusterConfig, ColocatedConfig, DecodeConfig, EngineConfig,
                                PrefillConfig, RouterConfig)

    eng = EngineConfig(model=str(model_dir), dtype=args.dtype, load_format=load_format,
                       max_model_len=args.max_model_len)
    adapters = tuple((f"al{i}", p) for i, p in enumerate(alora)) + tuple(
        (f"lo{i}", p) for i, p in enumerate(lora))
    return ClusterConfig(prefill=PrefillConfig(engine=eng), decode=DecodeConfig(engine=eng),
                         colocated=ColocatedConfig(engine=eng), prefill_workers=0,
                         decode_workers=0, colocated_workers=1, router=RouterConfig(port=0),
                         adapters=adapters,
                         adapter_kinds=tuple((f"lo{i}", "lora") for i in range(len(lora))),
                         run_dir=f".preft/bench-alora-{model_dir.name}")


def _conversation(client, system: str, context: list[int], questions, args, out: list) -> None:
    """One conversation's turns, in order: adapter i asked question i over the context."""
    for i, q in enumerate(questions):
        adapter = {"alora": f"al{i}", "lora": f"lo{i}", "base": None}[system]
        t0, first, n = time.perf_counter(), None, 0
        for d in client.stream(adapter, prompt_token_ids=context + q + list(INVOCATION),
                               max_tokens=args.output, ignore_eos=True):
            if first is None and d.token_ids:
                first = time.perf_counter() - t0
            n += len(d.token_ids)
        out.append((first, n))


def _run_system(cluster, system: str, seed: int, args, vocab: int) -> dict:
    from preft_client import PreftClient

    rng = random.Random(seed)   # fresh contexts per system: nothing shared between systems
    convs = [([rng.randrange(100, vocab) for _ in range(args.context)],
              [[rng.randrange(100, vocab) for _ in range(args.question)]
               for _ in range(args.adapters)]) for _ in range(args.conversations)]
    stats0, samples, lock = _prefix(cluster), [], threading.Lock()
    with PreftClient(cluster.address, timeout=3600) as client:
        t0 = time.perf_counter()

        def run(conv):
            out: list = []
            _conversation(client, system, conv[0], conv[1], args, out)
            with lock:
                samples.extend(out)
        with ThreadPoolExecutor(args.concurrency) as ex:
            list(ex.map(run, convs))
        wall = time.perf_counter() - t0
    ttft = sorted(s[0] for s in samples)
    tokens = sum(s[1] for s in samples)
    hits = {k: v - stats0.get(k, 0) for k, v in _prefix(cluster).items()}
    return {"system": system, "requests": len(samples), "ttft_p50_ms": statistics.median(ttft) * 1e3,
            "ttft_p90_ms": ttft[int(0.9 * (len(ttft) - 1))] * 1e3, "wall_s": wall,
            "output_tok_s": tokens / wall, "output_tokens": tokens,
            "base_hit_share": hits.get("base_hits", 0) / max(1, hits.get("base_queries", 0)),
            "adapter_hit_share": (hits.get("adapter_hits", 0)
                                  / max(1, hits.get("adapter_queries", 0))),
            "prefix_cache": hits}


def _warm_up(cluster, n: int) -> None:
    """Every adapter loaded into the engine once (a short prompt each), so no system's
    TTFT includes a load from disk."""
    from preft_client import PreftClient

    with PreftClient(cluster.address, timeout=600) as client:
        for name in [None, *(f"al{i}" for i in range(n)), *(f"lo{i}" for i in range(n))]:
            client.generate(name, prompt_token_ids=[100, *INVOCATION], max_tokens=2)


def _prefix(cluster) -> dict:
    import ray

    return dict(ray.get(cluster.pool.colocated[0].actor.stats.remote()).prefix_cache)


def _ratios(rows: list[dict]) -> dict:
    by = {r["system"]: r for r in rows}
    out = {}
    if "alora" in by and "lora" in by:
        out["alora_ttft_p50_over_lora"] = by["alora"]["ttft_p50_ms"] / by["lora"]["ttft_p50_ms"]
    if "alora" in by and "base" in by:
        out["alora_output_tok_s_over_base"] = (by["alora"]["output_tok_s"]
                                               / by["base"]["output_tok_s"])
    if "lora" in by and "base" in by:
        out["lora_output_tok_s_over_base"] = by["lora"]["output_tok_s"] / by["base"]["output_tok_s"]
    return out


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-0.5b",
                    help="model shape built locally (random weights): tiny | qwen2.5-0.5b ...")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help="systems to run, in order: alora, lora, base")
    ap.add_argument("--context", type=int, default=1024, help="shared context tokens")
    ap.add_argument("--adapters", type=int, default=8, help="adapters asked per conversation")
    ap.add_argument("--question", type=int, default=32, help="question tokens per turn")
    ap.add_argument("--output", type=int, default=64, help="answer tokens per turn")
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8, help="conversations at a time")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="bench/results/alora.json")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",")]
    if unknown := [s for s in systems if s not in SYSTEMS]:
        _parser().error(f"--systems: unknown {unknown}; known: {', '.join(SYSTEMS)}")

    from rich.console import Console

    from app.assets import DEFAULT_HOME
    from app.launcher import LocalCluster

    console = Console()
    model_dir, load_format, alora, lora = _prepare(args.model, args.adapters, Path(DEFAULT_HOME))
    cluster = LocalCluster(_cluster_config(args, model_dir, load_format, alora,
                                           lora)).start_in_thread(console.log)
    rows = []
    try:
        vocab = cluster.pool.colocated[0].info.vocab_size
        _warm_up(cluster, args.adapters)
        for k, system in enumerate(systems):
            console.rule(f"system: {system}")
            rows.append(_run_system(cluster, system, 1000 + k, args, vocab))
            console.log(rows[-1])
    finally:
        cluster.stop()
    ratios = _ratios(rows)
    console.print({"ratios": ratios})
    table = [{k: v for k, v in r.items() if k != "prefix_cache"} for r in rows]
    report("Multi-turn agent workload: aLoRA vs all-token LoRA vs base (one colocated engine)",
           table, args.out, config=vars(args), model=str(model_dir), ratios=ratios,
           prefix_cache={r["system"]: r["prefix_cache"] for r in rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
