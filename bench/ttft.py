"""TTFT split through the real cluster, KV staged layer by layer during prefill vs not.

Starts a local P/D cluster once per KV mode, in one invocation, and sends the same greedy
requests (fresh prompts of each length, one LoRA-P adapter) to each:

* ``held``      -- ``TransferConfig.layerwise=False``: the prefill engine holds the prompt's
  blocks until decode pulls, and the pull gathers them out of the cache (then decode
  scatters them into its own);
* ``layerwise`` -- the default: the prefill engine copies each layer's blocks out as its
  forward writes them (so nothing is gathered at the pull), and a same-host decode engine
  copies them into its blocks during its first forward, each layer just before that
  layer's attention reads it.

Per mode and length it reports the medians of queue, prefill (adapter + first token), KV
transfer (claim or pull to the last byte in decode's blocks), the KV time left **exposed**
after prefill ends (what the decode request waited for: the whole pull when it runs before
the request; the claim's round trip, the tail block and the forward's per-layer waits when
it loads layer by layer during the forward), first decode step and TTFT; then, per length,
the share of the held mode's exposed KV time the layer-wise mode hides, and what it costs
the prefill. In layerwise mode the first transfer of each pair forms it and is pulled
before its request runs (``loaded_layerwise`` counts those that were not). Engine start time and
resident memory per worker too. Prints a table and writes JSON.

    .venv/bin/python -m bench.ttft --model qwen2.5-0.5b --lengths 512,2048 --repeats 5
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

from bench.report import report

MODES = {"held": False, "layerwise": True}


def _prepare(model: str, home: Path):
    """(model dir, load_format, [(adapter, path)]) for ``model`` (tiny or a bench shape)."""
    from bench.models import make_model
    from app.tiny import make_lora_adapter

    model_dir, load_format = make_model(model, home / "bench-models")
    adapter = home / "adapters" / model_dir.name / "ttft-lora"
    if not (adapter / "adapter_model.safetensors").exists():
        make_lora_adapter(adapter, model_dir, seed=7, rank=8, alpha=16)
    return model_dir, load_format, [("ttft-lora", str(adapter))]


def _cluster_config(args, model_dir: Path, load_format: str, adapters, layerwise: bool):
    from cluster.config import (ClusterConfig, DecodeConfig, EngineConfig, PrefillConfig,
                                RouterConfig, TransferConfig)

    eng = EngineConfig(model=str(model_dir), dtype=args.dtype, load_format=load_format,
                       max_model_len=args.max_model_len)
    transfer = TransferConfig(layerwise=layerwise)
    return ClusterConfig(prefill=PrefillConfig(engine=eng, transfer=transfer),
                         decode=DecodeConfig(engine=eng, transfer=transfer),
                         router=RouterConfig(port=0), adapters=tuple(adapters),
                         run_dir=f".preft/bench-ttft-{'layerwise' if layerwise else 'held'}")


def _measure(cluster, adapter: str, lengths: list[int], args, track) -> list[dict]:
    import ray

    from preft_client import PreftClient

    loads = lambda: ray.get(cluster.pool.decode[0].actor.kv_loads.remote())  # noqa: E731

    vocab = cluster.pool.prefill[0].info.vocab_size
    rng = random.Random(0)         # the same prompts in every mode
    rows = []
    with PreftClient(cluster.address, timeout=600) as client:
        client.generate(adapter, prompt_token_ids=[5] * 16, max_tokens=2)  # warm-up
        for L in lengths:
            samples, before = [], loads()
            for _ in track(range(args.repeats), description=f"{L}-token prompts"):
                p = [rng.randrange(3, vocab) for _ in range(L)]  # fresh: no cache hits
                samples.append(client.generate(adapter, prompt_token_ids=p,
                                               max_tokens=args.max_tokens, ignore_eos=True))
            med = lambda f: statistics.median(f(c) for c in samples)  # noqa: E731
            t = lambda name: med(lambda c: getattr(c.timings, name))  # noqa: E731
            kv_s, kv_b = t("kv_transfer_s"), med(lambda c: c.kv_bytes)
            after = loads()
            rows.append({
                "prompt_tokens": L, "queue_ms": t("queue_s") * 1e3,
                "prefill_ms": t("prefill_s") * 1e3, "kv_transfer_ms": kv_s * 1e3,
                "kv_exposed_ms": t("kv_exposed_s") * 1e3,
                "first_decode_step_ms": t("first_decode_step_s") * 1e3,
                "kv_exposed_plus_first_step_ms": med(
                    lambda c: c.timings.kv_exposed_s + c.timings.first_decode_step_s) * 1e3,
                "ttft_ms": t("ttft_s") * 1e3, "kv_bytes": kv_b,
                "kv_gb_per_s": kv_b / kv_s / 1e9 if kv_s else 0.0,
                "staged": sum(c.kv_pipelined for c in samples),
                "loaded_layerwise": after["layerwise"] - before["layerwise"],
                "kv_transport": ",".join(sorted({c.kv_transport for c in samples})),
            })
    return rows


def _footprint(cluster) -> dict:
    import ray

    workers = cluster.pool.prefill + cluster.pool.decode
    rss = {w.worker_id: ray.get(w.actor.__ray_call__.remote(
        lambda self: __import__("psutil").Process().memory_info().rss)) for w in workers}
    return {"engine_start_s": {w.worker_id: w.info.engine_start_s for w in workers},
            "rss_bytes": rss}


def _ratios(rows: list[dict]) -> dict:
    """Per length: the share of the held mode's exposed KV time staging hides, and the
    prefill time layer-wise staging adds (both from this invocation's medians)."""
    out = {}
    by = {(r["mode"], r["prompt_tokens"]): r for r in rows}
    for (mode, L), held in by.items():
        lw = by.get(("layerwise", L))
        if mode != "held" or lw is None or not held["kv_exposed_ms"]:
            continue
        out[str(L)] = {
            "kv_exposed_hidden_share": 1 - lw["kv_exposed_ms"] / held["kv_exposed_ms"],
            "prefill_layerwise_over_held": lw["prefill_ms"] / held["prefill_ms"],
            "ttft_layerwise_over_held": lw["ttft_ms"] / held["ttft_ms"],
            "kv_exposed_plus_first_step_layerwise_over_held": (
                lw["kv_exposed_plus_first_step_ms"] / held["kv_exposed_plus_first_step_ms"]),
        }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny",
                    help="model shape built locally: tiny | qwen2.5-0.5b | llama-3.2-1b ...")
    ap.add_argument("--modes", default="held,layerwise",
                    help="KV modes to compare, in order: held (unpipelined), layerwise")
    ap.add_argument("--lengths", default="512,2048", help="prompt lengths in tokens")
    ap.add_argument("--repeats", type=int, default=5, help="requests per length (median reported)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="engine context length (default: the model's own)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="bench/results/ttft.json")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",")]
    if unknown := [m for m in modes if m not in MODES]:
        ap.error(f"--modes: unknown {unknown}; known: {', '.join(MODES)}")

    from rich.console import Console
    from rich.progress import track

    from app.assets import DEFAULT_HOME
    from app.launcher import LocalCluster

    console = Console()
    model_dir, load_format, adapters = _prepare(args.model, Path(DEFAULT_HOME))
    lengths = [int(x) for x in args.lengths.split(",")]
    rows, footprint = [], {}
    for mode in modes:
        console.rule(f"KV mode: {mode}")
        cfg = _cluster_config(args, model_dir, load_format, adapters, MODES[mode])
        cluster = LocalCluster(cfg).start_in_thread(console.log)
        try:
            footprint[mode] = _footprint(cluster)
            rows += [{"mode": mode, **r}
                     for r in _measure(cluster, adapters[0][0], lengths, args, track)]
        finally:
            cluster.stop()
    ratios = _ratios(rows)
    console.print({"ratios": ratios, **footprint})
    report("TTFT split, KV held vs staged layer by layer (medians)", rows, args.out,
           config=vars(args), model=str(model_dir), ratios=ratios, footprint=footprint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
