"""Prefill-only microbenchmark: base vs stock vLLM CPU LoRA vs grouped LoRA.

Times one prefill of ``--num-requests`` prompts of ``--prompt-len`` random token ids
(``max_tokens=1``, all prompts scheduled in a single engine step, prefix caching off) on a
Qwen2.5-0.5B-shaped model with random weights (``load_format="dummy"``, nothing is
downloaded; the config is written locally).  Three systems:

* ``base``    -- engine without LoRA (the reference every ratio is taken against),
* ``stock``   -- ``enable_lora`` with vLLM's own ``PunicaWrapperCPU`` (torch sgmv ops),
* ``grouped`` -- ``enable_lora`` after :func:`lora_kernel.grouped_lora.install_grouped_lora`.

Each system is a persistent engine in its own subprocess (clean patch state: only the
``grouped`` one calls ``install_grouped_lora``).  For every adapter count all systems get
a warm-up pass (8-token prompts with the same adapters, which makes the adapters resident
in their slots), then ``--repeats`` rounds; each round times every system once on the same
prompts, rotating the order, so background load hits all systems alike.  The reported
ratio is the median over rounds of ``time / base time of the same round``.  Request ``i``
uses adapter ``i % n_adapters`` (distinct adapter ids; weights from ``--distinct-weights``
PEFT files written locally so disk use stays small).  Stock and grouped engines have the
same ``max_loras = max_cpu_loras =`` largest adapter count run for that (dtype, rank),
``max_lora_rank = rank``, LoRA on q,k,v,o,gate,up,down, ``lora_alpha = 2 * rank``.
Three engines are alive at once: mind ``--max-lora-gib``.

Example (the configuration in docs/grouped_lora.md)::

    python -m bench.prefill_lora --adapters 1,8,64 --ranks 8 --dtypes float32 \\
        --num-requests 64 --prompt-len 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("base", "stock", "grouped")

QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
    "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 151936,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "float32",
    "bos_token_id": 151643, "eos_token_id": 151643, "use_sliding_window": False,
    "sliding_window": None, "max_window_layers": 24, "attention_dropout": 0.0,
}


def _csv(kind):
    def parse(s: str):
        return [kind(v) for v in s.split(",") if v.strip()]
    return parse


def lora_params_per_adapter(rank: int, cfg: dict = QWEN25_05B) -> int:
    """Parameters of one all-projection LoRA adapter of ``rank`` on ``cfg``."""
    h, i, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    ins = 3 * h + q + 2 * h + i          # A: q, k, v, o, gate, up, down
    outs = q + 2 * kv + h + 2 * i + h    # B
    return L * rank * (ins + outs)


def est_lora_gib(rank: int, n_slots: int, dtype: str) -> float:
    """Slot tensors + CPU adapter cache, both resident, in GiB."""
    nbytes = 2 if dtype in ("bfloat16", "float16") else 4
    return 2 * n_slots * lora_params_per_adapter(rank) * nbytes / 2**30


# ------------------------------------------------------------------ worker side
def _worker(spec: dict) -> None:
    """Subprocess: build one engine, then serve ``warm``/``time`` commands read from stdin."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    import torch
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    def emit(**kw):
        print(json.dumps(kw), flush=True)

    system, dtype, rank = spec["system"], spec["dtype"], spec["rank"]
    n_req, plen = spec["num_requests"], spec["prompt_len"]
    if system == "grouped":
        from lora_kernel.grouped_lora import install_grouped_lora
        install_grouped_lora()
    kw = dict(model=spec["model_dir"], load_format="dummy", skip_tokenizer_init=True,
              enforce_eager=True, distributed_executor_backend="uni", dtype=dtype,
              max_model_len=max(256, plen + 16), max_num_batched_tokens=n_req * plen,
              max_num_seqs=n_req, enable_prefix_caching=False, seed=0)
    if system != "base":
        kw.update(enable_lora=True, max_loras=spec["max_loras"],
                  max_cpu_loras=spec["max_loras"], max_lora_rank=rank)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    wrapper_types = sorted({type(w).__name__ for w in runner.lora_manager._adapter_manager
                            .punica_wrapper_mapping.values()}) if system != "base" else []
    if system == "grouped":
        assert wrapper_types == ["GroupedPunicaWrapperCPU"], wrapper_types
    emit(event="ready", seconds=time.perf_counter() - t0, punica_wrapper=wrapper_types)

    sp = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    vocab = QWEN25_05B["vocab_size"]

    def prompts(seed, length):
        gen = torch.Generator().manual_seed(seed)
        return [{"prompt_token_ids": torch.randint(0, vocab, (length,), generator=gen).tolist()}
                for _ in range(n_req)]

    def lora_reqs(n_ad):
        if not n_ad or system == "base":
            return None
        dirs = spec["adapter_dirs"]
        lr = [LoRARequest(f"a{k}", k + 1, dirs[k % len(dirs)]) for k in range(n_ad)]
        return [lr[i % n_ad] for i in range(n_req)]

    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        reqs = lora_reqs(cmd["adapters"])
        if cmd["cmd"] == "warm":  # short prompts, same adapters: loads them into the slots
            llm.generate(prompts(cmd["seed"], 8), sp, lora_request=reqs, use_tqdm=False)
            emit(event="warm")
        elif cmd["cmd"] == "time":
            batch = prompts(cmd["seed"], plen)
            t = time.perf_counter()
            outs = llm.generate(batch, sp, lora_request=reqs, use_tqdm=False)
            dt = time.perf_counter() - t
            assert len(outs) == n_req
            emit(event="time", seconds=dt)


# ------------------------------------------------------------------ parent side
def _prepare(workdir: Path, ranks: list[int], n_weights: int) -> tuple[Path, dict]:
    sys.path.insert(0, str(REPO))
    from app.tiny import make_lora_adapter
    model_dir = workdir / "qwen2.5-0.5b-shape"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(QWEN25_05B, indent=1))
    adapters = {}
    for rank in ranks:
        dirs = []
        for k in range(n_weights):
            d = workdir / f"lora-r{rank}-{k}"
            if not (d / "adapter_model.safetensors").exists():
                make_lora_adapter(d, model_dir, seed=1000 * rank + k, rank=rank, alpha=2 * rank)
            dirs.append(str(d))
        adapters[rank] = dirs
    return model_dir, adapters


class _Engine:
    """A persistent worker subprocess holding one engine."""

    def __init__(self, spec: dict, log, env: dict):
        self.spec = spec
        self.name = f"{spec['system']}/{spec['dtype']}/r{spec['rank']}"
        cmd = [sys.executable, "-m", "bench.prefill_lora", "--_worker", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=log, text=True)
        self.log_name = log.name
        self.ready = self._read("ready")

    def _read(self, event: str) -> dict:
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if ev.get("event") == event:
                return ev
        raise RuntimeError(f"bench worker {self.name} exited (code {self.proc.wait()}); "
                           f"see {self.log_name}")

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read("warm" if cmd["cmd"] == "warm" else "time")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.prefill_lora", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", type=_csv(int), default=[1, 8, 64],
                   help="distinct adapter counts, comma separated (default 1,8,64)")
    p.add_argument("--ranks", type=_csv(int), default=[8, 64],
                   help="LoRA ranks; max_lora_rank = rank (default 8,64)")
    p.add_argument("--dtypes", type=_csv(str), default=["float32"],
                   help="model/LoRA dtypes: float32,bfloat16 (default float32)")
    p.add_argument("--systems", type=_csv(str), default=list(SYSTEMS),
                   help="subset of base,stock,grouped (base is always run)")
    p.add_argument("--num-requests", type=int, default=64,
                   help="prompts per prefill batch (default 64)")
    p.add_argument("--prompt-len", type=int, default=32,
                   help="tokens per prompt (default 32; the doc table uses 128)")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved timing rounds per configuration (default 3)")
    p.add_argument("--distinct-weights", type=int, default=4,
                   help="distinct adapter weight files per rank; adapter k uses file "
                        "k %% N under its own adapter id (default 4)")
    p.add_argument("--max-lora-gib", type=float, default=6.0,
                   help="skip LoRA engines whose slot tensors + CPU adapter cache would "
                        "exceed this many GiB; lower adapter counts still run (default 6)")
    p.add_argument("--omp-bind", default=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0-1"),
                   help="VLLM_CPU_OMP_THREADS_BIND for every engine (default 0-1)")
    p.add_argument("--workdir",
                   default=os.path.join(tempfile.gettempdir(), "preft_bench_prefill_lora"),
                   help="where the model config and adapters are written")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "prefill_lora.json"),
                   help="JSON output (default bench/results/prefill_lora.json)")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        _worker(json.loads(args._worker))
        return 0

    from tqdm import tqdm
    systems = [s for s in SYSTEMS if s in set(args.systems) | {"base"}]
    workdir = Path(args.workdir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model_dir, adapter_dirs = _prepare(workdir, args.ranks if len(systems) > 1 else [],
                                       args.distinct_weights)
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               VLLM_CPU_OMP_THREADS_BIND=args.omp_bind,
               VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))

    plan, skipped = [], []  # (dtype, rank, counts)
    for dtype in args.dtypes:
        for rank in args.ranks:
            counts = [n for n in args.adapters
                      if est_lora_gib(rank, n, dtype) <= args.max_lora_gib]
            for n in sorted(set(args.adapters) - set(counts)):
                skipped.append(dict(dtype=dtype, rank=rank, adapters=n,
                                    reason=f"LoRA slots + CPU cache need "
                                           f"~{est_lora_gib(rank, n, dtype):.1f} GiB per engine "
                                           f"> --max-lora-gib {args.max_lora_gib}"))
            if counts and len(systems) > 1:
                plan.append((dtype, rank, counts))
    common = dict(model_dir=str(model_dir), num_requests=args.num_requests,
                  prompt_len=args.prompt_len)
    total = sum(len(c) * args.repeats * len(systems) for _, _, c in plan)
    log_path = out.with_suffix(".log")
    rows, builds = [], []
    t_start = time.time()
    with open(log_path, "w") as log, tqdm(total=total, unit="prefill") as bar:
        for dtype in args.dtypes:
            bar.set_postfix_str(f"building base {dtype} engine")
            base = _Engine(dict(common, system="base", dtype=dtype, rank=0, max_loras=0,
                                adapter_dirs=[]), log, env)
            builds.append({"engine": base.name, **base.ready})
            for pdtype, rank, counts in plan:
                if pdtype != dtype:
                    continue
                engines = {"base": base}
                for system in systems[1:]:
                    bar.set_postfix_str(f"building {system} {dtype} r{rank} engine")
                    e = _Engine(dict(common, system=system, dtype=dtype, rank=rank,
                                     max_loras=max(counts), adapter_dirs=adapter_dirs[rank]),
                                log, env)
                    builds.append({"engine": e.name, **e.ready})
                    engines[system] = e
                for n in counts:
                    for system, e in engines.items():
                        e.call(cmd="warm", adapters=n, seed=7)
                    times = {system: [] for system in engines}
                    for rep in range(args.repeats):
                        order = list(engines)
                        order = order[rep % len(order):] + order[: rep % len(order)]
                        for system in order:  # same prompts for every system in a round
                            dt = engines[system].call(cmd="time", adapters=n,
                                                      seed=1000 + rep)["seconds"]
                            times[system].append(dt)
                            bar.set_postfix_str(f"{dtype} r{rank} n{n} {system}: {dt:.1f}s")
                            bar.update(1)
                    b = times["base"]
                    for system, ts in times.items():
                        paired = [t / bt for t, bt in zip(ts, b)]
                        rows.append(dict(
                            dtype=dtype, rank=rank, adapters=n, system=system,
                            times_s=ts, median_s=statistics.median(ts),
                            base_times_s=b, base_median_s=statistics.median(b),
                            ratio_of_medians=statistics.median(ts) / statistics.median(b),
                            paired_ratios=paired, ratio_to_base=statistics.median(paired)))
                for system in systems[1:]:
                    engines[system].close()
            base.close()

    print(f"\nprefill of {args.num_requests} x {args.prompt_len} tokens, {args.repeats} "
          "interleaved rounds; x base = median over rounds of (time / base time in the same "
          "round)")
    print(f"{'dtype':9} {'rank':>4} {'adapters':>8} {'system':8} {'median s':>9} "
          f"{'base s':>7} {'x base':>7}")
    for x in rows:
        print(f"{x['dtype']:9} {x['rank']:4d} {x['adapters']:8d} {x['system']:8} "
              f"{x['median_s']:9.2f} {x['base_median_s']:7.2f} {x['ratio_to_base']:7.2f}")
    for s_ in skipped:
        print(f"skipped {s_['dtype']} rank {s_['rank']} x {s_['adapters']} adapters: "
              f"{s_['reason']}")

    import torch
    import vllm
    result = {
        "benchmark": "prefill_lora",
        "command": " ".join([sys.executable, "-m", "bench.prefill_lora", *(argv or sys.argv[1:])]),
        "config": {**{k: v for k, v in vars(args).items() if k != "_worker"},
                   "systems": systems, "model_config": QWEN25_05B,
                   "method": "one persistent engine subprocess per system; per adapter count "
                             "a warm-up pass (8-token prompts, same adapters), then "
                             "--repeats rounds, each timing every system once on the same "
                             "prompts, rotating the order; ratio_to_base = median of the "
                             "per-round time/base ratios",
                   "engine": {"load_format": "dummy", "enforce_eager": True,
                              "distributed_executor_backend": "uni",
                              "enable_prefix_caching": False,
                              "max_num_batched_tokens": args.num_requests * args.prompt_len,
                              "max_num_seqs": args.num_requests,
                              "max_loras": "largest adapter count run for that (dtype, rank)",
                              "max_cpu_loras": "= max_loras",
                              "max_lora_rank": "= rank", "lora_alpha": "2 * rank",
                              "targets": "q,k,v,o,gate,up,down"},
                   "request_to_adapter": "request i -> adapter i % n (contiguous per request)",
                   "env": {k: env[k] for k in ("VLLM_ENABLE_V1_MULTIPROCESSING",
                                               "VLLM_CPU_OMP_THREADS_BIND",
                                               "VLLM_CPU_KVCACHE_SPACE")}},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor(), "python": platform.python_version(),
                    "torch": torch.__version__, "vllm": vllm.__version__},
        "wall_s": time.time() - t_start,
        "engine_builds": builds, "rows": rows, "skipped": skipped,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out} (engine logs: {log_path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
