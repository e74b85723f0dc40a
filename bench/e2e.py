"""``preft bench``: end-to-end serving throughput, PreFT cluster vs vLLM multi-LoRA vs base.

Every system runs on the same machine in the same invocation, one after another, on the
same seeded workload (:mod:`bench.workload`), and each gets all the machine's cores:

* ``preft``              -- this project: ``preft up`` (Redis, Ray, 1 prefill + 1 decode
  worker, gRPC router) driven through the async gRPC SDK; adapters act at prefill only.
* ``preft_shared``       -- the same pools with ``local_cores: shared`` (the default since
  it measured faster): both engines on every core, passive OpenMP waits; ``preft`` keeps
  ``local_cores: split`` (disjoint halves), as every recorded ``preft`` row ran.
* ``preft_held``         -- ``preft_shared`` with ``transfer.layerwise: false``: prompt KV
  held in prefill's blocks and pulled whole, not staged and loaded layer by layer.
* ``preft_colocated``    -- ``preft up --colocated-workers 1``: one engine applies each
  adapter to its prompt positions and decodes adapter-free in the same batch (no KV moves).
* ``preft_mixed``        -- 1 colocated + 1 prefill + 1 decode worker: the router chooses
  a path per request (its choices are recorded in the row's ``paths``).
* ``multi_lora``         -- the paper's baseline: one ``vllm.entrypoints.openai.api_server``
  with ``--enable-lora`` serving all adapters on every token (vLLM's own CPU LoRA ops),
  driven through its OpenAI ``/v1/completions`` streaming API.
* ``multi_lora_grouped`` -- the same server with our grouped LoRA kernel (vLLM plugin,
  ``PREFT_LORA_KERNEL=grouped``): the kernel's share of the gain, apart from PreFT's.
* ``base``               -- the same server without adapters: the ceiling.

All requests are greedy with ``ignore_eos`` so every system produces the same number of
tokens (the tokens themselves are not compared: the systems apply adapters differently).
For each adapter count N the run records output tokens/s, requests/s, TTFT/TPOT/end-to-end
p50 and p99 (client-side, streaming), prints a table with the ratios preft/multi_lora and
preft/base, writes JSON with every figure and the exact configuration, and draws PNG plots
(throughput vs N; TTFT/TPOT distributions).

The multi-LoRA servers must prove which LoRA kernel they run: ``multi_lora_grouped`` fails
(no numbers, exit status 1) unless its engine log shows the grouped kernel active, and
``multi_lora`` fails if it does.

Example (the issue-7 workload)::

    preft bench --model qwen2.5-0.5b --adapters 64 --num-requests 64 \\
        --prompt-len 128 --output-len 64 --rank 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bench.workload import POPULARITY, BenchRequest, Workload, build

REPO = Path(__file__).resolve().parents[1]
PREFT_SYSTEMS = ("preft", "preft_shared", "preft_held", "preft_colocated", "preft_mixed")
SYSTEMS = (*PREFT_SYSTEMS, "multi_lora", "multi_lora_grouped", "base")
DEFAULT_SYSTEMS = ("preft_colocated", "preft_shared", "preft", "multi_lora", "multi_lora_grouped",
                   "base")
# Logged by lora_kernel.grouped_lora.GroupedPunicaWrapperCPU when an engine builds it.
GROUPED_KERNEL_MARKER = "grouped multi-adapter LoRA kernel active"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class BenchConfig:
    model: str = "tiny"
    dtype: str = "float32"
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    adapters: tuple[int, ...] = (1, 8, 64)
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    preft_kind: str = "lora_p"          # what the PreFT cluster serves: lora_p | reft_p (DiReFT)
    reft_layers: int = 4                # reft_p: intervened layers, spread evenly
    distinct_weights: int = 16          # adapter files; names beyond reuse them
    max_loras: int = 64                 # engine slots (both systems), capped at N
    max_num_seqs: int = 64
    workload: Workload = field(default_factory=Workload)
    warmup_requests: int = 4
    preft_prefill_tokens: int | None = None   # prefill engine's tokens per step (None: vLLM's)
    gpus: int = 0                       # 0: CPU engines; N: PreFT gets N/2 prefill + N/2 decode
                                        # workers (1 GPU each), vLLM --data-parallel-size N
    startup_timeout_s: float = 900.0
    request_timeout_s: float = 3600.0
    out_dir: str = "bench/results/e2e"

    def __post_init__(self) -> None:
        bad = [s for s in self.systems if s not in SYSTEMS]
        if bad or not self.systems:
            raise ValueError(f"systems={list(self.systems)}: choose from {SYSTEMS}")
        if any(n < 1 for n in self.adapters) or not self.adapters:
            raise ValueError(f"adapters={list(self.adapters)}: adapter counts must be >= 1")
        if self.preft_kind not in ("lora_p", "reft_p"):
            raise ValueError(f"preft_kind={self.preft_kind!r}: lora_p or reft_p")
        if self.rank not in LORA_RANKS:
            raise ValueError(f"rank={self.rank}: vLLM supports {LORA_RANKS}")
        if self.distinct_weights < 1 or self.max_loras < 1 or self.max_num_seqs < 1:
            raise ValueError("distinct_weights, max_loras and max_num_seqs must be >= 1")
        if self.gpus and "multi_lora_grouped" in self.systems:
            raise ValueError("systems: multi_lora_grouped needs CPU engines (the grouped LoRA "
                             "kernel is CPU-only); drop it from --systems with --gpus")

    @property
    def max_model_len(self) -> int:
        need = self.workload.prompt_len[1] + self.workload.output_len[1] + 16
        return max(256, -(-need // 128) * 128)


@dataclass
class Record:
    ok: bool
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    e2e_s: float = 0.0
    output_tokens: int = 0
    error: str = ""


# --------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(xs: list[float], q: float) -> float:
    """The q-th percentile, nearest rank (a latency some request really had)."""
    return float(np.percentile(xs, q, method="nearest")) if xs else float("nan")


def _kv_gib(model_dir: Path, cfg: BenchConfig) -> float:
    """KV cache to give each engine: every request's full context, x1.5, >= 1 GiB."""
    hf = json.loads((model_dir / "config.json").read_text())
    head = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    per_tok = 2 * hf["num_hidden_layers"] * hf["num_key_value_heads"] * head * 4
    need = per_tok * cfg.max_model_len * min(cfg.max_num_seqs, cfg.workload.num_requests)
    return float(max(1, -(-int(1.5 * need) // (1 << 30))))


def _all_cores() -> str:
    n = os.cpu_count() or 1
    return "0" if n == 1 else f"0-{n - 1}"


class System(ABC):
    name: str

    def __init__(self, cfg: BenchConfig, model_dir: Path, load_format: str,
                 adapters: list[tuple[str, Path]], log_dir: Path) -> None:
        self.cfg, self.model_dir, self.load_format = cfg, model_dir, load_format
        self.adapters = adapters
        self.log_path = log_dir / f"{self.name}.log"
        self.log = None
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0
        self.lora_kernel: str | None = None   # vLLM servers: the kernel their log proved

    def _spawn(self, cmd: list[str], env: dict, read_stdout: bool = False) -> None:
        # stdout is a pipe only when we read it to the end; an unread pipe fills up and
        # blocks the server (vLLM logs its whole config, e.g. 512 --lora-modules).
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env},
                                     stdout=subprocess.PIPE if read_stdout else self.log,
                                     stderr=self.log, text=True, start_new_session=True)

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def request(self, req: BenchRequest, adapter: str | None) -> Record: ...

    async def close(self) -> None:
        pass

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def _dead(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            return f"{self.name} server exited with {self.proc.returncode}; see {self.log_path}"
        return None


class PreftSystem(System):
    """``preft up`` in one of its shapes: ``preft`` (prefill/decode pools),
    ``preft_colocated`` (colocated workers only) or ``preft_mixed`` (both)."""

    def __init__(self, name: str, *a, **kw) -> None:
        self.name = name
        super().__init__(*a, **kw)
        self.metrics_port: int | None = None   # the router's, as `preft up` prints it

    def paths(self) -> dict[str, float]:
        """Requests per serving path so far (the router's preft_request_paths_total)."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                if smp.name == "preft_request_paths_total":
                    out[smp.labels["path"]] = out.get(smp.labels["path"], 0) + smp.value
        return out

    def wide_steps(self) -> int:
        """Colocated engines' steps so far whose requests had more adapters than
        ``max_loras`` (``ClusterStatus``; ``colocated_worker/prompt_slots.py``)."""
        from app.top import cluster_status
        from preft_client import PreftClient

        with PreftClient(self.address, timeout=30) as c:
            return sum(w[3] for w in cluster_status(c)["slots"].values())

    def _pools(self) -> dict:
        n = max(1, self.cfg.gpus)
        if self.name == "preft_colocated":
            return {"prefill_workers": 0, "decode_workers": 0, "colocated_workers": n}
        n_pre = max(1, self.cfg.gpus // 2)
        pools = {"prefill_workers": n_pre, "decode_workers": max(1, self.cfg.gpus - n_pre)}
        if self.name == "preft_mixed":
            pools["colocated_workers"] = 1
        return pools

    async def start(self) -> None:
        import yaml

        c = self.cfg
        eng = {"model": str(self.model_dir), "dtype": c.dtype, "load_format": self.load_format,
               "max_model_len": c.max_model_len, "kv_cache_gib": _kv_gib(self.model_dir, c),
               "max_num_seqs": c.max_num_seqs}
        n_max = max(c.adapters)
        # GPU: CUDA graphs for decode; prefill stays eager (ReFT-P hooks need it).
        dec_eng = {**eng, "enforce_eager": not c.gpus}
        gpu = {"num_gpus": 1} if c.gpus else {}
        slots = {"max_lora_rank": c.rank, "max_loras": min(c.max_loras, n_max),
                 "max_cpu_loras": n_max, **gpu}
        transfer = {"transfer": {"layerwise": False}} if self.name == "preft_held" else {}
        conf = {
            **self._pools(),
            "local_cores": "split" if self.name == "preft" else "shared",
            "run_dir": str(self.log_path.parent / "preft-run"),
            "adapters": {n: str(p) for n, p in self.adapters},
            "prefill": {"engine": {**eng, "max_num_batched_tokens": c.preft_prefill_tokens},
                        **slots, **transfer},
            "decode": {"engine": dec_eng, **gpu, **transfer},
            "colocated": {"engine": eng, **slots},
            "router": {"port": 0, "request_timeout_s": c.request_timeout_s,
                       "metrics_port": 0,   # any free port: no race with Ray's ports
                       "max_queue_depth": max(256, c.workload.num_requests)},
        }
        path = self.log_path.parent / "preft-cluster.yaml"
        path.write_text(yaml.safe_dump(conf))
        t0 = time.perf_counter()
        self._spawn([sys.executable, "-m", "app.cli", "up", "--config", str(path)],
                    {"PYTHONUNBUFFERED": "1"}, read_stdout=True)
        line = await asyncio.wait_for(asyncio.to_thread(self._wait_line), c.startup_timeout_s)
        self.address = line.split()[3]   # "router listening on HOST:PORT [(TLS)]"
        from preft_client import AsyncPreftClient

        self.client = AsyncPreftClient(self.address, timeout=c.request_timeout_s, retries=0)
        self.startup_s = time.perf_counter() - t0

    def _wait_line(self) -> str:
        """The router's address line; the metrics line that follows it sets the port."""
        address = None
        for line in self.proc.stdout:
            self.log.write(line)
            if line.startswith("router listening on"):
                address = line
            elif address and line.startswith("metrics on http://"):
                self.metrics_port = int(line.rsplit(":", 1)[1].split("/")[0])
                threading.Thread(target=self._drain, daemon=True).start()
                return address
        raise RuntimeError(self._dead() or "preft up ended without a router address and "
                           "metrics port")

    def _drain(self) -> None:
        """Keep reading ``preft up``'s stdout into the log so it never blocks on a full pipe."""
        for line in self.proc.stdout:
            self.log.write(line)

    async def request(self, req, adapter):
        t0 = time.perf_counter()
        times, n = [], 0
        try:
            async for d in self.client.stream(adapter, prompt_token_ids=req.prompt_token_ids,
                                              max_tokens=req.max_tokens, ignore_eos=True):
                times.append(time.perf_counter())
                n += len(d.token_ids)
        except Exception as e:  # noqa: BLE001 -- recorded, the run goes on
            return Record(False, error=f"{type(e).__name__}: {e}"[:300])
        return _record(t0, times, n)

    async def close(self) -> None:
        await self.client.close()


class VllmSystem(System):
    """vLLM's own OpenAI server, multi-LoRA (stock or grouped kernel) or base only."""

    def __init__(self, name: str, *a, **kw) -> None:
        self.name = name
        super().__init__(*a, **kw)

    async def start(self) -> None:
        import httpx

        c = self.cfg
        self.port = _free_port()
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(self.model_dir), "--served-model-name", "base",
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", c.dtype,
               "--load-format", self.load_format, "--max-model-len", str(c.max_model_len),
               "--max-num-seqs", str(c.max_num_seqs), "--seed", "0", "--disable-log-stats"]
        cmd += ["--data-parallel-size", str(c.gpus)] if c.gpus > 1 else []
        cmd += [] if c.gpus else ["--enforce-eager"]
        if self.name != "base":
            n_max = max(c.adapters)
            cmd += ["--enable-lora", "--max-lora-rank", str(c.rank),
                    "--max-loras", str(min(c.max_loras, n_max)), "--max-cpu-loras", str(n_max),
                    "--lora-modules", *[f"{n}={p}" for n, p in self.adapters]]
        env = {"VLLM_CPU_KVCACHE_SPACE": str(int(_kv_gib(self.model_dir, c))),
               # all cores for the engine (vLLM's auto binding would keep one back)
               "VLLM_CPU_OMP_THREADS_BIND": _all_cores(), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
               "PREFT_LORA_KERNEL": "grouped" if self.name == "multi_lora_grouped" else "stock"}
        t0 = time.perf_counter()
        self._spawn(cmd, env)
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}",
                                      timeout=httpx.Timeout(c.request_timeout_s, connect=10),
                                      limits=httpx.Limits(max_connections=1024))
        deadline = time.monotonic() + c.startup_timeout_s
        while time.monotonic() < deadline:
            if (why := self._dead()):
                raise RuntimeError(why)
            try:
                if (await self.http.get("/health")).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1.0)
        else:
            raise TimeoutError(f"{self.name} server not healthy in {c.startup_timeout_s}s")
        self.startup_s = time.perf_counter() - t0
        self.check_lora_kernel()

    def check_lora_kernel(self) -> None:
        """Refuse to measure a server whose LoRA kernel is not the one its name says: a
        grouped run that fell back to vLLM's stock ops would report stock numbers."""
        if self.name == "base":
            return
        if self.log is not None:
            self.log.flush()
        grouped = GROUPED_KERNEL_MARKER in self.log_path.read_text(errors="replace")
        if grouped != (self.name == "multi_lora_grouped"):
            raise RuntimeError(
                f"{self.name}: the engine {'runs' if grouped else 'did not load'} the grouped "
                f"LoRA kernel ({GROUPED_KERNEL_MARKER!r} {'in' if grouped else 'not in'} "
                f"{self.log_path}); refusing to report its numbers as {self.name}")
        self.lora_kernel = "grouped" if grouped else "stock"

    async def request(self, req, adapter):
        body = {"model": adapter or "base", "prompt": list(req.prompt_token_ids),
                "max_tokens": req.max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        times, n = [], 0
        try:
            async with self.http.stream("POST", "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    return Record(False, error=f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices"):
                        times.append(time.perf_counter())
                    if chunk.get("usage"):
                        n = chunk["usage"]["completion_tokens"]
        except Exception as e:  # noqa: BLE001
            return Record(False, error=f"{type(e).__name__}: {e}"[:300])
        return _record(t0, times, n)

    async def close(self) -> None:
        await self.http.aclose()


def _record(t0: float, times: list[float], n: int) -> Record:
    if not times or n < 1:
        return Record(False, error="no tokens")
    ttft = times[0] - t0
    tpot = (times[-1] - times[0]) / (n - 1) if n > 1 else 0.0
    return Record(True, ttft, tpot, times[-1] - t0, n)


def make_system(name: str, *a) -> System:
    return PreftSystem(name, *a) if name in PREFT_SYSTEMS else VllmSystem(name, *a)


# --------------------------------------------------------------------------- running
async def run_workload(system: System, reqs: list[BenchRequest], names: list[str],
                       concurrency: int | None) -> tuple[list[Record], float]:
    sem = asyncio.Semaphore(concurrency or len(reqs))
    t_start = time.perf_counter()

    async def one(r: BenchRequest) -> Record:
        await asyncio.sleep(max(0.0, r.arrival_s - (time.perf_counter() - t_start)))
        async with sem:
            return await system.request(r, None if r.adapter is None else names[r.adapter])

    records = await asyncio.gather(*(one(r) for r in reqs))
    return list(records), time.perf_counter() - t_start


def summarize(system: str, n_adapters: int, records: list[Record], wall: float,
              distinct: int) -> dict:
    ok = [r for r in records if r.ok]
    out_tok = sum(r.output_tokens for r in ok)
    row = {"system": system, "adapters": n_adapters, "distinct_used": distinct,
           "completed": len(ok), "failed": len(records) - len(ok), "wall_s": wall,
           "output_tok_s": out_tok / wall, "req_s": len(ok) / wall, "output_tokens": out_tok}
    for k in ("ttft_s", "tpot_s", "e2e_s"):
        xs = [getattr(r, k) for r in ok]
        row[f"{k[:-2]}_p50_ms"] = 1e3 * _pct(xs, 50)
        row[f"{k[:-2]}_p99_ms"] = 1e3 * _pct(xs, 99)
    row["errors"] = sorted({r.error for r in records if not r.ok})[:5]
    row["samples"] = {"ttft_ms": [1e3 * r.ttft_s for r in ok], "tpot_ms": [1e3 * r.tpot_s for r in ok]}
    return row


def prepare_adapters(cfg: BenchConfig, model_dir: Path, root: Path,
                     kind: str = "lora_p") -> list[tuple[str, Path]]:
    """``max(adapters)`` named adapters over ``distinct_weights`` weight files of ``kind``."""
    from app.tiny import make_lora_adapter, make_reft_adapter

    n_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    layers = tuple(sorted({round(i * (n_layers - 1) / max(1, cfg.reft_layers - 1))
                           for i in range(cfg.reft_layers)}))
    files = []
    for k in range(min(cfg.distinct_weights, max(cfg.adapters))):
        d = root / "adapters" / model_dir.name / f"{kind}-r{cfg.rank}" / f"w{k}"
        if not (d / "adapter_model.safetensors").exists():
            if kind == "reft_p":
                make_reft_adapter(d, model_dir, seed=1000 + k, intervention="direft",
                                  layers=layers, rank=cfg.rank)
            else:
                make_lora_adapter(d, model_dir, seed=1000 + k, rank=cfg.rank,
                                  alpha=2 * cfg.rank, targets=cfg.targets)
        files.append(d)
    return [(f"user{i:04d}", files[i % len(files)]) for i in range(max(cfg.adapters))]


def _tail(path: Path, lines: int = 40) -> str:
    """The end of a server's log, kept in the results so a failed run explains itself."""
    try:
        return "".join(path.read_text(errors="replace").splitlines(True)[-lines:])
    except OSError as e:
        return f"(no log: {e})"


async def bench_system(name: str, cfg: BenchConfig, model_dir: Path, load_format: str,
                       adapters: list[tuple[str, Path]], log_dir: Path, say) -> list[dict]:
    system = make_system(name, cfg, model_dir, load_format, adapters, log_dir)
    names = [n for n, _ in adapters]
    rows = []
    try:
        say(f"[{name}] starting server (log: {system.log_path})")
        await system.start()
        say(f"[{name}] ready in {system.startup_s:.1f}s")
        counts = [0] if name == "base" else list(cfg.adapters)
        for n in counts:
            warm = build(Workload(num_requests=cfg.warmup_requests, prompt_len=(16, 16),
                                  output_len=(4, 4), seed=cfg.workload.seed + 7,
                                  vocab=cfg.workload.vocab), n)
            await run_workload(system, warm, names, None)
            reqs = build(cfg.workload, n)
            say(f"[{name}] N={n}: {len(reqs)} requests ...")
            paths = system.paths() if isinstance(system, PreftSystem) else None
            wide = system.wide_steps() if isinstance(system, PreftSystem) else None
            records, wall = await run_workload(system, reqs, names, cfg.workload.concurrency)
            distinct = len({r.adapter for r in reqs if r.adapter is not None})
            row = summarize(name, n, records, wall, distinct)
            if paths is not None:   # where the router sent this N's requests
                row["paths"] = {k: v - paths.get(k, 0) for k, v in system.paths().items()}
            if wide is not None:    # colocated: steps holding more adapters than max_loras
                row["wide_steps"] = system.wide_steps() - wide
            row["startup_s"] = system.startup_s
            if system.lora_kernel is not None:
                row["lora_kernel"] = system.lora_kernel
            rows.append(row)
            say(f"[{name}] N={n}: {row['output_tok_s']:.1f} tok/s, {row['completed']} ok, "
                f"{row['failed']} failed, wall {wall:.1f}s")
        await system.close()
    except Exception as e:  # noqa: BLE001 -- a system that cannot run is reported, not fatal
        say(f"[{name}] FAILED: {type(e).__name__}: {e}")
        rows.append({"system": name, "adapters": -1, "failed_to_run": f"{type(e).__name__}: {e}",
                     "log_tail": _tail(system.log_path)})
    finally:
        system.stop()
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Each PreFT shape's output tok/s over the others', per N (runs of this invocation)."""
    by = {(r["system"], r["adapters"]): r for r in rows if r.get("adapters", -1) >= 0}
    base = by.get(("base", 0))
    out = []
    for (s, n), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if s not in PREFT_SYSTEMS:
            continue
        row = {"system": s, "adapters": n, "preft_tok_s": r["output_tok_s"]}
        for ref in ("preft", "preft_held"):
            o = by.get((ref, n))
            if s != ref and (o is not None or ref == "preft"):
                row[f"x_{ref}"] = r["output_tok_s"] / o["output_tok_s"] if o and o["output_tok_s"] else None
        for other in ("multi_lora", "multi_lora_grouped"):
            o = by.get((other, n))
            row[f"x_{other}"] = r["output_tok_s"] / o["output_tok_s"] if o and o["output_tok_s"] else None
        row["x_base"] = r["output_tok_s"] / base["output_tok_s"] if base and base["output_tok_s"] else None
        out.append(row)
    return out


def plot(rows: list[dict], cfg: BenchConfig, out_dir: Path, tag: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("adapters", -1) >= 0 and r.get("completed")]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in cfg.systems:
        pts = sorted((r["adapters"], r["output_tok_s"]) for r in ok if r["system"] == s)
        if s == "base" and pts:
            ax.axhline(pts[0][1], ls="--", color="gray", label="base (no adapters)")
        elif pts:
            label = f"{s} ({cfg.preft_kind})" if s in PREFT_SYSTEMS else s
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct adapters in the pool (N)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{cfg.model} {cfg.dtype}, rank {cfg.rank}, {cfg.workload.num_requests} req "
                 f"x {cfg.workload.prompt_len[1]} prompt x {cfg.workload.output_len[1]} out")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths.append(out_dir / f"throughput_vs_adapters_{tag}.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    n_big = max((r["adapters"] for r in ok), default=0)
    sel = [r for r in ok if r["adapters"] in (n_big, 0)]
    if sel:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
        for ax, key, title in ((axes[0], "ttft_ms", "TTFT (ms)"), (axes[1], "tpot_ms", "TPOT (ms)")):
            ax.boxplot([r["samples"][key] for r in sel], showfliers=True)
            ax.set_xticks(range(1, len(sel) + 1), [r["system"] for r in sel], rotation=15)
            ax.set_title(f"{title}, N={n_big}")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        paths.append(out_dir / f"latency_{tag}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def run(cfg: BenchConfig, assets_root: Path) -> dict:
    from rich.console import Console
    from rich.table import Table

    from bench.models import make_model

    console = Console(width=None if sys.stdout.isatty() else 180)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="preft-bench-"))   # server logs, cluster run dir
    say = lambda m: console.log(m)  # noqa: E731
    with console.status(f"building {cfg.model} model directory and adapters"):
        model_dir, load_format = make_model(cfg.model, assets_root)
        vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
        if cfg.workload.vocab != vocab:
            cfg = _with_vocab(cfg, vocab)
        adapters = prepare_adapters(cfg, model_dir, assets_root)     # what vLLM serves
        preft_adapters = (prepare_adapters(cfg, model_dir, assets_root, "reft_p")
                          if cfg.preft_kind == "reft_p" else adapters)
    for n in (n for n in cfg.adapters if n > cfg.workload.num_requests):
        say(f"note: N={n} > {cfg.workload.num_requests} requests, so at most "
            f"{cfg.workload.num_requests} distinct adapters are used (see distinct_used)")
    rows: list[dict] = []
    t0 = time.time()
    for s in cfg.systems:
        rows += asyncio.run(bench_system(s, cfg, model_dir, load_format,
                                         preft_adapters if s in PREFT_SYSTEMS else adapters,
                                         log_dir, say))
    table = Table(title=f"preft bench: {cfg.model} ({cfg.dtype}), rank {cfg.rank}, "
                        f"{cfg.workload.num_requests} requests")
    cols = ("system", "adapters", "completed", "failed", "output_tok_s", "req_s", "ttft_p50_ms",
            "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "wall_s")
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*(f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                        for c in cols))
    console.print(table)
    rt = ratios(rows)
    rtab = Table(title="PreFT output tok/s ratios")
    rcols = ("system", "adapters", "preft_tok_s", "x_preft",
             *(("x_preft_held",) if "preft_held" in cfg.systems else ()), "x_multi_lora",
             "x_multi_lora_grouped", "x_base")
    for c in rcols:
        rtab.add_column(c)
    for r in rt:
        rtab.add_row(*("-" if r.get(c) is None else f"{r[c]:.2f}" if isinstance(r[c], float)
                       else str(r[c]) for c in rcols))
    console.print(rtab)
    result = {"config": _jsonable(asdict(cfg)), "model_dir": str(model_dir),
              "load_format": load_format, "machine": machine(), "started": t0,
              "duration_s": time.time() - t0, "rows": rows, "ratios": rt, "logs": str(log_dir)}
    kind = "" if cfg.preft_kind == "lora_p" else f"_{cfg.preft_kind}"
    tag = f"{cfg.model}_r{cfg.rank}{kind}"
    path = out_dir / f"e2e_{tag}.json"
    path.write_text(json.dumps(result, indent=2))   # the figures survive a plotting failure
    result["plots"] = [str(p) for p in plot(rows, cfg, out_dir, tag)]
    path.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {path} and {', '.join(result['plots'])}")
    return result


def _with_vocab(cfg: BenchConfig, vocab: int) -> BenchConfig:
    from dataclasses import replace
    return replace(cfg, workload=replace(cfg.workload, vocab=vocab))


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def machine() -> dict:
    import psutil

    return {"platform": platform.platform(), "cpus": os.cpu_count(),
            "mem_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "processor": platform.processor(), "python": platform.python_version(),
            "vllm": _dist_version("vllm-cpu", "vllm")}


def _dist_version(*dists: str) -> str | None:
    """Version of the first of ``dists`` that is installed."""
    from importlib.metadata import PackageNotFoundError, version

    for d in dists:
        try:
            return version(d)
        except PackageNotFoundError:
            continue
    return None


# --------------------------------------------------------------------------- CLI
def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


def _range(s: str) -> tuple[int, int]:
    lo, _, hi = s.partition(":")
    return int(lo), int(hi or lo)


def add_args(p: argparse.ArgumentParser) -> None:
    from bench.models import MODELS

    p.add_argument("--model", default="tiny", choices=MODELS,
                   help="architecture: 'tiny' = the embedded test model (CI smoke run); the "
                   "others are published configs with random weights (nothing downloaded)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma-separated, run in this order, from {','.join(SYSTEMS)} "
                   f"(default {','.join(DEFAULT_SYSTEMS)})")
    p.add_argument("--adapters", type=_ints, default=(1, 8, 64),
                   help="adapter counts N to sweep, e.g. 1,8,64,512 (base runs once)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank of every adapter (default 8)")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="projections the adapters touch (default q,k,v,o)")
    p.add_argument("--preft-kind", default="lora_p", choices=["lora_p", "reft_p"],
                   help="adapters the PreFT cluster serves: LoRA-P (same files as the "
                   "multi-LoRA baseline) or ReFT-P (DiReFT of --rank on --reft-layers layers)")
    p.add_argument("--reft-layers", type=int, default=4,
                   help="reft_p: number of intervened layers, spread evenly (default 4)")
    p.add_argument("--distinct-weights", type=int, default=16,
                   help="distinct adapter weight files; adapter i uses file i mod this "
                   "(every adapter is still a distinct adapter to both servers)")
    p.add_argument("--max-loras", type=int, default=64,
                   help="engine adapter slots for both systems, capped at N (default 64)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="batch size limit of every engine")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=_range, default=(128, 128),
                   help="prompt tokens, N or MIN:MAX (uniform), default 128")
    p.add_argument("--output-len", type=_range, default=(64, 64),
                   help="output tokens (ignore_eos), N or MIN:MAX, default 64")
    p.add_argument("--rate", type=float, default=None,
                   help="Poisson arrival rate in req/s (default: all requests at t=0)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="closed loop: at most this many requests in flight")
    p.add_argument("--popularity", default="round_robin", choices=POPULARITY,
                   help="which adapter each request uses: i mod N, uniform, or Zipf")
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preft-prefill-tokens", type=int, default=None,
                   help="PreFT prefill engine's tokens per step (vLLM max_num_batched_tokens; "
                   "default vLLM's): smaller steps start decode sooner")
    p.add_argument("--gpus", type=int, default=0,
                   help="GPU run: PreFT gets GPUS/2 prefill + GPUS/2 decode workers (1 GPU "
                   "each, NCCL KV transfer); vLLM gets --data-parallel-size GPUS (default 0: CPU)")
    p.add_argument("--out-dir", default="bench/results/e2e", help="JSON and PNGs go here")
    p.add_argument("--assets", default=None,
                   help="where model dirs and adapters are built (default $PREFT_HOME/bench)")


def config_from_args(a) -> BenchConfig:
    w = Workload(num_requests=a.num_requests, prompt_len=a.prompt_len, output_len=a.output_len,
                 rate=a.rate, concurrency=a.concurrency, popularity=a.popularity,
                 zipf_s=a.zipf_s, seed=a.seed)
    return BenchConfig(model=a.model, dtype=a.dtype, systems=tuple(a.systems.split(",")),
                       adapters=a.adapters, rank=a.rank, targets=tuple(a.targets.split(",")),
                       preft_kind=a.preft_kind, reft_layers=a.reft_layers,
                       distinct_weights=a.distinct_weights, max_loras=a.max_loras,
                       max_num_seqs=a.max_num_seqs, workload=w, out_dir=a.out_dir, gpus=a.gpus,
                       preft_prefill_tokens=a.preft_prefill_tokens)


def run_from_args(args, default_assets: Path) -> int:
    """``preft bench`` (and ``python -m bench.e2e``): run the parsed arguments; 0 when every
    row completed. Model dirs and adapters are built under ``--assets``, else
    ``default_assets``."""
    result = run(config_from_args(args), Path(args.assets) if args.assets else default_assets)
    return 0 if all(r.get("completed") for r in result["rows"]) else 1


def main(argv: list[str] | None = None) -> int:
    from app.assets import DEFAULT_HOME

    p = argparse.ArgumentParser(prog="preft bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run_from_args(p.parse_args(argv), DEFAULT_HOME / "bench")


if __name__ == "__main__":
    sys.exit(main())
